"""Faults with real processes and sockets: retries, ejection, rolling restarts, hangs.

Simulated pods (``loadtest.simserver``) run as their own processes, so a pod can be killed
with SIGKILL under load; balancer runs in the test's loop. Timing bounds are generous (the
suite runs on a loaded 2-core machine); each scenario prints its figures (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer.config import HealthSettings, KeyMode, LimitsSettings, RetrySettings, Settings
from balancer.discovery import QueueDiscovery
from balancer.endpoints import Endpoint, static_endpoint
from balancer.prefix import Kind, routing_key
from balancer.ring import hash_key
from loadtest.procs import free_port
from tests.conftest import MODEL, chat_body, make_settings

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:(\d+))")
FAST_HEALTH = HealthSettings(interval=0.2, timeout=0.5, unhealthy_threshold=2,
                             healthy_threshold=2, ejection_time=1.0, max_ejection_time=4.0)


@dataclass
class Pod:
    """A simulated model server in its own process, restartable on the same port."""

    port: int
    args: tuple[str, ...] = ()
    process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint_id(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loadtest.simserver", "--port", str(self.port),
             "--time-scale", "0.02", "--model", MODEL, "--log-level", "warning", *self.args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def wait_listening(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        assert LISTENING.search(line), line

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)


@contextlib.contextmanager
def pods(n: int, *args: str) -> Iterator[list[Pod]]:
    started = [Pod(free_port(), args) for _ in range(n)]
    try:
        for pod in started:
            pod.spawn()
        for pod in started:
            pod.wait_listening()
        yield started
    finally:
        for pod in started:
            pod.kill()


@dataclass
class Outcome:
    started: float
    ended: float
    endpoint: str | None
    ok: bool
    status: int
    detail: str = ""


@dataclass
class Load:
    """Closed-loop streaming clients, each sending a new conversation after the last ends."""

    url: str
    workers: int = 12
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        body = chat_body(f"conversation {i} " + "x" * 40, stream=True, max_tokens=8)
        started = time.monotonic()
        endpoint, status, ok, detail = None, 0, False, ""
        try:
            async with session.post(self.url + "/v1/chat/completions", json=body) as r:
                status = r.status
                endpoint = r.headers.get("x-balancer-endpoint")
                text = (await r.read()).decode()
                ok = status == 200 and text.rstrip().endswith("data: [DONE]")
                detail = text[-200:]
        except (TimeoutError, aiohttp.ClientError) as exc:
            detail = repr(exc)
        self.outcomes.append(Outcome(started, time.monotonic(), endpoint, ok, status, detail))

    async def _worker(self, w: int, session: aiohttp.ClientSession) -> None:
        i = w
        while not self._stop.is_set():
            await self._one(session, i)
            i += self.workers

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [asyncio.create_task(self._worker(w, session)) for w in range(self.workers)]
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


def settings_for(urls: list[str], **sections: Any) -> Settings:
    settings = make_settings(urls)
    return replace(settings, health=sections.pop("health", FAST_HEALTH), **sections)


async def wait_for(predicate: Any, timeout: float, step: float = 0.01) -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(step)
    return time.monotonic() - start


@pytest.mark.timeout(60)
async def test_kill_9_under_load_loses_only_streams_in_flight_and_ejects_within_a_second(
        start_balancer):
    """SIGKILL one of three pods under load: only its in-flight streams fail, it is ejected
    within 1 s, no request starting afterwards fails, and it rejoins once it is back."""
    with pods(3) as (a, b, c):
        run = await start_balancer(settings_for([a.url, b.url, c.url]))
        pool = run.balancer.router.pools["llama"]
        load = Load(run.url)
        async with load.running():
            await asyncio.sleep(1.0)
            before = len(load.outcomes)
            killed_at = time.monotonic()
            b.kill()
            ejection = await wait_for(lambda: b.endpoint_id not in pool.routable, 5, 0.002)
            ejected_at = time.monotonic()
            await asyncio.sleep(1.0)
            b.spawn()
            await asyncio.to_thread(b.wait_listening)
            back = await wait_for(lambda: b.endpoint_id in pool.routable, 15, 0.05)
            back_at = time.monotonic()
            await asyncio.sleep(0.5)
        failed = load.failed
        print(f"\nFIGURE kill-9: {len(load.outcomes)} requests ({before} before the kill), "
              f"{len(failed)} failed; ejected {ejection * 1000:.0f} ms after the kill; "
              f"back {back:.1f} s after restart")
        assert ejection <= 1.0
        assert before > 20
        for outcome in failed:
            # Only streams that were running on the killed pod when it died.
            assert outcome.started < killed_at, outcome
            assert outcome.endpoint in (b.endpoint_id, None), outcome
        assert len(failed) <= load.workers
        late = [o for o in load.outcomes if ejected_at < o.started < back_at - 0.5
                and o.endpoint == b.endpoint_id]
        assert late == []
        assert any(o.endpoint == b.endpoint_id and o.started > back_at and o.ok
                   for o in load.outcomes)
        await run.wait_idle()


@pytest.mark.timeout(90)
async def test_rolling_restart_with_terminating_endpoints_loses_nothing(start_balancer):
    """Each pod in turn: marked terminating, drained, stopped, restarted, marked serving
    again, all under load: zero failed requests."""
    with pods(3) as all_pods:
        source = QueueDiscovery()

        def snapshot(terminating: Pod | None) -> dict[str, frozenset[Endpoint]]:
            return {"llama": frozenset(
                replace(static_endpoint(p.url), serving=p is not terminating)
                for p in all_pods)}

        run = await start_balancer(settings_for([p.url for p in all_pods]), source=source)
        source.push(snapshot(None))
        await asyncio.wait_for(run.balancer.synced.wait(), 5)
        pool = run.balancer.router.pools["llama"]
        load = Load(run.url)
        async with load.running():
            await asyncio.sleep(0.5)
            for pod in all_pods:
                source.push(snapshot(pod))
                await wait_for(lambda p=pod: p.endpoint_id not in pool.routable
                               and not pool.load.get(p.endpoint_id), 10)
                pod.kill(signal.SIGTERM)
                pod.spawn()
                await asyncio.to_thread(pod.wait_listening)
                source.push(snapshot(None))
                await asyncio.sleep(0.5)
        print(f"\nFIGURE rolling restart: {len(load.outcomes)} requests, "
              f"{len(load.failed)} failed")
        assert len(load.outcomes) > 50
        assert load.failed == []
        await run.wait_idle()


@pytest.mark.timeout(60)
async def test_503_is_retried_on_the_next_endpoint_of_the_walk(upstreams, start_balancer):
    """An endpoint answering 503 costs the client nothing: the retry goes to the next distinct
    endpoint on the key's ring walk, and the endpoint is ejected after repeated 503s."""
    ups = await upstreams(3)
    run = await start_balancer(settings_for([u.url for u in ups]))
    pool = run.balancer.router.pools["llama"]
    by_id = {u.endpoint_id: u for u in ups}
    body = chat_body("retry me")
    walk = list(pool.ring.walk(hash_key(routing_key(Kind.CHAT, body,
                                                    KeyMode.FIRST_USER_MESSAGE, 100))))
    first, second = by_id[walk[0]], by_id[walk[1]]
    first.status = 503
    for _ in range(3):
        async with run.http.post(run.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["x-balancer-endpoint"] == second.endpoint_id
    assert len(first.requests) == 3
    assert first.endpoint_id not in pool.routable  # ejected after 3 in a row
    assert await run.metric("balancer_retries_total", reason="503", result="retried") == 3
    # Ejected: the next request goes straight to the next endpoint.
    async with run.http.post(run.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
    assert len(first.requests) == 3
    await run.wait_idle()


async def test_without_attempts_left_the_upstream_answer_is_relayed(upstreams, start_balancer):
    """max_attempts 1: the upstream's 503 reaches the client as it was."""
    (up,) = await upstreams(1)
    up.status = 503
    run = await start_balancer(settings_for([up.url], retries=RetrySettings(max_attempts=1)))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x")) as r:
        assert r.status == 503
        assert (await r.json())["error"]["message"] == "upstream says no"


async def test_retry_budget_caps_retries(upstreams, start_balancer):
    """With every endpoint failing, retries stop at the budget's floor and the upstream's
    own 503 is answered."""
    ups = await upstreams(2)
    for up in ups:
        up.status = 503
    retries = RetrySettings(budget_ratio=0.0, budget_min_retries=2)
    health = replace(FAST_HEALTH, consecutive_failures=1000, active=False)
    run = await start_balancer(settings_for([u.url for u in ups], retries=retries,
                                            health=health))
    for i in range(5):
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"q{i}")) as r:
            assert r.status == 503
    assert await run.metric("balancer_retries_total", result="retried") == 2
    assert await run.metric("balancer_retries_total", result="budget") == 3


