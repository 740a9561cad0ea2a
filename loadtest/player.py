"""Play a request trace against an OpenAI-compatible server and measure every request.

:func:`play` is an open-loop asyncio client. Each conversation of the trace (format:
:mod:`balancer.trace`) starts at its arrival time whether or not earlier requests have
finished; within a conversation each turn waits for the previous reply, then for the turn's
think time. A request is *due* at its conversation's arrival time (first turn) or when its turn
came, and every latency counts from then, so time spent waiting in the client (for the
concurrency cap, for a busy event loop) is in the figures. Every request streams (``stream:
true`` with ``stream_options.include_usage``) and the SSE body is read line by line as it
arrives, so:

* TTFT is the time from due to the first chunk that carries content (text or reasoning), not
  to the response headers;
* inter-token latency (ITL) is the gap between consecutive content-bearing chunks;
* end-to-end latency (E2E) runs from due to ``data: [DONE]``.

All times come from ``time.perf_counter``. The reply actually received is appended to the
conversation's history (``append`` turns), so later turns carry real histories and prefix caches
see what they would in production.

Bounds: ``duration_s`` stops requests from becoming due at the deadline; requests already due
are still sent, may finish for up to ``grace_s``, and are then recorded as *unfinished* with
their age (see :mod:`loadtest.stats`: they count as failures and in the censored latencies).
``max_requests`` caps the number of requests sent; ``concurrency`` caps requests in flight (the
run reports the peak, so a cap that bound is visible); ``request_timeout_s`` bounds each
request. The run always ends with no task left behind. Request failures (HTTP errors, broken or
truncated streams, timeouts, refused connections) are recorded in the samples with their cause
and end that conversation (there is no reply to append); they are never raised.

Usage::

    records = load_trace("trace.jsonl")
    result = await play(records, "http://127.0.0.1:8080/v1", duration_s=60)
    print(summarize(result, warmup_s=10))

As a command, ``python -m loadtest.player --trace FILE --url URL`` replays a trace against any
OpenAI base URL and writes the table, the summary and the raw samples (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from loadtest.cells import fixed
from loadtest.stats import UNFINISHED, RunResult, Sample, Slo, summarize, write_samples
from loadtest.trace import (
    Conversation,
    TraceError,
    TraceRecord,
    body_kind,
    group_conversations,
    load_trace,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_GRACE_S",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "ENDPOINT_HEADER",
    "POD_HEADER",
    "RunResult",
    "Sample",
    "StreamRecorder",
    "http_error",
    "main",
    "normalize_base_url",
    "play",
    "poisson_arrivals",
    "request_body",
    "summary_text",
]

logger = logging.getLogger(__name__)

ENDPOINT_HEADER = "x-balancer-endpoint"
"""Response header in which the balancer names the upstream it chose."""

POD_HEADER = "x-sim-pod"
"""Response header in which a simulated model server names the pod that served the request."""

DEFAULT_CONCURRENCY = 2048
"""Requests in flight at most. Far above what the published loads reach (a few hundred at the
knee), so it never binds there; it exists so a misconfigured run cannot open sockets without
end. Runs report their peak in flight, and a summary says when the cap bound."""

DEFAULT_REQUEST_TIMEOUT_S = 120.0
"""Per request, headers to ``[DONE]``. A 4k-token reply at 30 tokens/s takes about that long."""

DEFAULT_GRACE_S = 10.0
"""After the deadline, requests already due may finish for this long; then they are recorded
as unfinished with their age."""

ERROR_BODY_MAX = 512
"""Bytes of an error response's body kept in the sample's error message."""


def normalize_base_url(url: str) -> str:
    """The OpenAI base URL for ``url``: ``/v1`` is added when the URL has no path."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"base URL must look like http://host:port[/v1], got {url!r}")
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def random_spread(urls: Sequence[str], seed: int) -> Callable[[str], str] | None:
    """A ``route`` that sends each request to one of ``urls`` at random (seeded): a client
    in front of a fleet of balancer replicas, as behind a Service. None for a single URL."""
    if len(urls) < 2:
        return None
    pick = random.Random(seed).choice

    def route(conversation_id: str) -> str:
        return pick(urls)

    return route


