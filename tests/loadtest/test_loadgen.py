"""The proxy benchmark's requests and built-in generators, against the upstream double in-process.

The double (:mod:`loadtest.bench_upstream`) answers with a Content-Length body or a chunked
SSE stream, the two framings the closed loop's minimal HTTP/1.1 reader must handle.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer

from loadtest import loadgen
from loadtest.bench_upstream import CHAT_PATH, DEFAULT_MODEL, Upstream

CHUNKS = 5


@pytest.fixture
async def upstream() -> AsyncIterator[RawTestServer]:
    server = RawTestServer(Upstream(DEFAULT_MODEL, CHUNKS), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def _broken_stream(request: web.BaseRequest) -> web.StreamResponse:
    """An SSE stream that stops before ``data: [DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: {}\n\n")
    await response.write_eof()
    return response


def test_chat_bodies_have_distinct_first_messages() -> None:
    """Distinct routing keys; the stream flag and max_tokens as asked."""
    bodies = [json.loads(b) for b in loadgen.chat_bodies("m", stream=True, max_tokens=7, n=4)]
    assert len({b["messages"][1]["content"] for b in bodies}) == 4
    assert all(b["stream"] is True and b["max_tokens"] == 7 and b["model"] == "m"
               for b in bodies)
    plain = json.loads(loadgen.chat_bodies("m", stream=False, max_tokens=7, n=1)[0])
    assert "stream" not in plain


def test_raw_requests_are_whole_http_requests() -> None:
    body = b'{"x": 1}'
    (request,) = loadgen.raw_requests([body], 8080)
    head, _, rest = request.partition(b"\r\n\r\n")
    assert head.startswith(f"POST {CHAT_PATH} HTTP/1.1\r\n".encode())
    assert b"\r\nContent-Length: 8" in head and b"\r\nHost: 127.0.0.1:8080" in head
    assert rest == body


@pytest.mark.parametrize("stream", [False, True])
async def test_closed_loop_counts_whole_answers_in_both_framings(
        upstream: RawTestServer, stream: bool) -> None:
    """Content-Length answers and chunked streams are read whole, over kept-alive
    connections, with no errors."""
    bodies = loadgen.chat_bodies(DEFAULT_MODEL, stream=stream, max_tokens=CHUNKS, n=3)
    port = upstream.port
    assert port is not None
    stats = await loadgen.closed_loop(port, loadgen.raw_requests(bodies, port), 2, 0.3,
                                      measure=True)
    assert len(stats.latencies) > 10
    assert (stats.non_2xx, stats.errors) == (0, 0)
    assert all(0 < latency < 1 for latency in stats.latencies)


async def test_closed_loop_warm_up_records_nothing(upstream: RawTestServer) -> None:
    port = upstream.port
    assert port is not None
    requests = loadgen.raw_requests([b"{}"], port)
    stats = await loadgen.closed_loop(port, requests, 1, 0.1, measure=False)
    assert stats == loadgen.ClosedLoopStats()


async def test_closed_loop_counts_refused_connections_as_errors() -> None:
    from loadtest.procs import free_port

    port = free_port()
    stats = await loadgen.closed_loop(port, loadgen.raw_requests([b"{}"], port), 1, 0.1,
                                      measure=True)
    assert stats.errors > 0 and stats.latencies == []


@pytest.mark.parametrize("stream", [False, True])
async def test_open_loop_times_each_round_trip(upstream: RawTestServer, stream: bool) -> None:
    """Every request is sent on schedule and timed to its first event and to its end."""
    bodies = loadgen.chat_bodies(DEFAULT_MODEL, stream=stream, max_tokens=CHUNKS, n=3)
    async with aiohttp.ClientSession() as session:
        trips = await loadgen.open_loop(session, str(upstream.make_url(CHAT_PATH)), bodies,
                                        stream, rate=200, count=20)
    assert len(trips) == 20
    for trip in trips:
        assert trip.error is None
        assert trip.first_event is not None and trip.end is not None
        assert 0 < trip.first_event <= trip.end < 1
        assert trip.lag >= 0


async def test_a_stream_without_done_is_an_error() -> None:
    server = RawTestServer(_broken_stream, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            (trip,) = await loadgen.open_loop(session, str(server.make_url(CHAT_PATH)),
                                              [b"{}"], True, rate=100, count=1)
    finally:
        await server.close()
    assert trip.error == "stream ended without [DONE]"
    assert trip.first_event is not None


async def test_a_refused_request_is_an_error_without_times() -> None:
    from loadtest.procs import free_port

    async with aiohttp.ClientSession() as session:
        (trip,) = await loadgen.open_loop(session, f"http://127.0.0.1:{free_port()}/",
                                          [b"{}"], False, rate=100, count=1)
    assert trip.error is not None and trip.error.startswith("ClientConnectorError")
    assert (trip.first_event, trip.end) == (None, None)
