"""Endpoint health: active checks, passive outlier ejection, panic mode.

The state machines are pure: :class:`PoolHealth` takes observations (a request's outcome, a
check's result) with the time they happened and answers which endpoints are out and until
when. :class:`HealthMonitor` is the I/O edge: it runs the jittered probes, wakes up when an
ejection ends, and hands every change of the out-set to a callback (the app applies it to the
router, where it only changes ring membership, so no other key moves).

Passive ejection (as Envoy's outlier detection): ``consecutive_failures`` failures in a row
(5xx, reset, broken stream, timeout) eject an endpoint for ``ejection_time``, doubled on each
further ejection up to ``max_ejection_time``. A refused connection ejects at once. When the
time is up the endpoint is back on trial (half-open): its next success clears it, its next
failure ejects it again for longer. Active checks are separate: ``unhealthy_threshold`` failed
checks take an endpoint out until ``healthy_threshold`` checks pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from balancer.config import HealthSettings
from balancer.endpoints import Endpoint
from balancer.metrics import Metrics

log = logging.getLogger(__name__)


class Failure(enum.StrEnum):
    """What went wrong with one request, as passive detection sees it."""

    CONNECT = "connect"
    """No connection could be opened: ejects at once."""
    RESET = "reset"
    """Connection reset before the response head, or the stream broke partway."""
    STATUS = "status"
    """A 5xx answer."""
    TIMEOUT = "timeout"
    """First-byte or idle timeout."""


@dataclass(slots=True)
class EndpointHealth:
    """One endpoint's health state (created on its first failure or check)."""

    failures: int = 0
    """Passive: failures in a row."""
    ejections: int = 0
    """Passive ejections so far (sets the next back-off)."""
    ejected_until: float = 0.0
    """Passive: out until this time (loop clock); 0 when not ejected."""
    trial: bool = False
    """Half-open: back after an ejection, the next outcome decides."""
    returned_at: float = 0.0
    """When the last ejection ended (resets ``ejections`` after a healthy stretch)."""
    check_failures: int = 0
    check_passes: int = 0
    check_down: bool = False
    """Active: taken out by failed checks."""


@dataclass(frozen=True, slots=True)
class Ejection:
    """A decision: ``endpoint`` is out for ``seconds`` because of ``reason``."""

    endpoint: str
    seconds: float
    cause: Failure
    trial: bool
    """The endpoint was on trial after an earlier ejection."""


