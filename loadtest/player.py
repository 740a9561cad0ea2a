"""Play a request trace against an OpenAI-compatible server and measure every request.

:func:`play` is an open-loop asyncio client. Each conversation of the trace (format:
:mod:`loadtest.trace`) starts at its arrival time whether or not earlier requests have
finished; within a conversation each turn waits for the previous reply, then for the turn's
think time. Every request streams (``stream: true`` with ``stream_options.include_usage``) and
the SSE body is read line by line as it arrives, so:

* TTFT is the time from sending the request to the first chunk that carries content (text or
  reasoning), not to the response headers;
* inter-token latency (ITL) is the gap between consecutive content-bearing chunks;
* end-to-end latency (E2E) runs to ``data: [DONE]``.

All times come from ``time.perf_counter``. The reply actually received is appended to the
conversation's history (``append`` turns), so later turns carry real histories and prefix caches
see what they would in production.

Bounds: ``duration_s`` stops starting requests at the deadline, lets requests in flight finish
for up to ``grace_s`` and then cancels them (recorded as cancelled, not as errors);
``max_requests`` caps the number of requests sent; ``concurrency`` caps requests in flight
(further requests queue, and the wait is recorded as ``queue_s``); ``request_timeout_s`` bounds
each request. The run always ends with no task left behind. Request failures (HTTP errors,
broken or truncated streams, timeouts, refused connections) are recorded in the samples and end
that conversation (there is no reply to append); they are never raised.

Usage::

    records = load_trace("trace.jsonl")
    result = await play(records, "http://127.0.0.1:8080/v1", duration_s=60)
    print(summarize(result))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from loadtest.stats import RunResult, Sample
from loadtest.trace import Conversation, TraceRecord, body_kind, group_conversations

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
    "normalize_base_url",
    "play",
    "request_body",
]

logger = logging.getLogger(__name__)

ENDPOINT_HEADER = "x-balancer-endpoint"
"""Response header in which the balancer names the upstream it chose."""

POD_HEADER = "x-sim-pod"
"""Response header in which a simulated model server names the pod that served the request."""

DEFAULT_CONCURRENCY = 256
"""Requests in flight at most. High enough that a demo run stays open-loop; it exists so a
misconfigured run cannot open thousands of sockets."""

DEFAULT_REQUEST_TIMEOUT_S = 120.0
"""Per request, headers to ``[DONE]``. A 4k-token reply at 30 tokens/s takes about that long."""

DEFAULT_GRACE_S = 10.0
"""After the deadline, requests in flight may finish for this long. Cutting them off at once
would drop the slowest requests from the latency figures."""

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
) -> dict[str, Any]:
    """The body to send for ``record``: streaming with usage, overrides applied.

    ``messages`` (chat only) replaces the record's messages, e.g. with the history prepended.
    """
    body = dict(record.body)
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
    content-bearing chunk, appends inter-chunk gaps to ``itl_s``, takes token counts from
    ``usage`` and records in-stream errors. Shared by the asyncio player and the Locust users
    so both measure the same way.
    """

    def __init__(self, sample: Sample, sent: float) -> None:
        self.sample = sample
        self.sent = sent
        """``time.perf_counter()`` when the request was sent."""
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
            sample.error = f"bad SSE data: {data[:80]!r}"
            return
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            sample.error = f"stream error: {message}"
            return
        if self._take_content(chunk.get("choices")):
            self.chunks += 1
            if self._last is None:
                sample.ttft_s = now - self.sent
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
        if self.sample.error is None and not self.done:
            self.sample.error = "stream ended before [DONE]"
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
    """One run's state: the session, the bounds and the tasks it started."""

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
    ) -> None:
        self._session = session
        self._base_url = base_url
        self._route = route
        self._model = model
        self._max_tokens = max_tokens
        self._max_requests = max_requests
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
        self._sent = 0
        self._origin = 0.0

    def stop(self, reason: str) -> None:
        """Start no more requests; the first reason given is kept."""
        if not self._stop.is_set():
            self.stopped_by = reason
            self._stop.set()

    async def _stopped_within(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True (early) if the run is stopped meanwhile."""
        if self._stop.is_set() or delay <= 0:
            return self._stop.is_set()
        try:
            async with asyncio.timeout(delay):
                await self._stop.wait()
        except TimeoutError:
            return False
        return True

    async def schedule(self, conversations: list[Conversation]) -> None:
        """Start each conversation at its arrival time (open loop)."""
        loop = asyncio.get_running_loop()
        self._origin = time.perf_counter()
        start = loop.time()
        for conversation in conversations:
            delay = start + conversation.at * self._time_scale - loop.time()
            if await self._stopped_within(delay):
                return
            task = asyncio.create_task(
                self._conversation(conversation),
                name=f"conversation {conversation.conversation_id}",
            )
            self.started.append(task)
            self.active.add(task)
            task.add_done_callback(self.active.discard)

    async def _conversation(self, conversation: Conversation) -> None:
        history: list[dict[str, Any]] = []
        for index, record in enumerate(conversation.turns):
            think = record.think_s * self._time_scale if index > 0 else 0.0
            if await self._stopped_within(think):
                return
            messages: list[dict[str, Any]] | None = None
            if body_kind(record.body) == "chat":
                new = list(record.body["messages"])
                messages = history + new if record.append else new
            reply = await self._turn(conversation.conversation_id, record, messages)
            if reply is None:
                return
            if messages is not None:
                history = [*messages, {"role": "assistant", "content": reply}]

    async def _turn(
        self, conversation_id: str, record: TraceRecord, messages: list[dict[str, Any]] | None
    ) -> str | None:
        """Send one turn when a slot is free; the reply text, or None if not sent or failed."""
        queued = time.perf_counter()
        async with self._slots:
            if self._stop.is_set():
                return None
            if self._max_requests is not None:
                if self._sent >= self._max_requests:
                    self.stop("max-requests")
                    return None
                self._sent += 1
                if self._sent >= self._max_requests:
                    self.stop("max-requests")
            sent = time.perf_counter()
            sample = Sample(
                conversation_id=conversation_id,
                turn=record.turn,
                start_s=sent - self._origin,
                queue_s=sent - queued,
            )
            body = request_body(record, messages, self._model, self._max_tokens)
            try:
                reply = await self._stream(sample, body, sent)
            except asyncio.CancelledError:
                sample.cancelled = True
                sample.error = "cancelled: the run ended"
                sample.e2e_s = time.perf_counter() - sent
                self._record(sample)
                raise
            sample.e2e_s = time.perf_counter() - sent
            self._record(sample)
            return reply if sample.error is None else None

    def _record(self, sample: Sample) -> None:
        self.samples.append(sample)
        if self._on_sample is not None:
            self._on_sample(sample)

    async def _stream(self, sample: Sample, body: dict[str, Any], sent: float) -> str:
        """POST ``body`` and read its event stream into ``sample``; returns the reply text."""
        path = "/chat/completions" if "messages" in body else "/completions"
        headers = dict(self._headers)
        if self._session_header:
            headers[self._session_header] = sample.conversation_id
        recorder = StreamRecorder(sample, sent)
        base_url = self._base_url if self._route is None else self._route(sample.conversation_id)
        try:
            async with self._session.post(
                base_url + path, json=body, headers=headers, timeout=self._timeout
            ) as response:
                sample.status = response.status
                sample.endpoint = response.headers.get(ENDPOINT_HEADER)
                sample.pod = response.headers.get(POD_HEADER)
                if response.status != 200:
                    text = await response.content.read(ERROR_BODY_MAX)
                    sample.error = http_error(response.status, text)
                    return ""
                while not recorder.done and sample.error is None:
                    line = await response.content.readline()
                    if not line:
                        break
                    recorder.feed(line, time.perf_counter())
                if recorder.done and sample.error is None:
                    # Read the end of the body (the last chunk after [DONE]): a response left
                    # unfinished closes its connection, so the next request would pay a new
                    # connect and the server would log a client disconnect (balancer: code 499)
                    # for a complete reply. The reply is complete either way.
                    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                        await response.content.read()
        except TimeoutError:
            sample.error = f"timeout after {self._timeout_s:g} s"
        except aiohttp.ClientPayloadError as e:
            sample.error = f"stream broken: {e}"
        except (aiohttp.ClientError, OSError) as e:
            sample.error = f"{type(e).__name__}: {e}"
        except ValueError as e:  # an SSE line over aiohttp's line limit
            sample.error = f"bad stream: {e}"
        return recorder.finish()


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
) -> RunResult:
    """Play ``trace`` against the OpenAI-compatible ``base_url`` and return every sample.

    ``trace``: records (e.g. from :func:`loadtest.trace.load_trace` or a generator in
    :mod:`loadtest.workloads`) or conversations. ``base_url``: e.g. ``http://127.0.0.1:8080/v1``
    (``/v1`` is added if the URL has no path). ``model`` and ``max_tokens`` override the
    bodies' values when given. ``duration_s``: no request starts after it; requests in flight
    get ``grace_s`` more, then are cancelled. ``max_requests``: at most this many are sent.
    Without either, the run lasts until the trace is played out. ``concurrency``: requests in
    flight at most. ``request_timeout_s``: per request. ``headers``: sent with every request.
    ``session_header``: if set, a header of that name carries the conversation id (a session
    key for balancers that hash one). ``time_scale`` multiplies arrival and think times (0.5
    plays twice as fast). ``session``: reuse a client session (its connector limits apply).
    ``on_sample`` is called with each sample as it completes. ``route``: a base URL per
    conversation id (with ``/v1``), overriding ``base_url``; a sticky oracle uses it to pin
    each conversation to one server.
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
    )
    if max_requests == 0:
        player.stop("max-requests")
    started_at = time.time()
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    deadline = None if duration_s is None else loop.time() + duration_s
    scheduler = asyncio.create_task(player.schedule(conversations), name="scheduler")
    try:
        await _wait_until_idle(scheduler, player, deadline)
        if not scheduler.done() or player.active:
            player.stop("duration")
            if player.active:
                await asyncio.wait(set(player.active), timeout=grace_s)
    finally:
        await _cancel_all([scheduler, *player.started])
        if own_session:
            await session.close()
    return RunResult(
        samples=sorted(player.samples, key=lambda s: s.start_s),
        wall_s=time.perf_counter() - start,
        started_at=started_at,
        stopped_by=player.stopped_by,
    )


async def _wait_until_idle(
    scheduler: asyncio.Task[None], player: _Player, deadline: float | None
) -> None:
    """Wait until the scheduler and every conversation have finished, or the deadline."""
    loop = asyncio.get_running_loop()
    while True:
        pending: set[asyncio.Task[None]] = set(player.active)
        if not scheduler.done():
            pending.add(scheduler)
        if not pending:
            return
        timeout = None if deadline is None else deadline - loop.time()
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
