"""Endpoints: the model servers a pool routes to, as immutable values."""

from __future__ import annotations

from dataclasses import dataclass
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
    """Base URL without a path, e.g. ``http://10.0.0.7:8000``."""
    zone: str | None = None
    serving: bool = True
    """False while the endpoint drains: it takes no new requests but finishes its own."""


def static_endpoint(url: str) -> Endpoint:
    """An endpoint from a configured base URL; its id is the URL's host:port."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Endpoint(id=netloc, url=f"{parts.scheme}://{netloc}")
