"""Per-request samples of a load run and their summary, with exact percentiles.

Both load generators produce :class:`Sample` records: the asyncio player
(:mod:`loadtest.player`) and the Locust file. :func:`summarize` turns them into one flat,
JSON-serializable dict, so every run (and every strategy in a comparison) reports the same keys.

Percentiles are computed from the raw samples, never from histograms or buckets: linear
interpolation between the two closest ranks (the default of NumPy and of most papers), so the
p50 of ``[1, 2, 3, 4]`` is 2.5 and the p100 is the maximum.

This module imports nothing beyond the standard library; Locust loads it under gevent.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "RunResult",
    "Sample",
    "percentile",
    "summarize",
    "summarize_samples",
]

ERROR_TEXT_MAX = 80
"""Error messages are grouped by their first characters, so one bad reply body does not make a
key of its own for every request."""


@dataclass
class Sample:
    """What one request did. Times are seconds (``time.perf_counter`` differences)."""

    conversation_id: str
    turn: int
    start_s: float
    """When the request was sent, counted from the start of the run."""
    ttft_s: float | None = None
    """Time from sending to the first chunk that carries content; None if none came."""
    e2e_s: float | None = None
    """Time from sending to the end of the stream (or the failure)."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive content-bearing chunks."""
    queue_s: float = 0.0
    """Time the request waited for the player's concurrency cap before it was sent."""
    output_tokens: int = 0
    """From ``usage.completion_tokens`` if the server sent usage, else content chunks counted."""
    prompt_tokens: int | None = None
    """``usage.prompt_tokens``, if reported."""
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens``, if reported."""
    status: int | None = None
    """HTTP status; None when no response arrived (connect error, timeout before headers)."""
    error: str | None = None
    """None on success; otherwise what went wrong (HTTP status, stream error, timeout...)."""
    cancelled: bool = False
    """The run ended while this request was in flight; not counted as an error."""
    endpoint: str | None = None
    """The ``x-balancer-endpoint`` response header: which upstream the balancer chose."""
    pod: str | None = None
    """The ``x-sim-pod`` response header: which simulated pod served the request."""

    @property
    def ok(self) -> bool:
        """Finished without error and was not cut off."""
        return self.error is None and not self.cancelled

    def to_json(self) -> dict[str, Any]:
        """The sample as a plain dict."""
        return asdict(self)


@dataclass
class RunResult:
    """The samples of one run and how long it took."""

    samples: list[Sample]
    wall_s: float
    """From the start of the run to the moment the last request finished or was cancelled."""
    started_at: float = 0.0
    """Unix time of the start, to line samples up with server-side metrics."""
    stopped_by: str = "trace-end"
    """Why the run ended: ``trace-end``, ``duration`` or ``max-requests``."""

    def to_json(self) -> dict[str, Any]:
        """The run, samples included, as a plain dict."""
        return {
            "wall_s": self.wall_s,
            "started_at": self.started_at,
            "stopped_by": self.stopped_by,
            "samples": [sample.to_json() for sample in self.samples],
        }


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


def _error_kind(message: str) -> str:
    return message[:ERROR_TEXT_MAX]


def summarize(result: RunResult) -> dict[str, Any]:
    """Summarize a run; see :func:`summarize_samples` for the keys."""
    summary = summarize_samples(result.samples, result.wall_s)
    summary["stopped_by"] = result.stopped_by
    return summary


def summarize_samples(samples: Iterable[Sample], wall_s: float) -> dict[str, Any]:
    """Summarize samples of a run that lasted ``wall_s`` seconds.

    Keys (times in seconds, None where there is no data):

    * ``requests`` (finished, ok or not; cancelled ones excluded), ``ok``, ``errors``,
      ``cancelled``, ``error_rate``, ``error_kinds`` (message → count), ``wall_s``;
    * ``ttft_p50_s``, ``ttft_p90_s``, ``ttft_p99_s``, ``ttft_mean_s``, ``ttft_max_s``;
    * ``itl_p50_s``, ``itl_p90_s``, ``itl_p99_s`` (over all gaps of all successful requests);
    * ``e2e_p50_s``, ``e2e_p90_s``, ``e2e_p99_s``, ``e2e_mean_s``; ``queue_p99_s``;
    * ``requests_per_s`` (successful requests / wall time), ``output_tokens``,
      ``output_tokens_per_s``;
    * ``prompt_tokens``, ``cached_tokens``, ``cached_token_share`` (cached / prompt tokens over
      successful requests that reported both);
    * ``per_endpoint`` and ``per_pod``: successful requests by ``x-balancer-endpoint`` and by
      ``x-sim-pod`` (requests without the header are left out), ``endpoint_imbalance``
      (max / mean of ``per_endpoint``, or of ``per_pod`` when no endpoint headers came).

    Latency figures cover successful requests only.
    """
    samples = list(samples)
    finished = [s for s in samples if not s.cancelled]
    good = [s for s in finished if s.error is None]
    ttft = [s.ttft_s for s in good if s.ttft_s is not None]
    e2e = [s.e2e_s for s in good if s.e2e_s is not None]
    itl = [gap for s in good for gap in s.itl_s]
    queue = [s.queue_s for s in good]
    output_tokens = sum(s.output_tokens for s in good)
    reported = [s for s in good if s.prompt_tokens is not None and s.cached_tokens is not None]
    prompt_tokens = sum(s.prompt_tokens or 0 for s in reported)
    cached_tokens = sum(s.cached_tokens or 0 for s in reported)
    per_endpoint = Counter(s.endpoint for s in good if s.endpoint is not None)
    per_pod = Counter(s.pod for s in good if s.pod is not None)
    spread = per_endpoint or per_pod
    errors = [s for s in finished if s.error is not None]
    return {
        "requests": len(finished),
        "ok": len(good),
        "errors": len(errors),
        "cancelled": len(samples) - len(finished),
        "error_rate": len(errors) / len(finished) if finished else 0.0,
        "error_kinds": dict(Counter(_error_kind(s.error or "") for s in errors).most_common()),
        "wall_s": wall_s,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": _mean(ttft),
        "ttft_max_s": max(ttft, default=None),
        "itl_p50_s": percentile(itl, 50),
        "itl_p90_s": percentile(itl, 90),
        "itl_p99_s": percentile(itl, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p90_s": percentile(e2e, 90),
        "e2e_p99_s": percentile(e2e, 99),
        "e2e_mean_s": _mean(e2e),
        "queue_p99_s": percentile(queue, 99),
        "requests_per_s": len(good) / wall_s if wall_s > 0 else None,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "cached_token_share": cached_tokens / prompt_tokens if prompt_tokens else None,
        "per_endpoint": dict(sorted(per_endpoint.items())),
        "per_pod": dict(sorted(per_pod.items())),
        "endpoint_imbalance": (
            max(spread.values()) / (sum(spread.values()) / len(spread)) if spread else None
        ),
    }
