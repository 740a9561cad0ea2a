"""The asyncio trace player and the run summary, against a fake SSE upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loadtest.player import normalize_base_url, play, poisson_arrivals
from loadtest.simserver import SimConfig, run_pods
from loadtest.stats import (
    RunResult,
    Sample,
    Slo,
    Window,
    load_samples,
    percentile,
    summarize,
    summarize_samples,
    write_samples,
)
from loadtest.trace import Conversation, TraceRecord
from loadtest.workloads import AGENT_SHAPE, agent

ServerFactory = Callable[..., Awaitable[TestServer]]
REPO = Path(__file__).resolve().parents[2]

FIRST_CHUNK_DELAY_S = 0.3
CHUNK_GAP_S = 0.02
CHUNKS = 5
CACHED_TOKENS = 16

BODIES = web.AppKey("bodies", list)
HEADERS = web.AppKey("headers", list)


def _chunk(content: str | None, *, usage: dict[str, Any] | None = None) -> bytes:
    chunk: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "choices": []}
    if content is not None:
        chunk["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    """Stream CHUNKS chunks, the first after a delay; the model name selects a failure mode.

    The first chunk echoes how many messages arrived, so tests can see the history grow.
    """
    body = await request.json()
    request.app[BODIES].append(body)
    request.app[HEADERS].append(request.headers)
    mode = body.get("model", "")
    if mode == "fail-500":
        return web.json_response({"error": {"message": "boom"}}, status=500)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "x-sim-pod": "pod-1",
            "x-balancer-endpoint": "10.0.0.1:8000",
        }
    )
    await response.prepare(request)  # headers go out before any token: TTFT must not stop here
    if mode == "hang":
        await asyncio.sleep(30)
    await asyncio.sleep(FIRST_CHUNK_DELAY_S if mode != "fast" else 0.0)
    count = len(body["messages"]) if "messages" in body else 0
    await response.write(b": keep-alive comment\n\n" + _chunk("") + _chunk(f"seen={count};"))
    for index in range(1, CHUNKS):
        await asyncio.sleep(CHUNK_GAP_S)
        await response.write(_chunk(f" t{index}"))
    if mode == "truncate":
        return response
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": CHUNKS,
        "total_tokens": 100 + CHUNKS,
        "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS},
    }
    await response.write(_chunk(None, usage=usage) + b"data: [DONE]\n\n")
    return response


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[BODIES].append(body)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for text in ("a", "b"):
        chunk = {"choices": [{"index": 0, "text": text}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


def _make_app() -> web.Application:
    app = web.Application()
    app[BODIES] = []
    app[HEADERS] = []
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    return app


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(_make_app(), host="127.0.0.1")


def _base(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


def _bodies(server: TestServer) -> list[dict[str, Any]]:
    return server.app[BODIES]


def _single(
    conversation_id: str = "c0", *, at: float = 0.0, model: str = "m", content: str = "hi"
) -> TraceRecord:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    return TraceRecord(conversation_id, 0, at, 0.0, False, body)


def _conversation(turns: int, *, think_s: float = 0.0, model: str = "m") -> list[TraceRecord]:
    records = [
        TraceRecord(
            "chat",
            0,
            0.0,
            0.0,
            False,
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "question 0"},
                ],
            },
        )
    ]
    for turn in range(1, turns):
        body = {"model": model, "messages": [{"role": "user", "content": f"question {turn}"}]}
        records.append(TraceRecord("chat", turn, 0.0, think_s, True, body))
    return records


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _no_player_tasks() -> bool:
    """No task of the player is left (the fake server's own handler tasks may still run)."""
    names = {task.get_name() for task in asyncio.all_tasks()}
    return not any(name == "scheduler" or name.startswith("conversation ") for name in names)


async def test_ttft_is_measured_to_the_first_content_chunk(upstream: TestServer) -> None:
    """TTFT counts to the first chunk with text, not to the headers or an empty chunk."""
    result = await play([_single()], _base(upstream))
    (sample,) = result.samples
    assert sample.ok, sample.error
    # Lower bound: the server sleeps this long after sending headers; upper bound is generous.
    assert FIRST_CHUNK_DELAY_S * 0.9 <= sample.ttft_s <= FIRST_CHUNK_DELAY_S + 1.0  # type: ignore[operator]
    assert len(sample.itl_s) == CHUNKS - 1
    assert all(CHUNK_GAP_S * 0.5 <= gap <= CHUNK_GAP_S + 0.5 for gap in sample.itl_s)
    assert sample.e2e_s is not None and sample.e2e_s >= sample.ttft_s  # type: ignore[operator]
    assert (sample.output_tokens, sample.prompt_tokens, sample.cached_tokens) == (CHUNKS, 100, 16)
    assert (sample.status, sample.pod, sample.endpoint) == (200, "pod-1", "10.0.0.1:8000")


async def test_requests_stream_with_usage_and_overrides(upstream: TestServer) -> None:
    """Bodies are sent streaming with usage, with model and max_tokens overridden when given."""
    await play([_single()], _base(upstream), model="fast", max_tokens=3)
    (body,) = _bodies(upstream)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"]) == ("fast", 3)


async def test_history_is_appended_with_the_replies_received(upstream: TestServer) -> None:
    """Each append turn sends the previous messages, the real reply and the new message."""
    result = await play(_conversation(3, model="fast"), _base(upstream))
    assert [s.ok for s in result.samples] == [True, True, True]
    first, second, third = _bodies(upstream)
    reply = "seen=2; t1 t2 t3 t4"
    assert second["messages"] == [
        *first["messages"],
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "question 1"},
    ]
    assert len(third["messages"]) == 6
    assert third["messages"][-2] == {"role": "assistant", "content": "seen=4; t1 t2 t3 t4"}


