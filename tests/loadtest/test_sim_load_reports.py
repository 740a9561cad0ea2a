"""Load reports of the simulated pod over real sockets on 127.0.0.1: ORCA headers in band,
/metrics under vLLM's or SGLang's names, or no /metrics at all."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from loadtest.simserver import DEFAULT_MODEL, EngineConfig, SimConfig, build_app
from loadtest.simserver.__main__ import build_parser, configs_from_args
from loadtest.simserver.orca import load_report

# One simulated second lasts 10 ms: a default 128-token reply takes ~7 ms of wall time.
FAST = SimConfig(name="pod-a", time_scale=0.01)

ASK = "endpoint-load-metrics-format"
REPORT = "endpoint-load-metrics"

IDLE_TEXT = "TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.0"
IDLE_JSON = 'JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}}'

Client = TestClient[Any, Any]


async def _client(aiohttp_client: AiohttpClient, config: SimConfig = FAST) -> Client:
    return await aiohttp_client(build_app(config))


def _chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": content}], **extra}


def _parse(value: str) -> dict[str, float]:
    """Named metrics of an ``endpoint-load-metrics`` value in either format."""
    kind, _, rest = value.partition(" ")
    if kind == "JSON":
        named: dict[str, float] = json.loads(rest)["named_metrics"]
        return named
    assert kind == "TEXT", value
    pairs = (item.split("=", 1) for item in rest.split(", "))
    return {name.removeprefix("named_metrics."): float(v) for name, v in pairs}


async def _metrics(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with client.get("/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- the header's format ----------------------------------------------------------------------


def test_text_and_json_reports_use_python_float_reprs() -> None:
    """Values print as Python floats (``3.0``, ``1e-05``), comma and space separated in text."""
    metrics = [("num_requests_waiting", 3.0), ("kv_cache_usage_perc", 1e-05)]
    assert load_report("text", metrics) == (
        "TEXT named_metrics.num_requests_waiting=3.0, named_metrics.kv_cache_usage_perc=1e-05"
    )
    assert load_report("json", metrics) == (
        'JSON {"named_metrics": {"num_requests_waiting": 3.0, "kv_cache_usage_perc": 1e-05}}'
    )


@pytest.mark.parametrize("fmt", ["", "xml", "prometheus", "text, json", "TEXT "])
def test_an_unsupported_format_gets_no_report(fmt: str) -> None:
    """Only "text" and "json" (any case) name a format."""
    assert load_report(fmt, [("num_requests_waiting", 0.0)]) is None


# -- in-band reports over HTTP ----------------------------------------------------------------


async def test_a_non_streamed_chat_answer_carries_a_text_report(
    aiohttp_client: AiohttpClient,
) -> None:
    """A chat request asking for text gets vLLM's two named metrics, read once it finished."""
    client = await _client(aiohttp_client)
    body = _chat(max_tokens=4)
    async with client.post("/v1/chat/completions", json=body, headers={ASK: "text"}) as r:
        assert r.status == 200
        assert r.headers[REPORT] == IDLE_TEXT


async def test_a_non_streamed_completion_carries_a_json_report(
    aiohttp_client: AiohttpClient,
) -> None:
    """A completion request asking for json gets the same metrics as a JSON object."""
    client = await _client(aiohttp_client)
    body = {"model": DEFAULT_MODEL, "prompt": "Once upon a time", "max_tokens": 4}
    async with client.post("/v1/completions", json=body, headers={ASK: "json"}) as r:
        assert r.status == 200
        assert r.headers[REPORT] == IDLE_JSON


@pytest.mark.parametrize(("fmt", "expected"), [("TEXT", IDLE_TEXT), ("Json", IDLE_JSON)])
async def test_the_format_is_case_insensitive(
    aiohttp_client: AiohttpClient, fmt: str, expected: str
) -> None:
    """``TEXT`` and ``Json`` ask for the same reports as ``text`` and ``json``."""
    client = await _client(aiohttp_client)
    async with client.post(
        "/v1/chat/completions", json=_chat(max_tokens=2), headers={ASK: fmt}
    ) as r:
        assert r.headers[REPORT] == expected


