"""Adapters loaded on some pods only: requests for one reach only pods serving it, replicas
agree on where each key goes, and a 404 from a pod that unloaded it is retried elsewhere.

Four vLLM-like doubles on 127.0.0.1 list their own models on /v1/models (the base model on
all, adapters on one to three of them) and answer 404 with vLLM's error body for a model
they do not serve; the balancer learns the models from them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer.config import LoadSettings, ModelDiscoverySettings, PoolSettings, Settings, validate
from balancer.prefix import Kind
from balancer.route import decide, keyed_view
from tests.apiserver import eventually
from tests.conftest import MODEL, RunningBalancer, Served

ADAPTERS = {"sql": (0,), "chat": (1, 2), "code": (0, 1, 3)}
"""Each adapter and the pods (by index) it is loaded on."""


@dataclass
class Pod(Served):
    """A vLLM-like double: lists ``models`` and serves only those (a test that removes one
    after the balancer asked plays a pod whose adapter was unloaded since)."""

    name: str
    models: set[str]
    server: TestServer | None = None
    hits: Counter[str] = field(default_factory=Counter)
    """Model -> requests answered 200."""
    missed: Counter[str] = field(default_factory=Counter)
    """Model -> requests answered 404."""
    listed: int = 0
    """/v1/models requests."""
    lora_metrics: str = ""
    """``running_lora_adapters`` shown in /metrics."""
    plain_404: bool = False
    """Answer a model it does not serve with a bare 404 that names no model."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def list_models(self, request: web.Request) -> web.Response:
        self.listed += 1
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model"} for m in sorted(self.models)]})

    async def chat(self, request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        if model not in self.models:
            self.missed[model] += 1
            if self.plain_404:
                return web.json_response({"detail": "Not Found"}, status=404)
            return web.json_response(
                {"object": "error", "message": f"The model `{model}` does not exist.",
                 "type": "NotFoundError", "param": None, "code": 404}, status=404)
        self.hits[model] += 1
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.name}}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=(
            'vllm:num_requests_waiting{model_name="m"} 0.0\n'
            'vllm:num_requests_running{model_name="m"} 0.0\n'
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="'
            f'{self.lora_metrics}",waiting_lora_adapters=""}} 1.7e+09\n'))


@pytest.fixture
async def pods() -> AsyncIterator[list[Pod]]:
    started = []
    for i in range(4):
        models = {MODEL} | {a for a, on in ADAPTERS.items() if i in on}
        pod = Pod(f"pod{i}", models)
        pod.server = TestServer(pod.app(), host="127.0.0.1")
        await pod.server.start_server()
        started.append(pod)
    yield started
    for pod in started:
        assert pod.server is not None
        await pod.server.close()


def learning_settings(pods: list[Pod], **load: Any) -> Settings:
    return validate(Settings(
        pools=(PoolSettings("llama", (), tuple(p.url for p in pods)),),
        load=LoadSettings(**({"poll_interval": 0.0} | load)),
        model_discovery=ModelDiscoverySettings(refresh_interval=60.0)))


async def learned(start_balancer: Callable[..., Awaitable[RunningBalancer]],
                  settings: Settings) -> RunningBalancer:
    run = await start_balancer(settings)
    pool = run.balancer.router.pools["llama"]
    await eventually(lambda: all(s.models is not None for s in pool.states.values())
                     and set(pool.models) == {MODEL, *ADAPTERS})
    return run


