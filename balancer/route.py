"""The routing decision: from a parsed request to a pool, a key and the strategy's choice.

One pure function, :func:`decide`, used by everything that routes or explains routing: the
proxy for every request, ``/debug/route`` against the live load, and ``balancer route``
against a configuration file. It reads the router and never changes it (nothing is
acquired), so explaining a request leaves no trace.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from balancer.affinity import Pin
from balancer.errors import BadRequestError, NoEndpointsError
from balancer.prefix import Kind, key_source, model_of, validate
from balancer.ring import hash_key
from balancer.router import Pool, Router, Subset
from balancer.routes import Hop, Route
from balancer.strategy import Choice, chwbl_bound
from balancer.summary import KeyRule, Summary, summarize
from balancer.summary import is_first_turn as is_first_turn  # where it was defined before

KEYED_PATHS: Final = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETIONS,
    "/v1/embeddings": Kind.EMBEDDINGS,
    "/v1/responses": Kind.RESPONSES,
}
"""API paths routed by a key from their body; every other /v1 path is passed through."""

_SIGNALS: Final = {
    "in-flight": "load: this balancer's in-flight requests",
    "queue": "load: the queues the endpoints report",
}

_REASONS: Final = {
    "primary": "the key's first endpoint on the ring is within the load bound",
    "session": "explicit session key; its first endpoint is within the load bound",
    "overflow": "earlier endpoints on the ring were at the load bound",
    "fallback": "no endpoint was within the bound; the least loaded was taken",
    "affinity": "the endpoint that stored the response the request names (no load bound)",
}


class RequestView(NamedTuple):
    """What routing reads of a request.

    This and :class:`Decision` are named tuples: as immutable as frozen dataclasses, and
    built for every request at well under half the cost (a frozen dataclass's ``__init__``
    sets each field through ``object.__setattr__``).
    """

    kind: Kind | None
    """The keyed API the body is for; None: a pass-through request (no key)."""
    body: Mapping[str, Any]
    """The parsed JSON body (keyed requests read on the loop by ``balancer route`` and
    ``/debug/route``; empty for pass-through and for the proxy's keyed requests, which carry
    a :attr:`summary` instead)."""
    model: str | None
    """The model asked for (pass-through requests may name none)."""
    session: str | None = None
    """The session header's value, if sent."""
    path: str = ""
    """The API path, for error messages."""
    summary: Summary | None = None
    """What routing reads of a keyed body, already read (the proxy reads it in a worker
    process for a large body, see :mod:`balancer.summary`); None: :func:`decide` reads it
    from :attr:`body`."""
    pinned: Pin | None = None
    """Where the stored response the request names lives (``balancer.affinity``): taken
    when routable, in that pool and not excluded, whatever its load."""


_NO_BODY: Final[Mapping[str, Any]] = {}
"""The body of a view that carries a summary or none (one shared empty mapping)."""


def keyed_view(kind: Kind, body: Mapping[str, Any], session: str | None) -> RequestView:
    """A keyed request's view; raises BadRequestError naming a malformed field."""
    validate(kind, body)
    return RequestView(kind, body, model_of(body), session)


def summarized_view(kind: Kind, summary: Summary, session: str | None,
                    pinned: Pin | None = None) -> RequestView:
    """A keyed request's view from its body's summary (:func:`balancer.summary.read_keyed`,
    which has validated the body)."""
    return RequestView(kind, _NO_BODY, summary.model, session, "", summary, pinned)


def passthrough_view(model: str | None, path: str, pinned: Pin | None = None) -> RequestView:
    return RequestView(None, _NO_BODY, model, None, path, None, pinned)


def kind_for(body: Mapping[str, Any], path: str | None = None) -> Kind:
    """The keyed API a body is for: from its path when given, else from its fields."""
    if path:
        kind = KEYED_PATHS.get(path)
        if kind is None:
            raise BadRequestError(f"path {path!r} is not one of {', '.join(KEYED_PATHS)}",
                                  param="path")
        return kind
    if "messages" in body:
        return Kind.CHAT
    if "prompt" in body:
        return Kind.COMPLETIONS
    if "input" in body:
        value = body["input"]
        if ("previous_response_id" in body or "instructions" in body
                or (isinstance(value, list) and value and isinstance(value[0], dict))):
            return Kind.RESPONSES  # input items, or fields only the Responses API has
        return Kind.EMBEDDINGS
    raise BadRequestError("cannot tell the request kind: no messages, prompt or input field")


