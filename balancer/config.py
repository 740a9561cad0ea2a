"""Settings: grouped, frozen, validated.

Configuration comes from three layers, later ones winning: the YAML file, environment variables
(``BALANCER_<SECTION>_<KEY>``, e.g. ``BALANCER_ROUTING_LOAD_FACTOR=1.5``) and command-line flags
(``--set routing.load_factor=1.5`` and a few shortcuts). Every problem is reported as a
:class:`ConfigError` naming the key, the value and what is allowed, so a bad deployment fails at
start instead of misrouting traffic.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import yaml

ENV_PREFIX = "BALANCER_"


class ConfigError(ValueError):
    """An invalid configuration; the message names the key, the value and what is allowed."""


class Strategy(enum.StrEnum):
    CHWBL = "chwbl"
    LEAST_REQUEST = "least-request"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"


class LoadSource(enum.StrEnum):
    AUTO = "auto"
    LOCAL = "local"
    REPORTS = "reports"


class KeyMode(enum.StrEnum):
    FIRST_USER_MESSAGE = "first-user-message"
    PROMPT_PREFIX = "prompt-prefix"


DEFAULT_FORWARD_PATHS: tuple[str, ...] = (
    "POST /v1/responses",
    "GET /v1/responses/{id}",
    "POST /v1/responses/{id}/cancel",
    "POST /v1/audio/transcriptions retry",
    "POST /v1/audio/translations retry",
    "POST /v1/rerank retry",
    "POST /v1/score retry",
    "POST /v1/tokenize retry",
    "POST /v1/detokenize retry",
)
"""The OpenAI-compatible paths vLLM and SGLang serve under /v1 besides the keyed ones (chat
completions, completions, embeddings, responses) and ``GET /v1/models`` (answered by
balancer). ``POST /v1/responses`` is routed by key like the keyed ones whatever this list
says; its entry here says only whether it may run twice (not by default: it may store a
response or start a background job; add ``retry`` when the model servers store none). The
requests by response id go to the endpoint holding it (``routing.response_affinity_*``)."""


class ForwardPath(NamedTuple):
    """One parsed ``server.forward_paths`` entry."""

    method: str
    segments: tuple[str | None, ...]
    """The path's segments (after its leading ``/``); None stands for a ``{param}``."""
    retry: bool
    """Marked ``retry``: the request only computes, so it may run again elsewhere."""


_METHOD = re.compile(r"[A-Z]{1,20}")
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
# RFC 3986 pchar without percent-encoding: a pattern names its segments literally.
_LITERAL_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]+")


def parse_forward_path(entry: str) -> ForwardPath:
    """``"POST /v1/responses/{id}/cancel"`` (optionally followed by ``retry``) as a
    :class:`ForwardPath`; raises ValueError saying what is wrong."""
    words = entry.split()
    if len(words) not in (2, 3) or (len(words) == 3 and words[2] != "retry"):
        raise ValueError("must be 'METHOD /v1/path', optionally followed by 'retry'")
    method, path = words[0], words[1]
    if not _METHOD.fullmatch(method) or method == "CONNECT":
        raise ValueError(f"{method!r} is not an HTTP method in capitals (CONNECT is refused)")
    if not path.startswith("/v1/"):
        raise ValueError(f"{path!r} must start with /v1/ (only /v1 paths are passed through)")
    segments: list[str | None] = []
    for segment in path[1:].split("/"):
        if _PARAM.fullmatch(segment):
            segments.append(None)
        elif segment in (".", "..") or not _LITERAL_SEGMENT.fullmatch(segment):
            raise ValueError(f"segment {segment!r} of {path!r} is neither a plain name nor a "
                             "{param} (no empty, dot or percent-encoded segments)")
        else:
            segments.append(segment)
    return ForwardPath(method, tuple(segments), len(words) == 3)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    """Address the proxy listens on (and the admin port, unless ``admin_host`` is set). A
    sidecar sets 127.0.0.1: its only client is the app in the same pod, and on every
    interface any pod in the cluster could use it as an LLM proxy."""
    port: int = 8080
    """Port of the OpenAI-compatible proxy."""
    admin_port: int = 9090
    """Port of /healthz, /readyz, /metrics and /debug; kept apart so probes and scrapes never
    queue behind inference traffic and the admin surface can stay off the Service."""
    route_headers: bool = True
    """Add ``x-balancer-endpoint`` and ``x-balancer-route`` to responses. On by default:
    operators read affinity from them (which pod took a conversation, and whether it
    overflowed). They name pods, so a gateway that faces clients outside the cluster may
    turn them off to hide its topology."""
    log_level: str = "info"
    """One of debug, info, warning, error."""
    log_format: str = "auto"
    """auto (JSON lines unless stderr is a terminal), json or text; log collectors index
    JSON fields, people read text."""
    forward_paths: tuple[str, ...] = DEFAULT_FORWARD_PATHS
    """The /v1 requests passed through to a model server besides the keyed ones, each
    ``"METHOD /v1/path"`` with ``{param}`` for one path segment, e.g. ``"GET
    /v1/responses/{id}"``; anything else under /v1 gets 404 (405 for another method on a
    listed path). A trailing ``retry`` marks a POST that only computes (no state kept on the
    server), which may be retried on another endpoint; GET, HEAD, OPTIONS, PUT and DELETE are
    retried anyway. The default is the inference API vLLM and SGLang serve; a model server's
    admin paths (e.g. ``POST /v1/load_lora_adapter``) stay closed unless listed. Setting it
    replaces the whole list (environment and flags: entries separated by commas)."""
    trusted_proxies: tuple[str, ...] = ()
    """Networks (CIDRs, or single addresses) of the proxies in front of balancer whose
    ``X-Forwarded-For`` entries are believed. The client address balancer logs is the first
    hop from the right of peer + ``X-Forwarded-For`` that is not in these networks, and a
    trusted peer's ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are passed on. Empty by
    default: nothing a client sends is believed (the logged address is the TCP peer; the
    peer is still appended to ``X-Forwarded-For`` for the model server). From the
    environment or ``--set``: comma-separated."""
    admin_host: str = ""
    """Address the admin port listens on; empty means ``host``. Set apart from ``host`` when
    the proxy listens on loopback only (a sidecar): the kubelet's probes and Prometheus
    reach the admin port on the pod's address, so it listens on 0.0.0.0 there."""
    debug_from_anywhere: bool = False
    """Serve ``/debug/*`` on the admin port to any peer. Off by default: only loopback peers
    (``kubectl port-forward``, ``kubectl exec``, a process in the same pod) get it, others a
    403, because ``/debug/config`` and ``/debug/endpoints`` show the configuration and every
    model server's address to whoever reaches the admin port, which stays open on the pod's
    address for probes and scrapes. ``/healthz``, ``/readyz`` and ``/metrics`` are never
    restricted."""


@dataclass(frozen=True)
class KubernetesPoolSettings:
    """Where a pool's endpoints come from in Kubernetes: the EndpointSlices of a Service."""

    service: str
    """Name of the Service; its EndpointSlices carry the label
    ``kubernetes.io/service-name=<service>``."""
    port: int | str
    """The model servers' port: the name of a Service port (looked up in each EndpointSlice,
    which holds the pods' port number for it), or a number used as is (the pods' port)."""
    namespace: str = ""
    """Namespace of the Service; empty means balancer's own (its service account's namespace
    in a cluster, else the kubeconfig context's, else ``default``)."""


@dataclass(frozen=True)
class PoolTLSSettings:
    """TLS to a pool's ``https://`` endpoints (a hosted provider, a model server behind a
    TLS-terminating gateway). Certificates are always verified unless ``verify`` is off."""

    ca_file: str = ""
    """PEM file of the CA certificates the endpoints' certificates must chain to. Empty:
    the system's CA store (right for public providers)."""
    cert_file: str = ""
    """PEM file of the client certificate chain presented to the endpoints (mutual TLS);
    empty: none. Needs ``key_file`` unless the key is in the same file."""
    key_file: str = ""
    """PEM file of the client certificate's private key (unencrypted: nothing could type
    its passphrase); empty: in ``cert_file``."""
    server_name: str = ""
    """Name sent as SNI and checked against the endpoints' certificates. Empty: each
    endpoint URL's host, as a browser does; set it when endpoints are listed by address."""
    verify: bool = True
    """Verify the endpoints' certificates and names. Off only for a test rig: anyone on the
    path could read the requests and the injected credentials (a warning says so at start)."""


