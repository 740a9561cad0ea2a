"""The simulated pod over real sockets on 127.0.0.1: OpenAI and vLLM endpoints."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from loadtest.simserver import (
    DEFAULT_MODEL,
    EngineConfig,
    SimConfig,
    build_app,
    pod_configs,
    run_pods,
)
from loadtest.simserver.__main__ import build_parser, configs_from_args
from loadtest.simserver.text import PseudoWords, count_tokens, render_chat, text_seed

# One simulated second lasts 10 ms: a default 128-token reply takes ~7 ms of wall time.
FAST = SimConfig(name="pod-a", time_scale=0.01)

Client = TestClient[Any, Any]


async def _client(aiohttp_client: AiohttpClient, config: SimConfig = FAST) -> Client:
    return await aiohttp_client(build_app(config))


def _chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        **extra,
    }


async def _events(response: aiohttp.ClientResponse) -> list[Any]:
    """Parse an SSE body into JSON objects and the final "[DONE]"."""
    events: list[Any] = []
    async for raw in response.content:
        line = raw.decode().strip()
        if not line:
            continue
        assert line.startswith("data: ")
        data = line.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def _stats(client: Client) -> dict[str, Any]:
    async with client.get("/stats") as response:
        assert response.status == 200
        stats: dict[str, Any] = await response.json()
        return stats


async def _wait_for(client: Client, key: str, value: Any, timeout: float = 3.0) -> None:
    """Poll /stats until `key` has `value`."""
    deadline = time.monotonic() + timeout
    while (await _stats(client))[key] != value:
        assert time.monotonic() < deadline, f"/stats {key} never became {value}"
        await asyncio.sleep(0.02)


async def test_streaming_chat_has_openai_chunk_shapes(aiohttp_client: AiohttpClient) -> None:
    """A streamed chat completion sends role and tokens, a usage chunk, then [DONE]."""
    client = await _client(aiohttp_client)
    body = _chat(max_tokens=6, stream=True, stream_options={"include_usage": True})
    async with client.post("/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["x-sim-pod"] == "pod-a"
        events = await _events(response)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert len(chunks) == 6
    assert {c["id"] for c in chunks} == {usage["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == DEFAULT_MODEL
        assert isinstance(chunk["created"], int)
        assert chunk["usage"] is None
        assert [c["index"] for c in chunk["choices"]] == [0]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert len(text) == 24
    assert usage["choices"] == []
    prompt_tokens = count_tokens(render_chat(body["messages"]))
    assert usage["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_streaming_without_usage_ends_with_done(aiohttp_client: AiohttpClient) -> None:
    """Without include_usage there is no usage chunk and chunks carry no usage key."""
    client = await _client(aiohttp_client)
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=3, stream=True)) as r:
        events = await _events(r)
    assert events[-1] == "[DONE]"
    assert len(events) == 4
    assert all("usage" not in e for e in events[:-1])


async def test_non_streaming_chat_has_openai_shape(aiohttp_client: AiohttpClient) -> None:
    """A plain chat completion answers one JSON body with the message and usage."""
    client = await _client(aiohttp_client)
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=5)) as response:
        assert response.status == 200
        assert response.headers["x-sim-pod"] == "pod-a"
        body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == DEFAULT_MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"]) == 20
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def _reply(client: Client, body: dict[str, Any]) -> str:
    async with client.post("/v1/chat/completions", json=body) as response:
        assert response.status == 200
        content: str = (await response.json())["choices"][0]["message"]["content"]
        return content


async def test_replies_follow_temperature_and_seed(aiohttp_client: AiohttpClient) -> None:
    """Greedy (no temperature, or 0): a prompt always gets its own reply, as before. Sampled
    (temperature > 0): each request gets another reply of the same length. Seeded: the same
    prompt and seed give the same reply, another seed another one."""
    client = await _client(aiohttp_client)
    body = _chat("hi", max_tokens=12)
    prompt = render_chat(body["messages"])
    greedy = "".join(PseudoWords(text_seed(prompt)).tokens(12))
    assert await _reply(client, body) == greedy
    assert await _reply(client, {**body, "temperature": 0}) == greedy
    sampled = [await _reply(client, {**body, "temperature": 0.7}) for _ in range(3)]
    assert len(set(sampled)) == 3 and greedy not in sampled
    assert all(len(reply) == len(greedy) for reply in sampled)
    seeded = await _reply(client, {**body, "temperature": 0.7, "seed": 5})
    assert seeded == await _reply(client, {**body, "temperature": 0.7, "seed": 5})
    assert seeded == await _reply(client, {**body, "seed": 5})
    assert seeded not in (greedy, await _reply(client, {**body, "temperature": 0.7, "seed": 6}))
    assert await _reply(client, {**body, "temperature": 0, "seed": 5}) == greedy


async def test_tools_are_part_of_the_prompt(aiohttp_client: AiohttpClient) -> None:
    """Tool definitions count as prompt tokens and are cached with the prefix; a ``tool``
    message is rendered like any other."""
    client = await _client(aiohttp_client)
    tools = [{"type": "function", "function": {"name": "lookup", "description": "x" * 400}}]
    body = _chat("hello", max_tokens=4, tools=tools)
    async with client.post("/v1/chat/completions", json=body) as response:
        first = await response.json()
    expected = count_tokens(render_chat(body["messages"], tools))
    assert first["usage"]["prompt_tokens"] == expected > count_tokens(render_chat(body["messages"]))
    reply = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
    result = {"role": "tool", "tool_call_id": "call-1", "content": "the result"}
    body = {**body, "messages": [*body["messages"], reply, result]}
    async with client.post("/v1/chat/completions", json=body) as response:
        second = await response.json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= expected - 16
    async with client.post("/tokenize", json=body) as response:
        tokenized = await response.json()
    assert tokenized["count"] == second["usage"]["prompt_tokens"]


async def test_max_completion_tokens_wins_and_default_applies(
    aiohttp_client: AiohttpClient,
) -> None:
    """max_completion_tokens overrides max_tokens; without either the default length is used."""
    config = replace(FAST, engine=EngineConfig(default_max_tokens=7))
    client = await _client(aiohttp_client, config)
    body = _chat(max_tokens=3, max_completion_tokens=4)
    async with client.post("/v1/chat/completions", json=body) as response:
        assert (await response.json())["usage"]["completion_tokens"] == 4
    async with client.post("/v1/chat/completions", json=_chat()) as response:
        assert (await response.json())["usage"]["completion_tokens"] == 7


async def test_completions_batch_prompts_and_token_ids(aiohttp_client: AiohttpClient) -> None:
    """A list of prompts gets one choice per prompt; token-id prompts count one token per id."""
    client = await _client(aiohttp_client)
    body = {"model": DEFAULT_MODEL, "prompt": ["first prompt", "second"], "max_tokens": 3}
    async with client.post("/v1/completions", json=body) as response:
        result = await response.json()
    assert result["object"] == "text_completion"
    assert result["id"].startswith("cmpl-")
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert all(len(c["text"]) == 12 and c["finish_reason"] == "length" for c in result["choices"])
    assert result["usage"]["prompt_tokens"] == count_tokens("first prompt") + count_tokens("second")
    assert result["usage"]["completion_tokens"] == 6

    body = {"model": DEFAULT_MODEL, "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2, "stream": True}
    async with client.post("/v1/completions", json=body) as response:
        events = await _events(response)
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 0, 1, 1]
    assert sum(c["choices"][0]["finish_reason"] == "length" for c in chunks) == 2

    body = {"model": DEFAULT_MODEL, "prompt": [10, 20, 30, 40], "max_tokens": 1}
    async with client.post("/v1/completions", json=body) as response:
        assert (await response.json())["usage"]["prompt_tokens"] == 4


async def test_repeated_prompt_reports_cached_tokens(aiohttp_client: AiohttpClient) -> None:
    """The second identical request finds all but the last block of its prompt cached."""
    client = await _client(aiohttp_client)
    body = _chat("tell me about caching " * 40, max_tokens=2)
    cached = []
    for _ in range(2):
        async with client.post("/v1/chat/completions", json=body) as response:
            usage = (await response.json())["usage"]
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0
    assert cached[1] == (usage["prompt_tokens"] - 1) // 16 * 16


async def test_a_cached_prompt_answers_much_sooner(aiohttp_client: AiohttpClient) -> None:
    """Time to first token on the wire follows the engine: a long cold prompt is slow, the same
    prompt again is fast."""
    # 8,000 tokens: 7.65 + 0.0257 x 8000 + 1.34e-6 x 8000 x 8001 / 2 = 256 simulated ms, 128 ms
    # of wall time at 0.5.
    client = await _client(aiohttp_client, replace(FAST, time_scale=0.5))
    body = _chat("x" * 32_000, max_tokens=2, stream=True)
    ttfts = []
    for _ in range(2):
        start = time.monotonic()
        async with client.post("/v1/chat/completions", json=body) as response:
            await response.content.readline()
            ttfts.append(time.monotonic() - start)
            await response.read()
    assert ttfts[0] >= 0.12  # cannot beat the simulated prefill
    assert ttfts[1] < 0.06  # ~9 ms of simulated work, plenty of slack for a loaded host


async def test_unknown_model_is_404_with_openai_error(aiohttp_client: AiohttpClient) -> None:
    """A model the pod does not serve gets 404 and an OpenAI error body."""
    client = await _client(aiohttp_client)
    body = {**_chat(), "model": "nope"}
    async with client.post("/v1/chat/completions", json=body) as response:
        assert response.status == 404
        assert response.headers["x-sim-pod"] == "pod-a"
        error = (await response.json())["error"]
    assert error["code"] == "model_not_found"
    assert "nope" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/chat/completions", json.dumps({"model": DEFAULT_MODEL}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user"}]}).encode()),
        ("/v1/chat/completions", json.dumps(_chat(max_tokens=0)).encode()),
        ("/v1/chat/completions", json.dumps(_chat(max_tokens="5")).encode()),
        ("/v1/chat/completions", json.dumps(_chat(n=2)).encode()),
        ("/v1/chat/completions", json.dumps(_chat(stream="yes")).encode()),
        ("/v1/chat/completions", json.dumps(_chat(temperature=-0.5)).encode()),
        ("/v1/chat/completions", json.dumps(_chat(temperature="hot")).encode()),
        ("/v1/chat/completions", json.dumps(_chat(seed=1.5)).encode()),
        ("/v1/chat/completions", json.dumps(_chat(seed=2**64)).encode()),
        ("/v1/chat/completions", json.dumps(_chat(tools="all")).encode()),
        ("/v1/chat/completions", json.dumps({**_chat(), "messages": []}).encode()),
        ("/v1/chat/completions", json.dumps(_chat(max_tokens=200_000)).encode()),
        ("/v1/completions", json.dumps({"model": DEFAULT_MODEL}).encode()),
        ("/v1/completions", json.dumps({"model": DEFAULT_MODEL, "prompt": 5}).encode()),
        ("/tokenize", json.dumps({"model": DEFAULT_MODEL}).encode()),
    ],
)
async def test_malformed_requests_are_400(
    aiohttp_client: AiohttpClient, path: str, payload: bytes
) -> None:
    """Bad JSON, missing or ill-typed fields and impossible lengths get 400 with a message."""
    client = await _client(aiohttp_client)
    async with client.post(path, data=payload) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["message"]
    assert error["type"] == "invalid_request_error"


async def test_models_lists_every_served_name(aiohttp_client: AiohttpClient) -> None:
    """/v1/models lists each configured model, and each can be used."""
    client = await _client(aiohttp_client, replace(FAST, models=("alpha", "beta")))
    async with client.get("/v1/models") as response:
        body = await response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["alpha", "beta"]
    assert all(m["object"] == "model" for m in body["data"])
    async with client.post(
        "/v1/chat/completions", json={**_chat(max_tokens=1), "model": "beta"}
    ) as r:
        assert r.status == 200


async def test_health_is_200_and_empty(aiohttp_client: AiohttpClient) -> None:
    """/health answers 200 with no body when the pod is up."""
    client = await _client(aiohttp_client)
    async with client.get("/health") as response:
        assert response.status == 200
        assert await response.read() == b""
        assert response.headers["x-sim-pod"] == "pod-a"


async def test_metrics_parse_and_use_vllm_names(aiohttp_client: AiohttpClient) -> None:
    """/metrics is Prometheus text with vLLM's metric names and a model_name label."""
    client = await _client(aiohttp_client)
    body = _chat("metrics please " * 30, max_tokens=3)
    for _ in range(2):
        async with client.post("/v1/chat/completions", json=body) as response:
            usage = (await response.json())["usage"]
    async with client.get("/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    label = (("model_name", DEFAULT_MODEL),)

    def value(name: str, labels: tuple[tuple[str, str], ...] = label) -> float:
        return samples[(name, labels)]

    assert value("vllm:num_requests_running") == 0
    assert value("vllm:num_requests_waiting") == 0
    assert value("vllm:gpu_cache_usage_perc") == 0
    assert value("vllm:kv_cache_usage_perc") == 0
    assert value("vllm:prefix_cache_queries_total") == 2 * usage["prompt_tokens"]
    hits = usage["prompt_tokens_details"]["cached_tokens"]
    assert value("vllm:prefix_cache_hits_total") == hits > 0
    assert value("vllm:prompt_tokens_total") == 2 * usage["prompt_tokens"]
    assert value("vllm:generation_tokens_total") == 6
    assert value("vllm:num_preemptions_total") == 0
    success = (("finished_reason", "length"), ("model_name", DEFAULT_MODEL))
    assert value("vllm:request_success_total", success) == 2
    assert value("vllm:time_to_first_token_seconds_count") == 2
    inf = (("le", "+Inf"), ("model_name", DEFAULT_MODEL))
    assert value("vllm:time_to_first_token_seconds_bucket", inf) == 2


async def test_stats_report_load_and_reset_keeps_the_cache(aiohttp_client: AiohttpClient) -> None:
    """/stats counts requests and tokens; /stats/reset zeroes them but the cache stays warm."""
    client = await _client(aiohttp_client)
    body = _chat("stats " * 100, max_tokens=4)
    for _ in range(3):
        async with client.post("/v1/chat/completions", json=body) as response:
            assert response.status == 200
    stats = await _stats(client)
    assert stats["pod"] == "pod-a"
    assert stats["requests_received"] == stats["requests_served"] == 3
    assert stats["requests_running"] == stats["requests_waiting"] == 0
    assert stats["generation_tokens"] == 12
    assert 0 < stats["cached_tokens"] < stats["prompt_tokens"]
    assert stats["hit_rate"] == pytest.approx(stats["cached_tokens"] / stats["prompt_tokens"])
    assert stats["steps"] >= 4 and stats["busy_s"] > 0
    assert stats["ttft_s"]["count"] == 3 and stats["ttft_s"]["p50"] > 0
    assert stats["kv_blocks_cached"] > 0 and stats["kv_usage"] == 0
    assert stats["preemptions"] == stats["recomputed_tokens"] == 0
    for key in ("peak_running", "peak_waiting", "e2e_s", "faults", "time_scale", "uptime_s"):
        assert key in stats
    async with client.post("/stats/reset") as response:
        reset = await response.json()
    assert reset["requests_received"] == reset["prompt_tokens"] == reset["steps"] == 0
    assert reset["ttft_s"]["count"] == 0
    assert reset["kv_blocks_cached"] == stats["kv_blocks_cached"]
    async with client.post("/v1/chat/completions", json=body) as response:
        assert (await response.json())["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert (await _stats(client))["hit_rate"] > 0.5


async def test_preemptions_are_reported(aiohttp_client: AiohttpClient) -> None:
    """A pool too small for two growing replies preempts one; both still get every token, and
    /stats and /metrics (vLLM's counter) count the preemption."""
    engine = EngineConfig(kv_cache_blocks=20, max_num_seqs=4)
    client = await _client(aiohttp_client, replace(FAST, engine=engine))
    prompts = ["".join(f"{seed}:{i};" for i in range(64))[:256] for seed in "ab"]  # 64 tokens
    body = {"model": DEFAULT_MODEL, "prompt": prompts, "max_tokens": 100}
    async with client.post("/v1/completions", json=body) as response:
        assert response.status == 200
        result = await response.json()
    assert [len(c["text"]) for c in result["choices"]] == [400, 400]
    assert result["usage"]["completion_tokens"] == 200
    stats = await _stats(client)
    assert stats["preemptions"] == 1 and 0 < stats["recomputed_tokens"] < 64
    assert stats["generation_tokens"] == 200 and stats["kv_blocks_used"] == 0
    async with client.get("/metrics") as response:
        text = await response.text()
    preemptions = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vllm:num_preemptions_total"
    ]
    assert preemptions == [1]


async def test_tokenize_counts_pseudo_tokens(aiohttp_client: AiohttpClient) -> None:
    """/tokenize answers vLLM's shape for a prompt or for chat messages."""
    client = await _client(aiohttp_client)
    payload = {"model": DEFAULT_MODEL, "prompt": "abcdefghij"}
    async with client.post("/tokenize", json=payload) as response:
        body = await response.json()
    assert body["count"] == 3 == len(body["tokens"])
    assert all(isinstance(t, int) for t in body["tokens"])
    assert body["max_model_len"] == 131_072
    chat = _chat("tokenize me")
    async with client.post("/tokenize", json=chat) as response:
        assert (await response.json())["count"] == count_tokens(render_chat(chat["messages"]))
    async with client.post("/tokenize", json={**payload, "model": "other"}) as response:
        assert response.status == 404


async def test_client_disconnect_aborts_the_sequence(aiohttp_client: AiohttpClient) -> None:
    """A client that goes away, streaming or not, frees its slot in the engine."""
    # A 1,000-token reply at full speed lasts ~5.6 s: only an abort ends it within the test.
    client = await _client(aiohttp_client, replace(FAST, time_scale=1.0))
    body = _chat(max_tokens=1000, stream=True)
    response = await client.post("/v1/chat/completions", json=body)
    await response.content.readline()
    assert (await _stats(client))["requests_running"] == 1
    response.close()
    await _wait_for(client, "requests_running", 0)

    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            "/v1/chat/completions",
            json=_chat(max_tokens=1000),
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    await _wait_for(client, "requests_aborted", 2)
    stats = await _stats(client)
    assert stats["requests_running"] == 0
    assert stats["requests_disconnected"] == 2
    assert stats["kv_blocks_used"] == 0


async def test_concurrent_requests_share_steps(aiohttp_client: AiohttpClient) -> None:
    """Simultaneous requests run in the same batch rather than one after another."""
    client = await _client(aiohttp_client, replace(FAST, time_scale=0.1))

    async def one(i: int) -> int:
        async with client.post("/v1/chat/completions", json=_chat(f"q{i}", max_tokens=20)) as r:
            return r.status

    assert await asyncio.gather(*(one(i) for i in range(8))) == [200] * 8
    stats = await _stats(client)
    assert stats["peak_running"] > 1
    assert stats["steps"] < 8 * 20


async def test_stepping_follows_the_wall_clock_without_drift(
    aiohttp_client: AiohttpClient,
) -> None:
    """100 steps of 2 simulated ms at scale 1 take about 200 ms: late wake-ups do not add up."""
    engine = EngineConfig(
        step_base_ms=2.0,
        kv_read_ms_per_token=0.0,
        prefill_ms_per_token=0.0,
        attn_ms_per_million_pairs=0.0,
    )
    client = await _client(aiohttp_client, replace(FAST, time_scale=1.0, engine=engine))
    start = time.monotonic()
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=100)) as response:
        assert response.status == 200
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed < 0.32, elapsed


