"""What reaches a model server, and how often: request-target checks, the forward allow-list,
and retries only for requests that may run twice. Real balancer, real aiohttp upstreams and
raw sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field, replace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer.config import DEFAULT_FORWARD_PATHS, HealthSettings, Settings
from tests.conftest import MODEL, chat_body, make_settings

# No active probes and no passive ejection: the doubles count only what clients caused.
QUIET_HEALTH = HealthSettings(active=False, consecutive_failures=1000)


def quiet(settings: Settings) -> Settings:
    return replace(settings, health=QUIET_HEALTH)


@dataclass
class Failures:
    """Shared by several doubles: how many of their next requests fail, and how."""

    mode: str = "ok"
    """ok, 503 (answered) or reset (the connection is cut once the request is read)."""
    remaining: int = 0
    """Requests that still fail (any double); -1: all of them."""
    only: str = ""
    """Only requests with this method fail (empty: any)."""

    def fails(self, method: str) -> bool:
        if self.mode == "ok" or (self.only and method != self.only) or self.remaining == 0:
            return False
        if self.remaining > 0:
            self.remaining -= 1
        return True


@dataclass
class Recorder:
    """A model-server double that records each request's method and target as received."""

    failures: Failures
    seen: list[tuple[str, str]] = field(default_factory=list)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.method, request.raw_path))
        if self.failures.fails(request.method):
            if self.failures.mode == "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            return web.json_response({"error": {"message": "busy"}}, status=503)
        return web.json_response({"target": request.raw_path})

    async def no_metrics(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def start(self) -> str:
        app = web.Application()
        # balancer's load polls (a pool polls /metrics while keyed requests come) are not
        # forwarded requests: not recorded, and no failure is spent on them.
        app.router.add_get("/metrics", self.no_metrics)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def recorders():
    started: list[Recorder] = []

    async def start(n: int, failures: Failures) -> tuple[list[Recorder], list[str]]:
        batch = [Recorder(failures) for _ in range(n)]
        started.extend(batch)
        return batch, [await r.start() for r in batch]

    yield start
    for recorder in started:
        assert recorder.server is not None
        await recorder.server.close()


async def raw_request(port: int, request_line: str, body: bytes = b"") -> tuple[int, dict]:
    """Send one request exactly as written; (status, JSON body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


CHAT = json.dumps(chat_body("hi")).encode()
TRICKS = [
    ("GET /v1/../metrics", b""),
    ("GET /v1/%2e%2e/metrics", b""),
    ("GET /v1/%2E%2E/x", b""),
    ("GET /v1/./models", b""),
    ("GET /v1/a%2fb", b""),
    ("POST /v1/tokenize/..%2F..%2Fload_lora_adapter", b"{}"),
    ("POST /v1/%2e%2e/v1/chat/completions", CHAT),
    ("GET http://127.0.0.1/v1/models", b""),
    ("POST http://127.0.0.1/v1/chat/completions", CHAT),
    ("CONNECT 127.0.0.1:443", b""),
    ("OPTIONS *", b""),
    ("GET /../metrics", b""),
]


async def test_path_tricks_get_400_and_reach_no_upstream(recorders, start_balancer, caplog):
    """Dot segments, encoded slashes and non-origin targets are refused with an OpenAI-style
    400 before routing, on keyed and other paths; the upstream sees nothing; each refusal
    is logged and counted; the process keeps serving."""
    (up,), urls = await recorders(1, Failures())
    run = await start_balancer(quiet(make_settings(urls)))
    with caplog.at_level(logging.INFO, logger="balancer.proxy"):
        for line, body in TRICKS:
            status, payload = await raw_request(run.running.port, line, body)
            assert status == 400, line
            assert payload["error"]["type"] == "invalid_request_error", line
            assert "request target" in payload["error"]["message"], line
    assert up.seen == []
    assert await run.metric("balancer_rejected_requests_total",
                            reason="bad_target") == len(TRICKS)
    assert sum("rejected" in r.getMessage() and ": 400 " in r.getMessage()
               for r in caplog.records) == len(TRICKS)
    status, _ = await raw_request(run.running.port, "POST /v1/chat/completions", CHAT)
    assert status == 200


async def test_only_the_normalized_target_is_forwarded(recorders, start_balancer):
    """An allowed path is forwarded canonically encoded, never as the client spelled it."""
    (up,), urls = await recorders(1, Failures())
    run = await start_balancer(quiet(make_settings(urls)))
    for line, expected in [
        ("POST /v1/%74okenize?x=%41|", "/v1/tokenize?x=%41%7C"),
        ("POST /v1/chat/%63ompletions", "/v1/chat/completions"),
        ("GET /v1/responses/resp%5f1", "/v1/responses/resp_1"),
    ]:
        body = CHAT if "chat" in line else json.dumps({"model": MODEL}).encode()
        status, _ = await raw_request(run.running.port, line, body)
        assert status == 200, line
        assert up.seen[-1] == (line.split()[0], expected)


async def test_lora_admin_paths_are_closed_by_default_and_open_when_listed(
        recorders, start_balancer, caplog):
    """vLLM's LoRA admin paths get 404 (logged, counted) unless server.forward_paths
    lists them; then they are forwarded."""
    (up,), urls = await recorders(1, Failures())
    lora = {"lora_name": "sql", "lora_path": "/adapters/sql"}
    run = await start_balancer(quiet(make_settings(urls)))
    with caplog.at_level(logging.INFO, logger="balancer.proxy"):
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            async with run.http.post(run.url + path, json=lora) as r:
                assert r.status == 404
                error = (await r.json())["error"]
                assert path in error["message"] and error["type"] == "invalid_request_error"
    assert up.seen == []
    assert await run.metric("balancer_rejected_requests_total", reason="path_not_allowed") == 2
    assert any("rejected POST /v1/load_lora_adapter: 404" in r.getMessage()
               for r in caplog.records)

    opened = quiet(make_settings(urls, forward_paths=(
        *DEFAULT_FORWARD_PATHS, "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter")))
    run = await start_balancer(opened)
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        async with run.http.post(run.url + path, json=lora) as r:
            assert r.status == 200
    assert up.seen == [("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")]


async def test_a_method_a_path_does_not_take_is_405_with_allow(recorders, start_balancer):
    """Another method on a forwarded, keyed or local path: 405 naming the allowed ones."""
    (up,), urls = await recorders(1, Failures())
    run = await start_balancer(quiet(make_settings(urls)))
    for method, path, allow in [("DELETE", "/v1/tokenize", "POST"),
                                ("PUT", "/v1/responses/resp_1", "GET"),
                                ("GET", "/v1/chat/completions", "POST"),
                                ("POST", "/v1/models", "GET, HEAD")]:
        async with run.http.request(method, run.url + path) as r:
            assert r.status == 405, (method, path)
            assert r.headers["Allow"] == allow
            assert method in (await r.json())["error"]["message"]
    assert up.seen == []
    assert await run.metric("balancer_rejected_requests_total",
                            reason="method_not_allowed") == 4


@pytest.mark.parametrize("mode", ["503", "reset"])
async def test_a_request_that_must_not_run_twice_runs_once(recorders, start_balancer, mode):
    """A POST /v1/responses (it may store a response or start a background job) whose
    endpoint answers 503 or resets is executed exactly once, though another endpoint is
    free; the client gets that failure."""
    ups, urls = await recorders(2, Failures(mode, remaining=-1))
    run = await start_balancer(quiet(make_settings(urls)))
    async with run.http.post(run.url + "/v1/responses",
                             json={"model": MODEL, "input": "hi"}) as r:
        assert r.status == (503 if mode == "503" else 502)
    assert sum(len(u.seen) for u in ups) == 1
    assert await run.metric("balancer_retries_total", result="not_replayable") == 1
    assert await run.metric("balancer_retries_total", result="retried") == 0


async def test_a_reused_connection_that_resets_is_not_resent_for_such_a_request(
        recorders, start_balancer):
    """The keep-alive re-send (a reset on a reused connection) does not apply to a request
    that must not run twice: it reached the server once, and that is all."""
    (up,), urls = await recorders(1, Failures("reset", remaining=-1, only="POST"))
    run = await start_balancer(quiet(make_settings(urls)))
    async with run.http.get(run.url + "/v1/responses/resp_1") as r:  # warms a connection
        assert r.status == 200
    async with run.http.post(run.url + "/v1/responses",
                             json={"model": MODEL, "input": "hi"}) as r:
        assert r.status == 502
    assert up.seen == [("GET", "/v1/responses/resp_1"), ("POST", "/v1/responses")]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/chat/completions", chat_body("hi")),
    ("POST", "/v1/tokenize", {"model": MODEL, "prompt": "hi"}),
    ("POST", "/v1/rerank", {"model": MODEL, "query": "q", "documents": ["a"]}),
    ("GET", "/v1/responses/resp_1", None),
], ids=["chat", "tokenize", "rerank", "get"])
@pytest.mark.parametrize("mode", ["503", "reset"])
async def test_inference_requests_and_gets_are_still_retried(
        recorders, start_balancer, method, path, body, mode):
    """Keyed requests, POSTs marked retry and idempotent methods go to another endpoint
    after a 503 or a reset."""
    ups, urls = await recorders(2, Failures(mode, remaining=1))
    run = await start_balancer(quiet(make_settings(urls)))
    async with run.http.request(method, run.url + path, json=body) as r:
        assert r.status == 200
    assert sorted(len(u.seen) for u in ups) == [1, 1]
    assert await run.metric("balancer_retries_total", result="retried") == 1