class Decision(NamedTuple):
    """Where a request goes, and what led there."""

    pool: Pool
    choice: Choice
    key_hash: int
    """Hash of the routing key (0 for pass-through requests)."""
    key: str | None = None
    """The routing key (None: pass-through, least-request)."""
    key_source: str = ""
    """Where the key came from: "session", or the routing key mode."""
    first_turn: bool = False
    """A conversation's first turn, told apart only when the pool routes on queues."""
    model: str | None = None
    """The model the pool is asked for (the requested one, or a route's name for it there):
    one that only some endpoints serve is routed over those, and a 404 naming it may be
    retried on another (``forward.model_not_found``)."""
    route: Route | None = None
    """The route the requested model names (None: the model's own pool)."""
    hop: int = 0
    """The place of :attr:`pool` in :attr:`chain`."""
    chain: tuple[Hop, ...] = ()
    """Where the route may send this request, in order (:meth:`Route.chain` for its key)."""
    requested: str | None = None
    """The model name the client asked for, on a route."""
    reason: str = ""
    """Why the request is not on its chain's first pool: no_endpoints, panic, overloaded,
    rate_limited or failed ("" on the first)."""

    @property
    def keyed(self) -> bool:
        return self.key is not None

    @property
    def session(self) -> bool:
        return self.key_source == "session"


def decide(view: RequestView, router: Router,
           exclude: frozenset[str] | None = None) -> Decision:
    """Pool, key and endpoint for a request, never one of ``exclude``.

    Raises ModelNotFoundError (unknown model), NoEndpointsError (nothing routable) or
    BadRequestError (a pass-through request naming no model when there are several pools).
    """
    routes = router.routes
    if view.kind is None:
        if routes and view.model in routes:
            route = routes[view.model]
            base = Decision(router.pools[route.backends[0].pool], _NO_CHOICE, 0, route=route,
                            requested=view.model,
                            chain=route.chain(router.rng.getrandbits(64)))
            pinned_hop = (None if view.pinned is None
                          else _pinned_on_chain(router, base, view.pinned, exclude))
            return pinned_hop or _on_chain(router, base, 0, "", exclude)
        pool = _passthrough_pool(view, router)
        pinned = _pinned(view.pinned, pool, exclude)
        choice = pinned or pool.choose(0, keyed=False, exclude=exclude, model=view.model)
        return Decision(pool, choice, 0, model=view.model)
    model = view.model
    if model is None:
        model = model_of(view.body)
    if routes and model in routes:
        return _decide_route(view, router, routes[model], model, exclude)
    pool = router.pool_for_model(model)
    summary = view.summary
    if summary is None:
        summary = summarize(view.kind, view.body, view.session, KeyRule.of(router.routing),
                            pool.first_turn_strategy is not None)
    key = summary.routing_key()
    key_hash = hash_key(key)
    first_turn = pool.first_turn_strategy is not None and summary.first_turn
    pinned = _pinned(view.pinned, pool, exclude) if view.pinned is not None else None
    choice = pinned or pool.choose(key_hash, session=summary.session, exclude=exclude,
                                   first_turn=first_turn, model=model)
    return Decision(pool, choice, key_hash, key,
                    # KeyMode is a StrEnum: the member is already the string, and reading
                    # ``.value`` through the enum descriptor cost a call per request.
                    "session" if summary.session else router.routing.key, first_turn, model)


_NO_CHOICE: Final = Choice("", "primary")


def _decide_route(view: RequestView, router: Router, route: Route, model: str,
                  exclude: frozenset[str] | None) -> Decision:
    """A keyed request for a route: its key ranks the route's pools, and it goes to the
    first that can take it (:func:`_on_chain`)."""
    summary = view.summary
    if summary is None:
        assert view.kind is not None
        summary = summarize(view.kind, view.body, view.session, KeyRule.of(router.routing),
                            router.first_turns)
    key = summary.routing_key()
    key_hash = hash_key(key)
    chain = route.chain(key_hash)
    base = Decision(router.pools[chain[0].pool], _NO_CHOICE, key_hash, key,
                    "session" if summary.session else router.routing.key, summary.first_turn,
                    route=route, chain=chain, requested=model)
    if view.pinned is not None:
        pinned = _pinned_on_chain(router, base, view.pinned, exclude)
        if pinned is not None:
            return pinned
    return _on_chain(router, base, 0, "", exclude)


