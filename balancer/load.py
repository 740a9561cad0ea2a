"""The load a model server reports about itself, and the estimate every replica can share.

Model servers know what a balancer cannot see: their queue, their KV-cache use, the traffic
other balancer replicas send them. vLLM says so in band: a request carrying
``endpoint-load-metrics-format: text`` (or ``json``) is answered with an ORCA load report in
the response header ``endpoint-load-metrics``::

    endpoint-load-metrics: TEXT named_metrics.kv_cache_usage_perc=0.41,
        named_metrics.num_requests_waiting=3.0       (one line)
    endpoint-load-metrics: JSON {"named_metrics": {"kv_cache_usage_perc": 0.41, ...}}

:func:`parse_orca` reads both forms (unknown metrics ignored, malformed values counted and
ignored: a pod's odd header is never the client's problem). Servers that report nothing in
band are polled on ``/metrics`` (``balancer.loadpoll``), which yields the same
:class:`LoadReport`.

:class:`QueueEstimate` turns the last report into a current figure. A report is a snapshot
taken when the server answered; since then this replica sent more requests and some left the
queue. The estimate is

    queued = max(0, reported_waiting - left_since) + mine

where ``mine`` counts this replica's requests sent after the report that have not started
(no response byte yet), known exactly, and ``left_since`` counts requests sent *before* the
report that started since (each may have been one of the reported waiting ones, or was
already running: the clamp keeps the estimate from going below what is known). Every replica
in front of the same pods reads the same reports, so their estimates differ only by their own
recent traffic: they agree on which pod queues.

Pure and synchronous: the proxy feeds it events, the routing pool reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Final, Literal

LOAD_HEADER: Final = "endpoint-load-metrics"
"""Response header carrying the server's load report (ORCA, native HTTP form)."""
FORMAT_HEADER: Final = "endpoint-load-metrics-format"
"""Request header asking the server for a load report in the given form."""

Source = Literal["inband", "poll", "assumed"]
"""Where a report came from: a response header, a metrics poll, or an operator's what-if
(``balancer route --report``)."""

_NAMES: Final = {
    # vLLM's in-band names (vllm/entrypoints/serve/utils/orca_metrics.py)
    "num_requests_waiting": "waiting",
    "kv_cache_usage_perc": "kv_usage",
    # accepted too: running requests, and the older KV name some builds report
    "num_requests_running": "running",
    "kv_cache_utilization": "kv_usage",
}
"""ORCA named metrics that balancer reads, by the :class:`LoadReport` field they fill."""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What one server said about its load at one moment; None: not reported."""

    waiting: float | None = None
    """Requests queued at the server, not yet running."""
    running: float | None = None
    """Requests the server is processing."""
    kv_usage: float | None = None
    """Fraction of the KV cache in use, 0 to 1."""

    def __bool__(self) -> bool:
        return self.waiting is not None or self.running is not None or self.kv_usage is not None


EMPTY: Final = LoadReport()


def report_from(metrics: dict[str, float]) -> tuple[LoadReport, int]:
    """A report from named metrics (ORCA names, without ``named_metrics.``); returns it and
    how many of the known metrics held an impossible value (negative, not finite, a KV
    fraction above 1), which are left out."""
    fields: dict[str, float] = {}
    bad = 0
    for name, value in metrics.items():
        field = _NAMES.get(name)
        if field is None:
            continue
        if not math.isfinite(value) or value < 0 or (field == "kv_usage" and value > 1.0):
            bad += 1
            continue
        fields[field] = value
    return LoadReport(**fields), bad


def parse_orca(value: str) -> tuple[LoadReport, int]:
    """Parse an ``endpoint-load-metrics`` header value; returns the report (empty when it
    carries nothing balancer reads) and how many parts were malformed."""
    kind, _, rest = value.strip().partition(" ")
    kind = kind.upper()
    if kind == "TEXT":
        metrics, bad = _parse_text(rest)
    elif kind == "JSON":
        metrics, bad = _parse_json(rest)
    else:  # BIN (protobuf) or garbage: nothing balancer can read
        return EMPTY, 1
    report, impossible = report_from(metrics)
    return report, bad + impossible


def _parse_text(text: str) -> tuple[dict[str, float], int]:
    metrics: dict[str, float] = {}
    bad = 0
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, number = part.partition("=")
        name = name.strip()
        if not eq or not name:
            bad += 1
            continue
        if not name.startswith("named_metrics."):
            continue  # cpu_utilization, rps_fractional...: standard fields balancer ignores
        try:
            metrics[name[14:]] = float(number)
        except ValueError:
            bad += 1
    return metrics, bad


def _parse_json(text: str) -> tuple[dict[str, float], int]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}, 1
    if not isinstance(data, dict):
        return {}, 1
    named = data.get("named_metrics", data.get("namedMetrics", {}))
    if not isinstance(named, dict):
        return {}, 1
    metrics: dict[str, float] = {}
    bad = 0
    for name, number in named.items():
        if isinstance(number, bool) or not isinstance(number, int | float):
            if name in _NAMES:
                bad += 1
            continue
        metrics[str(name)] = float(number)
    return metrics, bad


class QueueEstimate:
    """One endpoint's queue as of now: its last report, plus this replica's traffic since.

    The proxy calls :meth:`sent` when a request goes to the endpoint (keeping the returned
    generation), :meth:`started` with it when the response's first byte of body arrives or
    the request ends without one, and :meth:`report` when a report arrives.
    """

    __slots__ = ("at", "base", "generation", "kv_usage", "mine", "queue_at", "report_",
                 "running", "source")

    def __init__(self) -> None:
        self.report_: LoadReport = EMPTY
        """The last report (EMPTY: none yet)."""
        self.at = -math.inf
        """When the last report arrived (``time.monotonic()``)."""
        self.queue_at = -math.inf
        """When the last report with a waiting count arrived."""
        self.source: Source | None = None
        self.generation = 0
        """Counts reports; a request sent under an older generation predates the report."""
        self.base = 0.0
        """The reported waiting count, less requests sent before the report that started."""
        self.mine = 0
        """This replica's requests sent after the report that have not started."""
        self.kv_usage: float | None = None
        self.running = 0.0
        """Requests the endpoint last said it was running (0 until one says): kept across
        reports that leave it out, since vLLM's in-band reports carry it only when asked
        to while its polled metrics always do."""

    def sent(self) -> int:
        self.mine += 1
        return self.generation

    def started(self, generation: int) -> None:
        if generation == self.generation:
            if self.mine > 0:
                self.mine -= 1
        elif self.base > 0:
            self.base = max(0.0, self.base - 1)

    def report(self, report: LoadReport, now: float, source: Source) -> None:
        """Take a report (one with no waiting count leaves the queue estimate as it was)."""
        self.report_ = report
        self.at = now
        self.source = source
        if report.kv_usage is not None:
            self.kv_usage = report.kv_usage
        if report.running is not None:
            self.running = report.running
        if report.waiting is not None:
            self.queue_at = now
            self.generation += 1
            self.base = report.waiting
            self.mine = 0

    @property
    def queued(self) -> float:
        return self.base + self.mine

    def fresh(self, now: float, max_age: float) -> bool:
        """Whether the queue figure is recent enough to route on."""
        return now - self.queue_at <= max_age

    def age(self, now: float) -> float | None:
        """Seconds since the last report; None: never reported."""
        return None if self.at == -math.inf else now - self.at
