"""Endpoint sources: where pools learn their endpoints.

A source is an async stream of whole snapshots, ``{pool name: frozenset[Endpoint]}``. The
consumer applies each one as the complete truth (level-triggered), so a source may repeat
itself or coalesce changes without harm. The static source emits the configured endpoints
once; :class:`KubernetesDiscovery` emits on every real change of a watched Service.

This is the only module that talks to Kubernetes (with ``kubernetes.aio``, the asyncio client
that ships in the ``kubernetes`` package). Per pool, :class:`EndpointSliceWatch` keeps an exact
view of one Service's EndpointSlices the way client-go's reflector does:

- LIST, replace the view wholesale, then WATCH from the list's resourceVersion, with bookmarks
  so the resourceVersion stays fresh on a quiet Service;
- a watch ended by the server (``timeoutSeconds``, or its own cap) resumes from the last
  resourceVersion: no event is lost or seen twice;
- ``410 Gone`` (the resourceVersion was compacted away) and any other watch failure lead to a
  new LIST; failures back off exponentially with jitter;
- a full LIST every ``relist_interval`` repairs any drift;
- a watch that brings neither an event nor a bookmark for ``watch_idle_timeout`` is taken
  for dead (a connection that hung without closing) and resumed from its resourceVersion;
- ``429`` (and a 5xx carrying ``Retry-After``) waits as long as the server asks, within the
  back-off cap and with jitter, then resumes the watch, or LISTs again if the LIST failed;
- while the API server cannot be reached the last view stays in place: an API error never
  removes an endpoint, only a successful LIST or an event does. ``staleness()`` says how long
  the API server has given no sign of life (LIST, event or bookmark).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp

from balancer.config import KubernetesPoolSettings, KubernetesSettings, PoolSettings, Settings
from balancer.endpoints import Endpoint, merge_endpoints, slice_endpoints, static_endpoint
from balancer.metrics import Metrics

log = logging.getLogger(__name__)

Snapshot = dict[str, frozenset[Endpoint]]

SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
SERVICE_ACCOUNT_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_QUICK_WATCH: Final = 1.0
"""Seconds: a watch that ends sooner without a single event is treated as a failure to back
off from, so a server that closes every watch at once is not asked again in a tight loop."""
_RETRY_AFTER_JITTER: Final = 0.2
"""Up to this share of a ``Retry-After`` is added at random, so replicas told the same
moment do not all come back in the same millisecond."""
_ERROR_TEXT_MAX: Final = 300
"""Characters of an API error body kept in messages: a Status is short, an HTML error page
from a proxy in between is not, and a log line should stay a line."""


class EndpointSource(Protocol):
    def snapshots(self) -> AsyncGenerator[Snapshot, None]:
        """Yield whole snapshots for as long as the source runs."""
        ...


class StaticDiscovery:
    """The endpoints listed in the configuration, emitted once."""

    def __init__(self, pools: Sequence[PoolSettings]) -> None:
        self._snapshot: Snapshot = {
            p.name: frozenset(static_endpoint(url, p.zone_of(url)) for url in p.endpoints)
            for p in pools
        }

    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def snapshots(self) -> AsyncGenerator[Snapshot, None]:
        yield self._snapshot
        await asyncio.Event().wait()


class QueueDiscovery:
    """Snapshots pushed by hand: for embedding balancer and for tests that change endpoints."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Snapshot] = asyncio.Queue()

    def push(self, snapshot: Snapshot) -> None:
        self._queue.put_nowait(snapshot)

    async def snapshots(self) -> AsyncGenerator[Snapshot, None]:
        while True:
            yield await self._queue.get()


def from_settings(settings: Settings, metrics: Metrics | None = None) -> EndpointSource:
    """The source the configuration asks for: static unless a pool names a Service."""
    if any(p.kubernetes is not None for p in settings.pools):
        return KubernetesDiscovery(settings, metrics)
    return StaticDiscovery(settings.pools)


# -- Kubernetes -------------------------------------------------------------------------------


class DiscoveryError(Exception):
    """Kubernetes discovery cannot start: no usable API configuration."""


class ApiError(Exception):
    """A request the API server answered with an error (HTTP status, or an ERROR event)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.retry_after = retry_after
        """Seconds the server asked to wait (``Retry-After``), when it did."""

    @classmethod
    def from_body(cls, status: int, body: bytes,
                  headers: Mapping[str, str] | None = None) -> ApiError:
        """From a ``Status`` object when the body is one, else from the raw text; with the
        ``Retry-After`` header's delay when there is one."""
        retry_after = parse_retry_after((headers or {}).get("Retry-After"))
        try:
            data = json.loads(body)
            message = str(data.get("message") or data.get("reason") or "")
            status = int(data.get("code") or status)
        except (ValueError, AttributeError, TypeError):
            message = body.decode("utf-8", "replace")
        return cls(status, message[:_ERROR_TEXT_MAX], retry_after)

    @property
    def throttled(self) -> bool:
        """The server asked to come back later: a 429, or a 5xx with ``Retry-After`` (an API
        server shutting down or shedding load)."""
        return self.status == 429 or (self.status >= 500 and self.retry_after is not None)