def http_error(status: int, body: bytes) -> str:
    """The error message for a non-200 response: the status and the start of the body."""
    detail = body[:ERROR_BODY_MAX].decode("utf-8", errors="replace").strip()
    return f"HTTP {status}: {detail}" if detail else f"HTTP {status}"


def _conversations(trace: Iterable[TraceRecord] | Iterable[Conversation]) -> list[Conversation]:
    items = list(trace)
    if all(isinstance(item, Conversation) for item in items):
        conversations = [item for item in items if isinstance(item, Conversation)]
        return sorted(conversations, key=lambda c: c.at)
    return group_conversations(item for item in items if isinstance(item, TraceRecord))


def request_body(
    record: TraceRecord,
    messages: list[dict[str, Any]] | None,
    model: str | None,
    max_tokens: int | None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The body to send for ``record``: streaming with usage, overrides applied.

    ``messages`` (chat only) replaces the record's messages, e.g. with the history prepended;
    ``overrides`` sets body fields (``temperature``, ``ignore_eos``...).
    """
    body = dict(record.body)
    if overrides:
        body.update(overrides)
    if messages is not None:
        body["messages"] = messages
    if model is not None:
        body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
        body.pop("max_completion_tokens", None)
    body["stream"] = True
    options = body.get("stream_options")
    body["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return body


class StreamRecorder:
    """Reads an OpenAI event stream line by line into a :class:`Sample`.

    Feed each raw line with the time it arrived; the recorder sets ``ttft_s`` at the first
    content-bearing chunk (counted from ``due``, the moment the request became due, so a wait in
    the client is part of it), appends inter-chunk gaps to ``itl_s``, takes token counts from
    ``usage`` and records in-stream errors. Shared by the asyncio player and the Locust users
    so both measure the same way.
    """

    def __init__(self, sample: Sample, due: float) -> None:
        self.sample = sample
        self.due = due
        """``time.perf_counter()`` when the request became due (closed-loop clients: sent)."""
        self.done = False
        """``data: [DONE]`` has been read."""
        self.chunks = 0
        """Content-bearing chunks so far."""
        self._parts: list[str] = []
        self._last: float | None = None

    @property
    def reply(self) -> str:
        """The text received so far (chat ``delta.content`` or completions ``text``)."""
        return "".join(self._parts)

    def feed(self, line: bytes, now: float) -> None:
        """Account for one SSE line: content timing, usage, errors, the end marker."""
        sample = self.sample
        line = line.strip()
        if not line.startswith(b"data:"):
            return  # blank separators, comments (": ping"), event names
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            sample.fail("stream", f"bad SSE data: {data[:80]!r}")
            return
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            sample.fail("stream", f"stream error: {message}")
            return
        if self._take_content(chunk.get("choices")):
            self.chunks += 1
            if self._last is None:
                sample.ttft_s = now - self.due
            else:
                sample.itl_s.append(now - self._last)
            self._last = now
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._take_usage(usage)

    def finish(self) -> str:
        """Close the account at the end of the stream; returns the reply text.

        A stream that ended without ``[DONE]`` is an error (an upstream failure must not pass
        for a short reply); without ``usage``, output tokens are the content chunks counted.
        """
        if not self.done:
            self.sample.fail("stream", "stream ended before [DONE]")
        if self.sample.output_tokens == 0:
            self.sample.output_tokens = self.chunks
        return self.reply

    def _take_content(self, choices: object) -> bool:
        bearing = False
        if not isinstance(choices, list):
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    self._parts.append(content)
                    bearing = True
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if isinstance(reasoning, str) and reasoning:
                    bearing = True
            text = choice.get("text")
            if isinstance(text, str) and text:
                self._parts.append(text)
                bearing = True
        return bearing

    def _take_usage(self, usage: dict[str, Any]) -> None:
        sample = self.sample
        completion = usage.get("completion_tokens")
        if isinstance(completion, int):
            sample.output_tokens = completion
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int):
            sample.prompt_tokens = prompt
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            sample.cached_tokens = details["cached_tokens"]
        elif isinstance(prompt, int) and sample.cached_tokens is None:
            # Usage without cache details: nothing is known to have been cached.
            sample.cached_tokens = 0


class _Player:
    """One run's state: the session, the bounds and the tasks it started.

    Times are ``time.perf_counter()`` values; a sample's instants count from ``origin``.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        model: str | None,
        max_tokens: int | None,
        max_requests: int | None,
        concurrency: int,
        request_timeout_s: float,
        headers: Mapping[str, str],
        session_header: str | None,
        time_scale: float,
        on_sample: Callable[[Sample], None] | None,
        route: Callable[[str], str] | None = None,
        body_overrides: Mapping[str, Any] | None = None,
        conversation_headers: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        self._session = session
        self._conversation_headers = conversation_headers
        self._base_url = base_url
        self._route = route
        self._model = model
        self._max_tokens = max_tokens
        self._max_requests = max_requests
        self._body_overrides = dict(body_overrides or {})
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._timeout_s = request_timeout_s
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            # A compressed event stream may be buffered by the server's compressor.
            "Accept-Encoding": "identity",
            **headers,
        }
        self._session_header = session_header
        self._time_scale = time_scale
        self._on_sample = on_sample
        self._stop = asyncio.Event()
        self.stopped_by = "trace-end"
        self.samples: list[Sample] = []
        self.active: set[asyncio.Task[None]] = set()
        self.started: list[asyncio.Task[None]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._sent = 0
        self.origin = time.perf_counter()

    def stop(self, reason: str) -> None:
        """No more requests become due; the first reason given is kept."""
        if not self._stop.is_set():
            self.stopped_by = reason
            self._stop.set()

    async def _stopped_by(self, when: float) -> bool:
        """Sleep until ``when`` (perf_counter); True (early) if the run is stopped meanwhile."""
        delay = when - time.perf_counter()
        if self._stop.is_set() or delay <= 0:
            return self._stop.is_set()
        try:
            async with asyncio.timeout(delay):
                await self._stop.wait()
        except TimeoutError:
            return False
        return True

    async def schedule(self, conversations: list[Conversation]) -> None:
        """Start each conversation at its arrival time (open loop).

        The arrival time, not the moment the task got to run, is when its first request is
        due: a late scheduler shows up in the latency instead of shifting the load.
        """
        for conversation in conversations:
            due = self.origin + conversation.at * self._time_scale
            if await self._stopped_by(due):
                return
            task = asyncio.create_task(
                self._conversation(conversation, due),
                name=f"conversation {conversation.conversation_id}",
            )
            self.started.append(task)
            self.active.add(task)
            task.add_done_callback(self.active.discard)

    async def _conversation(self, conversation: Conversation, due: float) -> None:
        history: list[dict[str, Any]] = []
        for index, record in enumerate(conversation.turns):
            if index > 0:
                # The next turn is due a think time after the reply ended.
                due = time.perf_counter() + record.think_s * self._time_scale
                if await self._stopped_by(due):
                    return
            messages: list[dict[str, Any]] | None = None
            if body_kind(record.body) == "chat":
                new = list(record.body["messages"])
                messages = history + new if record.append else new
            reply = await self._turn(conversation.conversation_id, record, messages, due)
            if reply is None:
                return
            if messages is not None:
                history = [*messages, {"role": "assistant", "content": reply}]

    async def _turn(
        self,
        conversation_id: str,
        record: TraceRecord,
        messages: list[dict[str, Any]] | None,
        due: float,
    ) -> str | None:
        """Send one due turn as soon as a slot is free; the reply text, or None if it failed.

        A request that is due counts, sent or not: if the run ends while it waits for a slot
        or streams, it is recorded as unfinished with its age.
        """
        if self._max_requests is not None:
            if self._sent >= self._max_requests:
                self.stop("max-requests")
                return None
            self._sent += 1
            if self._sent >= self._max_requests:
                self.stop("max-requests")
        sample = Sample(conversation_id=conversation_id, turn=record.turn,
                        due_s=due - self.origin)
        try:
            async with self._slots:
                sent = time.perf_counter()
                sample.sent_s = sent - self.origin
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    body = request_body(record, messages, self._model, self._max_tokens,
                                        self._body_overrides)
                    reply = await self._stream(sample, body, due)
                finally:
                    self.in_flight -= 1
        except asyncio.CancelledError:
            sample.fail(UNFINISHED, "unfinished: the run ended" if sample.sent_s is not None
                        else "unfinished: never sent (client concurrency cap)")
            sample.e2e_s = time.perf_counter() - due
            self._record(sample)
            raise
        sample.e2e_s = time.perf_counter() - due
        self._record(sample)
        return reply if sample.ok else None

    def _record(self, sample: Sample) -> None:
        self.samples.append(sample)
        if self._on_sample is not None:
            self._on_sample(sample)

    async def _stream(self, sample: Sample, body: dict[str, Any], due: float) -> str:
        """POST ``body`` and read its event stream into ``sample``; returns the reply text."""
        path = "/chat/completions" if "messages" in body else "/completions"
        headers = dict(self._headers)
        if self._session_header:
            headers[self._session_header] = sample.conversation_id
        if self._conversation_headers is not None:
            headers.update(self._conversation_headers(sample.conversation_id))
        recorder = StreamRecorder(sample, due)
        base_url = self._base_url if self._route is None else self._route(sample.conversation_id)
        sample.target = base_url
        try:
            async with self._session.post(
                base_url + path, json=body, headers=headers, timeout=self._timeout
            ) as response:
                sample.status = response.status
                sample.endpoint = response.headers.get(ENDPOINT_HEADER)
                sample.pod = response.headers.get(POD_HEADER)
                if response.status != 200:
                    text = await response.content.read(ERROR_BODY_MAX)
                    sample.fail("http", http_error(response.status, text))
                    return ""
                while not recorder.done and sample.ok:
                    line = await response.content.readline()
                    if not line:
                        break
                    recorder.feed(line, time.perf_counter())
                if recorder.done and sample.ok:
                    # Read the end of the body (the last chunk after [DONE]): a response left
                    # unfinished closes its connection, so the next request would pay a new
                    # connect and the server would log a client disconnect (balancer: code 499)
                    # for a complete reply. The reply is complete either way.
                    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                        await response.content.read()
        except TimeoutError:
            sample.fail("timeout", f"timeout after {self._timeout_s:g} s")
        except aiohttp.ClientPayloadError as e:
            sample.fail("stream", f"stream broken: {e}")
        except (aiohttp.ClientError, OSError) as e:
            cause = "connect" if sample.status is None else "stream"
            sample.fail(cause, f"{type(e).__name__}: {e}")
        except ValueError as e:  # an SSE line over aiohttp's line limit
            sample.fail("stream", f"bad stream: {e}")
        return recorder.finish() if sample.ok else recorder.reply


async def play(
    trace: Iterable[TraceRecord] | Iterable[Conversation],
    base_url: str,
    *,
    model: str | None = None,
    max_tokens: int | None = None,
    duration_s: float | None = None,
    max_requests: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    grace_s: float = DEFAULT_GRACE_S,
    headers: Mapping[str, str] | None = None,
    session_header: str | None = None,
    time_scale: float = 1.0,
    session: aiohttp.ClientSession | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    route: Callable[[str], str] | None = None,
    body_overrides: Mapping[str, Any] | None = None,
    conversation_headers: Callable[[str], Mapping[str, str]] | None = None,
) -> RunResult:
    """Play ``trace`` against the OpenAI-compatible ``base_url`` and return every sample.

    ``trace``: records (e.g. from :func:`balancer.trace.load_trace` or a generator in
    :mod:`loadtest.workloads`) or conversations. ``base_url``: e.g. ``http://127.0.0.1:8080/v1``
    (``/v1`` is added if the URL has no path). ``model`` and ``max_tokens`` override the
    bodies' values when given; ``body_overrides`` sets further body fields (e.g.
    ``{"temperature": 0, "ignore_eos": True}`` so every contender sees the same outputs).
    ``duration_s``: no request becomes due after it; requests due before it are still sent,
    and those not finished ``grace_s`` later are recorded as unfinished. ``max_requests``: at
    most this many are sent. Without either, the run lasts until the trace is played out.
    ``concurrency``: requests in flight at most (a request due while the cap is reached waits,
    and the wait is in its latency). ``request_timeout_s``: per request. ``headers``: sent
    with every request. ``session_header``: if set, a header of that name carries the
    conversation id (a session key for balancers that hash one). ``time_scale`` multiplies
    arrival and think times (0.5 plays twice as fast). ``session``: reuse a client session (its
    connector limits apply). ``on_sample`` is called with each sample as it completes.
    ``route``: a base URL (with ``/v1``) for each request, given its conversation id,
    overriding ``base_url``: a sticky oracle pins each conversation to one server, a fleet
    picks one of several balancer replicas per request. ``conversation_headers``: more
    headers for each request, given its conversation id (e.g. the zone its client runs in).
    """
    if duration_s is not None and duration_s <= 0:
        raise ValueError("duration_s must be > 0")
    if max_requests is not None and max_requests < 0:
        raise ValueError("max_requests must be >= 0")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if request_timeout_s <= 0 or grace_s < 0 or time_scale < 0:
        raise ValueError("request_timeout_s must be > 0; grace_s and time_scale >= 0")
    conversations = _conversations(trace)
    url = normalize_base_url(base_url)
    own_session = session is None
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=None),
        )
    player = _Player(
        session,
        url,
        model=model,
        max_tokens=max_tokens,
        max_requests=max_requests,
        concurrency=concurrency,
        request_timeout_s=request_timeout_s,
        headers=headers or {},
        session_header=session_header,
        time_scale=time_scale,
        on_sample=on_sample,
        route=route,
        body_overrides=body_overrides,
        conversation_headers=conversation_headers,
    )
    if max_requests == 0:
        player.stop("max-requests")
    started_at = time.time()
    start = player.origin
    deadline = None if duration_s is None else start + duration_s
    scheduler = asyncio.create_task(player.schedule(conversations), name="scheduler")
    window_end: float | None = None
    try:
        await _wait_until_idle(scheduler, player, deadline)
        if not scheduler.done() or player.active:
            player.stop("duration")
            window_end = duration_s
            if player.active:
                await asyncio.wait(set(player.active), timeout=grace_s)
    finally:
        await _cancel_all([scheduler, *player.started])
        if own_session:
            await session.close()
    return RunResult(
        samples=sorted(player.samples, key=lambda s: s.due_s),
        wall_s=time.perf_counter() - start,
        window_end_s=window_end,
        started_at=started_at,
        stopped_by=player.stopped_by,
        concurrency_cap=concurrency,
        peak_in_flight=player.peak_in_flight,
    )


