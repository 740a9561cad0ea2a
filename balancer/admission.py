"""Admission: taking an endpoint for one attempt, and always giving it back.

``async with admission.lease(decision, tried) as lease:`` is the whole protocol; the proxy
spells it out as :meth:`Admission.acquire` and, in a ``finally``, :meth:`Admission.release`,
which is the same without an async context manager's two coroutines per attempt. Acquiring
steers around endpoints that asked for a pause (429 ``Retry-After``) and endpoints already
tried, keeps each endpoint under ``max_in_flight_per_endpoint`` (the next one on the walk
takes the request, else it waits in the pool's bounded FIFO queue), and takes the lease.
Releasing tells passive health how the attempt went (unless the client went away), releases
the lease and wakes the next waiter. Acquiring raises instead of admitting:

- :class:`~balancer.errors.RateLimitedError` when every endpoint left is paused (with the
  shortest pause as its ``retry_after``);
- :class:`~balancer.errors.OverloadedError` when every endpoint is full and the queue is
  full or the wait timed out;
- :class:`~balancer.errors.NoEndpointsError` when nothing is left at all.

Before all that, :meth:`Admission.decide` holds a request whose pool has no routable
endpoint (scaled to zero, pods loading weights), or whose model is unknown while a pool has
not learned its models yet, for up to ``limits.empty_pool_wait`` seconds: the router wakes it
the moment a pool gets its first endpoint or learns models, else it gets 503 with
``Retry-After``. Only the request waits; readiness does not depend on the model servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from types import TracebackType

from balancer.config import LimitsSettings, RetrySettings
from balancer.errors import (
    ModelNotFoundError,
    NoEndpointsError,
    OverloadedError,
    RateLimitedError,
)
from balancer.metrics import Metrics
from balancer.route import Decision, RequestView, decide, redecide
from balancer.router import Lease, Pool, Router

Observer = Callable[[Lease], None]
"""Hears how each attempt went, as its lease ends (passive health)."""


class Admission:
    def __init__(self, limits: LimitsSettings, retries: RetrySettings,
                 observe: Observer | None = None, metrics: Metrics | None = None) -> None:
        self.limit = limits.max_in_flight_per_endpoint
        """Most requests per endpoint at once (0: no limit)."""
        self.queue_size = limits.queue_size
        self.queue_timeout = limits.queue_timeout
        self.retry_after_default = retries.retry_after_default
        self.observe = observe
        self.empty_pool_wait = limits.empty_pool_wait
        self.metrics = metrics
        self._closing = False

    async def decide(self, view: RequestView, router: Router) -> Decision:
        """``route.decide``, waiting up to ``limits.empty_pool_wait`` when the request's pool
        has no routable endpoint, or its model is unknown while a pool is still learning its
        models (it may be one of that pool's). Woken by the router's change notice, not by
        polling; then raises NoEndpointsError with ``Retry-After``. A model unknown with every
        pool's models learned is ModelNotFoundError at once."""
        try:
            return decide(view, router)
        except NoEndpointsError:
            why = "no_endpoints"
        except ModelNotFoundError:
            if not router.learning():
                raise
            why = "model_unknown"
        if self.empty_pool_wait <= 0 or self.closing():
            raise self._unavailable(why, view)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.empty_pool_wait
        metrics = self.metrics
        result = "gone"
        if metrics is not None:
            metrics.empty_pool_waiting.inc()
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        await router.changed()
                except TimeoutError:
                    result = "timeout"
                    raise self._unavailable(why, view) from None
                if self.closing():
                    result = "shutdown"
                    raise self._unavailable(why, view)
                try:
                    decision = decide(view, router)
                except NoEndpointsError:
                    why = "no_endpoints"
                    continue
                except ModelNotFoundError:
                    if not router.learning():
                        result = "model_not_found"
                        raise
                    why = "model_unknown"
                    continue
                result = "served"
                return decision
        finally:
            if metrics is not None:
                metrics.empty_pool_waiting.dec()
                metrics.empty_pool_wait(why, result)

    def close(self, router: Router) -> None:
        """At shutdown: requests waiting for an empty pool get their 503 now, rather than be
        cut off when the listener stops (another replica may serve them)."""
        self._closing = True
        router.notify()

    def closing(self) -> bool:
        return self._closing

    def _unavailable(self, why: str, view: RequestView) -> NoEndpointsError:
        """The 503 for a request whose pool stayed empty: retry in a while (the pool may be
        scaling up)."""
        if why == "model_unknown":
            message = (f"model {view.model!r} is not known yet: a pool is still learning "
                       "its models from its endpoints")
        else:
            message = "no endpoint available for this request's pool"
        if self.empty_pool_wait > 0:
            message += f" (waited {self.empty_pool_wait:g} s)"
        exc = NoEndpointsError(message)
        exc.retry_after = max(1, math.ceil(self.retry_after_default))
        return exc

    def lease(self, decision: Decision, tried: frozenset[str] = frozenset()) -> Admit:
        """Admit the decided request to an endpoint (never one of ``tried``)."""
        return Admit(self, decision, tried)

    async def acquire(self, decision: Decision, tried: frozenset[str]) -> Lease:
        """The lease of an endpoint for one attempt (never one of ``tried``); the caller
        must :meth:`release` it however the attempt ends."""
        pool, choice = decision.pool, decision.choice
        excluded = tried
        paused: frozenset[str] = frozenset()
        if pool.pauses:
            paused = pool.paused(asyncio.get_running_loop().time())
            excluded = tried | paused
        if excluded and choice.endpoint in excluded:
            choice = self._avoid(decision, excluded, paused).choice
        if self.limit and pool.load.get(choice.endpoint, 0) >= self.limit:
            choice = (await self._wait(decision, excluded)).choice
        if pool.routing.zone and decision.key is not None:
            pool.count_locality(choice.endpoint)
        return pool.acquire(choice)

    def _avoid(self, decision: Decision, excluded: frozenset[str],
               paused: frozenset[str]) -> Decision:
        """The decision again without the excluded endpoints; with none left, rate limited
        if any was paused (else no endpoints)."""
        try:
            return redecide(decision, excluded)
        except NoEndpointsError:
            if paused:
                raise self.rate_limited(decision.pool) from None
            raise

    def rate_limited(self, pool: Pool) -> RateLimitedError:
        """Every endpoint left asked for a pause: say for how long (the shortest)."""
        left = pool.pause_left(asyncio.get_running_loop().time())
        seconds = max(1, math.ceil(self.retry_after_default if left is None else left))
        return RateLimitedError(f"every endpoint of pool {pool.name!r} is rate limited; "
                                f"retry after {seconds} s", retry_after=seconds)

    async def _wait(self, decision: Decision, excluded: frozenset[str]) -> Decision:
        """An endpoint under the limit: the next one on the walk that is not full, else the
        first to free up while this request waits in the pool's queue."""
        pool, limit = decision.pool, self.limit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        waiters = pool.waiters
        while True:
            full = frozenset(e for e in pool.routable if pool.load.get(e, 0) >= limit)
            with contextlib.suppress(NoEndpointsError):
                return redecide(decision, full | excluded)
            if len(waiters) >= self.queue_size:
                raise self._overloaded(pool)
            waiter: asyncio.Future[None] = loop.create_future()
            waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise self._overloaded(pool) from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    pool.wake()  # pass the slot we were given on
                raise
            finally:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)

    def _overloaded(self, pool: Pool) -> OverloadedError:
        return OverloadedError(
            f"every endpoint of pool {pool.name!r} is at its limit of {self.limit} requests "
            "and the wait queue is full or timed out")

    def release(self, lease: Lease) -> None:
        """The attempt ended: health hears how it went, then the endpoint is given back."""
        if self.observe is not None and not lease.client_gone:
            self.observe(lease)
        lease.release()
        pool = lease.pool
        if pool.waiters:
            pool.wake()


class Admit:
    """``async with``: the lease for one attempt, released however the attempt ends."""

    __slots__ = ("_admission", "_decision", "_lease", "_tried")

    def __init__(self, admission: Admission, decision: Decision,
                 tried: frozenset[str]) -> None:
        self._admission = admission
        self._decision = decision
        self._tried = tried
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        lease = self._lease = await self._admission.acquire(self._decision, self._tried)
        return lease

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        lease = self._lease
        if lease is not None:
            self._lease = None
            self._admission.release(lease)
