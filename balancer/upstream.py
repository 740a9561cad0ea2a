"""HTTP/1.1 client for model servers: a keep-alive connection pool per endpoint.

The proxy's upstream hop is one request shape over and over (a small JSON body out, a JSON
body or an SSE stream back, over plain keep-alive connections to a handful of endpoints), and
it runs once per inference request. A general-purpose client spends most of its time on
features this hop never uses (cookies, redirects, proxies, auth, tracing, URL
normalisation): measured here, aiohttp's ``ClientSession`` costs ~85 µs of CPU per request
against ~16 µs for a protocol over llhttp (``httptools``), and that difference is a third of
the proxy's whole budget per request.

So this module is a small ``asyncio.Protocol`` over ``httptools``' response parser (the llhttp
C parser Node.js uses), which does the real work of HTTP/1.1 framing: chunked decoding,
Content-Length, keep-alive semantics. What it adds:

- a :class:`ConnectionPool` of idle connections per endpoint, most recently used first,
  dropped after ``KEEPALIVE_IDLE`` seconds (below the 5 s keep-alive of uvicorn, which vLLM
  and SGLang run on, so we rarely race a server closing an idle connection) or when the
  server closes them; the endpoint's state owns its pool and closes it when the endpoint
  leaves (:class:`Connector` opens them);
- the keep-alive race handled the way Go's ``net/http`` does: a request on a *reused*
  connection that dies before any response byte is sent again once on a fresh connection if
  it is replayable (``replayable=True``, the default), or else only when none of it reached
  the socket (the transport was already closing), since a server that read it may have acted
  on it;
- strictness where a proxy needs it: bytes with no request waiting for them (on an idle
  connection, or after a complete response) close the connection instead of being swallowed;
  interim 1xx answers are skipped, a protocol switch (101) is refused; a response head over
  :data:`MAX_HEAD_SIZE` or :data:`MAX_HEADER_LINES` is refused; trailers are dropped, never
  merged into the head; :meth:`Response.read_all` reads at most a byte limit; a connection is
  reused only once its whole request went out (a server may answer, say 413, before reading
  the whole body);
- flow control: reading from the model server pauses while the client is slower than it;
- deadlines on the waits for the model server (the response head, each body read), so a
  timeout is always time the model server kept us waiting and never time spent elsewhere
  (writing to a slow client, say). One lazy timer per response: buffered data never waits,
  and a steady stream re-arms the timer about once per window, not once per chunk;
- errors that say what happened: :class:`UpstreamConnectError` (nothing reached the server),
  :class:`UpstreamResetError` (the connection died before the response head),
  :class:`UpstreamBodyError` (it died mid-body), :class:`UpstreamTimeoutError` (a deadline
  passed while waiting for the server), :class:`UpstreamProtocolError` (the answer is not one
  a proxy can relay).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import ssl
import time
from collections.abc import Sequence
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

KEEPALIVE_IDLE: Final = 4.0
"""Seconds an idle connection is kept; below uvicorn's default 5 s keep-alive timeout."""
MAX_IDLE_PER_ENDPOINT: Final = 256
"""Idle connections kept per endpoint; more are closed when released."""
_HIGH_WATER: Final = 256 * 1024
"""Buffered response bytes above which reading from the model server pauses."""
_LOW_WATER: Final = 64 * 1024
WRITE_SLICE: Final = 256 * 1024
"""Bytes of a request body handed to the transport per event-loop iteration. A transport
tries the socket at once, and one send of a 10 MiB body copies as much as the kernel's send
buffer takes (4 MiB on loopback, ~2-3 ms) in one call on the loop every stream shares; in
slices of 256 KiB each call stays well under a millisecond."""
MAX_HEAD_SIZE: Final = 64 * 1024
"""Bytes of response head accepted from a model server (status lines and header lines,
interim 1xx heads included); more is a bad gateway. Model servers send a few hundred bytes;
the bound keeps a broken or hostile one from growing the proxy's memory without end, since
llhttp sets no limit and httptools joins the pieces of a header in memory until it ends.
nginx's proxy answers 502 ("upstream sent too big header") past 4-8 KiB by default; 64 KiB
leaves room for long tracing or cookie headers an API gateway in front of a server may add."""
MAX_HEADER_LINES: Final = 256
"""Header lines accepted in a response head; more is a bad gateway. vLLM and SGLang send under
ten; hyper's client refuses more than 100 by default. Lines are bounded separately because
many tiny lines (``a:b``) fit in :data:`MAX_HEAD_SIZE` and each costs a tuple and a filter
pass on the way to the client."""
READ_ALL_LIMIT: Final = 1 << 20
"""Default cap, in bytes, of :meth:`Response.read_all`, which holds a body in memory: the
forwarder reads whole only answers up to 1 MiB long and error answers (429, 502-504) that it
may retry elsewhere, whose length a chunked answer does not announce."""

