"""Kubernetes discovery: the real ``kubernetes.aio`` client against the API-server double.

Each test starts a real balancer whose pool names Service ``llm/vllm`` and changes the
Service's EndpointSlices in the double, as the EndpointSlice controller would during
scale-ups, rollouts and pod deaths, or breaks the API server, and checks what the router sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from balancer import app as balancer_app
from balancer.endpoints import Endpoint
from balancer.ring import hash_key
from tests.apiserver import ApiServer, discovery_settings, endpoint, endpoint_slice, eventually

KEYS = [hash_key(f"conversation-{i}") for i in range(2000)]
FRESH = 0.5
"""Seconds of staleness that count as current: the double sends a bookmark every 0.1 s."""


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer.running(bookmark_interval=0.1) as server:
        yield server


def pool(run):
    return run.balancer.router.pools["llama"]


def routable(run) -> set[str]:
    return set(pool(run).routable)


def owners(run) -> list[str | None]:
    """The first endpoint of each test key on the ring."""
    ring = pool(run).ring
    return [ring.first(k) for k in KEYS]


def watch(run):
    return run.balancer.source.watches["llama"]


async def test_the_initial_list_gives_the_services_endpoints(api, start_balancer, tmp_path):
    """Ready pods are routable with their pod name as id, address and named port as URL,
    and zone and node kept; a pod that is not serving is left out."""
    api.apply(endpoint_slice("vllm-a", [
        endpoint("vllm-0", "10.0.0.1", zone="zone-a", node="node-1"),
        endpoint("vllm-1", "10.0.0.2", zone="zone-b", node="node-2"),
        endpoint("vllm-2", "10.0.0.3", ready=False),
    ], port=8000))
    run = await start_balancer(discovery_settings(api, tmp_path))
    assert pool(run).endpoints == {
        "vllm-0": Endpoint("vllm-0", "http://10.0.0.1:8000", "zone-a", True, "node-1"),
        "vllm-1": Endpoint("vllm-1", "http://10.0.0.2:8000", "zone-b", True, "node-2"),
    }
    assert run.balancer.router.ready()
    assert await run.metric("balancer_discovery_relists_total", reason="initial") == 1


async def test_endpoints_added_removed_and_moved_follow_the_watch(api, start_balancer, tmp_path):
    """Scaling up and down changes the ring; a pod that only changed address keeps its
    identity and ring position, with the new URL."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]))
    run = await start_balancer(discovery_settings(api, tmp_path))
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                        endpoint("vllm-1", "10.0.0.2")]))
    await eventually(lambda: routable(run) == {"vllm-0", "vllm-1"})
    before = owners(run)
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                        endpoint("vllm-1", "10.0.0.9")]))
    await eventually(lambda: pool(run).endpoints["vllm-1"].url == "http://10.0.0.9:8000")
    assert owners(run) == before
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-1", "10.0.0.9")]))
    await eventually(lambda: routable(run) == {"vllm-1"})
    assert await run.metric("balancer_discovery_events_total", type="modified") == 3


