"""wrk's Lua script and the parsing of its text report (wrk has no machine-readable output)."""

from __future__ import annotations

import json

import pytest

from loadtest import wrk

REPORT_WITH_LATENCY = """\
Running 8s test @ http://127.0.0.1:41234/v1/chat/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.12ms    1.03ms  30.21ms   91.22%
    Req/Sec     6.27k   312.45     6.80k    80.00%
  Latency Distribution
     50%    4.98ms
     75%    5.40ms
     90%    6.01ms
     99%    9.87ms
  49912 requests in 8.00s, 18.33MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:   6238.52
Transfer/sec:      2.29MB
"""
"""wrk 4.2 with ``--latency``, a run with a few errors."""

REPORT_IN_OTHER_UNITS = """\
Running 1m test @ http://127.0.0.1:41234/v1/chat/completions
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.33us  100.00us    1.20s    99.00%
    Req/Sec     2.40k    10.00      2.50k    70.00%
  144000 requests in 1.00m, 50.00MB read
Requests/sec:   2400.00
Transfer/sec:    853.33KB
"""
"""Without ``--latency``: no percentile lines; microseconds, seconds and minutes."""


def test_a_report_with_latency_gives_every_figure() -> None:
    """Rate, count, duration, latency in ms, non-2xx and each kind of socket error."""
    report = wrk.parse(REPORT_WITH_LATENCY)
    assert report.requests_per_sec == 6238.52
    assert report.requests == 49912
    assert report.seconds == pytest.approx(8.0)
    assert report.latency_ms == {"avg": 5.12, "max": 30.21, "p50": 4.98, "p75": 5.4,
                                 "p90": 6.01, "p99": 9.87}
    assert report.non_2xx == 5
    assert report.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 1}


def test_units_are_converted_to_milliseconds_and_seconds() -> None:
    """``us`` and ``s`` latencies become ms, a ``1.00m`` run 60 seconds; no percentiles
    without ``--latency``, and no errors when wrk reports none."""
    report = wrk.parse(REPORT_IN_OTHER_UNITS)
    assert report.latency_ms == {"avg": 0.812, "max": 1200.0}
    assert report.seconds == pytest.approx(60.0)
    assert report.requests == 144000
    assert report.non_2xx == 0
    assert report.socket_errors == {}


def test_output_that_is_not_a_report_has_no_rate() -> None:
    """The caller tells a failed run by the missing rate, not by zeros."""
    report = wrk.parse("unable to connect to 127.0.0.1:1 Connection refused\n")
    assert report.requests_per_sec is None
    assert (report.requests, report.latency_ms) == (0, {})


def test_script_posts_every_body_to_the_path_in_turn() -> None:
    """Each body stands verbatim in a Lua long string; the path and the JSON content type are
    in the formatted requests, and request() cycles through them."""
    bodies = [json.dumps({"n": i, "text": 'quote " and \\ backslash'}).encode()
              for i in range(3)]
    text = wrk.script(bodies, "/v1/chat/completions")
    for body in bodies:
        assert f"[==[{body.decode()}]==]," in text
    assert 'wrk.format("POST", "/v1/chat/completions",' in text
    assert '["Content-Type"] = "application/json"' in text
    assert "i = i % #requests + 1" in text


def test_script_refuses_a_body_that_would_end_its_long_string() -> None:
    with pytest.raises(ValueError, match="Lua long string"):
        wrk.script([b'{"text": "]==]"}'], "/")
