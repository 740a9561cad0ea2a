"""HTTP front end of a simulated pod: OpenAI- and vLLM-compatible endpoints over aiohttp.

One :func:`build_app` is one pod: its own engine, driver, faults, metrics registry and counters,
all reachable from the app under :data:`POD_KEY`. :func:`run_pods` hosts several pods in one
process, each on its own port.

Endpoints:

* ``POST /v1/chat/completions``, ``POST /v1/completions``: streamed (SSE) or not;
* ``POST /tokenize``: vLLM's tokenizer endpoint, with pseudo-token ids;
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (vLLM's names, SGLang's, or none);
* ``GET /stats``, ``POST /stats/reset``: counters for benchmarks;
* ``GET /sim/faults``, ``POST /sim/faults``: read or change fault injection live;
* ``POST /sim/restart``: kill and restart the pod (see :mod:`.restart`).

Replies follow the request's sampling fields, as a model's would: without ``temperature`` (or
with 0) a prompt always gets the same reply (greedy decoding); with a ``seed`` the reply is
fixed by the prompt and the seed; with ``temperature`` > 0 and no seed each request gets a
reply of its own, drawn from the pod's own RNG (seeded by its fault seed, so a run replayed in
the same request order gets the same replies). Only the words differ: a reply's length is
``max_tokens`` either way. (The OpenAI API's default temperature is 1; the simulator takes a
missing one as greedy so that plain replays are reproducible.) A chat request's ``tools`` are
rendered into its prompt after the system message (:func:`.text.render_chat`).

Every response carries ``x-sim-pod: <pod name>``. A non-streamed completion whose request asks
for an ORCA load report (``endpoint-load-metrics-format: text|json``) carries
``endpoint-load-metrics``, as vLLM's does (see :mod:`.orca`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import statistics
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .config import CLIENT_ZONE_HEADER, SimConfig
from .driver import EngineDriver, Submission
from .engine import Engine, EngineError, TokenOutput
from .engine import Sequence as EngineSequence
from .faults import RETRY_AFTER_STATUSES, Fate, FaultConfigError, FaultInjector
from .metrics import SimMetrics
from .orca import FORMAT_HEADER, REPORT_HEADER, load_report, named_metrics
from .responses import RESPONSES_KEY
from .responses import add_routes as add_responses
from .restart import InFlight, RestartError, parse_down
from .text import (
    PromptError,
    render_chat,
    render_completion_prompts,
    sampled_seed,
    token_ids,
)

log = logging.getLogger(__name__)

POD_HEADER = "x-sim-pod"
"""Response header naming the pod that answered."""

CRASH_EXIT_STATUS = 137
"""Exit status of a simulated crash: what a runtime reports for a process killed by SIGKILL."""

KILLED_PREFIXES = ("/v1/",)
"""POST requests under these paths are a model's work, which a restart kills."""

SAMPLE_LIMIT = 200_000
"""Latency samples kept for ``/stats`` percentiles (the oldest are dropped beyond this)."""

Kind = Literal["chat", "text"]


class ApiError(Exception):
    """An error answered with an OpenAI-shaped JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        err_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.code,
            }
        }
        return web.json_response(body, status=self.status, headers=self.headers)


def _injected_error(status: int, retry_after: int, message: str) -> ApiError:
    err_type = {429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
    headers = {"Retry-After": str(retry_after)} if status in RETRY_AFTER_STATUSES else {}
    return ApiError(status, message, err_type=err_type, headers=headers)


@dataclass(slots=True)
class ServerCounters:
    """Request counters of the HTTP front end (reset by ``POST /stats/reset``)."""

    requests_received: int = 0
    """Completion requests received, whatever became of them."""
    requests_served: int = 0
    """Completion requests answered in full."""
    requests_rejected: int = 0
    """Completion requests refused as invalid (400 or 404)."""
    requests_disconnected: int = 0
    """Completion requests whose client went away before the end; their sequences were aborted."""
    injected_errors: int = 0
    injected_hangs: int = 0
    client_zone_requests: int = 0
    """Completion requests that named their client's zone (``x-sim-client-zone``)."""
    cross_zone_requests: int = 0
    """Of those, requests from another zone than the pod's (each paid ``cross_zone_rtt``)."""
    slow_start_rejections: int = 0
    """Completion requests refused with 503 while starting (slow start, or down after a
    restart)."""
    restarts: int = 0
    """Restarts (``POST /sim/restart``)."""
    requests_killed: int = 0
    """Model requests in flight whose connection a restart closed (completions' handlers, being
    cancelled, count in `requests_disconnected` too)."""
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLE_LIMIT))
    e2e_s: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLE_LIMIT))


