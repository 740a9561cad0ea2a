"""The admin port: liveness, readiness, metrics and debugging views."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from balancer.config import LimitsSettings
from balancer.discovery import QueueDiscovery
from balancer.endpoints import static_endpoint
from tests.conftest import chat_body, make_settings


async def test_healthz_is_always_ok(upstreams, start_balancer):
    """Liveness does not depend on endpoints."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    async with run.http.get(run.admin_url + "/healthz") as r:
        assert r.status == 200


async def test_readyz_follows_discovery_and_draining_not_the_endpoints(
        upstreams, start_balancer):
    """Not ready until discovery synced once; then ready even with a pool that has no
    endpoint (its requests wait and get 503, see test_empty_pools); not ready while
    draining."""
    (up,) = await upstreams(1)
    source = QueueDiscovery()
    run = await start_balancer(make_settings([up.url]), source=source)
    async with run.http.get(run.admin_url + "/readyz") as r:
        assert r.status == 503
        assert (await r.json())["reason"] == "discovery not synced yet"
    source.push({"llama": frozenset()})
    await asyncio.wait_for(run.balancer.synced.wait(), 5)
    async with run.http.get(run.admin_url + "/readyz") as r:
        assert r.status == 200
        assert (await r.json())["unready_pools"] == {"llama": "no routable endpoints"}
    source.push({"llama": frozenset({static_endpoint(up.url)})})
    async with asyncio.timeout(5):
        while run.balancer.router.unready_pools():
            await asyncio.sleep(0.01)
    async with run.http.get(run.admin_url + "/readyz") as r:
        assert r.status == 200
        assert (await r.json())["unready_pools"] == {}
    run.balancer.proxy.draining = True
    async with run.http.get(run.admin_url + "/readyz") as r:
        assert r.status == 503
        assert (await r.json())["reason"] == "draining"


async def test_no_endpoints_gives_503(upstreams, start_balancer):
    """A pool with no routable endpoint answers 503 with an OpenAI error body and
    Retry-After (after ``limits.empty_pool_wait``, here none)."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url], limits=LimitsSettings(
        empty_pool_wait=0.0)), source=QueueDiscovery())
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x")) as r:
        assert r.status == 503
        assert (await r.json())["error"]["type"] == "service_unavailable"
        assert "Retry-After" in r.headers
    assert await run.metric("balancer_rejected_requests_total", reason="no_endpoints") == 1


async def test_metrics_expose_requests_routes_and_latencies(upstreams, start_balancer):
    """After traffic, /metrics parses and holds the request, route, latency and in-flight
    families."""
    ups = await upstreams(2)
    run = await start_balancer(make_settings([u.url for u in ups]))
    for i in range(6):
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"q{i}", stream=i % 2 == 0)) as r:
            await r.read()
    async with run.http.get(run.admin_url + "/metrics") as r:
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("balancer_requests", "balancer_route_decisions",
                 "balancer_upstream_first_byte_seconds", "balancer_request_duration_seconds",
                 "balancer_endpoint_in_flight_requests", "balancer_pool_endpoints"):
        assert name in families, name
    assert await run.metric("balancer_requests_total") == 6
    assert await run.metric("balancer_route_decisions_total", outcome="primary") == 6
    assert await run.metric("balancer_request_duration_seconds_count") == 6
    assert await run.metric("balancer_upstream_first_byte_seconds_count") == 6
    assert await run.metric("balancer_pool_endpoints", state="routable") == 2
    assert await run.metric("balancer_endpoint_in_flight_requests") == 0


async def test_debug_endpoints_show_load_and_ring_share(upstreams, start_balancer):
    """/debug/endpoints lists each endpoint with its in-flight load and ring share."""
    ups = await upstreams(3)
    run = await start_balancer(make_settings([u.url for u in ups]))
    async with run.http.get(run.admin_url + "/debug/endpoints") as r:
        body = await r.json()
    endpoints = body["pools"]["llama"]["endpoints"]
    assert {e["id"] for e in endpoints} == {u.endpoint_id for u in ups}
    assert abs(sum(e["ring_share"] for e in endpoints) - 1.0) < 1e-3
    assert all(e["routable"] and e["in_flight"] == 0 for e in endpoints)


async def test_endpoint_changes_apply_without_restart(upstreams, start_balancer):
    """A new snapshot replaces the endpoint set; removed endpoints get no new requests."""
    ups = await upstreams(2)
    source = QueueDiscovery()
    run = await start_balancer(make_settings([u.url for u in ups]), source=source)
    source.push({"llama": frozenset({static_endpoint(ups[0].url)})})
    await asyncio.wait_for(run.balancer.synced.wait(), 5)
    for i in range(5):
        async with run.http.post(run.url + "/v1/chat/completions", json=chat_body(f"{i}")) as r:
            assert r.headers["x-balancer-endpoint"] == ups[0].endpoint_id
    source.push({"llama": frozenset({static_endpoint(ups[1].url)})})
    async with asyncio.timeout(5):
        while run.balancer.router.pools["llama"].routable != (ups[1].endpoint_id,):
            await asyncio.sleep(0.01)
    for i in range(5):
        async with run.http.post(run.url + "/v1/chat/completions", json=chat_body(f"{i}")) as r:
            assert r.headers["x-balancer-endpoint"] == ups[1].endpoint_id


async def test_debug_endpoints_show_each_endpoints_health_history(upstreams, start_balancer):
    """An endpoint ejected for refusing connections shows the ejection in its history."""
    alive, dead = await upstreams(2)
    dead_url, dead_id = dead.url, dead.endpoint_id
    assert dead.server is not None
    await dead.server.close()
    run = await start_balancer(make_settings([alive.url, dead_url]))
    for i in range(20):
        async with run.http.post(run.url + "/v1/chat/completions", json=chat_body(f"k{i}")) as r:
            assert r.status == 200  # retried on the live endpoint
        if run.balancer.health.events("llama", dead_id):
            break
    async with run.http.get(run.admin_url + "/debug/endpoints") as r:
        body = await r.json()
    by_id = {e["id"]: e for e in body["pools"]["llama"]["endpoints"]}
    history = by_id[dead_id]["health_history"]
    assert history and history[0]["event"] == "ejected"
    assert history[0]["cause"] == "connect"
    assert by_id[alive.endpoint_id]["health_history"] == []


async def test_an_ejection_that_ends_is_counted_as_a_return(upstreams, start_balancer):
    """When an ejection ends the endpoint goes on trial: a history event and a metric."""
    alive, dead = await upstreams(2)
    dead_url, dead_id = dead.url, dead.endpoint_id
    assert dead.server is not None
    await dead.server.close()
    settings = make_settings([alive.url, dead_url])
    settings = replace(settings, health=replace(settings.health, ejection_time=0.2,
                                                active=False))
    run = await start_balancer(settings)
    for i in range(20):
        async with run.http.post(run.url + "/v1/chat/completions", json=chat_body(f"k{i}")) as r:
            assert r.status == 200
        if run.balancer.health.events("llama", dead_id):
            break
    async with asyncio.timeout(5):
        while not any(e["event"] == "on_trial"
                      for e in run.balancer.health.events("llama", dead_id)):
            await asyncio.sleep(0.05)
    assert await run.metric("balancer_endpoint_returns_total", endpoint=dead_id) == 1
