"""The upstream HTTP/1.1 client against raw TCP servers that send exact bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.upstream import (
    KEEPALIVE_IDLE,
    MAX_HEAD_SIZE,
    MAX_HEADER_LINES,
    READ_ALL_LIMIT,
    ConnectionPool,
    Connector,
    UpstreamBodyError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResetError,
    UpstreamTimeoutError,
    UpstreamTooLargeError,
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


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until ``condition()`` holds, polling; fails after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_bytes_on_an_idle_connection_close_it(raw_server, caplog):
    """Bytes a server sends on a pooled connection with no request on it close that
    connection (logged); the next request goes out on a fresh one."""
    released = asyncio.Event()

    async def handler(reader, writer):
        first = len(connections) == 1
        while True:
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
            if first:
                await released.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
                await writer.drain()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        with caplog.at_level(logging.WARNING, logger="balancer.upstream"):
            response = await upstream.request(head_for(upstream), b"{}")
            assert await response.read_all() == b"ok"
            response.release()
            assert upstream.open_count == 1
            released.set()
            await until(lambda: upstream.open_count == 0)
        assert "on an idle connection" in caplog.text
        response = await upstream.request(head_for(upstream), b"{}")
        assert await response.read_all() == b"ok"
        response.release()
        assert len(connections) == 2
    finally:
        upstream.close()


@pytest.mark.parametrize("extra", [OK, b"junk"], ids=["a second response", "junk"])
@pytest.mark.parametrize("same_write", [True, False], ids=["same write", "later write"])
async def test_bytes_after_a_complete_response_close_the_connection(raw_server, extra,
                                                                    same_write):
    """Bytes after a complete Content-Length response (in the same read or a later one)
    leave the response intact but its connection is never reused."""
    async def handler(reader, writer):
        await read_request(reader)
        if same_write:
            writer.write(OK + extra)
        else:
            writer.write(OK)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(extra)
        await writer.drain()
        while True:
            await read_request(reader)
            writer.write(OK)
            await writer.drain()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert response.status == 200
        assert await response.read_all() == b"ok"
        await until(lambda: upstream.open_count == 0)
        response.release()
        response = await upstream.request(head_for(upstream), b"{}")
        assert await response.read_all() == b"ok"
        response.release()
        assert len(connections) == 2
    finally:
        upstream.close()


async def answered_and_refused(raw_server, answer: bytes, error: type[Exception],
                               match: str) -> None:
    """A server that answers every request with ``answer``: the request fails with
    ``error`` and the connection closes (none is kept for reuse)."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        with pytest.raises(error, match=match):
            await asyncio.wait_for(upstream.request(head_for(upstream), b"{}"), 2)
        await until(lambda: upstream.open_count == 0)
    finally:
        upstream.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    b"\x81\x05hello",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
], ids=["with Upgrade headers", "bare"])
async def test_a_protocol_switch_is_refused_and_closes(raw_server, answer):
    """A 101 (an upgrade the proxy never asked for) is a protocol error, not a parser
    exception escaping; the connection closes."""
    await answered_and_refused(raw_server, answer, UpstreamProtocolError, "switched protocols")