@pytest.mark.parametrize("headers", [{}, {ASK: ""}, {ASK: "xml"}, {ASK: "binary"}])
async def test_no_report_unless_asked_in_a_supported_format(
    aiohttp_client: AiohttpClient, headers: dict[str, str]
) -> None:
    """Without the request header, or with a format other than text or json, the answer has
    no report and is otherwise normal."""
    client = await _client(aiohttp_client)
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=2), headers=headers) as r:
        assert r.status == 200
        assert REPORT not in r.headers
        assert (await r.json())["usage"]["completion_tokens"] == 2


async def test_errors_carry_no_report(aiohttp_client: AiohttpClient) -> None:
    """A refused request (unknown model) gets no report, as in vLLM."""
    client = await _client(aiohttp_client)
    body = {**_chat(max_tokens=2), "model": "no-such-model"}
    async with client.post("/v1/chat/completions", json=body, headers={ASK: "text"}) as r:
        assert r.status == 404
        assert REPORT not in r.headers


async def test_a_stream_carries_no_report_by_default(aiohttp_client: AiohttpClient) -> None:
    """vLLM reports on non-streamed answers only, so a streamed one has no header."""
    client = await _client(aiohttp_client)
    body = _chat(max_tokens=3, stream=True)
    async with client.post("/v1/chat/completions", json=body, headers={ASK: "text"}) as r:
        assert r.status == 200
        assert REPORT not in r.headers
        await r.read()


async def test_orca_streams_reports_as_the_stream_starts(aiohttp_client: AiohttpClient) -> None:
    """With orca_streams, a stream's head is read just after its request was queued: it counts
    itself as waiting; orca_running adds the running count first."""
    config = replace(FAST, orca_streams=True, orca_running=True)
    client = await _client(aiohttp_client, config)
    body = _chat(max_tokens=3, stream=True)
    async with client.post("/v1/chat/completions", json=body, headers={ASK: "text"}) as r:
        assert r.headers[REPORT] == (
            "TEXT named_metrics.num_requests_running=0.0,"
            " named_metrics.num_requests_waiting=1.0, named_metrics.kv_cache_usage_perc=0.0"
        )
        await r.read()


async def test_a_request_queued_behind_others_reports_them_waiting(
    aiohttp_client: AiohttpClient,
) -> None:
    """With one sequence at a time, answers that finish while others queue report them: the
    first to finish sees the two still queued behind the next one (the next is admitted in the
    step right after, before the answer's head is made)."""
    engine = EngineConfig(max_num_seqs=1)
    config = replace(FAST, time_scale=0.1, engine=engine, orca_running=True)
    client = await _client(aiohttp_client, config)

    async def one(i: int) -> dict[str, float]:
        # ~80 ms each at this time scale: all four arrive while the first runs.
        body = _chat(f"queued {i}", max_tokens=100)
        async with client.post("/v1/chat/completions", json=body, headers={ASK: "json"}) as r:
            assert r.status == 200
            return _parse(r.headers[REPORT])

    reports = await asyncio.gather(*(one(i) for i in range(4)))
    assert sorted(r["num_requests_waiting"] for r in reports) == [0.0, 0.0, 1.0, 2.0]
    assert all(r["num_requests_running"] <= 1.0 for r in reports)
    assert all(0.0 <= r["kv_cache_usage_perc"] <= 1.0 for r in reports)


async def test_a_stream_queued_behind_a_running_one_counts_the_queue(
    aiohttp_client: AiohttpClient,
) -> None:
    """With orca_streams and one sequence at a time, each new stream's report counts the
    streams queued before it and itself, while the first one runs."""
    engine = EngineConfig(max_num_seqs=1)
    config = replace(FAST, time_scale=0.1, engine=engine, orca_streams=True, orca_running=True)
    client = await _client(aiohttp_client, config)
    body = _chat(max_tokens=500, stream=True)
    responses: list[aiohttp.ClientResponse] = []
    try:
        first = await client.post("/v1/chat/completions", json=body, headers={ASK: "text"})
        responses.append(first)
        await first.content.readline()  # the first token: this stream is running
        seen = []
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=body, headers={ASK: "text"})
            responses.append(r)
            seen.append(_parse(r.headers[REPORT]))
        assert [(s["num_requests_running"], s["num_requests_waiting"]) for s in seen] == [
            (1.0, 1.0),
            (1.0, 2.0),
        ]
        assert all(s["kv_cache_usage_perc"] > 0.0 for s in seen)
    finally:
        for r in responses:
            r.close()