async def test_a_modification_that_changes_nothing_routable_leaves_the_ring(
        api, start_balancer, tmp_path):
    """Level-triggered: an event that changes only fields balancer ignores (here the
    hostname and a label) publishes nothing and moves no key."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                        endpoint("vllm-1", "10.0.0.2")]))
    run = await start_balancer(discovery_settings(api, tmp_path))
    applied = []
    original = run.balancer.router.apply
    run.balancer.router.apply = lambda snapshot: applied.append(snapshot) or original(snapshot)
    changed = endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                        endpoint("vllm-1", "10.0.0.2")])
    changed["endpoints"][0]["hostname"] = "vllm-0"
    changed["metadata"]["labels"]["team"] = "inference"
    rv = api.apply(changed)
    await eventually(lambda: watch(run).resource_version == str(rv))
    await asyncio.sleep(0.05)  # room for a (wrong) snapshot to reach the router
    assert applied == []


async def test_ready_then_not_ready_then_ready_again(api, start_balancer, tmp_path):
    """A pod failing its readiness probe leaves the ring; back to ready it takes exactly its
    old keys back."""
    pods = [endpoint(f"vllm-{i}", f"10.0.0.{i + 1}") for i in range(4)]
    api.apply(endpoint_slice("vllm-a", pods))
    run = await start_balancer(discovery_settings(api, tmp_path))
    before = owners(run)
    pods[2] = endpoint("vllm-2", "10.0.0.3", ready=False)
    api.apply(endpoint_slice("vllm-a", pods))
    await eventually(lambda: "vllm-2" not in routable(run))
    assert "vllm-2" not in pool(run).endpoints
    after = owners(run)
    assert all(a == b for b, a in zip(before, after, strict=True) if b != "vllm-2")
    pods[2] = endpoint("vllm-2", "10.0.0.3", ready=True)
    api.apply(endpoint_slice("vllm-a", pods))
    await eventually(lambda: "vllm-2" in routable(run))
    assert owners(run) == before


async def test_a_terminating_pod_drains(api, start_balancer, tmp_path):
    """A serving, terminating pod stays known as draining (no new requests); once it stops
    serving it is gone."""
    pods = [endpoint("vllm-0", "10.0.0.1"), endpoint("vllm-1", "10.0.0.2")]
    api.apply(endpoint_slice("vllm-a", pods))
    run = await start_balancer(discovery_settings(api, tmp_path))
    api.apply(endpoint_slice("vllm-a", [
        pods[0], endpoint("vllm-1", "10.0.0.2", ready=False, serving=True, terminating=True)]))
    await eventually(lambda: routable(run) == {"vllm-0"})
    assert pool(run).endpoints["vllm-1"].serving is False
    assert await run.metric("balancer_pool_endpoints", state="draining") == 1
    api.apply(endpoint_slice("vllm-a", [
        pods[0], endpoint("vllm-1", "10.0.0.2", ready=False, serving=False, terminating=True)]))
    await eventually(lambda: "vllm-1" not in pool(run).endpoints)


async def test_a_service_spread_over_several_slices(api, start_balancer, tmp_path):
    """All slices of the Service are merged; a pod moving between slices is one endpoint
    throughout; deleting a slice removes only its endpoints; other Services are ignored."""
    api.apply(endpoint_slice("vllm-a", [endpoint(f"vllm-{i}", f"10.0.0.{i}") for i in range(3)]))
    api.apply(endpoint_slice("vllm-b", [endpoint(f"vllm-{i}", f"10.0.0.{i}")
                                        for i in range(3, 6)]))
    api.apply(endpoint_slice("vllm-v6", [endpoint("vllm-6", "fd00::6")], address_type="IPv6"))
    api.apply(endpoint_slice("other-a", [endpoint("other-0", "10.0.9.9")], service="other"))
    api.apply(endpoint_slice("vllm-x", [endpoint("x-0", "10.0.8.8")], namespace="elsewhere"))
    run = await start_balancer(discovery_settings(api, tmp_path))
    assert routable(run) == {f"vllm-{i}" for i in range(7)}
    assert pool(run).endpoints["vllm-6"].url == "http://[fd00::6]:8000"
    # vllm-2 moves from slice a to slice b: for a moment it is in both.
    api.apply(endpoint_slice("vllm-b", [endpoint(f"vllm-{i}", f"10.0.0.{i}")
                                        for i in range(2, 6)]))
    api.apply(endpoint_slice("vllm-a", [endpoint(f"vllm-{i}", f"10.0.0.{i}") for i in range(2)]))
    rv = api.delete("llm", "vllm-v6")
    await eventually(lambda: watch(run).resource_version == str(rv))
    assert routable(run) == {f"vllm-{i}" for i in range(6)}
    api.delete("llm", "vllm-a")
    await eventually(lambda: routable(run) == {f"vllm-{i}" for i in range(2, 6)})


async def test_410_gone_relists_with_no_lost_or_stale_endpoint(api, start_balancer, tmp_path):
    """Changes made while the watch was away, then compacted, arrive through a new LIST
    after the 410: the added pod is there, the removed one is gone."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                        endpoint("vllm-1", "10.0.0.2")]))
    run = await start_balancer(discovery_settings(api, tmp_path))
    await eventually(lambda: watch(run).staleness() < FRESH)
    # The watch ends; before the client comes back, the Service changes and etcd compacts.
    api.close_watches()
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-1", "10.0.0.2"),
                                        endpoint("vllm-2", "10.0.0.3")]))
    api.compact()
    await eventually(lambda: routable(run) == {"vllm-1", "vllm-2"})
    assert set(pool(run).endpoints) == {"vllm-1", "vllm-2"}
    assert await run.metric("balancer_discovery_errors_total", reason="expired") == 1
    assert await run.metric("balancer_discovery_relists_total", reason="expired") == 1


