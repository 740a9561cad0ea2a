"""What the proxy benchmark concludes from its numbers: bottlenecks, added latency, targets."""

from __future__ import annotations

import pytest

from loadtest import bench_results as br
from loadtest.loadgen import ClosedLoopStats, RoundTrip
from loadtest.wrk import WrkReport


def _trips(end_ms: float, n: int = 100, *, errors: int = 0, lag: float = 0.0
           ) -> list[RoundTrip]:
    ok = [RoundTrip(end_ms / 2000, end_ms / 1000, lag) for _ in range(n)]
    return ok + [RoundTrip(None, None, lag, "HTTP 502") for _ in range(errors)]


def _throughput(target: str, mode: str, rps: float | None, **cpu: float) -> br.ThroughputRun:
    run = br.ThroughputRun(target, mode, "wrk", requests_per_sec=rps, cpu_percent=dict(cpu))
    run.derive()
    return run


def test_cpu_per_request_is_microseconds_from_a_share_and_a_rate() -> None:
    assert br.cpu_per_request(50.0, 1000.0) == 500.0
    assert br.cpu_per_request(None, 1000.0) is None
    assert br.cpu_per_request(50.0, None) is None
    assert br.cpu_per_request(50.0, 0.0) is None


@pytest.mark.parametrize(("cpu", "expected"), [
    ({"proxy": 97.0, "upstream": 40.0, "generator": 30.0}, "balancer"),
    ({"proxy": 50.0, "upstream": 90.0, "generator": 30.0}, "upstream double"),
    ({"proxy": 50.0, "upstream": 40.0, "generator": 88.0}, "wrk"),
    ({"proxy": 60.0, "upstream": 60.0, "generator": 60.0, "machine": 190.0}, "all CPUs"),
    ({"proxy": 60.0, "upstream": None, "machine": 100.0}, "no single process"),
])
def test_the_limiting_process_is_the_one_at_its_core(
        monkeypatch: pytest.MonkeyPatch, cpu: dict[str, float | None], expected: str) -> None:
    """Each process is single-threaded: near a whole core it is the bottleneck; else a full
    machine is; else nothing was."""
    monkeypatch.setattr(br.os, "cpu_count", lambda: 2)
    assert br.limiting_process(cpu, "balancer", "wrk") == expected


def test_a_wrk_report_fills_a_run_and_errors_add_up() -> None:
    run = br.ThroughputRun("balancer", "streaming", "wrk")
    run.take_wrk(WrkReport(requests_per_sec=2000.0, requests=16000, seconds=8.0,
                           latency_ms={"p50": 1.0}, non_2xx=3,
                           socket_errors={"read": 1, "timeout": 2}))
    run.cpu_percent = {"proxy": 80.0, "upstream": 30.0}
    run.derive()
    assert run.errors == 6
    assert run.proxy_cpu_us_per_request == 400.0
    assert run.upstream_cpu_us_per_request == 150.0
    assert run.limited_by == "no single process"


def test_a_closed_loop_run_has_rate_percentiles_and_errors() -> None:
    run = br.ThroughputRun("direct", "non-streaming", "built-in generator")
    run.take_closed_loop(ClosedLoopStats([0.001] * 99 + [0.011], non_2xx=1, errors=2), 2.0)
    assert (run.requests, run.requests_per_sec, run.seconds) == (100, 50.0, 2.0)
    assert run.latency_ms["p50"] == 1.0 and run.latency_ms["max"] == 11.0
    assert run.latency_ms["avg"] == pytest.approx(1.1)
    assert (run.non_2xx, run.socket_errors) == (1, {"other": 2})


def test_a_closed_loop_run_without_answers_has_no_latency() -> None:
    run = br.ThroughputRun("direct", "non-streaming", "built-in generator")
    run.take_closed_loop(ClosedLoopStats(errors=5), 1.0)
    assert run.requests_per_sec == 0.0
    assert run.latency_ms["avg"] is None and run.latency_ms["p50"] is None