@dataclass(frozen=True)
class PoolHeader:
    """One request header balancer adds to everything it sends a pool (requests, health
    checks, model and metrics reads), e.g. a provider's ``Authorization``. Exactly one of
    ``value``, ``value_from_env`` and ``value_from_file`` gives its value; the value is never
    logged nor shown (``/debug/config`` and ``check-config`` print ``<redacted>``)."""

    name: str
    """Header name, e.g. ``Authorization``. It replaces a client's header of the same name.
    Hop-by-hop headers, ``Host``, ``Content-Length`` and the ones balancer sets itself
    (``X-Forwarded-*``, ``X-Request-Id``) are refused."""
    value: str = field(default="", repr=False)
    """The value itself, for headers that are no secret (e.g. ``OpenAI-Organization``)."""
    value_from_env: str = ""
    """Name of an environment variable holding the value (surrounding whitespace dropped),
    read once at start: a process's environment cannot change under it."""
    value_from_file: str = ""
    """Path of a file holding the value (a mounted Secret's key); trailing whitespace and
    newlines are dropped. Re-read when the file changes (checked at most once a second), so
    a rotated Secret is used without a restart."""
    prefix: str = ""
    """Text put before the value from the environment or the file, e.g. ``"Bearer "`` when
    the Secret holds only the API key."""


@dataclass(frozen=True)
class PoolTimeouts:
    """Timeouts of one pool, each overriding the ``limits`` setting of the same meaning for
    that pool only (left out: the ``limits`` value). A hosted provider is farther away
    (longer connects) and queues elsewhere (a shorter first byte fails over sooner)."""

    connect: float | None = None
    """Seconds to open a connection, TLS handshake included (``limits.connect_timeout``)."""
    first_byte: float | None = None
    """Seconds from sending a request to the first response byte
    (``limits.first_byte_timeout``)."""
    idle: float | None = None
    """Seconds the server may keep a started response waiting for its next chunk
    (``limits.idle_timeout``; a stalled client is still cut after ``limits.idle_timeout``)."""
    total: float | None = None
    """Seconds for a whole request across retries, 0 = off (``limits.total_timeout``)."""


@dataclass(frozen=True)
class PoolHealthSettings:
    """A pool's own active checks, overriding the ``health`` section's (left out: as there).
    A hosted provider has no ``/health``: turn ``active`` off, or point ``path`` at one it
    answers (``/v1/models``), so its endpoint is not checked into ejection."""

    active: bool | None = None
    """Probe the pool's endpoints (``health.active``)."""
    path: str | None = None
    """Path of the check (``health.path``); any 2xx passes."""


@dataclass(frozen=True)
class PoolSettings:
    name: str
    """Pool name, used in metrics labels and logs."""
    models: tuple[str, ...]
    """Model names (the request's ``model`` field) this pool serves. Empty: learned from the
    endpoints' ``/v1/models`` (served names and LoRA adapters), refreshed periodically."""
    endpoints: tuple[str, ...] = ()
    """Static base URLs of the model servers, e.g. ``http://vllm-0.vllm.llm.svc:8000`` or
    ``https://api.example.com``. A path after the host (``https://gateway/openai``) is put
    before every path sent there: ``/v1/chat/completions`` goes to
    ``/openai/v1/chat/completions``. It must not end in ``/v1``: balancer forwards the
    ``/v1/...`` path as is. In the file an entry may also be a mapping ``{url: ..., zone:
    ...}`` naming the server's zone (for ``routing.prefer_zone``); its URL is listed here
    and its zone in ``zones``."""
    kubernetes: KubernetesPoolSettings | None = None
    """Discover the endpoints from a Service instead of listing them."""
    zones: tuple[tuple[str, str], ...] = ()
    """``(url, zone)`` of the static endpoints listed with a zone, in the order listed (the
    file's ``{url, zone}`` entries); an endpoint not here has no zone. EndpointSlices carry
    each pod's zone themselves."""
    tls: PoolTLSSettings | None = None
    """TLS to the ``https://`` endpoints; left out: the system's CAs, no client certificate,
    verification on."""
    headers: tuple[PoolHeader, ...] = ()
    """Headers added to every request sent to the pool, e.g. an API key from a Secret."""
    timeouts: PoolTimeouts = field(default_factory=PoolTimeouts)
    """The pool's own connect, first-byte, idle and total timeouts."""
    health: PoolHealthSettings = field(default_factory=PoolHealthSettings)
    """The pool's own active checks."""
    load_poll: bool = True
    """Poll the endpoints' ``load.poll_path`` for load reports (with ``load.poll_interval``);
    off for servers without Prometheus metrics, such as hosted providers."""

    def zone_of(self, url: str) -> str | None:
        """The zone a static endpoint was listed with (None: none)."""
        for listed, zone in self.zones:
            if listed == url:
                return zone
        return None


@dataclass(frozen=True)
class BackendSettings:
    """One pool a route sends requests to (``routes[].backends`` and ``routes[].fallbacks``)."""

    pool: str
    """The pool's name."""
    weight: float = 1.0
    """Share of new conversations (backends only): a key goes to each backend with
    probability weight / sum of weights. 0: no new conversation, but still a fallback for
    the others. Unitless, any scale (90/10 and 9/1 split alike)."""
    model: str = ""
    """The model name the pool is asked for (the request's ``model`` is rewritten to it).
    Empty: the pool's only configured model if it lists exactly one, else the route's own
    name unchanged."""


@dataclass(frozen=True)
class RouteSettings:
    """A model name clients ask for, served by weighted pools with fallbacks (``routes``)."""

    model: str
    """The name clients send in ``model``; it is listed by ``/v1/models`` and takes
    precedence over a pool serving the same name."""
    backends: tuple[BackendSettings, ...]
    """Pools splitting the route's conversations by weight, by routing key (a conversation
    stays on one side for its whole life)."""
    fallbacks: tuple[BackendSettings, ...] = ()
    """Pools tried in order after every backend, when those have no routable endpoint, are
    in panic mode, are full, or failed the request before its first byte."""
    expose_backend_model: bool = False
    """Responses name the model the backend served; false (the default): the name the client
    asked for."""


