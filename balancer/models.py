"""Learning which models a pool serves from its endpoints' ``/v1/models``.

A pool that lists no models asks each routable endpoint (vLLM answers with its served model
names and its loaded LoRA adapters) and serves the union. New endpoints are asked as soon as
they appear, all of them every ``refresh_interval``, since adapters are loaded and unloaded
at run time.

Failures never make a model disappear: an endpoint that does not answer keeps the models it
last reported, and a pool whose endpoints are all gone keeps its models, so a pool scaled to
zero answers 503 (no endpoints) rather than 404 (no such model). Each endpoint's last report
lives in its state (``EndpointState.models``) and goes when the endpoint does.

The pool routes a model that only some endpoints serve (an adapter) over those endpoints
(``Pool.subsets``). Two things correct an endpoint's set between refreshes: adapters the
load poller sees in its metrics (:meth:`ModelLearner.adapters_seen`), and a 404 saying it
does not serve a model it listed, after which it is asked again
(:meth:`ModelLearner.stale`), at most once per :data:`STALE_REFRESH_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from balancer.config import ModelDiscoverySettings
from balancer.endpoints import Endpoint
from balancer.metrics import Metrics
from balancer.outbound import Outbound
from balancer.router import Pool, Router

log = logging.getLogger(__name__)

STALE_REFRESH_INTERVAL: Final = 2.0
"""Least seconds between two out-of-turn refreshes of one endpoint's models (after 404s
naming a model it listed): a burst of such 404s asks it once, and an endpoint that keeps
listing an adapter it cannot serve is not asked on every request."""

MAX_CONCURRENT_REQUESTS: Final = 16
"""``/v1/models`` requests in flight at once, so a pool of hundreds of endpoints is asked in
waves rather than all at once."""


def model_names(body: object) -> set[str] | None:
    """The model ids of an OpenAI ``/v1/models`` answer, or None if it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    names = set()
    for item in body["data"]:
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]:
            names.add(item["id"])
    return names


class ModelLearner:
    """Keeps the models of the router's learning pools current."""

    def __init__(self, router: Router, settings: ModelDiscoverySettings,
                 metrics: Metrics | None = None,
                 outbound: Mapping[str, Outbound] | None = None) -> None:
        self._router = router
        self._outbound = outbound or {}
        """Pools' TLS and injected headers, used on ``/v1/models`` as on requests."""
        self._settings = settings
        self._metrics = metrics
        self._pools = [p for p in router.pools.values() if p.learns_models]
        self._wake = asyncio.Event()
        self._stale: set[tuple[str, str]] = set()
        """(pool, endpoint id) to ask again at the next wake, out of turn."""
        self._stale_at: dict[tuple[str, str], float] = {}
        """When each endpoint was last asked out of turn (loop clock)."""

    def stale(self, pool: Pool, endpoint_id: str) -> None:
        """Ask an endpoint for its models again soon: it answered 404 for a model it
        listed. Rate-limited per endpoint (:data:`STALE_REFRESH_INTERVAL`)."""
        if not pool.learns_models:
            return
        key = (pool.name, endpoint_id)
        now = asyncio.get_running_loop().time()
        if now - self._stale_at.get(key, -math.inf) < STALE_REFRESH_INTERVAL:
            return
        self._stale_at[key] = now
        self._stale.add(key)
        self._wake.set()

    def adapters_seen(self, pool: Pool, endpoint_id: str, adapters: frozenset[str]) -> None:
        """Adapters an endpoint's metrics show loaded: add them to its models (and the
        pool's) without waiting for the next refresh."""
        if pool.learns_models and pool.add_endpoint_models(endpoint_id, adapters):
            self._update(pool)

    def endpoints_changed(self) -> None:
        """Ask the endpoints that have not answered yet, and forget the models of those that
        left, now rather than at the next refresh."""
        self._wake.set()

    async def run(self) -> None:
        """Refresh until cancelled (returns at once when no pool learns its models)."""
        if not self._pools:
            return
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            next_full = loop.time()
            while True:
                full = loop.time() >= next_full
                if full:
                    next_full = loop.time() + self._settings.refresh_interval
                await self.refresh(session, only_new=not full)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(next_full):
                        await self._wake.wait()
                self._wake.clear()

    async def refresh(self, session: aiohttp.ClientSession, *, only_new: bool = False) -> None:
        """Ask the pools' routable endpoints (only those never heard from or marked
        :meth:`stale`, if ``only_new``) and update the router."""
        limit = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        stale, self._stale = self._stale, set()
        now = asyncio.get_running_loop().time()
        self._stale_at = {key: at for key, at in self._stale_at.items()
                          if now - at < STALE_REFRESH_INTERVAL}
        for pool in self._pools:
            targets = [pool.states[i] for i in pool.routable
                       if not (only_new and pool.states[i].models is not None
                               and (pool.name, i) not in stale)]
            out = self._outbound.get(pool.name)
            options = {} if out is None else out.client_options()
            answers = await asyncio.gather(
                *(self._ask(session, limit, pool, state.endpoint, options)
                  for state in targets))
            pool.set_endpoints_models({
                state.id: frozenset(models)
                for state, models in zip(targets, answers, strict=True)
                if models is not None and state.present})
            self._update(pool)

    def _update(self, pool: Pool) -> None:
        """The pool's models: the union of its routable endpoints' reports."""
        reports = (pool.states[i].models for i in pool.routable)
        models = set().union(*(r for r in reports if r is not None))
        if models and self._router.set_models(pool.name, models):
            log.info("pool %s: serving models %s", pool.name, ", ".join(pool.models))

    async def _ask(self, session: aiohttp.ClientSession, limit: asyncio.Semaphore, pool: Pool,
                   endpoint: Endpoint, options: Mapping[str, Any]) -> set[str] | None:
        async with limit:
            try:
                async with session.get(endpoint.url + "/v1/models", allow_redirects=False,
                                       **options) as response:
                    response.raise_for_status()
                    names = model_names(await response.json(content_type=None))
                if names is None:
                    raise ValueError("not an OpenAI model list")
                return names
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if self._metrics is not None:
                    self._metrics.discovery_error(pool.name, "models")
                log.warning("pool %s: cannot read the models of %s: %s", pool.name,
                            endpoint.id, str(exc) or type(exc).__name__)
                return None
