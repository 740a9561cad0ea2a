"""The proxy benchmark's markdown report, from a result as ``bench-proxy.json`` holds it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from loadtest import bench_results as br
from loadtest.bench_report import render_markdown
from loadtest.loadgen import RoundTrip

MACHINE = {
    "nproc": 2, "cpu_affinity": 2, "cpu_model": "Test CPU", "platform": "Linux-test",
    "python": "CPython 3.11.9", "aiohttp": "3.14", "uvloop": "0.21", "balancer": "0.1.0",
    "git_commit": "abc1234", "haproxy": None, "wrk": "wrk 4.2.0", "open_files_limit": 65536,
}
CONFIG = {"duration": 8, "warmup": 2, "connections": 32, "rate": 200.0, "latency_requests": 400,
          "rounds": 4}


def _result() -> dict[str, Any]:
    throughput = [
        br.ThroughputRun("direct", "non-streaming", "wrk", requests_per_sec=12345.6,
                         latency_ms={"p50": 1.25, "p99": 3.5},
                         cpu_percent={"upstream": 99.0, "generator": 40.0, "machine": 150.0}),
        br.ThroughputRun("balancer", "non-streaming", "wrk", requests_per_sec=None,
                         error="wrk exited with 1: boom"),
    ]
    for run in throughput:
        run.derive()
    latency = [br.latency_run(name, stream=True, rate=200.0,
                              trips=[RoundTrip(end / 2, end, 0.0) for _ in range(10)],
                              cpu=[{"upstream": 10.0}])
               for name, end in (("direct", 0.001), ("balancer", 0.0015))]
    br.add_latency_over_direct(latency)
    result = {
        "started": "2025-01-01 00:00 UTC", "command": "python -m loadtest.bench_proxy",
        "machine": MACHINE, "background_cpu_percent": None, "config": CONFIG,
        "generator": "wrk -t1",
        "throughput": [dataclasses.asdict(r) | {"errors": r.errors} for r in throughput],
        "latency": [[dataclasses.asdict(r) for r in latency]],
        "ratios": {"balancer / direct, streaming": 0.5},
        "targets": br.target_checks(throughput, latency, True, 200.0),
        "notes": ["a note"],
    }
    return json.loads(json.dumps(result))  # as read back from bench-proxy.json


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after the heading that starts with ``heading``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def test_every_section_is_there() -> None:
    markdown = render_markdown(_result())
    for heading in ("# Proxy benchmark: balancer vs HAProxy vs direct", "## Machine",
                    "## Max throughput (wrk -t1, 32 connections, 8 s after a 2 s warm-up)",
                    "## Latency at 200 streaming req/s", "## Targets for balancer",
                    "## Notes"):
        assert any(line.startswith(heading) for line in markdown.splitlines()), heading
    assert "- a note" in markdown
    assert "- balancer / direct, streaming: 0.50" in markdown


def test_throughput_rows_group_thousands_and_show_failures() -> None:
    header, _, direct, balancer = _table(render_markdown(_result()), "## Max throughput")
    direct_cells = dict(zip(header, direct, strict=True))
    assert direct_cells["req/s"] == "12,346"
    assert (direct_cells["p50 ms"], direct_cells["p99 ms"]) == ("1.25", "3.50")
    assert direct_cells["CPU upstream"] == "99%" and direct_cells["CPU proxy"] == "n/a"
    assert direct_cells["limited by"] == "upstream double"
    balancer_cells = dict(zip(header, balancer, strict=True))
    assert balancer_cells["req/s"] == "n/a"
    assert balancer_cells["errors"] == "failed: wrk exited with 1: boom"


def test_latency_rows_leave_direct_without_added_latency() -> None:
    header, _, direct, balancer = _table(render_markdown(_result()), "## Latency at")
    assert dict(zip(header, direct, strict=True))["added end p50"] == ""
    cells = dict(zip(header, balancer, strict=True))
    assert (cells["end p50"], cells["added end p50"], cells["added first p50"]) == \
        ("1.50", "0.50", "0.25")


def test_targets_say_met_missed_or_not_measured() -> None:
    rows = _table(render_markdown(_result()), "## Targets for balancer")[2:]
    met = {name: verdict for name, _, verdict in rows}
    assert met["non-streaming throughput ≥ 5,000 req/s"] == "not measured"
    assert met["added p50 (end) at 200 streaming req/s ≤ 1 ms"] == "yes"
