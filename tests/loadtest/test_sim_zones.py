"""Simulated pods in zones: a request from another zone pays a round trip and is counted."""

from __future__ import annotations

import time
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from loadtest.simserver import DEFAULT_MODEL, SimConfig, build_app
from loadtest.simserver.__main__ import build_parser, configs_from_args, with_zones
from loadtest.simserver.config import CLIENT_ZONE_HEADER

BODY = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2}


def test_pods_take_the_zones_in_turn() -> None:
    """--zones a,b over five pods: a, b, a, b, a; no --zones: no zone; the round trip is
    the documented default unless given."""
    args = build_parser().parse_args(["--pods", "5", "--zones", "zone-a,zone-b"])
    configs = configs_from_args(args)
    assert [c.zone for c in configs] == ["zone-a", "zone-b", "zone-a", "zone-b", "zone-a"]
    assert {c.cross_zone_rtt for c in configs} == {0.001}
    plain = configs_from_args(build_parser().parse_args(["--pods", "2"]))
    assert [c.zone for c in plain] == [None, None]
    assert with_zones(plain, " , ") == plain
    rtt = build_parser().parse_args(["--zones", "a", "--cross-zone-rtt", "0.004"])
    assert configs_from_args(rtt)[0].cross_zone_rtt == 0.004


def test_a_negative_round_trip_is_refused() -> None:
    with pytest.raises(ValueError, match="cross_zone_rtt"):
        SimConfig(cross_zone_rtt=-1.0)


async def _timed_post(client: Any, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    async with client.post("/v1/chat/completions", json=BODY, headers=headers) as r:
        assert r.status == 200
        await r.read()
    return time.perf_counter() - started


async def test_a_request_from_another_zone_waits_a_round_trip_and_is_counted(
        aiohttp_client: AiohttpClient) -> None:
    """Same zone or no header: no wait, not cross-zone; another zone: at least the round
    trip (0.3 s here, scaled by the time scale of 1), counted in /stats."""
    client = await aiohttp_client(build_app(SimConfig(name="p", zone="zone-a",
                                                      cross_zone_rtt=0.3)))
    local = await _timed_post(client, {CLIENT_ZONE_HEADER: "zone-a"})
    await _timed_post(client, {})
    remote = await _timed_post(client, {CLIENT_ZONE_HEADER: "zone-b"})
    assert remote >= 0.3  # the sleep itself; no upper bound needed for what it shows
    assert local < remote
    async with client.get("/stats") as r:
        stats = await r.json()
    assert stats["zone"] == "zone-a"
    assert (stats["client_zone_requests"], stats["cross_zone_requests"]) == (2, 1)


async def test_a_pod_without_a_zone_ignores_the_clients_zone(
        aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(build_app(SimConfig(name="p", cross_zone_rtt=5.0)))
    assert await _timed_post(client, {CLIENT_ZONE_HEADER: "zone-b"}) < 5.0
    async with client.get("/stats") as r:
        stats = await r.json()
    assert (stats["zone"], stats["cross_zone_requests"]) == (None, 0)
