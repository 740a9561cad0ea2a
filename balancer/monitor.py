"""The I/O edge of endpoint health: probes, ejection timers, and the out-set on the ring.

:class:`HealthMonitor` feeds each endpoint's pure :class:`~balancer.health.EndpointHealth`
(in its :class:`~balancer.state.EndpointState`): passive observations from the request path,
active checks from one probe task per serving endpoint, and a timer per pool that ends
ejections. After every change it publishes the pool's out-set (``Pool.update_out``), which
only changes ring membership, so no other key moves; more than ``panic_threshold`` out puts
the pool in panic mode (route to all). Passive ejections beyond ``max_ejection_percent`` of
a pool are not performed: counted, and logged at most once per :data:`SKIP_LOG_INTERVAL`
per pool with the number held back, since every failed request may bring one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from balancer.config import HealthSettings
from balancer.health import Capped, Failure, ejection_cap
from balancer.logs import Throttle
from balancer.metrics import Metrics
from balancer.outbound import Outbound
from balancer.router import Lease, Pool
from balancer.state import EndpointState

log = logging.getLogger("balancer.health")

SKIP_LOG_INTERVAL: Final = 10.0
"""Seconds between two log lines about ejections the cap held back in one pool: a pool
whose endpoints keep failing would otherwise write one per failed request."""


class HealthMonitor:
    """Runs the checks and timers of every pool's endpoints."""

    def __init__(self, settings: HealthSettings, pools: Mapping[str, Pool],
                 metrics: Metrics | None = None, rng: random.Random | None = None,
                 outbound: Mapping[str, Outbound] | None = None) -> None:
        self.settings = settings
        self.pools = pools
        self.outbound = outbound or {}
        """Pools' own check settings, TLS and headers (a pool not here: the section's)."""
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._skip_logs = {name: Throttle(SKIP_LOG_INTERVAL) for name in pools}
        self._session: aiohttp.ClientSession | None = None

    def events(self, pool: str, endpoint: str) -> list[dict[str, Any]]:
        """Recent health events of an endpoint, oldest first (for /debug/endpoints)."""
        state = self.pools[pool].states.get(endpoint)
        return list(state.history or ()) if state is not None else []

    # -- passive, from the request path ------------------------------------------------------

    def observe(self, lease: Lease) -> None:
        """How one attempt went, as its lease ends (``lease.failure`` None: it succeeded)."""
        pool, state, failure = lease.pool, lease.state, lease.failure
        if failure is None:
            if state.health.succeeded():
                self._publish(pool)
            return
        if not state.present:
            return  # the endpoint left: its health no longer matters
        health, now = state.health, asyncio.get_running_loop().time()
        if not health.due(failure, now, self.settings):
            return
        states = pool.states
        capped = ejection_cap((states[i].health for i in pool.serving), health,
                              self.settings.max_ejection_percent)
        if capped is not None:
            health.spare()
            self._skipped(pool, state, failure, capped, now)
            return
        ejection = health.eject(failure, now, self.settings)
        log.warning("pool %s: ejecting %s for %g s (%s failure%s)", pool.name, state.id,
                    ejection.seconds, failure.value, " on trial" if ejection.trial else "")
        state.metrics.ejection(failure.value)
        state.record("ejected", cause=failure.value, seconds=ejection.seconds,
                     trial=ejection.trial)
        self._publish(pool)
        self._schedule(pool)

    def _skipped(self, pool: Pool, state: EndpointState, failure: Failure, capped: Capped,
                 now: float) -> None:
        """A due ejection the cap held back: counted always, logged when the throttle lets
        it (with how many it held back since)."""
        if self.metrics is not None:
            self.metrics.ejection_skipped(pool.name, capped.reason, failure.value)
        held = self._skip_logs[pool.name].allow(now)
        if held is not None:
            log.warning("pool %s: not ejecting %s (%s failure): %d of %d serving endpoints are "
                        "ejected already, health.max_ejection_percent %g allows %d%s",
                        pool.name, state.id, failure.value, capped.ejected, capped.serving,
                        self.settings.max_ejection_percent, capped.limit,
                        f"; {held} more not ejected since the last such line" if held else "")

    def _schedule(self, pool: Pool) -> None:
        due = min((s.health.ejected_until for s in pool.states.values()
                   if s.health.ejected_until), default=math.inf)
        timer = self._timers.pop(pool.name, None)
        if timer is not None:
            timer.cancel()
        if math.isfinite(due):
            self._timers[pool.name] = asyncio.get_running_loop().call_at(
                due, self._expire, pool)

    def _expire(self, pool: Pool) -> None:
        self._timers.pop(pool.name, None)
        now = asyncio.get_running_loop().time()
        back = [s for s in pool.states.values() if s.health.expire(now)]
        if back:
            log.info("pool %s: %s back on trial", pool.name, ", ".join(s.id for s in back))
            for state in back:
                state.record("on_trial")
                state.metrics.returned()
            self._publish(pool)
        self._schedule(pool)

    def _publish(self, pool: Pool) -> None:
        """Apply the pool's out-set to its ring, and say so when panic mode changes."""
        before = pool.out
        if pool.update_out():
            if pool.panic:
                log.error("pool %s: PANIC mode, %d of %d endpoints are out; routing across "
                          "all of them", pool.name, len(pool.out), len(pool.serving))
            else:
                log.warning("pool %s: panic mode over", pool.name)
        if pool.out != before and self.metrics is not None:
            self.metrics.health_state(pool.name, len(pool.out), pool.panic)

    # -- active checks ------------------------------------------------------------------------

    def follow(self, pool: Pool) -> None:
        """Follow a pool's endpoint set: check serving endpoints, stop checking the others."""
        out = self.outbound.get(pool.name)
        active = (self.settings.active if out is None else out.health_active) \
            and self._session is not None
        for state in pool.states.values():
            serving = state.present and state.endpoint.serving
            if serving and active and state.probe is None:
                state.probe = asyncio.create_task(self._probe_loop(pool, state),
                                                  name=f"health-{state.id}")
            elif not serving and state.probe is not None:
                state.probe.cancel()
                state.probe = None
        self._publish(pool)

    async def _probe_loop(self, pool: Pool, state: EndpointState) -> None:
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=s.timeout)
        out = self.outbound.get(pool.name)
        path = s.path if out is None else out.health_path
        # A random phase spreads the probes of many endpoints over the interval.
        await asyncio.sleep(self._rng.uniform(0, s.interval))
        while True:
            # Asked each time: an injected header read from a file may have changed.
            options = {} if out is None else out.client_options()
            ok = await self._probe(state.endpoint.url.rstrip("/") + path, timeout, options)
            if state.health.checked(ok, s):
                log.warning("pool %s: %s %s its health checks", pool.name, state.id,
                            "passes" if ok else "fails")
                state.record("checks_pass" if ok else "checks_fail")
                self._publish(pool)
            await asyncio.sleep(s.interval * self._rng.uniform(0.9, 1.1))

    async def _probe(self, url: str, limit: aiohttp.ClientTimeout,
                     options: Mapping[str, Any]) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(url, timeout=limit, allow_redirects=False,
                                         **options) as r:
                return 200 <= r.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True))

    async def close(self) -> None:
        probes = [s.probe for p in self.pools.values() for s in p.states.values()
                  if s.probe is not None]
        for pool in self.pools.values():
            for state in pool.states.values():
                state.probe = None
        for task in probes:
            task.cancel()
        for task in probes:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