async def test_turns_wait_for_the_think_time(upstream: TestServer) -> None:
    """A later turn is sent its think time after the previous reply ended."""
    result = await play(_conversation(2, think_s=0.4, model="fast"), _base(upstream))
    first, second = result.samples
    assert first.end_s is not None and second.sent_s is not None
    gap = second.due_s - first.end_s
    assert 0.35 <= gap <= 1.5  # the think time, plus scheduling noise on a busy machine
    assert second.sent_s - second.due_s < 0.3


async def test_conversations_start_at_their_arrival_times(upstream: TestServer) -> None:
    """Arrivals are open loop: a conversation starts on time even while others are in flight."""
    trace = [_single(f"c{i}", at=0.25 * i) for i in range(3)]
    result = await play(trace, _base(upstream))
    for expected, sample in zip((0.0, 0.25, 0.5), result.samples, strict=True):
        assert sample.due_s == pytest.approx(expected, abs=0.01)  # the schedule, exactly
        assert sample.sent_s is not None
        assert expected - 0.01 <= sample.sent_s <= expected + 0.2


async def test_time_scale_compresses_arrivals(upstream: TestServer) -> None:
    """time_scale multiplies arrival times."""
    trace = [_single("a", model="fast"), _single("b", at=10.0, model="fast")]
    result = await play(trace, _base(upstream), time_scale=0.01)
    assert result.samples[1].due_s == pytest.approx(0.1, abs=0.01)


async def test_duration_bounds_the_run_and_leaves_no_tasks(upstream: TestServer) -> None:
    """No request starts after the deadline and the run returns promptly without stray tasks."""
    trace = [_single(f"c{i}", at=0.2 * i, model="fast") for i in range(100)]
    began = time.perf_counter()
    result = await play(trace, _base(upstream), duration_s=0.5)
    elapsed = time.perf_counter() - began
    assert elapsed < 2.0  # 0.5 s of arrivals plus one short request draining
    assert result.stopped_by == "duration"
    assert 2 <= len(result.samples) <= 4
    assert all(s.due_s < 0.5 for s in result.samples)
    assert _no_player_tasks()


