"""Settings of one simulated pod."""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import EngineConfig
from .faults import FaultConfig

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
"""Model name served when none is given."""

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request body accepted: long shared documents make big prompts."""


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

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a pod serves at least one model")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
