"""The upstream HTTP/1.1 client against raw TCP servers that send exact bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from balancer.upstream import (
    KEEPALIVE_IDLE,
    ConnectionPool,
    Connector,
    UpstreamBodyError,
    UpstreamConnectError,
    UpstreamResetError,
    UpstreamTimeoutError,
    serialize_head,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, list[int]]]]]:
    """Start a TCP server on 127.0.0.1 running a handler per connection; returns its URL and
    a list that records one entry per accepted connection."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> tuple[str, list[int]]:
        connections: list[int] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                             ) -> None:
            connections.append(1)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", connections

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


def head_for(upstream: ConnectionPool, body: bytes = b"{}", method: str = "POST") -> bytes:
    return serialize_head(method, "/v1/x", upstream.host_header,
                          [("Content-Type", "application/json")], len(body))


async def test_content_length_body_and_connection_reuse(raw_server):
    """A Content-Length response is read whole and its connection serves the next request."""
    async def handler(reader, writer):
        while True:
            head, body = await read_request(reader)
            assert b"Host: 127.0.0.1:" in head
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A: 1\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        for i in range(5):
            body = b'{"i": %d}' % i
            response = await upstream.request(head_for(upstream, body), body)
            assert response.status == 200
            assert response.content_length == len(body)
            assert response.header(b"x-a") == b"1"
            assert await response.read_all() == body
            response.release()
        assert len(connections) == 1
    finally:
        upstream.close()