log = logging.getLogger("balancer.upstream")


class UpstreamError(Exception):
    """A failure talking to a model server."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made: nothing was sent."""


class UpstreamTLSError(UpstreamConnectError):
    """The TLS handshake failed (the certificate did not verify, the server refused ours):
    nothing was sent."""


def _ssl_reason(exc: ssl.SSLError) -> str:
    """An SSL error in a few words: the verification message when there is one (``self
    signed certificate in certificate chain``, ``Hostname mismatch...``), else the
    library's reason."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return exc.reason or str(exc)


class UpstreamResetError(UpstreamError):
    """The connection failed after the request was sent, before the response head."""


class UpstreamBodyError(UpstreamError):
    """The connection failed in the middle of the response body."""


class UpstreamTimeoutError(UpstreamError):
    """A deadline passed while waiting for the model server (to connect, for the response
    head, or for more of the body)."""


class UpstreamProtocolError(UpstreamError):
    """The model server answered with something a proxy of this API cannot relay: bytes that
    are not an HTTP/1.1 response, or a protocol switch (101). The connection is closed; for
    the client it is a bad gateway (502), like a reset."""


class UpstreamTooLargeError(UpstreamProtocolError):
    """A response head over :data:`MAX_HEAD_SIZE` or :data:`MAX_HEADER_LINES`, or a body over
    the limit of :meth:`Response.read_all`."""


class _Discard(list[tuple[bytes, bytes]]):
    """Where trailer fields go once the head is built: nowhere. The client's head is decided
    by then (they must never be sent as headers after it), the proxy does not forward
    ``TE: trailers`` (hop-by-hop), and RFC 9110 (section 6.5.1) lets a recipient discard
    trailer fields. Nothing is kept, so endless trailers cost no memory."""

    def append(self, item: tuple[bytes, bytes]) -> None:
        pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._response: Response | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        """Bytes received while the head was awaited (the head, and any interim heads)."""
        self._interim_size = 0
        """Bytes of the interim heads received before the final one (at least)."""
        self._in_flight = False
        """A request was sent and its final response has not ended: bytes are expected."""
        self.unsent = False
        """The current request's write was dropped or failed at once: none of it was sent."""
        self._write_pending = False
        """Request bytes are still buffered in the transport, not yet handed to the kernel."""
        self._rest: memoryview | None = None
        """The part of a large request body not yet handed to the transport (see
        :data:`WRITE_SLICE`)."""
        self._trailers = _Discard()

    @property
    def received_any(self) -> bool:
        """Some of the answer to the current request arrived."""
        return self._head_size > 0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        # With no high-water mark, pause_writing says that some request bytes wait in the
        # transport, and resume_writing that they all went out: a connection is reused only
        # once its whole request did (a server may answer before reading all of the body).
        if self._pool.secure:
            # A TLS transport pauses at a buffer size >= high, a plain one at > high: 1 is
            # the same rule there. (Its size counts the bytes not yet encrypted or handed to
            # the socket's transport, which buffers up to its own high-water mark, 64 KiB,
            # unseen: a TLS connection may be judged sent that much early.) With 0 it would
            # pause at once, with nothing buffered, and never be reused.
            self.transport.set_write_buffer_limits(high=1, low=0)
        else:
            self.transport.set_write_buffer_limits(high=0)

    def data_received(self, data: bytes) -> None:
        if self._head_waiter is None:
            if self._in_flight:  # the body
                try:
                    self._parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    self._broken(exc)
            else:
                self._unsolicited("on an idle connection" if self._response is None
                                  else "after the end of the response")
                self.close()
            return
        # The head is awaited: these bytes count against MAX_HEAD_SIZE.
        self._head_size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(exc)
            return
        except httptools.HttpParserUpgrade:
            # llhttp stops at a 101 with Upgrade headers (on_headers_complete refuses a 101
            # first; this is the parser's own word for the same thing).
            self._fail(UpstreamProtocolError("the model server switched protocols"))
            self.close()
            return
        if self._head_waiter is not None and self._head_size > MAX_HEAD_SIZE:
            # All of these bytes were head, and it is not over yet.
            self._fail(UpstreamTooLargeError(
                f"response head over {MAX_HEAD_SIZE} bytes and not finished"))
            self.close()

    def eof_received(self) -> bool | None:
        # The server closed its side: nothing more comes, so a close-delimited body ends now
        # (in connection_lost), and an idle connection leaves the pool at once. Request bytes
        # still buffered are dropped (abort): a server that closed cannot answer them.
        self.close(abort=True)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._in_flight = False
        self._write_pending = False
        self._rest = None
        self._pool._forget(self)
        response = self._response
        if response is not None and not response.complete and self._head_waiter is None \
                and not response._has_length and not response._chunked:
            # A body delimited by the connection closing (no length, not chunked) ends here.
            response._finish(keep_alive=False)
            return
        reason = f": {exc}" if exc else ""
        if self._head_waiter is not None:
            self._fail(UpstreamResetError(f"connection closed before the response{reason}"))
        else:
            self._fail(UpstreamBodyError(f"connection closed mid-response{reason}"))

    def pause_writing(self) -> None:
        self._write_pending = True

    def resume_writing(self) -> None:
        self._write_pending = False
        if self._rest is not None:
            self._write_rest()

    def _write_rest(self) -> None:
        """Hand the transport the next slice of the body: once the one before has gone out
        (resume_writing), or on the next loop iteration when it went at once."""
        rest, transport = self._rest, self.transport
        if rest is None or self.closed or transport is None or transport.is_closing():
            self._rest = None
            return
        self._rest = rest[WRITE_SLICE:] if len(rest) > WRITE_SLICE else None
        transport.write(rest[:WRITE_SLICE])
        if self._rest is not None and not self._write_pending:
            self._loop.call_soon(self._write_rest)

    @property
    def _unsent_bytes(self) -> bool:
        """Some of the request has not reached the kernel yet."""
        return self._write_pending or self._rest is not None

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._in_flight:
            # A second response in the same read as the first (the next read is refused in
            # data_received): never parse it as the answer to anything.
            self._unsolicited("after the end of the response")
            raise UpstreamProtocolError("bytes after the end of the response")

    def on_header(self, name: bytes, value: bytes | None) -> None:
        self._headers.append((name, value or b""))

    def on_headers_complete(self) -> None:
        response = self._response
        waiter = self._head_waiter
        if response is None or waiter is None:
            return
        status = self._parser.get_status_code()
        if status < 200:
            if status >= 100 and status != 101:
                # An interim response (100 Continue, 103 Early Hints): wait for the final one.
                self._interim_size += _head_bytes(self._headers)
                self._headers = []
                return
            raise UpstreamProtocolError(
                "the model server switched protocols (101); a proxy of this API cannot "
                "relay that" if status == 101 else f"invalid response status {status}")
        headers = self._headers
        if len(headers) > MAX_HEADER_LINES:
            raise UpstreamTooLargeError(
                f"response head has {len(headers)} header lines, over {MAX_HEADER_LINES}")
        if self._head_size > MAX_HEAD_SIZE \
                and self._interim_size + _head_bytes(headers) > MAX_HEAD_SIZE:
            # The reads that carried the head were long, and they may hold body bytes too:
            # the head itself (and the interim heads before it) is what counts.
            raise UpstreamTooLargeError(f"response head over {MAX_HEAD_SIZE} bytes")
        self._headers = self._trailers  # trailers, if any, after the body
        response._set_head(status, headers, self._parser.should_keep_alive())
        self._head_waiter = None
        if not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        if self._head_waiter is not None:
            return  # an interim response ended; the final one follows
        self._in_flight = False
        response = self._response
        if response is not None:
            response._finish(keep_alive=self._parser.should_keep_alive())

    # -- used by the pool and the response ---------------------------------------------------

    def send(self, head: bytes, body: bytes, response: Response) -> asyncio.Future[None]:
        """Write the request; returns the future the response head resolves."""
        transport = self.transport
        assert transport is not None
        self._response = response
        self._headers = []
        self._head_size = self._interim_size = 0
        self._in_flight = True
        self._parser = httptools.HttpResponseParser(self)
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._head_waiter = waiter
        response._connection = self
        if len(body) > WRITE_SLICE:
            self._rest = memoryview(body)
            transport.write(head)
            self._write_rest()
        elif body:
            transport.writelines((head, body))
        else:
            transport.write(head)
        # Both uvloop and asyncio try the socket at once: a transport closing now either
        # dropped the write (it was closing already) or failed its first send, so none of
        # the request reached the server.
        self.unsent = transport.is_closing()
        return waiter

    def _fail(self, exc: UpstreamError) -> None:
        waiter = self._head_waiter
        if waiter is not None:
            self._head_waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
        elif self._response is not None:
            self._response._error(exc)

    def _broken(self, exc: Exception) -> None:
        """The parser refused the bytes, or a callback refused the response (its error is
        the context of httptools' error): fail the wait or the body, and close."""
        cause = exc.__context__
        if isinstance(cause, UpstreamError):
            error = cause
        elif self._head_waiter is not None:
            error = UpstreamProtocolError(f"invalid HTTP response: {exc}")
        else:
            error = UpstreamBodyError(f"invalid HTTP response: {exc}")
        self._fail(error)
        self.close()

    def _unsolicited(self, where: str) -> None:
        log.warning("model server %s sent bytes %s; closing the connection", self._pool.url,
                    where)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self, *, abort: bool = False) -> None:
        """Close now. Request bytes still unsent are dropped (``abort``) rather than flushed
        first: nothing will read an answer to them, and a server that stopped reading would
        keep the transport open for ever."""
        if not self.closed:
            self.closed = True
            self._pool._forget(self)
            if self.transport is not None:
                if abort or self._unsent_bytes:
                    self.transport.abort()
                else:
                    self.transport.close()

    def release(self, reusable: bool) -> None:
        self._response = None
        # not self._unsent_bytes, without the property's call
        if reusable and not self.closed and not self._write_pending and self._rest is None:
            self._pool._put_idle(self)
        else:
            self.close()


