"""A simulated pod restart: what a model server's process being killed and started again does.

When a vLLM process dies (OOM kill, a crashed engine, a rolling update), the kernel closes its
sockets: every request it was running or queueing ends at once, a streamed one mid-stream
without its last chunk, a queued one with no answer at all. Its GPU memory, and with it the
prefix cache, is gone. The container restarts and loads the model again, and only then serves,
with an empty cache.

``POST /sim/restart`` does that to one simulated pod without stopping its listener:

* every model request in flight (a POST under ``/v1/``: being read, queued or streamed) has
  its connection closed at once, with nothing more written (:class:`InFlight`), and its
  sequences are aborted;
* the prefix cache is emptied (:meth:`.engine.Engine.clear_cache`);
* for ``down`` seconds (then for the pod's own ``slow_start``, as after any start) ``/health``,
  ``/tokenize`` and completions answer 503 with ``Retry-After``, as the pod's slow start
  does. A real pod restarting would refuse connections instead (nothing listens on the port);
  the simulator keeps its listening socket, because an ephemeral port it gave up could be
  taken by another socket before it came back. Both are failures a balancer sees before the
  first byte: an active check fails either way, and a passive check counts a 503 as a failure
  where it ejects a refused connection at once;
* the pod's counters carry on (they are the harness's view of the pod, not the process's), and
  ``/stats`` counts ``restarts`` and ``requests_killed``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from aiohttp import web

DEFAULT_DOWN_S = 5.0
"""Seconds a restarted pod refuses service when the request names none: a small model's
process starting and loading its weights from a warm page cache takes about that long."""

MAX_DOWN_S = 3600.0
"""Longest down window accepted, in seconds: anything longer is a typo, not a restart."""


class RestartError(ValueError):
    """A ``/sim/restart`` request with a bad ``down``."""


def parse_down(body: Mapping[str, Any], query: Mapping[str, str]) -> float:
    """The ``down`` seconds of a restart request: from the JSON body, else the query string,
    else :data:`DEFAULT_DOWN_S`; a finite number within ``0..MAX_DOWN_S``."""
    value: Any = DEFAULT_DOWN_S
    if "down" in body:
        value = body["down"]
    elif "down" in query:
        try:
            value = float(query["down"])
        except ValueError:
            raise RestartError(
                f"'down' must be a number of seconds, not {query['down']!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RestartError(f"'down' must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or not 0 <= value <= MAX_DOWN_S:
        raise RestartError(f"'down' must be between 0 and {MAX_DOWN_S:g} seconds, not {value}")
    return float(value)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InFlight:
    """Middleware that keeps the POST requests under `prefixes` in flight (the model's work:
    completions, and any endpoint added later that waits on the engine), so a restart can kill
    them.

    Killing one closes its connection (``transport.abort()``: nothing buffered is sent, as
    when a process dies) and cancels its handler, whose clean-up aborts its sequences; the
    handler is cancelled too because an app run without ``handler_cancellation`` would
    otherwise keep waiting for tokens of sequences that no longer exist.
    """

    __middleware_version__ = 1
    """aiohttp's mark of a new-style middleware."""

    def __init__(self, prefixes: Collection[str]) -> None:
        self.prefixes = tuple(prefixes)
        self._requests: dict[int, web.Request] = {}
        """By ``id``: a request is a mutable mapping, not hashable."""

    def __len__(self) -> int:
        return len(self._requests)

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or not request.path.startswith(self.prefixes):
            return await handler(request)
        key = id(request)
        self._requests[key] = request
        try:
            return await handler(request)
        finally:
            self._requests.pop(key, None)

    def kill(self) -> int:
        """Close every tracked request's connection and cancel its handler; returns how many."""
        killed = list(self._requests.values())
        self._requests.clear()
        current = asyncio.current_task()
        for request in killed:
            transport = request.transport
            if transport is not None:
                transport.abort()
            if request.task is not current:
                request.task.cancel()
        return len(killed)
