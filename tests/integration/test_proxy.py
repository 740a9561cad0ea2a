"""The proxy end to end: real balancer, real upstream servers, real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import json

import aiohttp
import pytest

from balancer.config import LimitsSettings, RoutingSettings
from tests.conftest import MODEL, chat_body, make_settings


async def test_non_streaming_response_passes_through_with_route_headers(
        upstreams, start_balancer):
    """A plain completion comes back unchanged, tagged with the endpoint and route outcome."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.status == 200
        body = await r.json()
        assert r.headers["x-balancer-endpoint"] == up.endpoint_id
        assert r.headers["x-balancer-route"] == "primary"
        assert r.headers["x-upstream"] == "up0"
        assert "Keep-Alive" not in r.headers
    assert body["choices"][0]["message"]["content"] == "from up0"
    assert await run.metric("balancer_requests_total", code="200") == 1


async def test_route_headers_can_be_turned_off(upstreams, start_balancer):
    """With route_headers off, responses reveal nothing about the topology."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url], route_headers=False))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.status == 200
        assert "x-balancer-endpoint" not in r.headers
        assert "x-balancer-route" not in r.headers


async def test_request_headers_are_forwarded_and_hop_by_hop_ones_stripped(
        upstreams, start_balancer):
    """Authorization and custom headers pass; hop-by-hop ones do not; forwarding headers
    and a request id are added, and a given request id is kept."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    headers = {
        "Authorization": "Bearer sk-secret",
        "X-Custom": "1",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "gone",
        "Proxy-Authorization": "Basic x",
        "TE": "trailers",
        "X-Request-Id": "req-42",
        "X-Forwarded-For": "10.1.2.3",
    }
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi"),
                             headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "req-42"
    sent = {k.lower(): v for k, v in up.requests[-1]["headers"].items()}
    assert sent["authorization"] == "Bearer sk-secret"
    assert sent["x-custom"] == "1"
    assert "x-drop-me" not in sent
    assert "proxy-authorization" not in sent
    assert "te" not in sent
    assert sent["x-request-id"] == "req-42"
    assert sent["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"


async def test_request_id_is_generated_when_absent(upstreams, start_balancer):
    """Every request gets an id, sent upstream and returned to the client."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        request_id = r.headers["X-Request-Id"]
    assert len(request_id) >= 16
    sent = {k.lower(): v for k, v in up.requests[-1]["headers"].items()}
    assert sent["x-request-id"] == request_id


async def test_stream_chunks_reach_the_client_before_the_upstream_finishes(
        upstreams, start_balancer):
    """The first SSE event arrives while the upstream is still holding the stream open."""
    (up,) = await upstreams(1)
    up.gate = asyncio.Event()
    up.chunks = 4
    run = await start_balancer(make_settings([up.url]))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json=chat_body("hi", stream=True)) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readline(), 5)
        assert first.startswith(b"data: ")
        assert up.active == 1, "upstream must still be streaming"
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "tok0 "
        up.gate.set()
        rest = await asyncio.wait_for(r.content.read(), 5)
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert rest.count(b"data: ") == 4 + 1  # 3 more tokens, the final chunk, [DONE]


async def test_client_disconnect_cancels_upstream_and_frees_the_load(
        upstreams, start_balancer):
    """Closing the client connection mid-stream closes the upstream request at once and
    the endpoint's in-flight count returns to zero."""
    (up,) = await upstreams(1)
    up.gate = asyncio.Event()
    run = await start_balancer(make_settings([up.url]))
    client = aiohttp.ClientSession()
    try:
        response = await client.post(run.url + "/v1/chat/completions",
                                     json=chat_body("hi", stream=True))
        await asyncio.wait_for(response.content.readline(), 5)
        assert run.load() == {up.endpoint_id: 1}
        response.close()
    finally:
        await client.close()
    await run.wait_idle()
    async with asyncio.timeout(5):
        while up.cancelled == 0:
            await asyncio.sleep(0.01)
    assert up.completed == 0
    assert await run.metric("balancer_client_disconnects_total") == 1


async def test_unreachable_upstream_gives_502_with_openai_error(upstreams, start_balancer):
    """A refused connection before any byte is a 502 with an OpenAI-style error body."""
    (up,) = await upstreams(1)
    url = up.url
    assert up.server is not None
    await up.server.close()
    run = await start_balancer(make_settings([url]))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.status == 502
        body = await r.json()
    assert body["error"]["type"] == "upstream_error"
    assert "cannot connect" in body["error"]["message"]
    assert await run.metric("balancer_upstream_errors_total", reason="connect") == 1
    assert run.load() == {}


async def test_slow_first_byte_gives_504(upstreams, start_balancer):
    """An upstream that sends nothing within first_byte_timeout gives 504."""
    (up,) = await upstreams(1)
    up.first_byte_delay = 5
    limits = LimitsSettings(first_byte_timeout=0.3)
    run = await start_balancer(make_settings([up.url], limits=limits))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json=chat_body("hi", stream=True)) as r:
        assert r.status == 504
        body = await r.json()
    assert body["error"]["type"] == "upstream_timeout"
    await run.wait_idle()
    async with asyncio.timeout(5):
        while up.cancelled == 0:
            await asyncio.sleep(0.01)


