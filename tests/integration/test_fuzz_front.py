"""The HTTP front fuzzed with hypothesis: random methods, paths, headers and bodies.

balancer may answer 2xx/4xx itself or relay the upstream's answer, but never a 5xx of its own,
never crash, and when the dust settles nothing is counted in flight. The balancer and a
model-server double run in a background thread with their own loop; hypothesis drives plain
blocking sockets, so every byte sent is exactly what hypothesis drew.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from balancer import app as balancer_app
from balancer.config import LimitsSettings
from tests.conftest import MODEL, Upstream, make_settings


@dataclass
class Front:
    port: int
    balancer: balancer_app.Balancer
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    import uvloop

    loop = uvloop.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}
    stop = asyncio.Event()

    async def main() -> None:
        upstream = Upstream(name="fuzz")
        upstream.server = TestServer(upstream.app(), host="127.0.0.1")
        await upstream.server.start_server()
        settings = make_settings([upstream.url], limits=LimitsSettings(
            max_body_bytes=4096, max_header_bytes=2048))
        balancer = balancer_app.build(settings, registry=CollectorRegistry())
        running = await balancer_app.start(balancer, host="127.0.0.1", port=0, admin_port=0)
        await asyncio.wait_for(balancer.synced.wait(), 5)
        holder["front"] = Front(running.port, balancer, loop)
        ready.set()
        await stop.wait()
        await running.stop()
        await upstream.server.close()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(20)
    yield holder["front"]  # type: ignore[misc]
    loop.call_soon_threadsafe(stop.set)
    thread.join(20)


TOKEN = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                       exclude_characters='()<>@,;:\\"/[]?={} '),
                min_size=1, max_size=12)
METHODS = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS",
                                     "PATCH"]), TOKEN)
PATHS = st.one_of(
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                     "/v1/models", "/v1/other", "/", "/v1/", "/v2/x"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40)
    .map(lambda s: "/" + s),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12,
)
CHAT_LIKE = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), st.text(max_size=10), JSON_VALUES)},
    optional={"messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                        "content": st.one_of(st.text(max_size=30),
                                                             JSON_VALUES)}), max_size=3),
        JSON_VALUES),
        "prompt": JSON_VALUES, "stream": st.one_of(st.booleans(), JSON_VALUES),
        "user": JSON_VALUES, "input": JSON_VALUES},
)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    CHAT_LIKE.map(lambda v: json.dumps(v).encode()),
)
HEADERS = st.lists(st.tuples(TOKEN, st.text(alphabet=st.characters(min_codepoint=32,
                                                                   max_codepoint=126),
                                            max_size=30)), max_size=5)
CONTENT_TYPES = st.sampled_from([None, "application/json", "text/plain",
                                 "application/x+json", "multipart/form-data", "garbage"])


def _request(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # No half-close: balancer cancels the request of a client that hung up.
        s.sendall(raw)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def _check(front: Front, method: str, path: str, headers: list[tuple[str, str]],
           content_type: str | None, body: bytes, lie_about_length: bool) -> None:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{front.port}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    # A lie shorter than the body: the rest reads as garbage where a next request would be.
    length = max(len(body) - 3, 0) if lie_about_length else len(body)
    lines.append(f"Content-Length: {length}")
    for name, value in headers:
        if name.lower() not in {"host", "connection", "content-length", "transfer-encoding",
                                "content-type"}:
            lines.append(f"{name}: {value}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    answer = _request(front.port, raw)
    if not answer:
        event("closed without an answer")
        return
    status_line, _, rest = answer.partition(b"\r\n")
    parts = status_line.split(b" ")
    assert parts[0] in (b"HTTP/1.0", b"HTTP/1.1"), answer[:200]
    status = int(parts[1])
    head = rest.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
    relayed = any(line.startswith(b"x-balancer-endpoint:") for line in head)
    event(f"{'relayed' if relayed else 'own'} {status}")
    if not relayed:
        assert status < 500, answer[:400]


FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(method=METHODS, path=PATHS, headers=HEADERS, content_type=CONTENT_TYPES, body=BODIES,
       lie_about_length=st.booleans())
def test_front_never_answers_its_own_5xx(front: Front, method: str, path: str,
                                         headers: list[tuple[str, str]],
                                         content_type: str | None, body: bytes,
                                         lie_about_length: bool) -> None:
    """Whatever arrives, balancer answers with a 2xx/4xx of its own or relays the upstream."""
    _check(front, method, path, headers, content_type, body, lie_about_length)


VALID_CORE = {
    "/v1/chat/completions": st.fixed_dictionaries({"messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                               "content": st.text(max_size=40)}), min_size=1, max_size=3)}),
    "/v1/completions": st.fixed_dictionaries({"prompt": st.text(max_size=40)}),
    "/v1/embeddings": st.fixed_dictionaries({"input": st.text(min_size=1, max_size=40)}),
}


@st.composite
def nearly_valid(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    path = draw(st.sampled_from(sorted(VALID_CORE)))
    extra = draw(st.dictionaries(st.sampled_from(["stream", "user", "max_tokens", "n", "x",
                                                  "stream_options", "temperature"]),
                                 JSON_VALUES, max_size=3))
    return path, {**extra, **draw(VALID_CORE[path]), "model": MODEL}


@FUZZ
@given(request=nearly_valid(), headers=HEADERS)
def test_nearly_valid_requests_never_get_a_5xx_of_balancers_own(
        front: Front, request: tuple[str, dict[str, object]], headers: list[tuple[str, str]]
) -> None:
    """POSTs of valid requests with random extra fields and headers."""
    path, body = request
    _check(front, "POST", path, headers, "application/json", json.dumps(body).encode(), False)


def test_after_fuzzing_nothing_is_left_in_flight(front: Front) -> None:
    """Runs after the fuzz (file order): every count is back to zero."""

    async def settled() -> None:
        async with asyncio.timeout(10):
            pool = front.balancer.router.pools["llama"]
            while front.balancer.proxy.in_flight or any(pool.load.values()) \
                    or pool.total_load:
                await asyncio.sleep(0.02)

    asyncio.run_coroutine_threadsafe(settled(), front.loop).result(15)
