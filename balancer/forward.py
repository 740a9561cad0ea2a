"""One attempt on one endpoint: send the request, relay the answer, map failures.

:meth:`Forwarder.attempt` sends the request over the endpoint's keep-alive connections
(``upstream``) and relays the answer: whole, when it is small and not a stream (one write),
else chunk by chunk as the model server sends it, so a streamed token reaches the client as
soon as it exists and nothing holds a whole response. It writes what happened into the
request's record and, on the lease, what the attempt says about the endpoint's health.

Time is charged where it is spent:

- waiting for the model server: the first byte (connect, head and a buffered body) within
  ``first_byte_timeout``, then each wait for more of a stream within ``idle_timeout``. These
  deadlines live in the upstream reads; passing one is the endpoint's failure (504 before
  the answer started, a broken stream after);
- writing to the client: never the endpoint's. A client that takes no data for
  ``idle_timeout`` while a write to it is pending is disconnected, which counts as the
  client going away (499), never as an upstream timeout or an ejection; a slow client that
  keeps reading is served at its pace.

Task cancellation therefore only ever means that the client went away (aiohttp's handler
cancellation): the unfinished upstream response is closed, which stops the generation.

Failure semantics:

- before the first response byte: 502 (connect/reset) or 504 (timeout) with an OpenAI-style
  error body, or :class:`Retryable` when another endpoint may try;
- after it: the stream ends with an SSE error event (for event streams) and the client
  connection is aborted, so no client mistakes a broken generation for a complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import re
import sys
import termios
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict

from balancer.affinity import (
    CreatedSniffer,
    Pin,
    ResponseMap,
    body_response_id,
    response_not_found,
)
from balancer.config import Settings
from balancer.errors import (
    BadGatewayError,
    BalancerError,
    GatewayTimeoutError,
    ShuttingDownError,
    error_body,
    upstream_error_message,
)
from balancer.health import Failure
from balancer.httpserver import (
    SERVER_NAME,
    forwarded_for,
    parse_networks,
    peer_trusted,
    request_client,
)
from balancer.jsondoc import json_object
from balancer.load import FORMAT_HEADER, LOAD_HEADER, parse_orca
from balancer.metrics import Metrics
from balancer.outbound import Outbound, outbounds
from balancer.record import RequestRecord
from balancer.retry import RETRY_STATUSES, parse_retry_after
from balancer.router import Lease
from balancer.upstream import (
    READ_ALL_LIMIT,
    Connector,
    Response,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamTLSError,
    serialize_head,
)

log = logging.getLogger("balancer.proxy")

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
# Expect is the client's hop only: aiohttp answered its 100-continue before the body was
# read, and balancer sends the upstream the whole body at once.
_NOT_FORWARDED_REQUEST: Final = HOP_BY_HOP | {
    "host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-request-id", "expect", FORMAT_HEADER,
}
# Set by the server for the client hop.
_NOT_FORWARDED_RESPONSE: Final = frozenset(
    h.encode() for h in HOP_BY_HOP | {"content-length", "date", "server"}
)

HEADER_ENDPOINT: Final = "x-balancer-endpoint"
HEADER_ROUTE: Final = "x-balancer-route"
HEADER_REQUEST_ID: Final = "X-Request-Id"

# A non-streaming response up to this size is read whole and answered in one write, which
# is cheaper than relaying it chunk by chunk; larger ones are relayed. The upstream client's
# cap on a whole read, so the two cannot disagree.
_BUFFER_LIMIT: Final = READ_ALL_LIMIT


def filter_request_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Headers to send upstream: all but hop-by-hop ones (and those ``Connection`` names)
    and those balancer sets itself."""
    named = headers.get(hdrs.CONNECTION)
    drop = _NOT_FORWARDED_REQUEST
    if named:
        drop = drop | {t.strip().lower() for t in named.split(",")}
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


_LOAD_HEADER: Final = LOAD_HEADER.encode()


