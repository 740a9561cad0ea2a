"""Endpoints: the model servers a pool routes to, as immutable values.

Also the pure half of Kubernetes discovery: turning ``discovery.k8s.io/v1`` EndpointSlices
(plain dicts in the API's JSON shape, as a LIST or WATCH returns them) into endpoints. Keeping
this free of I/O lets the rules below be tested exhaustively and keeps ``discovery`` down to
talking to the API server.

Condition semantics follow the EndpointSlice API (and kube-proxy):

- ``ready`` absent means true (a producer that does not know says nothing);
- ``serving`` absent defers to ``ready`` (older producers set only ``ready``);
- ``terminating`` absent means false.

An endpoint takes new requests when it is ready and not terminating. A serving endpoint that is
terminating (or otherwise not ready) still answers, so it is kept as a draining endpoint
(``serving=False``): the router sends it nothing new and lets its in-flight requests finish --
unless a pool has no ready endpoint at all, when, as kube-proxy does, it routes to the serving
endpoints that are terminating (``terminating=True``) rather than fail. An endpoint that is
not even serving (starting up, failing its probe) is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model server.

    ``id`` is the identity on the hash ring: it must stay the same while the server is the
    same (a pod name in Kubernetes, host:port for a static endpoint) so the server keeps its
    ring position, and with it the prefixes it has cached, across restarts of the balancer
    and in every balancer replica.
    """

    id: str
    url: str
    """Base URL, e.g. ``http://10.0.0.7:8000``; a static endpoint's may end in a path
    prefix (``https://gateway:443/openai``), put before every path sent there."""
    zone: str | None = None
    serving: bool = True
    """False while the endpoint drains: it takes no new requests but finishes its own."""
    node: str | None = None
    """Kubernetes node name, when discovered from an EndpointSlice."""
    terminating: bool = False
    """Draining because its pod is terminating while it still serves: the router's last
    resort when a pool has no endpoint that is ``serving``."""


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets as URLs need it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def static_endpoint(url: str, zone: str | None = None) -> Endpoint:
    """An endpoint from a configured base URL (and the zone it was listed with); its id is
    the URL's host:port, followed by its path prefix if it has one (two prefixes on one host
    are two endpoints)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    netloc = host_port(parts.hostname or "", port) + parts.path.rstrip("/")
    return Endpoint(id=netloc, url=f"{parts.scheme}://{netloc}", zone=zone)


# -- EndpointSlice conditions ---------------------------------------------------------------


def is_ready(conditions: Mapping[str, Any] | None) -> bool:
    """``ready``, which the API says to read as true when absent."""
    ready = (conditions or {}).get("ready")
    return True if ready is None else bool(ready)


def is_serving(conditions: Mapping[str, Any] | None) -> bool:
    """Whether the endpoint answers requests at all, terminating or not (``serving``,
    deferring to ``ready`` when absent)."""
    serving = (conditions or {}).get("serving")
    return is_ready(conditions) if serving is None else bool(serving)


def is_terminating(conditions: Mapping[str, Any] | None) -> bool:
    return bool((conditions or {}).get("terminating"))


def is_routable(conditions: Mapping[str, Any] | None) -> bool:
    """Whether the endpoint takes new requests: ready and not terminating."""
    return is_ready(conditions) and not is_terminating(conditions)


# -- EndpointSlices → endpoints -------------------------------------------------------------


def slice_port(endpoint_slice: Mapping[str, Any], port: int | str) -> int | None:
    """The port number to use for a slice's endpoints: a number as given, a name looked up
    in the slice's ports (the Service port's name; the number there is the pod's port)."""
    if isinstance(port, int):
        return port
    for entry in endpoint_slice.get("ports") or ():
        if entry.get("name", "") == port and isinstance(entry.get("port"), int):
            protocol = entry.get("protocol") or "TCP"
            if protocol == "TCP":
                return int(entry["port"])
    return None


def slice_endpoints(endpoint_slice: Mapping[str, Any], port: int | str) -> list[Endpoint]:
    """The endpoints of one EndpointSlice that can answer requests.

    Each keeps the identity of its pod (``targetRef.name``; ``address:port`` when there is no
    pod), so a pod that moves to a new address keeps its ring position, while a new pod at an
    old address gets a new one (its cache is empty). Only the first address is used: the API
    defines no meaning for the others.
    """
    number = slice_port(endpoint_slice, port)
    if number is None:
        return []
    out = []
    for item in endpoint_slice.get("endpoints") or ():
        addresses = item.get("addresses") or ()
        conditions = item.get("conditions")
        if not addresses or not is_serving(conditions):
            continue
        netloc = host_port(str(addresses[0]), number)
        ref = item.get("targetRef") or {}
        identity = ref.get("name") if ref.get("kind", "Pod") == "Pod" else None
        out.append(Endpoint(
            id=identity or netloc,
            url=f"http://{netloc}",
            zone=item.get("zone"),
            serving=is_routable(conditions),
            node=item.get("nodeName"),
            terminating=is_terminating(conditions),
        ))
    return out


def _preference(endpoint: Endpoint) -> tuple[bool, str]:
    return (not endpoint.serving, endpoint.url)


def merge_endpoints(groups: Iterable[Iterable[Endpoint]]) -> frozenset[Endpoint]:
    """One endpoint per identity over several slices.

    The same pod can be listed twice: for a moment while the EndpointSlice controller moves it
    between slices, and in both the IPv4 and the IPv6 slice of a dual-stack Service. The
    routable copy wins, then the smallest URL, so every balancer replica picks the same one
    whatever order the slices arrived in.
    """
    best: dict[str, Endpoint] = {}
    for group in groups:
        for endpoint in group:
            current = best.get(endpoint.id)
            if current is None or _preference(endpoint) < _preference(current):
                best[endpoint.id] = endpoint
    return frozenset(best.values())


def endpoints_from_slices(
    slices: Iterable[Mapping[str, Any]], port: int | str
) -> frozenset[Endpoint]:
    """All endpoints of a Service from all its EndpointSlices."""
    return merge_endpoints(slice_endpoints(s, port) for s in slices)
