"""The proxy port's front door, on real sockets: the cap on requests in progress, slow
clients cut off, idle connections closed, what error answers leak, who the client is,
``Expect: 100-continue`` and the ``Server`` header."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace

import pytest

from balancer.config import LimitsSettings, Settings
from tests.conftest import RunningBalancer, chat_body, make_settings

CHAT = "/v1/chat/completions"
BODY = json.dumps(chat_body("hello there")).encode()


def quiet(settings: Settings) -> Settings:
    """No active health checks: the tests count the connections and requests they make."""
    return replace(settings, health=replace(settings.health, active=False))


async def connect(run: RunningBalancer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", run.running.port)


def head(length: int = len(BODY), *extra: bytes) -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/1.1", b"Host: balancer",
             b"Content-Type: application/json", b"Content-Length: %d" % length, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def answer(reader: asyncio.StreamReader, timeout: float = 5.0
                 ) -> tuple[int, dict[str, str], bytes]:
    """One response read off a raw connection: status, headers, body."""
    async with asyncio.timeout(timeout):
        raw_head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw_head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection: an end of stream, or a reset, which is what
    TCP answers a client that was still sending when the server closed."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def test_requests_beyond_the_cap_get_503_before_their_body_is_read(
        upstreams, start_balancer):
    """Three slow uploads hold the three slots; a fourth is refused with 503 and
    Retry-After before it sent its body (no 100 Continue); once the uploads finish,
    requests pass again and nothing is left counted."""
    (up,) = await upstreams(1)
    limits = LimitsSettings(max_concurrent_requests=3, client_body_timeout=30)
    run = await start_balancer(quiet(make_settings([up.url], limits=limits)))
    uploads = [await connect(run) for _ in range(3)]
    for _, writer in uploads:
        writer.write(head() + BODY[:10])
    async with asyncio.timeout(5):
        while run.balancer.front.active < 3:
            await asyncio.sleep(0.01)

    reader, writer = await connect(run)
    writer.write(head(1_000_000, b"Expect: 100-continue"))
    status, headers, body = await answer(reader)
    writer.close()
    assert status == 503  # not 100: the body was never asked for
    assert headers["retry-after"] == "1"
    assert headers["server"] == "balancer"
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", 503)
    assert await run.metric("balancer_rejected_requests_total",
                            reason="concurrency_limit") == 1
    assert await run.metric("balancer_front_requests") == 3

    for upload_reader, upload_writer in uploads:
        upload_writer.write(BODY[10:])
        status, _, _ = await answer(upload_reader)
        assert status == 200
        upload_writer.close()
    async with run.http.post(run.url + CHAT, json=chat_body("again")) as r:
        assert r.status == 200
    await run.wait_idle()
    assert run.balancer.front.active == 0
    assert await run.metric("balancer_front_requests") == 0
    assert len(up.requests) == 4


async def test_a_slowloris_head_is_cut_off_with_408(upstreams, start_balancer):
    """A head trickled a byte at a time is answered 408 and closed within the header
    timeout of its first byte, however steadily it trickles."""
    (up,) = await upstreams(1)
    limits = LimitsSettings(client_header_timeout=0.3)
    run = await start_balancer(quiet(make_settings([up.url], limits=limits)))
    reader, writer = await connect(run)

    async def trickle() -> None:
        for byte in head():
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    started = time.monotonic()
    try:
        status, headers, body = await answer(reader)
        assert await closed(reader)  # then closed (a reset if a byte was still arriving)
    finally:
        sender.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 4  # the timeout is 0.3 s; generous above for a busy machine
    assert status == 408
    assert headers["server"] == "balancer"
    assert json.loads(body)["error"]["code"] == 408
    assert await run.metric("balancer_client_timeouts_total", phase="header") == 1
    assert up.requests == []


async def test_a_slowly_sent_body_is_cut_off_with_408(upstreams, start_balancer):
    """A body still arriving at the body timeout gets 408, frees its slot and reaches no
    model server."""
    (up,) = await upstreams(1)
    limits = LimitsSettings(client_body_timeout=0.3)
    run = await start_balancer(quiet(make_settings([up.url], limits=limits)))
    reader, writer = await connect(run)
    writer.write(head())

    async def trickle() -> None:
        for byte in BODY:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    started = time.monotonic()
    try:
        status, headers, body = await answer(reader)
    finally:
        sender.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 4
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert await run.metric("balancer_client_timeouts_total", phase="body") == 1
    assert run.balancer.front.active == 0
    assert up.requests == []
    # The process keeps serving.
    async with run.http.post(run.url + CHAT, json=chat_body("next")) as r:
        assert r.status == 200


async def test_idle_connections_are_closed_after_the_keepalive_timeout(
        upstreams, start_balancer):
    """A connection that never sends a byte, and one idle after a request, are closed
    quietly (no 408) after the keep-alive timeout."""
    (up,) = await upstreams(1)
    limits = LimitsSettings(client_keepalive_timeout=0.3)
    run = await start_balancer(quiet(make_settings([up.url], limits=limits)))
    silent_reader, silent_writer = await connect(run)
    used_reader, used_writer = await connect(run)
    used_writer.write(head() + BODY)
    status, _, _ = await answer(used_reader)
    assert status == 200
    started = time.monotonic()
    try:
        assert await asyncio.wait_for(silent_reader.read(), 5) == b""
        assert await asyncio.wait_for(used_reader.read(), 5) == b""
    finally:
        silent_writer.close()
        used_writer.close()
    assert time.monotonic() - started < 4
    assert await run.metric("balancer_client_timeouts_total") == 0


async def test_a_502_names_no_internal_address_but_the_log_does(
        upstreams, start_balancer, caplog: pytest.LogCaptureFixture):
    """The client learns that the model server could not be reached and its request id;
    which endpoint failed, and how, is in the log."""
    (up,) = await upstreams(1)
    url, endpoint = up.url, up.endpoint_id
    assert up.server is not None
    await up.server.close()
    run = await start_balancer(quiet(make_settings([url])))
    caplog.set_level(logging.INFO, logger="balancer")
    async with run.http.post(run.url + CHAT, json=chat_body("hi"),
                             headers={"X-Request-Id": "req-502"}) as r:
        assert r.status == 502
        text = await r.text()
    port = endpoint.rpartition(":")[2]
    assert "127.0.0.1" not in text and port not in text
    assert "req-502" in json.loads(text)["error"]["message"]
    logged = [r.getMessage() for r in caplog.records if "req-502" in r.getMessage()]
    assert any(endpoint in line and "from 127.0.0.1" in line for line in logged), logged


async def test_a_504_names_no_internal_address(upstreams, start_balancer):
    """The first-byte timeout's answer says how long was waited, not on whom."""
    (up,) = await upstreams(1)
    up.first_byte_delay = 5
    limits = LimitsSettings(first_byte_timeout=0.3)
    run = await start_balancer(quiet(make_settings([up.url], limits=limits)))
    async with run.http.post(run.url + CHAT, json=chat_body("hi")) as r:
        assert r.status == 504
        text = await r.text()
    assert "127.0.0.1" not in text and str(up.endpoint_id.rpartition(":")[2]) not in text


