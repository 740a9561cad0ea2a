"""Give the memory of a burst of large bodies back to the system once it has passed.

A 10 MiB request body passes through a few buffers on its way up: the socket's chunks, their
join, the copy pickled for a parse worker. glibc's allocator keeps what such buffers leave
behind: chunks below its mmap threshold free into arenas that shrink only from their top, and
the threshold itself rises after the first large buffer is freed, so later ones land in the
arenas too. After sixteen such bodies at once the process kept 100 to 230 MiB it no longer
used, depending on the order in which buffers happened to be freed. That is no leak (the next
burst reuses it), but a container's memory limit counts it, and a sidecar sized for its
steady state should not carry the peak of its largest burst for ever.

:class:`Reclaimer` does two things, on glibc only (elsewhere, musl or macOS, nothing):

* At start it limits the allocator to one arena (``mallopt(M_ARENA_MAX, 1)``), so the
  threads that touch bodies (the join of a large body's chunks, the executor's feeder that
  pickles a body for a parse worker) allocate from the main arena instead of arenas of their
  own: ``malloc_trim`` hands back a thread arena's free chunks but never its top, where a
  body's buffer freed last stays for good. The mmap threshold stays dynamic: after the first
  large buffer it rises above a body's size, so bodies come from the heap and reuse pages
  already mapped. (Fixing the threshold at a megabyte instead, so that every body buffer is
  mapped and unmapped on its own, returned the memory too, but every buffer then faulted in
  its pages anew, some with the GIL held, the feeder's pickling for one: a 10 MiB body held
  the event loop ~6 ms instead of ~2.5.) The threads are few and allocate rarely, so sharing
  one arena's lock costs nothing measurable.
* It calls ``malloc_trim(0)``, which hands the free pages of the arena (its top and the free
  chunks inside) back to the kernel, once the bodies are likely freed: :data:`TRIM_DELAY`
  seconds after the proxy last had nothing in flight, or at the latest :data:`TRIM_WITHIN`
  seconds after the first large body since the last trim (a gateway that is never idle). The
  call runs in a thread: it takes ~10 ms for 200 MiB freed, holds the arena's lock meanwhile
  and releases the GIL.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

ARENAS: Final = 1
"""Arenas glibc may create: the main one only (see the module's docstring)."""
M_ARENA_MAX: Final = -8
"""``mallopt``'s parameter number for the arena limit (glibc's ``malloc.h``)."""
TRIM_DELAY: Final = 1.0
"""Seconds from the proxy going idle to the trim: a burst that pauses for less is still one
burst (one trim)."""
TRIM_WITHIN: Final = 30.0
"""Seconds from the first large body since the last trim to the trim at the latest, when the
proxy is never idle for :data:`TRIM_DELAY`."""


@dataclass(frozen=True)
class Allocator:
    """The two calls of glibc's allocator that the reclaimer makes."""

    trim: Callable[[], object]
    """``malloc_trim(0)``."""
    set_arena_max: Callable[[int], object]
    """``mallopt(M_ARENA_MAX, arenas)``."""


def glibc() -> Allocator | None:
    """The process's glibc allocator, or None where the C library is another."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return Allocator(trim=lambda: trim(0),
                     set_arena_max=lambda arenas: mallopt(M_ARENA_MAX, arenas))


class Reclaimer:
    """Trims the allocator's free memory once large bodies read have likely been freed."""

    def __init__(self, delay: float = TRIM_DELAY, within: float = TRIM_WITHIN,
                 allocator: Allocator | None = None) -> None:
        self.delay = delay
        self.within = within
        self.allocator = allocator
        """None: nothing to tune or trim (not glibc)."""
        self._trim = allocator.trim if allocator is not None else None
        self._pending = False
        """A large body was read since the last trim began."""
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._running: asyncio.Task[None] | None = None
        self.trims = 0
        """Trims done so far (for tests)."""

    def start(self) -> None:
        """Limit the allocator to one arena (process-wide; once, as the server starts,
        before the threads that read bodies exist)."""
        if self.allocator is not None:
            self.allocator.set_arena_max(ARENAS)

    def large_body(self) -> None:
        """A large body was read: trim within :attr:`within` seconds at the latest."""
        if self._trim is None:
            return
        if not self._pending:
            self._pending = True
            self._schedule(self.within)

    def quiet(self) -> None:
        """Nothing is in flight: if a large body was read since the last trim, trim
        :attr:`delay` seconds from now (unless a trim is due sooner)."""
        if self._pending:
            self._schedule(self.delay)

    def _schedule(self, after: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + after
        if self._handle is not None:
            if self._due <= due:
                return
            self._handle.cancel()
        self._due = due
        self._handle = loop.call_at(due, self._start)

    def _start(self) -> None:
        self._handle = None
        if self._running is not None and not self._running.done():
            self._schedule(self.delay)  # the last one is still running: come back after it
            return
        self._pending = False
        self._running = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        trim = self._trim
        assert trim is not None
        try:
            await asyncio.to_thread(trim)
        except RuntimeError:  # the default executor is shut down: the process is stopping
            return
        self.trims += 1
        log.debug("returned free memory to the system after large request bodies")

    async def close(self) -> None:
        """Cancel a pending trim and wait for a running one (at shutdown)."""
        self._pending = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)
