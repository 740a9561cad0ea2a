"""Fault injection of the simulated pod, and its command line."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from loadtest.simserver import DEFAULT_MODEL, FaultConfig, SimConfig, build_app
from loadtest.simserver.faults import Fate, FaultConfigError, FaultInjector

FAST = SimConfig(name="pod-f", time_scale=0.01)
REPO = Path(__file__).resolve().parents[2]
Client = TestClient[Any, Any]


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


async def _client(aiohttp_client: AiohttpClient, **faults: Any) -> Client:
    return await aiohttp_client(build_app(replace(FAST, faults=FaultConfig(**faults))))


# -- the injector on its own ------------------------------------------------------------------


def test_decisions_are_seeded() -> None:
    """The same seed gives the same sequence of failures; rates are roughly honoured."""
    config = FaultConfig(error_rate=0.3, hang_rate=0.2, seed=7)
    a, b = FaultInjector(config, 0.0), FaultInjector(config, 0.0)
    fates_a = [a.decide(1.0) for _ in range(500)]
    assert fates_a == [b.decide(1.0) for _ in range(500)]
    errors = fates_a.count(Fate.ERROR) / 500
    hangs = fates_a.count(Fate.HANG) / 500
    assert 0.2 < errors < 0.4
    assert 0.08 < hangs < 0.22  # 0.2 of the 70% not failed
    other = FaultInjector(replace(config, seed=8), 0.0)
    assert [other.decide(1.0) for _ in range(500)] != fates_a


def test_slow_start_window_and_exit_count() -> None:
    """Slow start lasts its seconds from start; exit comes with request N+1."""
    injector = FaultInjector(FaultConfig(slow_start=2.0, exit_after=2), now=10.0)
    assert injector.starting(11.9) and not injector.starting(12.0)
    assert injector.decide(11.0) is Fate.STARTING
    assert injector.decide(12.5) is Fate.SERVE
    assert injector.decide(12.5) is Fate.EXIT
    injector.update({"exit_after": 1, "slow_start": 1.0}, now=20.0)
    assert injector.decide(20.5) is Fate.STARTING
    assert injector.decide(21.5) is Fate.EXIT


@pytest.mark.parametrize(
    "changes",
    [
        {"error_rate": 1.5},
        {"error_status": 502},
        {"hang_rate": "a lot"},
        {"exit_after": -1},
        {"latency_multiplier": 0},
        {"retry_after": True},
        {"unknown": 1},
    ],
)
def test_bad_fault_settings_are_refused(changes: dict[str, Any]) -> None:
    """Out-of-range, ill-typed or unknown settings raise FaultConfigError."""
    with pytest.raises(FaultConfigError):
        FaultConfig().updated(changes)


# -- over HTTP --------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "retry_after"), [(429, "7"), (503, "7"), (500, None)])
async def test_injected_errors_carry_retry_after_when_due(
    aiohttp_client: AiohttpClient, status: int, retry_after: str | None
) -> None:
    """Every request fails with the chosen status; 429 and 503 say when to retry."""
    client = await _client(aiohttp_client, error_rate=1.0, error_status=status, retry_after=7)
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=2)) as response:
        assert response.status == status
        assert response.headers.get("Retry-After") == retry_after
        assert response.headers["x-sim-pod"] == "pod-f"
        assert (await response.json())["error"]["message"]
    async with client.get("/stats") as response:
        assert (await response.json())["injected_errors"] == 1


async def test_error_rate_fails_a_share_of_requests(aiohttp_client: AiohttpClient) -> None:
    """With a rate of one half, some requests fail and some succeed."""
    client = await _client(aiohttp_client, error_rate=0.5, seed=3)
    statuses = []
    for _ in range(30):
        async with client.post("/v1/chat/completions", json=_chat(max_tokens=1)) as response:
            statuses.append(response.status)
    assert 5 < statuses.count(500) < 25
    assert statuses.count(200) == 30 - statuses.count(500)


async def test_slow_start_answers_503_until_ready(aiohttp_client: AiohttpClient) -> None:
    """During slow start /health and requests answer 503; afterwards the pod serves."""
    client = await _client(aiohttp_client, slow_start=0.3, retry_after=2)
    async with client.get("/health") as response:
        assert response.status == 503
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=1)) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "2"
    async with client.post("/tokenize", json={"model": DEFAULT_MODEL, "prompt": "x"}) as r:
        assert r.status == 503
    async with client.get("/stats") as response:
        stats = await response.json()
        assert stats["starting"] is True and stats["slow_start_rejections"] == 1
    await asyncio.sleep(0.35)
    async with client.get("/health") as response:
        assert response.status == 200
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=1)) as response:
        assert response.status == 200


async def test_hang_never_answers_until_the_client_gives_up(
    aiohttp_client: AiohttpClient,
) -> None:
    """A hanging request sends nothing at all; the pod stays usable for others."""
    client = await _client(aiohttp_client, hang_rate=1.0)
    start = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            "/v1/chat/completions",
            json=_chat(max_tokens=2, stream=True),
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    assert time.monotonic() - start < 1.0
    async with client.post("/sim/faults", json={"hang_rate": 0}) as response:
        assert response.status == 200
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=2)) as response:
        assert response.status == 200
    async with client.get("/stats") as response:
        stats = await response.json()
    assert stats["injected_hangs"] == 1
    assert stats["requests_running"] == 0


async def test_hang_after_chunks_stalls_a_stream(aiohttp_client: AiohttpClient) -> None:
    """A hanging stream sends its headers and K chunks, then nothing more."""
    client = await _client(aiohttp_client, hang_rate=1.0, hang_after_chunks=3)
    body = _chat(max_tokens=10, stream=True)
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    lines: list[bytes] = []
    async with client.post("/v1/chat/completions", json=body, timeout=timeout) as response:
        assert response.status == 200
        with pytest.raises(asyncio.TimeoutError):
            async for line in response.content:
                if line.strip():
                    lines.append(line)
    assert len(lines) == 3
    assert all(line.startswith(b"data: {") for line in lines)


async def test_latency_multiplier_slows_a_running_pod(aiohttp_client: AiohttpClient) -> None:
    """Raising the latency multiplier live makes the same request proportionally slower."""
    client = await aiohttp_client(build_app(replace(FAST, time_scale=0.1)))
    body = _chat(max_tokens=20)

    async def timed() -> float:
        start = time.monotonic()
        async with client.post("/v1/chat/completions", json=body) as response:
            assert response.status == 200
        return time.monotonic() - start

    # 20 steps of ~5.6 simulated ms: ~11 ms of wall time, ~110 ms when ten times slower.
    normal = await timed()
    async with client.post("/sim/faults", json={"latency_multiplier": 10}) as response:
        assert (await response.json())["latency_multiplier"] == 10.0
    slow = await timed()
    assert normal < 0.08
    assert slow >= 0.1


async def test_faults_can_be_read_and_changed_live(aiohttp_client: AiohttpClient) -> None:
    """GET /sim/faults shows the settings; POST changes some and refuses bad ones."""
    client = await _client(aiohttp_client)
    async with client.get("/sim/faults") as response:
        assert await response.json() == FaultConfig().to_json()
    changes = {"error_rate": 1, "error_status": 429, "retry_after": 3}
    async with client.post("/sim/faults", json=changes) as response:
        body = await response.json()
    assert body["error_rate"] == 1.0 and body["error_status"] == 429
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=1)) as response:
        assert response.status == 429 and response.headers["Retry-After"] == "3"
    async with client.post("/sim/faults", json={"error_rate": 2}) as response:
        assert response.status == 400
    async with client.post("/sim/faults", json={"bogus": 1}) as response:
        assert response.status == 400
    async with client.get("/sim/faults") as response:
        assert (await response.json())["error_rate"] == 1.0


# -- the command line, in a subprocess --------------------------------------------------------

LISTENING = re.compile(r"sim pod (\S+) listening on (http://127\.0\.0\.1:(\d+))")


@contextmanager
def _simserver(*args: str) -> Iterator[subprocess.Popen[str]]:
    """Run `python -m loadtest.simserver --port 0 ARGS`; kill it if still alive at the end."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "loadtest.simserver", "--port", "0", *args]
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def _announced(process: subprocess.Popen[str], count: int) -> list[tuple[str, str]]:
    """Read the pods' start lines: (name, url)."""
    assert process.stdout is not None
    pods = []
    for _ in range(count):
        line = process.stdout.readline()
        match = LISTENING.search(line)
        assert match, line + (process.stderr.read() if process.stderr else "")
        assert match.group(1) == f"sim-{match.group(3)}"
        pods.append((match.group(1), match.group(2)))
    return pods


@pytest.mark.timeout(30)
async def test_cli_serves_several_pods_and_stops_on_sigterm() -> None:
    """`--pods 2` serves two pods from one process; SIGTERM stops it cleanly."""
    args = ("--pods", "2", "--time-scale", "0.01", "--model", "m1", "--model", "m2")
    with _simserver(*args) as process:
        pods = await asyncio.to_thread(_announced, process, 2)
        async with aiohttp.ClientSession() as session:
            for name, url in pods:
                async with session.get(f"{url}/v1/models") as response:
                    assert response.headers["x-sim-pod"] == name
                    assert [m["id"] for m in (await response.json())["data"]] == ["m1", "m2"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 10) == 0


@pytest.mark.timeout(30)
async def test_exit_after_crashes_the_process() -> None:
    """With --exit-after 2, two requests are served and the third kills the process."""
    with _simserver("--exit-after", "2", "--time-scale", "0.01") as process:
        ((_, url),) = await asyncio.to_thread(_announced, process, 1)
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.post(f"{url}/v1/chat/completions", json=_chat()) as r:
                    assert r.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with session.post(f"{url}/v1/chat/completions", json=_chat()) as r:
                    await r.read()
        assert await asyncio.to_thread(process.wait, 10) == 137