class Response:
    """A response being received: status and headers now, the body chunk by chunk."""

    __slots__ = (
        "_buffered", "_chunked", "_chunks", "_connection", "_deadline", "_exc", "_has_length",
        "_keep_alive", "_loop", "_paused", "_pending", "_skip_body", "_timer", "_waiter",
        "complete", "content_length", "headers", "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, *, skip_body: bool = False) -> None:
        self._loop = loop
        self._connection: _Connection | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self._has_length = False
        self._chunked = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: UpstreamError | None = None
        self._keep_alive = False
        self._skip_body = skip_body
        self.complete = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = math.inf
        self._pending: asyncio.Future[None] | None = None
        """The wait the timer guards: the head's or a body read's."""

    def _set_head(self, status: int, headers: list[tuple[bytes, bytes]],
                  keep_alive: bool) -> None:
        self.status = status
        self.headers = headers
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                try:
                    self.content_length = int(value)
                    self._has_length = True
                except ValueError:
                    pass
            elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
        if self._skip_body or status in (204, 304):
            # No body follows (a HEAD answer, or a status without content); llhttp cannot be
            # told about HEAD, so the connection is not reused.
            self._finish(keep_alive=keep_alive and not self._skip_body)

    def _feed(self, data: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self._connection is not None:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def _finish(self, keep_alive: bool) -> None:
        if not self.complete:
            self.complete = True
            self._keep_alive = keep_alive
            self._wake()

    def _error(self, exc: UpstreamError) -> None:
        if not self.complete and self._exc is None:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- deadlines ---------------------------------------------------------------------------

    def _guard(self, waiter: asyncio.Future[None], deadline: float) -> None:
        """Fail ``waiter`` if it is still pending at ``deadline`` (loop clock).

        The timer is re-armed only when it would fire after the new deadline; one that fires
        early re-arms itself for the current deadline, so a stream whose every read waits a
        little costs about one timer per window rather than one per read.
        """
        self._pending = waiter
        self._deadline = deadline
        if deadline == math.inf:
            return
        timer = self._timer
        if timer is None:
            self._timer = self._loop.call_at(deadline, self._on_deadline)
        elif timer.when() > deadline:
            timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        waiter = self._pending
        if waiter is None or waiter.done() or self._deadline == math.inf:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)
            return
        exc = UpstreamTimeoutError("the model server sent nothing before the deadline")
        if self._exc is None and not self.complete:
            self._exc = exc
        waiter.set_exception(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- reading -----------------------------------------------------------------------------

    async def read(self, deadline: float = math.inf, idle: float = 0.0) -> bytes:
        """All body bytes received so far, waiting for some; b"" at the end of the body.

        A wait ends by ``deadline`` (loop clock) and, when ``idle`` is set, ``idle`` seconds
        after it began, whichever comes first; then UpstreamTimeoutError. Bytes already
        buffered are returned without waiting, so they never time out. Raises
        UpstreamBodyError if the connection breaks before the body is complete.
        """
        while not self._chunks:
            if self.complete:
                return b""
            if self._exc is not None:
                raise self._exc
            waiter = self._waiter = self._loop.create_future()
            if idle:
                deadline = min(deadline, self._loop.time() + idle)
            self._guard(waiter, deadline)
            await waiter
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self._connection is not None:
            self._paused = False
            self._connection.resume_reading()
        return data

    async def read_all(self, deadline: float = math.inf, limit: int = READ_ALL_LIMIT, *,
                       truncate: bool = False) -> bytes:
        """The whole body, by ``deadline``, if it is at most ``limit`` bytes long.

        A longer body raises UpstreamTooLargeError (at once when its Content-Length says so);
        with ``truncate`` its first ``limit`` bytes are returned instead, for an error answer
        that is only relayed, whose start says what went wrong. Either way, unless the whole
        body had arrived already, the rest is left unread and the connection closes when the
        response is released.
        """
        if self.complete and not self._paused:
            # All of it came with the head, as most small answers do: nothing to wait for.
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            return data if len(data) <= limit else self._over_limit(data, limit, truncate)
        if self.content_length is not None and self.content_length > limit and not truncate:
            raise UpstreamTooLargeError(
                f"response body of {self.content_length} bytes, over the limit of {limit}")
        parts = []
        size = 0
        while chunk := await self.read(deadline):
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                return self._over_limit(b"".join(parts), limit, truncate)
        return b"".join(parts)

    @staticmethod
    def _over_limit(data: bytes, limit: int, truncate: bool) -> bytes:
        if truncate:
            return data[:limit]
        raise UpstreamTooLargeError(f"response body over the limit of {limit} bytes")

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def release(self) -> None:
        """Give the connection back (if the body was read whole) or close it. Idempotent."""
        self._cancel_timer()
        self._pending = None
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.release(self.complete and self._keep_alive and not self._chunks)


class ConnectionPool:
    """Keep-alive connections to one endpoint (one URL).

    An ``https`` URL is reached over TLS with ``ssl_context`` (the system's CAs when None),
    sending ``server_name`` as SNI and checking the certificate against it (the URL's host
    when empty). A path after the host is the endpoint's :attr:`prefix`: the caller puts it
    before the paths it sends."""

    def __init__(self, url: str, connect_timeout: float,
                 ssl_context: ssl.SSLContext | None = None, server_name: str = "") -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.secure = parts.scheme == "https"
        self.port = parts.port or (443 if self.secure else 80)
        self.prefix = parts.path.rstrip("/")
        """The URL's path (``/openai`` in ``https://gateway/openai``; usually empty)."""
        default_port = 443 if self.secure else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.ssl_context = (ssl_context or ssl.create_default_context()) if self.secure else None
        self.server_name = (server_name or self.host) if self.secure else None
        self.loop = asyncio.get_running_loop()
        self._idle: collections.deque[_Connection] = collections.deque()
        self._all: set[_Connection] = set()
        self.closed = False
        """No new connections are kept: released ones close."""

    @property
    def open_count(self) -> int:
        """Open connections, idle or busy."""
        return len(self._all)

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)

    def _put_idle(self, connection: _Connection) -> None:
        if self.closed or len(self._idle) >= MAX_IDLE_PER_ENDPOINT:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    async def _connect(self, deadline: float) -> _Connection:
        limit = self.loop.time() + self.connect_timeout
        try:
            async with asyncio.timeout_at(min(limit, deadline)):
                _, protocol = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl_context,
                    server_hostname=self.server_name,
                )
        except TimeoutError:
            if deadline < limit:
                raise UpstreamTimeoutError("the deadline passed while connecting") from None
            raise UpstreamConnectError(
                f"connect timed out after {self.connect_timeout:g} s") from None
        except ssl.SSLError as exc:
            # Before OSError, of which it is one: a certificate that does not verify, a
            # handshake the server refused. Nothing was sent.
            raise UpstreamTLSError(f"TLS handshake failed: {_ssl_reason(exc)}") from None
        except OSError as exc:
            raise UpstreamConnectError(exc.strerror or str(exc)) from None
        self._all.add(protocol)
        return protocol

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_IDLE:
                return connection
            connection.close()
        return None

    async def request(self, head: bytes, body: bytes, *, deadline: float = math.inf,
                      skip_body: bool = False, replayable: bool = True) -> Response:
        """Send a serialized request head and body; returns once the response head is in.

        ``deadline`` (loop clock) bounds connecting and the wait for the head; the returned
        response keeps it as the default for nothing else (each read takes its own).

        A request on a reused connection that dies before any byte of the answer (the
        keep-alive race: the server closed the idle connection as we sent on it) is sent once
        more on a fresh connection when it is ``replayable``. One that is not (a
        non-idempotent request: running it twice could do twice what it asks) is sent again
        only when none of it reached the socket; otherwise UpstreamResetError, since the
        server may have read it and acted on it. Go's ``net/http`` draws the same line
        (``nothingWrittenError`` against ``Request.isReplayable``).
        """
        connection = self._take_idle()
        if connection is not None:
            try:
                return await self._send(connection, head, body, skip_body, deadline)
            except UpstreamResetError as exc:
                if connection.received_any:
                    raise
                if not replayable and not connection.unsent:
                    raise UpstreamResetError(
                        f"{exc} (on a reused connection; not sent again: the request is not "
                        f"replayable)") from None
                # The keep-alive race: the server closed this idle connection as we sent on
                # it, and sent nothing back. Send once more on a fresh connection.
        connection = await self._connect(deadline)
        return await self._send(connection, head, body, skip_body, deadline)

    async def _send(self, connection: _Connection, head: bytes, body: bytes,
                    skip_body: bool, deadline: float) -> Response:
        response = Response(self.loop, skip_body=skip_body)
        try:
            head_received = connection.send(head, body, response)
            # The head's wait fails with UpstreamTimeoutError if the deadline passes first.
            response._guard(head_received, deadline)
            await head_received
        except BaseException:
            response._cancel_timer()
            connection.close()
            raise
        return response

    def close_idle(self) -> None:
        """Close the idle connections and keep no more; busy ones close when released (the
        endpoint moved to another URL, and its streams carry on)."""
        self.closed = True
        while self._idle:
            self._idle.pop().close()

    def close(self) -> None:
        """Close every connection, busy ones included."""
        self.closed = True
        for connection in list(self._all):
            connection.close()
        self._idle.clear()


