"""Short headless Locust runs (as subprocesses) against a fake SSE upstream on 127.0.0.1.

Locust monkey-patches the standard library with gevent, so it never runs inside pytest.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loadtest.trace import TraceRecord, dump_trace

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
LOCUST = Path(sys.executable).with_name("locust")
RUN_SECONDS = 6
RUN_TIMEOUT_S = 40  # locust start-up plus the run plus slack on a busy machine
FIRST_CHUNK_DELAY_S = 0.1
CHUNKS = 4

SEEN = web.AppKey("seen", list[int])
BAD_HISTORIES = web.AppKey("bad_histories", list[list[dict[str, str]]])

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
    app.router.add_post("/v1/chat/completions", _chat)
    return await aiohttp_server(app, host="127.0.0.1")


async def _locust(cwd: Path, host: str, *args: str) -> str:
    """Run a short headless Locust and return its output; fails on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = await asyncio.create_subprocess_exec(
        str(LOCUST),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u", "4",
        "-r", "4",
        "-t", f"{RUN_SECONDS}s",
        "--host", host,
        "--loglevel", "WARNING",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    return text


def _stats_rows(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", encoding="utf-8") as rows:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(rows)}


async def test_multi_turn_run_reports_ttft_and_appends_replies(
    upstream: TestServer, tmp_path: Path
) -> None:
    """A generated multi-turn run: TTFT rows, exact summary, no errors, real histories."""
    summary_file = tmp_path / "out" / "summary.json"
    output = await _locust(
        REPO,
        f"http://127.0.0.1:{upstream.port}",  # no /v1: the locustfile adds it
        "--workload", "multi-turn",
        "--seed", "3",
        "--max-tokens", "8",
        "--model", "fake",
        "--summary-file", str(summary_file),
        "--csv", str(tmp_path / "run"),
    )  # fmt: skip
    assert "Exact summary" in output
    summary = json.loads(summary_file.read_text())
    assert summary["errors"] == 0 and summary["requests"] >= 8
    # Lower bound: the fake waits this long before the first token; upper bound is generous.
    assert FIRST_CHUNK_DELAY_S * 0.9 <= summary["ttft_p50_s"] <= FIRST_CHUNK_DELAY_S + 1.0
    assert summary["ttft_p99_s"] >= summary["ttft_p50_s"]
    assert summary["itl_p50_s"] is not None and summary["output_tokens_per_s"] > 0
    assert summary["cached_token_share"] == 0.5
    assert summary["per_pod"] == {"pod-0": summary["ok"]}
    rows = _stats_rows(tmp_path / "run")
    for name in ("TTFT", "ITL", "E2E"):
        assert int(rows["SSE", name]["Failure Count"]) == 0
    assert float(rows["SSE", "TTFT"]["Average Content Size"]) == CHUNKS  # output tokens
    seen = upstream.app[SEEN]
    assert max(seen) >= 4  # later turns carried the history
    assert upstream.app[BAD_HISTORIES] == []


async def test_trace_run_from_another_directory(upstream: TestServer, tmp_path: Path) -> None:
    """A trace file plays from outside the repository, with /v1 in the host."""
    trace = tmp_path / "trace.jsonl"
    first = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
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
        "--summary-file", "summary.json",
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["errors"] == 0 and summary["requests"] >= 6, output
    assert summary["ttft_p90_s"] is not None
    seen: list[int] = upstream.app[SEEN]
    assert set(seen) == {1, 3}  # first turns, then history + reply + new turn
    assert upstream.app[BAD_HISTORIES] == []
