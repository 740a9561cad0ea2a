"""Clients that hold the balancer up: never reading, sending slowly, or just connecting.

A client's time is the client's: one that stops reading is disconnected once a write to it
has waited ``limits.idle_timeout``, and that is never held against the pod that was serving
it (no upstream timeout, no ejection), however many such clients pin themselves to one pod.
Idle connections cost memory, so many of them are measured too.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket

import aiohttp
import pytest

from tests.adversarial.conftest import (
    IDLE_TIMEOUT_S,
    MODEL,
    SESSION_HEADER,
    Target,
    rss_mib,
)


def stream_request(session: str, max_tokens: int) -> bytes:
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Tell me a very long story, "
                                     "as long as you can make it."}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: balancer\r\n"
            b"Content-Type: application/json\r\n%s: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (SESSION_HEADER.encode(), session.encode(), len(body), body))


async def test_clients_that_never_read_cannot_eject_their_pod(target: Target):
    """Five streams pinned to one pod by the session header, each on a socket with a tiny
    receive buffer whose client reads nothing: each is cut once its writes have waited
    ``idle_timeout``, as a client that went away, and the pod stays in."""
    loop = asyncio.get_running_loop()
    socks = []
    try:
        async with aiohttp.ClientSession() as session:
            before = await target.metrics(session)
            for _ in range(5):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                sock.setblocking(False)
                socks.append(sock)
                await loop.sock_connect(sock, ("127.0.0.1", target.port))
                await loop.sock_sendall(sock, stream_request("one-pod", 30_000))
            # Read nothing until the balancer has given up on all five (the buffers fill
            # first, then a write waits IDLE_TIMEOUT_S): bounded, however busy the host.
            async with asyncio.timeout(30 + 3 * IDLE_TIMEOUT_S):
                while True:
                    after = await target.metrics(session)
                    cut = (target.total(after, "balancer_client_disconnects_total")
                           - target.total(before, "balancer_client_disconnects_total"))
                    if cut >= 5:
                        break
                    await asyncio.sleep(0.2)
        results = []
        for sock in socks:
            data = bytearray()
            while True:
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 2)
                except (TimeoutError, ConnectionResetError):
                    break
                if not chunk:
                    break
                data += chunk
            results.append(bytes(data))
    finally:
        for sock in socks:
            sock.close()
    for data in results:
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert not data.rstrip().endswith(b"data: [DONE]"), "the stream was not cut"
    errors = {k: after[k] - before.get(k, 0) for k in after
              if k.startswith("balancer_upstream_errors_total{")}
    assert not any(errors.values()), errors
    await target.intact()


async def test_ten_thousand_idle_connections_cost_bounded_memory(target: Target):
    """Ten thousand clients connect and send nothing: the balancer keeps serving others,
    its memory stays within the bound, and it is all given back when they leave."""
    loop = asyncio.get_running_loop()
    # Both ends need a descriptor per connection (the fixture raised the limit as far as the
    # hard limit allows, for this process and the balancer it started).
    count = min(10_000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 500)
    if count < 1_000:
        pytest.skip(f"the open-files limit allows only {count} connections")
    before = rss_mib(target.service.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            socks.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", target.port))
        await asyncio.sleep(1.0)  # let the server accept them all
        async with aiohttp.ClientSession() as session:
            response = await target.chat(session)
            assert response.status == 200
        held = rss_mib(target.service.pid)
    finally:
        for sock in socks:
            sock.close()
    # Each accepted connection holds a transport, a protocol and a parser: a few KiB.
    print(f"resident memory with {count} idle connections: {before:.0f} -> {held:.0f} MiB")
    assert held - before < 100, (before, held)
    await asyncio.sleep(0.5)
    await target.intact()