async def test_an_idle_pod_burns_no_cpu(aiohttp_client: AiohttpClient) -> None:
    """Between requests the stepping loop sleeps instead of spinning."""
    client = await _client(aiohttp_client)
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=2)) as response:
        assert response.status == 200
    cpu = time.process_time()
    await asyncio.sleep(0.3)
    assert time.process_time() - cpu < 0.05


async def test_run_pods_hosts_independent_pods() -> None:
    """Several pods in one process have their own ports, names and caches."""
    async with run_pods(pod_configs(replace(FAST, name=None), 3)) as pods:
        assert len({p.port for p in pods}) == 3
        assert [p.name for p in pods] == [f"sim-{p.port}" for p in pods]
        async with aiohttp.ClientSession() as session:
            body = _chat("independent " * 50, max_tokens=2)
            cached = []
            for pod in (pods[0], pods[0], pods[1]):
                async with session.post(f"{pod.url}/v1/chat/completions", json=body) as r:
                    assert r.headers["x-sim-pod"] == pod.name
                    cached.append((await r.json())["usage"]["prompt_tokens_details"])
            assert [c["cached_tokens"] > 0 for c in cached] == [False, True, False]
            async with session.get(f"{pods[2].url}/health") as r:
                assert r.status == 200
        assert [p.pod.faults.config.seed for p in pods] == [0, 1, 2]


