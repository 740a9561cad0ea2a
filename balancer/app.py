"""Assembly and lifecycle: build the proxy and admin apps, run them, drain on SIGTERM.

Everything is built from the settings and passed in (router, metrics registry, endpoint
source); nothing is global, so tests build as many independent balancers as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from balancer import discovery, httpserver
from balancer.admission import Admission
from balancer.config import Settings, as_dict
from balancer.discovery import EndpointSource
from balancer.errors import BalancerError, DebugForbiddenError, StartupError, error_body
from balancer.forward import Forwarder
from balancer.loadpoll import LoadPoller
from balancer.metrics import Metrics
from balancer.models import ModelLearner
from balancer.monitor import HealthMonitor
from balancer.offload import ParsePool
from balancer.outbound import outbounds
from balancer.proxy import Proxy
from balancer.record import AccessLog, Reporter
from balancer.route import KEYED_PATHS, decide, endpoint_load, explain, keyed_view, kind_for
from balancer.router import Router

log = logging.getLogger(__name__)


@dataclass
class Balancer:
    """One balancer instance: its state, its two apps and its background work."""

    settings: Settings
    router: Router
    metrics: Metrics
    proxy: Proxy
    source: EndpointSource
    learner: ModelLearner
    health: HealthMonitor
    poller: LoadPoller
    app: web.Application = field(init=False)
    admin: web.Application = field(init=False)
    front: httpserver.FrontDoor = field(init=False)
    """The proxy port's front door: its cap on requests in progress and client timeouts."""
    admin_front: httpserver.FrontDoor = field(init=False)
    """The admin port's: client timeouts only (probes and scrapes are never capped)."""
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first endpoint snapshot has been applied."""
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the endpoint source stopped with an error: the view can no longer be kept
    current, so ``serve`` exits rather than route on it forever."""

    def __post_init__(self) -> None:
        self.app = self._build_proxy_app()
        self.admin = self._build_admin_app()
        limits, metrics = self.settings.limits, self.metrics
        trusted = httpserver.parse_networks(self.settings.server.trusted_proxies)
        self.front = httpserver.FrontDoor(
            "proxy", max_concurrent=limits.max_concurrent_requests,
            body_timeout=limits.client_body_timeout, trusted=trusted,
            on_reject=metrics.reject, on_timeout=metrics.client_timeout,
            screen=self.proxy.screen_target)
        self.admin_front = httpserver.FrontDoor("admin", trusted=trusted,
                                                on_timeout=metrics.client_timeout)
        front = self.front
        metrics.track_front_requests(lambda: front.active)

    # -- proxy app -------------------------------------------------------------------------

    def _build_proxy_app(self) -> web.Application:
        limits = self.settings.limits
        proxy = self.proxy
        # Every handler checks the request target first (Proxy._check_target).
        app = web.Application(client_max_size=limits.max_body_bytes)
        for path in KEYED_PATHS:
            app.router.add_route("*", path, proxy.handle_keyed)
        app.router.add_route("*", "/v1/models", proxy.handle_models)
        # Only what server.forward_paths lists; the handler answers 404/405 for the rest.
        app.router.add_route("*", "/v1/{tail:.*}", proxy.handle_passthrough)
        app.router.add_route("*", "/{tail:.*}", proxy.handle_not_found)
        app.cleanup_ctx.append(self._parsers)
        app.cleanup_ctx.append(self._connections)
        app.cleanup_ctx.append(self._health)
        app.cleanup_ctx.append(self._load_polls)
        app.cleanup_ctx.append(self._discovery)
        return app

    async def _parsers(self, app: web.Application) -> AsyncIterator[None]:
        """The worker processes that read large bodies stop with the app. They start when
        first needed (off the loop; that body waits for them, ~0.3 s), so a replica that never
        receives a large body (most sidecars) never pays their memory."""
        self.proxy.reclaimer.start()
        try:
            yield
        finally:
            await self.proxy.parsers.close()
            await self.proxy.reclaimer.close()

    async def _health(self, app: web.Application) -> AsyncIterator[None]:
        await self.health.start()
        try:
            yield
        finally:
            await self.health.close()

    async def _load_polls(self, app: web.Application) -> AsyncIterator[None]:
        await self.poller.start()
        try:
            yield
        finally:
            await self.poller.close()

    async def _connections(self, app: web.Application) -> AsyncIterator[None]:
        """Endpoints open their connection pools while the app runs; all close after."""
        forwarder = self.proxy.forwarder
        forwarder.connectors = {name: out.connector()
                                for name, out in forwarder.outbound.items()}
        try:
            yield
        finally:
            forwarder.connectors = None
            self.router.close_connections()
            self.proxy.reporter.access.flush()
            await asyncio.sleep(0)  # let transports run their close callbacks

    async def _discovery(self, app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(self._consume_snapshots(), name="balancer-discovery"),
                 asyncio.create_task(self.learner.run(), name="balancer-models")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _consume_snapshots(self) -> None:
        try:
            async with contextlib.aclosing(self.source.snapshots()) as snapshots:
                async for snapshot in snapshots:
                    self._apply(snapshot)
        except discovery.DiscoveryError as exc:
            log.critical("endpoint discovery cannot start: %s", exc)
            self.failed.set()
        except Exception:
            log.critical("endpoint discovery stopped", exc_info=True)
            self.failed.set()

    def _apply(self, snapshot: discovery.Snapshot) -> None:
        before = {name: set(pool.routable) for name, pool in self.router.pools.items()}
        for name in self.router.apply(snapshot):
            pool = self.router.pools[name]
            added = sorted(set(pool.routable) - before[name])
            removed = sorted(before[name] - set(pool.routable))
            log.info("pool %s: %d routable, %d draining%s%s", name, len(pool.routable),
                     len(pool.endpoints) - len(pool.routable), _listed(" +", added),
                     _listed(" -", removed))
            if pool.learns_models and (added or removed):
                self.learner.endpoints_changed()
            self.health.follow(pool)
            self.poller.endpoints_changed()
        self.synced.set()

    # -- admin app -------------------------------------------------------------------------

    def _build_admin_app(self) -> web.Application:
        middlewares = [] if self.settings.server.debug_from_anywhere else [
            web.middleware(DebugFromLoopback(self.metrics))]
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/debug/endpoints", self._debug_endpoints)
        app.router.add_get("/debug/config", self._debug_config)
        app.router.add_post("/debug/route", self._debug_route)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        """Whether this process can serve: configured, listening (this port answers, and the
        proxy port was bound before it), endpoints discovered once, not draining.

        The model servers' state is deliberately not part of it: a pool with no endpoint
        (scaled to zero, loading weights) would otherwise take every gateway replica out of
        its Service, and in sidecar mode an LLM outage would take the application pod out of
        its own. Requests for such a pool wait (``limits.empty_pool_wait``) and then get 503;
        the pools' state is in the body, in ``balancer_pool_ready`` and on /debug/endpoints.
        """
        if self.proxy.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        if self.failed.is_set():
            return web.json_response({"ready": False, "reason": "discovery failed"},
                                     status=503)
        if not self.synced.is_set():
            return web.json_response({"ready": False, "reason": "discovery not synced yet"},
                                     status=503)
        return web.json_response({"ready": True, "unready_pools": self.router.unready_pools()})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _debug_endpoints(self, request: web.Request) -> web.Response:
        pools: dict[str, Any] = {}
        for name, pool in self.router.pools.items():
            shares = pool.ring.shares()
            now = time.monotonic()
            ramp = pool.ramp(now) or {}
            pools[name] = {
                "models": list(pool.models),
                "total_in_flight": pool.total_load,
                "load_signal": pool.signal(),
                "panic": pool.panic,
                "zone": pool.routing.zone or None,
                "prefer_zone": pool.routing.prefer_zone,
                "local_endpoints": sorted(pool.local),
                # Share of the zone's keys that skip the preference now (routing.zone_factor).
                "zone_spill": None if pool.spill is None else {
                    "share": round(pool.spill.share, 4),
                    "work_share": round(pool.spill.work_share, 4)},
                "endpoints": [
                    {
                        "id": endpoint.id,
                        "url": endpoint.url,
                        "zone": endpoint.zone,
                        "local": endpoint.id in pool.local,
                        "node": endpoint.node,
                        "routable": endpoint.id in pool.routable,
                        "serving": endpoint.serving,
                        "terminating": endpoint.terminating,
                        "out": endpoint.id in pool.out,
                        # In slow start: the share of the bound it may take now.
                        "slow_start_share": (round(ramp[endpoint.id], 3)
                                             if endpoint.id in ramp else None),
                        **endpoint_load(pool, endpoint.id, now),
                        "ring_share": round(shares.get(endpoint.id, 0.0), 6),
                        "health_history": self.health.events(name, endpoint.id),
                    }
                    for endpoint in sorted(pool.endpoints.values(), key=lambda e: e.id)
                ],
            }
        responses = self.proxy.responses
        affinity = {"entries": len(responses), "capacity": responses.capacity,
                    "ttl_s": responses.ttl}
        return web.json_response({"pools": pools, "response_affinity": affinity},
                                 dumps=lambda o: json.dumps(o, indent=2))

    async def _debug_route(self, request: web.Request) -> web.Response:
        """POST a request body: its key, ring walk and choice against the live endpoints and
        load, sending nothing upstream and taking no load (``balancer route`` on the CLI
        answers the same from a configuration file). ``?path=`` names the API path, the
        session header is read as the proxy would."""
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError) as e:
            return web.json_response(error_body(f"request body is not valid JSON: {e}",
                                                "invalid_request_error", 400), status=400)
        if not isinstance(body, dict):
            return web.json_response(error_body("request body must be a JSON object",
                                                "invalid_request_error", 400), status=400)
        try:
            kind = kind_for(body, request.query.get("path"))
            view = keyed_view(kind, body,
                              request.headers.get(self.settings.routing.session_header))
            result = explain(decide(view, self.router), view=view)
        except BalancerError as exc:
            return web.json_response(error_body(exc.message, exc.type, exc.status, exc.param),
                                     status=exc.status)
        return web.json_response(result, dumps=lambda o: json.dumps(o, indent=2))

    async def _debug_config(self, request: web.Request) -> web.Response:
        return web.json_response(as_dict(self.settings),
                                 dumps=lambda o: json.dumps(o, indent=2))


