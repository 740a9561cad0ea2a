"""The proxy benchmark's results and what they mean: runs, bottlenecks, targets met or missed.

:mod:`loadtest.bench_proxy` measures; this module holds what it found, as records that go
into ``bench-proxy.json`` as they are (:class:`ThroughputRun`, :class:`LatencyRun`), and the
judgements drawn from them, as pure functions so they can be checked without a benchmark:

* **which process held a run back** (:func:`limiting_process`): each server is one
  single-threaded event loop, so one near a whole core is at its ceiling;
* **CPU per request** (:func:`cpu_per_request`): robust to how much CPU a run got, so it
  compares proxies even on a shared machine;
* **added latency**: a proxy's percentile minus direct access's from the same run;
* **balancer's targets** (:func:`target_checks`) and the notes a reader needs to trust the
  numbers (:func:`throughput_notes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from loadtest.cells import fixed
from loadtest.loadgen import ClosedLoopStats, RoundTrip
from loadtest.stats import percentile
from loadtest.wrk import WrkReport

# balancer's performance targets (for a 2-core machine).
TARGET_NONSTREAM_RPS: Final = 5000.0
TARGET_STREAM_RPS: Final = 3000.0
TARGET_ADDED_P50_MS: Final = 1.0
TARGET_ADDED_P99_MS: Final = 5.0

NA: Final = "n/a"
"""The benchmark's cell for a value that was not measured."""
SATURATED_PERCENT: Final = 85.0
"""CPU (% of one core) at which a single-threaded process counts as the bottleneck."""
FOREIGN_CPU_NOTE: Final = 25.0
"""CPU (% of one core) taken by unrelated processes during a run above which the report
says the run shared the machine."""
LATE_MS: Final = 3.0
"""Client schedule lag (p99) above which the report warns: event-loop timers fire up to a
millisecond late by design, more means the client itself was busy."""