def _on_chain(router: Router, base: Decision, start: int, reason: str,
              exclude: frozenset[str] | None) -> Decision:
    """The first pool of ``base.chain`` from ``start`` on that can take the request: one
    with a routable endpoint and not in panic mode; else the first with a routable endpoint
    (panic mode still serves); else NoEndpointsError. ``reason``: why the request left the
    pools before ``start``."""
    spare: Decision | None = None
    for i in range(start, len(base.chain)):
        hop = base.chain[i]
        pool = router.pools[hop.pool]
        if not pool.routable:
            reason = reason or "no_endpoints"
            continue
        requested = base.requested or ""
        model = pool.model_for(hop, requested)
        try:
            # first_turn matters only to pools that route first turns apart.
            choice = pool.choose(base.key_hash, session=base.session, keyed=base.keyed,
                                 exclude=exclude, first_turn=base.first_turn, model=model)
        except NoEndpointsError:
            reason = reason or "no_endpoints"
            continue
        decision = base._replace(pool=pool, choice=choice, model=model, hop=i,
                                 reason=reason if i else "")
        if not pool.panic:
            return decision
        if spare is None:
            spare = decision
        reason = reason or "panic"
    if spare is not None:
        return spare
    names = ", ".join(h.pool for h in base.chain[start:])
    raise NoEndpointsError(f"no endpoint available in the pools of model "
                           f"{base.requested!r} ({names})")


def next_hop(router: Router, decision: Decision, reason: str) -> Decision:
    """The request's decision in the next pool of its route's chain that can take it (a
    fallback); raises NoEndpointsError when none is left."""
    return _on_chain(router, decision, decision.hop + 1, reason, None)


def _pinned(pin: Pin | None, pool: Pool, exclude: frozenset[str] | None) -> Choice | None:
    """The affinity choice of the endpoint holding a stored response, if it can take the
    request: routable in the request's pool and not excluded (tried, paused or full)."""
    if pin is None or pin.pool != pool.name or pin.endpoint not in pool.routable:
        return None
    if exclude and pin.endpoint in exclude:
        return None
    return Choice(pin.endpoint, "affinity")


def _pinned_on_chain(router: Router, base: Decision, pin: Pin,
                     exclude: frozenset[str] | None) -> Decision | None:
    """A routed request's affinity decision: the pool of its route's chain that holds the
    stored response it names, if that endpoint can take it (any place in the chain: the
    state is there or nowhere)."""
    for i, hop in enumerate(base.chain):
        if hop.pool == pin.pool:
            pool = router.pools[hop.pool]
            choice = _pinned(pin, pool, exclude)
            if choice is None:
                return None
            return base._replace(pool=pool, choice=choice,
                                 model=pool.model_for(hop, base.requested or ""), hop=i)
    return None


def _passthrough_pool(view: RequestView, router: Router) -> Pool:
    if view.model:
        return router.pool_for_model(view.model)
    if view.pinned is not None and view.pinned.pool in router.pools:
        return router.pools[view.pinned.pool]
    pool = router.default_pool()
    if pool is None:
        raise BadRequestError(
            f"{view.path} names no model and several pools exist; add a 'model' field "
            "or a ?model= query parameter"
        )
    return pool


def redecide(decision: Decision, exclude: frozenset[str]) -> Decision:
    """The same request's next choice, never one of ``exclude`` (tried, paused or full
    endpoints); raises NoEndpointsError when none is left."""
    choice = decision.pool.choose(decision.key_hash, session=decision.session,
                                  keyed=decision.keyed, exclude=exclude,
                                  first_turn=decision.first_turn, model=decision.model)
    return decision._replace(choice=choice)


