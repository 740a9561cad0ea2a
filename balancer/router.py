"""Routing pools: their endpoints' states, the ring, the strategies and the wait queue.

A :class:`Pool` is a set of endpoints serving the same models. It owns one
:class:`~balancer.state.EndpointState` per endpoint (in-flight count, 429 pause, health,
connections, metric children), the hash ring (whose members are the routable endpoints), the
strategies and the queue of requests waiting for a free endpoint. Endpoint sets arrive as
whole snapshots (level-triggered, as from a watch): the pool diffs them against what it has,
so an unchanged snapshot changes nothing. An endpoint's state is created when it first
appears and retired when it has left and its last request has ended.

Load is counted from selection until the response ends (``Lease.release``), including for
endpoints that left the pool meanwhile, so a draining endpoint's requests are still counted
where they run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from balancer.config import (
    LoadSettings,
    LoadSource,
    PoolSettings,
    RouteSettings,
    RoutingSettings,
    Settings,
    Strategy,
)
from balancer.endpoints import Endpoint
from balancer.errors import ModelNotFoundError, NoEndpointsError
from balancer.health import Failure
from balancer.load import LoadReport
from balancer.metrics import EndpointMetrics, Metrics, PoolState
from balancer.ring import HashRing, RingCache
from balancer.routes import Hop, Route
from balancer.state import EndpointState
from balancer.strategy import BoundedLoad, Choice, Chooser, LeastRequest, Random, RoundRobin
from balancer.zonespill import ZoneSpill


def make_strategy(routing: RoutingSettings, ring: HashRing, rng: random.Random) -> Chooser:
    name = routing.strategy
    if name is Strategy.CHWBL:
        return BoundedLoad(ring, routing.load_factor, routing.min_bound)
    if name is Strategy.LEAST_REQUEST:
        return LeastRequest(rng)
    if name is Strategy.ROUND_ROBIN:
        return RoundRobin()
    return Random(rng)


class Lease:
    """One attempt's hold on an endpoint; ``release`` is idempotent.

    The forwarder notes on it how the attempt went (``failure``, ``client_gone``), which
    passive health hears when the lease ends.
    """

    __slots__ = ("choice", "client_gone", "endpoint", "failure", "generation", "pool",
                 "released", "started", "state")

    def __init__(self, pool: Pool, state: EndpointState, choice: Choice) -> None:
        self.pool = pool
        self.state = state
        self.endpoint = state.endpoint
        """The endpoint as it was when the lease was taken."""
        self.choice = choice
        self.generation = state.queue.sent()
        """The endpoint's report generation when the request went there."""
        self.started = False
        """The response's first byte arrived: the request left the endpoint's queue."""
        self.released = False
        self.failure: Failure | None = None
        """What went wrong with the endpoint in this attempt (None: nothing)."""
        self.client_gone = False
        """The client went away: the attempt says nothing about the endpoint's health."""

    def start(self) -> None:
        """The response began: the request is no longer queued at the endpoint."""
        if not self.started:
            self.started = True
            self.state.queue.started(self.generation)

    def release(self) -> None:
        if not self.released:
            self.released = True
            if not self.started:  # ended before any response byte: it left the queue too
                self.started = True
                self.state.queue.started(self.generation)
            self.pool._release(self.state)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class InFlight(Mapping[str, int]):
    """In-flight requests per endpoint id: a read-only view of the pool's endpoint states
    (present ones, and departed ones whose requests still run), as the strategies read
    it."""

    __slots__ = ("_states",)

    def __init__(self, states: dict[str, EndpointState]) -> None:
        self._states = states

    def __getitem__(self, endpoint_id: str) -> int:
        return self._states[endpoint_id].in_flight

    def get(self, endpoint_id: str, default: Any = None) -> Any:
        state = self._states.get(endpoint_id)
        return default if state is None else state.in_flight

    def __contains__(self, endpoint_id: object) -> bool:
        return endpoint_id in self._states

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def __repr__(self) -> str:
        return f"InFlight({dict(self)!r})"