class SilentWatchError(Exception):
    """A watch brought neither an event nor a bookmark for ``watch_idle_timeout`` seconds: the
    connection is open but nothing comes through it (a half-dead TCP path, a hung server)."""


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds (what the API server
    sends) or an HTTP date (RFC 9110); None when absent or unreadable (then the ordinary
    back-off applies)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 dates are GMT; one without a zone is not one
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry_delay(backoff_delay: float, retry_after: float | None, maximum: float,
                rng: random.Random) -> float:
    """How long to wait before the next request after a failure.

    Without ``Retry-After``, the back-off's delay. With it, at least what the server asked
    (never sooner: asking again early is what it told us not to do), plus up to 20 % jitter;
    but the request is capped at ``maximum`` (``backoff_max``), so a server asking for an hour
    does not leave the view unrefreshed for an hour. Never less than the back-off either: a
    server that keeps answering ``Retry-After: 1`` is still asked less and less often.
    The result is at most ``1.2 * maximum``.
    """
    if retry_after is None:
        return backoff_delay
    base = min(max(retry_after, 0.0), maximum)
    return max(backoff_delay, base + rng.uniform(0, base * _RETRY_AFTER_JITTER))


def failure_reason(exc: BaseException) -> str:
    """A short label for a failed API request, for metrics and logs."""
    if isinstance(exc, ApiError):
        if exc.status == 410:
            return "expired"
        return "throttled" if exc.throttled else "http"
    if isinstance(exc, SilentWatchError):
        return "silent"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connection"
    if isinstance(exc, ValueError | KeyError | TypeError):
        return "invalid"
    return "unexpected"


class Backoff:
    """Exponential back-off with equal jitter.

    The n-th consecutive failure waits between half and all of ``initial * 2**(n-1)`` (capped
    at ``maximum``): never less than half, so a flapping API server is not hammered, and
    never in step across replicas that failed at the same moment.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        base = min(self.maximum, self.initial * 2.0 ** min(self.attempts, 64))
        self.attempts += 1
        return base / 2 + self._rng.uniform(0, base / 2)

    def reset(self) -> None:
        self.attempts = 0


class EndpointSliceApi(Protocol):
    """The one call of ``kubernetes.aio``'s ``DiscoveryV1Api`` that discovery uses."""

    async def list_namespaced_endpoint_slice_without_preload_content(
        self,
        namespace: str,
        *,
        label_selector: str | None = None,
        allow_watch_bookmarks: bool | None = None,
        resource_version: str | None = None,
        timeout_seconds: int | None = None,
        watch: bool | None = None,
        _request_timeout: float | tuple[float, float] | None = None,
    ) -> aiohttp.ClientResponse: ...