def _summary(samples: Sequence[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "count": len(ordered),
        "mean": statistics.fmean(ordered),
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": ordered[-1],
    }


class SimPod:
    """State of one simulated pod."""

    def __init__(self, config: SimConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.name = config.name or "sim"
        """Pod name; :func:`run_pods` sets ``sim-<port>`` when the config names none."""
        self.models = config.models
        self.clock = clock
        self.engine = Engine(config.engine)
        self.engine.latency_multiplier = config.faults.latency_multiplier
        self.metrics = SimMetrics(
            self.engine, config.models[0], CollectorRegistry(), config.metrics_flavor
        )
        self.driver = EngineDriver(
            self.engine, config.time_scale, clock=clock, listener=self._on_token
        )
        self.driver.host_cpu_s = config.faults.host_cpu_ms / 1000.0
        self.faults = FaultInjector(config.faults, clock())
        self.counters = ServerCounters()
        self.started_at = clock()
        self.stats_since = clock()
        self.sampler = random.Random(f"replies:{config.faults.seed}")
        """Draws the reply seeds of sampled requests (``temperature`` > 0, no ``seed``)."""
        self.in_flight = InFlight(KILLED_PREFIXES)
        """The model requests in flight (the app's middleware), for a restart to kill."""

    def start(self) -> None:
        """Mark the pod as started now (slow start counts from here)."""
        self.started_at = self.stats_since = self.faults.started_at = self.clock()

    def _on_token(self, token: TokenOutput) -> None:
        seq = token.seq
        if token.first and seq.first_token_ms is not None:
            ttft = self.driver.wall_seconds(seq.first_token_ms - seq.arrival_ms)
            self.metrics.ttft.observe(ttft)
            self.counters.ttft_s.append(ttft)
        if token.finished and seq.finish_ms is not None:
            e2e = self.driver.wall_seconds(seq.finish_ms - seq.arrival_ms)
            self.metrics.e2e.observe(e2e)
            self.counters.e2e_s.append(e2e)

    def reply_seeds(self, req: CompletionRequest) -> list[int | None]:
        """The seed of each prompt's reply: None (the prompt's own reply) when greedy."""
        if req.temperature == 0 or (req.temperature is None and req.seed is None):
            return [None] * len(req.prompts)
        if req.seed is not None:
            return [sampled_seed(prompt, req.seed) for prompt in req.prompts]
        return [self.sampler.getrandbits(64) for _ in req.prompts]

    def load_report_headers(self, request: web.Request, *, stream: bool) -> dict[str, str]:
        """The ORCA load report `request` asks for, as response headers, read from the engine
        now; empty if it asks for none, in a format not supported, or this pod does not
        report (on this kind of answer)."""
        metrics_format = request.headers.get(FORMAT_HEADER)
        config = self.config
        if not metrics_format or not config.orca or (stream and not config.orca_streams):
            return {}
        report = load_report(
            metrics_format, named_metrics(self.engine, running=config.orca_running)
        )
        return {REPORT_HEADER: report} if report is not None else {}

    def update_faults(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        config = self.faults.update(changes, self.clock())
        self.engine.latency_multiplier = config.latency_multiplier
        self.driver.host_cpu_s = config.host_cpu_ms / 1000.0
        return config.to_json()

    def restart(self, down: float) -> dict[str, Any]:
        """Kill the pod's work and empty its cache now, and refuse service for `down` seconds
        (plus the configured slow start): a restarted process (see :mod:`.restart`)."""
        now = self.clock()
        killed = self.in_flight.kill()
        aborted = self.driver.abort_all()
        self.engine.clear_cache()
        serving_in = self.faults.restart(now, down)
        self.started_at = now
        self.counters.restarts += 1
        self.counters.requests_killed += killed
        log.warning(
            "%s: restarted (simulated): %d requests killed, %d sequences aborted, cache emptied,"
            " serving again in %.3g s",
            self.name, killed, aborted, serving_in,
        )
        return {
            "pod": self.name,
            "requests_killed": killed,
            "sequences_aborted": aborted,
            "down_s": down,
            "serving_in_s": serving_in,
            "restarts": self.counters.restarts,
        }

    def stats(self) -> dict[str, Any]:
        """The ``/stats`` document."""
        engine, counters, cache = self.engine, self.counters, self.engine.cache
        window = engine.stats()
        now = self.clock()
        elapsed = now - self.stats_since
        busy_s = self.driver.wall_seconds(window.busy_ms)
        queries = window.prefix_cache_queries
        return {
            "pod": self.name,
            "models": list(self.models),
            "time_scale": self.config.time_scale,
            "uptime_s": now - self.started_at,
            "since_reset_s": elapsed,
            "requests_received": counters.requests_received,
            "requests_served": counters.requests_served,
            "requests_finished": window.requests_finished,
            "requests_running": engine.num_running,
            "requests_waiting": engine.num_waiting,
            "requests_aborted": window.requests_aborted,
            "requests_rejected": counters.requests_rejected,
            "requests_disconnected": counters.requests_disconnected,
            "injected_errors": counters.injected_errors,
            "injected_hangs": counters.injected_hangs,
            "slow_start_rejections": counters.slow_start_rejections,
            "zone": self.config.zone,
            "client_zone_requests": counters.client_zone_requests,
            "cross_zone_requests": counters.cross_zone_requests,
            "restarts": counters.restarts,
            "requests_killed": counters.requests_killed,
            "prompt_tokens": window.prompt_tokens,
            "cached_tokens": window.prefix_cache_hits,
            "prefill_tokens": window.prefill_tokens,
            "generation_tokens": window.generation_tokens,
            "preemptions": window.preemptions,
            "recomputed_tokens": window.recomputed_tokens,
            "prefix_cache_queries": queries,
            "prefix_cache_hits": window.prefix_cache_hits,
            "hit_rate": window.prefix_cache_hits / queries if queries else 0.0,
            "kv_usage": engine.kv_usage,
            "kv_blocks_total": cache.capacity,
            "kv_blocks_used": cache.used_blocks,
            "kv_blocks_cached": cache.cached_blocks,
            "kv_evictions_total": cache.evictions,
            "peak_running": engine.peak_running,
            "peak_waiting": engine.peak_waiting,
            "steps": window.steps,
            "busy_s": busy_s,
            "busy_fraction": min(1.0, busy_s / elapsed) if elapsed > 0 else 0.0,
            "ttft_s": _summary(counters.ttft_s),
            "e2e_s": _summary(counters.e2e_s),
            "clock_resets": self.driver.clock_resets,
            "clock_paused_s": self.driver.paused_s,
            "starting": self.faults.starting(now),
            "faults": self.faults.config.to_json(),
        }

    def reset_stats(self) -> None:
        """Zero the counters (not the cache, not the work in progress)."""
        self.engine.reset_stats()
        self.counters = ServerCounters()
        self.stats_since = self.clock()


POD_KEY = web.AppKey("sim_pod", SimPod)
"""The app's :class:`SimPod`."""


# -- request parsing --------------------------------------------------------------------------


async def _read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _model(pod: SimPod, body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", param="model")
    if model not in pod.models:
        raise ApiError(
            404,
            f"The model `{model}` does not exist. Served models: {', '.join(pod.models)}",
            code="model_not_found",
            param="model",
        )
    return model


def _int_field(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", param=name)
    if value < 1:
        raise ApiError(400, f"'{name}' must be at least 1", param=name)
    return value


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A parsed chat or text completion request."""

    kind: Kind
    model: str
    prompts: list[str]
    max_tokens: int
    stream: bool
    include_usage: bool
    temperature: float | None = None
    """The request's ``temperature``; None when it sends none."""
    seed: int | None = None
    """The request's sampling ``seed``; None when it sends none."""


SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds vLLM accepts: a signed 64-bit integer."""


def _sampling(body: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """The request's ``temperature`` and ``seed``, checked."""
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not temperature >= 0
    ):
        raise ApiError(400, "'temperature' must be a number >= 0", param="temperature")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool)
        or not isinstance(seed, int)
        or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]
    ):
        raise ApiError(400, "'seed' must be a 64-bit integer", param="seed")
    return (None if temperature is None else float(temperature)), seed


def _parse_completion(pod: SimPod, kind: Kind, body: Mapping[str, Any]) -> CompletionRequest:
    model = _model(pod, body)
    try:
        if kind == "chat":
            if "messages" not in body:
                raise ApiError(400, "'messages' is required", param="messages")
            prompts = [render_chat(body["messages"], body.get("tools"))]
        else:
            if "prompt" not in body:
                raise ApiError(400, "'prompt' is required", param="prompt")
            prompts = render_completion_prompts(body["prompt"])
    except PromptError as e:
        raise ApiError(400, str(e)) from e
    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    if max_tokens is None:
        max_tokens = pod.config.engine.default_max_tokens
    n = _int_field(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = bool(options.get("include_usage", False))
    temperature, seed = _sampling(body)
    return CompletionRequest(
        kind, model, prompts, max_tokens, stream, include_usage, temperature, seed
    )


# -- response shapes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    """Builds the OpenAI-shaped bodies and chunks of one completion response."""

    kind: Kind
    id: str
    created: int
    model: str
    include_usage: bool

    @classmethod
    def new(cls, req: CompletionRequest) -> _Reply:
        prefix = "chatcmpl-" if req.kind == "chat" else "cmpl-"
        return cls(
            req.kind, prefix + uuid.uuid4().hex, int(time.time()), req.model, req.include_usage
        )

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, index: int, token: TokenOutput) -> bytes:
        finish = "length" if token.finished else None
        if self.kind == "chat":
            delta = (
                {"role": "assistant", "content": token.token}
                if token.first
                else {"content": token.token}
            )
            body = self._envelope("chat.completion.chunk")
            body["choices"] = [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ]
        else:
            body = self._envelope("text_completion")
            body["choices"] = [
                {
                    "index": index,
                    "text": token.token,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ]
        if self.include_usage:
            body["usage"] = None
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def usage_chunk(self, seqs: Sequence[EngineSequence]) -> bytes:
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        body["usage"] = usage(seqs)
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def body(self, seqs: Sequence[EngineSequence]) -> dict[str, Any]:
        if self.kind == "chat":
            body = self._envelope("chat.completion")
            body["choices"] = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": seq.text},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
                for i, seq in enumerate(seqs)
            ]
        else:
            body = self._envelope("text_completion")
            body["choices"] = [
                {
                    "index": i,
                    "text": seq.text,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
                for i, seq in enumerate(seqs)
            ]
        body["usage"] = usage(seqs)
        return body


def usage(seqs: Sequence[EngineSequence]) -> dict[str, Any]:
    """OpenAI ``usage`` of a response made of `seqs`."""
    prompt = sum(seq.prompt_tokens for seq in seqs)
    completion = sum(len(seq.output) for seq in seqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(seq.cached_tokens for seq in seqs)},
    }


DONE = b"data: [DONE]\n\n"


async def _hang() -> NoReturn:
    """Wait until cancelled (the client goes away, or the server shuts down)."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")  # pragma: no cover


# -- handlers ---------------------------------------------------------------------------------


@web.middleware
async def _api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()


async def _pod_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[POD_HEADER] = request.app[POD_KEY].name


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await _completion(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _completion(request, "text")


async def _cross_zone(pod: SimPod, request: web.Request) -> None:
    """A request from a client in another zone: count it and make it pay the round trip
    between zones before anything happens (so before its first byte)."""
    client_zone = request.headers.get(CLIENT_ZONE_HEADER)
    zone = pod.config.zone
    if not client_zone or zone is None:
        return
    pod.counters.client_zone_requests += 1
    if client_zone != zone:
        pod.counters.cross_zone_requests += 1
        delay = pod.config.cross_zone_rtt * pod.config.time_scale
        if delay > 0:
            await asyncio.sleep(delay)


async def _completion(request: web.Request, kind: Kind) -> web.StreamResponse:
    pod = request.app[POD_KEY]
    pod.counters.requests_received += 1
    await _cross_zone(pod, request)
    try:
        req = _parse_completion(pod, kind, await _read_json(request))
    except ApiError:
        pod.counters.requests_rejected += 1
        raise
    faults = pod.faults
    config = faults.config
    fate = faults.decide(pod.clock())
    if fate is Fate.EXIT:
        log.warning(
            "%s: exiting after %s requests (simulated crash)", pod.name, faults.requests_seen
        )
        os._exit(CRASH_EXIT_STATUS)
    if fate is Fate.STARTING:
        pod.counters.slow_start_rejections += 1
        raise _injected_error(503, config.retry_after, "the model server is starting")
    if fate is Fate.ERROR:
        pod.counters.injected_errors += 1
        raise _injected_error(config.error_status, config.retry_after, "injected failure")
    stall_after: int | None = None
    if fate is Fate.HANG:
        pod.counters.injected_hangs += 1
        if not req.stream or config.hang_after_chunks == 0:
            await _hang()
        stall_after = config.hang_after_chunks

    try:
        submission = pod.driver.submit(req.prompts, req.max_tokens, pod.reply_seeds(req))
    except EngineError as e:
        pod.counters.requests_rejected += 1
        raise ApiError(400, str(e)) from e
    reply = _Reply.new(req)
    try:
        if req.stream:
            headers: dict[str, str] = {
                hdrs.CONTENT_TYPE: "text/event-stream",
                hdrs.CACHE_CONTROL: "no-cache",
            }
            headers.update(pod.load_report_headers(request, stream=True))
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            try:
                await _stream(response, submission, reply, stall_after)
            except ConnectionResetError:
                pod.counters.requests_disconnected += 1
                return response
        else:
            await _wait_finished(submission)
            response = web.json_response(
                reply.body(submission.seqs),
                headers=pod.load_report_headers(request, stream=False),
            )
    except asyncio.CancelledError:
        pod.counters.requests_disconnected += 1
        raise
    finally:
        if pod.driver.abort(submission):
            log.debug("%s: client went away, sequences aborted", pod.name)
    pod.counters.requests_served += 1
    return response


async def _wait_finished(submission: Submission) -> None:
    remaining = len(submission.seqs)
    while remaining:
        _, token = await submission.queue.get()
        if token.finished:
            remaining -= 1


async def _stream(
    response: web.StreamResponse, submission: Submission, reply: _Reply, stall_after: int | None
) -> None:
    queue = submission.queue
    remaining = len(submission.seqs)
    sent = 0
    while remaining:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        chunks: list[bytes] = []
        for index, token in items:
            chunks.append(reply.chunk(index, token))
            if token.finished:
                remaining -= 1
        if stall_after is not None and sent + len(chunks) >= stall_after:
            chunks = chunks[: stall_after - sent]
            if chunks:
                await response.write(b"".join(chunks))
            await _hang()
        await response.write(b"".join(chunks))
        sent += len(chunks)
    tail = reply.usage_chunk(submission.seqs) + DONE if reply.include_usage else DONE
    await response.write(tail)
    await response.write_eof()


async def tokenize(request: web.Request) -> web.Response:
    """``POST /tokenize`` (vLLM): pseudo-token ids of a prompt or of chat messages."""
    pod = request.app[POD_KEY]
    if pod.faults.starting(pod.clock()):
        raise _injected_error(503, pod.faults.config.retry_after, "the model server is starting")
    body = await _read_json(request)
    _model(pod, body)
    try:
        if "messages" in body:
            text = render_chat(body["messages"], body.get("tools"))
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise ApiError(400, "'prompt' (a string) or 'messages' is required")
    except PromptError as e:
        raise ApiError(400, str(e)) from e
    ids = token_ids(text)
    return web.json_response(
        {"count": len(ids), "max_model_len": pod.config.engine.max_model_len, "tokens": ids}
    )


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    pod = request.app[POD_KEY]
    created = int(time.time() - (pod.clock() - pod.started_at))
    data = [
        {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": model,
            "parent": None,
            "max_model_len": pod.config.engine.max_model_len,
        }
        for model in pod.models
    ]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 with an empty body, 503 during slow start."""
    pod = request.app[POD_KEY]
    return web.Response(status=503 if pod.faults.starting(pod.clock()) else 200)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text (not routed when the pod's metrics flavor is none)."""
    pod = request.app[POD_KEY]
    payload = generate_latest(pod.metrics.registry)
    return web.Response(body=payload, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})


async def get_stats(request: web.Request) -> web.Response:
    """``GET /stats``: counters since the last reset, as JSON."""
    return web.json_response(request.app[POD_KEY].stats())


async def reset_stats(request: web.Request) -> web.Response:
    """``POST /stats/reset``: zero the counters; the prefix cache stays warm."""
    pod = request.app[POD_KEY]
    pod.reset_stats()
    return web.json_response(pod.stats())


async def get_faults(request: web.Request) -> web.Response:
    """``GET /sim/faults``."""
    return web.json_response(request.app[POD_KEY].faults.config.to_json())


async def set_faults(request: web.Request) -> web.Response:
    """``POST /sim/faults``: change some fault settings; answers with all of them."""
    pod = request.app[POD_KEY]
    body = await _read_json(request)
    try:
        return web.json_response(pod.update_faults(body))
    except FaultConfigError as e:
        raise ApiError(400, str(e)) from e


async def restart_pod(request: web.Request) -> web.Response:
    """``POST /sim/restart``: kill and restart the pod; ``down`` (seconds, default 5) from a
    JSON body or the query string. Answers what it did."""
    pod = request.app[POD_KEY]
    body = await _read_json(request) if await request.read() else {}
    try:
        down = parse_down(body, request.query)
    except RestartError as e:
        raise ApiError(400, str(e), param="down") from e
    done = pod.restart(down)
    if RESPONSES_KEY in request.app:  # stored responses lived in the process too
        done["responses_lost"] = request.app[RESPONSES_KEY].clear()
    return web.json_response(done)


# -- application ------------------------------------------------------------------------------


async def _run_engine(app: web.Application) -> AsyncIterator[None]:
    pod = app[POD_KEY]
    pod.start()
    task = asyncio.create_task(pod.driver.run(), name=f"sim-engine-{pod.name}")
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


def build_app(config: SimConfig) -> web.Application:
    """One simulated pod as an aiohttp application.

    Run it with ``handler_cancellation=True`` (as :func:`run_pods` does) so that a client that
    goes away aborts its sequences at once, even while they wait or prefill.
    """
    pod = SimPod(config)
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[_api_errors, pod.in_flight]
    )
    app[POD_KEY] = pod
    app.cleanup_ctx.append(_run_engine)
    app.on_response_prepare.append(_pod_header)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    add_responses(app)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    if config.metrics_flavor != "none":
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    app.router.add_get("/sim/faults", get_faults)
    app.router.add_post("/sim/faults", set_faults)
    app.router.add_post("/sim/restart", restart_pod)
    return app


