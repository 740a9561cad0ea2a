"""Running aiohttp apps: the one place balancer adapts aiohttp's server, and its front door.

What a client can do to the process before any handler runs is decided here:

- **how many requests are read or answered at once** (:class:`FrontDoor`, in front of the
  app's handler, so before any body is read): beyond ``limits.max_concurrent_requests`` a
  503 with ``Retry-After``;
- **how slowly a client may send**: a request head must arrive within
  ``limits.client_header_timeout`` of its first byte (:class:`_JsonErrorHandler`), its body
  within ``limits.client_body_timeout`` of the head (:class:`FrontDoor`); either way a 408
  and the connection closes. Idle keep-alive connections close after
  ``limits.client_keepalive_timeout`` (aiohttp's own timer, which also closes a connection
  that never sends a byte);
- **what it learns**: responses carry ``Server: balancer``, never the Python and aiohttp
  versions; the listening ports are bound before anything starts (:func:`listen`), so a port
  in use stops the process with one line naming it;
- **who it is**: :func:`client_address` reads ``X-Forwarded-For`` only as far as
  ``server.trusted_proxies`` allow.

Everything uses aiohttp's public API (``AppRunner``, ``BaseSite``, ``Server`` and
``RequestHandler``), except two hooks. HTTP-level parse errors (an oversized header, a bad
request line) never reach an application or its middlewares, and aiohttp has no option to
choose the low-level handler class that answers them: :class:`JsonErrorRunner` overrides the
runner's server factory, ``AppRunner._make_server``, to serve with :class:`_JsonErrorHandler`
so those answers are OpenAI-style JSON like every other error. And aiohttp has no timeout for
a request head: the handler watches ``data_received`` and the ``_waiter`` future that
``RequestHandler.start`` awaits between requests. ``tests/unit/test_httpserver.py`` pins the
aiohttp code this relies on, so an upgrade that changes it fails loudly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.streams import StreamReader

from balancer.errors import (
    BalancerError,
    ConcurrencyLimitError,
    RequestTimeoutError,
    StartupError,
    error_body,
)
from balancer.logs import Throttle

log = logging.getLogger("balancer.server")

SUPPORTED_AIOHTTP: Final = ((3, 10), (3, 14))
"""The aiohttp versions (major, minor) whose ``AppRunner._make_server`` and
``RequestHandler`` internals this was checked against."""

SERVER_NAME: Final = "balancer"
"""The ``Server`` header of every response, on both ports (aiohttp's default names the
Python and aiohttp versions, which helps only someone looking for a known bug)."""

LOG_INTERVAL: Final = 10.0
"""Seconds between two log lines about refused or timed-out clients: an overload or a
slowloris flood is one line per interval with a count, never one line per request."""

OnClientError = Callable[[str], None]
"""Told the reason ("malformed_http") of each HTTP-level request error."""
Screen = Callable[[web.BaseRequest], "web.StreamResponse | None"]
"""Looks at a request before the app does; returns the answer that refuses it, or None."""
OnEvent = Callable[[str], None]
"""Told a label: the rejection reason, or the phase of a client timeout."""
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- who the client is ------------------------------------------------------------------------


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """``server.trusted_proxies`` as networks (validated by the configuration already)."""
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


def hop_address(text: str) -> Address | None:
    """The address in one ``X-Forwarded-For`` entry (``203.0.113.7``, ``2001:db8::1``, and
    the forms with a port some proxies write: ``203.0.113.7:4711``, ``[2001:db8::1]:4711``);
    an IPv4-mapped IPv6 address as its IPv4 address. None when it is not an address."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)


def peer_trusted(peer: str, trusted: Sequence[Network]) -> bool:
    """Whether the TCP peer is one of the trusted proxies."""
    address = hop_address(peer)
    return address is not None and _trusted(address, trusted)


def client_address(peer: str, forwarded_for: str | None,
                   trusted: Sequence[Network]) -> str:
    """The client's address for logs: the first hop from the right of ``X-Forwarded-For`` +
    the TCP peer that is not a trusted proxy.

    With no trusted proxies (the default), or a peer that is not one, it is the peer:
    whatever a client writes into ``X-Forwarded-For`` is never believed. A trusted proxy's
    entries are believed hop by hop; an entry that is not an address ends the walk at the
    proxy that wrote it (the hop to its right). When every hop is trusted, the leftmost is
    the client.
    """
    current = hop_address(peer) if trusted else None
    if current is None or not _trusted(current, trusted):
        return peer
    if forwarded_for:
        for hop in reversed(forwarded_for.split(",")):
            address = hop_address(hop)
            if address is None:
                break
            current = address
            if not _trusted(address, trusted):
                break
    return str(current)