def explain(decision: Decision, walk_limit: int = 8,
            view: RequestView | None = None) -> dict[str, Any]:
    """A keyed decision for people: key, which part of the request it was built from (given
    the request's ``view``), ring walk with each endpoint's load, bound, endpoint and why."""
    pool, choice = decision.pool, decision.choice
    routing = pool.routing
    key_from = "the session header or the body's user field"
    if not decision.session and view is not None and view.kind is not None:
        key_from = key_source(view.kind, view.body, routing.key, routing.prefix_chars,
                              routing.min_key_chars)
    now = time.monotonic()
    walk = []
    for i, endpoint_id in enumerate(pool.ring_for(decision.model).walk(decision.key_hash)):
        if i >= walk_limit:
            break
        walk.append({"endpoint": endpoint_id, **endpoint_load(pool, endpoint_id, now)})
    strategy = routing.strategy.value
    subset = pool.subsets.get(decision.model) if decision.model is not None else None
    candidates = pool.routable if subset is None else subset.members
    bound = choice.bound if choice.bound is not None else chwbl_bound(
        sum(pool.load.get(i, 0) for i in candidates), len(candidates), routing.load_factor,
        routing.min_bound)
    reason = _REASONS[choice.outcome] if strategy == "chwbl" else f"{strategy} ignores the key"
    route = decision.route
    routed = {} if route is None else {"route": {
        "model": route.model,
        "chain": [h.pool for h in decision.chain],
        "scores": dict(zip([h.pool for h in route.backends],
                           [round(x, 4) for x in route.scores(decision.key_hash)],
                           strict=True)),
        "pool": pool.name,
        "served_model": decision.model,
        "fallback_reason": decision.reason or None,
    }}
    result: dict[str, Any] = {
        **routed,
        "pool": pool.name,
        "strategy": strategy,
        "key_source": decision.key_source,
        "key_from": key_from,
        "key": decision.key,
        "key_hash": f"{decision.key_hash:016x}",
        "signal": choice.signal,
        "bound": bound,
        "ring_walk": walk,
        "endpoint": choice.endpoint,
        "url": pool.endpoints[choice.endpoint].url,
        "outcome": choice.outcome,
        "reason": reason if strategy != "chwbl" else f"{reason} ({_SIGNALS[choice.signal]})",
        "probes": [{"endpoint": p.endpoint,
                    "in_flight" if choice.signal == "in-flight" else "queued": p.load}
                   for p in choice.probes],
    }
    if pool.routing.zone:
        result["zone"] = explain_zone(pool, choice, subset, decision.key_hash)
    return result


def explain_zone(pool: Pool, choice: Choice, subset: Subset | None,
                 key_hash: int) -> dict[str, Any]:
    """The zone preference a keyed decision was taken under: the balancer's zone, the
    endpoints it preferred, the share of the zone's keys that skip it now (and this key's
    fate) and whether the request stayed in the zone."""
    prefer = pool.prefer if subset is None else subset.prefer
    spill = pool.spill if prefer else None
    spilled = spill is not None and spill.spills(key_hash)
    if choice.preferred is True:
        why = "stayed in the zone: the first zone endpoint on the walk within the bound"
    elif choice.preferred is False:
        why = "left the zone: every zone endpoint was at the load bound (or excluded)"
    elif spilled and spill is not None:
        why = (f"spilled: the zone carries {spill.work_share:.0%} of the pool's work, over "
               f"routing.zone_factor times its share of the endpoints, so {spill.share:.0%} "
               "of its keys, this one among them, take the walk over the whole ring")
    elif not pool.routing.prefer_zone:
        why = "no preference (routing.prefer_zone is off)"
    elif not pool.local:
        why = "no preference: no routable endpoint is in the zone"
    else:
        why = "no preference: every endpoint that can serve the request is in the zone"
    out: dict[str, Any] = {
        "zone": pool.routing.zone,
        "prefer_zone": pool.routing.prefer_zone,
        "preferred": sorted(prefer),
        "local": choice.endpoint in pool.local,
        "reason": why,
    }
    if spill is not None:
        out["spill"] = {"share": round(spill.share, 4), "work_share": round(spill.work_share, 4),
                        "allowed_work": round(spill.allowed, 2), "this_key": spilled}
    return out


def endpoint_load(pool: Pool, endpoint_id: str, now: float) -> dict[str, Any]:
    """One endpoint's load as routing sees it: this balancer's in-flight requests, the
    endpoint's last report, its age and the queue estimate built on it."""
    state = pool.states.get(endpoint_id)
    if state is None:
        return {"in_flight": 0}
    queue = state.queue
    report = queue.report_
    age = queue.age(now)
    return {
        "in_flight": state.in_flight,
        "queue_estimate": round(queue.queued, 3),
        "report": None if age is None else {
            "source": queue.source,
            "age_s": round(age, 3),
            "fresh": queue.fresh(now, pool.load_settings.max_age),
            "waiting": report.waiting,
            "running": report.running,
            "kv_usage": report.kv_usage,
        },
    }
