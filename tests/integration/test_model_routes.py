"""Routes through a real balancer: a weighted split that keeps conversations on one side,
aliases renamed both ways, and fallbacks down the chain before the first byte only.

The pools are upstream doubles on 127.0.0.1 (``tests.conftest.Upstream``), each answering
with the ``model`` it was asked for, as vLLM does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from balancer.config import (
    BackendSettings,
    LimitsSettings,
    PoolSettings,
    RetrySettings,
    RouteSettings,
    Settings,
    validate,
)
from tests.conftest import RunningBalancer, Upstream

Start = Callable[..., Awaitable[RunningBalancer]]
Ups = Callable[[int], Awaitable[list[Upstream]]]


def settings(pools: dict[str, tuple[str, list[Upstream]]], *routes: RouteSettings,
             **sections: Any) -> Settings:
    """Pools by name, each with its one model and upstreams; then the routes."""
    return validate(Settings(
        pools=tuple(PoolSettings(name, (model,), tuple(u.url for u in ups))
                    for name, (model, ups) in pools.items()),
        routes=routes, **sections))


def chat(text: str, *, stream: bool = False, model: str = "chat") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}],
            "stream": stream}


async def post(run: RunningBalancer, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with run.http.post(run.url + "/v1/chat/completions", json=body) as response:
        return response.status, dict(response.headers), await response.read()


def served_models(*groups: list[Upstream]) -> Counter[str]:
    return Counter(r["body"]["model"] for ups in groups for u in ups for r in u.requests)


async def test_a_weighted_split_keeps_each_conversation_on_one_side(start_balancer: Start,
                                                                    upstreams: Ups):
    v2, v3 = await upstreams(2), await upstreams(1)
    run = await start_balancer(settings(
        {"v2": ("llama-v2", v2), "v3": ("llama-v3", v3)},
        RouteSettings("chat", (BackendSettings("v2", 80), BackendSettings("v3", 20)))))
    conversations = [f"conversation {i}: tell me about topic {i * 7919}" for i in range(200)]

    pool_of = {u.name: "v2" for u in v2} | {u.name: "v3" for u in v3}

    async def turn(text: str) -> str:
        status, headers, body = await post(run, chat(text))
        assert status == 200, body
        assert json.loads(body)["model"] == "chat"  # the name the client asked for
        return pool_of[headers["x-upstream"]]

    first = await asyncio.gather(*(turn(t) for t in conversations))
    second = await asyncio.gather(*(turn(t) for t in conversations))
    assert first == second  # every turn of a conversation on the same side
    on_v3 = first.count("v3")
    assert 20 <= on_v3 <= 60, on_v3  # ~20% of 200
    # Each pool was asked for the model it serves.
    assert set(served_models(v2)) == {"llama-v2"} and set(served_models(v3)) == {"llama-v3"}
    assert await run.metric("balancer_route_requests_total", route="chat", pool="v3") == 2 * on_v3

    async with run.http.get(run.url + "/v1/models") as response:
        listed = [m["id"] for m in (await response.json())["data"]]
    assert listed[0] == "chat" and {"llama-v2", "llama-v3"} <= set(listed)


async def test_streams_are_renamed_back_unless_the_route_exposes_the_backend(
        start_balancer: Start, upstreams: Ups):
    pool = await upstreams(1)
    pool[0].chunks = 20
    run = await start_balancer(settings(
        {"p": ("meta-llama/Llama-3.1-8B-Instruct", pool)},
        RouteSettings("chat", (BackendSettings("p"),)),
        RouteSettings("raw", (BackendSettings("p"),), expose_backend_model=True)))
    status, _, body = await post(run, chat("hello there, stream please", stream=True))
    assert status == 200
    events = [json.loads(line[6:]) for line in body.decode().splitlines()
              if line.startswith("data: {")]
    assert len(events) == 21 and {e["model"] for e in events} == {"chat"}
    status, _, body = await post(run, chat("hello there", model="raw"))
    assert json.loads(body)["model"] == "meta-llama/Llama-3.1-8B-Instruct"


async def test_a_failing_pool_falls_back_before_the_first_byte(start_balancer: Start,
                                                               upstreams: Ups, caplog):
    big, small = await upstreams(2), await upstreams(1)
    for up in big:
        up.status = 503
    run = await start_balancer(settings(
        {"big": ("llama-70b", big), "small": ("llama-8b", small)},
        RouteSettings("chat", (BackendSettings("big"),), (BackendSettings("small"),))))
    with caplog.at_level(logging.INFO, logger="balancer.access"):
        status, headers, body = await post(run, chat("please answer"))
    assert status == 200, body
    (line,) = [r.access for r in caplog.records  # type: ignore[attr-defined]
               if r.name == "balancer.access" and r.access["status"] == 200]
    assert (line["pool"], line["route"], line["fallback_reason"]) == (
        "small", "fallback:small", "failed")
    assert headers["x-balancer-route"] == "fallback:small"
    assert json.loads(body)["model"] == "chat"
    assert served_models(small) == Counter({"llama-8b": 1})
    assert await run.metric("balancer_route_fallbacks_total", route="chat", from_pool="big",
                            to_pool="small", reason="failed") == 1


async def test_an_empty_or_refusing_pool_is_skipped(start_balancer: Start, upstreams: Ups):
    small = await upstreams(1)
    dead = await upstreams(1)
    url = dead[0].url
    assert dead[0].server is not None
    await dead[0].server.close()  # connection refused from now on
    run = await start_balancer(validate(Settings(
        pools=(PoolSettings("big", ("llama-70b",), (url,)),
               PoolSettings("small", ("llama-8b",), (small[0].url,))),
        routes=(
        RouteSettings("chat", (BackendSettings("big"),), (BackendSettings("small"),)),))))
    status, headers, _ = await post(run, chat("anyone there?"))
    assert status == 200 and headers["x-balancer-route"] == "fallback:small"
    # A pool with no routable endpoint at all is passed over when the request is decided.
    run.balancer.router.pools["big"].set_endpoints(())
    status, headers, _ = await post(run, chat("anyone there? again"))
    assert status == 200 and headers["x-balancer-route"] == "fallback:small"
    assert await run.metric("balancer_route_fallbacks_total", route="chat",
                            reason="no_endpoints") == 1


async def test_no_fallback_after_the_first_byte(start_balancer: Start, upstreams: Ups):
    big, small = await upstreams(1), await upstreams(1)
    big[0].chunks, big[0].die_after = 5, 2
    run = await start_balancer(settings(
        {"big": ("llama-70b", big), "small": ("llama-8b", small)},
        RouteSettings("chat", (BackendSettings("big"),), (BackendSettings("small"),))))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json=chat("stream and break", stream=True)) as response:
        assert response.status == 200
        data = b""
        with pytest.raises(aiohttp.ClientPayloadError):  # the stream is broken, not resent
            async for piece in response.content.iter_any():
                data += piece
    assert b"tok0" in data and small[0].requests == []


async def test_the_per_request_cap_and_a_full_pool(start_balancer: Start, upstreams: Ups):
    big, small = await upstreams(1), await upstreams(1)
    big[0].status = 503
    capped = settings({"big": ("llama-70b", big), "small": ("llama-8b", small)},
                      RouteSettings("chat", (BackendSettings("big"),), (BackendSettings("small"),)))
    capped = replace(capped, retries=RetrySettings(max_fallbacks=0))
    run = await start_balancer(capped)
    status, _, _ = await post(run, chat("no second chance"))
    assert status == 503 and small[0].requests == []

    # A pool whose endpoints are all at their limit, with no room to wait: the next pool.
    gate = asyncio.Event()
    big[0].status, big[0].gate, big[0].chunks = 200, gate, 3
    full = replace(capped, retries=RetrySettings(),
                   limits=LimitsSettings(max_in_flight_per_endpoint=1, queue_size=0))
    run = await start_balancer(full)
    holding = asyncio.create_task(post(run, chat("hold the only slot", stream=True)))
    async with asyncio.timeout(10):
        while not big[0].active:
            await asyncio.sleep(0.01)
    status, headers, _ = await post(run, chat("hold the only slot", stream=True))
    assert status == 200 and headers["x-balancer-route"] == "fallback:small"
    gate.set()
    assert (await holding)[0] == 200
    assert await run.metric("balancer_route_fallbacks_total", reason="overloaded") == 1


def test_routes_are_checked_at_start():
    from balancer.config import ConfigError, from_mapping

    base = {"pools": [{"name": "a", "models": ["m-a"], "endpoints": ["http://127.0.0.1:1"]},
                      {"name": "b", "models": ["m-b"], "endpoints": ["http://127.0.0.1:2"]}]}

    def check(routes: Any) -> Settings:
        return validate(from_mapping({**base, "routes": routes}))

    ok = check([{"model": "chat", "backends": [{"pool": "a", "weight": 90}, "b"],
                 "fallbacks": []}])
    assert ok.routes[0].backends[1] == BackendSettings("b", 1.0, "")
    for routes, message in (
        ([{"model": "chat", "backends": ["nope"]}], "routes[0].backends[0].pool: no pool"),
        ([{"model": "chat", "backends": []}], "at least one backend"),
        ([{"model": "chat", "backends": [{"pool": "a", "weight": 0}]}], "weight > 0"),
        ([{"model": "chat", "backends": ["a"], "fallbacks": ["a"]}], "appears twice"),
        ([{"model": "chat", "backends": [{"pool": "a", "weight": -1}]}], "must be a number"),
        ([{"model": "chat", "backends": ["a"]}, {"model": "chat", "backends": ["b"]}],
         "already a route"),
        ([{"backends": ["a"]}], "routes[0].model: required"),
        ([{"model": "chat", "backends": ["a"], "wieght": 1}], "routes[0].wieght: unknown"),
        ([{"model": "chat", "fallbacks": [{"pool": "a", "weight": 2}], "backends": ["b"]}],
         "fallbacks[0].weight: unknown"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            check(routes)
