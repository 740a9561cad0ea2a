"""SIGTERM to a real `balancer serve` process: readiness fails at once, new requests are
still taken for drain.delay, every in-flight stream completes, exit 0; a second SIGTERM exits
at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import MODEL, chat_body
from tests.integration.test_serve import free_port, wait_ready


def _start(tmp_path: Path, upstream_url: str, drain: str) -> tuple[subprocess.Popen[bytes],
                                                                      int, int]:
    port, admin = free_port(), free_port()
    config = tmp_path / "balancer.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, admin_port: {admin}}}\n"
        f"pools:\n  - name: llama\n    models: [{MODEL}]\n    endpoints: [{upstream_url}]\n"
        f"drain: {drain}\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "balancer", "serve", "--config", str(config)],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    return process, port, admin


@pytest.mark.timeout(60)
async def test_sigterm_during_streaming_completes_every_stream(upstreams, tmp_path: Path):
    """Eight streams in flight at SIGTERM, plus one started during the delay: all end with
    [DONE]; after the delay new connections are refused; the process exits 0."""
    (up,) = await upstreams(1)
    up.gate = asyncio.Event()
    up.chunks = 5
    process, port, admin = _start(tmp_path, up.url, "{delay: 1.0, timeout: 20}")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, f"http://127.0.0.1:{admin}/readyz", process)

            async def stream(i: int) -> bytes:
                async with session.post(url, json=chat_body(f"s{i}", stream=True)) as r:
                    assert r.status == 200
                    return await r.read()

            tasks = [asyncio.create_task(stream(i)) for i in range(8)]
            async with asyncio.timeout(10):
                while up.active < 8:
                    await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as ready:
                assert ready.status == 503
            # Still accepting during the delay.
            tasks.append(asyncio.create_task(stream(99)))
            async with asyncio.timeout(5):
                while up.active < 9:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(1.2)
            # After the delay the listener is closed.
            async with aiohttp.ClientSession() as fresh:
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with fresh.post(url, json=chat_body("late")) as r:
                        await r.read()
            assert process.poll() is None  # still finishing the streams
            up.gate.set()
            bodies = await asyncio.gather(*tasks)
        assert all(b.rstrip().endswith(b"data: [DONE]") for b in bodies)
        assert len(bodies) == 9
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.timeout(60)
async def test_second_sigterm_exits_at_once(upstreams, tmp_path: Path):
    """During a long drain a second SIGTERM ends the process within a couple of seconds."""
    (up,) = await upstreams(1)
    up.gate = asyncio.Event()
    process, port, admin = _start(tmp_path, up.url, "{delay: 30, timeout: 60}")
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, f"http://127.0.0.1:{admin}/readyz", process)
            task = asyncio.create_task(session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=chat_body("s", stream=True)))
            async with asyncio.timeout(10):
                while up.active < 1:
                    await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert process.poll() is None
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 10)
            assert time.monotonic() - sent < 5
            assert code == 1
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    finally:
        up.gate.set()
        if process.poll() is None:
            process.kill()
            process.wait()