async def test_stalled_stream_ends_with_an_error_event_not_a_clean_end(
        upstreams, start_balancer):
    """When chunks stop for longer than idle_timeout, the client gets an SSE error event
    and a broken transfer, never a clean end."""
    (up,) = await upstreams(1)
    up.gate = asyncio.Event()  # never set: the stream stalls after its first chunk
    limits = LimitsSettings(idle_timeout=0.3)
    run = await start_balancer(make_settings([up.url], limits=limits))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json=chat_body("hi", stream=True)) as r:
        assert r.status == 200
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(5):
                async for line in r.content:
                    received += line
    assert b'"error"' in received
    assert b"[DONE]" not in received
    await run.wait_idle()


async def test_upstream_dying_mid_stream_is_visible_to_the_client(upstreams, start_balancer):
    """An upstream that drops the connection mid-stream makes the client see an error."""
    (up,) = await upstreams(1)
    up.chunks = 5
    up.die_after = 2
    run = await start_balancer(make_settings([up.url]))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json=chat_body("hi", stream=True)) as r:
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in r.content:
                received += line
    assert received.count(b"tok") == 2
    assert b'"error"' in received
    assert await run.metric("balancer_upstream_errors_total", reason="mid_stream") == 1
    await run.wait_idle()


async def test_upstream_error_status_passes_through(upstreams, start_balancer):
    """An upstream's own error answer reaches the client unchanged."""
    (up,) = await upstreams(1)
    up.status = 500
    run = await start_balancer(make_settings([up.url]))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.status == 500
        assert (await r.json())["error"]["message"] == "upstream says no"
    assert await run.metric("balancer_requests_total", code="500") == 1


async def test_every_turn_of_a_conversation_reaches_one_endpoint(upstreams, start_balancer):
    """Turns that append replies keep the first user message, hence the endpoint; a
    conversation that opens with a greeting keeps one endpoint from its second turn on."""
    ups = await upstreams(4)
    run = await start_balancer(make_settings([u.url for u in ups]))
    seen_per_conversation = collections.defaultdict(list)
    for conversation in range(40):
        opening = (f"conversation {conversation}: please plan a week of meals for a family "
                   "of five on a budget" if conversation % 2 else "hello")
        messages = [{"role": "system", "content": "You are helpful."},
                    {"role": "user", "content": opening}]
        for turn in range(4):
            body = {"model": MODEL, "messages": messages}
            async with run.http.post(run.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                reply = (await r.json())["choices"][0]["message"]["content"]
                seen_per_conversation[conversation].append(r.headers["x-balancer-endpoint"])
            messages = [*messages, {"role": "assistant", "content": reply},
                        {"role": "user", "content": f"conversation {conversation}, turn {turn}"}]
    for conversation, seen in seen_per_conversation.items():
        assert len(set(seen if conversation % 2 else seen[1:])) == 1, (conversation, seen)
    used = set().union(*map(set, seen_per_conversation.values()))
    assert len(used) >= 3, "40 conversations should spread over the pool"
    greeted = {seen[1] for c, seen in seen_per_conversation.items() if not c % 2}
    assert len(greeted) >= 3, "greeting conversations part from their second turn"


async def test_session_header_overrides_the_prefix_key(upstreams, start_balancer):
    """Requests with one session id meet on one endpoint whatever their text."""
    ups = await upstreams(4)
    run = await start_balancer(make_settings([u.url for u in ups]))
    endpoints = set()
    for i in range(12):
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"different text {i}"),
                                 headers={"x-session-id": "s-1"}) as r:
            endpoints.add(r.headers["x-balancer-endpoint"])
            assert r.headers["x-balancer-route"] == "session"
    assert len(endpoints) == 1


