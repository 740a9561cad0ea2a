"""Large request bodies are read in worker processes, so the event loop only moves bytes.

Parsing a 10 MiB JSON body takes ~100 ms and freeing what it built ~10 ms more, all of it C
code holding the GIL: on the event loop every stream would wait that long, and a thread would
not help. :class:`ParsePool` hands bodies over ``limits.offload_parse_bytes`` to a few worker
processes, which run the same pure function the loop runs for small bodies
(:func:`balancer.summary.read_keyed`) and send back only its small result; the parsed objects
are built and freed there.

The pieces, and why:

* ``concurrent.futures.ProcessPoolExecutor`` with ``limits.parse_workers`` processes started
  by the ``forkserver`` method: never ``fork`` from this process, which runs an event loop and
  threads. The fork server (one per balancer process, started by the standard library on
  first use) preloads :mod:`balancer.summary`, so a worker, new or replacing one that died,
  is forked ready in milliseconds (see :data:`PRELOAD` for the main module). The pool is
  started off the loop (in a thread) by the first body that needs it, which waits for it
  (a few hundred milliseconds, once): the fork server, the resource tracker and the workers
  hold tens of megabytes, which a replica that never sees a large body (most sidecars) should
  not pay. :meth:`ParsePool.start` starts it ahead for those that want it.
* The body goes to a worker as an argument: the executor's feeder thread pickles it (one copy,
  ~1 ms per 10 MiB with the GIL held, the only part of the hand-off that holds the loop) and
  writes it to the worker's pipe (system calls without the GIL); the loop itself copies
  nothing. (The proxy receives a large body without copying it on the loop either, and sends
  it upstream in slices: ``proxy._read_large``, ``upstream.WRITE_SLICE``.)
* Back-pressure: at most :data:`QUEUED_PER_WORKER` bodies per worker are handed over at once
  (one parsing, one ready behind it); further ones wait for a slot, which costs their request
  time and no error. ``limits.max_concurrent_requests`` bounds how many can wait. A slot is
  freed when the worker is done with the body, not when its request is: a client that leaves
  cannot make room for more work than the workers can take.
* A worker that dies (killed, out of memory) breaks the executor: the bodies it held answer 503
  (:class:`~balancer.errors.ParseUnavailableError`, counted and logged), a new pool starts at
  once, and the process goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final, TypeVar

from balancer.config import LimitsSettings
from balancer.errors import BalancerError, ParseUnavailableError, ShuttingDownError
from balancer.metrics import Metrics
from balancer.summary import guarded, worker_pid

log = logging.getLogger(__name__)

T = TypeVar("T")

QUEUED_PER_WORKER: Final = 2
"""Bodies handed to the workers at once, per worker: one being parsed and one ready to start
the moment it ends. More would only hold more copies of bodies in pipes and queues."""

START_TIMEOUT: Final = 60.0
"""Seconds the workers may take to start (milliseconds normally; the first start of the fork
server imports balancer's parsing modules, well under a second even on a loaded node)."""

STARTED_DELAY: Final = 0.05
"""Seconds each worker waits in the call that tells it has started (see :func:`launch`)."""

START_ROUNDS: Final = 10
"""Rounds of pid calls :func:`launch` makes at most until every worker has answered one."""

PRELOAD: Final = ("__main__", "balancer.summary")
"""Modules the fork server imports once for every worker it forks. ``__main__`` as the
standard library's default, though (CPython 3.11) each worker still imports a main script
run by path (the ``balancer`` command: ~25 MB and ~0.1 s more per worker), and none run with
``python -m balancer``."""


class ParsePool:
    """Runs functions on request bodies: on the loop when the body is small, else in a worker
    process. One per balancer; started and closed by the app's lifecycle."""

    def __init__(self, limits: LimitsSettings, metrics: Metrics) -> None:
        self.threshold = limits.offload_parse_bytes
        """Bodies of more bytes than this go to a worker (0: none do)."""
        self.workers = limits.parse_workers
        self.metrics = metrics
        self.pending = 0
        """Bodies waiting for a slot or held by the workers."""
        self.held = 0
        """Bodies handed to the workers and not done with (at most QUEUED_PER_WORKER per
        worker)."""
        self.pids: frozenset[int] = frozenset()
        """Process ids of the current pool's workers (once started)."""
        self._slots = asyncio.Semaphore(QUEUED_PER_WORKER * self.workers)
        """Bodies the workers may hold at once (no loop is bound until first used)."""
        self._executor: ProcessPoolExecutor | None = None
        self._starting: asyncio.Task[ProcessPoolExecutor] | None = None
        self._closed = False
        metrics.track_offload_pending(lambda: self.pending)

    def on_loop(self, size: int) -> bool:
        """Whether a body of ``size`` bytes is read on the event loop."""
        return size <= self.threshold or not self.threshold

    def start(self) -> None:
        """Start the workers in the background, so no request waits for them."""
        if self.threshold and not self._closed and self._starting is None:
            self._starting = self._start_task()

    async def ready(self) -> None:
        """Start the workers if they are not, and wait until they run (for a tool or a test
        that must not measure their start; raises ParseUnavailableError if they cannot)."""
        self.start()
        if self._starting is not None:
            await asyncio.shield(self._starting)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a worker process; a BalancerError it raises there is raised
        here. Raises ParseUnavailableError when the worker died (or none could start)."""
        self.pending += 1
        try:
            await self._slots.acquire()
            executor, future = await self._submit(function, args)
            try:
                result: T | BalancerError = await asyncio.wrap_future(future)
            except BrokenProcessPool:
                raise self._replace(executor) from None
        finally:
            self.pending -= 1
        if isinstance(result, BalancerError):
            self.metrics.offloaded_parse("bad_request")
            raise result
        self.metrics.offloaded_parse("ok")
        return result

    async def close(self) -> None:
        """Stop the workers (bodies still queued are not parsed)."""
        self._closed = True
        starting, self._starting = self._starting, None
        if starting is not None:
            with contextlib.suppress(BalancerError, asyncio.CancelledError):
                await starting
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    # -- internals -------------------------------------------------------------------------

    async def _submit(self, function: Callable[..., T], args: tuple[Any, ...]
                      ) -> tuple[ProcessPoolExecutor, Future[T | BalancerError]]:
        """Hand ``function(*args)`` to a worker, holding a slot (taken) until it is done."""
        try:
            if self._closed:
                raise ShuttingDownError("balancer is shutting down")
            if self._starting is None:
                self._starting = self._start_task()
            executor = await asyncio.shield(self._starting)
            try:
                future = executor.submit(guarded, function, *args)
            except BrokenProcessPool:
                raise self._replace(executor) from None
        except BaseException:
            self._slots.release()
            raise
        self.held += 1
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda _: _call_soon(loop, self._done_with))
        return executor, future

    def _done_with(self) -> None:
        """A worker is done with a body (or the body was cancelled before it got one)."""
        self.held -= 1
        self._slots.release()

    def _start_task(self) -> asyncio.Task[ProcessPoolExecutor]:
        task = asyncio.get_running_loop().create_task(self._start(), name="balancer-parsers")
        # Retrieved here so a failed start nobody waited for is not reported at exit.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _start(self) -> ProcessPoolExecutor:
        try:
            executor, pids = await asyncio.to_thread(launch, self.workers)
        except Exception as exc:
            self._starting = None
            self.metrics.offloaded_parse("failed")
            log.error("body-parsing worker processes could not start: %s", exc)
            raise ParseUnavailableError(
                f"request body parsers could not start ({exc}); try again") from None
        if self._closed:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
            raise ShuttingDownError("balancer is shutting down")
        self._executor = executor
        self.pids = pids
        log.info("%d body-parsing worker process(es) started (pids %s)", self.workers,
                 ", ".join(map(str, sorted(pids))))
        return executor

    def _replace(self, executor: ProcessPoolExecutor) -> ParseUnavailableError:
        """The error for a body whose worker died; replaces the pool, once per breakage (every
        body the broken pool held fails with it)."""
        self.metrics.offloaded_parse("failed")
        if executor is self._executor:
            log.warning("a body-parsing worker process died: answering 503 for the bodies "
                        "it held and starting new workers")
            self._executor = None
            self._starting = None
            executor.shutdown(wait=False, cancel_futures=True)
            self.start()
        return ParseUnavailableError(
            "the worker process reading the request body died; try again")


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., object],
               *args: Any) -> None:
    """Run ``callback(*args)`` on ``loop`` from any thread (a no-op once the loop closed)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def launch(workers: int) -> tuple[ProcessPoolExecutor, frozenset[int]]:
    """A process pool of ``workers`` started workers and their pids; blocks until they run.

    Each worker is made to start now (the executor starts them on demand, on the thread that
    submits, and that must not be the event loop's): ``workers`` calls submitted at once start
    one process each, since none is idle before the first has started. Each call waits a
    moment before it answers its pid, so that once all have started each takes one; a worker
    slower to start than the others (it may import the main module) shows in a later round."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    executor = ProcessPoolExecutor(workers, mp_context=context)
    pids: set[int] = set()
    try:
        for _ in range(START_ROUNDS):
            calls = [executor.submit(worker_pid, STARTED_DELAY) for _ in range(workers)]
            pids.update(call.result(timeout=START_TIMEOUT) for call in calls)
            if len(pids) >= workers:
                break
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    return executor, frozenset(pids)
