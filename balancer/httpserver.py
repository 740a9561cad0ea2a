"""Running aiohttp apps: the one place balancer adapts aiohttp's server.

Everything here uses aiohttp's public API (``AppRunner``, ``TCPSite``, ``Server`` and
``RequestHandler``), except one hook: HTTP-level parse errors (an oversized header, a bad
request line) never reach an application or its middlewares, and aiohttp has no option to
choose the low-level handler class that answers them. :class:`JsonErrorRunner` overrides the
runner's server factory, ``AppRunner._make_server``, to serve with
:class:`_JsonErrorHandler` so those answers are OpenAI-style JSON like every other error.
``tests/unit/test_httpserver.py`` pins the aiohttp code this relies on, so an upgrade that
changes it fails loudly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from balancer.errors import error_body

SUPPORTED_AIOHTTP: Final = ((3, 10), (3, 14))
"""The aiohttp versions (major, minor) whose ``AppRunner._make_server`` this was checked
against."""

OnClientError = Callable[[str], None]
"""Told the reason ("malformed_http") of each HTTP-level request error."""


class _JsonErrorHandler(web.RequestHandler):
    """Answers HTTP-level parse errors with an OpenAI-style JSON body instead of aiohttp's
    plain text, so every 4xx a client sees from balancer has the same shape."""

    def __init__(self, manager: web.Server, *, on_client_error: OnClientError | None,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._on_client_error = on_client_error

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        if status >= 500:
            return response
        if self._on_client_error is not None:
            self._on_client_error("malformed_http")
        text = getattr(exc, "message", None) or message or "bad request"
        body = error_body(f"malformed HTTP request: {text}", "invalid_request_error", status)
        json_response = web.json_response(body, status=status)
        json_response.force_close()
        return json_response


class _JsonErrorServer(web.Server):
    """A ``web.Server`` whose connections are served by :class:`_JsonErrorHandler`."""

    def __init__(self, handler: Any, *, on_client_error: OnClientError | None,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._handler_kwargs = {k: v for k, v in kwargs.items()
                                if k not in ("request_factory", "handler_cancellation", "loop")}
        self._on_client_error = on_client_error

    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(self, loop=asyncio.get_running_loop(),
                                 on_client_error=self._on_client_error,
                                 **self._handler_kwargs)


class JsonErrorRunner(web.AppRunner):
    """An ``AppRunner`` whose server answers malformed HTTP with JSON errors."""

    def __init__(self, app: web.Application, *, on_client_error: OnClientError | None = None,
                 handle_signals: bool = False, **server_kwargs: Any) -> None:
        super().__init__(app, handle_signals=handle_signals, **server_kwargs)
        self._on_client_error = on_client_error
        self._server_kwargs = server_kwargs
        """Our own copy of the options for the server and its connections' handlers."""

    # WORKAROUND ALERT: aiohttp (3.10-3.14) has no public way to choose the handler class
    # that answers HTTP-level parse errors. The base method starts the app and builds a
    # plain web.Server; we keep everything it set up (the app's handler and request
    # factory, both public attributes of web.Server) and serve with our subclass instead.
    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _JsonErrorServer(base.request_handler, request_factory=base.request_factory,
                                on_client_error=self._on_client_error, **self._server_kwargs)


def make_runner(app: web.Application, *, proxy: bool, max_header_bytes: int = 8190,
                on_client_error: OnClientError | None = None) -> web.AppRunner:
    """A runner with the options the proxy needs (handler cancellation frees a disconnected
    client's endpoint at once; header limits from the settings)."""
    kwargs: dict[str, Any] = {"access_log": None}
    if proxy:
        kwargs.update(handler_cancellation=True, max_field_size=max_header_bytes,
                      max_line_size=max_header_bytes)
    return JsonErrorRunner(app, on_client_error=on_client_error, **kwargs)


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
