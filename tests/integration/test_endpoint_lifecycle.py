"""An endpoint's state lives from discovery to its last request, then nothing is left."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from balancer.discovery import QueueDiscovery
from balancer.endpoints import static_endpoint
from balancer.prefix import Kind
from balancer.route import decide, keyed_view
from tests.conftest import RunningBalancer, chat_body, make_settings


async def endpoint_series(run: RunningBalancer, endpoint: str) -> list[str]:
    """The /metrics samples labelled with ``endpoint``."""
    async with run.http.get(run.admin_url + "/metrics") as r:
        text = await r.text()
    return [f"{s.name}{s.labels}" for family in text_string_to_metric_families(text)
            for s in family.samples if s.labels.get("endpoint") == endpoint]


def body_for(run: RunningBalancer, endpoint: str, **extra: Any) -> dict[str, Any]:
    """A chat body the balancer routes to ``endpoint`` (asked of the shared decision)."""
    for i in range(1000):
        body = chat_body(f"conversation {i}", **extra)
        view = keyed_view(Kind.CHAT, body, None)
        if decide(view, run.balancer.router).choice.endpoint == endpoint:
            return body
    raise AssertionError(f"no key found for {endpoint}")


async def test_an_endpoint_removed_mid_stream_is_freed_when_the_stream_ends(
        upstreams, start_balancer):
    """Added, loaded, removed while its stream runs: it leaves the ring at once but keeps
    its count; when the stream ends, its load entry, connections, probe and metric series
    are all gone, while the other endpoint keeps its own."""
    a, b = await upstreams(2)
    a.gate = asyncio.Event()
    source = QueueDiscovery()
    run = await start_balancer(make_settings([a.url, b.url]), source=source)
    source.push({"llama": frozenset({static_endpoint(a.url), static_endpoint(b.url)})})
    await asyncio.wait_for(run.balancer.synced.wait(), 5)
    pool = run.balancer.router.pools["llama"]
    for up in (a, b):  # finished traffic on both, so both have series
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=body_for(run, up.endpoint_id)) as r:
            assert r.headers["x-balancer-endpoint"] == up.endpoint_id
    assert await endpoint_series(run, a.endpoint_id)

    body = body_for(run, a.endpoint_id, stream=True)
    async with run.http.post(run.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["x-balancer-endpoint"] == a.endpoint_id
        await asyncio.wait_for(r.content.readline(), 5)
        state = pool.states[a.endpoint_id]
        connections = state.connections
        assert connections is not None and connections.open_count == 1

        source.push({"llama": frozenset({static_endpoint(b.url)})})
        async with asyncio.timeout(5):
            while a.endpoint_id in pool.routable:
                await asyncio.sleep(0.01)
        assert run.load() == {a.endpoint_id: 1}
        assert a.endpoint_id not in pool.endpoints and a.endpoint_id in pool.states
        assert state.probe is None  # no checks for an endpoint that left

        a.gate.set()
        rest = await asyncio.wait_for(r.content.read(), 5)
    assert rest.rstrip().endswith(b"data: [DONE]")
    await run.wait_idle()

    assert a.endpoint_id not in pool.states
    assert a.endpoint_id not in pool.load
    assert connections.closed and connections.open_count == 0
    assert state.connections is None and state.probe is None
    assert state.history is None and state.models is None
    assert state.metrics.series == 0
    assert await endpoint_series(run, a.endpoint_id) == []
    assert await endpoint_series(run, b.endpoint_id)
    # A late call on the retired state's metrics cannot bring a series back.
    state.metrics.request("primary", 200)
    assert await endpoint_series(run, a.endpoint_id) == []


async def test_an_idle_endpoint_that_leaves_is_freed_at_once(upstreams, start_balancer):
    """With nothing in flight, the snapshot without it frees everything right away."""
    a, b = await upstreams(2)
    source = QueueDiscovery()
    run = await start_balancer(make_settings([a.url, b.url]), source=source)
    source.push({"llama": frozenset({static_endpoint(a.url), static_endpoint(b.url)})})
    await asyncio.wait_for(run.balancer.synced.wait(), 5)
    pool = run.balancer.router.pools["llama"]
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x"),
                             headers={"x-session-id": "s"}) as r:
        used = r.headers["x-balancer-endpoint"]
    state = pool.states[used]
    connections = state.connections
    assert connections is not None
    source.push({"llama": frozenset({static_endpoint(u.url) for u in (a, b)
                                     if u.endpoint_id != used})})
    async with asyncio.timeout(5):
        while used in pool.states:
            await asyncio.sleep(0.01)
    assert connections.closed and connections.open_count == 0
    assert await endpoint_series(run, used) == []