async def test_requests_in_flight_after_grace_are_unfinished_with_their_age(
    upstream: TestServer,
) -> None:
    """A request that outlives deadline + grace is recorded as unfinished, aged, and counted as
    a failure and in the censored percentiles."""
    began = time.perf_counter()
    result = await play([_single(model="hang")], _base(upstream), duration_s=0.3, grace_s=0.2)
    assert time.perf_counter() - began < 2.0  # the server would hang for 30 s
    (sample,) = result.samples
    assert sample.outcome == "unfinished" and not sample.ok
    assert sample.e2e_s is not None and 0.45 <= sample.e2e_s <= 2.0
    summary = summarize(result)
    assert (summary["offered"], summary["completed"], summary["failed"],
            summary["unfinished"]) == (1, 0, 0, 1)  # fmt: skip
    assert summary["error_rate"] == 1.0
    assert summary["ttft_p99_s"] is None
    assert summary["ttft_p99_censored_s"] == sample.e2e_s
    assert _no_player_tasks()


async def test_max_requests_caps_the_requests_sent(upstream: TestServer) -> None:
    """max_requests stops the run after that many requests, letting them finish."""
    trace = [_single(f"c{i}", model="fast") for i in range(10)]
    result = await play(trace, _base(upstream), max_requests=3, concurrency=2)
    assert len(result.samples) == 3
    assert all(s.ok for s in result.samples)
    assert result.stopped_by == "max-requests"
    assert len(_bodies(upstream)) == 3


async def test_a_wait_in_the_client_is_part_of_the_latency(upstream: TestServer) -> None:
    """With one slot and a slow server, the second request waits for the first: the wait is
    in its TTFT and E2E (counted from when it was due), and the run says the cap bound."""
    trace = [_single("a"), _single("b")]
    result = await play(trace, _base(upstream), concurrency=1)
    first, second = sorted(result.samples, key=lambda s: s.sent_s or 0.0)
    assert second.wait_s is not None and second.wait_s >= FIRST_CHUNK_DELAY_S * 0.9
    assert second.ttft_s is not None and first.ttft_s is not None
    # The second waited a whole first request, then its own first-chunk delay.
    assert second.ttft_s >= second.wait_s + FIRST_CHUNK_DELAY_S * 0.9
    assert second.ttft_s >= 2 * FIRST_CHUNK_DELAY_S * 0.9
    assert second.e2e_s is not None and second.e2e_s > second.ttft_s
    summary = summarize(result)
    assert summary["wait_max_s"] == second.wait_s
    assert (summary["peak_in_flight"], summary["concurrency_cap"], summary["cap_bound"]) == (
        1, 1, True)  # fmt: skip


async def test_every_request_due_is_accounted_for(upstream: TestServer) -> None:
    """offered = completed + failed + unfinished, with each failure under its cause, even when
    the cap leaves a due request unsent at the end."""
    trace = [
        _single("ok", model="fast"),
        _single("http", model="fail-500"),
        _single("stream", model="truncate"),
        _single("hang1", model="hang"),
        _single("hang2", at=0.05, model="hang"),
        _single("late", at=5.0, model="fast"),  # due after the deadline: never offered
    ]
    result = await play(trace, _base(upstream), duration_s=0.6, grace_s=0.3, concurrency=4)
    summary = summarize(result)
    assert summary["offered"] == 5
    assert summary["offered"] == (
        summary["completed"] + summary["failed"] + summary["unfinished"])
    assert summary["completed"] == 1
    assert summary["failed_by"] == {"http": 1, "stream": 1}
    assert summary["unfinished"] == 2
    outcomes = {s.conversation_id: s.outcome for s in result.samples}
    assert outcomes == {"ok": "ok", "http": "http", "stream": "stream", "hang1": "unfinished",
                        "hang2": "unfinished"}


async def test_a_request_never_sent_is_unfinished_and_unsent(upstream: TestServer) -> None:
    """A request due while the only slot is taken until the end is offered but never sent."""
    trace = [_single("hang", model="hang"), _single("queued", at=0.05, model="fast")]
    result = await play(trace, _base(upstream), duration_s=0.3, grace_s=0.2, concurrency=1)
    queued = next(s for s in result.samples if s.conversation_id == "queued")
    assert queued.outcome == "unfinished" and queued.sent_s is None
    assert queued.e2e_s is not None and queued.e2e_s >= 0.4
    summary = summarize(result)
    assert (summary["offered"], summary["sent"], summary["unsent"]) == (2, 1, 1)


