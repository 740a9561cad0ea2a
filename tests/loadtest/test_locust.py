"""Short headless Locust runs (as subprocesses) against a fake SSE upstream on 127.0.0.1.

Locust monkey-patches the standard library with gevent, so it never runs inside pytest.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loadtest.procs import free_port
from loadtest.trace import TraceRecord, dump_trace

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
LOCUST = Path(sys.executable).with_name("locust")
RUN_SECONDS = 6
RUN_TIMEOUT_S = 40  # locust start-up plus the run plus slack on a busy machine
FIRST_CHUNK_DELAY_S = 0.1
CHUNKS = 4
USERS = 4
SESSION_HEADER = "x-session-id"

SEEN = web.AppKey("seen", list[int])
BAD_HISTORIES = web.AppKey("bad_histories", list[list[dict[str, str]]])
BODIES = web.AppKey("bodies", list[dict[str, Any]])
FIRST_TURNS = web.AppKey("first_turns", list[tuple[str | None, str]])
"""(session header, last user message) of every request without an assistant message."""

ServerFactory = Callable[..., Awaitable[TestServer]]


def _data(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _reply(messages: int) -> str:
    """The reply to a request carrying ``messages`` messages: CHUNKS words."""
    return " ".join([f"r{messages}"] + ["t"] * (CHUNKS - 1))


async def _chat(request: web.Request) -> web.StreamResponse:
    """Reply ``r<N>`` to a request with N messages, and check earlier replies came back.

    An assistant message at index i must be the reply to the request that had i messages.
    """
    body = await request.json()
    messages = body["messages"]
    request.app[SEEN].append(len(messages))
    request.app[BODIES].append(body)
    if all(message["role"] != "assistant" for message in messages):
        opening = (request.headers.get(SESSION_HEADER), messages[-1]["content"])
        request.app[FIRST_TURNS].append(opening)
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and message["content"] != _reply(index):
            request.app[BAD_HISTORIES].append(messages)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "x-sim-pod": "pod-0"}
    )
    await response.prepare(request)
    await asyncio.sleep(FIRST_CHUNK_DELAY_S)
    await response.write(_data({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
    first, *rest = _reply(len(messages)).split(" ")[:CHUNKS]
    await response.write(_data({"choices": [{"index": 0, "delta": {"content": first}}]}))
    for word in rest:
        await asyncio.sleep(0.01)
        await response.write(_data({"choices": [{"index": 0, "delta": {"content": " " + word}}]}))
    usage = {
        "prompt_tokens": 50,
        "completion_tokens": CHUNKS,
        "prompt_tokens_details": {"cached_tokens": 25},
    }
    await response.write(_data({"choices": [], "usage": usage}) + b"data: [DONE]\n\n")
    return response


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> TestServer:
    app = web.Application()
    app[SEEN] = []
    app[BAD_HISTORIES] = []
    app[BODIES] = []
    app[FIRST_TURNS] = []
    app.router.add_post("/v1/chat/completions", _chat)
    return await aiohttp_server(app, host="127.0.0.1")


async def _locust(cwd: Path, host: str, *args: str) -> str:
    """Run a short headless Locust and return its output; fails on a non-zero exit.

    Locust runs in a session of its own, so a timeout kills it with every worker it forked.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = await asyncio.create_subprocess_exec(
        str(LOCUST),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u", str(USERS),
        "-r", str(USERS),
        "-t", f"{RUN_SECONDS}s",
        "--host", host,
        "--loglevel", "WARNING",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    return text


def _stats_rows(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", encoding="utf-8") as rows:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(rows)}


def _count(rows: dict[tuple[str, str], dict[str, str]], name: str) -> int:
    return int(rows["SSE", name]["Request Count"])


def _samples(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_accounting(summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """The summary counts exactly the samples due in its window, each once."""
    start, end = summary["warmup_s"], summary["warmup_s"] + summary["window_s"]
    in_window = [s for s in samples if start <= s["due_s"] < end]
    assert summary["offered"] == len(in_window)
    assert summary["offered"] == summary["completed"] + summary["failed"] + summary["unfinished"]
    assert summary["completed"] == sum(1 for s in in_window if s["outcome"] == "ok")
    assert summary["unfinished"] == sum(1 for s in in_window if s["outcome"] == "unfinished")
    for sample in samples:
        assert sample["due_s"] == sample["sent_s"]  # closed loop: due when sent


async def test_multi_turn_run_reports_ttft_and_appends_replies(
    upstream: TestServer, tmp_path: Path
) -> None:
    """A generated multi-turn run: TTFT and per-gap ITL rows, an exact summary that accounts
    for every sample, no failures, real histories, the body overrides sent."""
    summary_file = tmp_path / "out" / "summary.json"
    samples_file = tmp_path / "out" / "samples.jsonl"
    output = await _locust(
        REPO,
        f"http://127.0.0.1:{upstream.port}",  # no /v1: the locustfile adds it
        "--workload", "multi-turn",
        "--seed", "3",
        "--max-tokens", "8",
        "--model", "fake",
        "--temperature", "0",
        "--ignore-eos",
        "--summary-file", str(summary_file),
        "--samples-file", str(samples_file),
        "--csv", str(tmp_path / "run"),
    )  # fmt: skip
    assert "Exact summary (raw samples of 1 process" in output
    assert "ITL (per gap)" in output
    summary = json.loads(summary_file.read_text())
    assert summary["failed"] == 0 and summary["completed"] >= 8, summary["error_kinds"]
    assert summary["unfinished"] <= USERS  # at most the requests in flight at the stop
    assert summary["workers"] == 1 and summary["seeds"] == [3]
    assert summary["body_overrides"] == {"temperature": 0.0, "ignore_eos": True}
    # Lower bound: the fake waits this long before the first token; upper bound is generous.
    assert FIRST_CHUNK_DELAY_S * 0.9 <= summary["ttft_p50_s"] <= FIRST_CHUNK_DELAY_S + 1.0
    assert summary["ttft_p99_s"] >= summary["ttft_p50_s"]
    assert summary["itl_p50_s"] is not None and summary["output_tokens_per_s"] > 0
    assert summary["cached_token_share"] == 0.5
    assert summary["per_pod"] == {"pod-0": summary["completed"]}
    samples = _samples(samples_file)
    _check_accounting(summary, samples)
    assert {s["worker"] for s in samples} == {0}
    assert not any(s["conversation_id"].startswith("w") for s in samples)  # one process: as is
    ok = [s for s in samples if s["outcome"] == "ok"]
    rows = _stats_rows(tmp_path / "run")
    for name in ("TTFT", "ITL", "E2E"):
        assert int(rows["SSE", name]["Failure Count"]) == 0
    assert float(rows["SSE", "TTFT"]["Average Content Size"]) == CHUNKS  # output tokens
    # One ITL row per gap between content chunks, one TTFT and one E2E row per reply.
    assert _count(rows, "ITL") == sum(len(s["itl_s"]) for s in ok) == (CHUNKS - 1) * len(ok)
    assert _count(rows, "TTFT") == _count(rows, "E2E") == len(ok)
    assert 5 <= float(rows["SSE", "ITL"]["Median Response Time"]) < 100  # a gap, not a sum
    bodies = upstream.app[BODIES]
    assert bodies and all(b["temperature"] == 0 and b["ignore_eos"] is True for b in bodies)
    assert all(b["max_tokens"] == 8 and b["model"] == "fake" for b in bodies)
    seen = upstream.app[SEEN]
    assert max(seen) >= 4  # later turns carried the history
    assert upstream.app[BAD_HISTORIES] == []


async def test_trace_run_from_another_directory(upstream: TestServer, tmp_path: Path) -> None:
    """A trace file plays from outside the repository, with /v1 in the host; the warm-up
    leaves the first second out of the summary but not out of the samples file."""
    trace = tmp_path / "trace.jsonl"
    first = {"model": "m", "temperature": 0.7, "messages": [{"role": "user", "content": "hello"}]}
    follow = {"model": "m", "messages": [{"role": "user", "content": "and then?"}]}
    dump_trace(
        [
            TraceRecord("a", 0, 0.0, 0.0, False, first),
            TraceRecord("a", 1, 0.0, 0.05, True, follow),
            TraceRecord("b", 0, 0.5, 0.0, False, first),
        ],
        trace,
    )
    output = await _locust(
        tmp_path,
        f"http://127.0.0.1:{upstream.port}/v1",
        "--workload", "trace",
        "--trace-file", str(trace),
        "--warmup", "1",
        "--summary-file", "summary.json",
        "--samples-file", "samples.jsonl",
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["completed"] >= 6, output
    assert summary["ttft_p90_s"] is not None
    assert summary["warmup_s"] == 1.0
    samples = _samples(tmp_path / "samples.jsonl")
    _check_accounting(summary, samples)
    assert any(s["due_s"] < 1.0 for s in samples)  # kept in the file, left out of the summary
    assert summary["offered"] < len(samples)
    seen: list[int] = upstream.app[SEEN]
    assert set(seen) == {1, 3}  # first turns, then history + reply + new turn
    assert upstream.app[BAD_HISTORIES] == []
    # Without --temperature the body's own value (or none) goes out.
    assert {b.get("temperature") for b in upstream.app[BODIES]} == {0.7, None}
    assert not any("ignore_eos" in b for b in upstream.app[BODIES])


async def test_processes_merge_into_one_summary_with_distinct_seeds(
    upstream: TestServer, tmp_path: Path
) -> None:
    """``--processes 2``: the master writes one summary of both workers' samples, and each
    worker played its own conversations (seed + worker index, ids prefixed)."""
    summary_file = tmp_path / "summary.json"
    samples_file = tmp_path / "samples.jsonl"
    port = free_port()
    output = await _locust(
        tmp_path,
        f"http://127.0.0.1:{upstream.port}",
        "--processes", "2",
        # The master listens on loopback, on a port of its own: never 0.0.0.0, and never the
        # default 5557 that another Locust on the machine may hold.
        "--master-bind-host", "127.0.0.1",
        "--master-bind-port", str(port),
        "--master-port", str(port),
        "--workload", "multi-turn",
        "--seed", "3",
        "--max-tokens", "8",
        "--session-header", SESSION_HEADER,
        "--summary-file", str(summary_file),
        "--samples-file", str(samples_file),
        "--csv", str(tmp_path / "run"),
    )  # fmt: skip
    assert output.count("Exact summary") == 1, output  # the master's only
    assert "Exact summary (raw samples of 2 workers" in output
    summary = json.loads(summary_file.read_text())
    assert summary["workers"] == 2 and summary["seeds"] == [3, 4]
    assert summary["failed"] == 0, summary["error_kinds"]
    assert summary["unfinished"] <= USERS
    samples = _samples(samples_file)
    _check_accounting(summary, samples)
    by_worker: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for sample in samples:
        by_worker[sample["worker"]].append(sample)
    for worker, mine in by_worker.items():
        assert any(s["outcome"] == "ok" for s in mine), worker  # both workers' samples arrived
        assert all(s["conversation_id"].startswith(f"w{worker}-mt-") for s in mine)
    ok = [s for s in samples if s["outcome"] == "ok"]
    assert summary["completed"] == len(ok)  # every completed request was due in the window
    # One line per request: every completed one reached the server, and the server saw no
    # request without a line (only ones cut off at the stop may not have reached it).
    assert len(ok) <= len(upstream.app[SEEN]) <= len(samples)
    # Locust's rows, aggregated by the master: one ITL row per gap. A reply's rows are fired
    # together, so every stats report has CHUNKS - 1 ITL rows per E2E row; Locust's last
    # report may miss the master's half-second wait at quitting (our samples may not).
    rows = _stats_rows(tmp_path / "run")
    assert 0 < _count(rows, "E2E") <= len(ok)
    assert _count(rows, "ITL") == (CHUNKS - 1) * _count(rows, "E2E")
    assert sum(len(s["itl_s"]) for s in ok) == (CHUNKS - 1) * len(ok)
    # Distinct seeds: the workers' first turns asked different things.
    asked: dict[str, set[str]] = {"w0": set(), "w1": set()}
    for session, content in upstream.app[FIRST_TURNS]:
        assert session is not None
        asked[session.split("-", 1)[0]].add(content)
    assert asked["w0"] and asked["w1"] and not asked["w0"] & asked["w1"]
    assert upstream.app[BAD_HISTORIES] == []