@dataclass(frozen=True)
class RoutingSettings:
    strategy: Strategy = Strategy.CHWBL
    """chwbl (prefix affinity under a load bound), least-request (power of two choices),
    round-robin or random."""
    load_factor: float = 1.5
    """CHWBL's c: no endpoint takes more than ceil(c * (in-flight + 1) / n) requests while
    another is under that bound. 1.0 is strict balance; higher keeps more affinity. 1.5 by
    measurement (README, "Choosing the defaults"): against 1.25 it kept more conversations on
    their cache (TTFT p50 -28%) with the busiest pod at 1.18x the mean in-flight load; 2.0
    gained little more and let that ratio reach 1.32."""
    virtual_nodes: int = 1024
    """Points per endpoint on the hash ring. An endpoint's share of keys deviates from 1/n by
    about 1/sqrt(virtual_nodes): measured over pools of 4-16 endpoints, at most 8% at 1024
    (19% at 256). A ring costs ~100 bytes per point: 6 MB for 64 endpoints at 1024."""
    min_bound: int = 2
    """Floor on the CHWBL bound, in requests. Without it a pool of hundreds of endpoints has a
    bound of 1 at low load and every concurrent request for one prefix lands on a new endpoint
    (the hot-key cascade); an inference server batches many sequences, so a few in flight on
    one endpoint are never an overload."""
    key: KeyMode = KeyMode.FIRST_USER_MESSAGE
    """What the prefix key is made of: the first user message (chat) or the prompt
    (completions), or the whole rendered prompt prefix (system prompt included)."""
    prefix_chars: int = 1000
    """How many characters of that text go into the key. Long enough to reach past an app's
    instruction template (commonly 150-400 characters) into the user's own text, short enough
    that a shared document placed first still keys on the document. Chosen by measurement
    (README, "Keys on real traffic"); ``balancer tune`` checks it against your own trace."""
    min_key_chars: int = 64
    """A first user message shorter than this many characters (a greeting: "hi", "Hello!")
    cannot tell conversations apart, so the key goes on through the reply and the next
    message after it, from the conversation's second turn on. 0: never."""
    session_header: str = "x-session-id"
    """Request header whose value, when present, is the key (then the body's ``user``)."""
    zone: str = ""
    """The zone this balancer runs in, e.g. ``us-east-1a``: endpoints in it are *local*
    (``balancer_zone_requests_total``, ``/debug/endpoints``) and, with ``prefer_zone``,
    preferred. Empty: unknown (no locality is counted). In Kubernetes, set it from the pod's
    ``topology.kubernetes.io/zone`` label through the downward API
    (``BALANCER_ROUTING_ZONE``; the chart's ``zonePreference`` does it)."""
    prefer_zone: bool = False
    """Route keyed requests (CHWBL, on in-flight counts or queues) to endpoints in ``zone``
    first: the key walks the ring over the zone's endpoints and takes the first within the
    usual pool-wide bound, and only when every one of them is over it does the request leave
    the zone (the rest of the ring, as without a preference). Cuts cross-zone traffic (cloud
    providers charge for it, about $0.01/GB each way) and a network round trip per request,
    at the price of one cached copy of a hot prefix per zone instead of one per pool. Off by
    default, by measurement (README, "Zones in the simulator"): with headroom and clients
    spread over the zones like the pods it cut the cross-zone share from 0.50 to 0.02, and
    with clients skewed 80/20 (thanks to ``zone_factor``) from 0.52 to 0.26 for 17% more
    TTFT p99; at the knee it costs TTFT and throughput. Pass-through requests and the other
    strategies ignore it."""
    zone_factor: float = 1.1
    """With ``prefer_zone``: the most of the pool's *work* (running plus queued requests as
    the pods report them; on in-flight counts, this replica's requests) the zone may carry,
    as a multiple of its share of the endpoints (two equal zones, 1.1: 55%). While it carries
    more, a growing share of its keys (chosen by hash, so each key's fate is stable) skip the
    preference and take the plain walk over the whole ring; while it carries less, the share
    shrinks back (``balancer.zonespill``). Keeps a zone whose clients send more than its
    share of the traffic from holding all of it. 0: never (the zone keeps its keys up to the
    usual bound alone)."""
    # -- Responses API affinity (balancer.affinity) --
    response_affinity_entries: int = 100_000
    """Response ids remembered with the endpoint that stored them, so that a request naming
    one (``previous_response_id``, ``GET /v1/responses/{id}``, ``.../cancel``) goes there.
    About 300 bytes each (``affinity.ENTRY_BYTES``): 30 MB when full, which a replica
    reaches only after relaying that many stored responses within
    ``response_affinity_ttl`` (~28 per second for an hour). The least recently used go
    first; a request naming a forgotten id still finds its endpoint, by trying the others
    on a 404 (one quick refusal per wrong endpoint). 0 turns the map off (probing only)."""
    response_affinity_ttl: float = 3600.0
    """Seconds an id is remembered after its response was relayed. A conversation's next
    turn usually comes within minutes; an hour also covers a user who pauses. Past it the
    probe still finds the endpoint."""


@dataclass(frozen=True)
class LoadSettings:
    """Which load CHWBL's bound is taken on, and how balancer learns the pods' own load."""

    source: LoadSource = LoadSource.AUTO
    """auto: bound each pod's *queue* as the pods report it (plus this process's requests
    since the report) while every routable endpoint of the pool has a fresh report, else
    this process's in-flight requests; local: always the in-flight requests (reports are
    still read and shown, never polled); reports: always the queues, an endpoint without a
    fresh report counting only this process's requests that have not started. auto by
    measurement (README, "Routing on the pods' load"): on the simulated pods, with
    ``first_turn_factor`` 1.0, it cut TTFT p99 by 22% near saturation and by 32% in a fleet
    of 8 replicas against local, for 14% more p99 (still under 2x the ideal) with a single
    replica at moderate load."""
    max_age: float = 3.0
    """Seconds a report stays usable for routing."""
    poll_interval: float = 1.0
    """Seconds between polls of an endpoint's Prometheus metrics while it sends no in-band
    report (idle endpoints, streams, servers without ORCA support); 0: never poll. Only with
    ``source`` auto or reports: under local, reports would route nothing."""
    poll_path: str = "/metrics"
    """Path of the model servers' Prometheus metrics (vLLM and SGLang gauges are read)."""
    poll_timeout: float = 1.0
    """Seconds one metrics poll may take."""
    queue_factor: float = 1.5
    """CHWBL's c on queues: a pod's queue may exceed ceil(c * (total queued + 1) / n)
    only when every pod's does."""
    min_queue: int = 4
    """Floor on the queue bound, in requests: a pod may queue this many before its keys
    overflow, whatever the pool's average. Moving a request costs its uncached prefill on
    the next pod, so a short queue is cheaper to wait out than to flee."""
    first_turn_factor: float = 1.0
    """CHWBL's c on queues for a conversation's first turn (a chat request with no assistant
    message yet). Only its system prompt can be cached, and that is shared by many
    conversations, so moving it costs little: a tighter factor than ``queue_factor`` places
    new conversations where the queues are short while established ones stay with their
    cache (1.0: a first turn goes to its key's pod only while that pod's queue is at most
    the pool's mean, or within ``min_queue``)."""
    pass_reports: bool = False
    """Pass the pods' ``endpoint-load-metrics`` response header on to clients (off: it is
    removed, so clients see no more of the pods than before)."""