async def test_errors_are_recorded_not_raised(upstream: TestServer) -> None:
    """HTTP errors, truncated streams and timeouts become samples and end the conversation."""
    failing = _conversation(2, model="fail-500")
    truncated = [_single("t", model="truncate")]
    slow = [_single("s", model="hang")]
    result = await play([*failing, *truncated, *slow], _base(upstream), request_timeout_s=0.5)
    errors = {s.conversation_id: s.error for s in result.samples}
    causes = {s.conversation_id: s.outcome for s in result.samples}
    assert causes == {"chat": "http", "t": "stream", "s": "timeout"}
    assert len(result.samples) == 3  # the failed conversation's second turn is never sent
    assert errors["chat"] is not None and errors["chat"].startswith("HTTP 500")
    assert errors["t"] == "stream ended before [DONE]"
    assert errors["s"] is not None and errors["s"].startswith("timeout")
    assert summarize(result)["failed"] == 3


async def test_connection_refused_is_an_error_sample() -> None:
    """A server that is not there gives an error sample with no status."""
    result = await play([_single()], f"http://127.0.0.1:{_unused_port()}/v1")
    (sample,) = result.samples
    assert sample.status is None and sample.error is not None
    assert sample.outcome == "connect"


async def test_completions_bodies_use_the_completions_endpoint(upstream: TestServer) -> None:
    """A body with a prompt is streamed from /completions; tokens are counted from chunks."""
    record = TraceRecord("p", 0, 0.0, 0.0, False, {"model": "m", "prompt": "once"})
    result = await play([record], _base(upstream))
    (sample,) = result.samples
    assert sample.ok and sample.output_tokens == 2 and sample.ttft_s is not None


async def test_conversations_and_headers(upstream: TestServer) -> None:
    """play() takes Conversation objects; extra headers and the session header are sent."""
    record = _single("conv-7", model="fast")
    result = await play(
        [Conversation("conv-7", 0.0, (record,))],
        f"http://127.0.0.1:{upstream.port}",
        headers={"x-extra": "1"},
        session_header="x-session-id",
    )
    assert result.samples[0].ok
    (headers,) = upstream.app[HEADERS]
    assert (headers.get("x-session-id"), headers.get("x-extra")) == ("conv-7", "1")


def test_base_url_gets_v1_only_without_a_path() -> None:
    """A bare host gets /v1; a URL with a path keeps it."""
    assert normalize_base_url("http://h:1") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/openai/v1") == "http://h:1/openai/v1"
    with pytest.raises(ValueError):
        normalize_base_url("h:1")


# --- stats ------------------------------------------------------------------------------------


