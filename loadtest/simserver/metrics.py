"""Prometheus metrics of a simulated pod, under vLLM's (or SGLang's) names and a ``model_name``
label.

Engine counters and gauges are read from the engine at scrape time; latency histograms are
observed as tokens are delivered. Times are wall-clock seconds (simulated time x time scale), as a
client of the pod measures them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import Engine

MetricsFlavor = Literal["vllm", "sglang", "none"]
"""Which server's ``/metrics`` a pod imitates: ``vllm`` (``vllm:num_requests_waiting``...),
``sglang`` (``sglang:num_queue_reqs``...) or ``none`` (no ``/metrics`` at all: 404)."""

METRICS_FLAVORS: tuple[MetricsFlavor, ...] = get_args(MetricsFlavor)

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
"""vLLM's buckets for ``vllm:time_to_first_token_seconds``."""

E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
"""vLLM's buckets for ``vllm:e2e_request_latency_seconds``."""


def _family_makers(
    model: str,
) -> tuple[
    Callable[[str, str, float], GaugeMetricFamily], Callable[[str, str, float], CounterMetricFamily]
]:
    """Gauge and counter builders with one sample labelled ``model_name=<model>``."""

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model], value)
        return family

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model], value)
        return family

    return gauge, counter


class _EngineCollector(Collector):
    """Reads the engine's gauges and counters when scraped (a flavour names them)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self._engine = engine
        self._model = model_name


class _VllmCollector(_EngineCollector):
    """Under vLLM's names."""

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        totals = engine.totals
        gauge, counter = _family_makers(self._model)
        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            engine.num_running,
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            engine.num_waiting,
        )
        yield gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            engine.kv_usage,
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            engine.kv_usage,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            totals.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            totals.prefix_cache_hits,
        )
        yield counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", totals.prompt_tokens
        )
        yield counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            totals.generation_tokens,
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            totals.preemptions,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        success.add_metric([self._model, "length"], totals.requests_finished)
        yield success


class _SGLangCollector(_EngineCollector):
    """Under SGLang's names."""

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        totals = engine.totals
        gauge, counter = _family_makers(self._model)
        yield gauge(
            "sglang:num_running_reqs", "The number of running requests.", engine.num_running
        )
        yield gauge(
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue.",
            engine.num_waiting,
        )
        yield gauge("sglang:token_usage", "The token usage.", engine.kv_usage)
        yield counter(
            "sglang:prompt_tokens", "Number of prefill tokens processed.", totals.prompt_tokens
        )
        yield counter(
            "sglang:generation_tokens",
            "Number of generation tokens processed.",
            totals.generation_tokens,
        )


class SimMetrics:
    """All metrics of one pod, in its own registry, under `flavor`'s names.

    With flavor ``none`` the histograms are still kept (they cost nothing) but the engine's
    gauges are not registered; the pod serves no ``/metrics``.
    """

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        registry: CollectorRegistry,
        flavor: MetricsFlavor = "vllm",
    ) -> None:
        self.registry = registry
        self.flavor = flavor
        if flavor == "vllm":
            registry.register(_VllmCollector(engine, model_name))
        elif flavor == "sglang":
            registry.register(_SGLangCollector(engine, model_name))
        prefix = "sglang" if flavor == "sglang" else "vllm"
        self.ttft = Histogram(
            f"{prefix}:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ["model_name"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        ).labels(model_name)
        self.e2e = Histogram(
            f"{prefix}:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            ["model_name"],
            buckets=E2E_BUCKETS,
            registry=registry,
        ).labels(model_name)
