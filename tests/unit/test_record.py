"""The request record and its access-log line: the cheap path writes what logging would."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Iterator

import pytest

from balancer.endpoints import Endpoint
from balancer.logs import JsonFormatter, LogHandler, TextFormatter
from balancer.metrics import EndpointMetrics
from balancer.record import AccessLog, RequestRecord
from balancer.state import EndpointState


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def record(**changes: object) -> RequestRecord:
    rec = RequestRecord('req-"1"', "POST", "/v1/chat/completions", "llama\u00e9", 0xABC,
                        started=0.0, total_at=float("inf"))
    rec.pool = "chat"
    rec.state = EndpointState(Endpoint("10.0.0.1:8000", "http://10.0.0.1:8000"),
                              EndpointMetrics(None, "chat", "10.0.0.1:8000"))
    rec.outcome = "overflow"
    rec.status = 200
    rec.attempts = 2
    rec.first_byte = 0.0123456
    rec.usage = (120, 96)
    rec.chunks, rec.size = 7, 2048
    for name, value in changes.items():
        setattr(rec, name, value)
    return rec


@pytest.fixture
def access() -> Iterator[tuple[AccessLog, CountingStream, LogHandler]]:
    """An access logger whose only handler is balancer's own (the cheap path)."""
    stream = CountingStream()
    handler = LogHandler(stream, json_lines=True)
    # A logger outside logging's registry: nothing (pytest's capture) can add handlers to it.
    logger = logging.Logger("test.balancer.access", logging.INFO)
    logger.addHandler(handler)
    yield AccessLog(logger), stream, handler


def logged(rec: RequestRecord, duration: float, formatter: logging.Formatter) -> str:
    """The line logging itself would write for the record."""
    formatter.converter = time.gmtime
    state = rec.state
    assert state is not None
    entry = logging.LogRecord("test.balancer.access", logging.INFO, __file__, 1,
                              "%s %s %d %s %s %.1fms",
                              (rec.method, rec.path, rec.status, state.endpoint.id,
                               rec.outcome, duration * 1000), None)
    entry.access = rec.fields(duration)
    return formatter.format(entry)


@pytest.mark.parametrize("changes", [
    {},
    {"usage": None, "key_hash": None, "first_byte": -1.0, "status": 499, "chunks": 0,
     "size": 0},
    {"path": '/v1/x?q="\\\n\u2028', "model": "", "first_byte": 1e-7, "key_hash": 0},
])
def test_the_cheap_json_line_is_the_json_formatters_line(access, changes) -> None:
    """Field for field and in order, the batched line equals JsonFormatter's; only the
    timestamp may differ (it is taken a moment later)."""
    log, stream, _ = access
    rec = record(**changes)
    log.write(rec, 0.5)
    log.flush()
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    ours = json.loads(line)
    expected = logged(rec, 0.5, JsonFormatter())
    theirs = json.loads(expected)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ours.pop("time"))
    theirs.pop("time")
    assert list(ours.items()) == list(theirs.items())
    # Byte for byte after the timestamp.
    assert line.rstrip("\n").split(", ", 1)[1] == expected.split(", ", 1)[1]


def test_the_cheap_text_line_is_the_text_formatters_line(access) -> None:
    """After the timestamp, the text line is TextFormatter's, character for character."""
    log, stream, handler = access
    handler.json_lines = False
    log = AccessLog(log.logger)
    rec = record()
    log.write(rec, 0.5)
    log.flush()
    ours = stream.getvalue().rstrip("\n")
    theirs = logged(rec, 0.5, TextFormatter())
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", ours)
    assert ours.split(" ", 2)[2] == theirs.split(" ", 2)[2]


async def test_lines_of_one_loop_iteration_are_written_at_once(access) -> None:
    """Many requests ending together cost one write; the next iteration flushes them."""
    log, stream, _ = access
    for _ in range(5):
        log.write(record(), 0.1)
    assert stream.writes == 0
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert stream.getvalue().count("\n") == 5


def test_with_other_handlers_the_line_goes_through_logging(caplog) -> None:
    """Under pytest's capture (or any handler not balancer's own) the record is logged, with
    its fields in ``extra``."""
    log = AccessLog()
    with caplog.at_level(logging.INFO, logger="balancer.access"):
        log.write(record(), 0.25)
    (entry,) = [r for r in caplog.records if r.name == "balancer.access"]
    assert entry.access == record().fields(0.25)  # type: ignore[attr-defined]
    assert entry.getMessage() == "POST /v1/chat/completions 200 10.0.0.1:8000 overflow 250.0ms"