def test_percentiles_are_exact_and_interpolated() -> None:
    """Percentiles interpolate linearly between ranks, as NumPy's default does."""
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([0.123456789], 90) == 0.123456789
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summary_keys_and_figures() -> None:
    """The summary is JSON-serializable and counts outcomes, tokens, cache share and endpoints."""
    samples = [
        Sample("a", 0, 0.0, sent_s=0.0, ttft_s=0.1, e2e_s=1.0, itl_s=[0.01, 0.03],
               output_tokens=10, prompt_tokens=100, cached_tokens=50, status=200,
               endpoint="e1", pod="p1"),
        Sample("b", 0, 0.5, sent_s=0.5, ttft_s=0.3, e2e_s=2.0, itl_s=[0.02], output_tokens=30,
               prompt_tokens=100, cached_tokens=0, status=200, endpoint="e1", pod="p1"),
        Sample("c", 0, 0.7, sent_s=0.8, ttft_s=0.2, e2e_s=1.5, output_tokens=20, status=200,
               endpoint="e2"),
        Sample("d", 0, 0.9, sent_s=0.9, e2e_s=0.1, status=500, outcome="http",
               error="HTTP 500: boom"),
        Sample("e", 0, 1.0, sent_s=1.0, e2e_s=3.0, outcome="unfinished",
               error="unfinished: the run ended"),
    ]  # fmt: skip
    result = RunResult(samples, wall_s=4.0, window_end_s=2.0, stopped_by="duration")
    summary = summarize(result)
    json.dumps(summary)
    assert (summary["offered"], summary["completed"], summary["failed"],
            summary["unfinished"]) == (5, 3, 1, 1)  # fmt: skip
    assert summary["failed_by"] == {"http": 1}
    assert summary["error_rate"] == 0.4
    assert summary["ttft_p50_s"] == 0.2
    assert summary["ttft_p90_s"] == pytest.approx(0.28)
    assert summary["ttft_p99_censored_s"] == pytest.approx(2.919)  # the unfinished one at 3 s
    assert summary["itl_p50_s"] == 0.02
    assert summary["e2e_p99_s"] == pytest.approx(1.99)
    assert summary["wait_max_s"] == pytest.approx(0.1)
    assert summary["window_s"] == 2.0
    assert summary["requests_per_s"] == 1.5
    assert summary["offered_per_s"] == 2.5
    assert summary["output_tokens_per_s"] == 30.0
    assert summary["cached_token_share"] == 0.25
    assert summary["per_endpoint"] == {"e1": 2, "e2": 1}
    assert summary["per_pod"] == {"p1": 2}
    assert summary["endpoint_imbalance"] == pytest.approx(2 / 1.5)
    assert summary["error_kinds"] == {"HTTP 500: boom": 1, "unfinished: the run ended": 1}
    assert summary["stopped_by"] == "duration"
    # Goodput: TTFT within 0.25 s and mean ITL within 25 ms leaves a (ITL 20 ms, TTFT 0.1 s)
    # and c (no gaps, TTFT 0.2 s); b misses the TTFT bound.
    tight = summarize(result, slo=Slo(ttft_s=0.25, itl_s=0.025))
    assert tight["goodput_per_s"] == 1.0 and tight["goodput_share"] == 0.4


def test_warmup_and_cooldown_leave_requests_out_by_due_time() -> None:
    """Only requests due in [warm-up, end - cool-down) are counted, whatever their outcome."""
    samples = [Sample(f"c{i}", 0, float(i), sent_s=float(i), ttft_s=0.1 * (i + 1), e2e_s=1.0)
               for i in range(10)]
    result = RunResult(samples, wall_s=12.0, window_end_s=10.0)
    summary = summarize(result, warmup_s=2.0, cooldown_s=3.0)
    assert summary["offered"] == 5  # due at 2, 3, 4, 5, 6
    assert summary["ttft_p50_s"] == pytest.approx(0.5)
    assert summary["window_s"] == 5.0 and summary["warmup_s"] == 2.0
    assert summarize(result)["offered"] == 10


def test_samples_round_trip_through_json_lines(tmp_path: Path) -> None:
    """write_samples writes one JSON object per sample, extra keys included."""
    samples = [Sample("a", 1, 0.5, sent_s=0.6, ttft_s=0.2, e2e_s=1.0, itl_s=[0.1]),
               Sample("b", 0, 0.7, outcome="unfinished", error="x", e2e_s=2.0)]
    path = tmp_path / "samples.jsonl"
    with path.open("w") as f:
        assert write_samples(samples, f, contender="chwbl") == 2
    lines = load_samples(path)
    assert [line["contender"] for line in lines] == ["chwbl", "chwbl"]
    restored = [Sample.from_json({k: v for k, v in line.items() if k != "contender"})
                for line in lines]
    assert restored == samples


def test_summary_of_nothing_has_no_figures() -> None:
    """An empty run summarizes to zeros and Nones, not exceptions."""
    summary = summarize_samples([], Window(0.0, 0.0))
    assert summary["offered"] == 0 and summary["ttft_p50_s"] is None
    assert summary["requests_per_s"] is None and summary["cached_token_share"] is None


# --- the command ------------------------------------------------------------------------------


