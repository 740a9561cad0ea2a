"""Bodies over ``limits.offload_parse_bytes`` are read in worker processes.

Beside a balancer that reads every body on its event loop, one that hands bodies over 1 KiB to
its workers routes each body to the same endpoint, forwards it byte for byte and answers a
malformed one with the same error; a worker that dies costs the bodies it held a 503 and the
next request is served; the pool bounds the bodies handed to it and stops its processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from balancer.config import KeyMode, LimitsSettings
from balancer.errors import BadRequestError, ParseUnavailableError
from balancer.forward import HEADER_ENDPOINT
from balancer.metrics import Metrics
from balancer.offload import QUEUED_PER_WORKER, ParsePool
from balancer.prefix import Kind
from balancer.summary import KeyRule, read_keyed
from tests.conftest import MODEL, make_settings

OFFLOAD = 1024
"""Bytes: every body here over it is read in a worker by the offloading balancer."""
JSON = {"Content-Type": "application/json"}


class RawUpstream:
    """A model-server double that records each body's SHA-256 and length, parses none of it
    and answers a small completion."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, int]] = []
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                     "/v1/rerank"):
            app.router.add_post(path, self.answer)
        return app

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def answer(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.received.append((request.path, hashlib.sha256(raw).hexdigest(), len(raw)))
        return web.json_response({
            "id": "cmpl-1", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
async def raw_upstreams() -> AsyncIterator[list[RawUpstream]]:
    ups = [RawUpstream() for _ in range(3)]
    for up in ups:
        up.server = TestServer(up.app(), host="127.0.0.1")
        await up.server.start_server()
    yield ups
    for up in ups:
        assert up.server is not None
        await up.server.close()


def limits(offload: int, workers: int = 2) -> LimitsSettings:
    return LimitsSettings(offload_parse_bytes=offload, parse_workers=workers)


async def pair(start_balancer: Any, ups: list[RawUpstream]) -> tuple[Any, Any]:
    """A balancer that reads every body on its loop and one that offloads bodies over 1 KiB,
    over the same endpoints (so the same ring)."""
    urls = [up.url for up in ups]
    return (await start_balancer(make_settings(urls, limits=limits(0))),
            await start_balancer(make_settings(urls, limits=limits(OFFLOAD))))


def chat(first: str, *, turns: int = 1, **extra: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief. " * 200}]
    for i in range(turns):
        messages.append({"role": "user", "content": first if i == 0 else f"more {i}"})
        messages.append({"role": "assistant", "content": f"answer {i} " * 50})
    return {"model": MODEL, "messages": messages[:-1], **extra}


BODIES: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("/v1/chat/completions", chat(f"Conversation {i}: " + "words " * 400, turns=1 + i % 3),
     {}) for i in range(5)
] + [
    ("/v1/chat/completions", chat("hi", turns=3, stream=False, user="u-7"), {}),
    ("/v1/chat/completions", chat("hello"), {"x-session-id": "s-42"}),
    ("/v1/completions", {"model": MODEL, "prompt": list(range(7, 3000)), "max_tokens": 1}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": [f"batch {i} " * 20 for i in range(40)]},
     {}),
    ("/v1/embeddings", {"model": MODEL, "input": [f"sentence {i}" for i in range(500)]}, {}),
]


async def post(run: Any, path: str, raw: bytes, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, Any], Any]:
    async with run.http.post(run.url + path, data=raw,
                             headers={**JSON, **(headers or {})}) as r:
        return r.status, dict(r.headers), await r.json()


async def test_a_body_read_in_a_worker_is_routed_and_forwarded_as_one_read_on_the_loop(
        raw_upstreams, start_balancer):
    """Each body goes to the same endpoint from both balancers (the same key), reaches it byte
    for byte, and only the offloading balancer's workers read it."""
    on_loop, offloading = await pair(start_balancer, raw_upstreams)
    by_id = {up.url.removeprefix("http://"): up for up in raw_upstreams}
    endpoints = set()
    for path, body, headers in BODIES:
        raw = json.dumps(body).encode()
        assert len(raw) > OFFLOAD
        chosen = []
        for run in (on_loop, offloading):
            status, got, _ = await post(run, path, raw, headers)
            assert status == 200
            up = by_id[got[HEADER_ENDPOINT]]
            assert up.received[-1] == (path, hashlib.sha256(raw).hexdigest(), len(raw))
            chosen.append(got[HEADER_ENDPOINT])
        assert chosen[0] == chosen[1], path
        endpoints.add(chosen[0])
    assert len(endpoints) > 1  # the bodies spread: the agreement is not by default
    assert await offloading.metric("balancer_offloaded_parses_total", outcome="ok") == len(BODIES)
    assert await on_loop.metric("balancer_offloaded_parses_total") == 0


async def test_a_small_body_with_a_big_ones_key_goes_where_the_big_one_went(
        raw_upstreams, start_balancer):
    """Read in a worker or on the loop, one conversation keys alike."""
    run = await start_balancer(make_settings([up.url for up in raw_upstreams],
                                             limits=limits(OFFLOAD)))
    for i in range(4):
        first = f"Question {i} about the mill by the river, and the fox that ran past it"
        big = json.dumps(chat(first, turns=4)).encode()
        small = json.dumps({"model": MODEL,
                            "messages": [{"role": "user", "content": first}]}).encode()
        assert len(big) > OFFLOAD >= len(small)
        big_status, big_headers, _ = await post(run, "/v1/chat/completions", big)
        small_status, small_headers, _ = await post(run, "/v1/chat/completions", small)
        assert big_status == small_status == 200
        assert big_headers[HEADER_ENDPOINT] == small_headers[HEADER_ENDPOINT]


async def test_a_large_body_sent_in_chunks_is_forwarded_whole(raw_upstreams, start_balancer):
    """A 3 MiB body of unknown length (chunked transfer encoding), gathered chunk by chunk and
    joined off the loop, reaches the model server byte for byte where its key routes it."""
    on_loop, offloading = await pair(start_balancer, raw_upstreams)
    raw = json.dumps({"model": MODEL, "prompt": list(range(500_000))}).encode()
    assert len(raw) > 3 << 20

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 100_000):
            yield raw[i:i + 100_000]

    chosen = []
    for run in (on_loop, offloading):
        async with run.http.post(run.url + "/v1/completions", data=pieces(),
                                 headers=JSON) as r:
            assert r.status == 200
            assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
            chosen.append(r.headers[HEADER_ENDPOINT])
    assert chosen[0] == chosen[1]
    up = next(up for up in raw_upstreams if up.url.endswith(chosen[0].split(":")[1]))
    assert up.received == [("/v1/completions", hashlib.sha256(raw).hexdigest(), len(raw))] * 2


def padded(head: bytes, tail: bytes = b"}") -> bytes:
    """``head`` + a ~4 KiB string member + ``tail``: a body over the offload threshold that is
    wrong only where ``head`` or ``tail`` say."""
    return head + b', "pad": "' + b"x" * 4000 + b'"' + tail


VALID_CHAT = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]' % MODEL.encode()
MALFORMED = [
    ("cut short", padded(VALID_CHAT, b"")),
    ("invalid JSON at the end", padded(VALID_CHAT, b"}}")),
    ("invalid UTF-8 deep inside", VALID_CHAT + b', "pad": "' + b"x" * 4000 + b'\xff"}'),
    ("a number too long", padded(VALID_CHAT + b', "n": 1' + b"7" * 5000)),
    ("nested too deeply", VALID_CHAT + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("an array", b"[" + b'"x", ' * 1000 + b'"x"]'),
    ("model not a string", padded(b'{"model": 7, "messages": [{"role": "user", "content": "x"}]')),
    ("no messages", padded(b'{"model": "%s"' % MODEL.encode())),
    ("a message without role", padded(b'{"model": "%s", "messages": [{"content": "x"}]'
                                      % MODEL.encode())),
    ("content of a wrong type", padded(b'{"model": "%s", "messages": [{"role": "user", '
                                       b'"content": 5}]' % MODEL.encode())),
    ("stream not a boolean", padded(VALID_CHAT + b', "stream": "yes"')),
    ("unknown model", padded(b'{"model": "gpt-9", "messages": [{"role": "user", '
                             b'"content": "x"}]')),
    ("a malformed message past validation", json.dumps({
        "model": MODEL, "messages": [{"role": "system", "content": "s"}] * 1024
        + [5, {"role": "user", "content": "late"}]}).encode()),
]


async def test_a_malformed_big_body_gets_the_error_a_body_read_on_the_loop_gets(
        raw_upstreams, start_balancer):
    """Same status, message, type and param, and the same rejection reason, for each way a
    body can be wrong; nothing is forwarded."""
    on_loop, offloading = await pair(start_balancer, raw_upstreams)
    for name, raw in MALFORMED:
        assert len(raw) > OFFLOAD, name
        answers = [await post(run, "/v1/chat/completions", raw) for run in (on_loop, offloading)]
        (status, _, error), (offloaded_status, _, offloaded_error) = answers
        assert status in (400, 404), name
        assert (offloaded_status, offloaded_error) == (status, error), name
    for reason in ("invalid_json", "bad_request", "model_not_found"):
        assert (await offloading.metric("balancer_rejected_requests_total", reason=reason)
                == await on_loop.metric("balancer_rejected_requests_total", reason=reason) > 0)
    # The last two were read whole in a worker: routing refuses them after (404, and a key
    # that cannot be made of a message validation did not inspect).
    assert (await offloading.metric("balancer_offloaded_parses_total", outcome="bad_request")
            == len(MALFORMED) - 2)
    assert all(up.received == [] for up in raw_upstreams)


async def test_a_pass_through_request_names_its_model_from_a_big_body(
        raw_upstreams, start_balancer):
    """The model is read in a worker: a known one is forwarded byte for byte, an unknown one
    is a 404 naming it."""
    run = await start_balancer(make_settings([up.url for up in raw_upstreams],
                                             limits=limits(OFFLOAD)))
    documents = [f"document {i} " * 10 for i in range(50)]
    raw = json.dumps({"model": MODEL, "query": "mill", "documents": documents}).encode()
    status, _, _ = await post(run, "/v1/rerank", raw)
    assert status == 200
    sent = [r for up in raw_upstreams for r in up.received]
    assert sent == [("/v1/rerank", hashlib.sha256(raw).hexdigest(), len(raw))]
    unknown = json.dumps({"model": "gpt-9", "query": "mill", "documents": documents}).encode()
    status, _, error = await post(run, "/v1/rerank", unknown)
    assert status == 404
    assert "gpt-9" in error["error"]["message"]
    assert await run.metric("balancer_offloaded_parses_total", outcome="ok") == 2


async def started(pool: ParsePool) -> None:
    async with asyncio.timeout(30):
        await pool.ready()
    assert pool.pids


async def test_a_worker_killed_mid_flight_costs_a_503_and_the_next_request_is_served(
        raw_upstreams, start_balancer):
    """The body held by the dead worker's pool is answered 503 (service_unavailable,
    Retry-After, counted); new workers start and the next big body is routed."""
    run = await start_balancer(make_settings([up.url for up in raw_upstreams],
                                             limits=limits(OFFLOAD, workers=1)))
    pool = run.balancer.proxy.parsers
    await started(pool)
    (pid,) = pool.pids
    # The only worker is busy, so the body waits in its pool when the worker is killed.
    busy = asyncio.create_task(pool.run(time.sleep, 30))
    raw = json.dumps(chat("Conversation about the mill " * 20)).encode()
    request = asyncio.create_task(post(run, "/v1/chat/completions", raw))
    async with asyncio.timeout(10):
        while pool.held < 2:
            await asyncio.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    status, headers, error = await asyncio.wait_for(request, 10)
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert error["error"]["type"] == "service_unavailable"
    assert "worker process" in error["error"]["message"]
    with pytest.raises(ParseUnavailableError):
        await busy
    assert await run.metric("balancer_rejected_requests_total", reason="parse_worker_failed") == 1
    assert await run.metric("balancer_offloaded_parses_total", outcome="failed") >= 1
    status, _, _ = await post(run, "/v1/chat/completions", raw)
    assert status == 200
    assert pool.pids and pid not in pool.pids
    assert sum(len(up.received) for up in raw_upstreams) == 1


@pytest.fixture
async def pool() -> AsyncIterator[ParsePool]:
    """A pool of one worker, on its own (no balancer)."""
    parsers = ParsePool(limits(1, workers=1), Metrics(CollectorRegistry()))
    yield parsers
    await parsers.close()


async def test_the_pool_reads_what_the_loop_reads(pool):
    """A summary, and a 400 with its class, message and param, come back as the loop's own
    call gives them."""
    rule = KeyRule(KeyMode.FIRST_USER_MESSAGE, 100, 8)
    raw = json.dumps(chat("a question", turns=2)).encode()
    assert await pool.run(read_keyed, Kind.CHAT, raw, None, rule, True) == read_keyed(
        Kind.CHAT, raw, None, rule, True)
    bad = b'{"model": "m", "prompt": {}}'
    with pytest.raises(BadRequestError) as caught:
        await pool.run(read_keyed, Kind.COMPLETIONS, bad, None, rule, False)
    assert (caught.value.message, caught.value.param) == (
        "'prompt' must be a string, an array of strings, an array of token ids or an array "
        "of token-id arrays", "prompt")


async def test_the_pool_holds_a_bounded_number_of_bodies_however_many_wait(pool):
    """Six bodies at once: at most QUEUED_PER_WORKER are handed to the one worker, the rest
    wait (no error); a cancelled waiter frees nothing it did not hold; all slots come back."""
    await started(pool)
    jobs = [asyncio.create_task(pool.run(time.sleep, 0.05)) for _ in range(6)]
    most = 0
    async with asyncio.timeout(20):
        await asyncio.sleep(0.01)
        jobs[-1].cancel()
        while not all(job.done() for job in jobs):
            most = max(most, pool.held)
            await asyncio.sleep(0.002)
    assert 1 <= most <= QUEUED_PER_WORKER
    assert [job.result() for job in jobs[:-1]] == [None] * 5
    assert jobs[-1].cancelled()
    async with asyncio.timeout(5):
        while pool.held:
            await asyncio.sleep(0.01)
    assert pool.pending == 0
    # Every slot came back: as many bodies as before are handed over at once again.
    again = [asyncio.create_task(pool.run(time.sleep, 0.05)) for _ in range(QUEUED_PER_WORKER)]
    await asyncio.sleep(0.01)
    assert pool.held == QUEUED_PER_WORKER
    await asyncio.gather(*again)


async def test_closing_the_pool_stops_its_processes(pool):
    """No worker outlives the pool."""
    await started(pool)
    pids = pool.pids
    await pool.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
