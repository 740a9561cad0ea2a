"""ORCA in-band load reports, as vLLM's OpenAI server sends them.

A client asks for a report with the request header ``endpoint-load-metrics-format: text`` (or
``json``, any case); the answer then carries ``endpoint-load-metrics``, one of::

    TEXT named_metrics.num_requests_waiting=3.0, named_metrics.kv_cache_usage_perc=0.41
    JSON {"named_metrics": {"num_requests_waiting": 3.0, "kv_cache_usage_perc": 0.41}}

Values are Python float reprs (``3.0``, ``1e-05``). vLLM reads them from its Prometheus gauges
in registration order (waiting before KV usage), so that is the order here; a parser should not
depend on it. Any other format value gets no header (vLLM logs a warning; the sim logs at debug
level). vLLM attaches the report to non-streamed chat and completion answers only, never to a
stream or an error. The format follows the ORCA load-report proposal
(https://github.com/cncf/xds/blob/main/xds/data/orca/v3/orca_load_report.proto).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from .engine import Engine

log = logging.getLogger(__name__)

FORMAT_HEADER = "endpoint-load-metrics-format"
"""Request header asking for a load report; its value names the format."""

REPORT_HEADER = "endpoint-load-metrics"
"""Response header carrying the load report."""

NamedMetrics = Sequence[tuple[str, float]]


def named_metrics(engine: Engine, *, running: bool = False) -> list[tuple[str, float]]:
    """The engine's load now, as vLLM names it.

    ``num_requests_waiting`` (sequences queued, not yet scheduled) and ``kv_cache_usage_perc``
    (fraction 0..1 of the KV pool in use); with `running`, ``num_requests_running`` first
    (sequences in the batch), which vLLM does not send.
    """
    metrics = [
        ("num_requests_waiting", float(engine.num_waiting)),
        ("kv_cache_usage_perc", float(engine.kv_usage)),
    ]
    if running:
        metrics.insert(0, ("num_requests_running", float(engine.num_running)))
    return metrics


def load_report(metrics_format: str, metrics: NamedMetrics) -> str | None:
    """The ``endpoint-load-metrics`` value for `metrics` in `metrics_format` ("text" or "json",
    any case); None for an empty or unsupported format."""
    fmt = metrics_format.lower()
    if fmt == "text":
        return "TEXT " + ", ".join(f"named_metrics.{name}={value!r}" for name, value in metrics)
    if fmt == "json":
        return "JSON " + json.dumps({"named_metrics": dict(metrics)})
    if metrics_format:
        log.debug("load report format %r is not supported; no report sent", metrics_format)
    return None
