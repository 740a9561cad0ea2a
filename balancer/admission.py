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
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from types import TracebackType

from balancer.config import LimitsSettings, RetrySettings
from balancer.errors import NoEndpointsError, OverloadedError, RateLimitedError
from balancer.route import Decision, redecide
from balancer.router import Lease, Pool

Observer = Callable[[Lease], None]
"""Hears how each attempt went, as its lease ends (passive health)."""


class Admission:
    def __init__(self, limits: LimitsSettings, retries: RetrySettings,
                 observe: Observer | None = None) -> None:
        self.limit = limits.max_in_flight_per_endpoint
        """Most requests per endpoint at once (0: no limit)."""
        self.queue_size = limits.queue_size
        self.queue_timeout = limits.queue_timeout
        self.retry_after_default = retries.retry_after_default
        self.observe = observe

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