@pytest.mark.parametrize("interim", [
    [b"HTTP/1.1 100 Continue\r\n\r\n"],
    [b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"],
    [b"HTTP/1.1 100 Continue\r\n\r\n",
     b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n",
     b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>; rel=preload\r\n\r\n"],
], ids=["100", "103", "100 then two 103"])
async def test_interim_responses_in_their_own_reads_are_skipped(raw_server, interim):
    """Interim 1xx heads sent apart from the final one are skipped, their headers do not leak
    into the final head, and the connection is reused afterwards."""
    async def handler(reader, writer):
        while True:
            await read_request(reader)
            for head in interim:
                writer.write(head)
                await writer.drain()
                await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Final: 1\r\n\r\nx")
            await writer.drain()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        for _ in range(2):
            response = await asyncio.wait_for(upstream.request(head_for(upstream), b"{}"), 2)
            assert response.status == 200
            assert [name.lower() for name, _ in response.headers] == [b"content-length",
                                                                     b"x-final"]
            assert await response.read_all() == b"x"
            response.release()
        assert len(connections) == 1
    finally:
        upstream.close()


@pytest.mark.parametrize("split", [False, True], ids=["one write", "trailers later"])
async def test_trailers_stay_out_of_the_head(raw_server, split):
    """Trailer fields after a chunked body are dropped: the head keeps only its own headers,
    the body is whole and the connection is reused."""
    async def handler(reader, writer):
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                         b"Trailer: X-Checksum\r\n\r\n5\r\nhello\r\n")
            if split:
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")
            await writer.drain()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        for _ in range(2):
            response = await upstream.request(head_for(upstream), b"{}")
            headers = list(response.headers)
            assert await asyncio.wait_for(response.read_all(), 2) == b"hello"
            assert response.headers == headers
            assert response.header(b"x-checksum") is None
            assert response.header(b"x-other") is None
            response.release()
        assert len(connections) == 1
    finally:
        upstream.close()


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (100 * 1024) + b"\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"a:b\r\n" * 10_000 + b"Content-Length: 0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n" * 5_000 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (100 * 1024),
], ids=["a 100 KiB header", "10k header lines", "endless 100 Continue", "unfinished"])
async def test_an_oversized_response_head_is_refused_and_closes(raw_server, head):
    """A head over MAX_HEAD_SIZE bytes or MAX_HEADER_LINES lines (interim heads count) is a
    bad gateway, whether or not it ever ends; the connection closes."""
    # The cases test what they say: 10k short lines fit in the byte limit, 100 KiB does not.
    assert len(b"a:b\r\n") * 10_000 < MAX_HEAD_SIZE < 100 * 1024
    assert MAX_HEADER_LINES < 10_000

    await answered_and_refused(raw_server, head, UpstreamTooLargeError, "response head")


async def test_a_head_under_the_limit_is_accepted_with_a_long_body_in_the_same_read(
        raw_server):
    """A head just under MAX_HEAD_SIZE arriving in the same reads as a long body is not
    mistaken for an oversized head."""
    body = b"b" * (512 * 1024)
    big = b"X-Big: " + b"a" * (MAX_HEAD_SIZE - 200) + b"\r\n"

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: %d\r\n\r\n" % len(body)
                     + body)
        await writer.drain()
        await reader.read()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await asyncio.wait_for(upstream.request(head_for(upstream), b"{}"), 2)
        assert len(response.header(b"x-big") or b"") == MAX_HEAD_SIZE - 200
        assert await asyncio.wait_for(response.read_all(), 2) == body
        response.release()
    finally:
        upstream.close()


def huge_chunked_503(size: int) -> bytes:
    block = b"e" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(block), block) for _ in range(size // 65536))
    return (b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks + b"0\r\n\r\n")


async def test_read_all_caps_the_body(raw_server):
    """read_all fails beyond its limit (at once when Content-Length says so), or truncates
    when asked, as for an error answer that is only relayed; the connection then closes."""
    async def handler(reader, writer):
        while True:
            head, _ = await read_request(reader)
            if b"/length" in head:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5000000\r\n"
                             b"\r\n")
            else:
                writer.write(huge_chunked_503(3 * READ_ALL_LIMIT))
            await writer.drain()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert response.status == 503
        with pytest.raises(UpstreamTooLargeError):
            await asyncio.wait_for(response.read_all(), 5)
        response.release()

        response = await upstream.request(head_for(upstream), b"{}")
        payload = await asyncio.wait_for(response.read_all(truncate=True), 5)
        assert payload == b"e" * READ_ALL_LIMIT
        response.release()

        response = await upstream.request(head_for(upstream), b"{}")
        assert await asyncio.wait_for(response.read_all(limit=1000, truncate=True), 5) \
            == b"e" * 1000
        response.release()

        response = await upstream.request(
            serialize_head("POST", "/length", upstream.host_header, [], 2), b"{}")
        with pytest.raises(UpstreamTooLargeError, match="5000000"):
            await response.read_all()  # no waiting: the length says it all
        response.release()
        assert len(connections) == 4  # none of them was reused
    finally:
        upstream.close()


