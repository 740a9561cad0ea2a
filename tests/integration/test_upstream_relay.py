"""What the upstream client refuses, seen through the proxy: a real balancer in front of raw
TCP model servers on 127.0.0.1 that answer chat completions with exact bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from balancer.upstream import READ_ALL_LIMIT
from tests.conftest import chat_body, make_settings

OK_JSON = b'{"object": "chat.completion", "choices": []}'


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if length:
        await reader.readexactly(length)
    return head


@pytest.fixture
async def model_server() -> AsyncIterator[Callable[[bytes], Awaitable[tuple[str, list[int]]]]]:
    """Start a keep-alive server on 127.0.0.1 answering every chat completion with the given
    bytes and anything else (health checks, /metrics) with a small 200; returns its URL and
    a list with one entry per chat completion it received."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> tuple[str, list[int]]:
        chats: list[int] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                             ) -> None:
            try:
                while True:
                    head = await _read_request(reader)
                    if head.startswith(b"POST /v1/chat/completions "):
                        chats.append(1)
                        writer.write(answer)
                    else:
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", chats

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def chunked_503(size: int) -> bytes:
    block = b"e" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(block), block) for _ in range(size // 65536))
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (100 * 1024) + b"\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"a:b\r\n" * 10_000 + b"Content-Length: 0\r\n\r\n",
], ids=["101", "100 KiB header", "10k header lines"])
async def test_an_answer_the_proxy_cannot_relay_is_a_502(model_server, start_balancer, answer):
    """A protocol switch or an oversized head from the only endpoint is a bad gateway with an
    OpenAI-style error, and the proxy keeps serving."""
    url, chats = await model_server(answer)
    run = await start_balancer(make_settings([url]))
    for _ in range(2):
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body("hi")) as r:
            assert r.status == 502
            body = await r.json()
        assert body["error"]["type"] == "upstream_error"
    assert len(chats) == 2


async def test_a_retryable_answer_with_a_huge_body_is_cut_and_retried(
        model_server, start_balancer):
    """A 503 whose chunked body is three times read_all's cap is read only up to the cap
    and retried on the other endpoint, never turned into a 502."""
    bad, bad_chats = await model_server(chunked_503(3 * READ_ALL_LIMIT))
    good, good_chats = await model_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(OK_JSON), OK_JSON))
    run = await start_balancer(make_settings([bad, good]))
    for i in range(20):  # distinct keys: some land on the 503 endpoint first
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"conversation {i}")) as r:
            assert r.status == 200
            assert await r.read() == OK_JSON
        if bad_chats:
            break
    assert bad_chats and good_chats
