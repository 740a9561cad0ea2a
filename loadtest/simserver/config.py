"""Settings of one simulated pod."""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import EngineConfig
from .faults import FaultConfig
from .metrics import METRICS_FLAVORS, MetricsFlavor

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
"""Model name served when none is given."""

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request body accepted: long shared documents make big prompts."""

DEFAULT_CROSS_ZONE_RTT_S = 0.001
"""Seconds a request from another zone waits before it reaches the pod: a typical network
round trip between zones of one cloud region, which providers quote as low single-digit
milliseconds at most (within a zone: a fraction of that)."""

CLIENT_ZONE_HEADER = "x-sim-client-zone"
"""Request header naming the zone the client (the app, or its balancer replica) runs in."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulated model server: its engine, its faults and how it presents itself."""

    name: str | None = None
    """Pod name sent in ``x-sim-pod``; None: ``sim-<port>`` once the pod is bound."""
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    """Model names served; the first one labels the metrics."""
    time_scale: float = 1.0
    """Wall seconds per simulated second: 0.1 runs ten times faster than the modelled GPU."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted, in bytes."""
    orca: bool = True
    """Answer ORCA load-report requests as vLLM does: a chat or completion request carrying
    ``endpoint-load-metrics-format: text|json`` gets ``endpoint-load-metrics`` on its
    non-streamed answer, read from the engine when the answer is ready (see :mod:`.orca`).
    False: a server without ORCA support, which never sends the header."""
    orca_running: bool = False
    """Add ``named_metrics.num_requests_running`` (sequences in the batch, a count) to each
    report. Off by default because vLLM reports only ``num_requests_waiting`` (a count) and
    ``kv_cache_usage_perc`` (a fraction, 0..1)."""
    orca_streams: bool = False
    """Report on streamed answers too, read when the stream's head is sent (the request was
    just queued, so it counts itself as waiting). Off by default because vLLM puts the report
    on non-streamed answers only."""
    zone: str | None = None
    """The zone the pod runs in; None: zones are not simulated."""
    cross_zone_rtt: float = DEFAULT_CROSS_ZONE_RTT_S
    """Simulated seconds (scaled by ``time_scale`` like everything else) added before the
    first byte of a completion request whose ``x-sim-client-zone`` names another zone; such
    requests are counted in ``/stats`` (``cross_zone_requests``)."""
    metrics_flavor: MetricsFlavor = "vllm"
    """``/metrics`` under vLLM's names (``vllm:num_requests_waiting``...), SGLang's
    (``sglang:num_queue_reqs``...), or ``none``: no ``/metrics`` (404), a server that reports
    nothing out of band."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a pod serves at least one model")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.cross_zone_rtt < 0:
            raise ValueError("cross_zone_rtt must be >= 0")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if self.metrics_flavor not in METRICS_FLAVORS:
            raise ValueError(f"metrics_flavor must be one of {', '.join(METRICS_FLAVORS)}")