@dataclass(frozen=True)
class LimitsSettings:
    max_body_bytes: int = 10 * 1024 * 1024
    """Largest request body accepted, in bytes (413 above it). 10 MiB holds a 128k-token prompt
    several times over and a few inline images."""
    max_header_bytes: int = 16 * 1024
    """Largest single request header line, in bytes."""
    connect_timeout: float = 5.0
    """Seconds to open a TCP connection to an endpoint."""
    first_byte_timeout: float = 300.0
    """Seconds from sending the request to the first response byte (connecting and the
    response head included). Generous: a long prompt behind a queue legitimately takes
    minutes to prefill."""
    idle_timeout: float = 120.0
    """Seconds the model server may keep a started response waiting for its next chunk. Only
    time spent waiting for the model server counts: a slow client is never the endpoint's
    fault. A client that takes no data for this long while a write to it waits is
    disconnected."""
    total_timeout: float = 0.0
    """Seconds for the whole request, from its arrival and across retries; 0 turns it off
    (generations can be long)."""
    max_in_flight_per_endpoint: int = 0
    """Most requests this balancer sends one endpoint at once; 0 turns the limit off. A full
    endpoint is skipped (the next on the ring walk takes the request); when every endpoint is
    full, requests wait in the pool's queue."""
    queue_size: int = 100
    """Requests per pool that may wait for a free endpoint (with the limit above); beyond it
    balancer answers 503 with ``Retry-After`` at once instead of piling up."""
    queue_timeout: float = 30.0
    """Seconds a request may wait in that queue before a 503 with ``Retry-After``."""
    empty_pool_wait: float = 30.0
    """Seconds a request for a pool with no routable endpoint (scaled to zero, pods still
    loading weights), or for a model not known while a pool has not learned its models yet,
    waits for one before a 503 with ``Retry-After``. The first endpoint to come up serves the
    waiting requests at once. 30 s lets a client's first request ride out a scale-from-zero
    whose pod is already starting, and stays under common client timeouts (60 s); 0 answers
    503 at once. Waiting requests count under ``max_concurrent_requests``."""
    max_concurrent_requests: int = 1024
    """Requests the proxy port reads or answers at once, over all clients; beyond it balancer
    answers 503 with ``Retry-After`` before reading the body, so however many clients
    connect, at most this many bodies (each up to ``max_body_bytes``) are held. 0 turns the
    cap off. 1024 is above what one balancer process forwards at once (one core: a few
    thousand short requests a second, or hundreds of concurrent streams); with bodies of a
    typical 100 KB it holds ~100 MB of them. The hard worst case is this times
    ``max_body_bytes`` (10 GiB at the defaults), so lower one of them on small pods. The
    admin port is never capped: probes and scrapes answer under any load."""
    client_header_timeout: float = 10.0
    """Seconds a client may take to send a request head once its first byte arrived; then
    408 and the connection closes (a slowloris client holds no connection for long). A head
    normally arrives in one packet; 10 s leaves room for a congested mobile link."""
    client_body_timeout: float = 60.0
    """Seconds from the request head until its whole body has arrived; then 408 and the
    connection closes, freeing the request's slot under ``max_concurrent_requests``. 60 s
    carries a 10 MiB body (the default ``max_body_bytes``) over a 2 Mbit/s link; raise it
    for larger bodies on slower links."""
    client_keepalive_timeout: float = 75.0
    """Seconds an idle client connection (no request in progress, or none yet) stays open;
    then it is closed quietly, so idle connections cannot pile up. 75 s as nginx; behind a
    load balancer that reuses connections, set it above that load balancer's idle timeout
    (AWS ALB: 60 s; Google Cloud load balancers: 600 s, so 620), or it may send a request on
    a connection balancer is closing."""
    offload_parse_bytes: int = 256 * 1024
    """Request bodies larger than this, in bytes, are parsed, validated and keyed in a worker
    process (``parse_workers``) instead of on the event loop that every stream shares; 0 parses
    every body on the loop. Parsing costs the loop up to ~10 ms per MiB by the body's shape
    (a MiB of token ids), so 256 KiB keeps any body's parse under ~3 ms there, while the hand-off
    (~1 ms of latency, ~1 ms of loop time for 10 MiB) stays rare: chat requests are rarely
    this large."""
    parse_workers: int = 2
    """Worker processes for bodies over ``offload_parse_bytes``, started with ``balancer
    serve`` (~17 MB resident each, ~40 MB when run as the ``balancer`` command rather than
    ``python -m balancer``). Each parses one body at a time (6-110 ms for a 10 MiB body by its
    shape); up to twice this many bodies are handed to them at once, and further ones wait
    their turn (the wait counts against ``total_timeout``). Two keep one core free for the
    event loop on a two-core node and read tens to hundreds of 10 MiB bodies a second."""


@dataclass(frozen=True)
class HealthSettings:
    """Active checks and passive outlier ejection. An endpoint that is out leaves the hash
    ring and comes back at the same positions, so no other key moves."""

    active: bool = True
    """Probe every endpoint's ``path`` periodically (off: passive ejection only)."""
    path: str = "/health"
    """Path of the active check; any 2xx answer is a pass. vLLM and SGLang answer
    ``/health`` without touching the GPU, so it is cheap to ask often."""
    interval: float = 5.0
    """Seconds between two checks of one endpoint. Each endpoint is checked on its own
    timer, jittered by +-10%, so one slow endpoint never delays the others' checks."""
    timeout: float = 2.0
    """Seconds one check may take before it counts as a failure."""
    unhealthy_threshold: int = 3
    """Consecutive failed checks that take an endpoint out."""
    healthy_threshold: int = 2
    """Consecutive passed checks that bring an actively failed endpoint back."""
    consecutive_failures: int = 3
    """Passive: requests in a row that failed (5xx answer, reset, broken stream, first-byte
    or idle timeout) before the endpoint is ejected. A refused or timed-out connection
    ejects at once: nothing is listening there."""
    ejection_time: float = 5.0
    """Seconds of the first passive ejection; each further ejection doubles it."""
    max_ejection_time: float = 120.0
    """Longest passive ejection, in seconds. After it a half-open trial lets the endpoint
    back: its next request decides (success: back for good; failure: out again, longer).
    An endpoint that stays healthy this long starts again from ``ejection_time``."""
    panic_threshold: float = 0.5
    """Fraction of a pool's serving endpoints that may be out; above it (panic mode)
    balancer routes across the whole pool, since the checks are likelier wrong than most
    of the pool dead. 0.5: more than half out means panic."""
    slow_start: float = 0.0
    """Seconds over which an endpoint that joins a pool that already serves (a new pod), or
    returns from being out (ejected, failing checks), ramps from taking one request to its
    full share of the CHWBL bound, linearly (HAProxy's ``slowstart``). Its keys' requests
    that do not fit go on along the ring, which for a new pod is the pod that served those
    keys before it joined, so they keep their cache while the new one fills. 0: off (the
    default, by measurement: README, "Slow start": after a pod restart, 30 s of ramp raised
    TTFT p50 by 38% and cut the hit rate by 6 points, as conversations moved back a few at a
    time instead of at once). Endpoints present when balancer starts and a pool's first
    endpoints after having none never ramp."""
    max_ejection_percent: float = 10.0
    """Passive: percent of a pool's serving endpoints that passive ejection may hold out at
    once (Envoy's ``max_ejection_percent``, same default), rounded down but never below one
    endpoint. A due ejection beyond it is not performed (metric
    ``balancer_pool_ejections_skipped_total``). Failures that hit many endpoints at once
    (overload timing out every pod, the network between balancer and pods) would otherwise
    eject healthy pods and push their load onto the rest; one dead pod is the common case,
    so one ejection is always allowed: in pools of 2-19 endpoints that is exactly one, at
    20 or more 10%. (Envoy itself ejects nothing below 10 hosts at 10% unless
    ``always_eject_one_host`` is set.) Active checks are not capped: they ask the pod
    itself, and panic mode bounds what all of health may take out. 100: no cap."""


@dataclass(frozen=True)
class RetrySettings:
    """Retries, only before the first response byte reaches the client, to the next
    distinct endpoint on the ring walk (least-loaded for other strategies)."""

    max_attempts: int = 3
    """Tries per request, the first included (1 turns retries off)."""
    budget_ratio: float = 0.2
    """Retries may be at most this fraction of requests over ``budget_window``, so retries
    cannot multiply the load of an outage. Probes for a stored response (a pod's 404 for a
    ``previous_response_id`` it does not hold) are not counted: the pod did no work."""
    budget_window: float = 10.0
    """Seconds of the sliding window the budget counts over."""
    budget_min_retries: int = 10
    """Retries always allowed per window whatever the ratio, so a quiet pool can still
    retry."""
    retry_after_default: float = 1.0
    """Seconds an endpoint that answered 429 is skipped when it sent no usable
    ``Retry-After``."""
    retry_after_max: float = 60.0
    """Cap in seconds on the ``Retry-After`` balancer honours (a broken server cannot take
    itself out for a day)."""
    max_fallbacks: int = 2
    """Most pools after its first that one request of a route may go to (``routes``), each
    costing one retry from the budget; 0: a route never falls back. Within each pool the
    request still has ``max_attempts`` tries."""


@dataclass(frozen=True)
class DrainSettings:
    """Graceful shutdown on SIGTERM (a second SIGTERM exits at once)."""

    delay: float = 5.0
    """Seconds balancer keeps accepting new requests after SIGTERM while ``/readyz`` already
    fails, so Services and clients see it leave before it stops listening."""
    timeout: float = 120.0
    """Seconds after it stops accepting that in-flight streams may take to finish; then the
    rest are cut. Set the pod's ``terminationGracePeriodSeconds`` above delay + timeout."""


