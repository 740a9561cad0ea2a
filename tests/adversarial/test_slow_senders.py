"""Slow senders and floods of requests: bounded in time and in number.

A head that trickles in is cut after ``limits.client_header_timeout``, a body after
``limits.client_body_timeout`` (408, counted by phase); beyond
``limits.max_concurrent_requests`` requests in progress, new ones get 503 with
``Retry-After`` at once, before their bodies are read, so N slow uploads cannot hold N times
``max_body_bytes`` of memory. None of it touches a pod.
"""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

from tests.adversarial.conftest import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_CONCURRENT,
    MODEL,
    Target,
)

BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 4}).encode()


async def test_a_trickled_head_is_cut(target: Target):
    parts = [b"POST /v1/chat/completions HTTP/1.1\r\n", b"Host: balancer\r\n",
             b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n", b"X-D: 4\r\n", b"X-E: 5\r\n"]
    response = await target.raw(*parts, pause=HEADER_TIMEOUT_S / 2, read_timeout=5)
    assert response.status == 408, response.data[:300]
    assert response.closed
    await target.intact()


async def test_a_trickled_body_is_cut(target: Target):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: balancer\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY))
    # Four bytes every half timeout: always moving, never done in time.
    parts = [head] + [BODY[i:i + 4] for i in range(0, 20, 4)]
    response = await target.raw(*parts, pause=BODY_TIMEOUT_S / 2, read_timeout=1.5)
    assert response.status == 408, response.data[:300]
    await target.intact()


async def test_a_flood_of_slow_uploads_is_shed_before_bodies_are_read(target: Target):
    """MAX_CONCURRENT uploads that send their head and a byte of body hold every slot; the
    next request gets 503 with Retry-After at once; once they are cut (408), requests pass."""
    loop = asyncio.get_running_loop()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: balancer\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{")
    socks = []
    try:
        for _ in range(MAX_CONCURRENT):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            socks.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", target.port))
            await loop.sock_sendall(sock, head)
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(BODY_TIMEOUT_S * 0.75):
                while True:  # until the server has read every head
                    response = await target.chat(session)
                    if response.status == 503:
                        break
                    await asyncio.sleep(0.02)
            assert response.headers.get("Retry-After")
            body = await response.json()
            assert body["error"]["code"] == 503
            samples = await target.metrics(session)
            assert samples.get(
                'balancer_rejected_requests_total{reason="concurrency_limit"}', 0) >= 1
    finally:
        for sock in socks:
            sock.close()
    await target.intact()