class EndpointSliceWatch:
    """One pool's endpoints, kept exact from the EndpointSlices of one Service.

    WORKAROUND: the watch reads the stream itself rather than through
    ``kubernetes.aio.watch.Watch``, which turns every event into a model object (about 15 times
    the cost of the plain dict used here), retries a 410 once with the same stale version when
    no ``timeout_seconds`` is given, yields non-JSON lines as events, and cannot tell when the
    stream is established (needed for ``staleness``). The request itself is the client's.
    """

    def __init__(
        self,
        pool: str,
        target: KubernetesPoolSettings,
        namespace: str,
        api: EndpointSliceApi,
        settings: KubernetesSettings,
        publish: Callable[[str, frozenset[Endpoint]], None],
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.namespace = namespace
        self.service = target.service
        self._port = target.port
        self._api = api
        self._settings = settings
        self._publish = publish
        self._metrics = metrics
        self._selector = f"{SERVICE_NAME_LABEL}={target.service}"
        self._rng = rng or random.Random()
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max, self._rng)
        self._loop = asyncio.get_running_loop()
        self.resource_version = ""
        self.endpoints: frozenset[Endpoint] | None = None
        """The last published endpoints; None until the first LIST succeeds."""
        self._slices: dict[str, list[Endpoint]] = {}
        """Endpoints per EndpointSlice name: an event re-reads only its own slice."""
        self._alive_at = self._loop.time()
        """When the API server last showed the view current: a LIST, an event or a bookmark.
        An open watch alone proves nothing: a dead one looks open too."""

    def staleness(self) -> float:
        """Seconds since the API server last gave a sign of life (a successful LIST, a watch
        event or a bookmark); since the start while no LIST has succeeded yet. On a quiet
        healthy watch it saw-tooths up to the bookmark interval (about 60 s); it keeps rising
        while a watch is silent, dead or failing."""
        return max(0.0, self._loop.time() - self._alive_at)

    async def run(self) -> None:
        """LIST and WATCH until cancelled; never raises otherwise."""
        reason = "initial"
        while True:
            try:
                await self._list(reason)
                relist_at = self._loop.time() + self._settings.relist_interval
                while (remaining := relist_at - self._loop.time()) > 0:
                    started = self._loop.time()
                    try:
                        events = await self._watch(
                            min(self._settings.watch_timeout, math.ceil(remaining)))
                    except (SilentWatchError, ApiError) as exc:
                        if isinstance(exc, ApiError) and not exc.throttled:
                            raise
                        # Nothing suggests the resourceVersion is wrong: resume the watch
                        # (a LIST would cost a throttling server far more). If the version
                        # has expired meanwhile, the 410 leads to a LIST as usual.
                        await asyncio.sleep(self._failed(exc))
                        continue
                    if events or self._loop.time() - started >= _QUICK_WATCH:
                        self._backoff.reset()
                    else:
                        # Closed at once without a word (a proxy in between, an overloaded
                        # API server): resume, but do not hammer it.
                        await asyncio.sleep(self._backoff.next())
                reason = "periodic"
            except Exception as exc:
                reason = "expired" if failure_reason(exc) == "expired" else "error"
                await asyncio.sleep(self._failed(exc))

    def _failed(self, exc: Exception) -> float:
        """Count and log a failure; returns how long to wait before the next LIST."""
        why = failure_reason(exc)
        if self._metrics is not None:
            self._metrics.discovery_error(self.pool, why)
        healthy = self._backoff.attempts == 0
        delay = retry_delay(self._backoff.next(),
                            exc.retry_after if isinstance(exc, ApiError) else None,
                            self._settings.backoff_max, self._rng)
        if why == "expired" and healthy:
            # The normal way a watch ends after the API server compacted its history.
            log.info("pool %s: resourceVersion %s expired; listing again", self.pool,
                     self.resource_version)
            return 0.0
        log.warning("pool %s: watching %s/%s failed (%s: %s); keeping %d known endpoints, "
                    "retrying in %.1f s", self.pool, self.namespace, self.service, why,
                    str(exc)[:_ERROR_TEXT_MAX] or type(exc).__name__,
                    len(self.endpoints or ()), delay, exc_info=why == "unexpected")
        return delay

    async def _list(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.discovery_relist(self.pool, reason)
        response = await self._api.list_namespaced_endpoint_slice_without_preload_content(
            self.namespace, label_selector=self._selector,
            _request_timeout=float(self._settings.request_timeout),
        )
        async with response:
            body = await response.read()
        if response.status != 200:
            raise ApiError.from_body(response.status, body, response.headers)
        data = json.loads(body)
        slices = {item["metadata"]["name"]: slice_endpoints(item, self._port)
                  for item in data.get("items") or ()}
        self.resource_version = data["metadata"]["resourceVersion"]
        self._slices = slices
        self._alive_at = self._loop.time()
        self._update()

    async def _watch(self, seconds: int) -> int:
        """One watch request, from the current resourceVersion until the server ends it;
        returns how many events it brought.

        Raises :class:`SilentWatchError` when ``watch_idle_timeout`` passes without an event
        or a bookmark, from the request on: the client's own timeout covers the whole watch
        (``timeoutSeconds`` plus ``request_timeout``), so alone it would notice a hung
        connection only after minutes. The idle timer runs here rather than as the socket's
        read timeout so that only whole events count as life, whatever the transport.
        """
        idle = self._settings.watch_idle_timeout
        try:
            async with asyncio.timeout(idle) as timer:
                response = await (
                    self._api.list_namespaced_endpoint_slice_without_preload_content(
                        self.namespace, label_selector=self._selector, watch=True,
                        allow_watch_bookmarks=True, resource_version=self.resource_version,
                        timeout_seconds=seconds,
                        _request_timeout=float(seconds + self._settings.request_timeout),
                    ))
                async with response:
                    if response.status != 200:
                        raise ApiError.from_body(response.status, await response.read(),
                                                 response.headers)
                    events = 0
                    async for line in response.content:
                        if line.strip():
                            self._on_event(json.loads(line))
                            timer.reschedule(self._loop.time() + idle)
                            events += 1
        except TimeoutError:
            if timer.expired():
                raise SilentWatchError(
                    f"no event or bookmark for {idle:g} s on an open watch") from None
            raise
        return events

    def _on_event(self, event: Mapping[str, Any]) -> None:
        kind = event["type"]
        obj = event["object"]
        if kind == "ERROR":
            message = str(obj.get("message") or obj)
            raise ApiError(int(obj.get("code") or 0), message[:_ERROR_TEXT_MAX])
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            log.warning("pool %s: ignoring a watch event of unknown type %r", self.pool, kind)
            return
        metadata = obj["metadata"]
        resource_version = metadata["resourceVersion"]
        if kind == "DELETED":
            self._slices.pop(metadata["name"], None)
        elif kind != "BOOKMARK":
            self._slices[metadata["name"]] = slice_endpoints(obj, self._port)
        self.resource_version = resource_version
        self._alive_at = self._loop.time()
        self._backoff.reset()
        if self._metrics is not None:
            self._metrics.discovery_event(self.pool, kind.lower())
        if kind != "BOOKMARK":
            self._update()

    def _update(self) -> None:
        endpoints = merge_endpoints(self._slices.values())
        if endpoints != self.endpoints:
            self.endpoints = endpoints
            self._publish(self.pool, endpoints)


async def connect(settings: KubernetesSettings) -> tuple[Any, str]:
    """An API client from the kubeconfig file, or from the pod's service account when none is
    given, and the namespace to use when a pool names none.

    The configuration is always explicit: nothing falls back to ``~/.kube/config`` or to
    another process-wide default, so what runs is what the settings say.
    """
    # Imported here, not at the top: the generated client takes ~0.5 s to import, which a
    # balancer without Kubernetes pools (and every CLI command) should not pay.
    from kubernetes.aio import client, config

    configuration = client.Configuration()
    if settings.kubeconfig and not _is_file(settings.kubeconfig):
        # Said plainly: the loader would report a missing file as a malformed one.
        raise DiscoveryError(f"kubernetes.kubeconfig: {settings.kubeconfig} is not a file")
    try:
        if settings.kubeconfig:
            loader = await config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=settings.kubeconfig, context=settings.context or None,
                client_configuration=configuration, persist_config=False,
            )
            context = loader.current_context.get("context") or {}
            namespace = context.get("namespace") or "default"
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
            namespace = _service_account_namespace() or "default"
    except Exception as exc:
        # The loaders raise ConfigException, OSError, YAML and key errors alike; all mean
        # the same thing here.
        where = settings.kubeconfig or "the in-cluster service account"
        hint = "" if settings.kubeconfig else (
            " (outside a cluster, set kubernetes.kubeconfig to a kubeconfig file)")
        raise DiscoveryError(f"cannot load the Kubernetes configuration from {where}: "
                             f"{exc}{hint}") from exc
    return client.ApiClient(configuration), namespace