def filter_response_headers(headers: list[tuple[bytes, bytes]], *,
                            keep_load: bool = False) -> tuple[CIMultiDict[str], bytes | None]:
    """The model server's response headers minus hop-by-hop ones, for the client, and its
    load report (``endpoint-load-metrics``), which the client gets only with ``keep_load``."""
    filtered = _filtered(headers, keep_load, _NOT_FORWARDED_RESPONSE)
    if filtered is None:
        # A Connection header names more headers to drop, some perhaps already added: once
        # more with them (rare: a model server's Connection names hop-by-hop ones, if any).
        drop = _NOT_FORWARDED_RESPONSE.union(*(
            {t.strip().lower() for t in value.split(b",")}
            for name, value in headers if name.lower() == b"connection"))
        filtered = _filtered(headers, keep_load, drop)
        assert filtered is not None  # every header Connection names is in drop now
    return filtered


def _filtered(headers: list[tuple[bytes, bytes]], keep_load: bool, drop: frozenset[bytes]
              ) -> tuple[CIMultiDict[str], bytes | None] | None:
    """One pass of :func:`filter_response_headers` dropping ``drop``; None when a
    ``Connection`` header names a header outside it."""
    out: CIMultiDict[str] = CIMultiDict()
    out.add(hdrs.SERVER, SERVER_NAME)  # the model server's own is dropped with the hop's
    report = None
    for name, value in headers:
        lower = name.lower()
        if lower == _LOAD_HEADER:
            report = value
            if not keep_load:
                continue
        if lower not in drop:
            out.add(name.decode("latin-1"), value.decode("utf-8", "replace"))
        elif lower == b"connection" and not {t.strip().lower()
                                              for t in value.split(b",")} <= drop:
            return None
    return out, report


def usage_of(data: object) -> tuple[int, int] | None:
    """(prompt tokens, cached prompt tokens) from an OpenAI response object's ``usage``, or
    None if it has none (vLLM and others put ``cached_tokens`` under
    ``usage.prompt_tokens_details`` when prefix caching is on)."""
    if not isinstance(data, dict):
        return None
    return _usage_counts(data.get("usage"))


def _usage_counts(usage: object) -> tuple[int, int] | None:
    """(prompt tokens, cached prompt tokens) from a ``usage`` object, or None."""
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


_WHOLE_PARSE_MAX: Final = 16 << 10
"""A non-streaming JSON body up to this many bytes is parsed whole for its ``usage`` (~0.3 ms
for an embeddings answer of 16 KiB); a larger one (up to the 1 MiB read whole) only from its
tail, in microseconds: json.loads of a 1 MiB embeddings answer holds the event loop that
every stream shares for ~18 ms (~1 ms at 64 KiB)."""

_USAGE_WINDOW: Final = 64 << 10
"""Bytes at the end of a body that :func:`tail_usage` reads: ``usage`` is the last member of a
vLLM or OpenAI answer, or followed only by a few small ones."""

_USAGE_KEY: Final = '"usage"'
_JSON_SPACE: Final = re.compile(r"[ \t\n\r]*")
_DECODER: Final = json.JSONDecoder()


def _skip_space(text: str, i: int) -> int:
    """Index of the first character at or after ``i`` that is no JSON whitespace."""
    found = _JSON_SPACE.match(text, i)
    return i if found is None else found.end()


def body_usage(payload: bytes) -> tuple[int, int] | None:
    """Usage from a whole JSON response body: parsed whole when small, else read from its
    tail (:func:`tail_usage`); a substring test first, so small bodies without usage (and
    compressed ones) cost no parse."""
    if len(payload) > _WHOLE_PARSE_MAX:
        return tail_usage(payload)
    if b'"usage"' not in payload:
        return None
    return usage_of(json_object(payload))