# -- hosting several pods ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningPod:
    """A pod listening on a port."""

    name: str
    host: str
    port: int
    app: web.Application

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pod(self) -> SimPod:
        return self.app[POD_KEY]


def pod_configs(base: SimConfig, count: int) -> list[SimConfig]:
    """`count` pods like `base`; pod i's fault seed is ``base seed + i`` so pods fail apart."""
    if count < 1:
        raise ValueError("count must be at least 1")
    return [
        replace(base, faults=replace(base.faults, seed=base.faults.seed + i)) for i in range(count)
    ]


@asynccontextmanager
async def run_pods(
    configs: Sequence[SimConfig],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    name_prefix: str = "sim",
    shutdown_timeout: float = 1.0,
) -> AsyncIterator[list[RunningPod]]:
    """Start one pod per config on ports ``port``, ``port + 1``, ... (all ephemeral if 0).

    Yields the running pods; stops them all on exit (in-flight requests get `shutdown_timeout`
    seconds). A pod whose config has no name is called ``<name_prefix>-<port>``.
    """
    runners: list[web.AppRunner] = []
    pods: list[RunningPod] = []
    try:
        for index, config in enumerate(configs):
            app = build_app(config)
            runner = web.AppRunner(
                app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None
            )
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, host, port + index if port else 0)
            await site.start()
            bound = runner.addresses[0][1]
            pod = app[POD_KEY]
            if config.name is None:
                pod.name = f"{name_prefix}-{bound}"
            pods.append(RunningPod(pod.name, host, bound, app))
        yield pods
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def serve_pods(
    configs: Sequence[SimConfig],
    *,
    host: str = "127.0.0.1",
    port: int = 8001,
    name_prefix: str = "sim",
    stop: asyncio.Event | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the pods (see :func:`run_pods`) until `stop` is set, announcing each address."""
    stop = stop if stop is not None else asyncio.Event()
    async with run_pods(configs, host=host, port=port, name_prefix=name_prefix) as pods:
        for running in pods:
            announce(f"sim pod {running.name} listening on {running.url}")
        await stop.wait()
