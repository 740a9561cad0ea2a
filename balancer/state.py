"""Everything balancer knows about one endpoint, in one object with one lifecycle.

A routing pool (``router.Pool``) creates an :class:`EndpointState` when discovery first shows
the endpoint, and retires it when the endpoint has left and its last request has ended. In
between the state holds:

- ``in_flight``: requests this balancer has on the endpoint (the strategies' load);
- ``paused_until``: a 429's ``Retry-After``, until which the endpoint is skipped;
- ``health``: passive ejection and active-check state, its recent ``history`` and its
  ``probe`` task;
- ``models``: the model names the endpoint last reported on ``/v1/models``;
- ``connections``: its keep-alive connection pool;
- ``metrics``: its metric children;
- ``queue``: the endpoint's queue as it reports it, plus this balancer's traffic since
  (:class:`~balancer.load.QueueEstimate`).

:meth:`EndpointState.retire` frees all of it: the connections close, the probe stops and
the endpoint's metric series are removed, so nothing of a departed endpoint outlives it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Final

from balancer.endpoints import Endpoint
from balancer.health import EndpointHealth
from balancer.load import QueueEstimate
from balancer.metrics import EndpointMetrics
from balancer.upstream import ConnectionPool, Connector

HISTORY_PER_ENDPOINT: Final = 20
"""Health events kept per endpoint for /debug/endpoints: enough to see a flapping pod."""


class EndpointState:
    """One endpoint of one routing pool, from discovery until it is gone."""

    __slots__ = (
        "connections", "endpoint", "health", "history", "in_flight", "metrics", "models",
        "paused_until", "present", "probe", "queue",
    )

    def __init__(self, endpoint: Endpoint, metrics: EndpointMetrics) -> None:
        self.endpoint = endpoint
        """The latest discovery view of the endpoint (URL, zone, serving)."""
        self.present = True
        """Discovery still lists it; False once it left (its requests may still run)."""
        self.in_flight = 0
        """Requests this balancer has on the endpoint, from selection until the response
        ends."""
        self.paused_until = 0.0
        """Loop time until which the endpoint is skipped after a 429; 0: not paused."""
        self.health = EndpointHealth()
        self.history: deque[dict[str, Any]] | None = None
        """Recent health events, newest last (ejections, returns, check changes)."""
        self.probe: asyncio.Task[None] | None = None
        """The active health check loop, while the endpoint serves."""
        self.models: frozenset[str] | None = None
        """Models the endpoint last reported (pools that learn their models); None: not
        heard from yet."""
        self.queue = QueueEstimate()
        """The endpoint's queue: its last load report plus this balancer's traffic since."""
        self.metrics = metrics
        self.connections: ConnectionPool | None = None
        """Keep-alive connections, opened on the first request."""

    @property
    def id(self) -> str:
        return self.endpoint.id

    def __repr__(self) -> str:
        return (f"EndpointState({self.endpoint.id!r}, in_flight={self.in_flight}, "
                f"present={self.present})")

    def open(self, connector: Connector) -> ConnectionPool:
        """The endpoint's connection pool, opened with ``connector`` on first use."""
        connections = self.connections
        if connections is None:
            connections = self.connections = connector.open(self.endpoint.url)
        return connections

    def update(self, endpoint: Endpoint) -> None:
        """Take a new discovery view of the same endpoint id.

        A new URL gets new connections (idle ones to the old URL close now, busy ones when
        their response ends). An endpoint that stops serving forgets its health: checks and
        ejections start afresh if it serves again.
        """
        if endpoint.url != self.endpoint.url and self.connections is not None:
            self.connections.close_idle()
            self.connections = None
        if self.endpoint.serving and not endpoint.serving:
            self.forget_health()
        self.endpoint = endpoint

    def forget_health(self) -> None:
        self.health = EndpointHealth()
        self.history = None

    def record(self, event: str, **detail: Any) -> None:
        """Add a health event to the history."""
        history = self.history
        if history is None:
            history = self.history = deque(maxlen=HISTORY_PER_ENDPOINT)
        history.append({"time": round(time.time(), 3), "event": event, **detail})

    def retire(self) -> None:
        """Free everything: close the connections, stop the probe, remove the metric
        series. Called by the pool once the endpoint has left and is idle."""
        self.present = False
        if self.connections is not None:
            self.connections.close()
            self.connections = None
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None
        self.metrics.remove()
        self.history = None
        self.models = None