def forwarded_for(request: web.BaseRequest) -> str | None:
    """Every ``X-Forwarded-For`` header of the request as one list (a client may send
    several; they read as one, in order)."""
    values = request.headers.getall(hdrs.X_FORWARDED_FOR, ())
    if not values:
        return None
    return values[0] if len(values) == 1 else ", ".join(values)


def request_client(request: web.BaseRequest, trusted: Sequence[Network]) -> str:
    """The client address of ``request`` for logs (see :func:`client_address`)."""
    return client_address(request.remote or "", forwarded_for(request), trusted)


# -- the front door ---------------------------------------------------------------------------


def _json_error(exc: BalancerError) -> web.Response:
    """An answer the front door gives itself: OpenAI-style, ``Server: balancer``, and the
    connection closed after it (the body was not read, so the next request on it could not
    be told from the rest of this one)."""
    response = web.json_response(error_body(exc.message, exc.type, exc.status, exc.param),
                                 status=exc.status)
    response.headers[hdrs.SERVER] = SERVER_NAME
    if exc.retry_after is not None:
        response.headers[hdrs.RETRY_AFTER] = str(exc.retry_after)
    response.force_close()
    return response


def _raw_error(exc: BalancerError, reason: str) -> bytes:
    """A whole HTTP/1.1 error response as bytes, for a connection that has no request object
    (a request head that never completed)."""
    body = json.dumps(error_body(exc.message, exc.type, exc.status)).encode()
    head = (f"HTTP/1.1 {exc.status} {reason}\r\nServer: {SERVER_NAME}\r\n"
            f"Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _BodyDeadline:
    """Cancels the request's handler if the body has not all arrived by the deadline.
    Disarmed as soon as the body ends (the payload's EOF callback), so a request whose body
    came costs one timer that never fires."""

    __slots__ = ("_handle", "_payload", "_task", "fired")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float,
                 payload: StreamReader, task: asyncio.Task[Any]) -> None:
        self._payload = payload
        self._task = task
        self.fired = False
        self._handle: asyncio.TimerHandle | None = loop.call_later(seconds, self._expire)
        payload.on_eof(self.cancel)

    def _expire(self) -> None:
        self._handle = None
        if not self._payload.is_eof() and not self._task.done():
            self.fired = True
            self._task.cancel()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class FrontDoor:
    """What every request on a port passes before the app sees it: the cap on requests in
    progress and the deadline for a request's body, and the count and the rate-limited log
    of what it turned away (with :class:`_JsonErrorHandler`'s head timeouts).

    The cap is taken before the app's handler (and aiohttp's ``Expect: 100-continue``
    answer) runs, so a refused request's body is never read into memory: balancer holds at
    most ``max_concurrent`` bodies, whatever the number of clients.
    """

    def __init__(self, name: str, *, max_concurrent: int = 0, body_timeout: float = 0.0,
                 trusted: Sequence[Network] = (), on_reject: OnEvent | None = None,
                 on_timeout: OnEvent | None = None, screen: Screen | None = None) -> None:
        self.name = name
        """The port, for log lines ("proxy", "admin")."""
        self.screen = screen
        """Answers a request whose target is not a path (absolute-form, ``CONNECT``, ``*``)
        or whose version is HTTP/0.9, if it refuses it: such requests match no route, and
        checking here costs the rest nothing (no middleware on every request)."""
        self.max_concurrent = max_concurrent
        """Requests in progress at most (0: no cap)."""
        self.body_timeout = body_timeout
        """Seconds from the request head to the end of its body (0: no deadline)."""
        self.active = 0
        """Requests in progress: admitted, their handler not yet returned."""
        self.handler: Handler | None = None
        """The app's handler, set by the runner when it starts."""
        self._trusted = tuple(trusted)
        self._on_reject = on_reject
        self._on_timeout = on_timeout
        self._refusals = Throttle(LOG_INTERVAL)
        self._timeouts = Throttle(LOG_INTERVAL)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = self.handler
        assert handler is not None, "the runner sets the handler before serving"
        if self.screen is not None and (not request.raw_path.startswith("/")
                                        or request.version < (1, 0)):
            refused = self.screen(request)
            if refused is not None:
                return refused
        if self.max_concurrent and self.active >= self.max_concurrent:
            return self._refuse(request)
        self.active += 1
        deadline = None
        payload = request.content
        if self.body_timeout and not payload.is_eof():
            task = asyncio.current_task()
            assert task is not None
            deadline = _BodyDeadline(asyncio.get_running_loop(), self.body_timeout, payload,
                                     task)
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if deadline is None or not deadline.fired:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            return self._body_late(request)
        finally:
            self.active -= 1
            if deadline is not None:
                deadline.cancel()

    def _refuse(self, request: web.BaseRequest) -> web.Response:
        if self._on_reject is not None:
            self._on_reject(ConcurrencyLimitError.reason)
        unlogged = self._refusals.allow(asyncio.get_running_loop().time())
        if unlogged is not None:
            log.warning("%s port: %d requests in progress, the limit "
                        "(limits.max_concurrent_requests): answering 503 to %s %s from %s "
                        "(%d more refused since the last such line)", self.name, self.active,
                        request.method, request.path, request_client(request, self._trusted),
                        unlogged)
        return _json_error(ConcurrencyLimitError(
            f"balancer is handling its limit of {self.max_concurrent} requests; retry later"))

    def _body_late(self, request: web.BaseRequest) -> web.Response:
        self.timed_out("body", f"{request.method} {request.path} from "
                               f"{request_client(request, self._trusted)}")
        return _json_error(RequestTimeoutError(
            f"the request body did not arrive within {self.body_timeout:g} s"))

    def timed_out(self, phase: str, who: str) -> None:
        """A client was cut off for sending too slowly: count it, and log it at a rate that
        cannot flood."""
        if self._on_timeout is not None:
            self._on_timeout(phase)
        unlogged = self._timeouts.allow(asyncio.get_running_loop().time())
        if unlogged is not None:
            log.info("%s port: request %s too slow from %s: answered 408 and closed (%d more "
                     "client timeouts since the last such line)", self.name, phase, who,
                     unlogged)


