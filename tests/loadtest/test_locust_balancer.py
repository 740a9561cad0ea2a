"""A short headless Locust run through a real balancer in front of two simulated pods.

Every part is a real process on 127.0.0.1: ``python -m loadtest.simserver`` serves two
KV-caching pods, ``python -m balancer serve`` routes to them by CHWBL, and Locust (which
monkey-patches the standard library with gevent, so it never runs inside pytest) plays the
multi-turn workload through the balancer. The run happens once per module; each test checks
one side of it: Locust's exact summary, the balancer's metrics, the pods' counters.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.procs import Services, free_port, wait_for_lines, wait_ready

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PODS = 2
USERS = 4
RUN_SECONDS = 10
LOCUST_TIMEOUT_S = 60.0  # start-up, the run and the summary, on a busy 2-core machine
POD_LINE = re.compile(r"sim pod (\S+) listening on (http://\S+)")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is not installed"
)


@dataclass
class Run:
    """What one Locust run through the balancer left behind."""

    locust_code: int
    locust_output: str
    summary: dict[str, Any]
    endpoints: list[str]
    """The pods' endpoint ids as the balancer names them (``127.0.0.1:PORT``)."""
    requests_by_endpoint: dict[tuple[str, str], float]
    """``balancer_requests_total`` by (endpoint, code)."""
    pod_stats: list[dict[str, Any]]


def _locust_command() -> list[str]:
    script = Path(sys.executable).with_name("locust")
    return [str(script)] if script.exists() else [sys.executable, "-m", "locust"]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _requests_total(metrics: str) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "balancer_requests_total":
                key = (sample.labels["endpoint"], sample.labels["code"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Pods, balancer and one Locust run; every process is stopped before the tests look
    (leaving the ``with`` block stops them, newest first, also when something failed)."""
    tmp = tmp_path_factory.mktemp("locust-balancer")
    with Services(tmp) as services:
        pods = services.start("pods", [
            sys.executable, "-m", "loadtest.simserver", "--pods", str(PODS), "--port", "0",
            "--time-scale", "0.2", "--model", MODEL, "--log-level", "warning"])
        matches = asyncio.run(wait_for_lines(pods, POD_LINE.pattern, PODS))
        pod_urls = [m.group(2) for m in matches]

        port, admin_port = free_port(), free_port()
        config = tmp / "balancer.yaml"
        config.write_text(
            f"server: {{host: 127.0.0.1, port: {port}, admin_port: {admin_port},"
            " log_level: warning}\n"
            f"pools:\n  - name: llama\n    models: [{MODEL}]\n"
            f"    endpoints: [{', '.join(pod_urls)}]\n"
            "routing: {strategy: chwbl}\n"
        )
        balancer = services.start(
            "balancer", [sys.executable, "-m", "balancer", "serve", "--config", str(config)])
        admin = f"http://127.0.0.1:{admin_port}"
        asyncio.run(wait_ready(balancer, admin + "/readyz"))

        summary_file = tmp / "summary.json"
        # All users start at once so the first requests overlap and the load bound spreads
        # them, whatever the hash ring makes of this run's ports.
        locust = services.start("locust", [
            *_locust_command(), "-f", str(LOCUSTFILE), "--headless",
            "-u", str(USERS), "-r", "100", "-t", f"{RUN_SECONDS}s",
            "--host", f"http://127.0.0.1:{port}", "--workload", "multi-turn", "--seed", "7",
            "--summary-file", str(summary_file), "--loglevel", "WARNING"])
        locust_log = locust.log_path
        try:
            code = locust.popen.wait(LOCUST_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"locust still running after {LOCUST_TIMEOUT_S} s:\n{locust_log.read_text()}"
            ) from None
        output = locust_log.read_text(errors="replace")
        assert summary_file.exists(), output
        summary = json.loads(summary_file.read_text())

        status, metrics = _get(admin + "/metrics")
        assert status == 200
        pod_stats = []
        for url in pod_urls:
            status, body = _get(url + "/stats")
            assert status == 200
            pod_stats.append(json.loads(body))
        result = Run(
            locust_code=code,
            locust_output=output,
            summary=summary,
            endpoints=[url.removeprefix("http://") for url in pod_urls],
            requests_by_endpoint=_requests_total(metrics.decode()),
            pod_stats=pod_stats,
        )
    yield result


def test_locust_exits_cleanly_with_an_exact_summary_and_no_errors(run: Run) -> None:
    """Locust exits 0 and its summary has positive TTFT percentiles, ITL, a rate and no
    failures; only requests in flight at the stop may be unfinished."""
    summary = run.summary
    assert run.locust_code == 0, run.locust_output
    assert "Exact summary" in run.locust_output
    assert summary["failed"] == 0, summary["error_kinds"]
    assert summary["completed"] >= USERS  # every user finished at least one turn
    assert summary["unfinished"] <= USERS
    assert summary["offered"] == summary["completed"] + summary["unfinished"]
    assert 0 < summary["ttft_p50_s"] <= summary["ttft_p90_s"] <= summary["ttft_p99_s"] < 30
    assert summary["itl_p50_s"] is not None and summary["itl_p50_s"] > 0
    assert summary["requests_per_s"] > 0 and summary["output_tokens_per_s"] > 0
    assert summary["e2e_p50_s"] >= summary["ttft_p50_s"]


def test_balancer_spread_the_requests_over_both_pods(run: Run) -> None:
    """The balancer's requests counter has answered requests through each pod's endpoint."""
    answered = {
        endpoint: run.requests_by_endpoint.get((endpoint, "200"), 0.0)
        for endpoint in run.endpoints
    }
    assert all(count > 0 for count in answered.values()), run.requests_by_endpoint
    assert set(run.summary["per_endpoint"]) == set(run.endpoints)
    # Every reply Locust read to the end was answered (200) through the endpoint it named;
    # the balancer may have answered a few more that Locust cut off when the run ended.
    for endpoint, count in run.summary["per_endpoint"].items():
        assert answered[endpoint] >= count, (endpoint, run.requests_by_endpoint)


def test_pods_report_prefix_cache_hits(run: Run) -> None:
    """The pods' /stats show cached prompt tokens, and so do the replies' usage figures."""
    assert [stats["requests_served"] > 0 for stats in run.pod_stats] == [True] * PODS
    assert sum(stats["cached_tokens"] for stats in run.pod_stats) > 0
    assert sum(stats["prefix_cache_hits"] for stats in run.pod_stats) > 0
    assert run.summary["cached_tokens"] > 0
    assert 0 < run.summary["cached_token_share"] <= 1