class RateLimited:
    """An upstream answering every request 429 with ``Retry-After: seconds``."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.requests = 0
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if request.path.startswith("/v1/"):  # not the health probes, which run meanwhile
            self.requests += 1
        await request.read()
        return web.json_response({"error": {"message": "slow down"}}, status=429,
                                 headers={"Retry-After": str(self.seconds)})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return f"http://127.0.0.1:{self.server.port}"


async def test_429_retry_after_skips_the_endpoint_and_all_limited_gives_the_smallest(
        upstreams, start_balancer):
    """A 429 sends the request elsewhere and keeps the endpoint out for its Retry-After;
    when every endpoint is limited, balancer answers 429 with the smallest Retry-After."""
    slow, slower = RateLimited(3), RateLimited(7)
    urls = [await slow.start(), await slower.start()]
    try:
        run = await start_balancer(settings_for(urls))
        async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("a")) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "3"
        assert slow.requests == 1 and slower.requests == 1
        # Both are limited now: answered at once, without asking either.
        async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("b")) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) in (2, 3)
        assert slow.requests == 1 and slower.requests == 1

        # With a healthy endpoint beside a limited one, nothing is lost.
        (ok,) = await upstreams(1)
        limited = RateLimited(30)
        run2 = await start_balancer(settings_for([await limited.start(), ok.url]))
        for i in range(6):
            async with run2.http.post(run2.url + "/v1/chat/completions",
                                      json=chat_body(f"k{i}")) as r:
                assert r.status == 200
        assert limited.requests <= 1
    finally:
        for server in (slow, slower):
            assert server.server is not None
            await server.server.close()


@pytest.mark.timeout(60)
async def test_a_hanging_pod_trips_the_idle_timeout_with_an_error_event(start_balancer):
    """A stream that stalls after two chunks ends with an SSE error event when the idle timeout
    fires, and the connection to the pod is closed."""
    with pods(1, "--hang-rate", "1", "--hang-after-chunks", "2") as (pod,):
        limits = LimitsSettings(idle_timeout=0.5)
        run = await start_balancer(settings_for([pod.url], limits=limits))
        started = time.monotonic()
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body("hang", stream=True)) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        assert 0.4 < time.monotonic() - started < 10
        assert await run.metric("balancer_upstream_errors_total", reason="timeout") == 1
        await run.wait_idle()


@pytest.mark.timeout(60)
async def test_slow_start_pod_is_kept_out_until_it_passes_its_checks(start_balancer):
    """A pod answering 503 while it starts loses no request (retried elsewhere), fails its
    checks, and joins once it passes them."""
    with pods(1) as (ready,), pods(1, "--slow-start", "3") as (starting,):
        run = await start_balancer(settings_for([ready.url, starting.url]))
        pool = run.balancer.router.pools["llama"]
        load = Load(run.url, workers=6)
        async with load.running():
            await wait_for(lambda: starting.endpoint_id not in pool.routable, 5)
            await wait_for(lambda: starting.endpoint_id in pool.routable, 15, 0.05)
            joined = time.monotonic()
            await asyncio.sleep(1.0)
        print(f"\nFIGURE slow start: {len(load.outcomes)} requests, {len(load.failed)} failed")
        assert load.failed == []
        assert any(o.endpoint == starting.endpoint_id and o.started > joined
                   for o in load.outcomes)
        await run.wait_idle()


async def test_connect_refused_is_retried_and_ejects_at_once(upstreams, start_balancer):
    """An endpoint nobody listens on: every request still succeeds, and it leaves the ring
    on its first refused connection."""
    (up,) = await upstreams(1)
    dead = f"http://127.0.0.1:{free_port()}"
    run = await start_balancer(settings_for([up.url, dead]))
    pool = run.balancer.router.pools["llama"]
    for i in range(10):
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"c{i}")) as r:
            assert r.status == 200
    assert pool.routable == (up.endpoint_id,)
    assert await run.metric("balancer_endpoint_ejections_total", cause="connect") == 1


async def test_per_endpoint_limit_queues_then_answers_503_with_retry_after(
        upstreams, start_balancer):
    """With one slot per endpoint: a second request waits in the queue and is served when the
    first ends; a third finds the queue full and gets 503 with Retry-After at once; a queued
    request that waits too long gets the same."""
    (up,) = await upstreams(1)
    up.gate = asyncio.Event()
    limits = LimitsSettings(max_in_flight_per_endpoint=1, queue_size=1, queue_timeout=5.0)
    run = await start_balancer(settings_for([up.url], limits=limits))
    url = run.url + "/v1/chat/completions"

    async def post(text: str) -> tuple[int, str | None, bytes]:
        async with run.http.post(url, json=chat_body(text, stream=True)) as r:
            return r.status, r.headers.get("Retry-After"), await r.read()

    first = asyncio.create_task(post("a"))
    await wait_for(lambda: up.active == 1, 5)
    second = asyncio.create_task(post("b"))
    await asyncio.sleep(0.2)
    assert not second.done() and len(up.requests) == 1
    status, retry_after, _ = await post("c")
    assert (status, retry_after) == (503, "1")
    up.gate.set()
    assert (await first)[0] == 200
    assert (await second)[0] == 200
    assert len(up.requests) == 2

    up.gate = asyncio.Event()
    held = asyncio.create_task(post("d"))
    await wait_for(lambda: up.active == 1, 5)
    run.balancer.proxy.admission.queue_timeout = 0.3
    started = time.monotonic()
    status, retry_after, _ = await post("e")
    assert (status, retry_after) == (503, "1")
    assert 0.25 < time.monotonic() - started < 3
    up.gate.set()
    assert (await held)[0] == 200
    await run.wait_idle()
    assert not run.balancer.router.pools["llama"].waiters
