"""`balancer serve` as a real process: start, serve, drain on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from loadtest.procs import free_port
from tests.conftest import MODEL, chat_body


async def wait_ready(session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes]
                     ) -> None:
    async with asyncio.timeout(20):
        while True:
            assert process.poll() is None, "balancer exited early"
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def test_serve_routes_and_exits_cleanly_on_sigterm(upstreams, tmp_path: Path):
    """The CLI serves a config file, finishes an in-flight stream after SIGTERM, and exits 0."""
    (up,) = await upstreams(1)
    up.gate = asyncio.Event()
    port, admin = free_port(), free_port()
    config = tmp_path / "balancer.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, admin_port: {admin}}}\n"
        f"pools:\n  - name: llama\n    models: [{MODEL}]\n    endpoints: [{up.url}]\n"
    )
    env = {**os.environ, "BALANCER_ROUTING_STRATEGY": "least-request"}
    process = subprocess.Popen(
        [sys.executable, "-m", "balancer", "serve", "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, f"http://127.0.0.1:{admin}/readyz", process)
            async with session.get(f"http://127.0.0.1:{admin}/debug/config") as r:
                assert (await r.json())["routing"]["strategy"] == "least-request"
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                    json=chat_body("hi", stream=True)) as r:
                assert r.status == 200
                await r.content.readline()
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                async with session.get(f"http://127.0.0.1:{admin}/readyz") as ready:
                    assert ready.status == 503
                up.gate.set()
                rest = await r.content.read()
            assert rest.rstrip().endswith(b"data: [DONE]")
        code = await asyncio.to_thread(process.wait, 20)
        assert code == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        output = process.stdout.read().decode()
    assert "listening" in output
    # One JSON access line for the one request (the batched writer flushed before exit).
    access = [json.loads(line) for line in output.splitlines()
              if '"logger": "balancer.access"' in line]
    assert len(access) == 1
    assert (access[0]["path"], access[0]["status"], access[0]["endpoint"]) == (
        "/v1/chat/completions", 200, up.endpoint_id)


def test_invalid_config_fails_at_start_naming_the_key(tmp_path: Path):
    """A bad setting stops `serve` before it listens, with a message naming key and value."""
    config = tmp_path / "bad.yaml"
    config.write_text(
        "pools:\n  - name: a\n    models: [m]\n    endpoints: [http://127.0.0.1:1]\n"
        "routing: {strategy: fastest}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "balancer", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "routing.strategy" in result.stderr
    assert "'fastest'" in result.stderr
    assert "chwbl" in result.stderr