async def test_a_watch_closed_by_the_server_resumes_from_its_resource_version(
        api, start_balancer, tmp_path):
    """Watches cut short by the server reconnect from the last resourceVersion seen: no
    re-LIST, no lost event."""
    api.max_watch_seconds = 0.2
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]))
    run = await start_balancer(discovery_settings(api, tmp_path))
    for i in range(1, 6):
        api.apply(endpoint_slice("vllm-a", [endpoint(f"vllm-{j}", f"10.0.0.{j + 1}")
                                            for j in range(i + 1)]))
        await asyncio.sleep(0.1)
    # Generous bounds: this checks how watches resume, not how fast (lag is measured by the
    # churn test), and a loaded CI machine can stretch the 0.2 s watches.
    await eventually(lambda: len(routable(run)) == 6, timeout=20)
    await eventually(lambda: sum(1 for r in api.requests if r.get("watch")) >= 4, timeout=20)
    watches = [r for r in api.requests if r.get("watch")]
    lists = [r for r in api.requests if not r.get("watch")]
    assert len(lists) == 1
    versions = [int(r["resourceVersion"]) for r in watches]
    assert versions == sorted(versions) and versions[0] == 2
    assert all(r["allowWatchBookmarks"] == "true" and int(r["timeoutSeconds"]) <= 240
               for r in watches)


async def test_bookmarks_keep_a_quiet_watch_resumable_after_compaction(
        api, start_balancer, tmp_path):
    """While other Services churn, bookmarks move the resourceVersion forward, so a
    reconnect after compaction resumes instead of failing with 410."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]))
    run = await start_balancer(discovery_settings(api, tmp_path))
    for i in range(20):
        api.apply(endpoint_slice("other-a", [endpoint(f"o-{i}", "10.0.9.9")], service="other"))
    await eventually(lambda: watch(run).resource_version == str(api.rv))
    api.compact()
    api.close_watches()
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                        endpoint("vllm-1", "10.0.0.2")]))
    await eventually(lambda: routable(run) == {"vllm-0", "vllm-1"})
    assert await run.metric("balancer_discovery_events_total", type="bookmark") >= 1
    assert await run.metric("balancer_discovery_errors_total") == 0
    assert await run.metric("balancer_discovery_relists_total") == 1


async def test_api_server_down_keeps_routing_then_recovers(api, start_balancer, tmp_path):
    """With the API server gone the last endpoints stay (never zero), the staleness metric
    grows and errors are counted; when it returns, changes made meanwhile arrive."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                        endpoint("vllm-1", "10.0.0.2")]))
    run = await start_balancer(discovery_settings(api, tmp_path))
    await api.stop()
    seen = []
    async with asyncio.timeout(5):
        while await run.metric("balancer_discovery_errors_total") < 3:
            seen.append(frozenset(routable(run)))
            await asyncio.sleep(0.02)
    assert set(seen) == {frozenset({"vllm-0", "vllm-1"})}
    assert await run.metric("balancer_discovery_staleness_seconds", pool="llama") > 0
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-1", "10.0.0.2"),
                                        endpoint("vllm-2", "10.0.0.3")]))
    await api.start()
    await eventually(lambda: routable(run) == {"vllm-1", "vllm-2"})
    await eventually(lambda: watch(run).staleness() < FRESH)
    assert await run.metric("balancer_discovery_relists_total", reason="error") >= 1