async def _wait_until_idle(
    scheduler: asyncio.Task[None], player: _Player, deadline: float | None
) -> None:
    """Wait until the scheduler and every conversation have finished, or the deadline."""
    while True:
        pending: set[asyncio.Task[None]] = set(player.active)
        if not scheduler.done():
            pending.add(scheduler)
        if not pending:
            return
        timeout = None if deadline is None else deadline - time.perf_counter()
        if timeout is not None and timeout <= 0:
            return
        await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel what still runs, wait for everything, and re-raise the first real failure."""
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, Exception)]
    for failure in failures[1:]:
        logger.error("load player task failed", exc_info=failure)
    if failures:
        raise failures[0]


# -- command line ------------------------------------------------------------------------------


def poisson_arrivals(
    conversations: Sequence[Conversation], rate: float, seed: int
) -> list[Conversation]:
    """The same conversations, arriving as a Poisson process of ``rate`` per second (seeded),
    in their original order."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(seed)
    at = 0.0
    out = []
    for conversation in conversations:
        out.append(dataclasses.replace(conversation, at=at))
        at += rng.expovariate(rate)
    return out


def summary_text(summary: Mapping[str, Any]) -> str:
    """A run's summary as a short markdown report: the accounting, then the figures."""

    def s(key: str, digits: int = 3) -> str:
        return fixed(summary.get(key), digits)

    causes = ", ".join(f"{c} {n}" for c, n in summary["failed_by"].items()) or "none"
    lines = [
        f"window: {summary['window_s']:.1f} s after a {summary['warmup_s']:g} s warm-up; "
        f"requests by due time",
        "",
        "| offered | sent | completed | failed | unfinished | TTFT p50 (s) | TTFT p90 (s) "
        "| TTFT p99 (s) | TTFT p99 censored (s) | ITL p50 (s) | ITL p99 (s) | E2E p50 (s) "
        "| E2E p99 (s) | req/s | output tok/s | goodput (req/s) | cached prompt share |",
        "|" + "---|" * 17,
        f"| {summary['offered']} | {summary['sent']} | {summary['completed']} "
        f"| {summary['failed']} | {summary['unfinished']} | {s('ttft_p50_s')} "
        f"| {s('ttft_p90_s')} | {s('ttft_p99_s')} | ≥ {s('ttft_p99_censored_s')} "
        f"| {s('itl_p50_s')} | {s('itl_p99_s')} | {s('e2e_p50_s')} | {s('e2e_p99_s')} "
        f"| {s('requests_per_s', 2)} | {s('output_tokens_per_s', 0)} "
        f"| {s('goodput_per_s', 2)} | {s('cached_token_share')} |",
        "",
        f"failures by cause: {causes}; client wait p99 {s('wait_p99_s')} s; peak in flight "
        f"{summary['peak_in_flight']} of a cap of {summary['concurrency_cap']}"
        + (" (the cap bound: raise --concurrency)" if summary["cap_bound"] else ""),
        f"SLO for goodput: TTFT ≤ {summary['slo']['ttft_s']:g} s, mean ITL ≤ "
        f"{summary['slo']['itl_s']:g} s",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.player",
        description="Replay a trace open-loop against an OpenAI-compatible base URL and write "
                    "a table, a summary and every request's sample.",
    )
    parser.add_argument("--trace", required=True, help="JSONL trace (format: balancer/trace.py)")
    parser.add_argument("--url", required=True, action="append",
                        help="OpenAI base URL: a balancer, a Service, a model server; give it "
                             "more than once to send each request to one of them at random "
                             "(a fleet of sidecars, or a client-side spread)")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--rate-scale", type=float, default=1.0,
                        help="multiply the trace's arrival rate (and think times' pace) by X: "
                             "2 plays twice as fast (default: 1, the trace's timestamps)")
    timing.add_argument("--rate", type=float, default=None,
                        help="ignore the trace's arrival times: conversations arrive as a "
                             "Poisson process of this many per second")
    parser.add_argument("--seed", type=int, default=1, help="seed of --rate arrivals")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds in which requests become due (default: the whole trace)")
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="seconds at the start left out of the statistics")
    parser.add_argument("--cooldown", type=float, default=0.0,
                        help="seconds at the end left out of the statistics (with --duration)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help="seconds requests may finish after --duration (default: "
                             "%(default)s)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="requests in flight at most (default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="seconds per request (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model to send (default: the bodies')")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None,
                        help="set every body's temperature (0: identical outputs everywhere)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos: true (vLLM), so replies run to max_tokens")
    parser.add_argument("--session-header", default=None,
                        help="send each conversation's id in this header (e.g. x-session-id)")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                        help="extra request header, e.g. 'Authorization: Bearer ...'")
    Slo.add_arguments(parser)
    parser.add_argument("--out", default="results/player", help="output directory")
    return parser


