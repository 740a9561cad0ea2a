"""Compare routing strategies on simulated KV-caching model servers, honestly, in one run.

``python -m loadtest.compare`` generates one seeded workload and plays the same trace through
each contender, every one against fresh simulated pods (empty caches), and writes a table
(markdown and JSON), the raw per-request samples (JSON Lines) and plots (PNG):

* ``chwbl``, ``least-request``, ``round-robin``, ``random``: balancer with that strategy
  (``--replicas K`` starts K balancer processes on the same pods and sends each request to one
  of them at random, as a stateless app with a sidecar in each pod behind a Service would);
* ``sticky-oracle``: no balancer; the client pins each conversation to one pod, handing new
  conversations to pods in turn. It knows what no proxy can (the conversation id and when a
  conversation starts), so its cache hit rate is the ceiling for affinity routing;
* ``haproxy`` (when installed): HAProxy 2.6 with ``hash-type consistent`` and
  ``hash-balance-factor`` on the ``x-session-id`` header, which the client sets to the
  conversation id (HAProxy cannot read a JSON body, so it gets the oracle's key; configuration
  in :mod:`loadtest.haproxy`);
* ``vllm-router`` (when installed, ``pip install vllm-router``): its ``cache_aware`` policy,
  which keeps an approximate prefix tree of what it sent to each worker.

What makes the figures honest (see :mod:`loadtest.stats` for the definitions):

* latency counts from when each request was due (open loop), so a client that fell behind
  cannot hide a queue;
* every request due in the window is accounted for: completed, failed by cause, or unfinished
  when the run ended (these count as failures, and at their age in the censored p99);
* warm-up (``--warmup``, default 10 s: caches start empty) and cool-down (``--cooldown``,
  default 5 s: the last requests see a system that no longer gets follow-up turns) are left out;
* each run records the host's CPU, each process's CPU and the simulators' clock pauses, and a
  run in which the host, not the modelled GPUs, was the bottleneck is marked invalid (exit
  status 3 with ``--strict``);
* ``--repeat N`` interleaves the contenders (A B C, A B C, ...) and reports each figure as the
  median with min-max.

Zones (``--zones Z``): pod i runs in zone i mod Z (``zone-a``, ``zone-b``, ...), balancer
replica r in zone r mod Z (its configuration lists every pod with its zone and sets
``routing.zone``; the preference itself is ``--set routing.prefer_zone=true`` or a
``--variant``), and each conversation's client in a zone drawn from ``--zone-weights``
(seeded). Its requests go to a replica of its own zone and carry ``x-sim-client-zone``; a pod
in another zone makes such a request wait ``--cross-zone-rtt`` first. Every contender is
measured the same way: each row gets the share of completed requests served in another zone
than their client's.

``--restart POD@T:DOWN`` restarts a pod at the same moment of every contender's run and adds
per-phase figures around it (:mod:`loadtest.restarts`).

Each contender's pods run in their own process (so a slow pod process never stalls the
client's clock) and so does each balancer; the client is this process.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from balancer.config import RoutingSettings
from loadtest import haproxy, workloads
from loadtest.cells import fixed
from loadtest.hostcpu import CpuMeter
from loadtest.player import play, random_spread
from loadtest.procs import (
    HOST,
    Services,
    find_executable,
    free_port,
    raise_fd_limit,
    wait_for_lines,
    wait_ready,
)
from loadtest.restarts import (
    DEFAULT_PHASE_WINDOW_S,
    Restart,
    aggregate_phases,
    parse_restart,
    phase_figures,
    phase_table,
    restart_pods,
)
from loadtest.simserver.config import CLIENT_ZONE_HEADER, DEFAULT_CROSS_ZONE_RTT_S
from loadtest.stats import RunResult, Sample, Slo, Window, percentile, summarize, write_samples
from loadtest.trace import TraceRecord
from loadtest.workloads import DEFAULT_MODEL, WORKLOADS, generate

STRATEGIES = ("chwbl", "least-request", "round-robin", "random")
ORACLE = "sticky-oracle"
HAPROXY = "haproxy"
VLLM_ROUTER = "vllm-router"
CONTENDERS = (*STRATEGIES, ORACLE, HAPROXY, VLLM_ROUTER)
OPTIONAL_TOOLS = {HAPROXY: "apt-get install haproxy", VLLM_ROUTER: "pip install vllm-router"}
SESSION_HEADER = "x-session-id"

DEFAULT_WARMUP_S = 25.0
"""Seconds at the start left out of the statistics. The pods start with empty caches, and the
number of conversations in progress grows from zero until conversations start to end: with the
multi-turn workload's 3-10 turns of a few seconds each, it reaches about three quarters of its
steady level in 25 s (``pod_load.png`` shows the ramp, ``ttft_over_time.png`` what it does to
latency)."""

DEFAULT_COOLDOWN_S = 5.0
"""Seconds at the end left out. Requests due then meet a system that no longer gets the
follow-up turns of conversations cut by the deadline, so they are faster than steady state;
5 s is about one reply's length at these loads."""

DEFAULT_GRACE_S = 10.0
"""After the last due time, requests may finish for this long; the rest are unfinished."""

PROCESS_SATURATED_PERCENT = 90.0
"""A process (pods, a balancer, the client) busy this much of one core ran its event loop at
capacity: its queueing, not the modelled GPUs, shaped the latencies. Such a run is invalid."""

HOST_SATURATED_SHARE = 0.9
"""The machine busy this share of all its cores: every process competed for CPU. Invalid."""

CLOCK_PAUSED_SHARE = 0.01
"""The simulated clocks may stand still this share of a run (host hiccups) before it is
invalid."""

INVALID_EXIT = 3
"""Exit status of ``--strict`` when a run was invalid."""