def test_poisson_arrivals_keep_order_and_rate() -> None:
    """Re-timed conversations keep their order; the mean gap is about 1/rate."""
    conversations = [Conversation(f"c{i}", 100.0 - i, ()) for i in range(2000)]
    timed = poisson_arrivals(conversations, 10.0, seed=3)
    assert [c.conversation_id for c in timed] == [c.conversation_id for c in conversations]
    assert timed[0].at == 0.0
    assert all(a.at <= b.at for a, b in itertools.pairwise(timed))
    assert timed[-1].at / (len(timed) - 1) == pytest.approx(0.1, rel=0.1)
    assert poisson_arrivals(conversations, 10.0, seed=3) == timed


async def test_an_agent_session_plays_through_a_simulated_pod() -> None:
    """An agent session (system prompt and tools, a task, then tool results appended after the
    replies actually received) plays through a simulated pod: every turn completes, and each
    later turn finds the previous turn's whole prompt cached."""
    shape = replace(
        AGENT_SHAPE, system_tokens=(300, 400), tools=(3, 3), turns=(4, 4),
        tool_result_tokens=(20, 40), think_range_s=(0.01, 0.02),
    )  # fmt: skip
    records = agent(1, conversations=1, shape=shape)
    assert all(record.body["tools"] for record in records)
    async with run_pods([SimConfig(time_scale=0.01)]) as pods:
        result = await play(records, pods[0].url, max_tokens=8)
        served = pods[0].pod.stats()["requests_served"]
    samples = sorted(result.samples, key=lambda s: s.turn)
    assert [s.turn for s in samples] == [0, 1, 2, 3] and served == 4
    assert all(s.ok and s.output_tokens == 8 for s in samples), [s.error for s in samples]
    for earlier, later in itertools.pairwise(samples):
        assert earlier.prompt_tokens is not None and later.prompt_tokens is not None
        assert later.prompt_tokens > earlier.prompt_tokens + 8 + 20  # reply and tool result
        assert later.cached_tokens is not None
        assert later.cached_tokens >= earlier.prompt_tokens - 16  # all but a partial block


def test_the_player_command_replays_a_trace_against_two_simulated_pods(tmp_path: Path) -> None:
    """``python -m loadtest.player`` replays a generated trace against two simulated pods (a
    random one per request) and writes the table, the summary and one sample per request."""
    trace = tmp_path / "trace.jsonl"
    subprocess.run(
        [sys.executable, "-m", "loadtest.workloads", "multi-turn", "--seed", "2",
         "--conversations", "6", "--rate", "4", "--turns", "2-3", "--think-mean", "0.5",
         "--out", str(trace)],
        cwd=REPO, check=True, capture_output=True, timeout=30)
    with _simulated_pods(2) as urls:
        out = tmp_path / "out"
        done = subprocess.run(
            [sys.executable, "-m", "loadtest.player", "--trace", str(trace), "--url", urls[0],
             "--url", urls[1],
             "--rate-scale", "2", "--max-tokens", "8", "--temperature", "0", "--ignore-eos",
             "--out", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    lines = load_samples(out / "samples.jsonl")
    assert summary["offered"] == len(lines) > 0
    assert summary["completed"] == summary["offered"], summary["error_kinds"]
    assert summary["ttft_p50_s"] > 0
    assert len(summary["per_pod"]) == 2  # each request went to one of the two URLs
    assert "| offered | sent | completed |" in (out / "summary.md").read_text()
    assert "offered" in done.stdout


@contextlib.contextmanager
def _simulated_pods(count: int) -> Iterator[list[str]]:
    """``python -m loadtest.simserver`` with ``count`` pods on 127.0.0.1, fast time."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest.simserver", "--pods", str(count), "--port", "0",
         "--time-scale", "0.1", "--log-level", "info"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        urls: list[str] = []
        deadline = time.monotonic() + 20
        assert process.stdout is not None
        while len(urls) < count and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                urls.append(match.group(1))
        assert len(urls) == count, "the simulated pods did not start"
        yield urls
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