async def test_chunked_body_arrives_chunk_by_chunk(raw_server):
    """Chunked transfer encoding is decoded, and a chunk is readable before the next is
    sent."""
    next_chunk = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: text/event-stream\r\n\r\n")
        writer.write(b"6\r\ndata:1\r\n")
        await writer.drain()
        await next_chunk.wait()
        writer.write(b"6\r\ndata:2\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert response.content_length is None
        assert await asyncio.wait_for(response.read(), 2) == b"data:1"
        next_chunk.set()
        assert await asyncio.wait_for(response.read(), 2) == b"data:2"
        assert await response.read() == b""
        assert response.complete
        response.release()
    finally:
        upstream.close()


async def test_body_delimited_by_close_is_complete(raw_server):
    """A response with neither length nor chunking ends when the server closes."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert await asyncio.wait_for(response.read_all(), 2) == b"all of it"
        response.release()
    finally:
        upstream.close()


async def test_connection_dropped_mid_body_raises_body_error(raw_server):
    """A body cut short raises UpstreamBodyError after the bytes that did arrive."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert await response.read() == b"partial"
        with pytest.raises(UpstreamBodyError):
            await asyncio.wait_for(response.read(), 2)
        response.release()
    finally:
        upstream.close()


async def test_connection_dropped_before_the_head_raises_reset(raw_server):
    """A server that closes without answering gives UpstreamResetError."""
    async def handler(reader, writer):
        await read_request(reader)

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        with pytest.raises(UpstreamResetError):
            await asyncio.wait_for(upstream.request(head_for(upstream), b"{}"), 2)
    finally:
        upstream.close()


async def test_refused_connection_raises_connect_error():
    """Nothing listening gives UpstreamConnectError (nothing was sent)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    url = f"http://127.0.0.1:{port}"
    upstream = Connector(connect_timeout=2).open(url)
    try:
        with pytest.raises(UpstreamConnectError):
            await upstream.request(head_for(upstream), b"{}")
    finally:
        upstream.close()


async def test_keepalive_race_is_retried_once_on_a_fresh_connection(raw_server):
    """A reused connection that dies before any response byte (the server closed it as we
    sent) is replaced by a fresh one, transparently."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # The next request on this connection is dropped unanswered, as when a server's
        # keep-alive timeout closes the connection just as a request arrives.
        await read_request(reader)

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        for _ in range(3):
            response = await upstream.request(head_for(upstream), b"{}")
            assert await response.read_all() == b"ok"
            response.release()
        assert len(connections) == 3
    finally:
        upstream.close()


async def test_a_fresh_connection_that_dies_is_not_retried(raw_server):
    """Only reused connections are retried: a new one failing is a real error."""
    async def handler(reader, writer):
        await read_request(reader)

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        with pytest.raises(UpstreamResetError):
            await upstream.request(head_for(upstream), b"{}")
        assert len(connections) == 1
    finally:
        upstream.close()


async def test_unfinished_response_closes_its_connection(raw_server):
    """Releasing a response before its end closes the connection instead of reusing it."""
    closed = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # returns when the client closes
        closed.set()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert await response.read() == b"abc"
        response.release()
        await asyncio.wait_for(closed.wait(), 2)
    finally:
        upstream.close()


async def test_head_and_no_content_responses_have_no_body(raw_server):
    """HEAD answers and 204s complete at their head."""
    async def handler(reader, writer):
        while True:
            head, _ = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(
            serialize_head("HEAD", "/", upstream.host_header, [], 0), b"", skip_body=True)
        assert response.status == 200 and await response.read() == b""
        response.release()
        response = await upstream.request(head_for(upstream), b"{}")
        assert response.status == 204 and await response.read() == b""
        response.release()
    finally:
        upstream.close()


async def test_interim_responses_are_skipped(raw_server):
    """A 100 Continue before the real answer is not mistaken for it."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx")
        await writer.drain()
        await reader.read()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert response.status == 201
        assert await response.read_all() == b"x"
        response.release()
    finally:
        upstream.close()


async def test_slow_reader_pauses_the_upstream(raw_server):
    """While the body is not read, buffered bytes stay bounded (reading pauses)."""
    sent = 0

    async def handler(reader, writer):
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"x" * 65536
        for _ in range(200):  # 13 MB offered
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            sent += len(block)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        await asyncio.sleep(0.5)
        assert sent < 200 * 65536, "the server must be blocked by the paused reader"
        total = 0
        while chunk := await asyncio.wait_for(response.read(), 5):
            assert len(chunk) <= 4 * 1024 * 1024
            total += len(chunk)
        assert total == 200 * 65536
        response.release()
    finally:
        upstream.close()


async def test_no_head_by_the_deadline_raises_timeout_and_closes(raw_server):
    """A server that takes the request and never answers times out at the deadline; the
    connection is closed, not reused."""
    closed = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        await reader.read()  # returns when the client closes
        closed.set()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeoutError):
            await upstream.request(head_for(upstream), b"{}", deadline=started + 0.2)
        # Bounded both ways: not before the deadline, and well within a loaded machine's lag.
        assert 0.19 <= loop.time() - started < 2
        await asyncio.wait_for(closed.wait(), 2)
        assert upstream.open_count == 0
    finally:
        upstream.close()


async def test_a_stalled_body_times_out_but_buffered_bytes_never_do(raw_server):
    """Bytes that arrived are returned even after the deadline; only a wait for more times
    out, and each wait gets its own idle window."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.3)
        assert await response.read(loop.time() - 1) == b"abc"  # past the deadline: buffered
        started = loop.time()
        with pytest.raises(UpstreamTimeoutError):
            await response.read(idle=0.2)
        assert 0.19 <= loop.time() - started < 2
        with pytest.raises(UpstreamTimeoutError):
            await response.read()  # the response stays failed
        response.release()
    finally:
        upstream.close()


async def test_a_steady_stream_under_its_idle_window_never_times_out(raw_server):
    """Chunks every 50 ms with a 200 ms idle window: the lazily re-armed timer never fires
    early, over a stream five times longer than the window."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        received = b""
        while chunk := await response.read(idle=0.2):
            received += chunk
        assert received == b"x" * 20
        response.release()
    finally:
        upstream.close()


async def test_a_closed_pool_closes_released_connections(raw_server):
    """After close_idle (the endpoint moved), a response that ends closes its connection
    instead of keeping it."""
    async def handler(reader, writer):
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        upstream.close_idle()
        assert await response.read_all() == b"ok"
        response.release()
        await asyncio.sleep(0)
        assert upstream.open_count == 0
    finally:
        upstream.close()


def test_keepalive_idle_is_below_uvicorns_default():
    """Idle connections are dropped before the 5 s keep-alive of uvicorn-based servers."""
    assert KEEPALIVE_IDLE < 5
