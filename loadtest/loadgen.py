"""The proxy benchmark's requests and its two built-in load generators.

:mod:`loadtest.bench_proxy` sends the same requests everywhere: OpenAI chat bodies with
distinct first messages (:func:`chat_bodies`), so a proxy hashes real routing keys. Two
generators send them, one per question:

* **How many requests per second can it take?** A *closed loop* (:func:`closed_loop`):
  keep-alive connections that each send the next request as soon as the last answer is in,
  what wrk does. This is the fallback when wrk is not installed: it writes prebuilt HTTP/1.1
  requests over asyncio streams and reads the answers with a minimal parser, because any
  per-request cost in the generator is CPU the proxy under test does not get.
* **What latency does it add at a given rate?** An *open loop* (:func:`open_loop`): requests
  go out on a fixed schedule whether or not earlier ones have finished, so a slow target
  cannot slow the arrivals and hide its own latency. Each one is a :class:`RoundTrip`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from loadtest.bench_upstream import CHAT_PATH
from loadtest.procs import HOST

__all__ = [
    "BODY_VARIANTS",
    "REQUEST_TIMEOUT_S",
    "ClosedLoopStats",
    "RoundTrip",
    "chat_bodies",
    "closed_loop",
    "open_loop",
    "raw_requests",
]

BODY_VARIANTS: Final = 64
"""Distinct request bodies (distinct first user messages, so distinct routing keys)."""
REQUEST_TIMEOUT_S: Final = 10.0
"""Per request: the upstream double answers in well under a millisecond, so a request this
slow is an error, not a measurement."""
JSON_HEADERS: Final = {"Content-Type": "application/json"}


def chat_bodies(model: str, *, stream: bool, max_tokens: int,
                n: int = BODY_VARIANTS) -> list[bytes]:
    """OpenAI chat bodies with distinct first user messages, so the proxy hashes real keys."""
    bodies = []
    for i in range(n):
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user",
                 "content": f"Conversation {i}: in one sentence, what does a load balancer do?"},
            ],
            "max_tokens": max_tokens,
        }
        if stream:
            body["stream"] = True
        bodies.append(json.dumps(body).encode())
    return bodies


# -- closed loop: raw HTTP/1.1 over asyncio streams -------------------------------------------


def raw_requests(bodies: Sequence[bytes], port: int) -> list[bytes]:
    """Whole HTTP/1.1 requests, built once, so sending one costs a single write."""
    return [
        (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        + body
        for body in bodies
    ]


@dataclass
class ClosedLoopStats:
    """What a closed-loop run measured: each answer's latency (seconds) and the failures."""

    latencies: list[float] = field(default_factory=list)
    non_2xx: int = 0
    """Answers with a status outside 200-399."""
    errors: int = 0
    """Requests with no complete answer: connection refused or reset, timeout, bad framing."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response whole; (status, server keeps the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    keep = b"\r\nconnection: close" not in lower
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
    if m:
        await reader.readexactly(int(m.group(1)))
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the empty line after (no trailers)
                break
            await reader.readexactly(size + 2)
    else:
        await reader.read()
        keep = False
    return status, keep


async def _closed_loop_connection(port: int, requests: Sequence[bytes], deadline: float,
                                  offset: int, stats: ClosedLoopStats | None) -> None:
    loop = asyncio.get_running_loop()
    i = offset
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    try:
        while loop.time() < deadline:
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                started = time.perf_counter()
                writer.write(requests[i % len(requests)])
                i += 1
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, keep = await _read_response(reader)
                if stats is not None:
                    stats.latencies.append(time.perf_counter() - started)
                    if not 200 <= status < 400:
                        stats.non_2xx += 1
                if not keep:
                    writer.close()
                    writer = reader = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError, ValueError):
                if stats is not None:
                    stats.errors += 1
                if writer is not None:
                    writer.close()
                writer = reader = None
                await asyncio.sleep(0.01)
    finally:
        if writer is not None:
            writer.close()


async def closed_loop(port: int, requests: Sequence[bytes], connections: int,
                      seconds: float, measure: bool) -> ClosedLoopStats:
    """``connections`` keep-alive connections to ``127.0.0.1:PORT``, each sending its next
    request as soon as the previous answer is complete (what wrk does), for ``seconds``.
    With ``measure`` false (a warm-up) nothing is recorded."""
    stats = ClosedLoopStats()
    deadline = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(
        _closed_loop_connection(port, requests, deadline, k * 7, stats if measure else None)
        for k in range(connections)
    ))
    return stats


# -- open loop: aiohttp at a fixed rate -------------------------------------------------------


@dataclass
class RoundTrip:
    """One request's trip through a proxy and back, timed from the moment it was sent.

    Not :class:`loadtest.stats.Sample`, which is a turn of a simulated conversation timed from
    when it was *due*, so that a client's queue counts against the system, with tokens and
    failure causes. Here the question is what a proxy adds on the wire: the request is timed
    from its send, the client's own lateness (``lag``) is kept apart so it can be checked, and
    there are no tokens, conversations or causes, only whether the answer was whole.
    """

    first_event: float | None
    """Seconds to the first complete SSE ``data:`` event (to the whole answer when not
    streaming); None if the request failed."""
    end: float | None
    """Seconds to the answer's last byte; None if the request failed."""
    lag: float
    """Seconds the client sent it after its scheduled time (the generator's own delay)."""
    error: str | None = None


async def _timed_request(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool,
                         lag: float) -> RoundTrip:
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS) as response:
            if not stream:
                await response.read()
                end = time.perf_counter() - started
                error = None if response.status == 200 else f"HTTP {response.status}"
                return RoundTrip(end, end, lag, error)
            first: float | None = None
            head = b""
            tail = b""
            async for chunk in response.content.iter_any():
                if first is None:
                    head += chunk
                    if head.startswith(b"data: ") and b"\n\n" in head:
                        first = time.perf_counter() - started
                tail = (tail + chunk)[-32:]
            end = time.perf_counter() - started
            error = None
            if response.status != 200:
                error = f"HTTP {response.status}"
            elif not tail.endswith(b"data: [DONE]\n\n"):
                error = "stream ended without [DONE]"
            return RoundTrip(first, end, lag, error)
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return RoundTrip(None, None, lag, f"{type(e).__name__}: {e}"[:200])


async def open_loop(session: aiohttp.ClientSession, url: str, bodies: Sequence[bytes],
                    stream: bool, rate: float, count: int, offset: int = 0) -> list[RoundTrip]:
    """Send ``count`` requests at ``rate`` per second on a fixed schedule, each in its own task,
    whether or not earlier ones have finished (open loop: a slow target cannot slow the
    arrivals and hide its own latency). ``lag`` records how late the client itself was."""
    tasks: list[asyncio.Task[RoundTrip]] = []
    # perf_counter, not loop.time(): uvloop's clock only moves in whole milliseconds.
    t0 = time.perf_counter() + 0.01
    for i in range(count):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = bodies[(offset + i) % len(bodies)]
        lag = max(0.0, time.perf_counter() - due)
        tasks.append(asyncio.create_task(_timed_request(session, url, body, stream, lag)))
    return list(await asyncio.gather(*tasks))