async def test_no_orca_never_reports(aiohttp_client: AiohttpClient) -> None:
    """A pod without ORCA support ignores the request header on streams and answers alike."""
    client = await _client(aiohttp_client, replace(FAST, orca=False, orca_streams=True))
    for stream in (False, True):
        body = _chat(max_tokens=2, stream=stream)
        async with client.post("/v1/chat/completions", json=body, headers={ASK: "text"}) as r:
            assert r.status == 200
            assert REPORT not in r.headers
            await r.read()


# -- /metrics flavours ------------------------------------------------------------------------


async def test_sglang_flavour_serves_sglang_names(aiohttp_client: AiohttpClient) -> None:
    """/metrics has SGLang's load gauges and histograms with a model_name label, no vLLM names."""
    client = await _client(aiohttp_client, replace(FAST, metrics_flavor="sglang"))
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=3)) as r:
        assert r.status == 200
    samples = await _metrics(client)
    label = (("model_name", DEFAULT_MODEL),)
    assert samples[("sglang:num_running_reqs", label)] == 0
    assert samples[("sglang:num_queue_reqs", label)] == 0
    assert samples[("sglang:token_usage", label)] == 0
    assert samples[("sglang:generation_tokens_total", label)] == 3
    assert samples[("sglang:time_to_first_token_seconds_count", label)] == 1
    assert not [name for name, _ in samples if name.startswith("vllm:")]


async def test_sglang_flavour_counts_the_queue(aiohttp_client: AiohttpClient) -> None:
    """While one stream runs alone, a second one shows in sglang:num_queue_reqs."""
    engine = EngineConfig(max_num_seqs=1)
    config = replace(FAST, time_scale=0.1, engine=engine, metrics_flavor="sglang")
    client = await _client(aiohttp_client, config)
    body = _chat(max_tokens=500, stream=True)
    first = await client.post("/v1/chat/completions", json=body)
    second = await client.post("/v1/chat/completions", json=body)
    try:
        await first.content.readline()
        samples = await _metrics(client)
        label = (("model_name", DEFAULT_MODEL),)
        assert samples[("sglang:num_running_reqs", label)] == 1
        assert samples[("sglang:num_queue_reqs", label)] == 1
        assert 0 < samples[("sglang:token_usage", label)] <= 1
    finally:
        first.close()
        second.close()


async def test_metrics_flavour_none_serves_no_metrics(aiohttp_client: AiohttpClient) -> None:
    """A pod that reports nothing answers /metrics with 404 and still serves completions."""
    client = await _client(aiohttp_client, replace(FAST, metrics_flavor="none"))
    async with client.get("/metrics") as r:
        assert r.status == 404
        assert r.headers["x-sim-pod"] == "pod-a"
    async with client.post("/v1/chat/completions", json=_chat(max_tokens=2)) as r:
        assert r.status == 200


def test_an_unknown_metrics_flavour_is_refused() -> None:
    """SimConfig checks the flavour name."""
    with pytest.raises(ValueError, match="metrics_flavor"):
        SimConfig(metrics_flavor="tgi")  # type: ignore[arg-type]


def test_command_line_sets_load_reports() -> None:
    """The load-report flags reach the config; without them a pod answers ORCA as vLLM does."""
    parser = build_parser()
    (default,) = configs_from_args(parser.parse_args([]))
    assert (default.orca, default.orca_running, default.orca_streams) == (True, False, False)
    assert default.metrics_flavor == "vllm"
    argv = ["--no-orca", "--orca-running", "--orca-streams", "--metrics-flavor", "sglang"]
    (config,) = configs_from_args(parser.parse_args(argv))
    assert (config.orca, config.orca_running, config.orca_streams) == (False, True, True)
    assert config.metrics_flavor == "sglang"
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-flavor", "tgi"])