async def test_an_early_answer_to_a_large_body_is_relayed(raw_server):
    """A server that answers 413 after reading only the head of an 8 MiB body, and closes
    with the body unread, gets its answer relayed, not turned into a reset."""
    body = b"x" * (8 * 1024 * 1024)
    error = b'{"error": "too large"}'

    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(error), error))
        await writer.drain()

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await asyncio.wait_for(
            upstream.request(head_for(upstream, body), body), 5)
        assert response.status == 413
        assert await asyncio.wait_for(response.read_all(), 2) == error
        response.release()
        await until(lambda: upstream.open_count == 0)
    finally:
        upstream.close()


async def test_a_keepalive_early_answer_does_not_reuse_a_half_sent_connection(raw_server):
    """An early answer that keeps the connection open while the body is still unsent (the
    server stopped reading) does not put the connection back in the pool: the next request
    would follow the rest of the old body."""
    body = b"x" * (32 * 1024 * 1024)  # more than the socket buffers of both ends hold
    stop = asyncio.Event()

    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if b"Content-Length: 2\r\n" in head:
            await reader.readexactly(2)
            writer.write(OK)
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await stop.wait()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await asyncio.wait_for(
            upstream.request(head_for(upstream, body), body), 5)
        assert response.status == 413
        assert await response.read_all() == b""
        response.release()
        assert upstream.open_count == 0
        response = await asyncio.wait_for(upstream.request(head_for(upstream), b"{}"), 2)
        assert await response.read_all() == b"ok"
        response.release()
        assert len(connections) == 2
    finally:
        stop.set()
        upstream.close()


async def test_a_close_delimited_early_answer_ends_at_the_fin_despite_unsent_bytes(
        raw_server):
    """An early answer without a length ends when the server half-closes, even though the
    server stopped reading and request bytes are still waiting to be sent (they are
    dropped, not flushed first)."""
    body = b"x" * (32 * 1024 * 1024)
    stop = asyncio.Event()

    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n\r\ntoo large")
        await writer.drain()
        writer.write_eof()
        await stop.wait()  # reads nothing more

    url, _ = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await asyncio.wait_for(
            upstream.request(head_for(upstream, body), body), 5)
        assert response.status == 413
        assert await asyncio.wait_for(response.read_all(), 2) == b"too large"
        response.release()
        assert upstream.open_count == 0
    finally:
        stop.set()
        upstream.close()


@pytest.mark.parametrize("replayable", [True, False])
async def test_a_request_the_server_may_have_read_is_resent_only_if_replayable(
        raw_server, replayable):
    """A reused connection the server closes right after reading the next request (its
    keep-alive timeout firing as the request arrives): a replayable request is sent again on
    a fresh connection, a non-replayable one fails with a reset and reaches the server
    once."""
    seen: list[bytes] = []

    async def handler(reader, writer):
        seen.append((await read_request(reader))[0])
        writer.write(OK)
        await writer.drain()
        seen.append((await read_request(reader))[0])  # read, then dropped unanswered

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert await response.read_all() == b"ok"
        response.release()
        if replayable:
            response = await asyncio.wait_for(upstream.request(head_for(upstream), b"{}"), 2)
            assert await response.read_all() == b"ok"
            response.release()
            assert len(seen) == 3 and len(connections) == 2
        else:
            with pytest.raises(UpstreamResetError, match="not replayable"):
                await asyncio.wait_for(
                    upstream.request(head_for(upstream), b"{}", replayable=False), 2)
            assert len(seen) == 2 and len(connections) == 1
    finally:
        upstream.close()


