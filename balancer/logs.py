"""Log set-up: JSON lines in a container, readable text on a terminal.

Log collectors (Loki, Cloud Logging, ...) index JSON fields, so the default off a terminal is
one JSON object per line; a person at a terminal gets text. The access log (logger
``balancer.access``) puts its fields in ``extra={"access": {...}}``: JSON output merges them
into the object, text output appends them as ``key=value``.

The access log writes one line per request, so it gets a cheap path: when the only handler its
records would reach is the :class:`LogHandler` installed here, ``record.AccessLog`` formats
the line itself (same shape as the formatters below) and hands it to a :class:`LineWriter`,
which writes the lines of one event-loop iteration with a single write. That skips the
``LogRecord``, the caller lookup and a write and flush per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any access fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with access fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in access.items() if v is not None)
        return line


def use_json(log_format: str, stream: TextIO) -> bool:
    """``auto`` means JSON unless the stream is a terminal."""
    if log_format == "auto":
        return not stream.isatty()
    return log_format == "json"


class LogHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs: a stream handler that knows its
    format, so lines written around logging (the access log's) can take the same shape."""

    def __init__(self, stream: TextIO, json_lines: bool) -> None:
        super().__init__(stream)
        self.json_lines = json_lines


def configure_logging(level: str, log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Install one handler on the root logger with the chosen format."""
    stream = stream or sys.stderr
    json_lines = use_json(log_format, stream)
    handler = LogHandler(stream, json_lines)
    formatter = JsonFormatter() if json_lines else TextFormatter()
    # JSON timestamps are UTC (the trailing Z).
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def sole_handler(logger: logging.Logger) -> LogHandler | None:
    """The :class:`LogHandler` that every record of ``logger`` reaches and nothing else does
    (no other handler, no filter on the way); None otherwise, e.g. under pytest's capture."""
    found: LogHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or not isinstance(handler, LogHandler) or handler.filters:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


class Stamps:
    """UTC timestamps as the formatters write them, the date and time part cached per
    second."""

    __slots__ = ("_json", "_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._json = ""
        self._text = ""

    def _at(self, second: int) -> None:
        parts = time.gmtime(second)
        self._json = time.strftime("%Y-%m-%dT%H:%M:%S", parts)
        self._text = time.strftime("%Y-%m-%d %H:%M:%S", parts)
        self._second = second

    def json(self, now: float) -> str:
        """``2025-01-31T12:00:00.123Z`` (as :class:`JsonFormatter`)."""
        second = int(now)
        if second != self._second:
            self._at(second)
        return f"{self._json}.{int((now - second) * 1000):03d}Z"

    def text(self, now: float) -> str:
        """``2025-01-31 12:00:00,123`` (as :class:`TextFormatter` with UTC)."""
        second = int(now)
        if second != self._second:
            self._at(second)
        return f"{self._text},{int((now - second) * 1000):03d}"


class LineWriter:
    """Writes finished lines to a :class:`LogHandler`'s stream, one write and flush per
    event-loop iteration (or at once, outside a loop)."""

    __slots__ = ("_handler", "_lines", "_scheduled")

    def __init__(self, handler: LogHandler) -> None:
        self._handler = handler
        self._lines: list[str] = []
        self._scheduled = False

    def write(self, line: str) -> None:
        self._lines.append(line)
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True

    def flush(self) -> None:
        self._scheduled = False
        lines = self._lines
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        lines.clear()
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.stream.flush()
        except (OSError, ValueError):
            pass  # nowhere to log that logging failed; as logging.raiseExceptions=False
        finally:
            handler.release()


@dataclass(slots=True)
class Throttle:
    """Lets one event through per ``interval`` seconds and counts the rest, so a log line
    per event cannot flood the log, and the next line still says how many were held back."""

    interval: float
    next_at: float = -math.inf
    held: int = 0

    def allow(self, now: float) -> int | None:
        """None: hold this event back. Else let it through and return how many were held
        back since the last one went through."""
        if now < self.next_at:
            self.held += 1
            return None
        held, self.held = self.held, 0
        self.next_at = now + self.interval
        return held
