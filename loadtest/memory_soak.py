"""Does balancer's resident memory grow with the number of requests served?

``python -m loadtest.memory_soak`` starts, each as its own process on 127.0.0.1, two fast
upstream doubles (:mod:`loadtest.bench_upstream`) and ``balancer serve`` in front of them, then
sends ``--requests`` requests (default 100,000) from ``--concurrency`` keep-alive connections:
a mix of streamed and non-streamed chat completions with unique prompts (so every request has
its own routing key), some with a session header, and some invalid ones (400/404). It reads
balancer's VmRSS from ``/proc`` after ``--baseline`` requests (default 10,000) and at the end,
and prints both. Growth beyond allocator noise would mean per-request state that is never
freed (keys, request ids, label children, retry or health state).

The servers' output goes to log files in a temporary directory (see :mod:`loadtest.procs`);
every one is stopped when the soak ends, on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path

import aiohttp

from loadtest.bench_upstream import CHAT_PATH
from loadtest.bench_upstream import DEFAULT_MODEL as MODEL
from loadtest.procs import HOST, Services, free_port, wait_ready


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def drive(url: str, total: int, concurrency: int, marks: Collection[int],
                on_mark: Callable[[int], None]) -> dict[int, int]:
    """Send ``total`` requests from ``concurrency`` connections; count the statuses, and call
    ``on_mark(n)`` once request ``n`` (one of ``marks``) has been answered."""
    statuses: dict[int, int] = {}
    counter = 0
    lock = asyncio.Lock()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal counter
        while True:
            async with lock:
                if counter >= total:
                    return
                counter += 1
                n = counter
            kind = n % 10
            headers = {"x-session-id": f"s{n % 5000}"} if kind == 1 else None
            if kind == 9:
                body: object = {"model": MODEL, "messages": "not a list"}
            elif kind == 8:
                body = {"model": f"unknown-{n}", "messages": [{"role": "user", "content": "x"}]}
            else:
                body = {"model": MODEL, "stream": kind < 4,
                        "messages": [{"role": "user", "content": f"request {n} " + "y" * 80}]}
            async with session.post(url, json=body, headers=headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            if n in marks:
                on_mark(n)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return statuses


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="memory-soak-") as tmp:
        async with Services(Path(tmp)) as services:
            return await _soak(args, services, Path(tmp))


async def _soak(args: argparse.Namespace, services: Services, tmpdir: Path) -> int:
    upstream_urls = []
    for i in range(2):
        port = free_port()
        upstream = services.start(f"upstream-{i}", [
            sys.executable, "-m", "loadtest.bench_upstream", "--host", HOST, "--port", str(port)])
        upstream_urls.append(f"http://{HOST}:{port}")
        await wait_ready(upstream, upstream_urls[-1] + "/health")
    port, admin = free_port(), free_port()
    config = tmpdir / "balancer.yaml"
    config.write_text(
        f"server: {{host: {HOST}, port: {port}, admin_port: {admin}, log_level: warning}}\n"
        f"pools:\n  - name: bench\n    models: [{MODEL}]\n"
        f"    endpoints: [{', '.join(upstream_urls)}]\n"
        "drain: {delay: 0, timeout: 5}\n")
    balancer = services.start(
        "balancer", [sys.executable, "-m", "balancer", "serve", "--config", str(config)])
    await wait_ready(balancer, f"http://{HOST}:{admin}/readyz")
    readings: dict[int, int] = {0: rss_kib(balancer.pid)}

    def mark(n: int) -> None:
        readings[n] = rss_kib(balancer.pid)

    marks = {args.baseline, args.requests // 2, args.requests}
    started = time.monotonic()
    statuses = await drive(f"http://{HOST}:{port}{CHAT_PATH}",
                           args.requests, args.concurrency, marks, mark)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)
    readings[args.requests] = rss_kib(balancer.pid)
    print(f"requests: {args.requests} in {elapsed:.1f} s "
          f"({args.requests / elapsed:.0f} req/s); statuses {dict(sorted(statuses.items()))}")
    for n, kib in sorted(readings.items()):
        print(f"balancer VmRSS after {n:>7} requests: {kib / 1024:.1f} MiB")
    growth = readings[args.requests] - readings[args.baseline]
    print(f"growth from {args.baseline} to {args.requests} requests: {growth / 1024:+.1f} MiB")
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    return asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(cli())