async def test_every_response_names_the_pod(aiohttp_client: AiohttpClient) -> None:
    """x-sim-pod is set on answers of every kind, unknown paths included."""
    client = await _client(aiohttp_client)
    for method, path in (("GET", "/nowhere"), ("GET", "/metrics"), ("POST", "/stats/reset")):
        async with client.request(method, path) as response:
            assert response.headers["x-sim-pod"] == "pod-a"


def test_command_line_sets_the_cost_model() -> None:
    """The engine flags of ``python -m loadtest.simserver`` reach the engine config; without
    them a pod runs the calibrated defaults."""
    parser = build_parser()
    (default,) = configs_from_args(parser.parse_args([]))
    assert default.engine == EngineConfig()
    argv = ["--pods", "2", "--step-base-ms", "5", "--kv-read-ms-per-token", "0.001"]
    argv += ["--prefill-ms-per-token", "0.02", "--attn-ms-per-million-pairs", "0"]
    configs = configs_from_args(parser.parse_args(argv))
    assert len(configs) == 2
    assert all(
        c.engine
        == EngineConfig(
            step_base_ms=5.0,
            kv_read_ms_per_token=0.001,
            prefill_ms_per_token=0.02,
            attn_ms_per_million_pairs=0.0,
        )
        for c in configs
    )