@dataclass(frozen=True)
class KubernetesSettings:
    """Access to the Kubernetes API, for pools that name a Service."""

    kubeconfig: str = ""
    """Path of a kubeconfig file, for running outside a cluster. Empty: the pod's service
    account (in-cluster configuration)."""
    context: str = ""
    """kubeconfig context to use; empty means its current context."""
    watch_timeout: int = 240
    """Seconds the API server keeps one watch open (``timeoutSeconds``); then balancer resumes
    from the last resourceVersion. Well under the API server's own limit (30-60 min), so a
    connection that died silently is replaced within minutes."""
    request_timeout: float = 30.0
    """Seconds a LIST may take, and how long a watch may outlive ``watch_timeout`` before the
    client gives up on it (a last resort: ``watch_idle_timeout`` notices a dead watch
    sooner)."""
    watch_idle_timeout: float = 75.0
    """Seconds a watch may bring neither an event nor a bookmark before it is taken for dead,
    closed and resumed from its resourceVersion (a 410 then leads to a LIST as usual). The
    API server sends a BOOKMARK about every 60 s on an otherwise quiet watch, so a live watch
    is never silent much longer than that; 75 s leaves 15 s for a busy server. Shorter
    would restart every healthy quiet watch; without it a dead watch is noticed only at
    ``watch_timeout + request_timeout`` (270 s). A server that sends no bookmarks at all
    costs one cheap resumed watch per this interval."""
    relist_interval: float = 300.0
    """Seconds between full re-LISTs, a safety net under the watch: any drift between the
    watched view and the API server is repaired within this time."""
    backoff_initial: float = 0.5
    """Seconds to wait after the first failed API request; doubles on each further failure
    (with jitter, so replicas do not retry in step)."""
    backoff_max: float = 30.0
    """Longest wait between retries, in seconds. Routing continues on the last known
    endpoints meanwhile."""


