"""A simulated pod restart (``POST /sim/restart``) over real sockets on 127.0.0.1, and its
pure parts."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from loadtest.simserver import DEFAULT_MODEL, EngineConfig, FaultConfig, SimConfig, run_pods
from loadtest.simserver.engine import Engine, EngineError
from loadtest.simserver.faults import Fate, FaultInjector
from loadtest.simserver.restart import DEFAULT_DOWN_S, MAX_DOWN_S, RestartError, parse_down

# Full speed, so a 1,000-token reply lasts ~5.6 s: only the restart ends it within the test.
# One running sequence at a time, so a second request queues.
POD = SimConfig(name="pod-r", time_scale=1.0, engine=EngineConfig(max_num_seqs=1))
WARM = "The same long system prompt, many times over. " * 40


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def _cached_tokens(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url + "/v1/chat/completions", json=_chat(WARM, max_tokens=1)) as r:
        assert r.status == 200, await r.text()
        cached: int = (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"]
        return cached


async def _stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/stats") as r:
        stats: dict[str, Any] = await r.json()
        return stats


async def _drain_stream(response: aiohttp.ClientResponse) -> list[bytes]:
    """Read a stream to its end; the lines read before it ended (or broke)."""
    lines = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for line in response.content:
            lines.append(line)
    return lines


async def test_a_restart_kills_requests_empties_the_cache_and_refuses_service_while_down(
) -> None:
    """In-flight requests (one streaming, one queued behind it) lose their connections at once,
    the pod answers 503 while down and then serves again with an empty cache; /stats counts
    the restart and the killed requests."""
    async with run_pods([POD]) as (pod,), aiohttp.ClientSession() as session:
        url = pod.url
        assert await _cached_tokens(session, url) == 0
        assert await _cached_tokens(session, url) > 0  # warm

        streaming = await session.post(
            url + "/v1/chat/completions", json=_chat("a long one", max_tokens=1000, stream=True))
        assert streaming.status == 200
        await streaming.content.readline()  # it runs
        queued = asyncio.create_task(session.post(
            url + "/v1/chat/completions", json=_chat("queued", max_tokens=5)))
        deadline = time.monotonic() + 3.0
        while (await _stats(session, url))["requests_waiting"] != 1:
            assert time.monotonic() < deadline, "the second request never queued"
            await asyncio.sleep(0.01)

        started = time.monotonic()
        async with session.post(url + "/sim/restart", json={"down": 0.6}) as r:
            assert r.status == 200
            answer = await r.json()
        assert answer["pod"] == "pod-r" and answer["requests_killed"] == 2
        assert answer["down_s"] == 0.6 and answer["serving_in_s"] == 0.6
        assert answer["restarts"] == 1

        lines = await _drain_stream(streaming)
        assert b"data: [DONE]\n" not in lines
        with pytest.raises(aiohttp.ClientError):  # disconnected before any answer
            await queued
        # Both failed at once, not after their replies' 5.6 s.
        assert time.monotonic() - started < 2.0

        async with session.get(url + "/health") as r:
            assert r.status == 503
        async with session.post(url + "/v1/chat/completions", json=_chat("hi")) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["type"] == "service_unavailable"
        stats = await _stats(session, url)
        assert stats["starting"] is True
        assert stats["requests_running"] == stats["requests_waiting"] == 0
        assert stats["kv_blocks_used"] == stats["kv_blocks_cached"] == 0

        deadline = time.monotonic() + 5.0
        while True:
            async with session.get(url + "/health") as r:
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, "the pod never came back"
            await asyncio.sleep(0.02)
        # Down for its 0.6 s, give or take a slow poll (generous upper bound for a busy host).
        assert 0.5 <= time.monotonic() - started < 3.0
        assert await _cached_tokens(session, url) == 0  # the cache was emptied
        assert await _cached_tokens(session, url) > 0  # and fills again

        stats = await _stats(session, url)
        assert stats["restarts"] == 1
        assert stats["requests_killed"] == 2
        assert stats["slow_start_rejections"] == 1
        assert stats["requests_running"] == 0 and stats["kv_blocks_used"] == 0


async def test_down_comes_from_the_query_and_the_pods_slow_start_follows_it() -> None:
    """``?down=0`` on a pod with a 0.3-s slow start: it refuses service for the slow start
    only; an idle pod's restart kills nothing."""
    config = replace(POD, faults=FaultConfig(slow_start=0.3))
    async with run_pods([config]) as (pod,), aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 3.0
        while pod.pod.faults.starting(pod.pod.clock()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        async with session.post(pod.url + "/sim/restart?down=0") as r:
            answer = await r.json()
        assert answer["requests_killed"] == 0 and answer["serving_in_s"] == 0.3
        async with session.get(pod.url + "/health") as r:
            assert r.status == 503


@pytest.mark.parametrize(
    ("json_body", "query"),
    [
        ({"down": -1}, ""),
        ({"down": "soon"}, ""),
        ({"down": True}, ""),
        ({"down": MAX_DOWN_S + 1}, ""),
        (None, "?down=abc"),
        (None, "?down=nan"),
    ],
)
async def test_a_bad_down_is_a_400_and_the_pod_keeps_serving(
    json_body: dict[str, Any] | None, query: str
) -> None:
    """A restart request with a bad ``down`` is refused with an OpenAI-shaped error and
    restarts nothing."""
    async with (
        run_pods([replace(POD, time_scale=0.01)]) as (pod,),
        aiohttp.ClientSession() as session,
    ):
        async with session.post(pod.url + "/sim/restart" + query, json=json_body) as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["param"] == "down" and "down" in error["message"]
        async with session.get(pod.url + "/health") as r:
            assert r.status == 200
        assert (await _stats(session, pod.url))["restarts"] == 0


# -- pure parts --------------------------------------------------------------------------------


def test_parse_down_prefers_the_body_then_the_query_then_the_default() -> None:
    """The body's ``down`` wins over the query's; neither gives the default."""
    assert parse_down({"down": 2}, {"down": "3"}) == 2.0
    assert parse_down({}, {"down": "3.5"}) == 3.5
    assert parse_down({}, {}) == DEFAULT_DOWN_S
    assert parse_down({"down": 0}, {}) == 0.0
    with pytest.raises(RestartError):
        parse_down({"down": float("inf")}, {})


def test_the_injector_is_starting_through_the_down_window_and_its_slow_start() -> None:
    """A restart at 10 s down for 2 s with a 1-s slow start refuses requests until 13 s."""
    injector = FaultInjector(FaultConfig(slow_start=1.0), now=0.0)
    assert not injector.starting(5.0)
    assert injector.restart(10.0, 2.0) == 3.0
    assert injector.decide(10.0) is Fate.STARTING
    assert injector.starting(12.9) and not injector.starting(13.0)
    assert injector.decide(13.0) is Fate.SERVE


def test_an_engine_empties_its_cache_only_without_work() -> None:
    """Clearing the cache of an engine that still holds sequences is refused; once they are
    aborted the cache is empty and a repeated prompt is no longer a hit."""
    engine = Engine(EngineConfig(kv_cache_blocks=64))
    engine.add_request(WARM, 4)
    engine.run_until_idle()
    assert engine.cache.cached_blocks > 0
    seq = engine.add_request(WARM, 4)
    with pytest.raises(EngineError):
        engine.clear_cache()
    engine.abort(seq)
    engine.clear_cache()
    assert engine.cache.cached_blocks == 0
    again = engine.add_request(WARM, 4)
    engine.run_until_idle()
    assert again.cached_tokens == 0
