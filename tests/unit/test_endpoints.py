"""EndpointSlices → endpoints: the pure rules, table-driven and on recorded slices."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from balancer.endpoints import (
    Endpoint,
    endpoints_from_slices,
    is_ready,
    is_routable,
    is_serving,
    merge_endpoints,
    slice_endpoints,
    slice_port,
    static_endpoint,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "endpointslices"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


# conditions → (ready, serving, routable); None means the field is absent.
CONDITIONS = [
    ({}, True, True, True),
    (None, True, True, True),
    ({"ready": True}, True, True, True),
    ({"ready": False}, False, False, False),
    ({"ready": True, "serving": True, "terminating": False}, True, True, True),
    ({"ready": False, "serving": True, "terminating": True}, False, True, False),
    ({"ready": False, "serving": False, "terminating": True}, False, False, False),
    ({"serving": True, "terminating": True}, True, True, False),
    ({"ready": False, "serving": True}, False, True, False),
    ({"ready": True, "serving": False}, True, False, True),
    ({"terminating": True}, True, True, False),
    ({"ready": None, "serving": None, "terminating": None}, True, True, True),
]


@pytest.mark.parametrize(("conditions", "ready", "serving", "routable"), CONDITIONS)
def test_conditions_follow_the_endpointslice_api(
    conditions: dict[str, Any] | None, ready: bool, serving: bool, routable: bool
) -> None:
    """ready absent = true, serving absent defers to ready, terminating absent = false;
    routable = ready and not terminating."""
    assert is_ready(conditions) is ready
    assert is_serving(conditions) is serving
    assert is_routable(conditions) is routable


def test_a_rollout_slice_keeps_ready_pods_drains_terminating_ones_and_skips_the_rest() -> None:
    """During a rolling update: the ready pod is routable, the serving terminating one drains,
    a terminated one and a new pod not ready yet are left out."""
    endpoints = slice_endpoints(fixture("rollout.json"), "http")
    assert endpoints == [
        Endpoint("vllm-6d9f7c8b5-abcde", "http://10.42.0.17:8000", "eu-west-1a", True,
                 "gpu-node-a"),
        Endpoint("vllm-5c8d6b7a4-fghij", "http://10.42.1.23:8000", "eu-west-1b", False,
                 "gpu-node-b", terminating=True),
    ]


@pytest.mark.parametrize(
    ("port", "expected"),
    [("http", 8000), ("metrics", 9400), ("grpc", None), (8001, 8001), ("", None)],
)
def test_ports_resolve_by_name_in_the_slice_or_by_number_as_given(
    port: int | str, expected: int | None
) -> None:
    assert slice_port(fixture("rollout.json"), port) == expected


def test_a_port_name_the_slice_lacks_gives_no_endpoints() -> None:
    assert slice_endpoints(fixture("rollout.json"), "grpc") == []


def test_a_udp_port_is_not_an_http_port() -> None:
    """The port name must be a TCP port of the slice."""
    assert slice_endpoints(fixture("fqdn.json"), "quic") == []
    (only,) = slice_endpoints(fixture("fqdn.json"), "http")
    assert only.url == "http://llm-a.inference.example.internal:8000"


def test_without_a_target_ref_the_identity_is_address_and_port() -> None:
    """Hand-made slices name no pod: address:port identifies the endpoint; only the first of
    several addresses is used; empty or absent conditions mean ready."""
    endpoints = slice_endpoints(fixture("manual-no-target-ref.json"), 8080)
    assert [(e.id, e.url, e.serving) for e in endpoints] == [
        ("192.168.10.5:8080", "http://192.168.10.5:8080", True),
        ("192.168.10.7:8080", "http://192.168.10.7:8080", True),
        ("192.168.10.9:8080", "http://192.168.10.9:8080", True),
    ]
    assert all(e.zone is None and e.node is None for e in endpoints)


def test_an_unnamed_port_is_found_by_the_empty_name() -> None:
    """A Service with a single unnamed port gives slices whose port has no name."""
    assert slice_port(fixture("manual-no-target-ref.json"), "") == 8080


def test_ipv6_addresses_are_bracketed_in_urls_and_fallback_ids() -> None:
    item = fixture("dual-stack-ipv6.json")
    urls = {e.id: e.url for e in slice_endpoints(item, "http")}
    assert urls["vllm-2"] == "http://[fd00:10:42:2::31]:8000"
    del item["endpoints"][2]["targetRef"]
    ids = {e.id for e in slice_endpoints(item, "http")}
    assert "[fd00:10:42:2::31]:8000" in ids


def test_a_dual_stack_service_gives_each_pod_once_in_any_slice_order() -> None:
    """The same pod in the IPv4 and the IPv6 slice is one endpoint, the same one whichever
    slice comes first (replicas must agree); a pod only in one family is kept."""
    v4, v6 = fixture("dual-stack-ipv4.json"), fixture("dual-stack-ipv6.json")
    results = {endpoints_from_slices(order, "http") for order in itertools.permutations([v4, v6])}
    assert len(results) == 1
    (endpoints,) = results
    assert {e.id: e.url for e in endpoints} == {
        "vllm-0": "http://10.42.0.17:8000",
        "vllm-1": "http://10.42.1.23:8000",
        "vllm-2": "http://[fd00:10:42:2::31]:8000",
    }


def test_a_pod_listed_twice_is_routable_if_either_copy_is() -> None:
    """While a pod moves between slices (or in both families), the routable copy wins."""
    draining = Endpoint("vllm-0", "http://10.0.0.1:8000", serving=False)
    routable = Endpoint("vllm-0", "http://10.0.0.2:8000", serving=True)
    assert merge_endpoints([[draining], [routable]]) == {routable}
    assert merge_endpoints([[routable], [draining]]) == {routable}


def test_a_slice_without_endpoints_or_ports_gives_none() -> None:
    assert slice_endpoints({"endpoints": None, "ports": None}, "http") == []
    assert slice_endpoints({"endpoints": [{"addresses": []}],
                            "ports": [{"name": "http", "port": 1}]}, "http") == []
    assert endpoints_from_slices([], "http") == frozenset()


def test_a_target_ref_that_is_not_a_pod_is_not_an_identity() -> None:
    item = {"endpoints": [{"addresses": ["10.0.0.1"],
                           "targetRef": {"kind": "Node", "name": "gpu-node-a"}}],
            "ports": [{"name": "http", "port": 8000}]}
    assert [e.id for e in slice_endpoints(item, "http")] == ["10.0.0.1:8000"]


@pytest.mark.parametrize(
    ("url", "identity", "base"),
    [
        ("http://vllm-0.vllm.llm.svc:8000", "vllm-0.vllm.llm.svc:8000",
         "http://vllm-0.vllm.llm.svc:8000"),
        ("https://llm.example.com", "llm.example.com:443", "https://llm.example.com:443"),
        ("http://[fd00::1]:8000/", "[fd00::1]:8000", "http://[fd00::1]:8000"),
    ],
)
def test_static_endpoints_are_identified_by_host_and_port(url: str, identity: str,
                                                          base: str) -> None:
    assert static_endpoint(url) == Endpoint(identity, base)