async def test_hot_key_spreads_within_the_bound(upstreams, start_balancer):
    """Many concurrent requests for one prefix overflow along the ring, and no endpoint
    ever holds more than the CHWBL bound."""
    ups = await upstreams(4)
    gate = asyncio.Event()
    for u in ups:
        u.gate = gate
    routing = RoutingSettings(load_factor=1.25, min_bound=1)
    run = await start_balancer(make_settings([u.url for u in ups], routing=routing))
    client = aiohttp.ClientSession()
    responses = []
    try:
        for _ in range(16):
            r = await client.post(run.url + "/v1/chat/completions",
                                  json=chat_body("the same hot prompt", stream=True))
            await r.content.readline()
            responses.append(r)
            load = run.load()
            total = sum(load.values())
            bound = -(-5 * total // (4 * 4))  # ceil(1.25 * total / 4), bound after placing
            assert max(load.values()) <= max(1, bound)
        outcomes = collections.Counter(r.headers["x-balancer-route"] for r in responses)
        assert outcomes["primary"] >= 1
        assert outcomes["overflow"] >= 8
        final = run.load()
        assert len(final) == 4 and max(final.values()) <= 5  # ceil(1.25 * 16 / 4)
        gate.set()
        for r in responses:
            await r.read()
            r.close()
    finally:
        gate.set()
        await client.close()
    await run.wait_idle()


async def test_models_are_listed_from_the_pools(upstreams, start_balancer):
    """GET /v1/models answers with every configured model without asking upstream."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url], models=(MODEL, "my-lora")))
    async with run.http.get(run.url + "/v1/models") as r:
        body = await r.json()
    assert [m["id"] for m in body["data"]] == [MODEL, "my-lora"]
    assert up.requests == []


async def test_other_v1_paths_pass_through(upstreams, start_balancer):
    """Unkeyed /v1 paths that server.forward_paths lists go to an endpoint of the pool (by
    least-request); other /v1 paths get 404 without reaching one."""
    ups = await upstreams(2)
    run = await start_balancer(make_settings([u.url for u in ups]))
    async with run.http.get(run.url + "/v1/responses/resp_1?x=1") as r:
        assert r.status == 200
        assert (await r.json())["path"] == "/v1/responses/resp_1"
    async with run.http.post(run.url + "/v1/tokenize", json={"model": MODEL, "prompt": "a"}
                             ) as r:
        assert r.status == 200
    async with run.http.get(run.url + "/v1/some/thing?x=1") as r:
        assert r.status == 404
        assert "/v1/some/thing" in (await r.json())["error"]["message"]
    assert sum(len(u.requests) for u in ups) == 2


async def test_embeddings_are_routed(upstreams, start_balancer):
    """POST /v1/embeddings is keyed on its input and forwarded."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    async with run.http.post(run.url + "/v1/embeddings",
                             json={"model": MODEL, "input": ["a", "b"]}) as r:
        assert r.status == 200
        assert (await r.json())["data"][0]["embedding"] == [0.1, 0.2]


async def test_openai_client_streams_and_completes_through_the_proxy(
        upstreams, start_balancer):
    """The official openai client works through balancer, streaming and not."""
    openai = pytest.importorskip("openai")
    (up,) = await upstreams(1)
    up.chunks = 5
    run = await start_balancer(make_settings([up.url]))
    client = openai.AsyncOpenAI(base_url=run.url + "/v1", api_key="sk-test", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        assert text == "tok0 tok1 tok2 tok3 tok4 "
        assert usage is not None and usage.completion_tokens == 5
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}])
        assert completion.choices[0].message.content == "from up0"
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()


async def test_openai_client_sees_a_mid_stream_failure(upstreams, start_balancer):
    """A broken stream surfaces in the openai client as an error, not a short answer."""
    openai = pytest.importorskip("openai")
    (up,) = await upstreams(1)
    up.chunks = 5
    up.die_after = 2
    run = await start_balancer(make_settings([up.url]))
    client = openai.AsyncOpenAI(base_url=run.url + "/v1", api_key="sk-test", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    finally:
        await client.close()