# -- aiohttp's server, adapted ----------------------------------------------------------------


class _JsonErrorHandler(web.RequestHandler):
    """One client connection: answers HTTP-level parse errors with an OpenAI-style JSON body
    instead of aiohttp's plain text, so every 4xx a client sees from balancer has the same
    shape, and cuts off a request head that takes longer than ``header_timeout``."""

    __slots__ = ("_front", "_head_timer", "_header_timeout", "_on_client_error")

    def __init__(self, manager: web.Server, *, on_client_error: OnClientError | None,
                 front: FrontDoor | None, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._on_client_error = on_client_error
        self._front = front
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        # The base class named, not super(): no super object per read of every request.
        web.RequestHandler.data_received(self, data)
        # Between requests ``start`` awaits ``_waiter`` until the parser has a whole head.
        # Still waiting after bytes arrived: a head has begun and is not complete; time it
        # from its first bytes. Not waiting (a head completed, or a request is running and
        # these bytes are its body): no head is pending.
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._head_timer is None and data and self._header_timeout:
                self._head_timer = self._loop.call_later(self._header_timeout,
                                                         self._head_late)
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        transport = self.transport
        if waiter is None or waiter.done() or transport is None:
            return
        if self._front is not None:
            peer = transport.get_extra_info("peername")
            self._front.timed_out("header", str(peer[0]) if peer else "an unknown peer")
        transport.write(_raw_error(RequestTimeoutError(
            f"the request head did not arrive within {self._header_timeout:g} s"),
            "Request Timeout"))
        self.force_close()  # closes the transport once the answer is written

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        if status >= 500:
            response.headers[hdrs.SERVER] = SERVER_NAME
            return response
        if self._on_client_error is not None:
            self._on_client_error("malformed_http")
        text = getattr(exc, "message", None) or message or "bad request"
        body = error_body(f"malformed HTTP request: {text}", "invalid_request_error", status)
        json_response = web.json_response(body, status=status)
        json_response.headers[hdrs.SERVER] = SERVER_NAME
        json_response.force_close()
        return json_response


class _JsonErrorServer(web.Server):
    """A ``web.Server`` whose connections are served by :class:`_JsonErrorHandler`."""

    def __init__(self, handler: Any, *, on_client_error: OnClientError | None,
                 front: FrontDoor | None, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._handler_kwargs = {k: v for k, v in kwargs.items()
                                if k not in ("request_factory", "handler_cancellation", "loop")}
        self._on_client_error = on_client_error
        self._front = front
        self._header_timeout = header_timeout

    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(self, loop=asyncio.get_running_loop(),
                                 on_client_error=self._on_client_error, front=self._front,
                                 header_timeout=self._header_timeout, **self._handler_kwargs)


class JsonErrorRunner(web.AppRunner):
    """An ``AppRunner`` whose server answers malformed HTTP with JSON errors and admits
    requests through a :class:`FrontDoor`."""

    def __init__(self, app: web.Application, *, on_client_error: OnClientError | None = None,
                 front: FrontDoor | None = None, header_timeout: float = 0.0,
                 handle_signals: bool = False, **server_kwargs: Any) -> None:
        super().__init__(app, handle_signals=handle_signals, **server_kwargs)
        self._on_client_error = on_client_error
        self._front = front
        self._header_timeout = header_timeout
        self._server_kwargs = server_kwargs
        """Our own copy of the options for the server and its connections' handlers."""

    # WORKAROUND ALERT: aiohttp (3.10-3.14) has no public way to choose the handler class
    # that answers HTTP-level parse errors. The base method starts the app and builds a
    # plain web.Server; we keep everything it set up (the app's handler and request
    # factory, both public attributes of web.Server) and serve with our subclass instead.
    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        handler = base.request_handler
        if self._front is not None:
            self._front.handler = handler
            handler = self._front
        return _JsonErrorServer(handler, request_factory=base.request_factory,
                                on_client_error=self._on_client_error, front=self._front,
                                header_timeout=self._header_timeout, **self._server_kwargs)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[hdrs.SERVER] = SERVER_NAME


def make_runner(app: web.Application, *, proxy: bool, max_header_bytes: int = 8190,
                on_client_error: OnClientError | None = None, front: FrontDoor | None = None,
                header_timeout: float = 0.0, keepalive_timeout: float | None = None
                ) -> web.AppRunner:
    """A runner with the options the proxy needs (handler cancellation frees a disconnected
    client's endpoint at once; header limits from the settings), the client timeouts
    (0 or None: aiohttp's default) and ``Server: balancer`` on every response."""
    kwargs: dict[str, Any] = {"access_log": None}
    if proxy:
        kwargs.update(handler_cancellation=True, max_field_size=max_header_bytes,
                      max_line_size=max_header_bytes)
    if keepalive_timeout:
        kwargs["keepalive_timeout"] = keepalive_timeout
    if not proxy and _server_header not in app.on_response_prepare:
        # The proxy port's answers set the header where they are built (forward.py,
        # errors, /v1/models): a signal is a coroutine per response on the hot path.
        app.on_response_prepare.append(_server_header)
    return JsonErrorRunner(app, on_client_error=on_client_error, front=front,
                           header_timeout=header_timeout, **kwargs)


# -- listening --------------------------------------------------------------------------------


class _BoundSite(web.BaseSite):
    """A site on sockets :func:`listen` bound before the app started; it starts accepting
    connections when the site starts."""

    __slots__ = ("_bound",)

    def __init__(self, runner: web.BaseRunner, bound: asyncio.Server) -> None:
        super().__init__(runner)
        self._bound = bound

    @property
    def name(self) -> str:
        return ", ".join(f"http://{sock.getsockname()[0]}:{sock.getsockname()[1]}"
                         for sock in self._bound.sockets)

    async def start(self) -> None:
        await super().start()
        self._server = self._bound
        await self._bound.start_serving()


async def listen(runner: web.BaseRunner, host: str, port: int, setting: str) -> asyncio.Server:
    """Bind ``host:port`` for ``runner`` without accepting yet (see :func:`serve_on`).

    Binding first means a port in use, or an address the host does not have, stops the
    process before any background work started, with a :class:`StartupError` naming the
    address and the ``setting`` it came from instead of a traceback.
    """

    def connection() -> asyncio.Protocol:
        server = runner.server
        assert server is not None, "connections are accepted only once the runner is set up"
        return server()

    try:
        return await asyncio.get_running_loop().create_server(
            connection, host, port, reuse_address=True, backlog=128, start_serving=False)
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise StartupError(f"cannot listen on {host}:{port} ({setting}): {why}") from None


async def serve_on(runner: web.BaseRunner, bound: asyncio.Server) -> None:
    """Start accepting on sockets :func:`listen` bound, for the (set-up) ``runner``."""
    await _BoundSite(runner, bound).start()


def bound_port(runner: web.AppRunner) -> int:
    """The port the runner's first site listens on (the one picked for port 0)."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("site has no bound socket")


async def stop_accepting(runner: web.AppRunner) -> None:
    """Close the runner's listening sockets and its idle keep-alive connections; requests
    in flight carry on, and their connections close when they end."""
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()


async def stop(runner: web.AppRunner, grace: float | None = None) -> None:
    """Stop listening and cut requests still running after ``grace`` seconds (default:
    aiohttp's), then run the app's cleanup."""
    if grace is not None and runner.server is not None:
        await stop_accepting(runner)
        await runner.server.shutdown(grace)
    await runner.cleanup()