async def test_a_trusted_proxy_names_the_client_and_the_scheme(
        upstreams, start_balancer, caplog: pytest.LogCaptureFixture):
    """Behind a trusted proxy the logged client is the first untrusted hop and the proxy's
    X-Forwarded-Proto passes; the peer is appended to X-Forwarded-For either way."""
    (up,) = await upstreams(1)
    forwarded = {"X-Forwarded-For": "192.0.2.1, 198.51.100.7", "X-Forwarded-Proto": "https",
                 "X-Request-Id": "req-xff"}
    plain = await start_balancer(quiet(make_settings([up.url])))
    async with plain.http.post(plain.url + CHAT, json=chat_body("hi"), headers=forwarded) as r:
        assert r.status == 200
    sent = {k.lower(): v for k, v in up.requests[-1]["headers"].items()}
    assert sent["x-forwarded-for"] == "192.0.2.1, 198.51.100.7, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"  # the client's own claim is not believed

    behind = await start_balancer(quiet(make_settings([up.url],
                                                      trusted_proxies=("127.0.0.0/8",))))
    async with behind.http.post(behind.url + CHAT, json=chat_body("hi"),
                                headers=forwarded) as r:
        assert r.status == 200
    sent = {k.lower(): v for k, v in up.requests[-1]["headers"].items()}
    assert sent["x-forwarded-for"] == "192.0.2.1, 198.51.100.7, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "https"

    assert up.server is not None
    await up.server.close()
    caplog.set_level(logging.INFO, logger="balancer")
    async with behind.http.post(behind.url + CHAT, json=chat_body("hi"),
                                headers=forwarded) as r:
        assert r.status == 502
    logged = [r.getMessage() for r in caplog.records if "req-xff" in r.getMessage()]
    assert any("from 198.51.100.7" in line for line in logged), logged


async def test_expect_100_continue_works_and_is_not_forwarded(upstreams, start_balancer):
    """The client is told to continue before it sends the body, gets its answer, and the
    model server never sees the Expect header."""
    (up,) = await upstreams(1)
    run = await start_balancer(quiet(make_settings([up.url])))
    reader, writer = await connect(run)
    try:
        writer.write(head(len(BODY), b"Expect: 100-continue"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(BODY)
        status, _, body = await answer(reader)
    finally:
        writer.close()
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "from up0"
    sent = {k.lower() for k in up.requests[-1]["headers"]}
    assert "expect" not in sent


async def test_every_answer_says_server_balancer_without_versions(upstreams, start_balancer):
    """Forwarded answers, balancer's own errors, malformed HTTP and the admin port all send
    ``Server: balancer``."""
    (up,) = await upstreams(1)
    run = await start_balancer(quiet(make_settings([up.url])))
    seen = []
    async with run.http.post(run.url + CHAT, json=chat_body("hi")) as r:
        seen.append(r.headers["Server"])
    async with run.http.post(run.url + CHAT, json=chat_body("hi", stream=True)) as r:
        await r.read()
        seen.append(r.headers["Server"])
    for url in (run.url + "/nope", run.url + "/v1/models", run.admin_url + "/healthz",
                run.admin_url + "/nope"):
        async with run.http.get(url) as r:
            seen.append(r.headers["Server"])
    reader, writer = await connect(run)
    writer.write(b"GARBAGE\r\n\r\n")
    status, headers, _ = await answer(reader)
    writer.close()
    seen.append(headers["server"])
    assert 400 <= status < 500
    assert seen == ["balancer"] * len(seen)
