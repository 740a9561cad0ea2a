"""Shared fixtures: real model-server doubles and real balancers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from balancer import app as balancer_app
from balancer.config import LimitsSettings, PoolSettings, RoutingSettings, Settings, validate
from balancer.discovery import EndpointSource

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class Served:
    """A double served by ``server`` on 127.0.0.1: its base URL and balancer's endpoint id."""

    server: TestServer | None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def endpoint_id(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"


@dataclass
class Upstream(Served):
    """A model-server double: an aiohttp app that records requests and streams SSE.

    Behaviour is set per test through attributes: ``chunks`` per stream, ``chunk_delay``
    between chunks (seconds), ``gate`` (an event the stream waits on after its first chunk),
    ``status`` to answer errors, ``first_byte_delay`` before the response starts, ``die_after``
    (close the connection after that many chunks), ``load_report`` (the
    ``endpoint-load-metrics`` value answered to requests that ask for one).
    """

    name: str
    server: TestServer | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    chunks: int = 3
    chunk_delay: float = 0.0
    first_byte_delay: float = 0.0
    gate: asyncio.Event | None = None
    status: int = 200
    die_after: int | None = None
    load_report: str | None = None
    active: int = 0
    cancelled: int = 0
    completed: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_route("*", "/v1/{tail:.*}", self.other)
        return app

    async def other(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "method": request.method,
                              "headers": dict(request.headers)})
        return web.json_response({"path": request.path, "upstream": self.name})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body,
                              "headers": dict(request.headers)})
        return web.json_response({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body,
                              "headers": dict(request.headers)})
        self.active += 1
        try:
            if self.first_byte_delay:
                await asyncio.sleep(self.first_byte_delay)
            if self.status != 200:
                return web.json_response(
                    {"error": {"message": "upstream says no", "type": "server_error",
                               "code": self.status}},
                    status=self.status,
                    headers={"Connection": "keep-alive", "Keep-Alive": "timeout=5"},
                )
            headers = {"x-upstream": self.name}
            if self.load_report is not None and "endpoint-load-metrics-format" in request.headers:
                headers["endpoint-load-metrics"] = self.load_report
            if not body.get("stream"):
                return web.json_response(self._completion(body), headers={
                    **headers, "Keep-Alive": "timeout=5"})
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   **headers})
            await response.prepare(request)
            for i in range(self.chunks):
                if self.die_after is not None and i == self.die_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                         "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": f"tok{i} "},
                                      "finish_reason": None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            final = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                     "model": body["model"],
                     "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
            await response.write(f"data: {json.dumps(final)}\n\n".encode())
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                         "model": body["model"], "choices": [],
                         "usage": {"prompt_tokens": 5, "completion_tokens": self.chunks,
                                   "total_tokens": 5 + self.chunks,
                                   "prompt_tokens_details": {"cached_tokens": 3}}}
                await response.write(f"data: {json.dumps(usage)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.completed += 1
            return response
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "cmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"from {self.name}"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 3}},
        }


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[int], Awaitable[list[Upstream]]]]:
    """Start n upstream doubles on 127.0.0.1."""
    started: list[Upstream] = []

    async def start(n: int) -> list[Upstream]:
        batch = []
        for _ in range(n):
            upstream = Upstream(name=f"up{len(started)}")
            upstream.server = TestServer(upstream.app(), host="127.0.0.1")
            await upstream.server.start_server()
            started.append(upstream)
            batch.append(upstream)
        return batch

    yield start
    for upstream in started:
        if upstream.gate is not None:
            upstream.gate.set()
        assert upstream.server is not None
        await upstream.server.close()


def make_settings(
    endpoints: list[str],
    *,
    models: tuple[str, ...] = (MODEL,),
    routing: RoutingSettings | None = None,
    limits: LimitsSettings | None = None,
    **server: Any,
) -> Settings:
    settings = Settings(
        pools=(PoolSettings("llama", models, tuple(endpoints)),),
        routing=routing or RoutingSettings(),
        limits=limits or LimitsSettings(),
    )
    if server:
        settings = replace(settings, server=replace(settings.server, **server))
    return validate(settings)


@dataclass
class RunningBalancer:
    running: balancer_app.Running
    http: aiohttp.ClientSession

    @property
    def balancer(self) -> balancer_app.Balancer:
        return self.running.balancer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.running.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.running.admin_port}"

    def load(self) -> dict[str, int]:
        pool = self.balancer.router.pools["llama"]
        return {k: v for k, v in pool.load.items() if v}

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no request is in flight (bounded)."""
        async with asyncio.timeout(timeout):
            while self.balancer.proxy.in_flight or self.load():
                await asyncio.sleep(0.01)

    async def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        async with self.http.get(self.admin_url + "/metrics") as response:
            text = await response.text()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total


@pytest.fixture
async def start_balancer() -> AsyncIterator[Callable[..., Awaitable[RunningBalancer]]]:
    """Start a real balancer (proxy and admin ports) on 127.0.0.1 with ephemeral ports."""
    runs: list[RunningBalancer] = []

    async def start(settings: Settings, source: EndpointSource | None = None
                    ) -> RunningBalancer:
        balancer = balancer_app.build(settings, source=source, registry=CollectorRegistry())
        running = await balancer_app.start(balancer, host="127.0.0.1", port=0, admin_port=0)
        if source is None:
            await asyncio.wait_for(balancer.synced.wait(), 5)
        run = RunningBalancer(running, aiohttp.ClientSession())
        runs.append(run)
        return run

    yield start
    for run in runs:
        await run.http.close()
        await run.running.stop()


def chat_body(text: str, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}],
            "stream": stream, **extra}



def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, as balancer does in production."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
