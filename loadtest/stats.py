"""Per-request samples of a load run and their summary: every request accounted for.

Both load generators produce :class:`Sample` records: the asyncio player
(:mod:`loadtest.player`) and the Locust file. :func:`summarize_samples` turns them into one
flat, JSON-serializable dict, so every run (and every contender in a comparison) reports the
same keys.

Three rules make the figures honest:

* **Latency counts from when a request was due**, not from when the client got round to
  sending it: TTFT, ITL and E2E include any wait in the client (a concurrency cap, a busy
  event loop). A request is due at its scheduled arrival (a conversation's first turn) or when
  its turn came (the previous reply's end plus the think time).
* **Every request due in the window is accounted for**: ``offered = completed + failed +
  unfinished``. Failures keep their cause (``http``, ``stream``, ``timeout``, ``connect``);
  requests still running (or never sent) when the run ends are *unfinished*: they count as
  failures, and their age at the end is a lower bound on their latency, so the *censored*
  percentiles (completed latencies plus the ages of unfinished requests) cannot hide a queue
  that never drained.
* **Warm-up and cool-down are left out** of the statistics: the window is ``[warmup_s,
  window_end_s - cooldown_s)`` by due time, so caches filling at the start and the run's last
  requests (which see a draining system) do not bend the figures.

Percentiles are computed from the raw samples, never from histograms or buckets: linear
interpolation between the two closest ranks (the default of NumPy and of most papers), so the
p50 of ``[1, 2, 3, 4]`` is 2.5 and the p100 is the maximum.

This module imports nothing beyond the standard library; Locust loads it under gevent.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FAILURE_CAUSES",
    "OK",
    "OUTCOMES",
    "UNFINISHED",
    "RunResult",
    "Sample",
    "Slo",
    "Window",
    "load_samples",
    "percentile",
    "summarize",
    "summarize_samples",
    "write_samples",
]

ERROR_TEXT_MAX = 80
"""Error messages are grouped by their first characters, so one bad reply body does not make a
key of its own for every request."""

OK = "ok"
UNFINISHED = "unfinished"
FAILURE_CAUSES = ("http", "stream", "timeout", "connect")
"""Why a sent request failed: an HTTP error status, a broken or erroneous event stream, the
client's per-request timeout, or no connection (refused, reset before any response)."""
OUTCOMES = (OK, *FAILURE_CAUSES, UNFINISHED)
"""Every request ends in exactly one of these."""