class PoolHealth:
    """The health of one pool's endpoints. Pure: time is passed in."""

    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings
        self.states: dict[str, EndpointHealth] = {}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of endpoints no longer in the pool."""
        keep = set(keep)
        for endpoint in [e for e in self.states if e not in keep]:
            del self.states[endpoint]

    def success(self, endpoint: str) -> bool:
        """A request succeeded; returns whether the out-set may have changed."""
        state = self.states.get(endpoint)
        if state is None:
            return False
        state.failures = 0
        if state.trial:
            state.trial = False
            return True
        return False

    def failure(self, endpoint: str, kind: Failure, now: float) -> Ejection | None:
        """A request failed; returns the ejection it causes, if any."""
        s = self.settings
        state = self.states.get(endpoint)
        if state is None:
            state = self.states[endpoint] = EndpointHealth()
        if state.ejected_until > now:
            return None  # already out (a request that started before the ejection)
        state.failures += 1
        on_trial = state.trial
        if not (kind is Failure.CONNECT or on_trial or state.failures >= s.consecutive_failures):
            return None
        if state.returned_at and now - state.returned_at > s.max_ejection_time:
            state.ejections = 0
        seconds = min(s.ejection_time * 2 ** min(state.ejections, 30), s.max_ejection_time)
        state.ejections += 1
        state.ejected_until = now + seconds
        state.failures = 0
        state.trial = False
        return Ejection(endpoint, seconds, kind, on_trial)

    def expire(self, now: float) -> list[str]:
        """End the ejections that are due (their endpoints go on trial); returns them."""
        back = []
        for endpoint, state in self.states.items():
            if state.ejected_until and state.ejected_until <= now:
                state.ejected_until = 0.0
                state.trial = True
                state.returned_at = now
                back.append(endpoint)
        return back

    def next_expiry(self) -> float:
        """The earliest time an ejection ends (inf when none is pending)."""
        return min((s.ejected_until for s in self.states.values() if s.ejected_until),
                   default=math.inf)

    def check(self, endpoint: str, ok: bool) -> bool:
        """An active check's result; returns whether the endpoint's active state changed."""
        s = self.settings
        state = self.states.get(endpoint)
        if state is None:
            if ok:
                return False
            state = self.states[endpoint] = EndpointHealth()
        if ok:
            state.check_failures = 0
            state.check_passes += 1
            if state.check_down and state.check_passes >= s.healthy_threshold:
                state.check_down = False
                return True
            return False
        state.check_passes = 0
        state.check_failures += 1
        if not state.check_down and state.check_failures >= s.unhealthy_threshold:
            state.check_down = True
            return True
        return False

    def out(self) -> frozenset[str]:
        """Endpoints out now: passively ejected or failing their checks."""
        return frozenset(e for e, s in self.states.items() if s.ejected_until or s.check_down)


HISTORY_PER_ENDPOINT = 20
"""Health events kept per endpoint for /debug/endpoints: enough to see a flapping pod."""

OnChange = Callable[[str, frozenset[str]], None]
"""Called with a pool name and its new out-set."""


class HealthMonitor:
    """Runs the checks and timers of every pool's :class:`PoolHealth`; the I/O edge."""

    def __init__(self, settings: HealthSettings, pools: Iterable[str], on_change: OnChange,
                 metrics: Metrics | None = None, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pools: dict[str, PoolHealth] = {name: PoolHealth(settings) for name in pools}
        self._on_change = on_change
        self._rng = rng or random.Random()
        self._out: dict[str, frozenset[str]] = {name: frozenset() for name in self.pools}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._probes: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.ejections: list[tuple[str, Ejection]] = []
        """Recent ejections (pool, decision), for tests and /debug; capped."""
        self.history: dict[tuple[str, str], deque[dict[str, Any]]] = {}
        """Recent health events per (pool, endpoint), newest last, for /debug/endpoints:
        ejections, returns and check-state changes (not every probe)."""

    def _record(self, pool: str, endpoint: str, event: str, **detail: Any) -> None:
        events = self.history.get((pool, endpoint))
        if events is None:
            events = self.history[(pool, endpoint)] = deque(maxlen=HISTORY_PER_ENDPOINT)
        events.append({"time": round(time.time(), 3), "event": event, **detail})

    def events(self, pool: str, endpoint: str) -> list[dict[str, Any]]:
        return list(self.history.get((pool, endpoint), ()))

    # -- passive, from the request path ------------------------------------------------------

    def success(self, pool: str, endpoint: str) -> None:
        health = self.pools[pool]
        if health.states and health.success(endpoint):
            self._publish(pool)

    def failure(self, pool: str, endpoint: str, kind: Failure) -> None:
        loop = asyncio.get_running_loop()
        ejection = self.pools[pool].failure(endpoint, kind, loop.time())
        if ejection is None:
            return
        log.warning("pool %s: ejecting %s for %g s (%s failure%s)", pool, endpoint,
                    ejection.seconds, kind.value, " on trial" if ejection.trial else "")
        if self.metrics is not None:
            self.metrics.ejection(pool, endpoint, kind.value)
        self.ejections.append((pool, ejection))
        del self.ejections[:-100]
        self._record(pool, endpoint, "ejected", cause=kind.value, seconds=ejection.seconds,
                     trial=ejection.trial)
        self._publish(pool)
        self._schedule(pool)

    def _schedule(self, pool: str) -> None:
        loop = asyncio.get_running_loop()
        due = self.pools[pool].next_expiry()
        timer = self._timers.pop(pool, None)
        if timer is not None:
            timer.cancel()
        if math.isfinite(due):
            self._timers[pool] = loop.call_at(due, self._expire, pool)

    def _expire(self, pool: str) -> None:
        self._timers.pop(pool, None)
        back = self.pools[pool].expire(asyncio.get_running_loop().time())
        if back:
            log.info("pool %s: %s back on trial", pool, ", ".join(back))
            for endpoint in back:
                self._record(pool, endpoint, "on_trial")
                if self.metrics is not None:
                    self.metrics.returned(pool, endpoint)
            self._publish(pool)
        self._schedule(pool)

    def _publish(self, pool: str) -> None:
        out = self.pools[pool].out()
        if out != self._out[pool]:
            self._out[pool] = out
            self._on_change(pool, out)

    # -- active checks ------------------------------------------------------------------------

    def set_endpoints(self, pool: str, endpoints: Mapping[str, Endpoint]) -> None:
        """Follow a pool's endpoint set: start checks for new endpoints, stop removed ones."""
        self.pools[pool].forget(endpoints)
        if self.settings.active and self._session is not None:
            for endpoint in endpoints.values():
                if (pool, endpoint.id) not in self._probes:
                    self._probes[(pool, endpoint.id)] = asyncio.create_task(
                        self._probe_loop(pool, endpoint), name=f"health-{endpoint.id}")
        for key in [k for k in self._probes if k[0] == pool and k[1] not in endpoints]:
            self._probes.pop(key).cancel()
        for key in [k for k in self.history if k[0] == pool and k[1] not in endpoints]:
            del self.history[key]
        self._publish(pool)

    async def _probe_loop(self, pool: str, endpoint: Endpoint) -> None:
        s = self.settings
        url = endpoint.url.rstrip("/") + s.path
        timeout = aiohttp.ClientTimeout(total=s.timeout)
        # A random phase spreads the probes of many endpoints over the interval.
        await asyncio.sleep(self._rng.uniform(0, s.interval))
        while True:
            ok = await self._probe(url, timeout)
            if self.pools[pool].check(endpoint.id, ok):
                log.warning("pool %s: %s %s its health checks", pool, endpoint.id,
                            "passes" if ok else "fails")
                self._record(pool, endpoint.id, "checks_pass" if ok else "checks_fail")
                self._publish(pool)
            await asyncio.sleep(s.interval * self._rng.uniform(0.9, 1.1))

    async def _probe(self, url: str, limit: aiohttp.ClientTimeout) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(url, timeout=limit, allow_redirects=False) as r:
                return 200 <= r.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True))

    async def close(self) -> None:
        for task in self._probes.values():
            task.cancel()
        for task in self._probes.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._probes.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