DEBUG_PREFIX = "/debug"


def is_loopback(peer: str | None) -> bool:
    """Whether a TCP peer address is this host's loopback (127.0.0.0/8, ::1, or 127.x as an
    IPv4-mapped IPv6 address, which a socket bound to ``::`` reports). Anything else,
    including no address or one that does not parse, is not."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_debug_path(path: str) -> bool:
    """``/debug`` and everything under it, known routes or not (so a refused peer cannot
    tell which exist)."""
    return path == DEBUG_PREFIX or path.startswith(DEBUG_PREFIX + "/")


class DebugFromLoopback:
    """Admin-app middleware: ``/debug/*`` only for loopback peers (while
    ``server.debug_from_anywhere`` is off). The admin port listens on the pod's address so
    the kubelet can probe and Prometheus scrape it; ``/debug`` shows the configuration and
    every model server's address, which other pods have no business reading. The TCP peer
    decides, never a forwarded header: ``kubectl port-forward`` and ``kubectl exec`` arrive
    from loopback."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def __call__(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not is_debug_path(request.path):
            response: web.StreamResponse = await handler(request)
            return response
        peer = request.remote
        if is_loopback(peer):
            response = await handler(request)
            return response
        exc = DebugForbiddenError(
            f"{request.path} is served only to loopback peers (kubectl port-forward or "
            "exec); set server.debug_from_anywhere to serve it to every peer")
        self._metrics.reject(exc.reason)
        log.warning("refused %s %s from %s: debug endpoints are for loopback peers only",
                    request.method, request.path, peer or "an unknown peer")
        return web.json_response(error_body(exc.message, exc.type, exc.status),
                                 status=exc.status)


def _listed(prefix: str, ids: list[str], limit: int = 5) -> str:
    """``" +a, b, c"`` for a log line, cut after ``limit`` ids (a pool may have hundreds)."""
    if not ids:
        return ""
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return prefix + ", ".join(ids[:limit]) + more


def _pool_readiness(router: Router) -> dict[str, bool]:
    """Each pool: can it serve now (a routable endpoint, its models known)?"""
    unready = router.unready_pools()
    return {name: name not in unready for name in router.pools}


def build(
    settings: Settings,
    *,
    source: EndpointSource | None = None,
    registry: CollectorRegistry | None = None,
) -> Balancer:
    """Build a balancer from settings; endpoints come from ``source`` when given, else from
    the configuration (static URLs, or Services watched in Kubernetes). Raises ConfigError
    when a pool's TLS files do not load or an injected header's value cannot be had."""
    metrics = Metrics(registry or CollectorRegistry())
    outbound = outbounds(settings)
    router = Router(settings, metrics=metrics)
    metrics.collect_state(router.in_flight_rows)
    metrics.track_pools(lambda: _pool_readiness(router))
    health = HealthMonitor(settings.health, router.pools, metrics, outbound=outbound)
    admission = Admission(settings.limits, settings.retries, observe=health.observe,
                          metrics=metrics)
    reporter = Reporter(metrics, AccessLog())
    learner = ModelLearner(router, settings.model_discovery, metrics, outbound)
    router.on_models_stale = learner.stale
    return Balancer(
        settings=settings,
        router=router,
        metrics=metrics,
        proxy=Proxy(settings, router, metrics, admission,
                    Forwarder(settings, metrics, outbound),
                    reporter, ParsePool(settings.limits, metrics)),
        source=source or discovery.from_settings(settings, metrics),
        learner=learner,
        health=health,
        poller=LoadPoller(router.pools, metrics, on_adapters=learner.adapters_seen,
                          outbound=outbound),
    )


# -- running --------------------------------------------------------------------------------


@dataclass
class Running:
    """A started balancer: its bound ports and how to stop it."""

    balancer: Balancer
    runners: list[web.AppRunner]
    port: int
    admin_port: int

    async def stop_accepting(self) -> None:
        """Close the proxy's listening socket and its idle keep-alive connections; requests
        in flight carry on, and their connections close when they end."""
        await httpserver.stop_accepting(self.runners[0])

    async def stop(self, grace: float | None = None) -> None:
        """Stop both listeners; requests still running after ``grace`` seconds (default:
        aiohttp's) are cancelled."""
        for runner in reversed(self.runners):
            await httpserver.stop(runner, grace)


async def start(balancer: Balancer, *, host: str | None = None, port: int | None = None,
                admin_port: int | None = None) -> Running:
    """Start both listeners (port 0 picks a free port; the bound ports are returned).

    The proxy listens on ``host`` (default ``server.host``); the admin port on
    ``server.admin_host``, or on the proxy's address when that is empty.

    Both ports are bound before either app starts, so a port in use raises
    :class:`~balancer.errors.StartupError` before any background work (discovery, health
    checks) has begun or logged anything."""
    server, limits = balancer.settings.server, balancer.settings.limits
    host = server.host if host is None else host
    admin_host = server.admin_host or host
    header, keepalive = limits.client_header_timeout, limits.client_keepalive_timeout
    proxy_runner = httpserver.make_runner(
        balancer.app, proxy=True, max_header_bytes=limits.max_header_bytes,
        on_client_error=balancer.metrics.reject, front=balancer.front,
        header_timeout=header, keepalive_timeout=keepalive)
    admin_runner = httpserver.make_runner(balancer.admin, proxy=False,
                                          front=balancer.admin_front,
                                          header_timeout=header, keepalive_timeout=keepalive)
    bound: list[asyncio.Server] = []
    runners: list[web.AppRunner] = []
    try:
        bound.append(await httpserver.listen(
            proxy_runner, host, server.port if port is None else port, "server.port"))
        bound.append(await httpserver.listen(
            admin_runner, admin_host,
            server.admin_port if admin_port is None else admin_port,
            "server.admin_host/admin_port" if server.admin_host else "server.admin_port"))
        for runner, sockets in zip((proxy_runner, admin_runner), bound, strict=True):
            await runner.setup()
            runners.append(runner)
            await httpserver.serve_on(runner, sockets)
    except BaseException:
        for sockets in bound:
            sockets.close()
        for runner in reversed(runners):
            await runner.cleanup()
        raise
    return Running(balancer, runners, httpserver.bound_port(proxy_runner),
                   httpserver.bound_port(admin_runner))


async def check_kubernetes(settings: Settings) -> None:
    """Load the Kubernetes configuration once before starting, when a pool names a
    Service, so a kubeconfig that cannot be loaded stops ``serve`` with one line naming
    it (:class:`~balancer.errors.StartupError`) instead of a started balancer that exits."""
    if all(pool.kubernetes is None for pool in settings.pools):
        return
    try:
        api_client, _ = await discovery.connect(settings.kubernetes)
    except discovery.DiscoveryError as exc:
        raise StartupError(str(exc)) from None
    await api_client.close()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain (``drain`` settings) and exit.

    Draining: ``/readyz`` fails at once; new requests are still accepted for ``drain.delay``
    seconds (while Services and clients notice), then the listener closes and in-flight
    requests get up to ``drain.timeout`` seconds to finish. A second signal exits at once.

    Returns the exit status: 0 after a signal, 1 when endpoint discovery failed for good
    after the start, so the failure shows as a crashed container, and 1 when a second signal
    cut the drain short. Raises :class:`~balancer.errors.StartupError` when it cannot start
    (a port in use, a Kubernetes configuration that cannot be loaded).
    """
    await check_kubernetes(settings)
    balancer = build(settings)
    running = await start(balancer)
    server = settings.server
    log.info("balancer listening on %s:%d (admin %s:%d), %d pool(s), strategy %s",
             server.host, running.port, server.admin_host or server.host, running.admin_port,
             len(settings.pools), settings.routing.strategy.value)
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: exiting now, %d requests still in flight",
                        balancer.proxy.in_flight)
            force.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await _first(stop.wait(), balancer.failed.wait())
    if balancer.failed.is_set():
        await running.stop()
        return 1
    drain = settings.drain
    balancer.proxy.draining = True
    balancer.metrics.draining.set(1)
    log.info("draining: readiness fails; accepting new requests for %g s more", drain.delay)
    await _first(asyncio.sleep(drain.delay), force.wait())
    if not force.is_set():
        await running.stop_accepting()
        balancer.proxy.stop_waiting()
        log.info("stopped accepting; waiting up to %g s for %d in-flight requests",
                 drain.timeout, balancer.proxy.in_flight)
        await _first(asyncio.sleep(drain.timeout), balancer.proxy.idle.wait(), force.wait())
        if not balancer.proxy.idle.is_set() and not force.is_set():
            log.warning("drain timeout: %d requests still in flight",
                        balancer.proxy.in_flight)
    # Not 0: aiohttp reads a timeout of 0 as none at all.
    await running.stop(grace=0.05 if force.is_set() else 1.0)
    return 1 if force.is_set() else 0


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``waits`` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
