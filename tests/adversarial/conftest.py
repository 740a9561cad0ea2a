"""One `balancer serve` process in front of simulated pods, attacked by real clients.

Every case in this directory talks to the same balancer, a real ``python -m balancer serve``
process on 127.0.0.1 in front of two simulated vLLM pods (``python -m loadtest.simserver``,
running a hundred times faster than the modelled GPU so that generations are short), through
raw sockets where the attack lives below HTTP clients (smuggling shapes, slow senders,
clients that never read) and aiohttp where it does not. Sharing one process is the point:
each case must leave it as it found it, and :meth:`Target.intact`, called at the end of every
case, checks exactly that — still serving, no endpoint ejected or out, nothing in flight,
resident memory within :data:`RSS_BOUND_MIB`.

The balancer runs with short client timeouts (see :data:`CONFIG`) so that the slow-client
cases finish in seconds; the defaults are checked elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtest.procs import HOST, Service, Services, free_port, raise_fd_limit, wait_for_lines
from loadtest.procs import wait_ready as wait_service_ready

MODEL = "sim-model"
SESSION_HEADER = "x-session-id"
IDLE_TIMEOUT_S = 1.5
"""``limits.idle_timeout`` of the balancer under attack: how long a client that reads nothing
is waited for."""
HEADER_TIMEOUT_S = 1.0
"""``limits.client_header_timeout``: how long a request head may take to arrive."""
BODY_TIMEOUT_S = 2.0
"""``limits.client_body_timeout``: how long a body may take after its head."""
MAX_CONCURRENT = 64
"""``limits.max_concurrent_requests``: requests being read or forwarded at once."""
RSS_BOUND_MIB = 192
"""Resident memory the balancer must be back under after every case (it starts near 60 MiB;
a case may hold up to ``max_concurrent_requests`` bodies while it runs, but not after)."""
FAULT_REASONS = ("no_endpoints", "upstream_connect", "upstream_timeout", "shutting_down")
"""Rejection reasons that would mean balancer failed a client it should have served."""
MAX_BODY_BYTES = 10 * 1024 * 1024
"""The default ``limits.max_body_bytes``, which the size-limit cases aim at."""

CONFIG = """\
server: {{host: 127.0.0.1, port: {port}, admin_port: {admin_port}, log_level: warning}}
pools:
  - name: sim
    models: [{model}]
    endpoints: [{endpoints}]
limits:
  idle_timeout: {idle}
  client_header_timeout: {header_timeout}
  client_body_timeout: {body_timeout}
  max_concurrent_requests: {max_concurrent}
health:
  interval: 1.0
drain:
  delay: 0
  timeout: 2
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Response:
    """What a raw client got back: the status of the first response (0: none) and every
    byte the server sent before it closed or went quiet."""

    status: int
    data: bytes
    closed: bool
    """The server closed the connection (as opposed to the read timing out)."""

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    def error(self) -> dict[str, Any]:
        """The OpenAI-style error object of a non-chunked JSON error answer."""
        return dict(json.loads(self.body)["error"])