def queue_strategies(ring: HashRing, routing: RoutingSettings,
                     load: LoadSettings) -> tuple[Chooser | None, Chooser | None]:
    """CHWBL on queues for a pool's ring, and its first-turn variant (see :class:`Pool`)."""
    if routing.strategy is not Strategy.CHWBL or load.source is LoadSource.LOCAL:
        return None, None
    queue = BoundedLoad(ring, load.queue_factor, load.min_queue, signal="queue")
    if load.first_turn_factor == load.queue_factor:
        return queue, None
    return queue, BoundedLoad(ring, load.first_turn_factor, load.min_queue, signal="queue")


def zone_spill(routing: RoutingSettings, load: LoadSettings) -> ZoneSpill | None:
    """The pool's zone spill, if it prefers its zone and ``routing.zone_factor`` is set; its
    floor is the bound's: ``load.min_queue`` on queues, ``routing.min_bound`` on in-flight
    counts."""
    if not (routing.prefer_zone and routing.zone_factor):
        return None
    floor = routing.min_bound if load.source is LoadSource.LOCAL else load.min_queue
    return ZoneSpill(routing.zone_factor, floor)


class Subset:
    """The routable endpoints of a pool that serve one model, when not all of them do (a
    LoRA adapter loaded on some pods), with the strategies that route over just them.

    The ring comes from the pool's :class:`~balancer.ring.RingCache`, shared by every model
    with the same members; the strategies are cheap wrappers around it.
    """

    __slots__ = ("first_turn_strategy", "members", "prefer", "queue_strategy", "ring",
                 "strategy")

    def __init__(self, members: tuple[str, ...], ring: HashRing, strategy: Chooser,
                 queue_strategy: Chooser | None, first_turn_strategy: Chooser | None,
                 prefer: frozenset[str] = frozenset()) -> None:
        self.members = members
        """The endpoints serving the model, sorted (the strategies' candidates)."""
        self.ring = ring
        self.strategy = strategy
        self.queue_strategy = queue_strategy
        self.first_turn_strategy = first_turn_strategy
        self.prefer = prefer
        """The members in the balancer's zone, preferred by keyed requests (empty: no
        preference, see :meth:`Pool._prefer_among`)."""