def test_latency_runs_report_what_each_proxy_adds_over_direct() -> None:
    """Added latency is the proxy's percentile minus direct's; failures are counted apart
    and left out of the percentiles; CPU is averaged over the rounds."""
    direct = br.latency_run("direct", stream=True, rate=200, trips=_trips(2.0),
                            cpu=[{"upstream": 20.0}, {"upstream": 30.0}])
    proxy = br.latency_run("balancer", stream=True, rate=200, trips=_trips(2.5, errors=3),
                           cpu=[{"upstream": 20.0, "proxy": 40.0},
                                {"upstream": 20.0, "proxy": None}])
    br.add_latency_over_direct([direct, proxy])
    assert direct.cpu_percent == {"upstream": 25.0}
    assert proxy.cpu_percent == {"proxy": 40.0, "upstream": 20.0}
    assert proxy.proxy_cpu_us_per_request == 2000.0
    assert (proxy.requests, proxy.errors, proxy.first_error) == (103, 3, "HTTP 502")
    assert proxy.end_ms == {"p50": 2.5, "p99": 2.5}
    assert proxy.added_end_ms == {"p50": 0.5, "p99": 0.5}
    assert proxy.added_first_event_ms == {"p50": 0.25, "p99": 0.25}
    assert direct.added_end_ms == {"p50": 0.0, "p99": 0.0}


def test_without_a_direct_run_nothing_is_added() -> None:
    run = br.latency_run("balancer", stream=False, rate=100, trips=_trips(1.0), cpu=[])
    br.add_latency_over_direct([run])
    assert run.added_end_ms == {} and run.cpu_percent == {}


def test_latency_notes_name_failures_and_a_late_client() -> None:
    run = br.latency_run("haproxy", stream=True, rate=200,
                         trips=_trips(1.0, errors=1, lag=0.004), cpu=[])
    notes = br.latency_notes(run)
    assert notes[0] == "haproxy streaming at 200/s: 1 failed requests (first: HTTP 502)"
    assert "the client itself ran late (schedule lag p99 4.0 ms)" in notes[1]
    assert br.latency_notes(br.latency_run("direct", stream=True, rate=200,
                                           trips=_trips(1.0), cpu=[])) == []


def test_ratios_put_balancer_over_direct_and_haproxy_per_mode() -> None:
    runs = [_throughput("direct", "non-streaming", 8000.0),
            _throughput("balancer", "non-streaming", 4000.0),
            _throughput("haproxy", "non-streaming", 5000.0),
            _throughput("balancer", "streaming", None),
            _throughput("direct", "streaming", 3000.0)]
    assert br.throughput_ratios(runs) == {"balancer / direct, non-streaming": 0.5,
                                          "balancer / HAProxy, non-streaming": 0.8}


def test_throughput_notes_flag_a_shared_machine_errors_and_an_upstream_bound_haproxy() -> None:
    shared = _throughput("balancer", "streaming", 1000.0, other=40.0, irq=10.0)
    failing = br.ThroughputRun("direct", "streaming", "wrk", non_2xx=2)
    bound = _throughput("haproxy", "streaming", 9000.0, upstream=99.0, proxy=50.0)
    notes = br.throughput_notes([shared, failing, bound])
    assert len(notes) == 3
    assert "shared the machine: about 30% of a core" in notes[0]
    assert notes[1].startswith("direct streaming max-throughput run had 2 errors")
    assert "run(s) haproxy streaming" in notes[2]
    assert br.throughput_notes([_throughput("balancer", "streaming", 1.0, other=5.0)]) == []


def test_targets_are_met_missed_or_not_measured() -> None:
    throughput = [_throughput("balancer", "non-streaming", 6000.0),
                  _throughput("balancer", "streaming", 2500.0)]
    latency = br.latency_run("balancer", stream=True, rate=200, trips=_trips(3.0), cpu=[])
    latency.added_first_event_ms = {"p50": 0.4, "p99": 6.0}
    checks = br.target_checks(throughput, [latency], generator_is_wrk=False, rate=200)
    by_name = {c["name"]: c for c in checks}
    assert by_name["non-streaming throughput ≥ 5,000 req/s"]["met"] is True
    assert by_name["non-streaming throughput ≥ 5,000 req/s"]["measured"] == "6,000 req/s"
    assert by_name["non-streaming throughput ≥ 5,000 req/s"]["note"] == \
        "built-in generator, not wrk"
    assert by_name["streaming throughput ≥ 3,000 req/s"]["met"] is False
    assert by_name["added p50 (first event) at 200 streaming req/s ≤ 1 ms"]["met"] is True
    assert by_name["added p99 (first event) at 200 streaming req/s ≤ 5 ms"]["met"] is False
    assert by_name["added p99 (first event) at 200 streaming req/s ≤ 5 ms"]["measured"] == \
        "6.000 ms"
    not_measured = by_name["added p50 (end) at 200 streaming req/s ≤ 1 ms"]
    assert (not_measured["met"], not_measured["measured"]) == (None, "n/a")


def test_numbers_are_grouped_and_missing_ones_say_so() -> None:
    assert br.number(12345.678) == "12,345.68"
    assert br.number(12345.678, 0) == "12,346"
    assert br.number(None) == "n/a"
