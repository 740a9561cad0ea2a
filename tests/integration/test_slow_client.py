"""A client's time is the client's: slow readers are never an upstream timeout.

Real clients on sockets with a small receive buffer read a stream slower than the model
server sends it, so the balancer's writes to them block for longer than ``idle_timeout``
while the model server is as fast as ever. That must never count against the endpoint (no
upstream timeout, no ejection). A client that reads nothing at all for ``idle_timeout`` is
disconnected, as a client that went away (499).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer.config import LimitsSettings
from tests.conftest import RunningBalancer, chat_body, make_settings

CHUNK = b"data: " + b"x" * 65_000 + b"\n\n"
DONE = b"data: [DONE]\n\n"


@pytest.fixture
async def fast_stream() -> AsyncIterator[str]:
    """A model server that streams ``max_tokens`` chunks of 64 kB of SSE as fast as they
    are taken."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(body["max_tokens"]):
            await response.write(CHUNK)
        await response.write(DONE)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


async def start(start_balancer, url: str) -> RunningBalancer:
    settings = make_settings([url], limits=LimitsSettings(idle_timeout=0.3))
    settings = replace(settings, health=replace(settings.health, active=False,
                                                consecutive_failures=1))
    return await start_balancer(settings)


async def open_slow_client(port: int, chunks: int
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Request a stream of ``chunks`` chunks on a connection whose receive buffers are
    small, so the server feels every pause in reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    body = json.dumps(chat_body("a long story", stream=True, max_tokens=chunks)).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def test_a_slow_reading_client_does_not_eject_its_endpoint(fast_stream, start_balancer):
    """A client reading 16 kB every 30 ms (about 0.5 MB/s) gets the whole stream, though
    once the socket buffers between them are full (about 2.5 MB here) each write of the
    balancer waits for it longer than the idle timeout; its endpoint is charged no timeout,
    not ejected, still routable."""
    run = await start(start_balancer, fast_stream)
    chunks = 64  # 4 MB
    reader, writer = await open_slow_client(run.running.port, chunks)
    received = bytearray()
    try:
        async with asyncio.timeout(40):
            while not received.endswith(b"\r\n0\r\n\r\n"):
                data = await reader.read(16 * 1024)
                assert data, f"connection closed after {len(received)} bytes"
                received += data
                await asyncio.sleep(0.03)
    finally:
        writer.close()
    assert received.count(b"data: x") == chunks
    assert received.endswith(DONE + b"\r\n0\r\n\r\n")
    await run.wait_idle()
    assert await run.metric("balancer_upstream_errors_total") == 0
    assert await run.metric("balancer_endpoint_ejections_total") == 0
    assert await run.metric("balancer_client_disconnects_total") == 0
    assert await run.metric("balancer_requests_total", code="200") == 1
    pool = run.balancer.router.pools["llama"]
    assert pool.routable == tuple(pool.endpoints)


async def test_a_client_that_stops_reading_is_disconnected_as_gone(fast_stream,
                                                                   start_balancer):
    """A client that takes nothing for the idle timeout while a write waits is cut off: a
    499 and a client disconnect, never an upstream error or an ejection."""
    run = await start(start_balancer, fast_stream)
    _, writer = await open_slow_client(run.running.port, 384)  # 24 MB: more than any buffer
    try:
        await run.wait_idle(timeout=10)
    finally:
        writer.close()
    assert await run.metric("balancer_client_disconnects_total") == 1
    assert await run.metric("balancer_requests_total", code="499") == 1
    assert await run.metric("balancer_upstream_errors_total") == 0
    assert await run.metric("balancer_endpoint_ejections_total") == 0
    pool = run.balancer.router.pools["llama"]
    assert pool.routable == tuple(pool.endpoints)