async def test_a_silent_watch_is_noticed_resumed_and_shows_in_staleness(
        api, start_balancer, tmp_path):
    """The API server stops sending mid-watch but keeps the connection open: within
    watch_idle_timeout discovery gives the watch up and resumes it from its resourceVersion
    (no LIST), so the change made meanwhile arrives; the staleness metric rises while the
    watch is silent and drops once the new watch speaks."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]))
    run = await start_balancer(discovery_settings(api, tmp_path, watch_idle_timeout=0.5))
    await eventually(lambda: api.open_watches == 1)
    watches_before = sum(1 for r in api.requests if r.get("watch"))
    version = watch(run).resource_version
    api.stall()
    stalled_at = time.perf_counter()
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                        endpoint("vllm-1", "10.0.0.2")]))
    peak = 0.0
    async with asyncio.timeout(10):
        while routable(run) != {"vllm-0", "vllm-1"}:
            peak = max(peak, await run.metric("balancer_discovery_staleness_seconds",
                                              pool="llama"))
            await asyncio.sleep(0.02)
    assert peak >= 0.3  # silent for ~0.5 s; polled every 20 ms
    resumed = [(t, r) for t, r in zip(api.request_times, api.requests, strict=True)
               if r.get("watch")][watches_before:]
    first_at, first = resumed[0]
    # Noticed after 0.5 s of silence (the last bookmark came up to 0.1 s before the stall,
    # then one short back-off);
    # the upper bound is generous for a loaded machine.
    assert 0.3 <= first_at - stalled_at < 3
    assert first["resourceVersion"] == version
    assert sum(1 for r in api.requests if not r.get("watch")) == 1
    assert await run.metric("balancer_discovery_errors_total", reason="silent") == 1
    await eventually(lambda: watch(run).staleness() < FRESH)
    assert await run.metric("balancer_discovery_staleness_seconds", pool="llama") < FRESH


async def test_a_throttled_list_waits_for_retry_after_then_recovers(
        api, start_balancer, tmp_path):
    """A 429 with Retry-After: 1 on the LIST after a 410 is honoured: the next LIST comes no
    sooner than 1 s later (back-off alone would have waited 0.05-0.1 s), is counted as
    throttled, and brings the view up to date."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]))
    run = await start_balancer(discovery_settings(api, tmp_path, backoff_max=5))
    await eventually(lambda: api.open_watches == 1)
    api.refuse("list", 429, retry_after="1")
    api.close_watches()
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-1", "10.0.0.2")]))
    api.compact()
    await eventually(lambda: routable(run) == {"vllm-1"}, timeout=10)
    lists = [t for t, r in zip(api.request_times, api.requests, strict=True)
             if not r.get("watch")]
    assert len(lists) == 3  # initial, refused, retried
    assert 0.95 <= lists[2] - lists[1] < 4  # 1-1.2 s asked; generous above
    assert await run.metric("balancer_discovery_errors_total", reason="throttled") == 1
    assert await run.metric("balancer_discovery_relists_total", reason="error") == 1