def _is_file(path: str) -> bool:
    """One stat at start-up; not worth a thread."""
    return os.path.isfile(path)


def _service_account_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


class KubernetesDiscovery:
    """Pools that name a Service, watched; the other pools as configured.

    Every change of any pool yields the whole current snapshot; changes that arrive while the
    consumer is busy are coalesced into the next one, so a burst of events costs one ring
    update, not one each.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self.watches: dict[str, EndpointSliceWatch] = {}
        """Per Service-backed pool, once running (for tests and the admin port)."""

    async def snapshots(self) -> AsyncGenerator[Snapshot, None]:
        pools = self._settings.pools
        state: Snapshot = StaticDiscovery([p for p in pools if p.kubernetes is None]).snapshot()
        changed = asyncio.Event()

        def publish(pool: str, endpoints: frozenset[Endpoint]) -> None:
            state[pool] = endpoints
            changed.set()

        api_client, default_namespace = await connect(self._settings.kubernetes)
        from kubernetes.aio.client import DiscoveryV1Api

        api = DiscoveryV1Api(api_client)
        tasks: list[asyncio.Task[None]] = []
        try:
            for pool in pools:
                if pool.kubernetes is None:
                    continue
                watch = EndpointSliceWatch(
                    pool.name, pool.kubernetes, pool.kubernetes.namespace or default_namespace,
                    api, self._settings.kubernetes, publish, self._metrics,
                )
                self.watches[pool.name] = watch
                if self._metrics is not None:
                    self._metrics.track_staleness(pool.name, watch.staleness)
                tasks.append(asyncio.create_task(watch.run(), name=f"discovery-{pool.name}"))
                log.info("pool %s: watching EndpointSlices of Service %s/%s, port %s",
                         pool.name, watch.namespace, watch.service, pool.kubernetes.port)
            if state:
                yield dict(state)
            while True:
                await changed.wait()
                changed.clear()
                yield dict(state)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await api_client.close()
