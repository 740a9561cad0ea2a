"""Pools beyond the cluster: https endpoints, CA bundles, mutual TLS, SNI, injected headers
and per-pool timeouts, against real TLS servers on 127.0.0.1 with throwaway certificates."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from balancer.config import (
    HealthSettings,
    LimitsSettings,
    LoadSettings,
    PoolHeader,
    PoolHealthSettings,
    PoolSettings,
    PoolTimeouts,
    PoolTLSSettings,
    Settings,
    validate,
)
from balancer.outbound import ssl_context
from balancer.upstream import Connector, serialize_head
from tests.conftest import MODEL, Upstream, chat_body, make_settings
from tests.tlscerts import Certs, certs_for_session

SECRET_ENV = "sk-env-4f1d9c"
SECRET_FILE = "sk-file-8a2e77"
SECRET_ROTATED = "sk-file-rotated-19b3"
SECRET_LITERAL = "org-literal-5c0e"


@dataclass
class TLSServer:
    """A model-server double behind TLS: records every request and the SNI names it was
    asked for, and with ``required`` answers 401 to requests without that header value."""

    upstream: Upstream
    prefix: str = ""
    required: tuple[str, str] | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    def url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{self.prefix}"

    @web.middleware
    async def _record(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        self.seen.append({"method": request.method, "path": request.path,
                          "headers": dict(request.headers)})
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))
        if self.required is not None:
            name, value = self.required
            if request.headers.get(name) != value:
                return web.json_response({"error": {"message": "bad key"}}, status=401)
        return await handler(request)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL}]})

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=16 << 20)
        p, up = self.prefix, self.upstream
        app.router.add_post(p + "/v1/chat/completions", up.chat)
        app.router.add_get(p + "/v1/models", self._models)
        app.router.add_get(p + "/ping", self._ping)
        return app


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return certs_for_session(tmp_path_factory)


@pytest.fixture
async def tls_server(certs: Certs) -> AsyncIterator[Callable[..., Awaitable[TLSServer]]]:
    """Start TLS model-server doubles on 127.0.0.1 (server certificate from ``certs``)."""
    started: list[TLSServer] = []

    async def start(*, prefix: str = "", require_client_cert: bool = False,
                    required: tuple[str, str] | None = None) -> TLSServer:
        server = TLSServer(Upstream(name=f"tls{len(started)}"), prefix, required)
        context = certs.server_context(require_client_cert=require_client_cert)

        def on_sni(sock: Any, name: str | None, ctx: Any) -> None:
            server.sni.append(name)

        context.sni_callback = on_sni
        server.runner = web.AppRunner(server.app())
        await server.runner.setup()
        site = web.TCPSite(server.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        assert site._server is not None
        server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.runner is not None
        await server.runner.cleanup()


def settings_for(*pools: PoolSettings, **sections: Any) -> Settings:
    base = Settings(pools=pools, health=HealthSettings(active=False),
                    load=LoadSettings(poll_interval=0.0))
    return validate(replace(base, **sections))


async def test_https_endpoint_with_a_path_prefix_streams_and_reuses_connections(
        certs, tls_server, start_balancer):
    """A pool on ``https://localhost:PORT/openai`` with its CA bundle: a stream arrives whole,
    the path is sent under the prefix with the endpoint's Host, and sequential requests
    share one TLS connection."""
    server = await tls_server(prefix="/openai")
    run = await start_balancer(settings_for(PoolSettings(
        "hosted", (MODEL,), (server.url(),), tls=PoolTLSSettings(ca_file=str(certs.ca)))))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json=chat_body("hello", stream=True)) as r:
        assert r.status == 200
        text = await r.text()
    assert text.endswith("data: [DONE]\n\n") and "tok2" in text
    for _ in range(2):
        async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x")) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"] == "from tls0"
    assert [s["path"] for s in server.seen] == ["/openai/v1/chat/completions"] * 3
    assert server.seen[0]["headers"]["Host"] == f"localhost:{server.port}"
    assert len(set(server.peers)) == 1  # one keep-alive TLS connection for all three
    assert server.sni == ["localhost"]


async def test_a_certificate_that_does_not_verify_gives_502_and_a_metric(
        certs, tls_server, start_balancer, caplog):
    """With the wrong CA bundle the handshake fails: the client gets a 502 with an
    OpenAI-style error saying TLS, the failure is counted (reason tls) and logged with the
    verification error, and balancer keeps serving (another pool on the right CA works)."""
    server = await tls_server()
    run = await start_balancer(settings_for(
        PoolSettings("wrong", ("m-wrong",), (server.url(),),
                     tls=PoolTLSSettings(ca_file=str(certs.other_ca))),
        PoolSettings("right", ("m-right",), (server.url("127.0.0.1"),),
                     tls=PoolTLSSettings(ca_file=str(certs.ca)))))
    with caplog.at_level(logging.INFO, logger="balancer.proxy"):
        for _ in range(2):
            async with run.http.post(run.url + "/v1/chat/completions",
                                     json={**chat_body("x"), "model": "m-wrong"}) as r:
                assert r.status == 502
                error = (await r.json())["error"]
        assert "TLS" in error["message"] and error["type"]
    assert any("certificate verify failed" in rec.getMessage() for rec in caplog.records)
    assert await run.metric("balancer_upstream_errors_total", pool="wrong", reason="tls") >= 2
    assert not server.seen  # nothing was sent over the failed handshakes
    async with run.http.post(run.url + "/v1/chat/completions",
                             json={**chat_body("x"), "model": "m-right"}) as r:
        assert r.status == 200
    async with run.http.get(run.admin_url + "/healthz") as r:
        assert r.status == 200


async def test_mutual_tls_works_with_the_client_certificate_and_fails_without(
        certs, tls_server, start_balancer):
    """A server that demands a client certificate answers the pool configured with one
    and refuses the pool without (502, never a crash)."""
    server = await tls_server(require_client_cert=True)
    run = await start_balancer(settings_for(
        PoolSettings("mtls", ("m-cert",), (server.url(),), tls=PoolTLSSettings(
            ca_file=str(certs.ca), cert_file=str(certs.client_cert),
            key_file=str(certs.client_key))),
        PoolSettings("anon", ("m-anon",), (server.url("127.0.0.1"),),
                     tls=PoolTLSSettings(ca_file=str(certs.ca)))))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json={**chat_body("x", stream=True), "model": "m-cert"}) as r:
        assert r.status == 200
        assert (await r.text()).endswith("data: [DONE]\n\n")
    async with run.http.post(run.url + "/v1/chat/completions",
                             json={**chat_body("x"), "model": "m-anon"}) as r:
        assert r.status == 502
        assert (await r.json())["error"]["type"]
    assert [s["body"]["model"] for s in server.upstream.requests] == ["m-cert"]


async def test_server_name_is_sent_as_sni_and_verified(certs, tls_server, start_balancer):
    """An endpoint listed by address with ``tls.server_name`` sends that name as SNI and
    checks the certificate against it; a name the certificate lacks fails the handshake."""
    server = await tls_server()
    run = await start_balancer(settings_for(
        PoolSettings("named", ("m-named",), (server.url("127.0.0.1"),), tls=PoolTLSSettings(
            ca_file=str(certs.ca), server_name="model.test")),
        PoolSettings("misnamed", ("m-misnamed",), (server.url("127.0.0.1"),),
                     tls=PoolTLSSettings(ca_file=str(certs.ca), server_name="other.test"))))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json={**chat_body("x"), "model": "m-named"}) as r:
        assert r.status == 200
    async with run.http.post(run.url + "/v1/chat/completions",
                             json={**chat_body("x"), "model": "m-misnamed"}) as r:
        assert r.status == 502
    assert server.sni == ["model.test", "other.test"]
    assert await run.metric("balancer_upstream_errors_total", pool="misnamed",
                            reason="tls") == 1


async def test_injected_headers_reach_every_request_follow_the_file_and_are_never_shown(
        certs, tls_server, start_balancer, tmp_path: Path, monkeypatch, caplog):
    """Headers from the environment, a file and a literal value go with every request
    (replacing a client's own), with the model reads and the health checks; a rotated file
    is used within its check interval; no value appears in a log line, /debug/config or
    /debug/endpoints."""
    monkeypatch.setenv("TEST_PROVIDER_KEY", SECRET_ENV)
    key_file = tmp_path / "api-key"
    key_file.write_text(SECRET_FILE + "\n")
    server = await tls_server(required=("Authorization", f"Bearer {SECRET_FILE}"))
    pool = PoolSettings(
        "hosted", (), (server.url(),), tls=PoolTLSSettings(ca_file=str(certs.ca)),
        headers=(PoolHeader("Authorization", value_from_file=str(key_file), prefix="Bearer "),
                 PoolHeader("X-Env-Key", value_from_env="TEST_PROVIDER_KEY"),
                 PoolHeader("OpenAI-Organization", value=SECRET_LITERAL)),
        health=PoolHealthSettings(active=True, path="/ping"), load_poll=False)
    caplog.set_level(logging.DEBUG)
    run = await start_balancer(settings_for(
        pool, health=HealthSettings(interval=0.2),
        load=LoadSettings(poll_interval=0.2)))
    # The models are learned over TLS with the key (the server answers 401 without it).
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x"),
                             headers={"Authorization": "Bearer client-own"}) as r:
        assert r.status == 200
    sent = server.upstream.requests[-1]["headers"]
    assert sent["Authorization"] == f"Bearer {SECRET_FILE}"
    assert sent["X-Env-Key"] == SECRET_ENV and sent["OpenAI-Organization"] == SECRET_LITERAL
    async with asyncio.timeout(5):
        while not any(s["path"] == "/ping" for s in server.seen):
            await asyncio.sleep(0.05)
    for seen in server.seen:
        assert seen["headers"]["Authorization"] == f"Bearer {SECRET_FILE}", seen["path"]
    assert {"/v1/models", "/ping"} <= {s["path"] for s in server.seen}
    assert not any(s["path"] == "/metrics" for s in server.seen)  # load_poll off

    # A Secret rotates: the kubelet swaps the file; the next check picks it up.
    server.required = ("Authorization", f"Bearer {SECRET_ROTATED}")
    (tmp_path / "api-key.new").write_text(SECRET_ROTATED + "\n")
    os.replace(tmp_path / "api-key.new", key_file)
    await asyncio.sleep(1.2)  # the check interval is 1 s
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("y")) as r:
        assert r.status == 200
    assert server.upstream.requests[-1]["headers"]["Authorization"] == \
        f"Bearer {SECRET_ROTATED}"

    shown = []
    for path in ("/debug/config", "/debug/endpoints"):
        async with run.http.get(run.admin_url + path) as r:
            shown.append(await r.text())
    assert "<redacted>" in shown[0] and str(key_file) in shown[0]
    logged = [f"{rec.getMessage()} {rec.__dict__}" for rec in caplog.records]
    assert any("read again" in line for line in logged)
    for secret in (SECRET_ENV, SECRET_FILE, SECRET_ROTATED, SECRET_LITERAL):
        assert not [line for line in logged + shown if secret in line], secret


async def test_pool_timeouts_override_the_limits(upstreams, start_balancer):
    """A pool's own first-byte timeout answers 504 after its seconds while another pool on
    the same slow server waits under the global limit."""
    (up,) = await upstreams(1)
    up.first_byte_delay = 0.5
    base = make_settings([up.url], limits=LimitsSettings(first_byte_timeout=30.0))
    quick = PoolSettings("quick", ("m-quick",), (up.url,),
                         timeouts=PoolTimeouts(first_byte=0.1, total=20.0))
    run = await start_balancer(validate(replace(base, pools=(*base.pools, quick))))
    async with run.http.post(run.url + "/v1/chat/completions",
                             json={**chat_body("x"), "model": "m-quick"}) as r:
        assert r.status == 504
        assert "0.1 s" in (await r.json())["error"]["message"]
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x")) as r:
        assert r.status == 200
    forwarder = run.balancer.proxy.forwarder
    assert forwarder.total_timeout("quick") == 20.0 and forwarder.total_timeout("llama") == 0
    assert forwarder.outbound["llama"].first_byte_timeout == 30.0


async def test_tls_connections_are_reused_after_a_large_body(certs, tls_server):
    """The upstream client over TLS: a 10 MiB body goes out in slices and whole, and the
    connection goes back to the pool once the answer is read (a TLS transport's flow
    control differs from a plain one's, and a connection is reused only once its whole
    request went out)."""
    server = await tls_server()
    pool = Connector(5, ssl_context(
        "pools[0].tls", PoolTLSSettings(ca_file=str(certs.ca)))).open(server.url())
    body = json.dumps({**chat_body("x" * (10 << 20))}).encode()
    try:
        for _ in range(2):
            head = serialize_head("POST", "/v1/chat/completions", pool.host_header,
                                  [("Content-Type", "application/json")], len(body))
            response = await pool.request(head, body)
            assert response.status == 200
            assert b"from tls" in await response.read_all()
            response.release()
            assert pool.open_count == 1
    finally:
        pool.close()
    assert len(set(server.peers)) == 1


async def test_a_server_that_never_finishes_the_handshake_times_out_and_is_retried(
        certs, tls_server, start_balancer):
    """The pool's connect timeout covers the TLS handshake: an endpoint that accepts the
    connection and never answers the ClientHello fails after it, and the request is
    retried on the pool's other endpoint."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # until balancer gives up and closes

    hole = await asyncio.start_server(silent, "127.0.0.1", 0)
    server = await tls_server()
    try:
        hole_port = hole.sockets[0].getsockname()[1]
        run = await start_balancer(settings_for(PoolSettings(
            "hosted", (MODEL,), (f"https://localhost:{hole_port}", server.url()),
            tls=PoolTLSSettings(ca_file=str(certs.ca)), timeouts=PoolTimeouts(connect=0.3))))
        started = asyncio.get_running_loop().time()
        for i in range(10):  # distinct keys: some land on the silent endpoint first
            async with run.http.post(run.url + "/v1/chat/completions",
                                     json=chat_body(f"conversation {i}")) as r:
                assert r.status == 200
        elapsed = asyncio.get_running_loop().time() - started
        assert accepted  # the silent endpoint was tried ...
        assert len(server.upstream.requests) == 10  # ... and every request answered
        # One timed-out handshake (then the endpoint is ejected); generous upper bound.
        assert 0.3 <= elapsed < 5.0
        assert await run.metric("balancer_upstream_errors_total", pool="hosted",
                                reason="connect") >= 1
    finally:
        for writer in accepted:
            writer.close()
        hole.close()
        await hole.wait_closed()