@dataclass(frozen=True)
class ModelDiscoverySettings:
    """Learning the model names of pools that list none."""

    refresh_interval: float = 30.0
    """Seconds between two reads of every endpoint's ``/v1/models`` (LoRA adapters come and
    go); new endpoints are read as soon as they appear."""
    timeout: float = 5.0
    """Seconds one ``/v1/models`` request may take."""


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    pools: tuple[PoolSettings, ...] = ()
    routes: tuple[RouteSettings, ...] = ()
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    load: LoadSettings = field(default_factory=LoadSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    model_discovery: ModelDiscoverySettings = field(default_factory=ModelDiscoverySettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    retries: RetrySettings = field(default_factory=RetrySettings)
    drain: DrainSettings = field(default_factory=DrainSettings)

    def pool_for_model(self, model: str) -> PoolSettings | None:
        for pool in self.pools:
            if model in pool.models:
                return pool
        return None


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "routing": RoutingSettings,
    "load": LoadSettings,
    "limits": LimitsSettings,
    "kubernetes": KubernetesSettings,
    "model_discovery": ModelDiscoverySettings,
    "health": HealthSettings,
    "retries": RetrySettings,
    "drain": DrainSettings,
}
_SECTION_NAMES = ", ".join(sorted(_SECTIONS))

# Kubernetes names: a Service is a DNS-1035 label, a namespace a DNS-1123 label, a port name
# an IANA service name (up to 15 characters, at least one letter).
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?")
# A zone is a label value (``us-east-1a``, ``europe-west4-b``).
_ZONE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _convert(key: str, value: Any, annotation: Any) -> Any:
    """Coerce one scalar from YAML or a string (env, flags) to the field's type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # ``X | None``: None (or null in YAML) stays None, anything else is an X.
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value is None else _convert(key, value, inner[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            allowed = ", ".join(m.value for m in annotation)
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on"}:
            return True
        if isinstance(value, str) and value.lower() in {"false", "0", "no", "off"}:
            return False
        raise ConfigError(f"{key}: {value!r} is not a boolean (true or false)")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: {value!r} is not a string")
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, str):  # from the environment or a flag: comma-separated
            value = [part.strip() for part in value.split(",") if part.strip()]
        return _string_list(key, value)
    raise AssertionError(f"unsupported setting type for {key}: {annotation!r}")


def _build_section(name: str, cls: type[Any], raw: Any) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        # A header's value may be a secret: say what was wrong, not what was written.
        shown = "" if cls is PoolHeader else f", got {raw!r}"
        raise ConfigError(f"{name}: expected a mapping of settings{shown}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{name}.{unknown[0]}: unknown setting; allowed: {', '.join(sorted(known))}"
        )
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                and raw.get(f.name) is None:
            raise ConfigError(f"{name}.{f.name}: required")
    values = {k: _convert(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**values)


def _string_list(key: str, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise ConfigError(f"{key}: {raw!r} is not a list of non-empty strings")
    return tuple(raw)


def _build_pools(raw: Any) -> tuple[PoolSettings, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"pools: expected a list of pools, got {raw!r}")
    pools = []
    for i, item in enumerate(raw):
        where = f"pools[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected a mapping with name, models, endpoints")
        unknown = sorted(set(item) - _POOL_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown setting; allowed: "
                              f"{', '.join(sorted(_POOL_KEYS))}")
        name = item.get("name", f"pool-{i}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: {name!r} is not a non-empty string")
        endpoints, zones = _build_endpoints(f"{where}.endpoints", item.get("endpoints"))
        pools.append(
            PoolSettings(
                name=name,
                models=_string_list(f"{where}.models", item.get("models")),
                endpoints=endpoints,
                kubernetes=_build_pool_kubernetes(f"{where}.kubernetes",
                                                  item.get("kubernetes")),
                zones=zones,
                **_build_pool_upstream(where, item),
            )
        )
    return tuple(pools)


def _build_routes(raw: Any) -> tuple[RouteSettings, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"routes: expected a list of routes, got {raw!r}")
    routes = []
    allowed = {"model", "backends", "fallbacks", "expose_backend_model"}
    for i, item in enumerate(raw):
        where = f"routes[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected a mapping with model, backends, fallbacks")
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown setting; allowed: "
                              f"{', '.join(sorted(allowed))}")
        if not item.get("model"):
            raise ConfigError(f"{where}.model: required (the model name clients ask for)")
        routes.append(RouteSettings(
            model=_convert(f"{where}.model", item["model"], str),
            backends=_build_backends(f"{where}.backends", item.get("backends"), True),
            fallbacks=_build_backends(f"{where}.fallbacks", item.get("fallbacks"), False),
            expose_backend_model=_convert(f"{where}.expose_backend_model",
                                          item.get("expose_backend_model", False), bool),
        ))
    return tuple(routes)


def _build_backends(where: str, raw: Any, weighted: bool) -> tuple[BackendSettings, ...]:
    """A route's backends or fallbacks: mappings, or bare pool names."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of pools, got {raw!r}")
    allowed = {"pool", "weight", "model"} if weighted else {"pool", "model"}
    out = []
    for j, item in enumerate(raw):
        at = f"{where}[{j}]"
        if isinstance(item, str):
            item = {"pool": item}
        if not isinstance(item, Mapping):
            raise ConfigError(f"{at}: expected a pool name or a mapping with "
                              f"{', '.join(sorted(allowed))}")
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ConfigError(f"{at}.{unknown[0]}: unknown setting; allowed: "
                              f"{', '.join(sorted(allowed))}")
        if not item.get("pool"):
            raise ConfigError(f"{at}.pool: required")
        out.append(BackendSettings(
            pool=_convert(f"{at}.pool", item["pool"], str),
            weight=_convert(f"{at}.weight", item.get("weight", 1.0), float),
            model=_convert(f"{at}.model", item.get("model") or "", str),
        ))
    return tuple(out)


def _validate_routes(settings: Settings) -> None:
    pools = {p.name for p in settings.pools}
    names: set[str] = set()
    for i, route in enumerate(settings.routes):
        where = f"routes[{i}]"
        if route.model in names:
            raise ConfigError(f"{where}.model: {route.model!r} is already a route")
        names.add(route.model)
        if not route.backends:
            raise ConfigError(f"{where}.backends: a route needs at least one backend pool")
        seen: set[str] = set()
        for kind, hops in (("backends", route.backends), ("fallbacks", route.fallbacks)):
            for j, hop in enumerate(hops):
                if hop.pool not in pools:
                    raise ConfigError(f"{where}.{kind}[{j}].pool: no pool is named "
                                      f"{hop.pool!r} (pools: {', '.join(sorted(pools))})")
                if hop.pool in seen:
                    raise ConfigError(f"{where}.{kind}[{j}].pool: {hop.pool!r} appears twice "
                                      "in the route")
                seen.add(hop.pool)
                if not (math.isfinite(hop.weight) and hop.weight >= 0):
                    raise ConfigError(f"{where}.{kind}[{j}].weight: {hop.weight} must be a "
                                      "number >= 0")
        if not any(b.weight > 0 for b in route.backends):
            raise ConfigError(f"{where}.backends: at least one backend needs a weight > 0")


def _build_endpoints(where: str, raw: Any
                     ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """A pool's ``endpoints``: URL strings, or ``{url, zone}`` mappings for endpoints whose
    zone routing should know; returns the URLs and the (url, zone) pairs."""
    if raw is None:
        return (), ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: {raw!r} is not a list of URLs or {{url, zone}} mappings")
    urls: list[str] = []
    zones: list[tuple[str, str]] = []
    for j, entry in enumerate(raw):
        key = f"{where}[{j}]"
        if isinstance(entry, str) and entry:
            urls.append(entry)
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key}: {entry!r} is neither a URL nor a {{url, zone}} mapping")
        unknown = sorted(set(entry) - {"url", "zone"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown setting; allowed: url, zone")
        url, zone = entry.get("url"), entry.get("zone")
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{key}.url: required, a base URL such as http://host:8000")
        urls.append(url)
        if zone is None or zone == "":
            continue  # listed without a zone after all
        if not isinstance(zone, str) or not _ZONE.fullmatch(zone):
            raise ConfigError(f"{key}.zone: {zone!r} is not a zone name (up to 63 letters, "
                              "digits, '-', '_' or '.')")
        zones.append((url, zone))
    return tuple(urls), tuple(zones)


_POOL_KEYS = frozenset({"name", "models", "endpoints", "kubernetes", "tls", "headers",
                        "timeouts", "health", "load_poll"})


def _build_pool_upstream(where: str, item: Mapping[str, Any]) -> dict[str, Any]:
    """A pool's settings for talking to its endpoints: ``tls``, ``headers``, ``timeouts``,
    ``health``, ``load_poll`` (only those given, so the dataclass defaults apply)."""
    out: dict[str, Any] = {}
    if item.get("tls") is not None:
        out["tls"] = _build_section(f"{where}.tls", PoolTLSSettings, item["tls"])
    for key, cls in (("timeouts", PoolTimeouts), ("health", PoolHealthSettings)):
        if item.get(key) is not None:
            out[key] = _build_section(f"{where}.{key}", cls, item[key])
    if item.get("load_poll") is not None:
        out["load_poll"] = _convert(f"{where}.load_poll", item["load_poll"], bool)
    raw = item.get("headers")
    if raw is not None:
        if not isinstance(raw, list):
            raise ConfigError(f"{where}.headers: expected a list of {{name, value | "
                              "value_from_env | value_from_file}}")
        out["headers"] = tuple(_build_section(f"{where}.headers[{j}]", PoolHeader, h)
                               for j, h in enumerate(raw))
    return out


def _build_pool_kubernetes(where: str, raw: Any) -> KubernetesPoolSettings | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with service, port, namespace")
    unknown = sorted(set(raw) - {"service", "port", "namespace"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown setting; allowed: "
                          "namespace, port, service")
    for key in ("service", "port"):
        if raw.get(key) is None:
            raise ConfigError(f"{where}.{key}: required")
    port = raw["port"]
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise ConfigError(f"{where}.port: {port!r} is not a port name or number")
    return KubernetesPoolSettings(
        service=_convert(f"{where}.service", raw["service"], str),
        port=port,
        namespace=_convert(f"{where}.namespace", raw.get("namespace") or "", str),
    )


def _validate_pool_kubernetes(where: str, k8s: KubernetesPoolSettings) -> None:
    if not _DNS_1035_LABEL.fullmatch(k8s.service):
        raise ConfigError(f"{where}.service: {k8s.service!r} is not a Service name "
                          "(lowercase letters, digits and '-', starting with a letter)")
    if k8s.namespace and not _DNS_1123_LABEL.fullmatch(k8s.namespace):
        raise ConfigError(f"{where}.namespace: {k8s.namespace!r} is not a namespace name "
                          "(lowercase letters, digits and '-')")
    if isinstance(k8s.port, int):
        if not 1 <= k8s.port <= 65535:
            raise ConfigError(f"{where}.port: {k8s.port} is not a port number (1-65535)")
    elif not _PORT_NAME.fullmatch(k8s.port):
        raise ConfigError(f"{where}.port: {k8s.port!r} is not a port name (up to 15 "
                          "lowercase letters, digits and '-') or number")


def validate(settings: Settings, *, require_pools: bool = True) -> Settings:
    """Check ranges and cross-field rules; returns the settings for chaining.

    ``require_pools=False`` accepts a configuration without pools, for tools that read only
    other settings (``balancer tune`` reads the routing key's)."""
    s, r, lim = settings.server, settings.routing, settings.limits
    for key, port in (("server.port", s.port), ("server.admin_port", s.admin_port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: {port} is not a port number (0-65535)")
    if s.port == s.admin_port and s.port != 0:
        raise ConfigError(f"server.admin_port: {s.admin_port} is the same as server.port")
    for key, host in (("server.host", s.host), ("server.admin_host", s.admin_host)):
        _validate_host(key, host)
    if s.log_level not in {"debug", "info", "warning", "error"}:
        raise ConfigError(
            f"server.log_level: {s.log_level!r} is not one of debug, info, warning, error"
        )
    if s.log_format not in {"auto", "json", "text"}:
        raise ConfigError(f"server.log_format: {s.log_format!r} is not one of auto, json, text")
    for i, entry in enumerate(s.forward_paths):
        try:
            parse_forward_path(entry)
        except ValueError as e:
            raise ConfigError(f"server.forward_paths[{i}]: {entry!r} {e}") from None
    if not (math.isfinite(r.load_factor) and r.load_factor >= 1.0):
        raise ConfigError(f"routing.load_factor: {r.load_factor} must be a number >= 1.0")
    if not 1 <= r.virtual_nodes <= 4096:
        raise ConfigError(f"routing.virtual_nodes: {r.virtual_nodes} must be in 1..4096")
    if r.min_bound < 1:
        raise ConfigError(f"routing.min_bound: {r.min_bound} must be >= 1")
    if r.prefix_chars < 1:
        raise ConfigError(f"routing.prefix_chars: {r.prefix_chars} must be >= 1")
    if r.min_key_chars < 0:
        raise ConfigError(f"routing.min_key_chars: {r.min_key_chars} must be >= 0")
    _validate_zone(r)
    if not 0 <= r.response_affinity_entries <= 10_000_000:
        raise ConfigError(f"routing.response_affinity_entries: {r.response_affinity_entries} "
                          "must be in 0..10000000 (0 = no map, probe only)")
    if not (math.isfinite(r.response_affinity_ttl) and r.response_affinity_ttl > 0):
        raise ConfigError(f"routing.response_affinity_ttl: {r.response_affinity_ttl} must be "
                          "a number of seconds > 0")
    _validate_load(settings.load)
    if lim.max_body_bytes < 1024:
        raise ConfigError(f"limits.max_body_bytes: {lim.max_body_bytes} must be >= 1024")
    if lim.offload_parse_bytes < 0:
        raise ConfigError(f"limits.offload_parse_bytes: {lim.offload_parse_bytes} must be >= 0 "
                          "(0 = parse every body on the event loop)")
    if not 1 <= lim.parse_workers <= 64:
        raise ConfigError(f"limits.parse_workers: {lim.parse_workers} must be in 1..64")
    if lim.max_header_bytes < 1024:
        raise ConfigError(f"limits.max_header_bytes: {lim.max_header_bytes} must be >= 1024")
    _positive_seconds("limits", lim, "connect_timeout", "first_byte_timeout", "idle_timeout")
    if lim.max_in_flight_per_endpoint < 0:
        raise ConfigError(f"limits.max_in_flight_per_endpoint: "
                          f"{lim.max_in_flight_per_endpoint} must be >= 0 (0 = no limit)")
    if lim.queue_size < 0:
        raise ConfigError(f"limits.queue_size: {lim.queue_size} must be >= 0")
    _positive_seconds("limits", lim, "queue_timeout", "client_header_timeout",
                      "client_body_timeout", "client_keepalive_timeout")
    if not (math.isfinite(lim.empty_pool_wait) and lim.empty_pool_wait >= 0):
        raise ConfigError(f"limits.empty_pool_wait: {lim.empty_pool_wait} must be >= 0 seconds "
                          "(0 = answer 503 at once)")
    if lim.max_concurrent_requests < 0:
        raise ConfigError(f"limits.max_concurrent_requests: {lim.max_concurrent_requests} "
                          "must be >= 0 (0 = no limit)")
    for i, cidr in enumerate(s.trusted_proxies):
        try:
            ipaddress.ip_network(cidr)
        except ValueError as e:
            raise ConfigError(f"server.trusted_proxies[{i}]: {cidr!r} is not a network "
                              f"(CIDR such as 10.0.0.0/8, or an address): {e}") from None
    if not (math.isfinite(lim.total_timeout) and lim.total_timeout >= 0):
        raise ConfigError(f"limits.total_timeout: {lim.total_timeout} must be >= 0 (0 = off)")
    k8s = settings.kubernetes
    if k8s.watch_timeout < 1:
        raise ConfigError(f"kubernetes.watch_timeout: {k8s.watch_timeout} must be >= 1 second")
    _positive_seconds("kubernetes", k8s, "request_timeout", "watch_idle_timeout",
                      "relist_interval", "backoff_initial", "backoff_max")
    if k8s.backoff_max < k8s.backoff_initial:
        raise ConfigError(f"kubernetes.backoff_max: {k8s.backoff_max} must be >= "
                          f"kubernetes.backoff_initial ({k8s.backoff_initial})")
    _positive_seconds("model_discovery", settings.model_discovery, "refresh_interval",
                      "timeout")
    _validate_resilience(settings)
    _validate_routes(settings)
    if not settings.pools and require_pools:
        raise ConfigError("pools: at least one pool is required")
    names: set[str] = set()
    models: dict[str, str] = {}
    for i, pool in enumerate(settings.pools):
        if pool.name in names:
            raise ConfigError(f"pools[{i}].name: {pool.name!r} is used by another pool")
        names.add(pool.name)
        if pool.kubernetes is not None:
            if pool.endpoints:
                raise ConfigError(f"pools[{i}].endpoints: a pool lists endpoints or names a "
                                  "Service (kubernetes), not both")
            _validate_pool_kubernetes(f"pools[{i}].kubernetes", pool.kubernetes)
        if not pool.models and not pool.endpoints and pool.kubernetes is None:
            raise ConfigError(f"pools[{i}].models: a pool must list at least one model, or "
                              "have endpoints or kubernetes to learn them from")
        for model in pool.models:
            if model in models:
                raise ConfigError(
                    f"pools[{i}].models: {model!r} is already served by pool {models[model]!r}"
                )
            models[model] = pool.name
        for j, url in enumerate(pool.endpoints):
            _validate_endpoint_url(f"pools[{i}].endpoints[{j}]", url)
        _validate_pool_upstream(f"pools[{i}]", pool)
    return settings


def _validate_zone(r: RoutingSettings) -> None:
    if r.zone and not _ZONE.fullmatch(r.zone):
        raise ConfigError(f"routing.zone: {r.zone!r} is not a zone name (up to 63 letters, "
                          "digits, '-', '_' or '.', as a topology.kubernetes.io/zone label)")
    if not (r.zone_factor == 0 or (math.isfinite(r.zone_factor) and r.zone_factor >= 1.0)):
        raise ConfigError(f"routing.zone_factor: {r.zone_factor} must be 0 (off) or a number "
                          ">= 1.0")
    if r.prefer_zone and not r.zone:
        raise ConfigError("routing.prefer_zone: true needs routing.zone, the zone this "
                          "balancer runs in (in Kubernetes: BALANCER_ROUTING_ZONE from the "
                          "pod's topology.kubernetes.io/zone label)")


def _validate_endpoint_url(where: str, url: str) -> None:
    """An ``http(s)://host[:port][/prefix]`` base URL."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{where}: {url!r} is not an http(s)://host:port URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(f"{where}: {url!r} has an invalid port") from None
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{where}: {url!r} must be a base URL without a query, a fragment "
                          "or credentials (put credentials in pools[].headers)")
    prefix = parts.path.rstrip("/")
    if not prefix:
        return
    for segment in prefix[1:].split("/"):
        if segment in (".", "..") or not _LITERAL_SEGMENT.fullmatch(segment):
            raise ConfigError(f"{where}: {url!r} has a path segment {segment!r} that is not "
                              "a plain name (no empty, dot or percent-encoded segments)")
    if prefix == "/v1" or prefix.endswith("/v1"):
        root = url[:len(url) - len(parts.path)] + prefix[:-3]
        raise ConfigError(f"{where}: {url!r} ends in /v1, but balancer forwards the /v1/... "
                          f"path as is: give the URL before /v1 ({root!r})")


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP field name (RFC 9110 section 5.1: a token)."""

RESERVED_HEADERS: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection", "host", "content-length",
    "expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
    "endpoint-load-metrics-format",
})
"""Request headers a pool may not inject: hop-by-hop ones and those balancer sets itself
for the upstream hop (the forwarder's ``_NOT_FORWARDED_REQUEST``; a test keeps the two
alike)."""


def header_value_problem(value: str) -> str | None:
    """What makes ``value`` unfit for a header line (a control character, such as a
    newline that would start another header), or None. Never quotes the value."""
    if not value:
        return "is empty"
    for at, char in enumerate(value):
        if (ord(char) < 32 and char != "\t") or ord(char) == 127:
            return f"has a control character (code {ord(char)}) at position {at}"
    return None


def _validate_pool_upstream(where: str, pool: PoolSettings) -> None:
    """A pool's TLS files, injected headers, timeouts and checks."""
    https = any(url.startswith("https:") for url in pool.endpoints)
    if pool.tls is not None:
        if not https:
            raise ConfigError(f"{where}.tls: the pool has no https:// endpoint to use it on"
                              + (" (endpoints from a Service are reached over http)"
                                 if pool.kubernetes is not None else ""))
        _validate_tls(f"{where}.tls", pool.tls)
    names: set[str] = set()
    for j, header in enumerate(pool.headers):
        key = f"{where}.headers[{j}]"
        if not _TOKEN.fullmatch(header.name):
            raise ConfigError(f"{key}.name: {header.name!r} is not a header name")
        lower = header.name.lower()
        if lower in RESERVED_HEADERS:
            raise ConfigError(f"{key}.name: {header.name!r} is hop-by-hop or set by balancer "
                              "itself; it cannot be injected")
        if lower in names:
            raise ConfigError(f"{key}.name: {header.name!r} is injected twice in this pool")
        names.add(lower)
        check_header_sources(key, header)
    t = pool.timeouts
    for name in ("connect", "first_byte", "idle"):
        value = getattr(t, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{where}.timeouts.{name}: {value} must be a number of "
                              "seconds > 0")
    if t.total is not None and not (math.isfinite(t.total) and t.total >= 0):
        raise ConfigError(f"{where}.timeouts.total: {t.total} must be >= 0 (0 = off)")
    if pool.health.path is not None and not pool.health.path.startswith("/"):
        raise ConfigError(f"{where}.health.path: {pool.health.path!r} must start with '/'")


def check_header_sources(key: str, header: PoolHeader) -> None:
    """An injected header names exactly one source, and a literal value is fit for a
    header line. Reading the environment variable or the file is left to the start
    (``outbound``), so ``balancer route`` and ``tune`` read a production configuration on
    a laptop without its Secrets. No message quotes the value."""
    sources = [name for name in ("value", "value_from_env", "value_from_file")
               if getattr(header, name)]
    if len(sources) != 1:
        raise ConfigError(f"{key}: give exactly one of value, value_from_env, value_from_file"
                          + (f" (got {', '.join(sources)})" if sources else ""))
    if header.value:
        if header.prefix:
            raise ConfigError(f"{key}.prefix: only with value_from_env or value_from_file")
        problem = header_value_problem(header.value)
        if problem is not None:
            raise ConfigError(f"{key}.value: the value {problem}")
    elif (problem := header_value_problem(header.prefix or "x")) is not None:
        raise ConfigError(f"{key}.prefix: the prefix {problem}")


def _validate_tls(where: str, tls: PoolTLSSettings) -> None:
    """The TLS settings' shape; their files are loaded at start (``outbound``)."""
    if tls.key_file and not tls.cert_file:
        raise ConfigError(f"{where}.key_file: needs cert_file (the client certificate)")
    if tls.server_name and not re.fullmatch(
            r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", tls.server_name):
        raise ConfigError(f"{where}.server_name: {tls.server_name!r} is not a host name")


def _validate_host(key: str, host: str) -> None:
    """A listen address is an IP address or a host name, without a port or a scheme (a
    common slip is ``0.0.0.0:8080``, which would otherwise fail only at bind time with a
    resolver error)."""
    if not host:
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise ConfigError(f"{key}: {host!r} is not an IP address or host name (no port, "
                          "no scheme: the port is server.port or server.admin_port)")


def _positive_seconds(section: str, values: Any, *keys: str) -> None:
    """Each named duration must be a finite number of seconds above zero."""
    for key in keys:
        value = getattr(values, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{section}.{key}: {value} must be a number of seconds > 0")


def _validate_load(load: LoadSettings) -> None:
    _positive_seconds("load", load, "max_age", "poll_timeout")
    if not (math.isfinite(load.poll_interval) and load.poll_interval >= 0):
        raise ConfigError(f"load.poll_interval: {load.poll_interval} must be a number of "
                          "seconds >= 0 (0 = never poll)")
    if not load.poll_path.startswith("/"):
        raise ConfigError(f"load.poll_path: {load.poll_path!r} must start with '/'")
    if not (math.isfinite(load.queue_factor) and load.queue_factor >= 1.0):
        raise ConfigError(f"load.queue_factor: {load.queue_factor} must be a number >= 1.0")
    if not (math.isfinite(load.first_turn_factor) and load.first_turn_factor >= 1.0):
        raise ConfigError(
            f"load.first_turn_factor: {load.first_turn_factor} must be a number >= 1.0")
    if load.min_queue < 1:
        raise ConfigError(f"load.min_queue: {load.min_queue} must be >= 1")


def _validate_resilience(settings: Settings) -> None:
    h, r, d = settings.health, settings.retries, settings.drain
    if not h.path.startswith("/"):
        raise ConfigError(f"health.path: {h.path!r} must start with '/'")
    _positive_seconds("health", h, "interval", "timeout", "ejection_time", "max_ejection_time")
    if h.max_ejection_time < h.ejection_time:
        raise ConfigError(f"health.max_ejection_time: {h.max_ejection_time} must be >= "
                          f"health.ejection_time ({h.ejection_time})")
    for key in ("unhealthy_threshold", "healthy_threshold", "consecutive_failures"):
        if getattr(h, key) < 1:
            raise ConfigError(f"health.{key}: {getattr(h, key)} must be >= 1")
    if not (math.isfinite(h.slow_start) and h.slow_start >= 0):
        raise ConfigError(f"health.slow_start: {h.slow_start} must be >= 0 seconds (0 = off)")
    if not 0.0 <= h.panic_threshold <= 1.0:
        raise ConfigError(f"health.panic_threshold: {h.panic_threshold} must be in 0..1")
    if not (math.isfinite(h.max_ejection_percent) and 0.0 < h.max_ejection_percent <= 100.0):
        raise ConfigError(f"health.max_ejection_percent: {h.max_ejection_percent} must be a "
                          "percentage above 0 and at most 100")
    if r.max_fallbacks < 0:
        raise ConfigError(f"retries.max_fallbacks: {r.max_fallbacks} must be >= 0")
    if not 1 <= r.max_attempts <= 10:
        raise ConfigError(f"retries.max_attempts: {r.max_attempts} must be in 1..10")
    if not 0.0 <= r.budget_ratio <= 1.0:
        raise ConfigError(f"retries.budget_ratio: {r.budget_ratio} must be in 0..1")
    if r.budget_min_retries < 0:
        raise ConfigError(f"retries.budget_min_retries: {r.budget_min_retries} must be >= 0")
    _positive_seconds("retries", r, "budget_window", "retry_after_default", "retry_after_max")
    for key in ("delay", "timeout"):
        value = getattr(d, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"drain.{key}: {value} must be a number of seconds >= 0")


def from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Build settings from a parsed YAML document (without validating pools' presence)."""
    unknown = sorted(set(raw) - {*_SECTIONS, "pools", "routes"})
    if unknown:
        allowed = ", ".join(sorted({*_SECTIONS, "pools", "routes"}))
        raise ConfigError(f"{unknown[0]}: unknown section; allowed: {allowed}")
    sections = {name: _build_section(name, cls, raw.get(name)) for name, cls in _SECTIONS.items()}
    return Settings(pools=_build_pools(raw.get("pools")), routes=_build_routes(raw.get("routes")),
                    **sections)


def read_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in _SECTIONS or not key:
        raise ConfigError(
            f"{source}: {dotted!r} must be SECTION.KEY with SECTION one of {_SECTION_NAMES}"
        )
    current = raw.get(section)
    if current is None:
        # An empty section in the file (``routing:``) means all defaults, like a missing one.
        current = raw[section] = {}
    if not isinstance(current, dict):
        raise ConfigError(f"{section}: expected a mapping of settings")
    current[key] = value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``BALANCER_ROUTING_LOAD_FACTOR=1.5`` → ``("routing.load_factor", "1.5")``."""
    out = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                out.append((f"{section}.{rest[len(section) + 1 :]}", value))
                break
    return sorted(out)


def load(
    path: str | Path | None = None,
    *,
    overrides: list[tuple[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    extra_pools: tuple[PoolSettings, ...] = (),
    require_pools: bool = True,
) -> Settings:
    """Read the file, apply environment then flag overrides, validate (see :func:`validate`
    for ``require_pools``)."""
    raw: dict[str, Any] = read_file(path) if path is not None else {}
    env = os.environ if environ is None else environ
    for dotted, value in env_overrides(env):
        _set_dotted(raw, dotted, value, f"environment {ENV_PREFIX}{dotted.upper()}")
    for dotted, value in overrides or []:
        _set_dotted(raw, dotted, value, "--set")
    settings = from_mapping(raw)
    if extra_pools:
        settings = dataclasses.replace(settings, pools=settings.pools + extra_pools)
    return validate(settings, require_pools=require_pools)


REDACTED: Final = "<redacted>"
"""What a printed configuration shows for an injected header's literal value."""


def as_dict(settings: Settings) -> dict[str, Any]:
    """The effective configuration in the file's shape (enums as their strings).

    Injected headers' literal values show as :data:`REDACTED` (they may be credentials, and
    ``/debug/config`` serves this); the names of the variables and files holding the others
    show as they are.

    Settings that nothing uses are left out, so the printout shows what matters: the
    ``kubernetes`` section (and a pool's ``kubernetes`` key) only when a pool names a Service,
    ``model_discovery`` only when a pool learns its models. The printout, loaded again, does
    the same: what it leaves out is unused.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return value

    result: dict[str, Any] = plain(settings)
    if not settings.routes:
        del result["routes"]
    for route in result.get("routes", ()):
        for hop in route["fallbacks"]:
            del hop["weight"]  # fallbacks take no share of first choices
    for pool, pool_settings in zip(result["pools"], settings.pools, strict=True):
        if pool["kubernetes"] is None:
            del pool["kubernetes"]
        del pool["zones"]  # written as the endpoints' {url, zone} entries, as in the file
        if pool_settings.zones:
            zones = dict(pool_settings.zones)
            pool["endpoints"] = [{"url": url, "zone": zones[url]} if url in zones else url
                                 for url in pool_settings.endpoints]
        if pool["tls"] is None:
            del pool["tls"]
        for header in pool["headers"]:
            if header["value"]:
                header["value"] = REDACTED
    if all(p.kubernetes is None for p in settings.pools):
        del result["kubernetes"]
    if all(p.models for p in settings.pools):
        del result["model_discovery"]
    return result