def _headers(items: Sequence[str]) -> dict[str, str]:
    headers = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"--header {item!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    return headers


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate_scale <= 0:
        raise SystemExit("--rate-scale must be > 0")
    if args.duration is None and args.cooldown:
        raise SystemExit("--cooldown needs --duration")
    try:
        conversations = group_conversations(load_trace(args.trace))
    except (TraceError, OSError) as e:
        raise SystemExit(f"cannot use the trace:\n{e}") from e
    if args.rate is not None:
        conversations = poisson_arrivals(conversations, args.rate, args.seed)
    overrides: dict[str, Any] = {}
    if args.temperature is not None:
        overrides["temperature"] = args.temperature
    if args.ignore_eos:
        overrides["ignore_eos"] = True
    slo = Slo.from_arguments(args)
    urls = [normalize_base_url(url) for url in args.url]
    route = random_spread(urls, args.seed)
    async def run() -> RunResult:
        return await play(
            conversations, urls[0], route=route, model=args.model, max_tokens=args.max_tokens,
            duration_s=args.duration, max_requests=args.max_requests,
            concurrency=args.concurrency, request_timeout_s=args.request_timeout,
            grace_s=args.grace, headers=_headers(args.header),
            session_header=args.session_header, time_scale=1.0 / args.rate_scale,
            body_overrides=overrides)

    import uvloop

    from loadtest.procs import raise_fd_limit

    raise_fd_limit()
    try:
        result = uvloop.run(run())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    summary = summarize(result, warmup_s=args.warmup, cooldown_s=args.cooldown, slo=slo)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = summary_text(summary)
    (out / "summary.md").write_text(
        f"# Trace replay\n\n`python -m loadtest.player {' '.join(argv or sys.argv[1:])}`\n\n"
        f"{text}\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        write_samples(result.samples, f)
    print(text)
    print(f"written: {out / 'summary.md'}, {out / 'summary.json'}, {out / 'samples.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
