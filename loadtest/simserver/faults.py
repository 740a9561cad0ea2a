"""Fault injection for a simulated pod: errors, slow start, hangs, crashes, slow steps.

:class:`FaultConfig` is the (frozen) setting; :class:`FaultInjector` holds the live state (start
time, request count, seeded random generator) and decides the fate of each request. Both are pure:
the caller passes the clock in.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

ERROR_STATUSES = frozenset({429, 500, 503})
"""Statuses an injected error may have."""

RETRY_AFTER_STATUSES = frozenset({429, 503})
"""Injected statuses that carry a ``Retry-After`` header."""


class FaultConfigError(ValueError):
    """A fault setting is out of range or unknown."""


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Faults a pod injects. All off by default."""

    error_rate: float = 0.0
    """Share of completion requests answered at once with `error_status` (0..1)."""
    error_status: int = 500
    """Status of injected errors: 500, 503 or 429."""
    retry_after: int = 1
    """``Retry-After`` of injected 429 and 503 answers, in seconds."""
    slow_start: float = 0.0
    """Seconds after start during which ``/health`` and requests answer 503."""
    hang_rate: float = 0.0
    """Share of completion requests that hang until the client gives up (0..1)."""
    hang_after_chunks: int = 0
    """0: a hanging request never answers. K > 0: a hanging streamed request sends its headers
    and K chunks, then stalls (a hanging non-streamed request never answers)."""
    exit_after: int | None = None
    """Exit the whole process abruptly when request N+1 arrives (a crash); None: never."""
    latency_multiplier: float = 1.0
    """Multiplies every engine step's duration (a slow or throttled GPU)."""
    host_cpu_ms: float = 0.0
    """CPU time the pod's process burns in every engine step, in ms: a starved host, so that
    load tests can show they flag runs in which the host, not the modelled GPU, was the limit."""
    seed: int = 0
    """Seed of the generator deciding which requests fail or hang."""

    def __post_init__(self) -> None:
        for name in ("error_rate", "hang_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FaultConfigError(f"{name} must be between 0 and 1, not {value}")
        if self.error_status not in ERROR_STATUSES:
            raise FaultConfigError(
                f"error_status must be one of {sorted(ERROR_STATUSES)}, not {self.error_status}"
            )
        if self.retry_after < 0:
            raise FaultConfigError("retry_after must not be negative")
        if self.slow_start < 0:
            raise FaultConfigError("slow_start must not be negative")
        if self.hang_after_chunks < 0:
            raise FaultConfigError("hang_after_chunks must not be negative")
        if self.exit_after is not None and self.exit_after < 0:
            raise FaultConfigError("exit_after must not be negative")
        if self.latency_multiplier <= 0:
            raise FaultConfigError("latency_multiplier must be positive")
        if self.host_cpu_ms < 0:
            raise FaultConfigError("host_cpu_ms must not be negative")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> FaultConfig:
        """A copy with the settings in `changes` (a JSON object) replaced, checked."""
        known = {f.name: f for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise FaultConfigError(f"unknown fault setting {key!r}; known: {sorted(known)}")
            values[key] = _coerce(key, value)
        return replace(self, **values)


_INT_SETTINGS = frozenset({"error_status", "retry_after", "hang_after_chunks", "seed"})
_FLOAT_SETTINGS = frozenset(
    {"error_rate", "slow_start", "hang_rate", "latency_multiplier", "host_cpu_ms"}
)


def _coerce(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        raise FaultConfigError(f"{key} must be a number")
    if key == "exit_after":
        if value is None:
            return None
        if not isinstance(value, int):
            raise FaultConfigError("exit_after must be an integer or null")
        return value
    if key in _INT_SETTINGS:
        if not isinstance(value, int):
            raise FaultConfigError(f"{key} must be an integer")
        return value
    if key in _FLOAT_SETTINGS:
        if not isinstance(value, int | float):
            raise FaultConfigError(f"{key} must be a number")
        return float(value)
    raise FaultConfigError(f"unknown fault setting {key!r}")  # pragma: no cover


class Fate(enum.Enum):
    """What happens to one completion request."""

    SERVE = "serve"
    EXIT = "exit"
    STARTING = "starting"
    ERROR = "error"
    HANG = "hang"


class FaultInjector:
    """Live fault state of one pod. `now` is any monotonic clock in seconds."""

    def __init__(self, config: FaultConfig, now: float) -> None:
        self.config = config
        self.started_at = now
        self.requests_seen = 0
        """Completion requests counted towards `exit_after`."""
        self._rng = random.Random(config.seed)

    def update(self, changes: Mapping[str, Any], now: float) -> FaultConfig:
        """Change settings on a running pod.

        Setting ``slow_start`` starts a new slow-start window now (as if the pod restarted);
        setting ``exit_after`` counts requests from now; setting ``seed`` reseeds the generator.
        """
        self.config = self.config.updated(changes)
        if "slow_start" in changes:
            self.started_at = now
        if "exit_after" in changes:
            self.requests_seen = 0
        if "seed" in changes:
            self._rng = random.Random(self.config.seed)
        return self.config

    def restart(self, now: float, down: float) -> float:
        """The pod restarts at `now` and starts again `down` seconds later: until then, and
        for `slow_start` seconds after, it is starting. Returns the seconds until it serves."""
        self.started_at = now + down
        return down + self.config.slow_start

    def starting(self, now: float) -> bool:
        """True while the slow-start window lasts (and while down after a restart)."""
        return now - self.started_at < self.config.slow_start

    def decide(self, now: float) -> Fate:
        """Decide the fate of one completion request arriving at `now`."""
        config = self.config
        if config.exit_after is not None:
            if self.requests_seen >= config.exit_after:
                return Fate.EXIT
            self.requests_seen += 1
        if self.starting(now):
            return Fate.STARTING
        if config.error_rate > 0 and self._rng.random() < config.error_rate:
            return Fate.ERROR
        if config.hang_rate > 0 and self._rng.random() < config.hang_rate:
            return Fate.HANG
        return Fate.SERVE