class Pool:
    terminating: tuple[str, ...] = ()
    """Endpoints still serving while their pods terminate: routable only when the pool has
    no serving endpoint (the last resort kube-proxy uses too)."""
    on_up: Callable[[], None] | None = None
    """Called when the pool goes from no routable endpoint to some (wakes the requests
    waiting for an empty pool)."""
    subsets: Mapping[str, Subset] = MappingProxyType({})
    """Models that only some routable endpoints serve, each with those endpoints (pools that
    learn their models only; empty while every endpoint serves every model, so the request
    path pays one truth test). Models served by every routable endpoint are not here: they
    take the pool's own ring. Replaced whole by :meth:`_update_subsets`."""
    _rings: RingCache | None = None
    """The subsets' rings, by member set (made when a pool first has a subset)."""
    slow_start = 0.0
    """``health.slow_start``: seconds an endpoint that joins or returns ramps over."""
    ramping: Mapping[str, float] = MappingProxyType({})
    """Endpoints in slow start, with the monotonic time each joined (empty almost always,
    so the request path pays one truth test). Replaced whole, never changed in place."""
    local: frozenset[str] = frozenset()
    """Routable endpoints in ``routing.zone`` (the balancer's zone), recomputed when the
    routable set or the endpoints change, never per request; empty without a zone."""
    prefer: frozenset[str] = frozenset()
    """What keyed CHWBL requests prefer: :attr:`local` with ``routing.prefer_zone``, unless
    it is empty or the whole routable set (either way a preference would change nothing, and
    an empty one costs the request path nothing)."""

    def __init__(
        self,
        settings: PoolSettings,
        routing: RoutingSettings,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        load: LoadSettings | None = None,
    ) -> None:
        self.name = settings.name
        self.learns_models = not settings.models
        """True when the pool lists no models and learns them from its endpoints."""
        self.models: tuple[str, ...] = settings.models
        """The models this pool serves: as configured, or as last learned."""
        self.routing = routing
        self.ring = HashRing(virtual_nodes=routing.virtual_nodes)
        rng = rng or random.Random()
        self.strategy = make_strategy(routing, self.ring, rng)
        self.passthrough: Chooser = LeastRequest(rng)
        load = load or LoadSettings()
        self.load_settings = load
        self.queue_strategy: Chooser | None
        """CHWBL on the pods' queues (None: the pool routes on in-flight counts only)."""
        self.first_turn_strategy: Chooser | None
        """The same for conversations' first turns, with ``load.first_turn_factor``; None
        when that equals ``queue_factor``, so requests are not told apart for nothing."""
        self.queue_strategy, self.first_turn_strategy = queue_strategies(self.ring, routing,
                                                                         load)
        self.spill = zone_spill(routing, load)
        """How many of the zone's keys skip the preference (``routing.zone_factor``); None
        without a preference or with the factor 0."""
        self.keyed_at = time.monotonic()
        """When a keyed request last asked for queues (the poller rests an idle pool)."""
        self._metrics = metrics
        self.states: dict[str, EndpointState] = {}
        """Every present endpoint's state, and those of departed endpoints whose requests
        still run."""
        self.endpoints: dict[str, Endpoint] = {}
        """Every present endpoint, routable or draining."""
        self.load = InFlight(self.states)
        """In-flight requests per endpoint id (present ones, and departed busy ones)."""
        self.routable: tuple[str, ...] = ()
        """Endpoints on the ring: serving ones minus those health took out (all serving
        ones in panic mode); with none serving, the ``terminating`` ones."""
        self._routable_set: frozenset[str] = frozenset()
        self.serving: tuple[str, ...] = ()
        """Endpoints discovery says serve (not terminating)."""
        self.out: frozenset[str] = frozenset()
        """Serving endpoints health took out (ejected or failing checks)."""
        self.panic_threshold = 0.5
        """More than this fraction of serving endpoints out: route to all (panic mode)."""
        self.panic = False
        self.pauses = 0
        """Endpoints with a 429 pause set; 0 almost always, so the request path pays one
        truth test."""
        self.total_load = 0
        """Sum of in-flight requests over routable endpoints: the CHWBL average's
        numerator."""
        self.waiters: deque[asyncio.Future[None]] = deque()
        """Requests waiting for an endpoint under its in-flight limit, oldest first."""

    # -- endpoints ---------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> bool:
        """Replace the endpoint set; returns whether it changed (endpoints added, removed,
        or changed in URL, zone or serving). New endpoints get a state; departed idle ones
        are retired at once, departed busy ones when their last request ends."""
        new = {e.id: e for e in endpoints}
        serving = tuple(sorted(e.id for e in new.values() if e.serving))
        terminating = tuple(sorted(e.id for e in new.values() if e.terminating and not e.serving))
        changed = serving != self.serving or new != self.endpoints
        states = self.states
        for endpoint_id, endpoint in new.items():
            state = states.get(endpoint_id)
            if state is None:
                states[endpoint_id] = EndpointState(endpoint, self._endpoint_metrics(endpoint_id))
            else:
                state.present = True
                if state.endpoint != endpoint:
                    state.update(endpoint)
        for state in [s for i, s in states.items() if i not in new and s.present]:
            state.present = False
            state.forget_health()
            if not state.in_flight:
                self._retire(state)
        self.endpoints = new
        self.serving = serving
        self.terminating = terminating
        self._update_routable()
        if self.routing.zone and changed:
            self._update_local()  # an endpoint's zone may change while the ring does not
        return changed

    def _endpoint_metrics(self, endpoint_id: str) -> EndpointMetrics:
        return EndpointMetrics(self._metrics, self.name, endpoint_id)

    def _retire(self, state: EndpointState) -> None:
        del self.states[state.id]
        if state.paused_until:
            self.pauses -= 1
        state.retire()

    def set_out(self, out: frozenset[str]) -> bool:
        """Set the endpoints health took out; returns whether panic mode changed."""
        self.out = out
        was = self.panic
        self._update_routable()
        return self.panic != was

    def update_out(self) -> bool:
        """Take the serving endpoints whose health says out off the ring; returns whether
        panic mode changed."""
        states = self.states
        return self.set_out(frozenset(i for i in self.serving if states[i].health.is_out))

    def _update_routable(self) -> None:
        healthy = tuple(e for e in self.serving if e not in self.out)
        out = len(self.serving) - len(healthy)
        self.panic = bool(out) and out > self.panic_threshold * len(self.serving)
        routable = (self.serving if self.panic else healthy) or self.terminating
        if routable != self.routable:
            up = bool(routable) and not self.routable
            if self.slow_start > 0 and not up:
                self._ramp_joiners(routable)
            self.routable = routable
            self._routable_set = frozenset(routable)
            self.ring.update(routable)
            states = self.states
            self.total_load = sum(states[i].in_flight for i in routable)
            if self.routing.zone:
                self._update_local()
            self._update_subsets()
            if up and self.on_up is not None:
                self.on_up()

    def _ramp_joiners(self, routable: tuple[str, ...]) -> None:
        """Start slow start for endpoints new on the ring (joined, or back from out), unless
        in panic mode (every endpoint is needed at once); forget those that left it."""
        before = self._routable_set
        joined = [e for e in routable if e not in before] if not self.panic else []
        kept = {e: t for e, t in self.ramping.items() if e in routable}
        if joined:
            now = time.monotonic()
            kept.update(dict.fromkeys(joined, now))
        self.ramping = kept

    def ramp(self, now: float) -> dict[str, float] | None:
        """The share of the bound each endpoint in slow start may take at ``now`` (0..1);
        None when none ramps. Endpoints whose ramp is over are forgotten."""
        ramping = self.ramping
        if not ramping:
            return None
        period = self.slow_start
        shares = {e: (now - t) / period for e, t in ramping.items() if now - t < period}
        if len(shares) != len(ramping):
            self.ramping = {e: ramping[e] for e in shares}
        return shares or None

    def _update_local(self) -> None:
        """Recompute :attr:`local` and :attr:`prefer`, and the subsets' preferences."""
        zone, endpoints = self.routing.zone, self.endpoints
        self.local = frozenset(i for i in self.routable
                               if (e := endpoints.get(i)) is not None and e.zone == zone)
        self.prefer = self._prefer_among(self.routable)
        for subset in self.subsets.values():
            subset.prefer = self._prefer_among(subset.members)

    def _prefer_among(self, members: tuple[str, ...]) -> frozenset[str]:
        """The local endpoints among ``members`` (the pool's routable ones, or a subset's)
        that its keyed requests prefer (empty: none of them is local, or all are)."""
        if not self.routing.prefer_zone or not self.local:
            return frozenset()
        prefer = self.local.intersection(members)
        return prefer if len(prefer) < len(members) else frozenset()

    def count_locality(self, endpoint_id: str) -> None:
        """Count a keyed request sent to ``endpoint_id`` as local or remote to the zone."""
        metrics = self._metrics
        if metrics is not None:
            metrics.zone_request(self.name, "local" if endpoint_id in self.local else "remote")

    # -- choosing and leasing ----------------------------------------------------------------

    def choose(self, key_hash: int, *, session: bool = False, keyed: bool = True,
               exclude: frozenset[str] | None = None, first_turn: bool = False,
               model: str | None = None) -> Choice:
        """Pick an endpoint, never one in ``exclude`` (the endpoints a retry already tried);
        raises NoEndpointsError when the pool has none routable (or none left).
        ``first_turn``: a conversation's first request (cheap to move; see
        ``LoadSettings.first_turn_factor``). ``model``: the model asked for; one that only
        some endpoints serve is routed over those (:meth:`_choose_among`)."""
        if self.subsets and model is not None:
            subset = self.subsets.get(model)
            if subset is not None:
                return self._choose_among(subset, model, key_hash, session=session,
                                          keyed=keyed, exclude=exclude, first_turn=first_turn)
        strategy, queues = self._strategy(self, keyed, first_turn)
        if queues is None:
            load: Mapping[str, float] = self.load
            total: float = self.total_load
        else:
            load, total = queues, sum(queues.values())
        ramp = self.ramp(time.monotonic()) if self.ramping else None
        prefer = self.prefer if keyed else None
        if prefer and self.spills(key_hash, queues):
            prefer = None
        if exclude or ramp or prefer:
            choice = strategy.choose(key_hash, self.routable, load, total,
                                     session=session, exclude=exclude or (), ramp=ramp,
                                     prefer=prefer or ())
        else:
            choice = strategy.choose(key_hash, self.routable, load, total, session=session)
        if choice is None:
            raise NoEndpointsError(f"no endpoint available in pool {self.name!r}")
        return choice

    def _strategy(self, owner: Pool | Subset, keyed: bool,
                  first_turn: bool) -> tuple[Chooser, dict[str, float] | None]:
        """The strategy that chooses for a request among ``owner``'s endpoints (the pool's,
        or a model's subset), and the queues it bounds (None: in-flight counts)."""
        if not keyed:
            return self.passthrough, None
        if owner.queue_strategy is not None:
            now = time.monotonic()
            self.keyed_at = now
            queues = self.queues(now)
            if queues is not None:
                if first_turn and owner.first_turn_strategy is not None:
                    return owner.first_turn_strategy, queues
                return owner.queue_strategy, queues
        return owner.strategy, None

    def _choose_among(self, subset: Subset, model: str, key_hash: int, *, session: bool,
                      keyed: bool, exclude: frozenset[str] | None,
                      first_turn: bool) -> Choice:
        """:meth:`choose` over the endpoints serving ``model``: the same strategies and load
        view (in-flight counts or queues), with the bound's average taken over the subset
        (its total load over its size), since only those endpoints can take the request."""
        members = subset.members
        strategy, queues = self._strategy(subset, keyed, first_turn)
        load: Mapping[str, float] = self.load if queues is None else queues
        total = sum(load.get(i, 0) for i in members)
        ramp = self.ramp(time.monotonic()) if self.ramping else None
        prefer = subset.prefer if keyed else frozenset()
        if prefer and self.spills(key_hash, queues):
            prefer = frozenset()
        choice = strategy.choose(key_hash, members, load, total, session=session,
                                 exclude=exclude or (), ramp=ramp, prefer=prefer)
        if choice is None:
            raise NoEndpointsError(
                f"no endpoint available in pool {self.name!r} serves model {model!r}")
        return choice

    def spills(self, key_hash: int, queues: Mapping[str, float] | None) -> bool:
        """Whether this key skips the zone preference (``routing.zone_factor``; see
        :mod:`balancer.zonespill`), updating the zone's spill share when it is due: the
        zone's work (running plus queued requests per endpoint on queues, this replica's
        in-flight requests otherwise) against the pool's."""
        spill = self.spill
        if spill is None:
            return False
        now = time.monotonic()
        if spill.due(now):
            work = self.work(queues)
            spill.update(now, sum(work.get(i, 0) for i in self.local),
                         sum(work.get(i, 0) for i in self.routable), len(self.local),
                         len(self.routable))
        return spill.spills(key_hash)

    def work(self, queues: Mapping[str, float] | None) -> Mapping[str, float]:
        """Each endpoint's work as the zone spill weighs it: on queues, the requests it last
        reported running plus its queue estimate; else this replica's in-flight requests."""
        if queues is None:
            return self.load
        states = self.states
        return {i: queued + states[i].queue.running for i, queued in queues.items()}

    def model_for(self, hop: Hop, requested: str) -> str:
        """The model name to ask this pool for on a route's ``hop``: the hop's own, else the
        pool's only model, else the name the client asked for."""
        if hop.model:
            return hop.model
        return self.models[0] if len(self.models) == 1 else requested

    def ring_for(self, model: str | None) -> HashRing:
        """The ring a key for ``model`` walks: the subset's, or the pool's."""
        subset = self.subsets.get(model) if model is not None else None
        return self.ring if subset is None else subset.ring

    # -- each endpoint's models --------------------------------------------------------------

    def set_endpoint_models(self, endpoint_id: str, models: frozenset[str]) -> bool:
        """Set the models an endpoint reported (its ``/v1/models``); returns whether they
        changed."""
        return self.set_endpoints_models({endpoint_id: models})

    def set_endpoints_models(self, reported: Mapping[str, frozenset[str]]) -> bool:
        """Set the models several endpoints reported, with the subsets recomputed once (a
        refresh of the whole pool builds no ring for the sets in between); returns whether
        any changed."""
        changed = False
        for endpoint_id, models in reported.items():
            state = self.states.get(endpoint_id)
            if state is not None and state.models != models:
                state.models = models
                changed = True
        if changed:
            self._update_subsets()
        return changed

    def add_endpoint_models(self, endpoint_id: str, models: frozenset[str]) -> bool:
        """Add models an endpoint is seen serving (adapters in its metrics); returns whether
        that changed its set. An endpoint not heard from on ``/v1/models`` yet is left
        alone: its base models are not known, and it serves every model until they are."""
        state = self.states.get(endpoint_id)
        if state is None or state.models is None or models <= state.models:
            return False
        state.models = state.models | models
        self._update_subsets()
        return True

    def drop_endpoint_model(self, endpoint_id: str, model: str) -> bool:
        """The endpoint said it does not serve ``model`` (a 404 naming it): route the model
        elsewhere until its ``/v1/models`` says otherwise. Returns whether that changed."""
        state = self.states.get(endpoint_id)
        if state is None or state.models is None or model not in state.models:
            return False
        state.models = state.models - {model}
        self._update_subsets()
        return True

    def _update_subsets(self) -> None:
        """Recompute :attr:`subsets` from the routable endpoints' models.

        An endpoint not heard from yet (``models`` None) counts as serving every model, as
        it did before it was asked: a 404 from it is retried elsewhere. A model of the pool
        that no routable endpoint serves gets an empty subset (503, not a pod's 404).
        """
        if not self.learns_models:
            return
        states = self.states
        routable = self.routable
        unknown: list[str] = []
        serving: dict[str, list[str]] = {}
        for endpoint_id in routable:
            models = states[endpoint_id].models
            if models is None:
                unknown.append(endpoint_id)
                continue
            for model in models:
                serving.setdefault(model, []).append(endpoint_id)
        for model in self.models:
            serving.setdefault(model, [])
        count = len(routable)
        subsets: dict[str, Subset] = {}
        made: dict[frozenset[str], Subset] = {}
        for model, ids in serving.items():
            if len(ids) + len(unknown) == count and count:
                continue  # every routable endpoint serves it: the pool's own ring
            members = frozenset(ids).union(unknown)
            subset = made.get(members)
            if subset is None:
                subset = made[members] = self._subset(members)
            subsets[model] = subset
        if self._rings is not None:
            self._rings.keep(made)
        self.subsets = subsets

    def _subset(self, members: frozenset[str]) -> Subset:
        if self._rings is None:
            self._rings = RingCache(self.routing.virtual_nodes)
        ring = self._rings.ring(members)
        routing, load = self.routing, self.load_settings
        ordered = tuple(sorted(members))
        if routing.strategy is not Strategy.CHWBL:
            return Subset(ordered, ring, self.strategy, None, None)
        strategy = BoundedLoad(ring, routing.load_factor, routing.min_bound)
        return Subset(ordered, ring, strategy, *queue_strategies(ring, routing, load),
                      self._prefer_among(ordered))

    def queues(self, now: float | None = None) -> dict[str, float] | None:
        """Each routable endpoint's estimated queue, when routing on queues; None: route on
        in-flight counts (``load.source: auto`` and some endpoint has no fresh report)."""
        now = time.monotonic() if now is None else now
        settings = self.load_settings
        max_age = settings.max_age
        auto = settings.source is LoadSource.AUTO
        states = self.states
        queues = {}
        for endpoint_id in self.routable:
            queue = states[endpoint_id].queue
            if queue.fresh(now, max_age):
                queues[endpoint_id] = queue.queued
            elif auto:
                return None
            else:
                queues[endpoint_id] = float(queue.mine)
        return queues

    def acquire(self, choice: Choice) -> Lease:
        state = self.states[choice.endpoint]
        state.in_flight += 1
        if choice.endpoint in self._routable_set:
            self.total_load += 1
        return Lease(self, state, choice)

    def _release(self, state: EndpointState) -> None:
        state.in_flight -= 1
        if state.endpoint.id in self._routable_set:
            self.total_load -= 1
        if not state.in_flight and not state.present:
            self._retire(state)

    def assume_load(self, loads: Mapping[str, int]) -> None:
        """Pretend these endpoints have requests in flight (offline explanations only)."""
        for endpoint_id, count in loads.items():
            state = self.states.get(endpoint_id)
            if state is not None:
                state.in_flight = count
        states = self.states
        self.total_load = sum(states[i].in_flight for i in self.routable)

    def assume_report(self, endpoint_id: str, report: LoadReport) -> None:
        """Pretend this endpoint just reported ``report`` (offline explanations only)."""
        state = self.states.get(endpoint_id)
        if state is not None:
            state.queue.report(report, time.monotonic(), "assumed")

    def signal(self) -> str:
        """The load keyed requests are routed on now: "queue" or "in-flight"."""
        if self.queue_strategy is not None and self.queues() is not None:
            return "queue"
        return "in-flight"

    # -- 429 pauses --------------------------------------------------------------------------

    def pause(self, endpoint_id: str, until: float) -> None:
        """Skip the endpoint until ``until`` (loop clock): it answered 429."""
        state = self.states.get(endpoint_id)
        if state is None:
            return
        if not state.paused_until:
            self.pauses += 1
        state.paused_until = until

    def paused(self, now: float) -> frozenset[str]:
        """Endpoints paused at ``now``; pauses that ended are cleared."""
        if not self.pauses:
            return frozenset()
        paused = []
        for endpoint_id, state in self.states.items():
            until = state.paused_until
            if until > now:
                paused.append(endpoint_id)
            elif until:
                state.paused_until = 0.0
                self.pauses -= 1
        return frozenset(paused)

    def pause_left(self, now: float) -> float | None:
        """Seconds until the first pause ends (None: no endpoint is paused)."""
        return min((s.paused_until - now for s in self.states.values()
                    if s.paused_until > now), default=None)

    # -- the wait queue ----------------------------------------------------------------------

    def wake(self) -> None:
        """A slot came free: let the longest waiting request try again."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def make_route(settings: RouteSettings) -> Route:
    return Route(settings.model,
                 [Hop(b.pool, b.model, b.weight) for b in settings.backends],
                 [Hop(b.pool, b.model) for b in settings.fallbacks],
                 settings.expose_backend_model)


class Router:
    """Routing pools by name and by model, and the routes in front of them."""

    def __init__(self, settings: Settings, rng: random.Random | None = None,
                 metrics: Metrics | None = None) -> None:
        self.routing = settings.routing
        self.rng = rng or random.Random()
        """Splits a route's requests that have no key (pass-through) by weight."""
        self.pools: dict[str, Pool] = {
            p.name: Pool(p, settings.routing, rng, metrics, settings.load)
            for p in settings.pools
        }
        for pool in self.pools.values():
            pool.panic_threshold = settings.health.panic_threshold
            pool.slow_start = settings.health.slow_start
            pool.on_up = self.notify
        self.routes: dict[str, Route] = {r.model: make_route(r) for r in settings.routes}
        """Routes by the model name clients ask for (checked before the pools' models)."""
        self.first_turns = any(p.first_turn_strategy is not None for p in self.pools.values())
        """Whether a pool routes conversations' first turns apart (bodies must say)."""
        self._change = asyncio.Event()
        self._by_model: dict[str, Pool] = {}
        self.models: tuple[str, ...] = ()
        self._index_models()
        self.on_models_stale: Callable[[Pool, str], None] | None = None
        """Called with a pool and an endpoint id whose models look out of date (the model
        learner refreshes them)."""

    def _index_models(self) -> None:
        """Map each model to its pool. Configured models come first; a learned model that
        another pool lists, or that an earlier pool learned too, stays with that pool, so
        the mapping never depends on the order models were learned in."""
        by_model: dict[str, Pool] = {}
        pools = sorted(self.pools.values(), key=lambda p: p.learns_models)
        for pool in pools:
            for model in pool.models:
                by_model.setdefault(model, pool)
        self._by_model = by_model
        self.models = (*self.routes, *(m for m in by_model if m not in self.routes))

    def set_models(self, name: str, models: Iterable[str]) -> bool:
        """Set the learned models of a pool; returns whether they changed."""
        pool = self.pools[name]
        learned = tuple(sorted(set(models)))
        if not pool.learns_models or learned == pool.models:
            return False
        pool.models = learned
        pool._update_subsets()
        self._index_models()
        self.notify()
        return True

    def model_missing(self, pool: Pool, endpoint_id: str, model: str) -> None:
        """An endpoint answered 404 for a model it was thought to serve (an adapter unloaded
        since it was asked): route the model elsewhere now, and have the endpoint's models
        asked again (``on_models_stale``, which rate-limits)."""
        pool.drop_endpoint_model(endpoint_id, model)
        if self.on_models_stale is not None:
            self.on_models_stale(pool, endpoint_id)

    def pool_for_model(self, model: str) -> Pool:
        pool = self._by_model.get(model)
        if pool is None:
            known = ", ".join(self.models)
            raise ModelNotFoundError(
                f"The model '{model}' does not exist. Known models: {known}", param="model"
            )
        return pool

    def default_pool(self) -> Pool | None:
        """The pool for requests that name no model, when there is only one."""
        if len(self.pools) == 1:
            return next(iter(self.pools.values()))
        return None

    def apply(self, snapshot: Mapping[str, Iterable[Endpoint]]) -> list[str]:
        """Apply a whole snapshot (pool name → endpoints); returns the pools that changed."""
        changed = []
        for name, endpoints in snapshot.items():
            pool = self.pools.get(name)
            if pool is not None and pool.set_endpoints(endpoints):
                changed.append(name)
        return changed

    def unready_pools(self) -> dict[str, str]:
        """Pools that cannot serve yet, each with the reason."""
        out = {}
        for name, pool in self.pools.items():
            if not pool.routable:
                out[name] = "no routable endpoints"
            elif not pool.models:
                out[name] = "models not learned yet"
        return out

    def ready(self) -> bool:
        return not self.unready_pools()

    def learning(self) -> bool:
        """Whether a pool has not learned its models yet: a model no pool lists may be one
        of its, so a request for it waits rather than get 404."""
        return any(p.learns_models and not p.models for p in self.pools.values())

    async def changed(self) -> None:
        """Return at the next change that may let a waiting request through: a pool's first
        routable endpoint, or newly learned models."""
        await self._change.wait()

    def notify(self) -> None:
        """Wake every request waiting in :meth:`changed` (each checks again)."""
        self._change.set()
        self._change = asyncio.Event()

    def in_flight_rows(self) -> Iterator[PoolState]:
        """Every endpoint state's load, for /metrics."""
        now = time.monotonic()
        for name, pool in self.pools.items():
            for endpoint_id, state in pool.states.items():
                queue = state.queue
                yield PoolState(name, endpoint_id, state.in_flight,
                                endpoint_id in pool._routable_set, queue.queued,
                                queue.kv_usage, queue.age(now))

    def close_connections(self) -> None:
        """Close every endpoint's connections (at shutdown)."""
        for pool in self.pools.values():
            for state in pool.states.values():
                if state.connections is not None:
                    state.connections.close()
                    state.connections = None