MAX_ZONES = len(string.ascii_lowercase)
"""Zones are named zone-a to zone-z."""


def zone_names(count: int) -> list[str]:
    """``zone-a``, ``zone-b``, ... (none for a single zone: zones are not simulated)."""
    if count <= 1:
        return []
    return [f"zone-{letter}" for letter in string.ascii_lowercase[:count]]


def parse_zone_weights(text: str | None, zones: int) -> tuple[float, ...]:
    """``--zone-weights 0.7,0.3``: the share of conversations whose client runs in each
    zone, normalised; None or empty: equal shares."""
    if zones <= 1:
        return ()
    if not text:
        return (1.0 / zones,) * zones
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise SystemExit(f"--zone-weights {text!r}: expected numbers separated by "
                         "commas") from None
    if (len(weights) != zones or any(not (w >= 0 and w < float("inf")) for w in weights)
            or not sum(weights) > 0):
        raise SystemExit(f"--zone-weights {text!r}: expected {zones} numbers >= 0 (one per "
                         "zone) with a positive sum")
    total = sum(weights)
    return tuple(w / total for w in weights)


class ClientZones:
    """The zone each conversation's client runs in: drawn from the weights, seeded by the run
    seed and the conversation id alone, so every contender and repeat sees the same
    clients wherever their conversations fall in the trace."""

    def __init__(self, zones: Sequence[str], weights: Sequence[float], seed: int) -> None:
        self.zones = list(zones)
        self._cumulative = list(itertools.accumulate(weights))
        self._seed = seed
        self._known: dict[str, str] = {}

    def __call__(self, conversation_id: str) -> str:
        zone = self._known.get(conversation_id)
        if zone is None:
            draw = random.Random(f"zone:{self._seed}:{conversation_id}").random()
            draw *= self._cumulative[-1]
            index = min(bisect.bisect_right(self._cumulative, draw), len(self.zones) - 1)
            zone = self._known[conversation_id] = self.zones[index]
        return zone

    def headers(self, conversation_id: str) -> dict[str, str]:
        """What the client sends with each request: its zone."""
        return {CLIENT_ZONE_HEADER: self(conversation_id)}


def zone_spread(urls_by_zone: Mapping[str, Sequence[str]], client_zone: Callable[[str], str],
                seed: int) -> Callable[[str], str]:
    """A ``route`` that sends each request to a random replica (seeded) in its client's
    zone: an app calling the balancer sidecar or gateway replica next to it."""
    pick = random.Random(seed).choice

    def route(conversation_id: str) -> str:
        return pick(urls_by_zone[client_zone(conversation_id)])

    return route


def cross_zone_share(samples: Sequence[Sample], window: Window, pod_zones: Mapping[str, Any],
                     client_zone: Callable[[str], str]) -> float | None:
    """Of the completed requests due in ``window`` whose pod is known (``x-sim-pod``), the
    share served by a pod in another zone than their client's; None: no such request."""
    served = crossed = 0
    for s in samples:
        if not s.ok or s.pod is None or not window.holds(s.due_s):
            continue
        zone = pod_zones.get(s.pod)
        if zone is None:
            continue
        served += 1
        if zone != client_zone(s.conversation_id):
            crossed += 1
    return crossed / served if served else None


@dataclass
class PodOptions:
    """How the simulated pods are started (flags of ``python -m loadtest.simserver``)."""

    pods: int = 4
    time_scale: float = 1.0
    extra: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    """A balancer contender under a name of its own: a strategy and dotted settings, e.g.
    ``chwbl-local`` = chwbl with ``load.source=local``."""

    strategy: str
    settings: dict[str, Any]