async def test_a_watch_refused_with_503_and_retry_after_resumes_without_a_list(
        api, start_balancer, tmp_path):
    """An API server shedding load (503 with Retry-After) on the watch is asked again after
    the delay, from the same resourceVersion, without a LIST."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]))
    run = await start_balancer(discovery_settings(api, tmp_path, backoff_max=5))
    await eventually(lambda: api.open_watches == 1)
    api.refuse("watch", 503, retry_after="1")
    api.close_watches()
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-2", "10.0.0.3")]))
    await eventually(lambda: routable(run) == {"vllm-2"}, timeout=10)
    watches = [(t, r) for t, r in zip(api.request_times, api.requests, strict=True)
               if r.get("watch")]
    (refused_at, refused), (retried_at, retried) = watches[-2:]
    assert 0.95 <= retried_at - refused_at < 4
    assert retried["resourceVersion"] == refused["resourceVersion"]
    assert sum(1 for r in api.requests if not r.get("watch")) == 1
    assert await run.metric("balancer_discovery_errors_total", reason="throttled") == 1


async def test_api_errors_back_off_and_keep_the_endpoints(api, start_balancer, tmp_path):
    """An API server answering 500 is retried with growing delays, not hammered, and the
    endpoints stay; the first LIST after it recovers brings the view up to date."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]))
    run = await start_balancer(discovery_settings(api, tmp_path, backoff_initial=0.1,
                                                  backoff_max=0.4))
    api.fail_status = 500
    api.close_watches()
    loop = asyncio.get_running_loop()
    started, count = loop.time(), len(api.requests)
    await asyncio.sleep(1.0)
    failed = len(api.requests) - count
    # Delays of 0.05-0.1, 0.1-0.2, then 0.2-0.4 s: at most ~7 tries in a second.
    assert 2 <= failed <= 8, failed
    assert routable(run) == {"vllm-0"}
    assert await run.metric("balancer_discovery_errors_total", reason="http") >= 2
    api.fail_status = None
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-3", "10.0.0.4")]))
    await eventually(lambda: routable(run) == {"vllm-3"})
    assert loop.time() - started < 5


async def test_a_pod_replaced_by_a_new_pod_at_the_same_ip(api, start_balancer, tmp_path):
    """A new pod reusing a dead pod's address is a new endpoint (its cache is empty): the
    old one's keys move to it and to others, no other key moves."""
    api.apply(endpoint_slice("vllm-a", [endpoint(f"vllm-{i}", f"10.0.0.{i}") for i in range(4)]))
    run = await start_balancer(discovery_settings(api, tmp_path))
    before = owners(run)
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.0"),
                                        endpoint("vllm-1", "10.0.0.1"),
                                        endpoint("vllm-9", "10.0.0.2"),
                                        endpoint("vllm-3", "10.0.0.3")]))
    await eventually(lambda: "vllm-9" in routable(run))
    assert "vllm-2" not in pool(run).endpoints
    assert pool(run).endpoints["vllm-9"].url == "http://10.0.0.2:8000"
    after = owners(run)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    assert moved and all(b == "vllm-2" or a == "vllm-9" for b, a in moved)


async def test_a_periodic_relist_runs_as_a_safety_net(api, start_balancer, tmp_path):
    """Every relist_interval the view is listed again, and watches never outlive it."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]))
    run = await start_balancer(discovery_settings(api, tmp_path, relist_interval=0.3))
    async with asyncio.timeout(5):
        while await run.metric("balancer_discovery_relists_total", reason="periodic") < 1:
            await asyncio.sleep(0.05)
    assert all(int(r["timeoutSeconds"]) == 1 for r in api.requests if r.get("watch"))
    assert routable(run) == {"vllm-0"}


async def test_the_namespace_defaults_to_the_kubeconfig_contexts(api, start_balancer, tmp_path):
    """A pool without a namespace watches the namespace of the kubeconfig's context."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")], namespace="default"))
    run = await start_balancer(discovery_settings(api, tmp_path, namespace=""))
    assert routable(run) == {"vllm-0"}
    assert watch(run).namespace == "default"


async def test_a_port_given_by_number_is_used_as_is(api, start_balancer, tmp_path):
    """port: 9000 ignores the slice's port names."""
    api.apply(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")], port=8000))
    run = await start_balancer(discovery_settings(api, tmp_path, port=9000))
    assert pool(run).endpoints["vllm-0"].url == "http://10.0.0.1:9000"


async def test_an_unusable_kubeconfig_stops_the_balancer(tmp_path):
    """Discovery that cannot even start is fatal (the container restarts and says why),
    rather than a balancer that stays unready in silence."""
    api = ApiServer()
    settings = discovery_settings(api, tmp_path)
    (tmp_path / "kubeconfig").write_text("not: [a, kubeconfig")
    balancer = balancer_app.build(settings)
    running = await balancer_app.start(balancer, host="127.0.0.1", port=0, admin_port=0)
    try:
        await asyncio.wait_for(balancer.failed.wait(), 5)
    finally:
        await running.stop()