def _head_bytes(headers: list[tuple[bytes, bytes]]) -> int:
    """The size of a response head with these header lines, at least: the shortest status
    line and the blank line (17 bytes), and 4 bytes a line for ": " and CRLF."""
    return 17 + sum(len(name) + len(value) + 4 for name, value in headers)


def serialize_head(method: str, target: str, host: str,
                   headers: Sequence[tuple[str, str]], body_length: int) -> bytes:
    """The request line and headers. aiohttp decodes header bytes as UTF-8 with
    surrogateescape, so encoding the same way gives the client's bytes back."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]  # no generator to resume
    if body_length or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {body_length}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class Connector:
    """Opens connection pools: the settings they share (connect timeout, TLS context and
    server name), one connector per routing pool."""

    def __init__(self, connect_timeout: float, ssl_context: ssl.SSLContext | None = None,
                 server_name: str = "") -> None:
        self.connect_timeout = connect_timeout
        self._ssl = ssl_context
        self.server_name = server_name

    def open(self, url: str) -> ConnectionPool:
        """A new, empty pool for ``url`` (needs a running loop)."""
        if url.startswith("https:") and self._ssl is None:
            # Built once, on the first https endpoint (loading the system CAs takes ms).
            self._ssl = ssl.create_default_context()
        return ConnectionPool(url, self.connect_timeout, self._ssl, self.server_name)
