"""Zone preference end to end: real balancers in two zones in front of four real upstream
doubles (two per zone) on 127.0.0.1.

Keyed requests stay in the balancer's zone while its endpoints are within the load bound, and
leave it only when they are over it; the locality metric and /debug/endpoints say so.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from balancer.config import PoolSettings, RoutingSettings, Settings, validate
from tests.conftest import MODEL, chat_body

ZONES = ("zone-a", "zone-b")


def zoned_settings(urls: list[str], zone: str, *, prefer: bool = True,
                   **routing: Any) -> Settings:
    """Upstream i in zone-a when i is even, zone-b when odd; the balancer in ``zone``."""
    pool = PoolSettings("llama", (MODEL,), tuple(urls),
                        zones=tuple((url, ZONES[i % 2]) for i, url in enumerate(urls)))
    return validate(Settings(pools=(pool,), routing=RoutingSettings(
        zone=zone, prefer_zone=prefer, **routing)))


async def endpoints_of(run: Any, bodies: list[dict[str, Any]]) -> list[str]:
    chosen = []
    for body in bodies:
        async with run.http.post(run.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            await r.read()
            chosen.append(r.headers["x-balancer-endpoint"])
    return chosen


BODIES = [chat_body(f"conversation {i}: tell me about the weather in spring") for i in range(16)]


async def test_keyed_requests_stay_in_the_balancers_zone(upstreams, start_balancer) -> None:
    """A balancer in each zone sends every conversation to its own zone's endpoints, two
    replicas of one zone agree on each conversation's endpoint, and without the preference
    the conversations spread over both zones."""
    ups = await upstreams(4)
    urls = [u.url for u in ups]
    zone_of = {u.endpoint_id: ZONES[i % 2] for i, u in enumerate(ups)}
    in_a = await start_balancer(zoned_settings(urls, "zone-a"))
    also_in_a = await start_balancer(zoned_settings(urls, "zone-a"))
    in_b = await start_balancer(zoned_settings(urls, "zone-b"))
    unzoned = await start_balancer(zoned_settings(urls, "zone-a", prefer=False))

    from_a = await endpoints_of(in_a, BODIES)
    assert {zone_of[e] for e in from_a} == {"zone-a"}
    assert len(set(from_a)) == 2  # both zone-a endpoints take keys
    assert await endpoints_of(also_in_a, BODIES) == from_a
    assert {zone_of[e] for e in await endpoints_of(in_b, BODIES)} == {"zone-b"}
    assert {zone_of[e] for e in await endpoints_of(unzoned, BODIES)} == set(ZONES)

    assert await in_a.metric("balancer_zone_requests_total", locality="local") == 16
    assert await in_a.metric("balancer_zone_requests_total", locality="remote") == 0
    unzoned_remote = await unzoned.metric("balancer_zone_requests_total", locality="remote")
    assert 0 < unzoned_remote < 16  # locality is counted without the preference too

    async with in_a.http.get(in_a.admin_url + "/debug/endpoints") as r:
        pool = (await r.json())["pools"]["llama"]
    assert pool["zone"] == "zone-a" and pool["prefer_zone"] is True
    assert sorted(pool["local_endpoints"]) == sorted(e for e, z in zone_of.items()
                                                     if z == "zone-a")
    assert {e["id"]: (e["zone"], e["local"]) for e in pool["endpoints"]} == {
        e: (z, z == "zone-a") for e, z in zone_of.items()}
    assert pool["zone_spill"]["share"] == 0.0  # an idle pool keeps its keys

    async with in_a.http.post(in_a.admin_url + "/debug/route", json=BODIES[0]) as r:
        explained = await r.json()
    assert explained["endpoint"] == from_a[0]
    assert explained["zone"]["local"] is True
    assert explained["zone"]["reason"].startswith("stayed in the zone")
    assert explained["zone"]["spill"]["this_key"] is False


async def test_a_zone_over_the_bound_spills_to_the_other_zone(upstreams,
                                                              start_balancer) -> None:
    """With c = 1 the bound is the pool's average: once both zone-a endpoints hold a stream,
    the next conversation goes to zone-b (an overflow), and back in zone-a once they end."""
    ups = await upstreams(4)
    gate = asyncio.Event()
    for up in ups[0::2]:
        up.gate = gate  # zone-a streams hold after their first chunk
    zone_of = {u.endpoint_id: ZONES[i % 2] for i, u in enumerate(ups)}
    settings = zoned_settings([u.url for u in ups], "zone-a", load_factor=1.0, min_bound=1)
    run = await start_balancer(settings)
    held: list[aiohttp.ClientResponse] = []
    try:
        for i in range(2):
            response = await run.http.post(
                run.url + "/v1/chat/completions",
                json=chat_body(f"held conversation {i}", stream=True))
            assert response.status == 200
            await response.content.readline()  # the first chunk: the stream is under way
            held.append(response)
        assert {zone_of[r.headers["x-balancer-endpoint"]] for r in held} == {"zone-a"}
        assert len({r.headers["x-balancer-endpoint"] for r in held}) == 2

        (spilled,) = await endpoints_of(run, [chat_body("a third conversation")])
        assert zone_of[spilled] == "zone-b"
        assert await run.metric("balancer_zone_requests_total", locality="remote") == 1
    finally:
        gate.set()
        for response in held:
            await response.read()
            response.release()
    await run.wait_idle()
    (back,) = await endpoints_of(run, [chat_body("a third conversation")])
    assert zone_of[back] == "zone-a"
    assert await run.metric("balancer_zone_requests_total", locality="local") == 3
