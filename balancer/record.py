"""One record per forwarded request, filled in as it runs and reported once when it ends.

The proxy and the forwarder write what happened into a :class:`RequestRecord` (where it
went, the status, first byte, usage, how much was streamed); :meth:`Reporter.emit` turns it
into the request's metrics and its access-log line in one place. Passive health hears each
attempt as its lease ends (``admission``), since a retried attempt must count against its
endpoint before the next one starts.
"""

from __future__ import annotations

import logging
import time
from json.encoder import encode_basestring_ascii
from typing import Any, Final

from balancer.logs import LineWriter, Stamps, sole_handler
from balancer.metrics import Metrics
from balancer.routes import ModelRename
from balancer.state import EndpointState

ACCESS_LOGGER: Final = "balancer.access"
"""One line per forwarded request, after its response ended (fields in ``extra``)."""


class RequestRecord:
    """What happened to one forwarded request."""

    __slots__ = (
        "attempts", "chunks", "fallback_reason", "fallbacks", "first_byte", "key_hash",
        "learns", "method", "model", "outcome", "path", "pool", "rename", "request_id",
        "response_ref", "served_model", "size", "started", "state", "status", "total_at",
        "usage",
    )

    def __init__(self, request_id: str, method: str, path: str, model: str,
                 key_hash: int | None, started: float, total_at: float,
                 response_ref: str | None = None, learns: bool = False) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.model = model
        """The model the client asked for."""
        self.served_model = model
        """The model the current attempt's pool is asked for (a route may name another)."""
        self.rename: ModelRename | None = None
        """Rewrites the served model's name back to the requested one in the answer (a
        route's alias); None: relayed as it is."""
        self.key_hash = key_hash
        """Hash of the routing key (None: a pass-through request)."""
        self.started = started
        """Loop time the request arrived."""
        self.total_at = total_at
        """Loop time by which it must be done (``limits.total_timeout``; inf: never)."""
        self.attempts = 0
        self.fallbacks = 0
        """Pools after its first that a routed request went on to."""
        self.fallback_reason = ""
        """Why a routed request is not on its chain's first pool (no_endpoints, panic,
        overloaded, rate_limited, failed; the latest move); "" when it is."""
        self.pool = ""
        self.state: EndpointState | None = None
        """The endpoint of the latest attempt."""
        self.outcome = ""
        """The routing outcome of the latest attempt (primary, overflow, ...)."""
        self.status = -1
        """HTTP status of the answer; 499: the client went away; -1: no answer yet (or an
        attempt failed in a way that may be retried)."""
        self.first_byte = -1.0
        """Seconds from arrival to the first response byte (-1: none came)."""
        self.usage: tuple[int, int] | None = None
        """(prompt tokens, cached prompt tokens) the endpoint reported."""
        self.chunks = 0
        self.size = 0
        self.response_ref = response_ref
        """The stored response the request names (Responses API): a 404 for it is retried on
        another endpoint, and the endpoint that answers it is remembered."""
        self.learns = learns
        """A ``POST /v1/responses`` whose answer is stored: its response id is remembered
        with the endpoint (``balancer.affinity``)."""

    def fields(self, duration: float) -> dict[str, Any]:
        """The access-log fields, in their order."""
        usage = self.usage
        state = self.state
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "pool": self.pool,
            "endpoint": "" if state is None else state.endpoint.id,
            "route": self.outcome,
            "key_hash": None if self.key_hash is None else f"{self.key_hash:016x}",
            "status": self.status,
            "attempts": self.attempts,
            "ttfb_ms": None if self.first_byte < 0 else round(self.first_byte * 1000, 3),
            "duration_ms": round(duration * 1000, 3),
            "prompt_tokens": None if usage is None else usage[0],
            "cached_tokens": None if usage is None else usage[1],
            "stream_chunks": self.chunks,
            "stream_bytes": self.size,
            **({"fallback_reason": self.fallback_reason} if self.fallback_reason else {}),
        }


    def json_fields(self, duration: float) -> str:
        """``json.dumps(self.fields(duration))`` without its opening brace, written out here
        because this runs once per request and costs a third of that (ints and strings as
        the json module writes them, floats by ``repr`` as it does)."""
        enc = encode_basestring_ascii
        state = self.state
        usage = self.usage
        key_hash = "null" if self.key_hash is None else f'"{self.key_hash:016x}"'
        first_byte = ("null" if self.first_byte < 0
                      else repr(round(self.first_byte * 1000, 3)))
        prompt, cached = ("null", "null") if usage is None else (str(usage[0]), str(usage[1]))
        return (
            f'"request_id": {enc(self.request_id)}, "method": {enc(self.method)}, '
            f'"path": {enc(self.path)}, "model": {enc(self.model)}, "pool": {enc(self.pool)}, '
            f'"endpoint": {enc("" if state is None else state.endpoint.id)}, '
            f'"route": {enc(self.outcome)}, "key_hash": {key_hash}, '
            f'"status": {self.status:d}, "attempts": {self.attempts:d}, '
            f'"ttfb_ms": {first_byte}, "duration_ms": {round(duration * 1000, 3)!r}, '
            f'"prompt_tokens": {prompt}, "cached_tokens": {cached}, '
            f'"stream_chunks": {self.chunks:d}, "stream_bytes": {self.size:d}'
            + (f', "fallback_reason": {enc(self.fallback_reason)}}}' if self.fallback_reason
               else "}")
        )


class AccessLog:
    """The access log: a line per request on logger ``balancer.access`` at level info.

    Through ``logging`` (with the fields in ``extra={"access": ...}``) unless the logger's
    records reach only balancer's own handler; then the line is formatted here, exactly as
    that handler's formatter would, and written in batches (see ``logs``).
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        handler = sole_handler(self.logger)
        self._writer = None if handler is None else LineWriter(handler)
        self._json = handler is not None and handler.json_lines
        self._stamps = Stamps()
        self._name = encode_basestring_ascii(self.logger.name)

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(self, record: RequestRecord, duration: float) -> None:
        state = record.state
        endpoint = "" if state is None else state.endpoint.id
        writer = self._writer
        if writer is None:
            self.logger.info("%s %s %d %s %s %.1fms", record.method, record.path,
                             record.status, endpoint, record.outcome, duration * 1000,
                             extra={"access": record.fields(duration)})
            return
        message = (f"{record.method} {record.path} {record.status:d} {endpoint} "
                   f"{record.outcome} {duration * 1000:.1f}ms")
        now = time.time()
        if self._json:
            writer.write(f'{{"time": "{self._stamps.json(now)}", "level": "info", "logger": '
                         f'{self._name}, "message": {encode_basestring_ascii(message)}, '
                         f"{record.json_fields(duration)}")
        else:
            fields = record.fields(duration)
            writer.write(f"{self._stamps.text(now)} INFO {self.logger.name}: {message} "
                         + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()


class Reporter:
    """Emits a finished request's record: its metrics and its access-log line."""

    def __init__(self, metrics: Metrics, access: AccessLog) -> None:
        self.metrics = metrics
        self.access = access

    def emit(self, record: RequestRecord, now: float) -> None:
        state = record.state
        if state is None:
            return
        duration = now - record.started
        metrics = state.metrics
        metrics.request(record.outcome, record.status)
        self.metrics.request_duration(record.pool, duration)
        if record.chunks:
            metrics.streamed(record.chunks, record.size)
        if record.usage is not None:
            metrics.usage(*record.usage)
        if self.access.enabled():
            self.access.write(record, duration)