async def test_a_request_that_never_left_is_resent_even_if_not_replayable(raw_server):
    """A pooled connection whose transport is already closing (it failed, and the loop has
    not yet reported it lost) drops the write: nothing reached the server, so even a
    non-replayable request goes out once more, on a fresh connection."""
    seen: list[bytes] = []

    async def handler(reader, writer):
        while True:
            seen.append((await read_request(reader))[0])
            writer.write(OK)
            await writer.drain()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        response = await upstream.request(head_for(upstream), b"{}")
        assert await response.read_all() == b"ok"
        response.release()
        pooled = upstream._idle[-1]
        assert pooled.transport is not None
        pooled.transport.close()  # closing; connection_lost is only scheduled
        # Awaited in this task (wait_for would start a task after connection_lost ran), so
        # the request meets the closing transport.
        async with asyncio.timeout(2):
            response = await upstream.request(head_for(upstream), b"{}", replayable=False)
        assert pooled.unsent
        assert await response.read_all() == b"ok"
        response.release()
        assert len(seen) == 2 and len(connections) == 2
    finally:
        upstream.close()


async def test_a_connection_the_server_closed_while_idle_is_never_used(raw_server):
    """A server that closes each connection after answering (no Connection: close): once
    its FIN is in, the pooled connection is gone, and a non-replayable request goes out on a
    fresh one, once."""
    seen: list[bytes] = []

    async def handler(reader, writer):
        seen.append((await read_request(reader))[0])
        writer.write(OK)
        await writer.drain()

    url, connections = await raw_server(handler)
    upstream = Connector(connect_timeout=2).open(url)
    try:
        for _ in range(3):
            response = await upstream.request(head_for(upstream), b"{}", replayable=False)
            assert await response.read_all() == b"ok"
            response.release()
            await until(lambda: upstream.open_count == 0)
        assert len(seen) == 3 and len(connections) == 3
    finally:
        upstream.close()


NAMES = st.sampled_from([b"X-Request-Id", b"Server", b"Date", b"X-A", b"Cache-Control"])
VALUES = st.from_regex(rb"[a-z0-9][a-z0-9;=/-]{0,15}", fullmatch=True)
INTERIM = st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n",
                           b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"])


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]], bytes, list[int]]:
    """An answer on the wire (interim heads, the head, a Content-Length or chunked body with
    trailers), the head's headers and body the client must see, and where to cut the wire
    into separate writes."""
    headers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=5))
    body = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=3)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        trailers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=2))
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n" \
            + b"".join(b"%s: %s\r\n" % t for t in trailers) + b"\r\n"
    else:
        headers.append((b"Content-Length", b"%d" % len(body)))
        framed = body
    wire = b"".join(draw(st.lists(INTERIM, max_size=2))) + b"HTTP/1.1 200 OK\r\n" \
        + b"".join(b"%s: %s\r\n" % h for h in headers) + b"\r\n" + framed
    splits = sorted(draw(st.sets(st.integers(1, len(wire) - 1), max_size=6)))
    return wire, headers, body, splits


async def _exchange_twice(wire: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                          splits: list[int]) -> None:
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            for _ in range(2):
                await read_request(reader)
                for a, b in zip([0, *splits], [*splits, len(wire)], strict=True):
                    writer.write(wire[a:b])
                    await writer.drain()
                    await asyncio.sleep(0)  # let the client read this piece on its own
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    upstream = Connector(connect_timeout=2).open(
        f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        for _ in range(2):
            response = await asyncio.wait_for(upstream.request(head_for(upstream), b"{}"), 5)
            assert (response.status, response.headers) == (200, headers)
            assert await asyncio.wait_for(response.read_all(), 5) == body
            response.release()
        assert len(connections) == 1
    finally:
        upstream.close()
        server.close()
        await server.wait_closed()


@settings(max_examples=60, deadline=None)
@given(exchange=exchanges())
def test_any_split_of_an_answer_reads_the_same(
        exchange: tuple[bytes, list[tuple[bytes, bytes]], bytes, list[int]]) -> None:
    """However the answer is cut into reads (interim heads, head, body and trailers split
    anywhere), the client sees the same head (no interim or trailer fields in it), the same
    body, and reuses the connection."""
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(_exchange_twice(*exchange))
    finally:
        loop.close()
