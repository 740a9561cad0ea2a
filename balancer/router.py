"""Pools, their endpoints and in-flight counts; the single place routing state lives.

A :class:`Pool` is a set of endpoints serving the same models. It owns the hash ring (whose
members are the routable endpoints), the in-flight count of every endpoint, and the
strategies. Endpoint sets arrive as whole snapshots (level-triggered, as from a watch): the
pool diffs them against what it has, so an unchanged snapshot changes nothing.

Load is counted from selection until the response ends (``Lease.release``), including for
endpoints that left the pool meanwhile, so a draining endpoint's requests are still counted
where they run.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from balancer.config import PoolSettings, RoutingSettings, Settings
from balancer.config import Strategy as StrategyName
from balancer.endpoints import Endpoint
from balancer.errors import ModelNotFoundError, NoEndpointsError
from balancer.ring import HashRing
from balancer.strategy import (
    BoundedLoad,
    Choice,
    LeastRequest,
    Random,
    RoundRobin,
    Strategy,
)


def make_strategy(routing: RoutingSettings, ring: HashRing, rng: random.Random) -> Strategy:
    name = routing.strategy
    if name is StrategyName.CHWBL:
        return BoundedLoad(ring, routing.load_factor, routing.min_bound)
    if name is StrategyName.LEAST_REQUEST:
        return LeastRequest(rng)
    if name is StrategyName.ROUND_ROBIN:
        return RoundRobin()
    return Random(rng)


@dataclass(eq=False, slots=True)
class Lease:
    """One request's hold on an endpoint; ``release`` is idempotent."""

    pool: Pool
    endpoint: Endpoint
    choice: Choice
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.endpoint.id)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Pool:
    def __init__(
        self,
        settings: PoolSettings,
        routing: RoutingSettings,
        rng: random.Random | None = None,
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
        self.passthrough: Strategy = LeastRequest(rng)
        self.endpoints: dict[str, Endpoint] = {}
        """Every known endpoint, routable or draining."""
        self.load: dict[str, int] = {}
        """In-flight requests per endpoint id (only ids with requests, or known ones)."""
        self.routable: tuple[str, ...] = ()
        """Endpoints on the ring: serving ones minus those health took out (all serving
        ones in panic mode)."""
        self._routable_set: frozenset[str] = frozenset()
        self.serving: tuple[str, ...] = ()
        """Endpoints discovery says serve (not terminating)."""
        self.out: frozenset[str] = frozenset()
        """Endpoints health took out (ejected or failing checks)."""
        self.panic_threshold = 0.5
        """More than this fraction of serving endpoints out: route to all (panic mode)."""
        self.panic = False
        self.limited: dict[str, float] = {}
        """Endpoints that answered 429, with the time (loop clock) until which they are
        skipped; empty almost always, so the request path pays one truth test."""
        self.total_load = 0
        """Sum of ``load`` over routable endpoints: the CHWBL average's numerator."""

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> bool:
        """Replace the endpoint set; returns whether it changed (endpoints added, removed,
        or changed in URL, zone or serving)."""
        new = {e.id: e for e in endpoints}
        serving = tuple(sorted(e.id for e in new.values() if e.serving))
        changed = serving != self.serving or new != self.endpoints
        self.endpoints = new
        self.serving = serving
        self._update_routable()
        for endpoint_id in new:
            self.load.setdefault(endpoint_id, 0)
        for endpoint_id in [i for i, n in self.load.items() if n == 0 and i not in new]:
            del self.load[endpoint_id]
        return changed

    def set_out(self, out: frozenset[str]) -> bool:
        """Set the endpoints health took out; returns whether panic mode changed."""
        self.out = out
        was = self.panic
        self._update_routable()
        return self.panic != was

    def _update_routable(self) -> None:
        healthy = tuple(e for e in self.serving if e not in self.out)
        out = len(self.serving) - len(healthy)
        self.panic = bool(out) and out > self.panic_threshold * len(self.serving)
        routable = self.serving if self.panic else healthy
        if routable != self.routable:
            self.routable = routable
            self._routable_set = frozenset(routable)
            self.ring.update(routable)
            self.total_load = sum(self.load.get(i, 0) for i in routable)

    def choose(self, key_hash: int, *, session: bool = False, keyed: bool = True,
               exclude: frozenset[str] | None = None) -> Choice:
        """Pick an endpoint, never one in ``exclude`` (the endpoints a retry already tried);
        raises NoEndpointsError when the pool has none routable (or none left)."""
        strategy = self.strategy if keyed else self.passthrough
        if exclude:
            choice = strategy.choose(key_hash, self.routable, self.load, self.total_load,
                                     session=session, exclude=exclude)
        else:
            choice = strategy.choose(
                key_hash, self.routable, self.load, self.total_load, session=session
            )
        if choice is None:
            raise NoEndpointsError(f"no endpoint available in pool {self.name!r}")
        return choice

    def acquire(self, choice: Choice) -> Lease:
        endpoint_id = choice.endpoint
        self.load[endpoint_id] = self.load.get(endpoint_id, 0) + 1
        if endpoint_id in self._routable_set:
            self.total_load += 1
        return Lease(self, self.endpoints[endpoint_id], choice)

    def _release(self, endpoint_id: str) -> None:
        remaining = self.load.get(endpoint_id, 0) - 1
        if endpoint_id in self._routable_set:
            self.total_load -= 1
        if remaining <= 0 and endpoint_id not in self.endpoints:
            self.load.pop(endpoint_id, None)
        else:
            self.load[endpoint_id] = max(remaining, 0)


class Router:
    """Pools by name and by model."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.pools: dict[str, Pool] = {
            p.name: Pool(p, settings.routing, rng) for p in settings.pools
        }
        for pool in self.pools.values():
            pool.panic_threshold = settings.health.panic_threshold
        self._by_model: dict[str, Pool] = {}
        self.models: tuple[str, ...] = ()
        self._index_models()

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
        self.models = tuple(by_model)

    def set_models(self, name: str, models: Iterable[str]) -> bool:
        """Set the learned models of a pool; returns whether they changed."""
        pool = self.pools[name]
        learned = tuple(sorted(set(models)))
        if not pool.learns_models or learned == pool.models:
            return False
        pool.models = learned
        self._index_models()
        return True

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
