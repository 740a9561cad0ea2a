"""Every metric balancer exports, in one place.

Metrics live in a registry passed in (no global registry), so each app instance and each test
has its own. Label children are resolved once and kept: the request path pays a dict lookup
and an increment, not prometheus-client's locked label resolution.

Children labelled by endpoint belong to that endpoint: :class:`EndpointMetrics` holds them,
one per endpoint state, and removes every series it created when the endpoint has left and
its last request ended, so endpoint series do not pile up over rollouts. Children labelled
by pool only (pools come from the configuration) live as long as the :class:`Metrics`.
Values that are state rather than events (in-flight per endpoint, endpoint counts) are read
from the router at scrape time by a collector, so keeping them current costs the request
path nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# LLM latencies run from milliseconds (a cached prefix, a small completion) to a minute
# (a long generation), so the buckets span 5 ms to 2 min.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)

# Ring walks are short: 1 is the key's own endpoint, a handful means overflow under load.
WALK_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)

class PoolState(NamedTuple):
    """One endpoint state as the state collector exports it at each scrape."""

    pool: str
    endpoint: str
    in_flight: int
    """Requests this balancer has in flight there."""
    routable: bool
    queued: float
    """Estimated queue at the endpoint (its last report plus this balancer's traffic)."""
    kv_usage: float | None
    """Last reported KV-cache use, 0 to 1 (None: never reported)."""
    report_age: float | None
    """Seconds since the last load report (None: never reported)."""


def _status_class(code: int) -> str:
    """``2xx``-style class of an HTTP status; 499 (client gone) keeps its own label so it is
    never mistaken for a client error the upstream returned."""
    if code == 499:
        return "499"
    return f"{code // 100}xx"


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], Iterable[PoolState]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "balancer_endpoint_in_flight_requests",
            "Requests this balancer has in flight to each endpoint.",
            labels=["pool", "endpoint"],
        )
        endpoints = GaugeMetricFamily(
            "balancer_pool_endpoints",
            "Endpoints known per pool, by state (routable or draining).",
            labels=["pool", "state"],
        )
        queued = GaugeMetricFamily(
            "balancer_endpoint_queue_estimate",
            "Requests estimated queued at each endpoint: its last load report's waiting "
            "requests plus this balancer's requests sent since that have not started.",
            labels=["pool", "endpoint"],
        )
        kv_usage = GaugeMetricFamily(
            "balancer_endpoint_kv_cache_usage",
            "KV-cache use each endpoint last reported, 0 to 1 (endpoints that reported it).",
            labels=["pool", "endpoint"],
        )
        age = GaugeMetricFamily(
            "balancer_endpoint_load_report_age_seconds",
            "Seconds since each endpoint's last load report, in band or polled (endpoints "
            "that reported).",
            labels=["pool", "endpoint"],
        )
        counts: dict[tuple[str, str], int] = {}
        for row in self._state():
            labels = [row.pool, row.endpoint]
            in_flight.add_metric(labels, row.in_flight)
            queued.add_metric(labels, row.queued)
            if row.kv_usage is not None:
                kv_usage.add_metric(labels, row.kv_usage)
            if row.report_age is not None:
                age.add_metric(labels, row.report_age)
            state = "routable" if row.routable else "draining"
            counts[(row.pool, state)] = counts.get((row.pool, state), 0) + 1
        for (pool, state), count in sorted(counts.items()):
            endpoints.add_metric([pool, state], count)
        yield from (in_flight, endpoints, queued, kv_usage, age)

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _PoolCollector(Collector):
    def __init__(self, ready: Callable[[], Mapping[str, bool]]) -> None:
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "balancer_pool_ready",
            "1 while the pool can serve (a routable endpoint, its models known); 0 while its "
            "requests wait (limits.empty_pool_wait) and then get 503.",
            labels=["pool"],
        )
        for pool, ready in sorted(self._ready().items()):
            family.add_metric([pool], 1.0 if ready else 0.0)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        state: Callable[[], Iterable[PoolState]] | None = None,
        process: bool = True,
    ) -> None:
        self.registry = registry
        self.requests = Counter(
            "balancer_requests_total",
            "Requests answered, by pool, endpoint, route outcome (primary, overflow, session, "
            "fallback), HTTP status code and status class (2xx, 4xx, 5xx; 499: the client "
            "went away).",
            ["pool", "endpoint", "outcome", "code", "class"],
            registry=registry,
        )
        self.route_requests = Counter(
            "balancer_route_requests_total",
            "Requests for a route (routes[].model), by the pool its key chose first that "
            "could take them (the weighted split as it ran).",
            ["route", "pool"],
            registry=registry,
        )
        self.route_fallbacks = Counter(
            "balancer_route_fallbacks_total",
            "Requests of a route that went on from one pool to the next of its chain, by "
            "reason: no_endpoints, panic (at the decision), overloaded (admission queue full), "
            "rate_limited (every endpoint paused) or failed (every attempt in the pool failed "
            "before the first byte).",
            ["route", "from_pool", "to_pool", "reason"],
            registry=registry,
        )
        self.ring_walk = Histogram(
            "balancer_ring_walk_length",
            "Endpoints examined on the ring per routing decision (1: the key's own endpoint "
            "took it; more: the ones before it were at the load bound).",
            ["pool"],
            buckets=WALK_BUCKETS,
            registry=registry,
        )
        self.bound = Gauge(
            "balancer_pool_load_bound",
            "The CHWBL load bound at the pool's latest keyed routing decision (in-flight "
            "requests or queued requests per endpoint; see balancer_route_queue_decisions_total).",
            ["pool"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "balancer_prompt_tokens_total",
            "Prompt tokens reported by endpoints in response usage (non-streaming bodies and "
            "the final usage event of streams), by pool and endpoint.",
            ["pool", "endpoint"],
            registry=registry,
        )
        self.cached_tokens = Counter(
            "balancer_cached_prompt_tokens_total",
            "Prompt tokens the endpoint served from its prefix cache "
            "(usage.prompt_tokens_details.cached_tokens), by pool and endpoint; divided by "
            "balancer_prompt_tokens_total it is the cache hit rate.",
            ["pool", "endpoint"],
            registry=registry,
        )
        self.usage_responses = Counter(
            "balancer_usage_responses_total",
            "Responses whose usage balancer read, by pool and endpoint (the denominator that "
            "says how much traffic the token counters cover).",
            ["pool", "endpoint"],
            registry=registry,
        )
        self.stream_chunks = Counter(
            "balancer_stream_chunks_total",
            "Response body chunks relayed to clients on the streaming path, by pool and "
            "endpoint.",
            ["pool", "endpoint"],
            registry=registry,
        )
        self.stream_bytes = Counter(
            "balancer_stream_bytes_total",
            "Response body bytes relayed to clients on the streaming path, by pool and "
            "endpoint.",
            ["pool", "endpoint"],
            registry=registry,
        )
        self.route_decisions = Counter(
            "balancer_route_decisions_total",
            "Routing decisions by outcome (primary, overflow, session, fallback).",
            ["pool", "outcome"],
            registry=registry,
        )
        self.zone_requests = Counter(
            "balancer_zone_requests_total",
            "Keyed requests (each attempt) sent to an endpoint in this balancer's zone "
            "(locality local) or in another zone or none (remote), by pool; only when "
            "routing.zone is set. remote / total is the share that crosses zones.",
            ["pool", "locality"],
            registry=registry,
        )
        self.route_queue_decisions = Counter(
            "balancer_route_queue_decisions_total",
            "Keyed routing decisions whose bound was on the pods' reported queues (the rest "
            "of balancer_route_decisions_total was on this balancer's in-flight requests), "
            "by outcome: overflows here are keys that left a queueing pod.",
            ["pool", "outcome"],
            registry=registry,
        )
        self.load_reports = Counter(
            "balancer_load_reports_total",
            "Load reports taken from endpoints, by pool and source (inband: the "
            "endpoint-load-metrics response header; poll: the endpoint's /metrics).",
            ["pool", "source"],
            registry=registry,
        )
        self.load_report_errors = Counter(
            "balancer_load_report_errors_total",
            "Load reports that could not be read, by pool and reason (malformed: a header or "
            "metric value balancer cannot parse, ignored; poll: a metrics poll failed).",
            ["pool", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "balancer_rejected_requests_total",
            "Requests answered by balancer itself with an error, by reason.",
            ["reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "balancer_upstream_errors_total",
            "Upstream failures by pool, endpoint and reason.",
            ["pool", "endpoint", "reason"],
            registry=registry,
        )
        self.first_byte = Histogram(
            "balancer_upstream_first_byte_seconds",
            "Time from sending a request upstream to its first response body byte.",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "balancer_request_duration_seconds",
            "Time from receiving a request to the end of its response.",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.client_disconnects = Counter(
            "balancer_client_disconnects_total",
            "Requests whose client went away before the response ended.",
            ["pool"],
            registry=registry,
        )
        self.discovery_events = Counter(
            "balancer_discovery_events_total",
            "EndpointSlice watch events received, by pool and type (added, modified, deleted, "
            "bookmark).",
            ["pool", "type"],
            registry=registry,
        )
        self.discovery_errors = Counter(
            "balancer_discovery_errors_total",
            "Failed requests to the Kubernetes API or to /v1/models, by pool and reason "
            "(expired, throttled, http, silent, connection, timeout, invalid, models).",
            ["pool", "reason"],
            registry=registry,
        )
        self.discovery_relists = Counter(
            "balancer_discovery_relists_total",
            "Full LISTs of a pool's EndpointSlices, by reason (initial, expired, error, "
            "periodic).",
            ["pool", "reason"],
            registry=registry,
        )
        self.discovery_staleness = Gauge(
            "balancer_discovery_staleness_seconds",
            "Seconds since the API server last gave a sign of life for the pool (a LIST, a "
            "watch event or a bookmark); up to the bookmark interval (~60 s) on a quiet "
            "healthy watch, rising while a watch is silent or the API server unreachable.",
            ["pool"],
            registry=registry,
        )
        self.retries = Counter(
            "balancer_retries_total",
            "Failed attempts that could be retried, by pool, reason (connect, reset, 429, "
            "502, 503, 504, model_not_found, response_not_found) and result (retried; "
            "budget: the retry budget was spent; no_endpoint: no untried endpoint was left; "
            "not_replayable: the request must not run twice).",
            ["pool", "reason", "result"],
            registry=registry,
        )
        self.ejections = Counter(
            "balancer_endpoint_ejections_total",
            "Passive ejections of an endpoint, by pool, endpoint and cause (connect, reset, "
            "status, timeout).",
            ["pool", "endpoint", "cause"],
            registry=registry,
        )
        self.ejections_skipped = Counter(
            "balancer_pool_ejections_skipped_total",
            "Passive ejections that were due but not performed, by pool, reason "
            "(max_ejection_percent: as many of the pool's serving endpoints were ejected as "
            "health.max_ejection_percent allows) and cause (connect, reset, status, timeout).",
            ["pool", "reason", "cause"],
            registry=registry,
        )
        self.returns = Counter(
            "balancer_endpoint_returns_total",
            "Ejected endpoints whose ejection ended (back on a half-open trial), by pool and "
            "endpoint.",
            ["pool", "endpoint"],
            registry=registry,
        )
        self.endpoints_out = Gauge(
            "balancer_pool_endpoints_out",
            "Serving endpoints health has taken out of the ring (ejected or failing checks).",
            ["pool"],
            registry=registry,
        )
        self.panic = Gauge(
            "balancer_pool_panic",
            "1 while the pool is in panic mode: too many endpoints are out, so balancer routes "
            "across all of them.",
            ["pool"],
            registry=registry,
        )
        self.draining = Gauge(
            "balancer_draining",
            "1 from SIGTERM until exit: readiness fails and in-flight requests are finishing.",
            registry=registry,
        )
        self.front_requests = Gauge(
            "balancer_front_requests",
            "Requests the proxy port is reading or answering right now (capped by "
            "limits.max_concurrent_requests).",
            registry=registry,
        )
        self.client_timeouts = Counter(
            "balancer_client_timeouts_total",
            "Client connections cut off with 408 for sending too slowly, by phase: header "
            "(limits.client_header_timeout) or body (limits.client_body_timeout).",
            ["phase"],
            registry=registry,
        )
        self.empty_pool_waits = Counter(
            "balancer_empty_pool_waits_total",
            "Requests that waited for an empty pool (limits.empty_pool_wait), by why (no "
            "routable endpoint, or a model unknown while a pool learns its models) and "
            "result: served, timeout or shutdown (answered 503), model_not_found (404 once "
            "learned), gone (the client left).",
            ["why", "result"],
            registry=registry,
        )
        self.empty_pool_waiting = Gauge(
            "balancer_empty_pool_waiting",
            "Requests waiting for an empty pool right now.",
            registry=registry,
        )
        self.response_affinity = Counter(
            "balancer_response_affinity_total",
            "Responses API requests naming a stored response, and what the id map did, by "
            "outcome: hit (sent to the endpoint that stored it), miss (id unknown: routed by "
            "key), stale (known, but its endpoint is not routable in the request's pool), "
            "probe (an endpoint answered 404 for the id: tried the next one), found (a "
            "probed endpoint had it), lost (no endpoint had it: the 404 was relayed); and "
            "learned (an answer's response id was stored in the map).",
            ["outcome"],
            registry=registry,
        )
        self.response_affinity_entries = Gauge(
            "balancer_response_affinity_entries",
            "Response ids in this replica's map (routing.response_affinity_entries).",
            registry=registry,
        )
        self.offloaded_parses = Counter(
            "balancer_offloaded_parses_total",
            "Request bodies over limits.offload_parse_bytes read in a worker process, by "
            "outcome: ok, bad_request (the body is invalid: a 400), failed (the worker died "
            "or could not start: a 503; the pool is replaced).",
            ["outcome"],
            registry=registry,
        )
        self.offload_pending = Gauge(
            "balancer_offloaded_parses_pending",
            "Request bodies waiting for a worker process or being read by one.",
            registry=registry,
        )
        if state is not None:
            self.collect_state(state)
        if process:
            # The default registry's collectors (CPU, memory, file descriptors, GC, Python
            # version), registered here because balancer uses its own registry.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._route_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        """:meth:`route`'s three children by (pool, outcome): one lookup per request
        rather than three."""

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def collect_state(self, state: Callable[[], Iterable[PoolState]]) -> None:
        """Export in-flight requests and endpoint counts read from ``state()`` at each
        scrape."""
        self.registry.register(_StateCollector(state))

    def track_pools(self, ready: Callable[[], Mapping[str, bool]]) -> None:
        """Export ``balancer_pool_ready``, read from ``ready()`` (pool name → ready) at each
        scrape: one series per configured pool, so an empty pool shows as 0 rather than as
        a missing series an alert cannot compare."""
        self.registry.register(_PoolCollector(ready))

    def empty_pool_wait(self, why: str, result: str) -> None:
        self._child(self.empty_pool_waits, why, result).inc()

    def request_duration(self, pool: str, seconds: float) -> None:
        self._child(self.duration, pool).observe(seconds)

    def for_endpoint(self, pool: str, endpoint: str) -> EndpointMetrics:
        """The children of one endpoint (see :class:`EndpointMetrics`)."""
        return EndpointMetrics(self, pool, endpoint)

    def route(self, pool: str, outcome: str, walk: int = 0, bound: float | None = None,
              signal: str = "in-flight") -> None:
        """A routing decision; ``walk`` endpoints examined on the ring (0: not a ring walk),
        ``bound`` the CHWBL bound it was taken under (None: no bound) on load ``signal``."""
        children = self._route_children.get((pool, outcome))
        if children is None:
            children = self._route_children[pool, outcome] = (
                self._child(self.route_decisions, pool, outcome),
                self._child(self.ring_walk, pool), self._child(self.bound, pool))
        decisions, walks, bounds = children
        decisions.inc()
        if walk:
            walks.observe(walk)
        if bound is not None:
            bounds.set(bound)
            if signal == "queue":
                self._child(self.route_queue_decisions, pool, outcome).inc()

    def zone_request(self, pool: str, locality: str) -> None:
        self._child(self.zone_requests, pool, locality).inc()

    def load_report(self, pool: str, source: str) -> None:
        self._child(self.load_reports, pool, source).inc()

    def load_report_error(self, pool: str, reason: str) -> None:
        self._child(self.load_report_errors, pool, reason).inc()

    def first_byte_after(self, pool: str, seconds: float) -> None:
        self._child(self.first_byte, pool).observe(seconds)

    def reject(self, reason: str) -> None:
        self._child(self.rejected, reason).inc()

    def client_timeout(self, phase: str) -> None:
        self._child(self.client_timeouts, phase).inc()

    def track_front_requests(self, active: Callable[[], float]) -> None:
        """Read the proxy port's requests in progress from ``active()`` at each scrape."""
        self.front_requests.set_function(active)

    def offloaded_parse(self, outcome: str) -> None:
        self._child(self.offloaded_parses, outcome).inc()

    def track_offload_pending(self, pending: Callable[[], float]) -> None:
        """Read the bodies waiting for or in the worker processes from ``pending()`` at each
        scrape."""
        self.offload_pending.set_function(pending)

    def response_affinity_outcome(self, outcome: str) -> None:
        self._child(self.response_affinity, outcome).inc()

    def track_response_affinity(self, entries: Callable[[], float]) -> None:
        """Read the response map's size from ``entries()`` at each scrape."""
        self.response_affinity_entries.set_function(entries)

    def client_disconnect(self, pool: str) -> None:
        self._child(self.client_disconnects, pool).inc()

    def route_request(self, route: str, pool: str) -> None:
        self._child(self.route_requests, route, pool).inc()

    def fallback(self, route: str, from_pool: str, to_pool: str, reason: str) -> None:
        self._child(self.route_fallbacks, route, from_pool, to_pool, reason).inc()

    def retry(self, pool: str, reason: str, result: str) -> None:
        self._child(self.retries, pool, reason, result).inc()

    def ejection_skipped(self, pool: str, reason: str, cause: str) -> None:
        self._child(self.ejections_skipped, pool, reason, cause).inc()

    def health_state(self, pool: str, out: int, panic: bool) -> None:
        self.endpoints_out.labels(pool).set(out)
        self.panic.labels(pool).set(1 if panic else 0)

    def discovery_event(self, pool: str, event_type: str) -> None:
        self._child(self.discovery_events, pool, event_type).inc()

    def discovery_error(self, pool: str, reason: str) -> None:
        self._child(self.discovery_errors, pool, reason).inc()

    def discovery_relist(self, pool: str, reason: str) -> None:
        self._child(self.discovery_relists, pool, reason).inc()

    def track_staleness(self, pool: str, seconds: Callable[[], float]) -> None:
        """Read the pool's staleness from ``seconds()`` at each scrape."""
        self.discovery_staleness.labels(pool).set_function(seconds)


_REQUESTS: Final = "requests"
_USAGE: Final = "usage"
_STREAM: Final = "stream"
_ERROR: Final = "error"
_EJECTION: Final = "ejection"
_RETURN: Final = "return"


class EndpointMetrics:
    """The metric children labelled with one endpoint of one pool.

    Created with the endpoint's state; :meth:`remove` deletes every series it created and
    turns it off, so a late call (a request that ends after its endpoint was retired) cannot
    bring a series back. Built without a :class:`Metrics` (offline routing), it is off from
    the start.
    """

    __slots__ = ("_children", "_metrics", "endpoint", "pool")

    def __init__(self, metrics: Metrics | None, pool: str, endpoint: str) -> None:
        self._metrics = metrics
        self.pool = pool
        self.endpoint = endpoint
        self._children: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[Any, ...]]] = {}
        """Key → (children, (family, extra label values) per child)."""

    def _open(self, key: tuple[Any, ...],
              *series: tuple[str, tuple[str, ...]]) -> tuple[Any, ...] | None:
        """Resolve and keep the children for ``key``: one per (family attribute of
        :class:`Metrics`, extra label values); None once removed (or without metrics)."""
        metrics = self._metrics
        if metrics is None:
            return None
        families = tuple((getattr(metrics, name), extra) for name, extra in series)
        children = tuple(family.labels(self.pool, self.endpoint, *extra)
                         for family, extra in families)
        self._children[key] = (children, families)
        return children

    def request(self, outcome: str, code: int) -> None:
        """A request answered with ``code`` after a decision with ``outcome``."""
        key = (_REQUESTS, outcome, code)
        found = self._children.get(key)
        children = found[0] if found is not None else self._open(
            key, ("requests", (outcome, str(code), _status_class(code))))
        if children is not None:
            children[0].inc()

    def usage(self, prompt: int, cached: int) -> None:
        """Token usage the endpoint reported for one response."""
        found = self._children.get((_USAGE,))
        children = found[0] if found is not None else self._open(
            (_USAGE,), ("usage_responses", ()), ("prompt_tokens", ()), ("cached_tokens", ()))
        if children is not None:
            children[0].inc()
            children[1].inc(prompt)
            children[2].inc(cached)

    def streamed(self, chunks: int, size: int) -> None:
        """Once per relayed stream: its chunk and byte counts (not per chunk)."""
        found = self._children.get((_STREAM,))
        children = found[0] if found is not None else self._open(
            (_STREAM,), ("stream_chunks", ()), ("stream_bytes", ()))
        if children is not None:
            children[0].inc(chunks)
            children[1].inc(size)

    def upstream_error(self, reason: str) -> None:
        self._count((_ERROR, reason), "upstream_errors", (reason,))

    def ejection(self, cause: str) -> None:
        self._count((_EJECTION, cause), "ejections", (cause,))

    def returned(self) -> None:
        self._count((_RETURN,), "returns", ())

    def _count(self, key: tuple[str, ...], family: str, extra: tuple[str, ...]) -> None:
        found = self._children.get(key)
        children = found[0] if found is not None else self._open(key, (family, extra))
        if children is not None:
            children[0].inc()

    def remove(self) -> None:
        """Delete every series this endpoint has, and record nothing more."""
        self._metrics = None
        for _, series in self._children.values():
            for family, extra in series:
                family.remove(self.pool, self.endpoint, *extra)
        self._children.clear()

    @property
    def series(self) -> int:
        """Series this endpoint has created and not removed (for tests and debugging)."""
        return sum(len(series) for _, series in self._children.values())
