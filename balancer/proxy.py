"""The request path: parse, route, forward, stream back.

One :class:`Proxy` serves every request through one shared ``aiohttp.ClientSession`` (keep-alive
connections per endpoint). Bodies are read once, within the size limit; responses are relayed
chunk by chunk as they arrive, so a streamed token reaches the client as soon as the model
server sends it and nothing holds a whole response.

Failure semantics:
- before the first response byte: 502 (connect/reset) or 504 (timeout) with an OpenAI-style
  error body;
- after it: the stream ends with an SSE error event (for event streams) and the client
  connection is aborted, so no client mistakes a broken generation for a complete one;
- client disconnect: the handler is cancelled, which closes the upstream request (the model
  server stops generating) and releases the endpoint's load at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import hdrs, web
from multidict import CIMultiDict

from balancer.config import Settings
from balancer.errors import (
    BadRequestError,
    BalancerError,
    BodyTooLargeError,
    InvalidJSONError,
    MethodNotAllowedError,
    NoEndpointsError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    ShuttingDownError,
    UnsupportedMediaTypeError,
    UpstreamTimeoutError,
    error_body,
)
from balancer.errors import (
    UpstreamConnectError as BadGatewayError,
)
from balancer.health import Failure, HealthMonitor
from balancer.metrics import Metrics
from balancer.prefix import Kind, model_of, routing_key, session_key, validate
from balancer.retry import RETRY_STATUSES, RetryBudget, parse_retry_after
from balancer.ring import hash_key
from balancer.router import Pool, Router
from balancer.strategy import Choice
from balancer.upstream import (
    EndpointPool,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamError,
    serialize_head,
)
from balancer.upstream import Response as UpstreamResponse

log = logging.getLogger(__name__)
access_log = logging.getLogger("balancer.access")
"""One line per forwarded request, after its response ended (fields in ``extra``)."""

# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard ones proxies still meet.
HOP_BY_HOP: Final = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION, "Keep-Alive", hdrs.PROXY_AUTHENTICATE, hdrs.PROXY_AUTHORIZATION,
        hdrs.TE, "Trailer", hdrs.TRAILER, hdrs.TRANSFER_ENCODING, hdrs.UPGRADE,
        "Proxy-Connection",
    )
)
# Set for the upstream hop by balancer itself: Host from the endpoint URL, the length of the
# body we send, and the forwarding headers (X-Forwarded-For is extended, not replaced).
_NOT_FORWARDED_REQUEST: Final = HOP_BY_HOP | {
    "host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-request-id",
}
# Set by the server for the client hop.
_NOT_FORWARDED_RESPONSE: Final = frozenset(
    h.encode() for h in HOP_BY_HOP | {"content-length", "date", "server"}
)

KEYED_PATHS: Final = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETIONS,
    "/v1/embeddings": Kind.EMBEDDINGS,
}

HEADER_ENDPOINT: Final = "x-balancer-endpoint"
HEADER_ROUTE: Final = "x-balancer-route"
HEADER_REQUEST_ID: Final = "X-Request-Id"

# A non-streaming response up to this size is read whole and answered in one write, which
# is cheaper than relaying it chunk by chunk; larger ones are relayed.
_BUFFER_LIMIT: Final = 1 << 20


def filter_request_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Headers to send upstream: all but hop-by-hop ones (and those ``Connection`` names)
    and those balancer sets itself."""
    named = headers.get(hdrs.CONNECTION)
    drop = _NOT_FORWARDED_REQUEST
    if named:
        drop = drop | {t.strip().lower() for t in named.split(",")}
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


