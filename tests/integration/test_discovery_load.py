"""Kubernetes discovery under load: churn, replicas that must agree, the proxy end to end
while endpoints change, and models learned from the endpoints."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer.config import ModelDiscoverySettings
from balancer.prefix import session_key
from balancer.ring import hash_key
from tests.apiserver import ApiServer, discovery_settings, endpoint, endpoint_slice, eventually
from tests.conftest import MODEL, Upstream, chat_body
from tests.k8s.figures import (
    RingWatcher,
    agreement,
    churn,
    first_choices,
    percentile,
    service_slices,
)


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer.running(bookmark_interval=0.5) as server:
        yield server


def pool(run):
    return run.balancer.router.pools["llama"]


async def test_500_endpoints_churned_at_50_events_a_second_without_falling_behind(
        api, start_balancer, tmp_path):
    """Every readiness flip reaches the ring, in order and quickly, and the final view is
    exact. (Measured here on 2 cores: p50 ~3 ms, p99 ~8 ms; the bounds leave room for a
    loaded machine.)"""
    for item in service_slices(500, 100):
        api.apply(item)
    run = await start_balancer(discovery_settings(api, tmp_path))
    await eventually(lambda: len(pool(run).routable) == 500, timeout=30)
    lags = await churn(api, run.balancer, pods=500, per_slice=100, rate=50, events=150)
    print(f"\nlag p50 {statistics.median(lags) * 1000:.1f} ms, "
          f"p99 {percentile(lags, 0.99) * 1000:.1f} ms")
    assert statistics.median(lags) < 0.25
    assert percentile(lags, 0.99) < 1.0
    assert await run.metric("balancer_discovery_relists_total") == 1


async def test_two_replicas_watching_one_service_agree_on_every_key(
        api, start_balancer, tmp_path):
    """Two balancers make the same first choice for all 10,000 keys, before and after a scale
    up, and the scale-up moves about 1/9 of the keys, all of them to the new pod."""
    for item in service_slices(8, 100):
        api.apply(item)
    settings = discovery_settings(api, tmp_path)
    a, b = [pool(await start_balancer(settings)) for _ in range(2)]
    assert agreement(a, b) == 1.0
    before = first_choices(a)
    for item in service_slices(9, 100):
        api.apply(item)
    await eventually(lambda: len(a.routable) == len(b.routable) == 9)
    assert agreement(a, b) == 1.0
    after = first_choices(a)
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert 0.08 < len(moved) / len(before) < 0.15
    assert {y for _, y in moved} == {"vllm-8"}


@dataclass
class Outcome:
    sent: float
    status: int
    endpoint: str
    complete: bool


async def test_the_proxy_under_load_never_sends_to_a_removed_or_terminating_pod(
        api, upstreams, start_balancer, tmp_path):
    """While clients keep 12 requests in flight, pods are removed, drained, flapped and added:
    every request succeeds, streams complete (a draining pod finishes its own), and no request
    sent after the ring dropped a pod reaches it."""
    ups = await upstreams(7)
    for up in ups:
        up.chunks, up.chunk_delay = 4, 0.01

    def pod_slice(i: int, **conditions) -> dict:
        return endpoint_slice(f"vllm-{i}", [endpoint(f"pod-{i}", "127.0.0.1", **conditions)],
                              port=ups[i].server.port)

    for i in range(6):
        api.apply(pod_slice(i))
    run = await start_balancer(discovery_settings(api, tmp_path))
    watcher = RingWatcher(run.balancer)
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def client(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            stream = n % 2 == 0
            sent = time.perf_counter()
            async with run.http.post(run.url + "/v1/chat/completions",
                                     json=chat_body(f"conversation {worker}-{n % 4}",
                                                    stream=stream)) as r:
                text = await r.text()
                complete = text.endswith("data: [DONE]\n\n") if stream else \
                    json.loads(text)["choices"][0]["message"]["content"].startswith("from")
                outcomes.append(Outcome(sent, r.status, r.headers.get(
                    "x-balancer-endpoint", ""), complete))

    workers = [asyncio.create_task(client(w)) for w in range(12)]
    await asyncio.sleep(0.3)
    api.delete("llm", "vllm-0")                                               # pod deleted
    await asyncio.sleep(0.3)
    api.apply(pod_slice(1, ready=False, serving=True, terminating=True))      # drains
    await asyncio.sleep(0.3)
    api.apply(pod_slice(2, ready=False))                                      # probe fails
    await asyncio.sleep(0.3)
    api.apply(pod_slice(2))                                                   # and recovers
    api.apply(pod_slice(6))                                                   # scale-up
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)

    assert len(outcomes) > 100
    assert all(o.status == 200 and o.complete for o in outcomes)
    for pod in ("pod-0", "pod-1"):
        (gone,) = [at for at, state in watcher.changes[pod] if not state]
        late = [o for o in outcomes if o.sent > gone and o.endpoint == f"pod-{pod[-1]}"]
        assert late == [], pod
    (down, up) = [at for at, _ in watcher.changes["pod-2"]]
    assert not [o for o in outcomes if down < o.sent and o.endpoint == "pod-2"
                and o.sent + 0.05 < up]
    assert any(o.endpoint == "pod-6" for o in outcomes)
    assert await run.metric("balancer_upstream_errors_total") == 0


async def test_a_draining_pod_finishes_the_stream_it_has(api, upstreams, start_balancer,
                                                          tmp_path):
    """A stream in flight on a pod that starts terminating runs to its end; new requests go
    elsewhere meanwhile."""
    ups = await upstreams(2)
    gate = ups[0].gate = asyncio.Event()
    slices = [endpoint_slice(f"vllm-{i}", [endpoint(f"pod-{i}", "127.0.0.1")],
                             port=up.server.port) for i, up in enumerate(ups)]
    for item in slices:
        api.apply(item)
    run = await start_balancer(discovery_settings(api, tmp_path))
    session = next(f"s{i}" for i in range(1000)
                   if pool(run).ring.first(hash_key(session_key(f"s{i}", {}))) == "pod-0")
    async with run.http.post(run.url + "/v1/chat/completions",
                             json=chat_body("long story", stream=True),
                             headers={"x-session-id": session}) as streaming:
        assert streaming.headers["x-balancer-endpoint"] == "pod-0"
        await streaming.content.readline()
        slices[0]["endpoints"][0]["conditions"] = {"ready": False, "serving": True,
                                                   "terminating": True}
        api.apply(slices[0])
        await eventually(lambda: pool(run).routable == ("pod-1",))
        async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("new"),
                                 headers={"x-session-id": session}) as r:
            assert r.headers["x-balancer-endpoint"] == "pod-1"
        gate.set()
        assert (await streaming.text()).endswith("data: [DONE]\n\n")
    assert ups[0].completed == 1


# -- models learned from /v1/models -----------------------------------------------------------


@dataclass
class ModelServer(Upstream):
    """An upstream double that also lists its models, as vLLM does (base model and LoRA
    adapters)."""

    models: tuple[str, ...] = (MODEL,)
    models_status: int = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def list_models(self, request: web.Request) -> web.Response:
        if self.models_status != 200:
            return web.json_response({"error": {"message": "not yet"}},
                                     status=self.models_status)
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "vllm"} for m in self.models]})


@pytest.fixture
async def model_servers() -> AsyncIterator[list[ModelServer]]:
    servers = [ModelServer(name=f"m{i}") for i in range(3)]
    for server in servers:
        server.server = TestServer(server.app(), host="127.0.0.1")
        await server.server.start_server()
    yield servers
    for server in servers:
        await server.server.close()


async def test_a_pool_learns_its_models_from_the_endpoints(api, model_servers, start_balancer,
                                                           tmp_path):
    """Without configured models the pool serves what its endpoints list: a new pod's LoRA
    adapter appears at once, a model no endpoint lists any more is a 404, and a pool scaled
    to zero keeps its models (503 rather than 404)."""
    m1 = model_servers[1]
    m1.models = (MODEL, "sql-lora")

    def pod_slice(i: int) -> dict:
        return endpoint_slice(f"vllm-{i}", [endpoint(f"pod-{i}", "127.0.0.1")],
                              port=model_servers[i].server.port)

    api.apply(pod_slice(0))
    settings = discovery_settings(api, tmp_path, models=())
    run = await start_balancer(replace(settings, limits=replace(settings.limits,
                                                                empty_pool_wait=0.2)))
    router = run.balancer.router
    await eventually(lambda: router.models == (MODEL,))
    async with run.http.get(run.admin_url + "/readyz") as r:
        assert r.status == 200
    api.apply(pod_slice(1))
    await eventually(lambda: "sql-lora" in router.models)
    async with run.http.get(run.url + "/v1/models") as r:
        assert {m["id"] for m in (await r.json())["data"]} == {MODEL, "sql-lora"}
    async with run.http.post(run.url + "/v1/chat/completions",
                             json={**chat_body("hi"), "model": "sql-lora"}) as r:
        assert r.status == 200
    api.delete("llm", "vllm-1")
    await eventually(lambda: "sql-lora" not in router.models)
    async with run.http.post(run.url + "/v1/chat/completions",
                             json={**chat_body("hi"), "model": "sql-lora"}) as r:
        assert r.status == 404
    api.delete("llm", "vllm-0")
    await eventually(lambda: not pool(run).routable)
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.status == 503
        assert "Retry-After" in r.headers
    assert router.models == (MODEL,)


async def test_a_request_waits_for_the_pool_to_learn_its_models(
        api, model_servers, start_balancer, tmp_path):
    """Until an endpoint has listed its models the pool is not ready (in /readyz's body and
    the gauge, while /readyz itself stays 200), and a request for a model waits rather than
    get 404; an endpoint whose /v1/models fails is counted and asked again at the next
    refresh, and the waiting request is served once it answers."""
    m0 = model_servers[0]
    m0.models_status = 503
    api.apply(endpoint_slice("vllm-0", [endpoint("pod-0", "127.0.0.1")],
                             port=m0.server.port))
    settings = replace(discovery_settings(api, tmp_path, models=()),
                       model_discovery=ModelDiscoverySettings(refresh_interval=0.2))
    run = await start_balancer(settings)
    async with asyncio.timeout(5):
        while await run.metric("balancer_discovery_errors_total", reason="models") < 1:
            await asyncio.sleep(0.02)
    async with run.http.get(run.admin_url + "/readyz") as r:
        assert r.status == 200
        assert (await r.json())["unready_pools"] == {"llama": "models not learned yet"}
    assert await run.metric("balancer_pool_ready", pool="llama") == 0
    asking = asyncio.ensure_future(run.http.post(run.url + "/v1/chat/completions",
                                                 json=chat_body("hi")))
    async with asyncio.timeout(5):
        while await run.metric("balancer_empty_pool_waiting") < 1:
            await asyncio.sleep(0.02)
    m0.models_status = 200
    async with await asyncio.wait_for(asking, 10) as r:
        assert r.status == 200
    assert run.balancer.router.models == (MODEL,)
    assert await run.metric("balancer_empty_pool_waits_total", why="model_unknown",
                            result="served") == 1
    assert await run.metric("balancer_pool_ready", pool="llama") == 1
