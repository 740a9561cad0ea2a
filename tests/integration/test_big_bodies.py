"""Bodies at the size limit go through whole: a million token ids are routed by their first
ones and forwarded byte for byte, and a 1 MiB answer's usage is counted from its tail."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer.forward import HEADER_ENDPOINT
from tests.conftest import MODEL, make_settings

IDS = 1_000_000


class BigUpstream:
    """A model-server double that takes 16 MiB bodies and answers embeddings with a ~1 MiB
    list (usage last, as vLLM and OpenAI put it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[dict[str, Any]] = []
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def completions(self, request: web.Request) -> web.Response:
        raw = await request.read()
        prompt = json.loads(raw)["prompt"]
        self.received.append({"sha256": hashlib.sha256(raw).hexdigest(), "ids": len(prompt),
                              "last": prompt[-1]})
        return web.json_response({
            "id": "cmpl-1", "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1,
                      "total_tokens": len(prompt) + 1}})

    async def embeddings(self, request: web.Request) -> web.Response:
        await request.read()
        data = [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 64}
                for i in range(1000)]
        return web.json_response({
            "object": "list", "data": data, "model": MODEL,
            "usage": {"prompt_tokens": 4321, "total_tokens": 4321,
                      "prompt_tokens_details": {"cached_tokens": 1234}}})


@pytest.fixture
async def big_upstreams() -> AsyncIterator[list[BigUpstream]]:
    ups = [BigUpstream(f"big{i}") for i in range(3)]
    for up in ups:
        up.server = TestServer(up.app(), host="127.0.0.1")
        await up.server.start_server()
    yield ups
    for up in ups:
        assert up.server is not None
        await up.server.close()


async def test_a_million_token_ids_are_routed_by_their_first_ids_and_forwarded_whole(
        big_upstreams, start_balancer):
    """Each 1M-id prompt lands where its first prefix_chars ids alone would, and reaches the
    model server byte for byte."""
    run = await start_balancer(make_settings([up.url for up in big_upstreams]))
    by_name = {up.url.removeprefix("http://"): up for up in big_upstreams}
    for seed in range(4):
        head = [(seed * 7919 + i) % 50_000 for i in range(1000)]
        ids = head + [(seed + i) % 128_000 for i in range(IDS - len(head))]
        raw = json.dumps({"model": MODEL, "prompt": ids, "max_tokens": 1}).encode()
        assert len(raw) < 10 << 20
        async with run.http.post(run.url + "/v1/completions", data=raw,
                                 headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["prompt_tokens"] == IDS
            endpoint = r.headers[HEADER_ENDPOINT]
        got = by_name[endpoint].received[-1]
        assert got == {"sha256": hashlib.sha256(raw).hexdigest(), "ids": IDS, "last": ids[-1]}
        async with run.http.post(run.url + "/v1/completions",
                                 json={"model": MODEL, "prompt": head}) as r:
            assert r.status == 200
            assert r.headers[HEADER_ENDPOINT] == endpoint
    await run.wait_idle()
    assert await run.metric("balancer_prompt_tokens_total") == 4 * (IDS + 1000)


async def test_the_usage_of_a_one_mebibyte_answer_is_counted(big_upstreams, start_balancer):
    """A non-streaming answer near 1 MiB is relayed whole and its usage (last) counted."""
    run = await start_balancer(make_settings([big_upstreams[0].url]))
    async with run.http.post(run.url + "/v1/embeddings",
                             json={"model": MODEL, "input": list(range(5000))}) as r:
        assert r.status == 200
        body = await r.read()
    assert 512 << 10 < len(body) <= 1 << 20
    assert json.loads(body)["usage"]["prompt_tokens"] == 4321
    await run.wait_idle()
    assert await run.metric("balancer_prompt_tokens_total") == 4321
    assert await run.metric("balancer_cached_prompt_tokens_total") == 1234


@pytest.mark.parametrize(("raw", "fragment"), [
    (b'{"model": "%s", "prompt": [1%s]}' % (MODEL.encode(), b"7" * 5000), "digits"),
    (b'{"model": "%s", "prompt": %s%s}' % (MODEL.encode(), b"[" * 400_000, b"]" * 400_000),
     "nested too deeply"),
])
async def test_unreadable_json_at_any_size_is_a_400(big_upstreams, start_balancer, raw,
                                                    fragment):
    """A number longer than Python converts and nesting deeper than it recurses are
    invalid JSON (400), not a server error, and the process keeps serving."""
    run = await start_balancer(make_settings([big_upstreams[0].url]))
    async with run.http.post(run.url + "/v1/completions", data=raw,
                             headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert fragment in error["message"]
    assert await run.metric("balancer_rejected_requests_total", reason="invalid_json") == 1
    assert big_upstreams[0].received == []
    async with run.http.post(run.url + "/v1/completions",
                             json={"model": MODEL, "prompt": [1, 2, 3]}) as r:
        assert r.status == 200