def filter_response_headers(headers: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The model server's response headers minus hop-by-hop ones, for the client."""
    drop = _NOT_FORWARDED_RESPONSE
    for name, value in headers:
        if name.lower() == b"connection":
            drop = drop | {t.strip().lower() for t in value.split(b",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        if name.lower() not in drop:
            out.add(name.decode("latin-1"), value.decode("utf-8", "replace"))
    return out


def usage_of(data: object) -> tuple[int, int] | None:
    """(prompt tokens, cached prompt tokens) from an OpenAI response object's ``usage``, or
    None if it has none (vLLM and others put ``cached_tokens`` under
    ``usage.prompt_tokens_details`` when prefix caching is on)."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int) or isinstance(prompt, bool):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if not isinstance(cached, int) or isinstance(cached, bool):
        cached = 0
    return prompt, cached


def body_usage(payload: bytes) -> tuple[int, int] | None:
    """Usage from a whole JSON response body; a substring test first, so bodies without
    usage (and compressed ones) cost no parse."""
    if b'"usage"' not in payload:
        return None
    try:
        return usage_of(json.loads(payload))
    except (ValueError, RecursionError):
        return None


def stream_usage(tail: bytes) -> tuple[int, int] | None:
    """Usage from the last SSE event that carries it in ``tail`` (the end of a stream).

    Only the tail is parsed, once per stream: the usage event (``stream_options.
    include_usage``) comes last, just before ``data: [DONE]``.
    """
    end = len(tail)
    while True:
        at = tail.rfind(b'"usage"', 0, end)
        if at < 0:
            return None
        start = tail.rfind(b"data:", 0, at)
        if start < 0:
            return None
        stop = tail.find(b"\n", at)
        try:
            found = usage_of(json.loads(tail[start + 5:stop if stop >= 0 else len(tail)]))
        except (ValueError, RecursionError):
            found = None
        if found is not None:
            return found
        end = start


def error_response(exc: BalancerError, request_id: str | None = None) -> web.Response:
    body = error_body(exc.message, exc.type, exc.status, exc.param)
    headers = {HEADER_REQUEST_ID: request_id} if request_id else None
    return web.json_response(body, status=exc.status, headers=headers)


def sse_error_event(message: str, type_: str, code: int) -> bytes:
    """An SSE event OpenAI clients raise as an API error mid-stream."""
    return b"data: " + json.dumps(error_body(message, type_, code)).encode() + b"\n\n"


def _is_json(content_type: bytes | None) -> bool:
    return content_type is not None and b"json" in content_type.lower()


def _is_event_stream(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.lower().startswith(b"text/event-stream")


class _Watchdog:
    """Cancels a task when a deadline passes, with a progress mark that costs a clock read.

    ``touch()`` per chunk only stores the time; the single timer re-arms itself lazily when it
    fires early. This keeps per-chunk cost flat on the streaming hot path, where re-arming an
    ``asyncio.timeout`` on every chunk would cost a timer allocation each.
    """

    __slots__ = ("_handle", "_loop", "_task", "_total_deadline", "fired", "last", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float, total: float,
                 started: float) -> None:
        self._loop = loop
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.window = window
        self.last = loop.time()
        # The total runs from the request's arrival, across retries.
        self._total_deadline = started + total if total > 0 else math.inf
        self.fired: str | None = None
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        return min(self.last + self.window, self._total_deadline)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._total_deadline:
            self.fired = "total"
        elif now >= self.last + self.window:
            self.fired = "idle"
        else:
            self._handle = self._loop.call_at(self._due(), self._check)
            return
        self._handle = None
        self._task.cancel()

    def touch(self) -> None:
        self.last = self._loop.time()

    def set_window(self, window: float) -> None:
        """Switch from the first-byte window to the idle window (never shortens a pending
        timer early: the lazy re-arm picks the new window up)."""
        self.window = window
        self.last = self._loop.time()
        if self._handle is not None and self._handle.when() > self._due():
            self._handle.cancel()
            self._handle = self._loop.call_at(self._due(), self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


@dataclass(slots=True)
class _Retry:
    """An attempt that failed before anything reached the client and may be retried."""

    reason: str
    """connect, reset, or the HTTP status (e.g. "503")."""
    fallback: web.Response
    """What the client gets if no retry happens: the upstream's own answer, or ours."""
    retry_after: float = 0.0
    """For a 429: seconds the endpoint asked to be left alone."""


class Proxy:
    def __init__(self, settings: Settings, router: Router, metrics: Metrics,
                 health: HealthMonitor | None = None) -> None:
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.client: UpstreamClient | None = None
        """Set by the app at startup: keep-alive connections to every endpoint."""
        self.draining = False
        self.in_flight = 0
        """Requests being forwarded right now, over all pools."""
        self.idle = asyncio.Event()
        """Set whenever nothing is in flight (what a drain waits for)."""
        self.idle.set()
        limits = settings.limits
        self._first_byte_timeout = limits.first_byte_timeout
        self._idle_timeout = limits.idle_timeout
        self._total_timeout = limits.total_timeout
        self._route_headers = settings.server.route_headers
        self._session_header = settings.routing.session_header
        self._key_mode = settings.routing.key
        self._prefix_chars = settings.routing.prefix_chars
        self.health = health
        """Passive outlier detection hears every attempt's outcome (None: off)."""
        retries = settings.retries
        self._max_attempts = retries.max_attempts
        self._retry_after_default = retries.retry_after_default
        self._retry_after_max = retries.retry_after_max
        self.budget = RetryBudget(retries.budget_ratio, retries.budget_window,
                                  retries.budget_min_retries)
        self._max_in_flight = limits.max_in_flight_per_endpoint
        self._queue_size = limits.queue_size
        self._queue_timeout = limits.queue_timeout
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        """Per pool: requests waiting for an endpoint under its in-flight limit."""

    # -- public handlers -------------------------------------------------------------------

    async def handle_keyed(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions, /v1/completions, /v1/embeddings: routed by key."""
        request_id = request.headers.get(HEADER_REQUEST_ID) or os.urandom(12).hex()
        try:
            if request.method != hdrs.METH_POST:
                raise MethodNotAllowedError(f"{request.method} is not allowed on {request.path}; "
                                            "use POST")
            kind = KEYED_PATHS[request.path]
            self._check_content_type(request)
            body = await self._read_body(request)
            data = self._parse_json(body)
            validate(kind, data)
            pool = self.router.pool_for_model(model_of(data))
            session = session_key(request.headers.get(self._session_header), data)
            key = session or routing_key(kind, data, self._key_mode, self._prefix_chars)
            key_hash = hash_key(key)
            choice = pool.choose(key_hash, session=session is not None)
        except BalancerError as exc:
            return self._reject(request, exc, request_id)
        return await self._forward(request, pool, choice, body, request_id,
                                   stream=data.get("stream") is True, key_hash=key_hash,
                                   session=session is not None, model=data["model"])

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/models, answered from the configured pools."""
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": f"balancer/{pool.name}"}
            for pool in self.router.pools.values()
            for model in pool.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def handle_passthrough(self, request: web.Request) -> web.StreamResponse:
        """Any other /v1/* request: to the model's pool (or the only pool), least-request."""
        request_id = request.headers.get(HEADER_REQUEST_ID) or os.urandom(12).hex()
        try:
            body = await self._read_body(request)
            pool = self._passthrough_pool(request, body)
            choice = pool.choose(0, keyed=False)
        except BalancerError as exc:
            return self._reject(request, exc, request_id)
        return await self._forward(request, pool, choice, body, request_id, stream=False,
                                   keyed=False)

    async def handle_not_found(self, request: web.Request) -> web.StreamResponse:
        return self._reject(
            request, NotFoundError(f"{request.path} is not an OpenAI API path (try /v1/...)"),
            None,
        )

    # -- request parsing -------------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.limits.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLargeError(f"request body of {length} bytes exceeds the limit of "
                                    f"{limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLargeError(f"request body exceeds the limit of {limit} bytes") from None

    @staticmethod
    def _parse_json(body: bytes) -> dict[str, Any]:
        if not body:
            raise InvalidJSONError("request body is empty; expected a JSON object")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidJSONError(f"request body is not valid UTF-8 (byte {e.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidJSONError(f"request body is not valid JSON: {e.msg} at line "
                                   f"{e.lineno} column {e.colno}") from None
        except RecursionError:
            raise InvalidJSONError("request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise BadRequestError(f"request body must be a JSON object, not "
                                  f"{type(data).__name__}")
        return data

    def _check_content_type(self, request: web.Request) -> None:
        raw = request.headers.get(hdrs.CONTENT_TYPE)
        if raw is None:
            return
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {ctype!r}"
            )

    def _passthrough_pool(self, request: web.Request, body: bytes) -> Pool:
        if body and request.content_type == "application/json":
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                data = None
            if isinstance(data, dict) and isinstance(data.get("model"), str):
                return self.router.pool_for_model(data["model"])
        model = request.query.get("model")
        if model:
            return self.router.pool_for_model(model)
        pool = self.router.default_pool()
        if pool is None:
            raise BadRequestError(
                f"{request.path} names no model and several pools exist; add a 'model' field "
                "or a ?model= query parameter"
            )
        return pool

    def _reject(
        self, request: web.Request, exc: BalancerError, request_id: str | None
    ) -> web.Response:
        self.metrics.reject(exc.reason)
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(level, "rejected %s %s: %d %s (request %s)", request.method, request.path,
                exc.status, exc.message, request_id)
        return error_response(exc, request_id)

    # -- forwarding ------------------------------------------------------------------------

    def _upstream_head(self, request: web.Request, pool: EndpointPool, request_id: str,
                       body_length: int) -> bytes:
        headers = filter_request_headers(request.headers)
        peer = request.remote or ""
        forwarded_for = request.headers.get(hdrs.X_FORWARDED_FOR)
        headers.append((hdrs.X_FORWARDED_FOR, f"{forwarded_for}, {peer}" if forwarded_for
                        else peer))
        headers.append((hdrs.X_FORWARDED_PROTO, request.scheme))
        if request.host:
            headers.append((hdrs.X_FORWARDED_HOST, request.host))
        headers.append((HEADER_REQUEST_ID, request_id))
        return serialize_head(request.method, request.raw_path, pool.host_header, headers,
                              body_length)

    async def _forward(
        self,
        request: web.Request,
        pool: Pool,
        choice: Choice,
        body: bytes,
        request_id: str,
        *,
        stream: bool,
        key_hash: int = 0,
        session: bool = False,
        keyed: bool = True,
        model: str = "",
    ) -> web.StreamResponse:
        """Forward with retries: an attempt that fails before anything reached the client
        (connect error, reset before the head, 429/502/503/504) goes to the next distinct
        endpoint on the ring walk, within ``retries.max_attempts`` and the retry budget."""
        if self.client is None:
            return self._reject(request, ShuttingDownError("balancer is shutting down"),
                                request_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.budget.request(started)
        self.in_flight += 1
        self.idle.clear()
        try:
            if pool.limited:
                skipped = self._skip_limited(pool, choice, started, key_hash, session, keyed)
                if isinstance(skipped, web.Response):
                    return skipped
                choice = skipped
            attempt = 1
            tried: set[str] = set()
            while True:
                if self._max_in_flight:
                    admitted = await self._admit(pool, choice, key_hash, session, keyed,
                                                 frozenset(tried))
                    if admitted is None:
                        return self._overloaded(request, pool, request_id)
                    choice = admitted
                result = await self._attempt(request, pool, choice, body, request_id, stream,
                                             started, attempt < self._max_attempts,
                                             model, key_hash if keyed else None, attempt)
                if not isinstance(result, _Retry):
                    return result
                tried.add(choice.endpoint)
                now = loop.time()
                if result.retry_after:
                    pool.limited[choice.endpoint] = now + result.retry_after
                exclude = frozenset(tried)
                if pool.limited:
                    exclude |= {e for e, until in pool.limited.items() if until > now}
                try:
                    choice = pool.choose(key_hash, session=session, keyed=keyed,
                                         exclude=exclude)
                except NoEndpointsError:
                    if result.retry_after or any(e not in tried for e in exclude):
                        # Every endpoint left asked for a pause: say for how long.
                        return self._all_limited(request, pool, now, request_id)
                    self.metrics.retry(pool.name, result.reason, "no_endpoint")
                    return result.fallback
                if not self.budget.spend(now):
                    self.metrics.retry(pool.name, result.reason, "budget")
                    return result.fallback
                self.metrics.retry(pool.name, result.reason, "retried")
                log.info("retrying %s %s on %s after %s (request %s, attempt %d)",
                         request.method, request.path, choice.endpoint, result.reason,
                         request_id, attempt + 1)
                attempt += 1
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def _admit(self, pool: Pool, choice: Choice, key_hash: int, session: bool,
                     keyed: bool, tried: frozenset[str]) -> Choice | None:
        """An endpoint under ``max_in_flight_per_endpoint``: the choice itself, else the next
        one on the walk that is not full, else wait in the pool's bounded queue for a
        release. None: the queue is full or the wait timed out."""
        limit = self._max_in_flight
        load = pool.load
        if load.get(choice.endpoint, 0) < limit:
            return choice
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._queue_timeout
        waiters = self._waiters.setdefault(pool.name, deque())
        while True:
            full = frozenset(e for e in pool.routable if load.get(e, 0) >= limit)
            try:
                return pool.choose(key_hash, session=session, keyed=keyed, exclude=full | tried)
            except NoEndpointsError:
                pass
            if len(waiters) >= self._queue_size:
                return None
            waiter: asyncio.Future[None] = loop.create_future()
            waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                return None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(pool.name)  # pass the slot we were given on
                raise
            finally:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)

    def _wake(self, pool_name: str) -> None:
        """A slot came free in the pool: let the longest waiting request try again."""
        waiters = self._waiters.get(pool_name)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _overloaded(self, request: web.Request, pool: Pool, request_id: str) -> web.Response:
        response = self._reject(request, OverloadedError(
            f"every endpoint of pool {pool.name!r} is at its limit of {self._max_in_flight} "
            "requests and the wait queue is full or timed out"), request_id)
        response.headers[hdrs.RETRY_AFTER] = "1"
        return response

    def _skip_limited(self, pool: Pool, choice: Choice, now: float, key_hash: int,
                      session: bool, keyed: bool) -> Choice | web.Response:
        """Steer around endpoints that answered 429 recently (their Retry-After)."""
        limited = pool.limited
        for endpoint in [e for e, until in limited.items() if until <= now]:
            del limited[endpoint]
        if choice.endpoint not in limited:
            return choice
        try:
            return pool.choose(key_hash, session=session, keyed=keyed,
                               exclude=frozenset(limited))
        except NoEndpointsError:
            return self._all_limited(None, pool, now, None)

    def _all_limited(self, request: web.Request | None, pool: Pool, now: float,
                     request_id: str | None) -> web.Response:
        wait = min((until - now for until in pool.limited.values() if until > now),
                   default=self._retry_after_default)
        seconds = max(1, math.ceil(wait))
        exc = RateLimitedError(f"every endpoint of pool {pool.name!r} is rate limited; "
                               f"retry after {seconds} s")
        self.metrics.reject(exc.reason)
        response = error_response(exc, request_id)
        response.headers[hdrs.RETRY_AFTER] = str(seconds)
        return response

    async def _attempt(
        self,
        request: web.Request,
        pool: Pool,
        choice: Choice,
        body: bytes,
        request_id: str,
        stream: bool,
        started: float,
        retry_possible: bool,
        model: str = "",
        key_hash: int | None = None,
        attempt: int = 1,
    ) -> web.StreamResponse | _Retry:
        """One try on the chosen endpoint: relay the answer, or say why it may be retried.

        The endpoint's load is taken just before the ``try`` whose ``finally`` gives it back,
        so no failure in between can leave it counted.
        """
        client = self.client
        if client is None:
            return self._reject(request, ShuttingDownError("balancer is shutting down"),
                                request_id)
        loop = asyncio.get_running_loop()
        endpoint = pool.endpoints[choice.endpoint]
        connections = client.pool(endpoint.url)
        head = self._upstream_head(request, connections, request_id, len(body))
        self.metrics.route(pool.name, choice.outcome, len(choice.probes), choice.bound)
        watchdog = _Watchdog(loop, self._first_byte_timeout, self._total_timeout, started)
        upstream: UpstreamResponse | None = None
        response: web.StreamResponse | None = None
        code = 0
        first_byte = -1.0
        usage: tuple[int, int] | None = None
        chunks = size = 0
        failure: Failure | None = None
        lease = pool.acquire(choice)
        try:
            upstream = await connections.request(head, body,
                                                 skip_body=request.method == hdrs.METH_HEAD)
            code = upstream.status
            if code >= 500:
                failure = Failure.STATUS
            out_headers = filter_response_headers(upstream.headers)
            out_headers[HEADER_REQUEST_ID] = request_id
            if self._route_headers:
                out_headers[HEADER_ENDPOINT] = endpoint.id
                out_headers[HEADER_ROUTE] = choice.outcome
            length = upstream.content_length
            retryable = code in RETRY_STATUSES and retry_possible and (
                length is None or length <= _BUFFER_LIMIT)
            if retryable or (length is not None and length <= _BUFFER_LIMIT and not stream):
                payload = await upstream.read_all()
                first_byte = loop.time() - started
                self.metrics.first_byte_after(pool.name, first_byte)
                answer = web.Response(body=payload, status=code, headers=out_headers)
                if retryable:
                    retry_after = 0.0
                    if code == 429:
                        retry_after = parse_retry_after(
                            upstream.header(b"retry-after"), time.time(),
                            self._retry_after_default, self._retry_after_max)
                    self.metrics.upstream_error(pool.name, endpoint.id, str(code))
                    code = -1
                    return _Retry(str(upstream.status), answer, retry_after)
                if code == 200 and _is_json(upstream.header(b"content-type")):
                    usage = body_usage(payload)
                return answer
            response = web.StreamResponse(status=code, headers=out_headers)
            if length is not None:
                response.content_length = length
            chunk = await upstream.read()
            first_byte = loop.time() - started
            self.metrics.first_byte_after(pool.name, first_byte)
            watchdog.set_window(self._idle_timeout)
            # The last two chunks are kept (references, not copies) so the usage event at
            # the end of a stream can be read once it ends, without parsing any chunk.
            before = last = b""
            try:
                await response.prepare(request)
                while chunk:
                    await response.write(chunk)
                    chunks += 1
                    size += len(chunk)
                    before, last = last, chunk
                    chunk = await upstream.read()
                    watchdog.touch()
                await response.write_eof()
                if code == 200 and _is_event_stream(upstream.header(b"content-type")):
                    usage = stream_usage(before + last)
            except ConnectionResetError:
                # Writing to the client failed: it is gone (aiohttp's write error is a
                # ConnectionResetError). Releasing the unfinished upstream closes it.
                self.metrics.client_disconnect(pool.name)
                code = 499
            return response
        except asyncio.CancelledError:
            if watchdog.fired is None:
                # The client went away (handler cancellation): the unfinished upstream
                # response is closed below, which stops the generation.
                self.metrics.client_disconnect(pool.name)
                code = 499
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            code = 504
            failure = Failure.TIMEOUT
            if response is None or not response.prepared:
                if watchdog.fired == "idle":
                    detail = (f"no response from {endpoint.id} within "
                              f"{self._first_byte_timeout:g} s")
                else:
                    detail = f"request exceeded the total timeout of {self._total_timeout:g} s"
                return self._upstream_failure(request, pool, endpoint.id,
                                              UpstreamTimeoutError(detail), "timeout",
                                              request_id)
            return await self._broken_stream(
                request, response, pool, endpoint.id,
                f"upstream {watchdog.fired} timeout after the response started", "timeout")
        except UpstreamError as exc:
            code = 502
            connect = isinstance(exc, UpstreamConnectError)
            failure = Failure.CONNECT if connect else Failure.RESET
            if response is None or not response.prepared:
                reason = "connect" if connect else "reset"
                error = BadGatewayError(f"cannot connect to {endpoint.id}: {exc}" if connect
                                        else f"{endpoint.id} failed before responding: {exc}")
                if retry_possible and upstream is None:
                    # Nothing came back before the connection failed: retry elsewhere. (A
                    # body that broke after the head is not retried.)
                    self.metrics.upstream_error(pool.name, endpoint.id, reason)
                    code = -1
                    return _Retry(reason, error_response(error, request_id))
                return self._upstream_failure(request, pool, endpoint.id, error, reason,
                                              request_id)
            return await self._broken_stream(request, response, pool, endpoint.id,
                                             f"upstream failed mid-response: {exc}",
                                             "mid_stream")
        finally:
            watchdog.cancel()
            if upstream is not None:
                upstream.release()
            lease.release()
            if self._waiters:
                self._wake(pool.name)
            health = self.health
            if health is not None and code != 499:
                if failure is None:
                    health.success(pool.name, endpoint.id)
                else:
                    health.failure(pool.name, endpoint.id, failure)
            if chunks:
                self.metrics.streamed(pool.name, endpoint.id, chunks, size)
            if usage is not None:
                self.metrics.usage(pool.name, endpoint.id, usage[0], usage[1])
            if code >= 0:
                duration = loop.time() - started
                self.metrics.request_done(pool.name, endpoint.id, choice.outcome, code,
                                          duration)
                if access_log.isEnabledFor(logging.INFO):
                    access_log.info(
                        "%s %s %d %s %s %.1fms", request.method, request.path, code,
                        endpoint.id, choice.outcome, duration * 1000,
                        extra={"access": {
                            "request_id": request_id,
                            "method": request.method,
                            "path": request.path,
                            "model": model,
                            "pool": pool.name,
                            "endpoint": endpoint.id,
                            "route": choice.outcome,
                            "key_hash": None if key_hash is None else f"{key_hash:016x}",
                            "status": code,
                            "attempts": attempt,
                            "ttfb_ms": None if first_byte < 0 else round(first_byte * 1000, 3),
                            "duration_ms": round(duration * 1000, 3),
                            "prompt_tokens": None if usage is None else usage[0],
                            "cached_tokens": None if usage is None else usage[1],
                            "stream_chunks": chunks,
                            "stream_bytes": size,
                        }},
                    )

    def _upstream_failure(
        self,
        request: web.Request,
        pool: Pool,
        endpoint_id: str,
        exc: BalancerError,
        reason: str,
        request_id: str,
    ) -> web.Response:
        self.metrics.upstream_error(pool.name, endpoint_id, reason)
        log.warning("upstream %s failed for %s %s: %s (request %s)", endpoint_id,
                    request.method, request.path, exc.message, request_id)
        return error_response(exc, request_id)

    async def _broken_stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        pool: Pool,
        endpoint_id: str,
        message: str,
        reason: str,
    ) -> web.StreamResponse:
        """End a started response so the client sees a failure, never a clean end."""
        self.metrics.upstream_error(pool.name, endpoint_id, reason)
        log.warning("stream from %s broke for %s %s: %s", endpoint_id, request.method,
                    request.path, message)
        if response.content_type == "text/event-stream":
            with contextlib.suppress(ConnectionError):
                await response.write(sse_error_event(message, "upstream_error", 502))
        transport = request.transport
        if transport is not None:
            # No terminating chunk: the client's HTTP layer reports an incomplete body.
            transport.abort()
        return response

