"""A pool with no routable endpoint: readiness stays up, its requests wait for an endpoint
(woken the moment one arrives) and then get 503 with Retry-After, and a pool whose pods all
terminate keeps serving on those that still serve."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from balancer.config import LimitsSettings
from balancer.discovery import QueueDiscovery
from balancer.endpoints import static_endpoint
from tests.apiserver import ApiServer, discovery_settings, endpoint, endpoint_slice, eventually
from tests.conftest import chat_body, make_settings


async def test_an_empty_pool_keeps_readyz_up_and_answers_503_with_retry_after(
        upstreams, start_balancer):
    """Synced with no endpoint: ready (the pool's state is in the body and the gauge); a
    request waits ``empty_pool_wait`` and gets 503 with Retry-After, counted."""
    (up,) = await upstreams(1)
    source = QueueDiscovery()
    run = await start_balancer(make_settings([up.url], limits=LimitsSettings(
        empty_pool_wait=0.3)), source=source)
    source.push({"llama": frozenset()})
    await asyncio.wait_for(run.balancer.synced.wait(), 5)
    async with run.http.get(run.admin_url + "/readyz") as r:
        assert r.status == 200
        assert (await r.json())["unready_pools"] == {"llama": "no routable endpoints"}
    assert await run.metric("balancer_pool_ready", pool="llama") == 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x")) as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["type"] == "service_unavailable"
    assert 0.25 <= loop.time() - started < 5  # waited its 0.3 s, give or take
    assert await run.metric("balancer_empty_pool_waits_total", why="no_endpoints",
                            result="timeout") == 1
    assert await run.metric("balancer_rejected_requests_total", reason="no_endpoints") == 1
    assert up.requests == []


async def test_a_pool_that_comes_up_during_the_wait_serves_the_waiting_requests(
        upstreams, start_balancer):
    """Requests waiting for an empty pool go out as soon as its first endpoint arrives, long
    before the wait would end."""
    (up,) = await upstreams(1)
    source = QueueDiscovery()
    run = await start_balancer(make_settings([up.url], limits=LimitsSettings(
        empty_pool_wait=30.0)), source=source)
    source.push({"llama": frozenset()})
    await asyncio.wait_for(run.balancer.synced.wait(), 5)

    async def ask(i: int) -> int:
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"q{i}")) as r:
            await r.read()
            return r.status

    waiting = [asyncio.create_task(ask(i)) for i in range(3)]
    async with asyncio.timeout(5):
        while await run.metric("balancer_empty_pool_waiting") < 3:
            await asyncio.sleep(0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    source.push({"llama": frozenset({static_endpoint(up.url)})})
    assert await asyncio.wait_for(asyncio.gather(*waiting), 10) == [200, 200, 200]
    assert loop.time() - started < 5  # woken at once, not at the end of the 30 s wait
    assert await run.metric("balancer_empty_pool_waits_total", why="no_endpoints",
                            result="served") == 3
    assert await run.metric("balancer_pool_ready", pool="llama") == 1


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer.running() as server:
        yield server


async def test_pods_that_all_terminate_keep_serving_until_a_ready_one_arrives(
        api, upstreams, start_balancer, tmp_path):
    """EndpointSlices through the API-server double: with every pod terminating but still
    serving, requests go to them (as kube-proxy would); a ready pod takes over at once."""
    old, new = await upstreams(2)

    def pod_slice(up, name: str, **conditions) -> dict:
        return endpoint_slice(name, [endpoint(name, "127.0.0.1", **conditions)],
                              port=up.server.port)

    api.apply(pod_slice(old, "old", ready=True))
    run = await start_balancer(discovery_settings(api, tmp_path))
    pool = run.balancer.router.pools["llama"]
    await eventually(lambda: pool.routable == ("old",))
    api.apply(pod_slice(old, "old", ready=False, serving=True, terminating=True))
    await eventually(lambda: pool.terminating == ("old",))
    assert pool.routable == ("old",)
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x")) as r:
        assert r.status == 200
        assert r.headers["x-balancer-endpoint"] == "old"
    api.apply(pod_slice(new, "new", ready=True))
    await eventually(lambda: pool.routable == ("new",))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x")) as r:
        assert r.headers["x-balancer-endpoint"] == "new"

