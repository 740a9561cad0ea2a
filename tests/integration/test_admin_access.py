"""Who may read the admin port: /debug only from loopback peers unless
``server.debug_from_anywhere``; /healthz, /readyz and /metrics for everyone (probes come from
the kubelet on the node, scrapes from Prometheus in another pod)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from balancer import app as balancer_app
from balancer.app import DebugFromLoopback, is_debug_path, is_loopback
from balancer.metrics import Metrics
from tests.conftest import make_settings


@given(st.ip_addresses(v=4))
def test_an_ipv4_peer_is_loopback_exactly_inside_127_0_0_0_8(address: Any) -> None:
    """Every IPv4 address, plain and IPv4-mapped in IPv6 (as a socket bound to :: reports
    it), is loopback exactly when it is in 127.0.0.0/8."""
    inside = address in ipaddress.ip_network("127.0.0.0/8")
    assert is_loopback(str(address)) is inside
    assert is_loopback(f"::ffff:{address}") is inside


@given(st.ip_addresses(v=6))
def test_an_ipv6_peer_is_loopback_only_as_1_or_a_mapped_127_address(address: Any) -> None:
    mapped = address.ipv4_mapped
    expected = address == ipaddress.ip_address("::1") or (
        mapped is not None and mapped.is_loopback)
    assert is_loopback(str(address)) is expected


@pytest.mark.parametrize("peer", [None, "", "localhost", "127.0.0.1:80", "not an address",
                                  "fe80::1%eth0", "0.0.0.0", "::"])
def test_no_address_a_name_or_an_unspecified_address_is_not_loopback(peer: str | None) -> None:
    """Only a parsed loopback address counts: not a missing peer (a Unix socket), not a name,
    not the unspecified address."""
    assert is_loopback(peer) is False


def test_a_scoped_loopback_address_is_loopback() -> None:
    assert is_loopback("::1%lo") is True


@pytest.mark.parametrize("path,expected", [
    ("/debug", True), ("/debug/config", True), ("/debug/endpoints", True),
    ("/debug/anything/else", True), ("/debugger", False), ("/metrics", False),
    ("/healthz", False), ("/readyz", False), ("/", False)])
def test_debug_paths_are_debug_and_its_subpaths(path: str, expected: bool) -> None:
    assert is_debug_path(path) is expected


class Transport:
    """The one thing the middleware asks of a connection: its peer. A peer outside
    127.0.0.1 cannot connect for real in tests, so the request is built around this."""

    def __init__(self, peer: tuple[str, int] | None) -> None:
        self._peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="served")


def _metric(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("balancer_rejected_requests_total", {"reason": reason})
    return value or 0.0


@pytest.mark.parametrize("peer", [("10.1.2.3", 40000), ("::ffff:10.1.2.3", 40000, 0, 0),
                                  ("fd00::7", 40000, 0, 0), None])
async def test_a_debug_request_from_another_pod_gets_403_a_log_line_and_a_metric(
        peer: tuple[Any, ...] | None, caplog: pytest.LogCaptureFixture) -> None:
    """A /debug request from a pod address (or an unknown peer) is refused with an OpenAI
    error body naming the setting that opens it, counted and logged; the handler never
    runs."""
    registry = CollectorRegistry()
    middleware = DebugFromLoopback(Metrics(registry))
    request = make_mocked_request("GET", "/debug/config", transport=Transport(peer))
    with caplog.at_level(logging.WARNING, logger="balancer.app"):
        response = await middleware(request, _ok)
    assert isinstance(response, web.Response)
    assert response.status == 403
    assert response.text is not None
    assert '"type": "permission_error"' in response.text
    assert "server.debug_from_anywhere" in response.text
    assert _metric(registry, "debug_forbidden") == 1
    assert any("/debug/config" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_and_scrapes_from_another_pod_are_served(path: str) -> None:
    registry = CollectorRegistry()
    middleware = DebugFromLoopback(Metrics(registry))
    request = make_mocked_request("GET", path, transport=Transport(("10.1.2.3", 40000)))
    response = await middleware(request, _ok)
    assert isinstance(response, web.Response)
    assert (response.status, response.text) == (200, "served")
    assert _metric(registry, "debug_forbidden") == 0


@pytest.mark.parametrize("peer", [("127.0.0.1", 40000), ("::1", 40000, 0, 0),
                                  ("::ffff:127.0.0.1", 40000, 0, 0)])
async def test_a_debug_request_from_loopback_is_served(peer: tuple[Any, ...]) -> None:
    """kubectl port-forward and exec connect from the pod's own loopback."""
    middleware = DebugFromLoopback(Metrics(CollectorRegistry()))
    request = make_mocked_request("GET", "/debug/endpoints", transport=Transport(peer))
    response = await middleware(request, _ok)
    assert isinstance(response, web.Response)
    assert response.status == 200


async def test_the_admin_port_serves_debug_to_a_real_loopback_client(upstreams,
                                                                     start_balancer) -> None:
    """Over a real socket from 127.0.0.1, every admin path answers (the guard is on)."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    assert run.balancer.settings.server.debug_from_anywhere is False
    for path in ("/debug/config", "/debug/endpoints", "/healthz", "/readyz", "/metrics"):
        async with run.http.get(run.admin_url + path) as r:
            assert r.status == 200, path
    assert await run.metric("balancer_rejected_requests_total",
                            reason="debug_forbidden") == 0


def test_the_guard_is_on_the_admin_app_unless_debug_is_opened_to_everyone() -> None:
    """The admin app carries the loopback guard by default, and none with
    server.debug_from_anywhere; the proxy app never does."""
    guarded = balancer_app.build(make_settings(["http://127.0.0.1:1"]),
                                 registry=CollectorRegistry())
    assert [type(m) for m in guarded.admin.middlewares] == [DebugFromLoopback]
    assert not any(isinstance(m, DebugFromLoopback) for m in guarded.app.middlewares)
    opened = balancer_app.build(make_settings(["http://127.0.0.1:1"],
                                              debug_from_anywhere=True),
                                registry=CollectorRegistry())
    assert list(opened.admin.middlewares) == []