def parse_variant(item: str) -> tuple[str, Variant]:
    """``NAME=STRATEGY[:KEY=VALUE,...]`` from ``--variant``."""
    import yaml

    name, sep, spec = item.partition("=")
    strategy, _, pairs = spec.partition(":")
    if not sep or not name or strategy not in STRATEGIES or name in CONTENDERS:
        raise SystemExit(f"--variant {item!r}: expected NAME=STRATEGY[:KEY=VALUE,...] with a "
                         f"new NAME and STRATEGY one of {', '.join(STRATEGIES)}")
    settings: dict[str, Any] = {}
    for pair in filter(None, pairs.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or "." not in key:
            raise SystemExit(f"--variant {item!r}: {pair!r} is not SECTION.KEY=VALUE")
        settings[key.strip()] = yaml.safe_load(value)
    return name, Variant(strategy, settings)


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``SECTION.KEY=VALUE`` pairs from ``--set``."""
    import yaml

    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


@dataclass
class RunOptions:
    """How each contender is driven and measured."""

    duration_s: float = 75.0
    warmup_s: float = DEFAULT_WARMUP_S
    cooldown_s: float = DEFAULT_COOLDOWN_S
    grace_s: float = DEFAULT_GRACE_S
    slo: Slo = field(default_factory=Slo)
    concurrency: int = 2048
    replicas: int = 1
    """Balancer processes per balancer contender; each request goes to one at random."""
    body_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 1
    """Seeds the fleet's random choice of replica."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Dotted balancer settings for every balancer contender (``--set``)."""
    variants: dict[str, Variant] = field(default_factory=dict)
    """Named balancer configurations run as contenders of their own (``--variant``)."""
    zones: int = 1
    """Simulated zones (1: none); see the module's docstring."""
    zone_weights: tuple[float, ...] = ()
    """Share of conversations whose client runs in each zone (empty: equal)."""
    cross_zone_rtt_s: float = DEFAULT_CROSS_ZONE_RTT_S
    """What a request served in another zone than its client's waits first."""
    restarts: tuple[Restart, ...] = ()
    """Pods restarted during each run, at the same times for every contender (``--restart``)."""
    phase_window_s: float = DEFAULT_PHASE_WINDOW_S
    """Seconds after a restarted pod's return that its "after return" phase covers."""

    def window(self) -> Window:
        return Window(self.warmup_s, max(self.warmup_s, self.duration_s - self.cooldown_s))


@dataclass
class Outcome:
    """One run of one contender."""

    name: str
    repeat: int
    result: RunResult
    summary: dict[str, Any]
    pods: list[dict[str, Any]]
    """Each pod's ``/stats`` after the run (counters since the warm-up ended)."""
    cpu: dict[str, float | None] = field(default_factory=dict)
    """Percent of one core per process over the run (see :class:`loadtest.hostcpu.CpuMeter`)."""
    clock_paused_s: float = 0.0
    """Wall seconds the pods' simulated clocks stood still after the warm-up because their
    process fell behind (the most of any pod; they share one process)."""
    in_flight: dict[str, float] = field(default_factory=dict)
    """Mean requests in flight per pod over the window (time-weighted): the real imbalance."""
    clock_span_s: float = 0.0
    """Wall seconds from the end of the warm-up to the end of the run."""
    cross_zone_share: float | None = None
    """With zones: the share of completed requests in the window served by a pod in another
    zone than their client's (see :func:`cross_zone_share`); None without zones."""
    restarts: list[dict[str, Any]] = field(default_factory=list)
    """The pods restarted during the run, as :func:`loadtest.restarts.restart_pods` did it."""
    phases: list[dict[str, Any]] = field(default_factory=list)
    """Figures of the phases around each restart (:func:`loadtest.restarts.phase_figures`)."""

    @property
    def invalid_reasons(self) -> list[str]:
        return invalid_reasons(self.cpu, self.clock_paused_s, self.clock_span_s)

    def row(self) -> dict[str, Any]:
        """The run's figures, flat."""
        s = self.summary
        served = [p.get("requests_served", 0) for p in self.pods]
        mean = sum(served) / len(served) if served else 0
        queries = sum(p.get("prefix_cache_queries", 0) for p in self.pods)
        hits = sum(p.get("prefix_cache_hits", 0) for p in self.pods)
        busy = [p["busy_fraction"] for p in self.pods if "busy_fraction" in p]
        reasons = self.invalid_reasons
        return {
            "contender": self.name,
            "repeat": self.repeat,
            **{key: s.get(key) for key in ROW_SUMMARY_KEYS},
            "hit_rate": hits / queries if queries else None,
            "pod_requests": served,
            "requests_max_over_mean": max(served) / mean if mean else None,
            "pod_in_flight": {pod: round(v, 2) for pod, v in self.in_flight.items()},
            "load_max_over_mean": _max_over_mean(list(self.in_flight.values())),
            "pod_busy_fraction": [round(b, 3) for b in busy],
            "preemptions": sum(p.get("preemptions", 0) for p in self.pods),
            "cross_zone_share": self.cross_zone_share,
            "pod_cross_zone_requests": sum(p.get("cross_zone_requests", 0) for p in self.pods),
            "cpu": self.cpu,
            "clock_paused_s": round(self.clock_paused_s, 3),
            "invalid": bool(reasons),
            "invalid_reasons": reasons,
            **({"restarts": self.restarts, "phases": self.phases} if self.restarts else {}),
        }


ROW_SUMMARY_KEYS = (
    "offered", "sent", "completed", "failed", "failed_by", "unfinished", "unsent", "error_kinds",
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_p99_censored_s", "itl_p50_s", "itl_p99_s",
    "e2e_p50_s", "e2e_p99_s", "e2e_p99_censored_s", "wait_p99_s", "offered_per_s",
    "requests_per_s", "output_tokens_per_s", "goodput_per_s", "goodput_share",
    "cached_token_share", "peak_in_flight", "cap_bound", "window_s",
)
"""Figures of a run's summary that its row carries."""

AGGREGATED_KEYS = (
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_p99_censored_s", "itl_p50_s", "itl_p99_s",
    "e2e_p50_s", "e2e_p99_s", "offered_per_s", "requests_per_s", "output_tokens_per_s",
    "goodput_per_s", "goodput_share", "hit_rate", "load_max_over_mean",
    "requests_max_over_mean", "cross_zone_share",
)
"""Figures reported as the median over repeats, with their min and max."""

SUMMED_KEYS = ("offered", "sent", "completed", "failed", "unfinished", "unsent", "preemptions",
               "clock_paused_s")
"""Counts added up over repeats."""


def invalid_reasons(cpu: Mapping[str, float | None], clock_paused_s: float = 0.0,
                    span_s: float = 0.0) -> list[str]:
    """Why a run measured the host rather than the modelled GPUs; empty if it did not.

    ``clock_paused_s`` of ``span_s``: how long the simulated clocks stood still because their
    process fell behind. A pause of a tenth of a second now and then (a garbage collection, a
    noisy neighbour) shifts a few requests; more than :data:`CLOCK_PAUSED_SHARE` of the run
    means the pods' process could not keep up with the modelled GPUs.
    """
    reasons = []
    for name, percent in cpu.items():
        if name in ("machine", "irq", "steal", "other") or percent is None:
            continue
        if percent >= PROCESS_SATURATED_PERCENT:
            reasons.append(f"{name} process at {percent:.0f}% of a core")
    machine = cpu.get("machine")
    cores = os.cpu_count() or 1
    if machine is not None and machine >= 100 * cores * HOST_SATURATED_SHARE:
        reasons.append(f"host CPU at {machine / cores:.0f}% of {cores} cores")
    if span_s > 0 and clock_paused_s > CLOCK_PAUSED_SHARE * span_s:
        reasons.append(f"simulated clocks stood still {clock_paused_s:.2f} s "
                       f"({clock_paused_s / span_s:.1%} of the run): host behind")
    return reasons


def mean_in_flight(samples: Sequence[Sample], window: Window) -> dict[str, float]:
    """Per pod, the time-weighted mean of requests in flight (sent to ended) over ``window``."""
    busy: dict[str, float] = {}
    length = window.length_s
    for s in samples:
        if s.pod is None or s.sent_s is None or s.end_s is None:
            continue
        overlap = min(s.end_s, window.end_s) - max(s.sent_s, window.start_s)
        busy[s.pod] = busy.get(s.pod, 0.0) + max(0.0, overlap)
    return {pod: total / length for pod, total in sorted(busy.items())} if length > 0 else {}


def _max_over_mean(values: Sequence[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean else None


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One contender's repeats as one row: medians with ``*_min``/``*_max``, summed counts."""
    first = rows[0]
    out: dict[str, Any] = {"contender": first["contender"], "repeats": len(rows)}
    for key in AGGREGATED_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
        out[f"{key}_min"] = min(values) if values else None
        out[f"{key}_max"] = max(values) if values else None
    for key in SUMMED_KEYS:
        out[key] = sum(r.get(key) or 0 for r in rows)
    failed_by: dict[str, int] = {}
    for r in rows:
        for cause, n in (r.get("failed_by") or {}).items():
            failed_by[cause] = failed_by.get(cause, 0) + n
    out["failed_by"] = failed_by
    out["cap_bound"] = any(r.get("cap_bound") for r in rows)
    out["invalid_runs"] = sum(1 for r in rows if r.get("invalid"))
    out["invalid_reasons"] = sorted({reason for r in rows for reason in r["invalid_reasons"]})
    if any(r.get("phases") for r in rows):
        out["phases"] = aggregate_phases([r.get("phases") or [] for r in rows])
    return out


# -- configurations ----------------------------------------------------------------------------


def balancer_config(pod_urls: Sequence[str], strategy: str, model: str, port: int,
                    admin_port: int, extra: dict[str, Any],
                    settings: dict[str, Any] | None = None, *,
                    pod_zones: Sequence[str] = (), zone: str | None = None) -> str:
    """The configuration of one balancer contender; ``settings`` are dotted overrides
    (``load.min_queue: 8``) applied last. With ``pod_zones`` (each pod's zone) the endpoints
    are listed with their zones, and ``zone`` is the replica's own (``routing.zone``)."""
    routing = {"strategy": strategy, **extra}
    endpoints: list[Any] = list(pod_urls)
    if pod_zones:
        endpoints = [{"url": url, "zone": pod_zone}
                     for url, pod_zone in zip(pod_urls, pod_zones, strict=True)]
    if zone:
        routing["zone"] = zone
    config: dict[str, Any] = {
        "server": {"host": HOST, "port": port, "admin_port": admin_port,
                   "log_level": "warning"},
        "pools": [{"name": "sim", "models": [model], "endpoints": endpoints}],
        "routing": routing,
        # Nothing sends traffic once a run is over: no Service needs time to see it leave.
        "drain": {"delay": 0, "timeout": 5},
    }
    for dotted, value in (settings or {}).items():
        section, _, key = dotted.partition(".")
        config.setdefault(section, {})[key] = value
    return json.dumps(config)


# -- one contender -----------------------------------------------------------------------------


class Progress:
    """A one-line live view of a run: elapsed time, requests, failures, recent TTFT p50."""

    def __init__(self, name: str, duration_s: float) -> None:
        self.name = name
        self.duration_s = duration_s
        self.ttfts: list[float] = []
        self.requests = 0
        self.failures = 0
        self.started = time.monotonic()
        self.tty = sys.stdout.isatty()

    def on_sample(self, sample: Sample) -> None:
        self.requests += 1
        if not sample.ok:
            self.failures += 1
        elif sample.ttft_s is not None:
            self.ttfts.append(sample.ttft_s)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        p50 = percentile(self.ttfts[-500:], 50)
        ttft = f"{p50:6.3f} s" if p50 is not None else "     - "
        return (f"  {self.name:<16} {min(elapsed, self.duration_s):5.0f}/{self.duration_s:.0f} s"
                f"  requests {self.requests:6d}  failed {self.failures:4d}"
                f"  TTFT p50 (recent) {ttft}")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0 if self.tty else 10.0)
            if self.tty:
                print("\r" + self.line(), end="", flush=True)
            else:
                print(self.line(), flush=True)


def label(name: str, replicas: int) -> str:
    """A contender's name in tables: balancer strategies in a fleet say how many replicas."""
    balancer = name not in (ORACLE, HAPROXY, VLLM_ROUTER)
    return f"{name} x{replicas}" if balancer and replicas > 1 else name


async def _pod_stats(session: aiohttp.ClientSession, pod_urls: Sequence[str]
                     ) -> list[dict[str, Any]]:
    stats = []
    for url in pod_urls:
        async with session.get(url + "/stats") as response:
            stats.append(await response.json())
    return stats


def _paused_s(pod_stats: Sequence[Mapping[str, Any]]) -> float:
    return max((float(s.get("clock_paused_s", 0.0)) for s in pod_stats), default=0.0)


async def _reset_after(session: aiohttp.ClientSession, pod_urls: Sequence[str], delay: float
                       ) -> tuple[float, float]:
    """At the end of the warm-up, zero the pods' counters; returns when (``perf_counter``) and
    how long their clocks had stood still by then."""
    await asyncio.sleep(delay)
    paused = _paused_s(await _pod_stats(session, pod_urls))
    for url in pod_urls:
        async with session.post(url + "/stats/reset") as response:
            await response.read()
    return time.perf_counter(), paused


async def run_contender(
    name: str,
    trace: list[TraceRecord],
    *,
    pods: PodOptions,
    run: RunOptions,
    model: str,
    routing: dict[str, Any],
    log_dir: Path,
    repeat: int = 0,
) -> Outcome:
    """Fresh pods, the contender in front of them, the trace played through it."""
    python = sys.executable
    tag = f"{name}-{repeat}"
    pod_args = [python, "-m", "loadtest.simserver", "--pods", str(pods.pods),
                "--port", "0", "--model", model, "--time-scale", str(pods.time_scale),
                "--log-level", "warning", *pods.extra]
    zones = zone_names(run.zones)
    client_zone: ClientZones | None = None
    if zones:
        pod_args += ["--zones", ",".join(zones), "--cross-zone-rtt", str(run.cross_zone_rtt_s)]
        client_zone = ClientZones(zones, run.zone_weights or (1.0,) * len(zones), run.seed)
    async with contextlib.AsyncExitStack() as stack:
        services = await stack.enter_async_context(Services(log_dir))
        pod_proc = services.start(f"{tag}-pods", pod_args)
        matches = await wait_for_lines(pod_proc, r"listening on (http://\S+)", pods.pods)
        pod_urls = [m.group(1) for m in matches]
        pod_zones = [zones[i % len(zones)] for i in range(len(pod_urls))] if zones else []
        for url in pod_urls:
            await wait_ready(pod_proc, url + "/health")
        session = await stack.enter_async_context(aiohttp.ClientSession())
        pids = {"pods": pod_proc.pid}

        route: Callable[[str], str] | None = None
        base_url = ""
        session_header: str | None = None
        if name == ORACLE:
            assigned: dict[str, str] = {}

            def route(conversation_id: str) -> str:
                url = assigned.get(conversation_id)
                if url is None:
                    url = assigned[conversation_id] = pod_urls[len(assigned) % len(pod_urls)]
                return url + "/v1"
        elif name == HAPROXY:
            port = free_port()
            config = log_dir / f"{tag}-haproxy.cfg"
            # The same bound as balancer's, for a like-for-like comparison.
            load_factor = routing.get("load_factor", RoutingSettings().load_factor)
            config.write_text(haproxy.config(
                pod_urls, port=port, balance=haproxy.balance_header(SESSION_HEADER),
                load_factor=load_factor, maxconn=haproxy.maxconn_within_fd_limit()))
            proc = services.start(f"{tag}-haproxy",
                                  haproxy.argv(haproxy.find() or HAPROXY, config))
            pids[HAPROXY] = proc.pid
            base_url = f"http://{HOST}:{port}/v1"
            session_header = SESSION_HEADER
            await wait_ready(proc, f"http://{HOST}:{port}/v1/models")
        elif name == VLLM_ROUTER:
            port, metrics_port = free_port(), free_port()
            proc = services.start(f"{tag}-{VLLM_ROUTER}", [
                find_executable(VLLM_ROUTER) or VLLM_ROUTER, "--host", HOST, "--port", str(port),
                "--worker-urls", *pod_urls, "--policy", "cache_aware",
                "--prometheus-host", HOST, "--prometheus-port", str(metrics_port),
                "--log-level", "warning"])
            pids[VLLM_ROUTER] = proc.pid
            base_url = f"http://{HOST}:{port}/v1"
            await wait_ready(proc, f"http://{HOST}:{port}/v1/models")
        else:
            urls = []
            by_zone: dict[str, list[str]] = {}
            for replica in range(run.replicas):
                port, admin_port = free_port(), free_port()
                config = log_dir / f"{tag}-{replica}.yaml"
                variant = run.variants.get(name, Variant(name, {}))
                replica_zone = zones[replica % len(zones)] if zones else None
                config.write_text(balancer_config(
                    pod_urls, variant.strategy, model, port, admin_port, routing,
                    {**run.settings, **variant.settings}, pod_zones=pod_zones,
                    zone=replica_zone))
                proc = services.start(f"{tag}-balancer-{replica}",
                                      [python, "-m", "balancer", "serve", "--config", str(config)])
                pids["balancer" if run.replicas == 1 else f"balancer-{replica}"] = proc.pid
                await wait_ready(proc, f"http://{HOST}:{admin_port}/readyz")
                urls.append(f"http://{HOST}:{port}/v1")
                if replica_zone is not None:
                    by_zone.setdefault(replica_zone, []).append(urls[-1])
            base_url = urls[0]
            if client_zone is not None:
                route = zone_spread(by_zone, client_zone, run.seed)
            else:
                route = random_spread(urls, run.seed)

        shown = label(name, run.replicas)
        progress = Progress(shown, run.duration_s)
        ticker = asyncio.create_task(progress.run())
        reset = asyncio.create_task(_reset_after(session, pod_urls, run.warmup_s))
        meter = CpuMeter(pids, "self")
        began = time.perf_counter()
        restarter = asyncio.create_task(
            restart_pods(session, pod_urls, run.restarts, began))
        try:
            result = await play(
                trace, base_url or pod_urls[0] + "/v1", duration_s=run.duration_s,
                concurrency=run.concurrency, route=route, session_header=session_header,
                on_sample=progress.on_sample, grace_s=run.grace_s, request_timeout_s=120.0,
                body_overrides=run.body_overrides,
                conversation_headers=None if client_zone is None else client_zone.headers,
            )
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        cpu = meter.stop()
        ended = time.perf_counter()
        since, paused_at_warmup = began, 0.0
        if reset.done():
            since, paused_at_warmup = reset.result()
        else:  # a run shorter than its warm-up: the counters cover the whole run
            reset.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reset
        print(("\r" if progress.tty else "") + progress.line(), flush=True)
        restarted = await _restarts_done(restarter)
        pod_stats = await _pod_stats(session, pod_urls)
    summary = summarize(result, warmup_s=run.warmup_s, cooldown_s=run.cooldown_s, slo=run.slo)
    window = result.window(run.warmup_s, run.cooldown_s)
    crossed = None
    if client_zone is not None:
        # The pods say their zones (``/stats``); the samples which pod served them.
        pod_zone_of = {str(s.get("pod")): s.get("zone") for s in pod_stats}
        crossed = cross_zone_share(result.samples, window, pod_zone_of, client_zone)
    phases = phase_figures(
        result.samples, restarted, phase_window_s=run.phase_window_s,
        end_s=result.window_end_s if result.window_end_s is not None else result.wall_s,
        slo=run.slo)
    return Outcome(shown, repeat, result, summary, pod_stats, cpu,
                   _paused_s(pod_stats) - paused_at_warmup,
                   mean_in_flight(result.samples, window), ended - since, crossed,
                   restarts=restarted, phases=phases)


async def _restarts_done(task: asyncio.Task[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The restarts of a run that has ended; one scheduled after the run's end never came."""
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return []
    records = task.result()
    for record in records:
        if "error" in record:
            print(f"  restart {record['restart']} failed: {record['error']}", flush=True)
    return [r for r in records if "error" not in r]


# -- report ------------------------------------------------------------------------------------


def _spread(row: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``median (min-max)`` over repeats, or the single value."""
    value = fixed(row.get(key), digits)
    low, high = row.get(f"{key}_min"), row.get(f"{key}_max")
    if row.get("repeats", 1) > 1 and None not in (row.get(key), low, high):
        return f"{value} ({fixed(low, digits)}..{fixed(high, digits)})"
    return value


def _failures(row: Mapping[str, Any]) -> str:
    causes = ", ".join(f"{cause} {n}" for cause, n in sorted(row.get("failed_by", {}).items()))
    return f"{row['failed']}" + (f" ({causes})" if causes else "")


TABLE_NOTE = (
    "Latency counts from when each request was due. *offered*: requests due in the measured "
    "window; *completed* + *failed* + *unfinished* = offered. *Unfinished*: still running (or "
    "never sent) when the run ended; they count as failures, and at their age (a lower bound) "
    "in *TTFT p99 censored*. Latencies otherwise cover completed requests. *goodput*: "
    "completed requests/s within the SLO. *pod load*: max/mean of the time-weighted requests "
    "in flight per pod. With repeats: median (min-max). *valid*: no: the host, not the "
    "modelled GPUs, was the bottleneck (reasons in the JSON). *cross-zone* (with --zones): "
    "share of completed requests served by a pod in another zone than their client's."
)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per contender (aggregated rows, see :func:`aggregate`); a *cross-zone*
    column when the rows have zones."""
    zoned = any(r.get("cross_zone_share") is not None for r in rows)
    header = ("| contender | offered | completed | failed | unfinished | TTFT p50 (s) "
              "| TTFT p99 (s) | TTFT p99 censored (s) | ITL p50 (s) | E2E p50 (s) "
              "| output tok/s | goodput (req/s) | prefix-cache hit rate | pod load max/mean "
              + ("| cross-zone " if zoned else "") + "| valid |")
    lines = [header, "|" + "---|" * (16 if zoned else 15)]
    for r in rows:
        valid = "yes" if not r.get("invalid_runs") else f"no ({r['invalid_runs']})"
        cross = f"| {_spread(r, 'cross_zone_share')} " if zoned else ""
        lines.append(
            f"| {r['contender']} | {r['offered']} | {r['completed']} | {_failures(r)} "
            f"| {r['unfinished']} | {_spread(r, 'ttft_p50_s')} | {_spread(r, 'ttft_p99_s')} "
            f"| ≥ {_spread(r, 'ttft_p99_censored_s')} | {_spread(r, 'itl_p50_s')} "
            f"| {_spread(r, 'e2e_p50_s')} | {_spread(r, 'output_tokens_per_s', 0)} "
            f"| {_spread(r, 'goodput_per_s', 2)} | {_spread(r, 'hit_rate')} "
            f"| {_spread(r, 'load_max_over_mean', 2)} {cross}| {valid} |")
    return "\n".join(lines)


def ratios(rows: Sequence[Mapping[str, Any]], subject: str = "chwbl") -> dict[str, str]:
    """The subject (CHWBL by default) against every other contender, in words."""
    from loadtest.plots import ratio_words

    by = {r["contender"]: r for r in rows}
    mine = by.get(subject)
    if mine is None:
        return {}
    out = {f"vs {name}": ratio_words(mine, other) for name, other in by.items() if name != subject}
    oracle = by.get(ORACLE)
    if oracle is not None and mine.get("hit_rate") and oracle.get("hit_rate"):
        share = mine["hit_rate"] / oracle["hit_rate"]
        out["hit rate vs sticky-oracle"] = f"{100 * share:.1f}% of the oracle's"
    return out


def subtitle(args: argparse.Namespace, trace_size: int) -> str:
    """The run's parameters in one line, for plots and tables."""
    rate = "default rate" if args.rate is None else f"{args.rate:g}/s"
    replicas = f", {args.replicas} replicas" if args.replicas > 1 else ""
    if args.zones > 1:
        replicas += f" in {args.zones} zones"
    return (f"{args.workload} (seed {args.seed}, {rate}, {trace_size} requests in the trace), "
            f"{args.pods} pods{replicas}, {args.duration:g} s per run "
            f"({args.warmup:g} s warm-up, {args.cooldown:g} s cool-down), "
            f"{args.repeat} repeat{'s' if args.repeat > 1 else ''}")


def write_report(args: argparse.Namespace, argv: Sequence[str], outcomes: Sequence[Outcome],
                 trace_size: int) -> dict[str, Any]:
    """The markdown table, the JSON report, the samples and the plots, in ``args.out``."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_run = [o.row() for o in outcomes]
    names = list(dict.fromkeys(o.name for o in outcomes))
    rows = [aggregate([r for r in per_run if r["contender"] == name]) for name in names]
    line = subtitle(args, trace_size)
    run_options = run_options_from(args)
    report = {
        "command": " ".join(["python -m loadtest.compare", *argv]),
        "parameters": line,
        "workload": args.workload,
        "seed": args.seed,
        "rate": args.rate,
        "trace_requests": trace_size,
        "duration_s": args.duration,
        "window": {"warmup_s": args.warmup, "cooldown_s": args.cooldown},
        "slo": {"ttft_s": run_options.slo.ttft_s, "itl_s": run_options.slo.itl_s},
        "pods": args.pods,
        "pod_args": list(args.pod_arg),
        "replicas": args.replicas,
        "zones": zone_names(args.zones),
        "zone_weights": list(run_options.zone_weights),
        "cross_zone_rtt_s": args.cross_zone_rtt if args.zones > 1 else None,
        "repeats": args.repeat,
        "routing": parse_routing(args.routing),
        "shape": list(args.shape),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "rows": rows,
        "runs": per_run,
        "ratios": ratios(rows),
    }
    table = markdown_table(rows)
    ratio_lines = [f"- chwbl {key}: {words}" for key, words in report["ratios"].items()]
    phases = phase_table(rows, args.pods)
    if phases:
        report["restarts"] = {"schedule": list(args.restart),
                              "phase_window_s": args.phase_window}
    (out_dir / "compare.md").write_text(
        f"# Strategy comparison\n\n`{report['command']}`\n\n{line}\n\n{table}\n\n"
        f"{TABLE_NOTE}\n\n" + "\n".join(ratio_lines) + "\n"
        + (f"\n## Around the restarts\n\n{phases}\n" if phases else ""))
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2))
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for o in outcomes:
            write_samples(o.result.samples, f, contender=o.name, repeat=o.repeat)
    print()
    print(line)
    print(table)
    print("\n".join(ratio_lines))
    if phases:
        print("\n" + phases)
    for r in rows:
        if r["invalid_runs"]:
            print(f"  INVALID {r['contender']}: " + "; ".join(r["invalid_reasons"]))
        if r["cap_bound"]:
            print(f"  {r['contender']}: the client's concurrency cap bound; raise --concurrency")
    if not args.no_plots:
        from loadtest.plots import plot_comparison

        first = {o.name: o.result.samples for o in outcomes if o.repeat == 0}
        paths = plot_comparison(first, rows, out_dir, line, window=run_options.window(),
                                down=down_spans(outcomes))
        print("plots: " + ", ".join(str(p) for p in paths))
    print(f"table: {out_dir / 'compare.md'}, {out_dir / 'compare.json'}; "
          f"samples: {out_dir / 'samples.jsonl'}")
    return report


def down_spans(outcomes: Sequence[Outcome]) -> list[tuple[float, float]]:
    """When restarted pods were down (seconds since the start), as the first run that
    restarted any recorded it: the schedule is the same in every run."""
    for o in outcomes:
        if o.restarts:
            return [(r["at_s"], r["at_s"] + r["serving_in_s"]) for r in o.restarts]
    return []


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.compare",
        description="Play one workload through each routing strategy on simulated pods.",
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated, from {', '.join(CONTENDERS)} "
                             "(haproxy and vllm-router are skipped when not installed)")
    parser.add_argument("--workload", default="multi-turn", choices=tuple(WORKLOADS),
                        help="seeded workload (see loadtest/workloads.py; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=None,
                        help="arrivals per second (conversations or requests); workload default")
    parser.add_argument("--duration", type=float, default=75.0,
                        help="seconds in which requests become due, per run (default: "
                             "%(default)s)")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S,
                        help="seconds at the start left out of the statistics (default: "
                             "%(default)s)")
    parser.add_argument("--cooldown", type=float, default=DEFAULT_COOLDOWN_S,
                        help="seconds at the end left out of the statistics (default: "
                             "%(default)s)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help="seconds requests may finish after the duration; then they are "
                             "unfinished (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per contender, interleaved (A B C, A B C, ...)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="balancer processes per balancer contender; each request goes to "
                             "one at random (a fleet of sidecars)")
    parser.add_argument("--zones", type=int, default=1,
                        help="simulated zones: pod i in zone i mod Z, balancer replica r in "
                             "zone r mod Z (needs --replicas >= Z), each conversation's "
                             "client in a zone drawn from --zone-weights; 1: no zones")
    parser.add_argument("--zone-weights", default=None, metavar="W,...",
                        help="share of conversations whose client runs in each zone, e.g. "
                             "0.7,0.3 (default: equal)")
    parser.add_argument("--cross-zone-rtt", type=float, default=DEFAULT_CROSS_ZONE_RTT_S,
                        help="simulated seconds a request served in another zone than its "
                             "client's waits first: one round trip between zones of a region "
                             "(default: %(default)s)")
    Slo.add_arguments(parser)
    parser.add_argument("--strict", action="store_true",
                        help=f"exit {INVALID_EXIT} when any run was invalid (host-limited)")
    parser.add_argument("--pods", type=int, default=4, help="simulated pods")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="simulated pods' wall seconds per simulated second")
    parser.add_argument("--pod-arg", action="append", default=[],
                        help="extra flag for the simulated pods, "
                             "e.g. --pod-arg=--kv-cache-blocks=4000")
    parser.add_argument("--shape", action="append", default=[], metavar="KEY=VALUE",
                        help="workload shape field, e.g. --shape max_tokens=100-300 "
                             "--shape think_mean_s=1 (see loadtest/workloads.py)")
    parser.add_argument("--routing", action="append", default=[], metavar="KEY=VALUE",
                        help="balancer routing setting, e.g. --routing prefix_chars=200")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        dest="settings",
                        help="balancer setting for every balancer contender, e.g. "
                             "--set load.min_queue=8")
    parser.add_argument("--variant", action="append", default=[],
                        metavar="NAME=STRATEGY[:SECTION.KEY=VALUE,...]",
                        help="a balancer contender of its own, e.g. "
                             "--variant chwbl-local=chwbl:load.source=local; name it in "
                             "--contenders")
    parser.add_argument("--restart", action="append", default=[], metavar="POD@T:DOWN",
                        help="restart simulated pod POD (an index) T seconds into every "
                             "contender's run, down DOWN seconds (cut requests, cold cache), "
                             "e.g. 1@30:5; repeatable. Adds figures for the phases around it")
    parser.add_argument("--phase-window", type=float,
                        default=DEFAULT_PHASE_WINDOW_S,
                        help="seconds after a restarted pod's return that the 'after return' "
                             "phase covers (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=2048,
                        help="requests in flight at most on the client side (reported when "
                             "it binds)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="results/compare", help="output directory")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def parse_routing(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    routing: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--routing {item!r}: expected KEY=VALUE")
        routing[key.strip()] = yaml.safe_load(value)
    return routing


def parse_shape(workload: str, items: Sequence[str]) -> Any:
    """``KEY=VALUE`` pairs onto the workload's default shape (``LO-HI`` for ranges)."""
    try:
        return workloads.parse_shape(workload, items)
    except ValueError as e:
        raise SystemExit(f"--shape {e}") from None


def run_options_from(args: argparse.Namespace) -> RunOptions:
    if args.warmup < 0 or args.cooldown < 0 or args.warmup + args.cooldown >= args.duration:
        raise SystemExit("--warmup and --cooldown must be >= 0 and leave part of --duration")
    if args.repeat < 1 or args.replicas < 1:
        raise SystemExit("--repeat and --replicas must be >= 1")
    if not 1 <= args.zones <= MAX_ZONES:
        raise SystemExit(f"--zones must be in 1..{MAX_ZONES}")
    if args.zones > 1 and args.replicas < args.zones:
        raise SystemExit(f"--zones {args.zones} needs --replicas >= {args.zones}: every zone "
                         "needs a balancer replica for its clients")
    if args.zone_weights and args.zones <= 1:
        raise SystemExit("--zone-weights needs --zones >= 2")
    if not args.cross_zone_rtt >= 0:
        raise SystemExit("--cross-zone-rtt must be >= 0 seconds")
    return RunOptions(
        duration_s=args.duration, warmup_s=args.warmup, cooldown_s=args.cooldown,
        grace_s=args.grace, slo=Slo.from_arguments(args), concurrency=args.concurrency,
        replicas=args.replicas, seed=args.seed, settings=parse_settings(args.settings),
        variants=dict(parse_variant(v) for v in args.variant), zones=args.zones,
        zone_weights=parse_zone_weights(args.zone_weights, args.zones),
        cross_zone_rtt_s=args.cross_zone_rtt,
        **restart_options_from(args))


def restart_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """``--restart`` and ``--phase-window`` as :class:`RunOptions` fields."""
    if args.phase_window <= 0:
        raise SystemExit("--phase-window must be > 0")
    return {"restarts": tuple(parse_restart(item, pods=args.pods, duration_s=args.duration)
                              for item in args.restart),
            "phase_window_s": args.phase_window}


def contenders_from(spec: str, variants: Sequence[str] = ()) -> list[str]:
    """The contenders asked for, less optional tools that are not installed."""
    contenders = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS and c not in variants]
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(unknown)}")
    for tool, install in OPTIONAL_TOOLS.items():
        if tool in contenders and find_executable(tool) is None:
            print(f"{tool} is not installed: skipping it ({install})")
            contenders.remove(tool)
    return contenders


def trace_from(args: argparse.Namespace, rate: float | None) -> list[TraceRecord]:
    """The seeded workload the arguments describe, at ``rate`` (None: the workload's default),
    with arrivals over ``--duration``."""
    options: dict[str, Any] = {"duration_s": args.duration, "model": args.model}
    if rate is not None:
        options["rate"] = rate
    if args.shape:
        options["shape"] = parse_shape(args.workload, args.shape)
    return generate(args.workload, args.seed, **options)


def pod_options_from(args: argparse.Namespace) -> PodOptions:
    return PodOptions(pods=args.pods, time_scale=args.time_scale, extra=list(args.pod_arg))


async def run_all(args: argparse.Namespace, trace: list[TraceRecord]) -> list[Outcome]:
    """Play the workload through every contender, interleaved over the repeats."""
    run = run_options_from(args)
    contenders = contenders_from(args.contenders, list(run.variants))
    routing = parse_routing(args.routing)
    pods = pod_options_from(args)
    print(f"workload {args.workload} (seed {args.seed}): {len(trace)} requests in the trace over "
          f"{args.duration:g} s, {args.pods} simulated pods, contenders: {', '.join(contenders)}"
          f", {args.repeat} repeat(s)")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="balancer-compare-") as tmp:
        log_dir = Path(tmp)
        for repeat in range(args.repeat):
            for name in contenders:
                outcomes.append(await run_contender(
                    name, trace, pods=pods, run=run, model=args.model, routing=routing,
                    log_dir=log_dir, repeat=repeat))
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    run_options_from(args)  # reject bad window settings before anything starts
    # SIGTERM stops a run like Ctrl-C does, so the pods and balancers it started are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise_fd_limit()
    trace = trace_from(args, args.rate)
    try:
        import uvloop

        outcomes = uvloop.run(run_all(args, trace))
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    report = write_report(args, argv, outcomes, len(trace))
    if args.strict and any(r["invalid_runs"] for r in report["rows"]):
        return INVALID_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
