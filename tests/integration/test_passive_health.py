"""Passive ejection over real sockets: capped per pool, and charged only for the model
server's faults.

Every test runs with ``consecutive_failures: 1`` and active checks off, so a single attempt
counted against an endpoint would eject it: "no ejection" means "nothing was counted".
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from balancer.config import LimitsSettings, Settings
from tests.conftest import RunningBalancer, chat_body, make_settings
from tests.integration.test_bad_input import CASES
from tests.integration.test_endpoint_lifecycle import body_for

CHAT = "/v1/chat/completions"


def strict(urls: list[str], limits: LimitsSettings | None = None, **health: Any) -> Settings:
    """One failure ejects (for long enough to outlast the test); no active checks."""
    settings = make_settings(urls, limits=limits)
    return replace(settings, health=replace(
        settings.health, active=False, consecutive_failures=1, ejection_time=60.0,
        max_ejection_time=120.0, **health))


async def assert_nothing_counted(run: RunningBalancer) -> None:
    """No ejection, no held-back ejection, no failure on any endpoint's count."""
    pool = run.balancer.router.pools["llama"]
    assert await run.metric("balancer_endpoint_ejections_total") == 0
    assert await run.metric("balancer_pool_ejections_skipped_total") == 0
    assert pool.out == frozenset() and pool.routable == pool.serving
    assert all(s.health.failures == 0 for s in pool.states.values())


# -- the cap ------------------------------------------------------------------------------


@pytest.mark.parametrize(("percent", "ejected"), [(10.0, 1), (50.0, 2), (100.0, 3)])
async def test_three_of_four_failing_only_the_capped_number_is_ejected(
        upstreams, start_balancer, caplog, percent, ejected):
    """Three of four model servers answer 500 to everything: at 10% one is ejected (the
    rest keep their keys, each held-back ejection counted, one log line), at 50% two (not
    panic: two of four is not more than half), at 100% all three (panic mode)."""
    ups = await upstreams(4)
    failing = ups[:3]
    for up in failing:
        up.status = 500
    run = await start_balancer(strict([u.url for u in ups], max_ejection_percent=percent))
    pool = run.balancer.router.pools["llama"]
    caplog.set_level(logging.WARNING, logger="balancer.health")
    held_back = 0
    for _ in range(2):
        for up in failing:
            if up.endpoint_id not in pool.out:
                capped = len(pool.out) >= ejected
                async with run.http.post(run.url + CHAT,
                                         json=body_for(run, up.endpoint_id)) as r:
                    assert r.status == 500
                    assert r.headers["x-balancer-endpoint"] == up.endpoint_id
                held_back += capped
    assert len(pool.out) == ejected
    assert pool.out <= {u.endpoint_id for u in failing}
    assert await run.metric("balancer_endpoint_ejections_total", cause="status") == ejected
    assert await run.metric("balancer_pool_ejections_skipped_total",
                            reason="max_ejection_percent", cause="status") == held_back
    assert held_back == 2 * (3 - ejected)
    lines = [r for r in caplog.records if "not ejecting" in r.getMessage()]
    assert len(lines) == (1 if held_back else 0)  # throttled: one per 10 s per pool
    assert pool.panic is (ejected == 3)
    healthy = ups[3]
    async with run.http.post(run.url + CHAT, json=body_for(run, healthy.endpoint_id)) as r:
        assert r.status == 200
    await run.wait_idle()


# -- only upstream faults count -----------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_a_4xx_the_request_caused_never_counts_against_the_model_server(
        upstreams, start_balancer, status):
    """A model server rejecting the client's body is healthy: its answer is relayed and
    nothing is counted against it. (A 429 pauses the endpoint instead: test_resilience.)"""
    (up,) = await upstreams(1)
    up.status = status
    run = await start_balancer(strict([up.url]))
    for i in range(3):
        async with run.http.post(run.url + CHAT, json=chat_body(f"bad {i}")) as r:
            assert r.status == status
    assert len(up.requests) == 3
    await assert_nothing_counted(run)


async def test_requests_balancer_rejects_never_reach_or_count_against_an_endpoint(
        upstreams, start_balancer):
    """Every kind of bad request (malformed JSON, wrong types, unknown model, too large,
    unparseable HTTP) is answered by balancer without leasing an endpoint."""
    (up,) = await upstreams(1)
    run = await start_balancer(strict([up.url],
                                      limits=LimitsSettings(max_body_bytes=4096)))
    for _, path, body, ctype, status, *_ in CASES:
        async with run.http.post(run.url + path, data=body,
                                 headers={"Content-Type": ctype}) as r:
            assert r.status == status
    async with run.http.post(run.url + CHAT, json=chat_body("x" * 8192)) as r:
        assert r.status == 413
    reader, writer = await asyncio.open_connection("127.0.0.1", run.running.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert 400 <= int(raw.split()[1]) < 500
    assert up.requests == []
    await assert_nothing_counted(run)


async def test_a_client_that_goes_away_never_counts_against_its_endpoint(
        upstreams, start_balancer):
    """A client that gives up while the model server prefills, and one that disconnects
    mid-stream: both are 499s and client disconnects, never a failure of the endpoint.
    (A client that stops reading: tests/integration/test_slow_client.py.)"""
    (up,) = await upstreams(1)
    run = await start_balancer(strict([up.url]))

    up.first_byte_delay = 1.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as impatient:
        with pytest.raises(TimeoutError):
            async with impatient.post(run.url + CHAT, json=chat_body("slow")) as r:
                await r.read()
    await run.wait_idle()
    up.first_byte_delay = 0.0

    up.gate = asyncio.Event()
    async with aiohttp.ClientSession() as leaving:
        response = await leaving.post(run.url + CHAT, json=chat_body("hi", stream=True))
        await asyncio.wait_for(response.content.readline(), 5)
        response.close()
    await run.wait_idle()
    up.gate.set()

    assert await run.metric("balancer_client_disconnects_total") == 2
    assert await run.metric("balancer_requests_total", code="499") == 2
    assert await run.metric("balancer_upstream_errors_total") == 0
    await assert_nothing_counted(run)


async def test_a_long_generation_cut_by_the_total_timeout_is_not_the_endpoints_failure(
        upstreams, start_balancer):
    """A stream still flowing when the request's total_timeout runs out is broken for the
    client (504, no clean end) but the model server was never idle: no upstream error, no
    ejection."""
    (up,) = await upstreams(1)
    up.chunks, up.chunk_delay = 20, 0.05
    run = await start_balancer(strict([up.url], limits=LimitsSettings(total_timeout=0.3)))
    async with run.http.post(run.url + CHAT, json=chat_body("long", stream=True)) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    await run.wait_idle()
    assert await run.metric("balancer_requests_total", code="504") == 1
    assert await run.metric("balancer_upstream_errors_total") == 0
    await assert_nothing_counted(run)