@dataclass(frozen=True)
class Slo:
    """Service-level objective for goodput: a request is *good* if it completed with a TTFT of
    at most ``ttft_s`` and a mean inter-token gap of at most ``itl_s`` (seconds).

    Defaults suit interactive chat: the first token within a second, and at least 10 tokens/s
    after it (faster than people read), as in vLLM's ``benchmark_serving --goodput``.
    """

    ttft_s: float = 1.0
    itl_s: float = 0.1

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """``--slo-ttft`` and ``--slo-itl``, for every command that reports goodput."""
        parser.add_argument("--slo-ttft", type=float, default=Slo.ttft_s,
                            help="goodput SLO: time to first token, seconds (default: "
                                 "%(default)s)")
        parser.add_argument("--slo-itl", type=float, default=Slo.itl_s,
                            help="goodput SLO: mean inter-token gap, seconds (default: "
                                 "%(default)s)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Slo:
        if args.slo_ttft <= 0 or args.slo_itl <= 0:
            raise SystemExit("--slo-ttft and --slo-itl must be > 0")
        return cls(args.slo_ttft, args.slo_itl)

    def met_by(self, sample: Sample) -> bool:
        if sample.outcome != OK or sample.ttft_s is None or sample.ttft_s > self.ttft_s:
            return False
        return not sample.itl_s or math.fsum(sample.itl_s) / len(sample.itl_s) <= self.itl_s


@dataclass(frozen=True)
class Window:
    """The part of a run whose requests are measured, by due time (seconds from the start)."""

    start_s: float
    end_s: float

    @property
    def length_s(self) -> float:
        return max(0.0, self.end_s - self.start_s)

    def holds(self, due_s: float) -> bool:
        return self.start_s <= due_s < self.end_s


@dataclass
class Sample:
    """What one request did. Times are seconds (``time.perf_counter`` differences); ``*_s``
    instants count from the start of the run."""

    conversation_id: str
    turn: int
    due_s: float
    """When the request became due: its scheduled arrival, or when its turn came."""
    sent_s: float | None = None
    """When the request was handed to the connection; None if it never was (``unfinished``)."""
    ttft_s: float | None = None
    """From due to the first chunk that carries content; None if none came."""
    e2e_s: float | None = None
    """From due to the end of the stream (or the failure). For an unfinished request: its age
    when the run ended, a lower bound."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive content-bearing chunks."""
    output_tokens: int = 0
    """From ``usage.completion_tokens`` if the server sent usage, else content chunks counted."""
    prompt_tokens: int | None = None
    """``usage.prompt_tokens``, if reported."""
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens``, if reported."""
    status: int | None = None
    """HTTP status; None when no response arrived (connect error, timeout before headers)."""
    outcome: str = OK
    """One of :data:`OUTCOMES`."""
    error: str | None = None
    """None on success; otherwise what went wrong, in words."""
    endpoint: str | None = None
    """The ``x-balancer-endpoint`` response header: which upstream the balancer chose."""
    pod: str | None = None
    """The ``x-sim-pod`` response header: which simulated pod served the request."""
    target: str | None = None
    """The base URL the request was sent to (one of several balancer replicas, a pinned pod)."""

    @property
    def ok(self) -> bool:
        """Completed without error."""
        return self.outcome == OK

    @property
    def wait_s(self) -> float | None:
        """Time the request waited in the client between due and sent."""
        return None if self.sent_s is None else self.sent_s - self.due_s

    @property
    def end_s(self) -> float | None:
        """When the request ended (or the run ended, for an unfinished one)."""
        return None if self.e2e_s is None else self.due_s + self.e2e_s

    def fail(self, cause: str, message: str) -> None:
        """Record a failure; the first one recorded stands."""
        if cause not in FAILURE_CAUSES and cause != UNFINISHED:
            raise ValueError(f"unknown failure cause {cause!r}")
        if self.outcome == OK:
            self.outcome = cause
            self.error = message

    def to_json(self) -> dict[str, Any]:
        """The sample as a plain dict (one line of the samples file)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        return cls(**data)


@dataclass
class RunResult:
    """The samples of one run and how long it took."""

    samples: list[Sample]
    wall_s: float
    """From the start of the run to the moment the last request finished or was given up."""
    window_end_s: float | None = None
    """End of the span in which requests could become due (the run's duration); None: the
    run played its whole trace, so every due request counts."""
    started_at: float = 0.0
    """Unix time of the start, to line samples up with server-side metrics."""
    stopped_by: str = "trace-end"
    """Why the run ended: ``trace-end``, ``duration`` or ``max-requests``."""
    concurrency_cap: int | None = None
    """The client's cap on requests in flight, if it had one."""
    peak_in_flight: int = 0
    """Most requests the client had in flight at once; equal to the cap means it bound."""

    def window(self, warmup_s: float = 0.0, cooldown_s: float = 0.0) -> Window:
        """The measured window of this run."""
        end = self.window_end_s if self.window_end_s is not None else self.wall_s
        return Window(warmup_s, max(warmup_s, end - cooldown_s))

    def to_json(self) -> dict[str, Any]:
        """The run, samples included, as a plain dict."""
        return {
            "wall_s": self.wall_s,
            "window_end_s": self.window_end_s,
            "started_at": self.started_at,
            "stopped_by": self.stopped_by,
            "concurrency_cap": self.concurrency_cap,
            "peak_in_flight": self.peak_in_flight,
            "samples": [sample.to_json() for sample in self.samples],
        }


def write_samples(samples: Iterable[Sample], out: IO[str], **extra: Any) -> int:
    """Write one JSON object per sample (JSON Lines), each with ``extra`` keys added (e.g. the
    contender and the repeat); returns how many."""
    count = 0
    for sample in samples:
        out.write(json.dumps({**extra, **sample.to_json()}, separators=(",", ":")) + "\n")
        count += 1
    return count


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a samples file, as dicts (extra keys included)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _per_s(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def summarize(
    result: RunResult,
    *,
    warmup_s: float = 0.0,
    cooldown_s: float = 0.0,
    slo: Slo | None = None,
) -> dict[str, Any]:
    """Summarize a run over its window; see :func:`summarize_samples` for the keys."""
    summary = summarize_samples(
        result.samples, result.window(warmup_s, cooldown_s), slo=slo, wall_s=result.wall_s
    )
    summary["stopped_by"] = result.stopped_by
    summary["concurrency_cap"] = result.concurrency_cap
    summary["peak_in_flight"] = result.peak_in_flight
    summary["cap_bound"] = (
        result.concurrency_cap is not None and result.peak_in_flight >= result.concurrency_cap
    )
    return summary


def summarize_samples(
    samples: Iterable[Sample],
    window: Window,
    *,
    slo: Slo | None = None,
    wall_s: float | None = None,
) -> dict[str, Any]:
    """Summarize the samples due within ``window``.

    Keys (times in seconds, None where there is no data):

    * accounting: ``offered`` (due in the window) ``= completed + failed + unfinished``;
      ``sent``; ``failed_by`` (cause → count, causes in :data:`FAILURE_CAUSES`); ``unsent``
      (unfinished and never sent); ``error_kinds`` (message → count, failures and unfinished);
      ``error_rate`` (failed and unfinished / offered); ``window_s``, ``warmup_s``, ``wall_s``;
    * latency over completed requests: ``ttft_p50_s``, ``ttft_p90_s``, ``ttft_p99_s``,
      ``ttft_mean_s``, ``ttft_max_s``; ``itl_p50_s``, ``itl_p90_s``, ``itl_p99_s`` (over every
      gap); ``e2e_p50_s``, ``e2e_p90_s``, ``e2e_p99_s``, ``e2e_mean_s``; ``wait_p99_s`` and
      ``wait_max_s`` (due → sent, the client's own delay);
    * censored latency, completed plus unfinished requests at their age (lower bounds):
      ``ttft_p50_censored_s``, ``ttft_p99_censored_s``, ``e2e_p99_censored_s``;
    * rates over the window length: ``offered_per_s``, ``requests_per_s`` (completed),
      ``output_tokens`` and ``output_tokens_per_s`` (of completed requests), and with an SLO
      ``goodput_per_s`` (completed within it) and ``goodput_share`` (of offered);
    * ``prompt_tokens``, ``cached_tokens``, ``cached_token_share`` (cached / prompt tokens of
      completed requests that reported both);
    * ``per_endpoint`` and ``per_pod`` (completed requests by ``x-balancer-endpoint`` and
      ``x-sim-pod``), ``endpoint_imbalance`` (max / mean of ``per_endpoint``, or of ``per_pod``
      when no endpoint headers came).
    """
    slo = slo if slo is not None else Slo()
    offered = [s for s in samples if window.holds(s.due_s)]
    good = [s for s in offered if s.outcome == OK]
    unfinished = [s for s in offered if s.outcome == UNFINISHED]
    failed = [s for s in offered if s.outcome in FAILURE_CAUSES]
    ttft = [s.ttft_s for s in good if s.ttft_s is not None]
    e2e = [s.e2e_s for s in good if s.e2e_s is not None]
    itl = [gap for s in good for gap in s.itl_s]
    waits = [w for s in offered if (w := s.wait_s) is not None]
    ttft_censored = ttft + [
        s.ttft_s if s.ttft_s is not None else (s.e2e_s or 0.0) for s in unfinished
    ]
    e2e_censored = e2e + [s.e2e_s or 0.0 for s in unfinished]
    output_tokens = sum(s.output_tokens for s in good)
    reported = [s for s in good if s.prompt_tokens is not None and s.cached_tokens is not None]
    prompt_tokens = sum(s.prompt_tokens or 0 for s in reported)
    cached_tokens = sum(s.cached_tokens or 0 for s in reported)
    per_endpoint = Counter(s.endpoint for s in good if s.endpoint is not None)
    per_pod = Counter(s.pod for s in good if s.pod is not None)
    spread = per_endpoint or per_pod
    length = window.length_s
    lost = [*failed, *unfinished]
    return {
        "offered": len(offered),
        "sent": sum(1 for s in offered if s.sent_s is not None),
        "completed": len(good),
        "failed": len(failed),
        "failed_by": {cause: n for cause in FAILURE_CAUSES
                      if (n := sum(1 for s in failed if s.outcome == cause))},
        "unfinished": len(unfinished),
        "unsent": sum(1 for s in unfinished if s.sent_s is None),
        "error_rate": len(lost) / len(offered) if offered else 0.0,
        "error_kinds": dict(
            Counter((s.error or s.outcome)[:ERROR_TEXT_MAX] for s in lost).most_common()
        ),
        "window_s": length,
        "warmup_s": window.start_s,
        "wall_s": wall_s,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": _mean(ttft),
        "ttft_max_s": max(ttft, default=None),
        "ttft_p50_censored_s": percentile(ttft_censored, 50),
        "ttft_p99_censored_s": percentile(ttft_censored, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p90_s": percentile(itl, 90),
        "itl_p99_s": percentile(itl, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p90_s": percentile(e2e, 90),
        "e2e_p99_s": percentile(e2e, 99),
        "e2e_mean_s": _mean(e2e),
        "e2e_p99_censored_s": percentile(e2e_censored, 99),
        "wait_p99_s": percentile(waits, 99),
        "wait_max_s": max(waits, default=None),
        "offered_per_s": _per_s(len(offered), length),
        "requests_per_s": _per_s(len(good), length),
        "output_tokens": output_tokens,
        "output_tokens_per_s": _per_s(output_tokens, length),
        "slo": asdict(slo),
        "goodput_per_s": _per_s(sum(1 for s in good if slo.met_by(s)), length),
        "goodput_share": (sum(1 for s in good if slo.met_by(s)) / len(offered)
                          if offered else None),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "cached_token_share": cached_tokens / prompt_tokens if prompt_tokens else None,
        "per_endpoint": dict(sorted(per_endpoint.items())),
        "per_pod": dict(sorted(per_pod.items())),
        "endpoint_imbalance": (
            max(spread.values()) / (sum(spread.values()) / len(spread)) if spread else None
        ),
    }
