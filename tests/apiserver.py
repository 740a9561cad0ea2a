"""A Kubernetes API-server double serving EndpointSlices on 127.0.0.1.

No kube-apiserver can run in the test environment, and the doubles on PyPI ignore label
selectors and resourceVersions, which are exactly what discovery depends on. This one keeps
the semantics the real client meets:

- LIST with label selectors (``a=b``, ``a!=b``, ``a``, ``!a``) and a monotonic
  resourceVersion shared by all objects;
- WATCH from a resourceVersion, replaying every later event first; without one (or ``0``), a
  synthetic ADDED per object; ``timeoutSeconds``; BOOKMARKs when ``allowWatchBookmarks``;
- an ERROR event with a 410 ``Status`` for a resourceVersion older than the last
  :meth:`ApiServer.compact`;
- a server-side cap on a watch's life (``max_watch_seconds``), :meth:`close_watches`, an
  outage mode answering every request with one status, and :meth:`stop`/:meth:`start` on the
  same port (connection refused in between);
- :meth:`stall`: open watches go silent, the connection held open, as a hung API server or
  a half-dead TCP path looks to the client; :meth:`refuse`: the next requests answered with
  ``429`` (or another status) and ``Retry-After``, as API Priority and Fairness does;
- booleans parsed the way Go does (the client sends ``watch=True``), and a bearer token.

Every event records when it happened (``events``), so tests can measure how long discovery
takes to act on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from balancer.config import (
    HealthSettings,
    KubernetesPoolSettings,
    KubernetesSettings,
    PoolSettings,
    Settings,
    validate,
)
from tests.conftest import MODEL

TOKEN = "test-token"
PROXY_VARIABLES = [f"{name}_proxy" for name in ("http", "https", "all")]
PROXY_VARIABLES += [name.upper() for name in PROXY_VARIABLES]
PATH = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
             "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def go_bool(value: str | None) -> bool:
    """strconv.ParseBool, as the API server reads query booleans."""
    if value is None or value == "":
        return False
    if value not in _GO_BOOLS:
        raise web.HTTPBadRequest(text=f"invalid boolean {value!r}")
    return _GO_BOOLS[value]


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass
class Event:
    rv: int
    type: str
    obj: dict[str, Any]
    at: float
    """``time.perf_counter()`` when the change happened (uvloop's clock ticks in ms)."""


@dataclass(eq=False)
class _Watcher:
    namespace: str
    selector: str
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    stalled: bool = False

    def wants(self, obj: dict[str, Any]) -> bool:
        metadata = obj["metadata"]
        return (metadata["namespace"] == self.namespace
                and selector_matches(self.selector, metadata.get("labels") or {}))


class ApiServer:
    def __init__(self, *, bookmark_interval: float | None = None,
                 max_watch_seconds: float | None = None) -> None:
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.rv = 1
        self.events: list[Event] = []
        self.compacted = 0
        self.fail_status: int | None = None
        """Answer every request with this status (an outage), when set."""
        self.requests: list[dict[str, str]] = []
        """Query parameters of every request, in order."""
        self.request_times: list[float] = []
        """``time.perf_counter()`` of every request, in the order of ``requests``."""
        self._refusals: list[tuple[str, int, str | None]] = []
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- changing the cluster ------------------------------------------------------------------

    def apply(self, obj: dict[str, Any]) -> int:
        """Create or replace an object (ADDED or MODIFIED); returns its resourceVersion."""
        obj = copy.deepcopy(obj)
        metadata = obj["metadata"]
        key = (metadata.setdefault("namespace", "default"), metadata["name"])
        kind = "MODIFIED" if key in self.objects else "ADDED"
        self.objects[key] = obj
        return self._emit(kind, obj)

    def delete(self, namespace: str, name: str) -> int:
        return self._emit("DELETED", self.objects.pop((namespace, name)))

    def compact(self) -> None:
        """Forget every event so far, as etcd compaction does: watching from an older
        resourceVersion gets 410 Gone."""
        self.compacted = self.rv
        self.events.clear()

    @property
    def open_watches(self) -> int:
        """Watches being served now (a test waits for one before breaking it)."""
        return len(self._watchers)

    def stall(self) -> None:
        """Open watches send nothing more, neither events nor bookmarks, and stay open until
        the client closes them (or :meth:`close_watches`). Later watches work normally."""
        for watcher in self._watchers:
            watcher.stalled = True

    def refuse(self, kind: str = "list", status: int = 429, retry_after: str | None = "1",
               count: int = 1) -> None:
        """Answer the next ``count`` requests of ``kind`` (``list``, ``watch`` or ``any``)
        with ``status`` and a ``Retry-After`` header (none when None)."""
        self._refusals.extend([(kind, status, retry_after)] * count)

    def close_watches(self) -> None:
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)

    def _emit(self, kind: str, obj: dict[str, Any]) -> int:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        event = Event(self.rv, kind, copy.deepcopy(obj), time.perf_counter())
        self.events.append(event)
        for watcher in self._watchers:
            if watcher.wants(obj):
                watcher.queue.put_nowait(event)
        return self.rv

    # -- serving -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1 (on the same port as before after a stop)."""
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Go away: close every watch and the listening socket."""
        self.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, **options: Any) -> AsyncIterator[ApiServer]:
        """A started server, stopped on exit (the body of a pytest fixture).

        The Kubernetes client honours proxy variables (``trust_env``), so they are cleared
        while it runs: a proxy set on the host must not see requests meant for 127.0.0.1.
        """
        saved = {name: os.environ.pop(name) for name in PROXY_VARIABLES if name in os.environ}
        server = cls(**options)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
            os.environ.update(saved)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, directory: Path, namespace: str = "default") -> Path:
        """A kubeconfig file pointing at this server, with a bearer token."""
        path = directory / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": TOKEN}}],
            "contexts": [{"name": "double", "context": {
                "cluster": "double", "user": "tester", "namespace": namespace}}],
        }))
        return path

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        self.requests.append(dict(query))
        self.request_times.append(time.perf_counter())
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        kind = "watch" if go_bool(query.get("watch")) else "list"
        for i, (wanted, code, retry_after) in enumerate(self._refusals):
            if wanted in (kind, "any"):
                del self._refusals[i]
                headers = {"Retry-After": retry_after} if retry_after is not None else {}
                return web.json_response(
                    status(code, "TooManyRequests" if code == 429 else "InternalError",
                           "too many requests, please try again later"),
                    status=code, headers=headers)
        if self.fail_status is not None:
            return web.json_response(status(self.fail_status, "InternalError", "outage"),
                                     status=self.fail_status)
        namespace = request.match_info["namespace"]
        watcher = _Watcher(namespace, query.get("labelSelector", ""))
        if go_bool(query.get("watch")):
            return await self._watch(request, watcher)
        items = [obj for obj in self.objects.values() if watcher.wants(obj)]
        return web.json_response({
            "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": sorted(items, key=lambda o: o["metadata"]["name"]),
        })

    async def _watch(self, request: web.Request, watcher: _Watcher) -> web.StreamResponse:
        query = request.query
        since = query.get("resourceVersion", "")
        loop = asyncio.get_running_loop()
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = loop.time() + min(timeout, self.max_watch_seconds or timeout)
        bookmarks = go_bool(query.get("allowWatchBookmarks")) and self.bookmark_interval
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if since not in ("", "0") and int(since) < self.compacted:
            await send("ERROR", status(410, "Expired", f"too old resource version: {since} "
                                                       f"({self.compacted})"))
            return response
        if since in ("", "0"):
            backlog = [Event(self.rv, "ADDED", o, 0) for o in self.objects.values()
                       if watcher.wants(o)]
        else:
            backlog = [e for e in self.events if e.rv > int(since) and watcher.wants(e.obj)]
        self._watchers.add(watcher)
        try:
            for event in backlog:
                await send(event.type, event.obj)
            while (left := deadline - loop.time()) > 0:
                wait = min(left, bookmarks) if bookmarks else left
                try:
                    async with asyncio.timeout(wait):
                        event = await watcher.queue.get()
                except TimeoutError:
                    if watcher.stalled:
                        await self._hang(request, watcher)
                        break
                    # A bookmark promises every event up to its resourceVersion was sent: an
                    # event queued while the wait timed out goes first, or a watch that ends
                    # right after the bookmark would lose it.
                    if not watcher.queue.empty():
                        continue
                    if bookmarks and deadline > loop.time():
                        await send("BOOKMARK", {
                            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                            "metadata": {"resourceVersion": str(self.rv)}})
                    continue
                if event is None:
                    break
                if watcher.stalled:
                    await self._hang(request, watcher)
                    break
                await send(event.type, event.obj)
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self._watchers.discard(watcher)
        return response

    @staticmethod
    async def _hang(request: web.Request, watcher: _Watcher) -> None:
        """Send nothing until the client goes away or :meth:`close_watches`; events that
        arrive meanwhile are dropped, as they would be on a dead connection."""
        while request.transport is not None and not request.transport.is_closing():
            try:
                async with asyncio.timeout(0.05):
                    if await watcher.queue.get() is None:
                        return
            except TimeoutError:
                pass


# -- EndpointSlice objects --------------------------------------------------------------------


def endpoint(pod: str | None, ip: str, *, ready: bool | None = True,
             serving: bool | None = None, terminating: bool | None = None,
             zone: str | None = "zone-a", node: str | None = "node-1") -> dict[str, Any]:
    """One EndpointSlice endpoint; None leaves a field out, as the API allows."""
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving),
                                    ("terminating", terminating)) if v is not None}
    item: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if pod is not None:
        item["targetRef"] = {"kind": "Pod", "namespace": "llm", "name": pod}
    if zone is not None:
        item["zone"] = zone
    if node is not None:
        item["nodeName"] = node
    return item


def endpoint_slice(name: str, endpoints: list[dict[str, Any]], *, service: str = "vllm",
                   namespace: str = "llm", port: int = 8000, port_name: str = "http",
                   address_type: str = "IPv4") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by":
                                    "endpointslice-controller.k8s.io"}},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


# -- balancer side ----------------------------------------------------------------------------


def discovery_settings(api: ApiServer, directory: Path, *, models: tuple[str, ...] = (MODEL,),
                       namespace: str = "llm", port: int | str = "http",
                       **kubernetes: Any) -> Settings:
    """Settings for one pool ``llama`` backed by Service ``vllm`` on the double, with fast
    back-off so outages in tests are short. The kubeconfig is explicit: nothing reads
    ``~/.kube`` or the in-cluster service account. Active health checks are off: the
    endpoints these tests describe (10.0.0.x) exist only in the double, and nothing may be
    sent to them."""
    options = {"backoff_initial": 0.05, "backoff_max": 0.2, **kubernetes}
    return validate(Settings(
        health=HealthSettings(active=False),
        pools=(PoolSettings("llama", models, kubernetes=KubernetesPoolSettings(
            "vllm", port, namespace)),),
        kubernetes=KubernetesSettings(kubeconfig=str(api.kubeconfig(directory)), **options),
    ))


async def eventually(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` is true, polling every 10 ms (bounded, never a fixed
    sleep)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
