"""Bad input gets a precise 4xx with an OpenAI-style body, a metric, and leaves no load."""

from __future__ import annotations

import asyncio
import json

import pytest

from balancer.config import LimitsSettings
from tests.conftest import MODEL, make_settings

CHAT = "/v1/chat/completions"

CASES = [
    # (name, path, raw body, content type, status, reason, message fragment, param)
    ("malformed JSON", CHAT, b'{"model": ', "application/json", 400, "invalid_json",
     "not valid JSON", None),
    ("empty body", CHAT, b"", "application/json", 400, "invalid_json", "empty", None),
    ("JSON array", CHAT, b"[1, 2]", "application/json", 400, "bad_request",
     "must be a JSON object", None),
    ("invalid UTF-8", CHAT, b'{"model": "\xff\xfe"}', "application/json", 400,
     "invalid_json", "UTF-8", None),
    ("wrong content type", CHAT, b"model=x", "application/x-www-form-urlencoded", 415,
     "unsupported_media_type", "application/json", None),
    ("missing model", CHAT, json.dumps({"messages": [{"role": "user", "content": "x"}]}),
     "application/json", 400, "bad_request", "'model'", "model"),
    ("model not a string", CHAT, json.dumps({"model": 7, "messages": []}),
     "application/json", 400, "bad_request", "'model'", "model"),
    ("missing messages", CHAT, json.dumps({"model": MODEL}), "application/json", 400,
     "bad_request", "'messages'", "messages"),
    ("messages not a list", CHAT, json.dumps({"model": MODEL, "messages": "hi"}),
     "application/json", 400, "bad_request", "'messages'", "messages"),
    ("message without role", CHAT, json.dumps({"model": MODEL, "messages": [{"content": "x"}]}),
     "application/json", 400, "bad_request", "role", "messages[0].role"),
    ("content of a wrong type", CHAT,
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
     "application/json", 400, "bad_request", "content", "messages[0].content"),
    ("stream not a boolean", CHAT,
     json.dumps({"model": MODEL, "stream": "yes",
                 "messages": [{"role": "user", "content": "x"}]}),
     "application/json", 400, "bad_request", "'stream'", "stream"),
    ("prompt of a wrong type", "/v1/completions", json.dumps({"model": MODEL, "prompt": {}}),
     "application/json", 400, "bad_request", "'prompt'", "prompt"),
    ("unknown model", CHAT,
     json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
     "application/json", 404, "model_not_found", MODEL, "model"),
]


@pytest.mark.parametrize(
    ("name", "path", "body", "ctype", "status", "reason", "fragment", "param"),
    CASES, ids=[c[0] for c in CASES],
)
async def test_bad_request_is_answered_precisely(
        upstreams, start_balancer, name, path, body, ctype, status, reason, fragment, param):
    """Each kind of bad request gets its status, an OpenAI error body naming the problem,
    a rejection metric, and nothing reaches the upstream."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    data = body.encode() if isinstance(body, str) else body
    async with run.http.post(run.url + path, data=data,
                             headers={"Content-Type": ctype}) as r:
        assert r.status == status
        payload = await r.json()
    error = payload["error"]
    assert fragment in error["message"]
    assert error["code"] == status
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert await run.metric("balancer_rejected_requests_total", reason=reason) == 1
    assert up.requests == []
    assert run.load() == {}
    # The process keeps serving.
    async with run.http.post(run.url + CHAT, json={
            "model": MODEL, "messages": [{"role": "user", "content": "ok"}]}) as r:
        assert r.status == 200


async def test_body_over_the_limit_is_413(upstreams, start_balancer):
    """A declared body over max_body_bytes is refused with 413 before it is read."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url],
                                             limits=LimitsSettings(max_body_bytes=2048)))
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 4000}]})
    async with run.http.post(run.url + CHAT, data=big,
                             headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        assert "limit of 2048 bytes" in (await r.json())["error"]["message"]
    assert await run.metric("balancer_rejected_requests_total", reason="body_too_large") == 1


async def test_chunked_body_over_the_limit_is_413(upstreams, start_balancer):
    """A body without Content-Length is cut off at the limit too."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url],
                                             limits=LimitsSettings(max_body_bytes=2048)))

    async def chunks():
        for _ in range(10):
            yield b"x" * 1000

    async with run.http.post(run.url + CHAT, data=chunks(),
                             headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "invalid_request_error"
    assert up.requests == []


async def test_oversized_header_gets_a_json_error(upstreams, start_balancer):
    """A header line over max_header_bytes is refused with a 4xx JSON error body."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url],
                                             limits=LimitsSettings(max_header_bytes=1024)))
    reader, writer = await asyncio.open_connection("127.0.0.1", run.running.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096
                 + b"\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert 400 <= status < 500
    assert b"application/json" in head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    # The server still serves.
    async with run.http.get(run.url + "/v1/models") as r:
        assert r.status == 200
    assert await run.metric("balancer_rejected_requests_total", reason="malformed_http") == 1


async def test_wrong_method_is_405(upstreams, start_balancer):
    """GET on a keyed path is refused with 405, not forwarded."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    async with run.http.get(run.url + CHAT) as r:
        assert r.status == 405
        assert "POST" in (await r.json())["error"]["message"]
    assert up.requests == []


async def test_unknown_path_is_404_json(upstreams, start_balancer):
    """Paths outside /v1 get a JSON 404."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    async with run.http.get(run.url + "/admin") as r:
        assert r.status == 404
        assert "error" in await r.json()


async def test_missing_content_type_is_accepted_as_json(upstreams, start_balancer):
    """A JSON body without a Content-Type header is still served."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    async with run.http.post(run.url + CHAT, data=body.encode(),
                             skip_auto_headers=["Content-Type"]) as r:
        assert r.status == 200
