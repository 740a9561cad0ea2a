"""Request smuggling shapes and header floods: refused at the HTTP layer, nothing forwarded.

A proxy that frames a request differently from the server behind it (or from a proxy in
front of it) lets a client hide a second request inside the first. balancer parses with
llhttp in strict mode and re-frames every request it forwards (its own ``Content-Length``
over the body it read), so an ambiguous request must be refused outright with a 400 and the
connection closed: never guessed at, never forwarded.
"""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from tests.adversarial.conftest import MODEL, Target

BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 4}).encode()
SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
"""A second request hidden in the first one's body, were the framing misread."""


def request(*headers: bytes, body: bytes = BODY, eol: bytes = b"\r\n") -> bytes:
    head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: balancer",
            b"Content-Type: application/json", *headers]
    return eol.join(head) + eol + eol + body


CASES = {
    # Content-Length and Transfer-Encoding together (RFC 9112 §6.1: a server may reject it,
    # a proxy must not forward both).
    "cl-and-te": request(b"Content-Length: %d" % len(BODY), b"Transfer-Encoding: chunked",
                         body=b"0\r\n\r\n" + SMUGGLED),
    "two-different-cls": request(b"Content-Length: %d" % len(BODY), b"Content-Length: 5"),
    "cl-list": request(b"Content-Length: %d, 5" % len(BODY)),
    "cl-signed": request(b"Content-Length: +%d" % len(BODY)),
    "te-not-chunked-last": request(b"Transfer-Encoding: chunked, identity",
                                   body=b"0\r\n\r\n" + SMUGGLED),
    "te-obfuscated": request(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
    "obs-fold": request(b"Content-Length: %d" % len(BODY), b"X-Folded: a", b" b"),
    "space-before-colon": request(b"Content-Length : %d" % len(BODY)),
    "bare-lf": request(b"Content-Length: %d" % len(BODY), eol=b"\n"),
    "bare-cr-in-value": request(b"Content-Length: %d" % len(BODY), b"X-A: a\rb"),
    "nul-in-header": request(b"Content-Length: %d" % len(BODY), b"X-A: a\x00b"),
    "bad-chunk-size": request(b"Transfer-Encoding: chunked", body=b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-overflow": request(b"Transfer-Encoding: chunked",
                                   body=b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    "http-0.9": b"GET /v1/models\r\n\r\n",
    "bad-version": b"GET /v1/models HTTP/7.1\r\nHost: x\r\n\r\n",
    "header-without-colon": request(b"Content-Length: %d" % len(BODY), b"NoColonHere"),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_an_ambiguous_request_is_refused_and_nothing_is_forwarded(target: Target,
                                                                        name: str):
    async with aiohttp.ClientSession() as session:
        before = target.total(await target.metrics(session), "balancer_requests_total")
        response = await target.raw(CASES[name], read_timeout=3)
        after = target.total(await target.metrics(session), "balancer_requests_total")
    assert response.status == 400, response.data[:300]
    assert response.closed
    assert response.error()["type"] == "invalid_request_error"
    # Nothing reached a pod: no request was answered, the hidden one included.
    assert after == before
    assert len(re.findall(rb"(?:^|\r\n)HTTP/\d\.\d \d{3} ", response.data)) == 1
    await target.intact()


async def test_a_header_line_over_the_limit_is_refused(target: Target):
    response = await target.raw(request(b"Content-Length: %d" % len(BODY),
                                        b"X-Big: " + b"a" * 20_000))
    assert response.status in (400, 431), response.data[:300]
    assert response.closed
    await target.intact()


async def test_a_flood_of_headers_is_refused(target: Target):
    flood = [b"X-H%d: %s" % (i, b"v" * 100) for i in range(2_000)]
    response = await target.raw(request(b"Content-Length: %d" % len(BODY), *flood))
    assert response.status in (400, 431), response.data[:300]
    assert response.closed
    await target.intact()


async def test_pipelined_requests_are_answered_in_order(target: Target):
    """Two well-framed requests back to back on one connection: two answers, in order
    (pipelining is legal; it must not be mistaken for smuggling nor lose the second)."""
    one = request(b"Content-Length: %d" % len(BODY))
    two = b"GET /v1/models HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n"
    response = await target.raw(one + two, read_timeout=5)
    assert response.data.count(b"HTTP/1.1 200") == 2, response.data[:500]
    assert response.data.rfind(b'"object": "list"') > response.data.find(b"chat.completion")
    await target.intact()
