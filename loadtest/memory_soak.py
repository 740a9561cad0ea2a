"""Does balancer's resident memory grow with the number of requests served?

``python -m loadtest.memory_soak`` starts, each as its own process on 127.0.0.1, two fast
upstream doubles (:mod:`loadtest.bench_upstream`) and ``balancer serve`` in front of them, then
sends ``--requests`` requests (default 100,000) from ``--concurrency`` keep-alive connections:
a mix of streamed and non-streamed chat completions with unique prompts (so every request has
its own routing key), some with a session header, and some invalid ones (400/404). It reads
balancer's VmRSS from ``/proc`` after ``--baseline`` requests (default 10,000) and at the end,
and prints both. Growth beyond allocator noise would mean per-request state that is never
freed (keys, request ids, label children, retry or health state).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench-model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _wait_http(url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            await asyncio.sleep(0.1)


async def drive(url: str, total: int, concurrency: int, marks: dict[int, object],
                on_mark: object) -> dict[int, int]:
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
                on_mark(n)  # type: ignore[operator]

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return statuses


async def main(args: argparse.Namespace) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upstream_urls = []
        for _ in range(2):
            port = _free_port()
            # Starting a process returns at once; nothing here waits on it.
            processes.append(subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "loadtest.bench_upstream", "--port", str(port)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            upstream_urls.append(f"http://127.0.0.1:{port}")
        for url in upstream_urls:
            await _wait_http(url + "/health")
        port, admin = _free_port(), _free_port()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
            config.write(
                f"server: {{host: 127.0.0.1, port: {port}, admin_port: {admin}, "
                f"log_level: warning}}\n"
                f"pools:\n  - name: bench\n    models: [{MODEL}]\n"
                f"    endpoints: [{', '.join(upstream_urls)}]\n"
                "drain: {delay: 0, timeout: 5}\n")
        balancer = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "balancer", "serve", "--config", config.name],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(balancer)
        await _wait_http(f"http://127.0.0.1:{admin}/readyz")
        readings: dict[int, int] = {0: rss_kib(balancer.pid)}

        def mark(n: int) -> None:
            readings[n] = rss_kib(balancer.pid)

        marks = {m: None for m in (args.baseline, args.requests // 2, args.requests)}
        started = time.monotonic()
        statuses = await drive(f"http://127.0.0.1:{port}/v1/chat/completions",
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
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    return asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(cli())