def number(value: float | None, digits: int = 2) -> str:
    """A figure as the benchmark's report writes it: thousands grouped, ``n/a`` if missing."""
    return fixed(value, digits, missing=NA, grouped=True)


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, to the microsecond (the JSON's unit)."""
    return None if seconds is None else round(seconds * 1000, 3)


def cpu_per_request(percent: float | None, rate: float | None) -> float | None:
    """Microseconds of CPU per request from a CPU share (% of one core) and a request rate."""
    if percent is None or not rate:
        return None
    return round(percent / 100 / rate * 1e6, 1)


def limiting_process(cpu: Mapping[str, float | None], target: str, generator: str) -> str:
    """Which process held the run back: the busiest one if it used nearly a whole core (each
    is single-threaded, so that is its ceiling), else all CPUs if the machine was full."""
    names = {"upstream": "upstream double", "proxy": target, "generator": generator}
    busy = {names[k]: v for k, v in cpu.items() if k in names and v is not None}
    if busy:
        name, value = max(busy.items(), key=lambda item: item[1])
        if value >= SATURATED_PERCENT:
            return name
    machine = cpu.get("machine")
    if machine is not None and machine >= 0.9 * 100 * (os.cpu_count() or 1):
        return "all CPUs"
    return "no single process"


def foreign_cpu(cpu: Mapping[str, float | None]) -> float | None:
    """CPU used by processes that are not part of the benchmark (other minus interrupts)."""
    other, irq = cpu.get("other"), cpu.get("irq")
    return None if other is None else other - (irq or 0.0)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


# -- max throughput ---------------------------------------------------------------------------


@dataclass
class ThroughputRun:
    """One closed-loop run at full speed against one target in one mode."""

    target: str
    mode: str
    generator: str
    requests_per_sec: float | None = None
    requests: int = 0
    seconds: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    cpu_percent: dict[str, float | None] = field(default_factory=dict)
    proxy_cpu_us_per_request: float | None = None
    upstream_cpu_us_per_request: float | None = None
    limited_by: str | None = None
    error: str | None = None

    def take_wrk(self, report: WrkReport) -> None:
        """The figures of a wrk report."""
        self.requests_per_sec = report.requests_per_sec
        self.requests = report.requests
        self.seconds = report.seconds
        self.latency_ms = dict(report.latency_ms)
        self.non_2xx = report.non_2xx
        self.socket_errors = dict(report.socket_errors)

    def take_closed_loop(self, stats: ClosedLoopStats, elapsed: float) -> None:
        """The figures of the built-in generator's run of ``elapsed`` seconds."""
        lat = stats.latencies
        self.requests = len(lat)
        self.seconds = round(elapsed, 3)
        self.requests_per_sec = round(len(lat) / elapsed, 2)
        self.latency_ms = {"avg": ms(sum(lat) / len(lat)) if lat else None,
                           "p50": ms(percentile(lat, 50)), "p99": ms(percentile(lat, 99)),
                           "max": ms(max(lat, default=0))}
        self.non_2xx = stats.non_2xx
        self.socket_errors = {"other": stats.errors}

    def derive(self) -> None:
        """CPU per request (robust to how much CPU the run got) and the saturated process."""
        self.proxy_cpu_us_per_request = cpu_per_request(self.cpu_percent.get("proxy"),
                                                        self.requests_per_sec)
        self.upstream_cpu_us_per_request = cpu_per_request(self.cpu_percent.get("upstream"),
                                                           self.requests_per_sec)
        self.limited_by = limiting_process(self.cpu_percent, self.target, self.generator)

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def throughput_ratios(runs: Sequence[ThroughputRun]) -> dict[str, float | None]:
    """balancer's requests/s over direct's and over HAProxy's, per mode."""
    ratios: dict[str, float | None] = {}
    for mode in ("non-streaming", "streaming"):
        rps = {r.target: r.requests_per_sec for r in runs if r.mode == mode}
        for other in ("direct", "haproxy"):
            a, b = rps.get("balancer"), rps.get(other)
            if a is not None and b:
                label = "HAProxy" if other == "haproxy" else "direct"
                ratios[f"balancer / {label}, {mode}"] = round(a / b, 3)
    return ratios


def throughput_notes(runs: Sequence[ThroughputRun]) -> list[str]:
    """What a reader must know to trust the max-throughput figures: runs that shared the
    machine, runs with errors, and HAProxy runs that measured the upstream double instead."""
    notes = []
    for run in runs:
        foreign = foreign_cpu(run.cpu_percent)
        if foreign is not None and foreign > FOREIGN_CPU_NOTE:
            notes.append(f"{run.target} {run.mode} max-throughput run shared the machine: "
                         f"about {foreign:.0f}% of a core went to other processes, so its "
                         "req/s is lower than on an idle machine.")
        if run.errors:
            notes.append(f"{run.target} {run.mode} max-throughput run had {run.errors} errors "
                         f"(non-2xx {run.non_2xx}, socket {run.socket_errors}).")
    upstream_bound = [f"{r.target} {r.mode}" for r in runs
                      if r.target == "haproxy" and r.limited_by == "upstream double"]
    if upstream_bound:
        notes.append("The upstream double, not HAProxy, was the bottleneck in the max-throughput "
                     f"run(s) {', '.join(upstream_bound)}: HAProxy's req/s there is the "
                     "double's ceiling, so balancer / HAProxy overstates balancer; the proxy "
                     "µs/req column compares the proxies themselves.")
    return notes


# -- added latency ----------------------------------------------------------------------------


@dataclass
class LatencyRun:
    """One target's open-loop requests at a fixed rate in one mode, over all rounds."""

    target: str
    mode: str
    rate: float
    requests: int
    errors: int
    first_event_ms: dict[str, float | None]
    end_ms: dict[str, float | None]
    schedule_lag_ms: dict[str, float | None]
    cpu_percent: dict[str, float | None]
    proxy_cpu_us_per_request: float | None = None
    added_first_event_ms: dict[str, float | None] = field(default_factory=dict)
    added_end_ms: dict[str, float | None] = field(default_factory=dict)
    first_error: str | None = None


def _mean_cpu(readings: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Each CPU figure averaged over the rounds that measured it."""
    mean: dict[str, float | None] = {}
    for k in sorted({k for c in readings for k in c}):
        values = [v for c in readings if (v := c.get(k)) is not None]
        mean[k] = round(sum(values) / len(values), 1) if values else None
    return mean


def latency_run(target: str, *, stream: bool, rate: float, trips: Sequence[RoundTrip],
                cpu: Sequence[Mapping[str, float | None]]) -> LatencyRun:
    """A target's round trips and its rounds' CPU readings as one run (added latency comes
    later, from :func:`add_latency_over_direct`)."""
    ok = [t for t in trips if t.error is None]
    first = [t.first_event for t in ok if t.first_event is not None]
    end = [t.end for t in ok if t.end is not None]
    lags = [t.lag for t in trips]
    errors = [t.error for t in trips if t.error is not None]
    mean_cpu = _mean_cpu(cpu)
    return LatencyRun(
        target=target, mode="streaming" if stream else "non-streaming", rate=rate,
        requests=len(trips), errors=len(errors),
        first_event_ms={"p50": ms(percentile(first, 50)), "p99": ms(percentile(first, 99))},
        end_ms={"p50": ms(percentile(end, 50)), "p99": ms(percentile(end, 99))},
        schedule_lag_ms={"p99": ms(percentile(lags, 99)), "max": ms(max(lags, default=0))},
        cpu_percent=mean_cpu,
        proxy_cpu_us_per_request=cpu_per_request(mean_cpu.get("proxy"), rate),
        first_error=errors[0] if errors else None,
    )


def add_latency_over_direct(runs: Sequence[LatencyRun]) -> None:
    """Fill in each run's added latency: its percentiles minus the ``direct`` run's (none
    without a direct run)."""
    base = next((r for r in runs if r.target == "direct"), None)
    if base is None:
        return
    for run in runs:
        for q in ("p50", "p99"):
            run.added_first_event_ms[q] = _diff(run.first_event_ms[q], base.first_event_ms[q])
            run.added_end_ms[q] = _diff(run.end_ms[q], base.end_ms[q])


def latency_notes(run: LatencyRun) -> list[str]:
    """Failed requests, and a client that ran late (its delay is in the latencies)."""
    notes = []
    if run.errors:
        notes.append(f"{run.target} {run.mode} at {run.rate:g}/s: {run.errors} failed requests "
                     f"(first: {run.first_error})")
    lag = run.schedule_lag_ms.get("p99")
    if lag is not None and lag > LATE_MS:
        notes.append(f"{run.target} {run.mode} at {run.rate:g}/s: the client itself ran late "
                     f"(schedule lag p99 {lag:.1f} ms); latencies include some client delay.")
    return notes


# -- targets ----------------------------------------------------------------------------------


def target_checks(throughput: Sequence[ThroughputRun], latency: Sequence[LatencyRun],
                  generator_is_wrk: bool, rate: float) -> list[dict[str, Any]]:
    """balancer's targets, each with the measured figure and whether it was met (None: not
    measured)."""
    checks: list[dict[str, Any]] = []
    for mode, threshold in (("non-streaming", TARGET_NONSTREAM_RPS),
                            ("streaming", TARGET_STREAM_RPS)):
        run = next((r for r in throughput if r.target == "balancer" and r.mode == mode), None)
        value = None if run is None else run.requests_per_sec
        met = None if value is None else value >= threshold
        note = None
        if not generator_is_wrk:
            note = "built-in generator, not wrk"
        checks.append({"name": f"{mode} throughput ≥ {threshold:,.0f} req/s",
                       "measured": number(value, 0) + " req/s", "met": met, "note": note})
    run_l = next((r for r in latency if r.target == "balancer" and r.mode == "streaming"), None)
    for label, attr in (("first event", "added_first_event_ms"), ("end", "added_end_ms")):
        for q, threshold in (("p50", TARGET_ADDED_P50_MS), ("p99", TARGET_ADDED_P99_MS)):
            value = None if run_l is None else getattr(run_l, attr).get(q)
            checks.append({
                "name": f"added {q} ({label}) at {rate:g} streaming req/s ≤ {threshold:g} ms",
                "measured": NA if value is None else f"{value:.3f} ms",
                "met": None if value is None else value <= threshold,
            })
    return checks