def tail_usage(payload: bytes, window: int = _USAGE_WINDOW) -> tuple[int, int] | None:
    """Usage of a JSON object body, read from its last ``window`` bytes only.

    The last ``"usage"`` key of the top-level object is found by a search from the end, and
    only its value and the members after it are parsed. A candidate is a key (an unescaped
    quote, so outside any string, then ``:``) at the top level when, after its value and the
    members that follow, its object closes at the body's end. Nothing before the window is
    read, so a usage farther than ``window`` from the end, or behind more than
    :data:`_USAGE_CANDIDATES` nested ``usage`` keys, or spelled with escapes, or in an
    invalid body, is reported as none, never by a whole parse. Otherwise this agrees with
    ``usage_of(json.loads(payload))``.
    """
    start = max(0, len(payload) - window)
    while 0 < start < len(payload) and payload[start] & 0xC0 == 0x80:
        start += 1  # a UTF-8 continuation byte: begin at the next character
    try:
        text = payload[start:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    end = len(text)
    tries = _USAGE_CANDIDATES
    while tries:
        at = text.rfind(_USAGE_KEY, 0, end)
        if at < 0:
            return None
        end = at + len(_USAGE_KEY) - 1  # the next candidate may end on this one's quote
        slashes = at
        while slashes and text[slashes - 1] == "\\":
            slashes -= 1
        if (at - slashes) % 2 or (start and not slashes):
            continue  # an escaped quote, inside a string; or unknown (the window cut it)
        colon = _skip_space(text, at + len(_USAGE_KEY))
        if text[colon:colon + 1] != ":":
            continue  # a string value "usage", not a key
        tries -= 1
        found = _top_level_value(text, colon + 1)
        if found is not None:
            return _usage_counts(found[0])
    return None


_USAGE_CANDIDATES: Final = 4
"""``usage`` keys :func:`tail_usage` parses from the end before it gives up: real answers have
one (OpenAI's and vLLM's nest none), and each try may parse up to the whole window."""


def _top_level_value(text: str, i: int) -> tuple[object] | None:
    """``(value,)`` of the key whose value starts at ``i`` (after its colon) when its object
    closes at the end of ``text`` (the top level, in a body that is one object), else None."""
    try:
        value, i = _DECODER.raw_decode(text, _skip_space(text, i))
        i = _skip_space(text, i)
        if text[i:i + 1] == ",":
            # The members after it, parsed as an object of their own (in C; the copy of at
            # most the window costs microseconds).
            i = _skip_space(text, i + 1)
            if text[i:i + 1] != '"':
                return None
            rest, after = _DECODER.raw_decode("{" + text[i:])
            if "usage" in rest:
                return None  # a later key that decodes to "usage" (escaped): json's pick
            i += after - 1
        elif text[i:i + 1] == "}":
            i += 1
        else:
            return None
    except (ValueError, RecursionError):
        return None
    if _skip_space(text, i) != len(text):
        return None  # the object closes before the end: nested, not the top level
    return (value,)


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
        found = usage_of(json_object(tail[start + 5:stop if stop >= 0 else len(tail)]))
        if found is not None:
            return found
        end = start


def error_response(exc: BalancerError, request_id: str | None = None) -> web.Response:
    """The OpenAI-style error answer for ``exc`` (with ``Retry-After`` when it has one)."""
    body = error_body(exc.message, exc.type, exc.status, exc.param)
    response = web.json_response(body, status=exc.status, headers={hdrs.SERVER: SERVER_NAME})
    if request_id:
        response.headers[HEADER_REQUEST_ID] = request_id
    if exc.retry_after is not None:
        response.headers[hdrs.RETRY_AFTER] = str(exc.retry_after)
    return response


def sse_error_event(message: str, type_: str, code: int) -> bytes:
    """An SSE event OpenAI clients raise as an API error mid-stream."""
    return b"data: " + json.dumps(error_body(message, type_, code)).encode() + b"\n\n"


def _is_json(content_type: bytes | None) -> bool:
    return content_type is not None and b"json" in content_type.lower()


def _is_event_stream(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.lower().startswith(b"text/event-stream")


@dataclass(slots=True)
class Retryable:
    """An attempt that failed before anything reached the client and may be retried."""

    reason: str
    """connect, reset, or the HTTP status (e.g. "503")."""
    fallback: web.Response
    """What the client gets if no retry happens: the upstream's own answer, or ours."""
    retry_after: float = 0.0
    """For a 429: seconds the endpoint asked to be left alone."""

    @property
    def response_missing(self) -> bool:
        """A 404 saying the endpoint does not hold the stored response the request names
        (:func:`balancer.affinity.response_not_found`): another endpoint may."""
        return self.reason == "response_not_found"

    @property
    def model_missing(self) -> bool:
        """A 404 saying the endpoint does not serve the request's model
        (:func:`model_not_found`): its models are out of date, and another endpoint serving
        the model may answer."""
        return self.reason == "model_not_found"


MODEL_NOT_FOUND_MAX_BYTES: Final = 64 * 1024
"""Largest 404 body read for a model-not-found error: vLLM's is about 150 bytes."""


def model_not_found(payload: bytes, model: str) -> bool:
    """Whether a 404 body says the endpoint does not serve ``model``.

    vLLM answers a request for a model (a LoRA adapter) it does not serve with 404 and
    ``{"object": "error", "message": "The model `x` does not exist.", ...}`` (newer versions
    nest it under ``"error"``). Only such an answer may go to another endpoint: any other 404
    (an unknown path, say) would be the same everywhere. The message must name the model, so
    a 404 about something else the request names is not taken for one.
    """
    if not model:
        return False
    message = upstream_error_message(payload, MODEL_NOT_FOUND_MAX_BYTES)
    if message is None or model not in message:
        return False
    lowered = message.lower()
    return "does not exist" in lowered or "not found" in lowered


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to a connection that the peer has not taken yet: those in the
    transport's buffer plus, on Linux, those queued in the kernel (``SIOCOUTQ``)."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            size += int.from_bytes(queued, sys.byteorder)
    return size


class _StallGuard:
    """Disconnects a client that takes no data for ``window`` seconds while a write to it
    is pending.

    The relay loop sets ``since`` to the time a write starts and back to 0 when it is done.
    The one timer re-arms itself lazily (a stream costs one timer per window, not one per
    chunk); when it finds a write pending, it looks at how much the client has yet to take
    (:func:`_unsent`): a change means it took data, so a slow client that keeps reading is
    never cut off, while one that reads nothing is, within two windows.
    """

    __slots__ = ("_loop", "_progress", "_timer", "_transport", "_unsent", "_window", "fired",
                 "since")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                 window: float) -> None:
        self._loop = loop
        self._transport = transport
        self._window = window
        self.since = 0.0
        self.fired = False
        self._progress = 0.0
        self._unsent = -1
        self._timer: asyncio.TimerHandle | None = loop.call_at(loop.time() + window,
                                                               self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.since
        if not since:
            self._timer = self._loop.call_at(now + self._window, self._check)
            return
        unsent = _unsent(self._transport)
        if unsent != self._unsent:
            self._unsent = unsent
            self._progress = now
        start = max(since, self._progress)
        if now - start < self._window:
            self._timer = self._loop.call_at(start + self._window, self._check)
            return
        self._timer = None
        self.fired = True
        self._transport.abort()  # the pending write fails: the client is gone

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Forwarder:
    """Runs attempts: one request on one leased endpoint."""

    def __init__(self, settings: Settings, metrics: Metrics,
                 outbound: Mapping[str, Outbound] | None = None) -> None:
        self.outbound = outbounds(settings) if outbound is None else outbound
        """Each pool's TLS, injected headers and timeouts, by pool name."""
        self.idle_timeout = settings.limits.idle_timeout
        """How long a client may take no data while a write to it waits (the pools'
        ``idle_timeout`` is the model servers' share)."""
        self.route_headers = settings.server.route_headers
        self.trusted_proxies = parse_networks(settings.server.trusted_proxies)
        self.retry_after_default = settings.retries.retry_after_default
        self.retry_after_max = settings.retries.retry_after_max
        self.pass_reports = settings.load.pass_reports
        self.metrics = metrics
        routing = settings.routing
        self.responses = ResponseMap(routing.response_affinity_entries,
                                     routing.response_affinity_ttl)
        """Response id -> the endpoint that stored it, learned from the answers relayed
        here (``balancer.affinity``); the proxy routes by it."""
        self.connectors: Mapping[str, Connector] | None = None
        """Set by the app while it runs, one per pool: opens each endpoint's connection
        pool."""

    def total_timeout(self, pool: str) -> float:
        """The pool's ``total_timeout`` in seconds (0: none)."""
        return self.outbound[pool].total_timeout

    def _over_total(self, pool: str) -> str:
        """What a request that ran out of the pool's ``total_timeout`` is told."""
        return f"request exceeded the total timeout of {self.total_timeout(pool):g} s"

    async def attempt(self, request: web.Request, lease: Lease, body: bytes,
                      record: RequestRecord, *, stream: bool, retry_possible: bool,
                      target: str, replayable: bool = True) -> web.StreamResponse | Retryable:
        """Send the request to the leased endpoint and relay the answer, or say why another
        endpoint may try (only when nothing reached the client). ``target`` is the checked
        origin-form target (never the client's raw one); a request that is not
        ``replayable`` is never re-sent on a fresh connection."""
        connectors = self.connectors
        if connectors is None:
            raise ShuttingDownError("balancer is shutting down")
        choice = lease.choice
        out = self.outbound[lease.pool.name]
        connections = lease.state.open(connectors[lease.pool.name])
        head = self._head(request, connections.prefix + target, connections.host_header,
                          record.request_id, len(body), out)
        self.metrics.route(lease.pool.name, choice.outcome, len(choice.probes), choice.bound,
                           choice.signal)
        deadline = min(connections.loop.time() + out.first_byte_timeout, record.total_at)
        upstream: Response | None = None
        try:
            upstream = await connections.request(
                head, body, deadline=deadline, skip_body=request.method == hdrs.METH_HEAD,
                replayable=replayable)
            return await self._relay(request, lease, record, upstream, deadline,
                                     stream=stream, retry_possible=retry_possible)
        except UpstreamError as exc:
            return self._failed(request, lease, record, exc,
                                retry=retry_possible and upstream is None)
        except asyncio.CancelledError:
            self._client_gone(lease, record)
            raise
        finally:
            if upstream is not None:
                upstream.release()

    def _head(self, request: web.Request, target: str, host: str, request_id: str,
              body_length: int, out: Outbound) -> bytes:
        headers = filter_request_headers(request.headers)
        if out.headers:
            # The pool's own headers win over a client's of the same name (a client must
            # not pick the credentials sent to a provider).
            names = out.header_names
            headers = [(n, v) for n, v in headers if n.lower() not in names]
            headers.extend(out.header_items())
        peer = request.remote or ""
        chain = forwarded_for(request)
        # The peer is always appended; what the client sent stays in the chain for the model
        # server to judge, and balancer decides nothing on it.
        headers.append((hdrs.X_FORWARDED_FOR, f"{chain}, {peer}" if chain else peer))
        proto, host_header = request.scheme, request.host
        if self.trusted_proxies and peer_trusted(peer, self.trusted_proxies):
            # A trusted proxy in front (TLS ended there) knows the original scheme and host.
            proto = request.headers.get(hdrs.X_FORWARDED_PROTO) or proto
            host_header = request.headers.get(hdrs.X_FORWARDED_HOST) or host_header
        headers.append((hdrs.X_FORWARDED_PROTO, proto))
        if host_header:
            headers.append((hdrs.X_FORWARDED_HOST, host_header))
        headers.append((HEADER_REQUEST_ID, request_id))
        headers.append((FORMAT_HEADER, "text"))
        return serialize_head(request.method, target, host, headers, body_length)

    def _relay(self, request: web.Request, lease: Lease, record: RequestRecord,
               upstream: Response, deadline: float, *, stream: bool,
               retry_possible: bool) -> Awaitable[web.StreamResponse | Retryable]:
        """The relay that fits the answer: offered for a retry, whole, or streamed.
        Choosing needs no waiting, so this returns the chosen coroutine for
        :meth:`attempt` to await rather than being one more coroutine per request."""
        code = upstream.status
        if code >= 500:
            lease.failure = Failure.STATUS
        headers, report = filter_response_headers(upstream.headers,
                                                  keep_load=self.pass_reports)
        if report is not None:
            self._load_report(lease, report)
        headers[HEADER_REQUEST_ID] = record.request_id
        if self.route_headers:
            headers[HEADER_ENDPOINT] = lease.endpoint.id
            headers[HEADER_ROUTE] = record.outcome
        if code == 200 and record.response_ref is not None:
            # The endpoint has the stored response the request names (a probe found it, or
            # the map's entry was right): remember it for the next request naming it.
            self.responses.learn(record.response_ref, Pin(lease.pool.name, lease.endpoint.id),
                                 asyncio.get_running_loop().time())
        length = upstream.content_length
        small = length is not None and length <= _BUFFER_LIMIT
        if code in RETRY_STATUSES and retry_possible and (length is None or small):
            return self._retryable(lease, record, upstream, headers, deadline)
        if small and (not stream or (code == 404 and retry_possible and record.served_model)):
            return self._relay_whole(lease, record, upstream, headers, deadline,
                                     retry_possible)
        return self._relay_stream(request, lease, record, upstream, headers, deadline)

    def _load_report(self, lease: Lease, value: bytes) -> None:
        """Keep the endpoint's load report; a malformed one is counted, never an error."""
        report, malformed = parse_orca(value.decode("latin-1"))
        if malformed:
            self.metrics.load_report_error(lease.pool.name, "malformed")
        if report:
            lease.state.queue.report(report, time.monotonic(), "inband")
            self.metrics.load_report(lease.pool.name, "inband")

    def _first_byte(self, lease: Lease, record: RequestRecord, now: float) -> None:
        lease.start()
        record.first_byte = now - record.started
        self.metrics.first_byte_after(record.pool, record.first_byte)

    async def _retryable(self, lease: Lease, record: RequestRecord, upstream: Response,
                         headers: CIMultiDict[str], deadline: float) -> Retryable:
        """A 429 or 502-504 another endpoint may answer instead (read whole, as the answer
        if no retry happens)."""
        payload = await upstream.read_all(deadline, truncate=True)
        self._first_byte(lease, record, asyncio.get_running_loop().time())
        code = upstream.status
        retry_after = 0.0
        if code == 429:
            retry_after = parse_retry_after(upstream.header(b"retry-after"), time.time(),
                                            self.retry_after_default, self.retry_after_max)
        lease.state.metrics.upstream_error(str(code))
        record.status = -1
        answer = web.Response(body=payload, status=code, headers=headers)
        return Retryable(str(code), answer, retry_after)

    async def _relay_whole(self, lease: Lease, record: RequestRecord, upstream: Response,
                           headers: CIMultiDict[str], deadline: float,
                           retry_possible: bool) -> web.Response | Retryable:
        """The answer read whole and relayed in one write; a 404 saying the endpoint does not
        serve the request's model is offered for a retry instead (never the endpoint's
        failure: it answered)."""
        payload = await upstream.read_all(deadline)
        self._first_byte(lease, record, asyncio.get_running_loop().time())
        code = upstream.status
        answer = web.Response(body=payload, status=code, headers=headers)
        if code == 404 and retry_possible:
            if record.served_model and model_not_found(payload, record.served_model):
                record.status = -1
                return Retryable("model_not_found", answer)
            ref = record.response_ref
            if ref is not None and response_not_found(payload, ref):
                self.responses.forget(ref, Pin(lease.pool.name, lease.endpoint.id))
                record.status = -1
                return Retryable("response_not_found", answer)
        if record.rename is not None:
            answer.body = payload = record.rename.whole(payload)
        record.status = code
        if code == 200 and _is_json(upstream.header(b"content-type")):
            record.usage = body_usage(payload)
            if record.learns:
                self._learn(lease, body_response_id(payload))
        return answer

    def _learn(self, lease: Lease, response_id: str | None) -> None:
        """Remember the endpoint that stored a new response (its id from the answer)."""
        if response_id is not None and self.responses.learn(
                response_id, Pin(lease.pool.name, lease.endpoint.id),
                asyncio.get_running_loop().time()):
            self.metrics.response_affinity_outcome("learned")

    async def _relay_stream(self, request: web.Request, lease: Lease, record: RequestRecord,
                            upstream: Response, headers: CIMultiDict[str],
                            deadline: float) -> web.StreamResponse:
        """Relay chunk by chunk; a failure once the answer started breaks the stream."""
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if upstream.content_length is not None and record.rename is None:
            response.content_length = upstream.content_length
        chunk = await upstream.read(deadline)
        loop = asyncio.get_running_loop()
        self._first_byte(lease, record, loop.time())
        record.status = upstream.status
        transport = request.transport
        guard = None if transport is None else _StallGuard(loop, transport, self.idle_timeout)
        sniffer = None
        if record.learns and upstream.status == 200:
            content_type = upstream.header(b"content-type")
            if _is_event_stream(content_type):
                sniffer = CreatedSniffer()
            elif _is_json(content_type):
                sniffer = CreatedSniffer(whole=True)  # over 1 MiB, or of unknown length
        try:
            await response.prepare(request)
            tail = await self._relay_chunks(response, record, upstream, chunk, guard,
                                            self.outbound[lease.pool.name].idle_timeout,
                                            lease, sniffer)
            if tail is None:
                await self._break_stream(request, response, lease, record,
                                         self._over_total(lease.pool.name), None, None)
                return response
            await response.write_eof()
            if upstream.status == 200 and _is_event_stream(upstream.header(b"content-type")):
                record.usage = stream_usage(tail)
        except ConnectionResetError:
            # Writing to the client failed (aiohttp's write error is a ConnectionResetError):
            # it is gone, or the stall guard cut it off. Releasing the unfinished upstream
            # closes it.
            if guard is not None and guard.fired:
                log.info("client of %s %s stopped reading for %g s; disconnected (request %s)",
                         request.method, request.path, self.idle_timeout, record.request_id)
            self._client_gone(lease, record)
        except UpstreamError as exc:
            await self._stream_failed(request, response, lease, record, exc)
        finally:
            if guard is not None:
                guard.cancel()
        return response

    async def _relay_chunks(self, response: web.StreamResponse, record: RequestRecord,
                            upstream: Response, chunk: bytes, guard: _StallGuard | None,
                            idle: float, lease: Lease,
                            sniffer: CreatedSniffer | None = None) -> bytes | None:
        """Write chunks until the body ends, waiting at most ``idle`` seconds for each
        (the pool's idle timeout); returns the last two chunks (where a usage event would
        be), or None when the total timeout ran out while writing. A ``sniffer`` (a Responses
        stream whose id is to be learned for ``lease``'s endpoint) reads the first chunks
        until it has the id, then is dropped: one test per chunk."""
        loop = asyncio.get_running_loop()
        total_at = record.total_at
        # The last two chunks are kept (references, not copies) so the usage event at the
        # end of a stream can be read once it ends, without parsing any chunk.
        before = last = b""
        rename = record.rename
        while chunk:
            if rename is not None:
                chunk = rename.feed(chunk)
            if sniffer is not None:
                found = sniffer.feed(chunk)
                if sniffer.done:
                    self._learn(lease, found)
                    sniffer = None
            if guard is not None:
                guard.since = loop.time()
            await response.write(chunk)
            if guard is not None:
                guard.since = 0.0
            record.chunks += 1
            record.size += len(chunk)
            before, last = last, chunk
            if total_at != math.inf and loop.time() >= total_at:
                return None
            chunk = await upstream.read(total_at, idle)
        if rename is not None and (held := rename.end()):
            await response.write(held)
            last += held
        return before + last

    def _failed(self, request: web.Request, lease: Lease, record: RequestRecord,
                exc: UpstreamError, *, retry: bool) -> web.Response | Retryable:
        """The attempt failed before anything reached the client.

        The client's answer says what happened in general terms and gives the request id;
        which endpoint (an internal address) failed, and how, goes to the log and the
        metrics only."""
        rid = record.request_id
        if isinstance(exc, UpstreamTimeoutError):
            lease.failure = Failure.TIMEOUT
            record.status = 504
            out = self.outbound[lease.pool.name]
            if asyncio.get_running_loop().time() >= record.total_at:
                detail = said = self._over_total(lease.pool.name)
            else:
                said = (f"the model server sent no response within "
                        f"{out.first_byte_timeout:g} s")
                detail = f"no response within {out.first_byte_timeout:g} s: {exc}"
            return self._answer_failure(request, lease, record,
                                        GatewayTimeoutError(f"{said} (request {rid})"),
                                        "timeout", detail)
        connect = isinstance(exc, UpstreamConnectError)
        lease.failure = Failure.CONNECT if connect else Failure.RESET
        if isinstance(exc, UpstreamTLSError):
            # The certificate did not verify, or the server refused ours: as unreachable
            # as a refused connection, but the operator must hear which.
            reason, detail = "tls", str(exc)
            error = BadGatewayError(f"cannot open a trusted TLS connection to the model "
                                    f"server (request {rid})")
        else:
            reason = "connect" if connect else "reset"
            detail = (f"cannot connect: {exc}" if connect
                      else f"failed before responding: {exc}")
            error = BadGatewayError(
                f"cannot connect to the model server (request {rid})" if connect
                else f"the model server failed before responding (request {rid})")
        if retry:
            # Nothing came back before the connection failed: retry elsewhere. (A body that
            # broke after the head is not retried.)
            lease.state.metrics.upstream_error(reason)
            self._log_failure(logging.INFO, request, lease, detail, rid)
            record.status = -1
            # A failed handshake sent nothing either: retried as a connect error.
            return Retryable("connect" if connect else reason, error_response(error, rid))
        record.status = 502
        return self._answer_failure(request, lease, record, error, reason, detail)

    def _answer_failure(self, request: web.Request, lease: Lease, record: RequestRecord,
                        exc: BalancerError, reason: str, detail: str) -> web.Response:
        lease.state.metrics.upstream_error(reason)
        self._log_failure(logging.WARNING, request, lease, detail, record.request_id)
        return error_response(exc, record.request_id)

    def _log_failure(self, level: int, request: web.Request, lease: Lease, detail: str,
                     request_id: str) -> None:
        """The endpoint and what went wrong, which the client's answer leaves out."""
        log.log(level, "upstream %s %s, for %s %s from %s (request %s)", lease.state.id,
                detail, request.method, request.path,
                request_client(request, self.trusted_proxies), request_id)

    async def _stream_failed(self, request: web.Request, response: web.StreamResponse,
                             lease: Lease, record: RequestRecord, exc: UpstreamError) -> None:
        if isinstance(exc, UpstreamTimeoutError):
            if asyncio.get_running_loop().time() >= record.total_at:
                # The request's budget ran out while the stream still flowed (the endpoint
                # was never idle for idle_timeout): a long generation, not the endpoint's
                # fault, as when the budget runs out during a write.
                await self._break_stream(request, response, lease, record,
                                         self._over_total(lease.pool.name), None, None)
                return
            await self._break_stream(request, response, lease, record,
                                     "upstream idle timeout after the response started",
                                     "timeout", Failure.TIMEOUT)
        else:
            await self._break_stream(request, response, lease, record,
                                     f"upstream failed mid-response: {exc}", "mid_stream",
                                     Failure.RESET)

    async def _break_stream(self, request: web.Request, response: web.StreamResponse,
                            lease: Lease, record: RequestRecord, message: str,
                            reason: str | None, failure: Failure | None) -> None:
        """End a started response so the client sees a failure, never a clean end.
        ``reason`` (an upstream error) and ``failure`` (the endpoint's fault) are None when
        the time ran out while writing to the client."""
        record.status = 502 if failure is Failure.RESET else 504
        lease.failure = failure
        if reason is not None:
            lease.state.metrics.upstream_error(reason)
        log.warning("stream from %s broke for %s %s: %s", lease.state.id, request.method,
                    request.path, message)
        if response.content_type == "text/event-stream":
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(self.idle_timeout):
                    await response.write(sse_error_event(message, "upstream_error", 502))
        transport = request.transport
        if transport is not None:
            # No terminating chunk: the client's HTTP layer reports an incomplete body.
            transport.abort()

    def _client_gone(self, lease: Lease, record: RequestRecord) -> None:
        lease.client_gone = True
        record.status = 499
        self.metrics.client_disconnect(lease.pool.name)