@dataclass
class Target:
    """The balancer under attack and the means to check on it."""

    service: Service
    port: int
    admin_port: int
    pods: list[str]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    async def raw(self, *parts: bytes, pause: float = 0.0, read_timeout: float = 5.0,
                  rcvbuf: int | None = None) -> Response:
        """Send ``parts`` on one new connection (``pause`` seconds between them), then read
        until the server closes the connection or ``read_timeout`` seconds pass without data.
        ``rcvbuf``: the client's receive buffer, set before connecting."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        data = bytearray()
        closed = False
        try:
            await loop.sock_connect(sock, (HOST, self.port))
            for i, part in enumerate(parts):
                if i and pause:
                    await asyncio.sleep(pause)
                try:
                    await loop.sock_sendall(sock, part)
                except (BrokenPipeError, ConnectionResetError):
                    break
            while True:
                try:
                    async with asyncio.timeout(read_timeout):
                        chunk = await loop.sock_recv(sock, 65536)
                except TimeoutError:
                    break
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                data += chunk
        finally:
            sock.close()
        status = 0
        if data.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/0.9 ")):
            status = int(data[9:12])
        return Response(status, bytes(data), closed)

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """Every sample of the admin port's /metrics, by its line's name and labels."""
        async with session.get(self.admin_url + "/metrics") as response:
            text = await response.text()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    @staticmethod
    def total(samples: dict[str, float], name: str) -> float:
        return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))

    async def chat(self, session: aiohttp.ClientSession, text: str = "Hello there, how are "
                   "you today?", *, stream: bool = False, **extra: Any) -> aiohttp.ClientResponse:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}],
                "max_tokens": 8, "stream": stream, **extra}
        response = await session.post(self.url + "/v1/chat/completions", json=body)
        await response.read()
        return response

    async def intact(self) -> None:
        """The balancer still serves, ejected nothing, holds nothing, and has given back its
        memory: what every case must leave behind."""
        assert self.service.exit_code() is None, "balancer exited:\n" + "\n".join(
            self.service.log_tail())
        async with aiohttp.ClientSession() as session:
            response = await self.chat(session)
            assert response.status == 200, await response.text()
            # Requests of the case may still be winding down (a disconnect is seen when
            # the next write fails): wait for the count to drop, bounded.
            deadline = time.monotonic() + 10
            while True:
                async with session.get(self.admin_url + "/debug/endpoints") as r:
                    pool = (await r.json())["pools"]["sim"]
                if pool["total_in_flight"] == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert pool["total_in_flight"] == 0, pool
            for endpoint in pool["endpoints"]:
                assert endpoint["routable"] and not endpoint["out"], endpoint
            samples = await self.metrics(session)
            assert self.total(samples, "balancer_endpoint_ejections_total") == 0, {
                k: v for k, v in samples.items() if "eject" in k}
            # 5xx of balancer's own making: answers relayed with a 5xx (the simulated pods
            # never fail) and its own 502/503/504 for want of an endpoint. A 503 that sheds
            # a flood on purpose (the concurrency cap) is the designed answer, not a fault.
            failures = {k: v for k, v in samples.items() if v and (
                (k.startswith("balancer_requests_total{") and 'class="5xx"' in k)
                or any(f'reason="{r}"' in k for r in FAULT_REASONS))}
            assert not failures, failures
        assert await self.settled_rss() < RSS_BOUND_MIB

    async def settled_rss(self, bound: float = RSS_BOUND_MIB, within: float = 6.0) -> float:
        """Resident memory (MiB) once it is under ``bound``, or after ``within`` seconds:
        balancer hands the memory of large bodies back a couple of seconds after they
        arrived (:mod:`balancer.memory`)."""
        deadline = time.monotonic() + within
        while (resident := rss_mib(self.service.pid)) >= bound and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return resident


@pytest.fixture(scope="package")
def target() -> Iterator[Target]:
    """The balancer under attack, started once for the whole directory."""
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="balancer-adversarial-") as tmp, \
            Services(Path(tmp)) as services:
        pods = services.start("pods", [
            sys.executable, "-m", "loadtest.simserver", "--pods", "2", "--port", "0",
            "--model", MODEL, "--time-scale", "0.01", "--log-level", "warning"])
        urls = [m.group(1) for m in asyncio.run(
            wait_for_lines(pods, r"listening on (http://\S+)", 2))]
        port, admin_port = free_port(), free_port()
        config = Path(tmp) / "balancer.yaml"
        config.write_text(CONFIG.format(port=port, admin_port=admin_port, model=MODEL,
                                        endpoints=", ".join(urls), idle=IDLE_TIMEOUT_S,
                                        header_timeout=HEADER_TIMEOUT_S,
                                        body_timeout=BODY_TIMEOUT_S,
                                        max_concurrent=MAX_CONCURRENT))
        service = services.start("balancer", [
            sys.executable, "-m", "balancer", "serve", "--config", str(config)])
        asyncio.run(wait_service_ready(service, f"http://{HOST}:{admin_port}/readyz"))
        yield Target(service, port, admin_port, urls)