async def send(run: RunningBalancer, model: str, keys: range) -> list[int]:
    """One chat request per key, 16 at a time; the statuses."""
    limit = asyncio.Semaphore(16)

    async def one(k: int) -> int:
        async with limit:
            body = {"model": model, "messages": [{"role": "user", "content": f"task {k}"}]}
            async with run.http.post(run.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

    return await asyncio.gather(*(one(k) for k in keys))


async def test_adapter_requests_reach_only_pods_serving_it(pods, start_balancer):
    """200 requests for each adapter all reach a pod that serves it (spreading over its
    pods when it has several); the base model still spreads over all four."""
    run = await learned(start_balancer, learning_settings(pods))
    for adapter, on in ADAPTERS.items():
        assert await send(run, adapter, range(200)) == [200] * 200
        reached = {i for i, pod in enumerate(pods) if pod.hits[adapter]}
        assert reached <= set(on)
        assert len(reached) == len(on), f"{adapter} should spread over its pods"
        assert sum(pod.hits[adapter] for pod in pods) == 200
    assert not any(pod.missed for pod in pods)
    assert await send(run, MODEL, range(200)) == [200] * 200
    assert all(pod.hits[MODEL] >= 10 for pod in pods), [p.hits[MODEL] for p in pods]


async def test_two_balancers_agree_on_every_key_of_an_adapter(pods, start_balancer):
    """Two instances that learned the same models send every key of an adapter to the same
    pod (the subset's ring depends only on its members)."""
    first = await learned(start_balancer, learning_settings(pods))
    second = await learned(start_balancer, learning_settings(pods))
    for adapter in ("chat", "code", MODEL):
        for k in range(200):
            view = keyed_view(Kind.CHAT, {"model": adapter, "messages": [
                {"role": "user", "content": f"conversation {k}"}]}, None)
            a = decide(view, first.balancer.router).choice.endpoint
            b = decide(view, second.balancer.router).choice.endpoint
            assert a == b


SCRIPT = r"""
from balancer.config import PoolSettings, Settings, validate
from balancer.endpoints import Endpoint
from balancer.prefix import Kind
from balancer.route import decide, keyed_view
from balancer.router import Router

settings = validate(Settings(pools=(PoolSettings("p", (), tuple(
    f"http://127.0.0.1:{8001 + i}" for i in range(6))),)))
router = Router(settings)
pool = router.pools["p"]
pool.set_endpoints(Endpoint(f"pod-{i}", f"http://127.0.0.1:{8001 + i}") for i in range(6))
for i in range(6):
    pool.set_endpoint_models(f"pod-{i}", frozenset({"base"} | ({"lora"} if i % 2 else set())))
router.set_models("p", ["base", "lora"])
for k in range(300):
    body = {"model": "lora", "messages": [{"role": "user", "content": f"conversation {k}"}]}
    print(decide(keyed_view(Kind.CHAT, body, None), router).choice.endpoint)
"""


def test_processes_with_different_hash_seeds_agree_on_an_adapters_keys() -> None:
    """Nothing in a subset's ring depends on the process (set order, hash seed)."""
    def route(seed: str) -> list[str]:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        return subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True,
                              capture_output=True, text=True, timeout=60).stdout.split()

    first, second = route("1"), route("2")
    assert len(first) == 300 and first == second
    assert set(first) == {"pod-1", "pod-3", "pod-5"}


async def test_a_404_from_a_pod_that_unloaded_the_adapter_is_retried_on_another(
        pods, start_balancer):
    """After discovery pod1 unloads "chat": requests it gets for it are answered by pod2,
    the pod's models are asked again, and it stays routable (a 404 is no health failure)."""
    run = await learned(start_balancer, replace(
        learning_settings(pods), health=replace(Settings().health, consecutive_failures=1)))
    pool = run.balancer.router.pools["llama"]
    pod1, pod2 = pods[1], pods[2]
    listed = pod1.listed
    pod1.models.discard("chat")
    assert await send(run, "chat", range(100)) == [200] * 100
    assert pod1.missed["chat"] >= 1
    assert pod2.hits["chat"] == 100
    await eventually(lambda: pod1.listed > listed)
    assert "chat" not in (pool.states[pod1.endpoint_id].models or ())
    assert pod1.endpoint_id in pool.routable
    assert await run.metric("balancer_retries_total", reason="model_not_found",
                            result="retried") == pod1.missed["chat"]
    missed = pod1.missed["chat"]
    assert await send(run, "chat", range(100, 150)) == [200] * 50
    assert pod1.missed["chat"] == missed, "the adapter is no longer routed to pod1"


async def test_a_model_not_found_404_with_no_other_pod_is_the_answer(pods, start_balancer):
    """The only pod serving an adapter unloaded it: its 404 goes to the client, the pod's
    models are asked again, and then balancer itself answers 404 for the adapter."""
    run = await learned(start_balancer, learning_settings(pods))
    pods[0].models.discard("sql")
    assert await send(run, "sql", range(1)) == [404]
    assert await run.metric("balancer_retries_total", reason="model_not_found",
                            result="no_endpoint") == 1
    await eventually(lambda: "sql" not in run.balancer.router.models)
    assert await send(run, "sql", range(1, 2)) == [404]
    assert pods[0].missed["sql"] == 1


async def test_a_404_that_names_no_model_is_not_retried(pods, start_balancer):
    """A 404 that does not say the model is missing is the answer, as from any server."""
    run = await learned(start_balancer, learning_settings(pods))
    pods[1].models.discard("chat")
    pods[2].models.discard("chat")
    pods[1].plain_404 = pods[2].plain_404 = True
    statuses = await send(run, "chat", range(10))
    assert statuses == [404] * 10
    assert pods[1].missed["chat"] + pods[2].missed["chat"] == 10
    assert await run.metric("balancer_retries_total", reason="model_not_found") == 0


async def test_adapters_in_a_pods_metrics_join_its_models(pods, start_balancer):
    """vLLM's lora_requests_info gauge shows an adapter loaded after /v1/models was read:
    the load poller adds it, and requests for it reach that pod."""
    run = await learned(start_balancer, learning_settings(pods, poll_interval=0.1))
    pool = run.balancer.router.pools["llama"]
    pods[3].models.add("fresh")
    pods[3].lora_metrics = "fresh,code"
    await eventually(lambda: "fresh" in run.balancer.router.models)
    assert pool.subsets["fresh"].members == (pods[3].endpoint_id,)
    assert await send(run, "fresh", range(20)) == [200] * 20
    assert pods[3].hits["fresh"] == 20
