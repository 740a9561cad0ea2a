"""Discovery figures: watch-event → ring-update lag, keys moved by a scale-up, and agreement
between two balancer replicas, measured against the API-server double.

    .venv/bin/python -m tests.k8s.figures            # 500 endpoints, 50 events/s, 10 s

The tests in ``tests/integration/test_discovery_load.py`` run the same functions with
smaller numbers and generous bounds; this prints the figures for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from balancer import app as balancer_app
from balancer.config import Settings
from balancer.ring import hash_key
from balancer.router import Pool
from tests.apiserver import ApiServer, discovery_settings, endpoint, endpoint_slice, eventually


def pod_ip(i: int) -> str:
    return f"10.1.{i // 250}.{i % 250 + 1}"


def service_slices(pods: int, per_slice: int, ready: Callable[[int], bool] = lambda i: True
                   ) -> list[dict[str, Any]]:
    """The EndpointSlices of a Service of ``pods`` pods, ``per_slice`` per slice (the
    controller's default is 100)."""
    return [
        endpoint_slice(f"vllm-{start // per_slice}", [
            endpoint(f"vllm-{i}", pod_ip(i), ready=ready(i))
            for i in range(start, min(start + per_slice, pods))])
        for start in range(0, pods, per_slice)
    ]


class RingWatcher:
    """Records when each endpoint joined or left a pool's ring, by wrapping the router."""

    def __init__(self, balancer: balancer_app.Balancer, pool: str = "llama") -> None:
        self.changes: dict[str, list[tuple[float, bool]]] = {}
        router = balancer.router
        original = router.apply

        def apply(snapshot: Any) -> list[str]:
            before = set(router.pools[pool].routable)
            changed = original(snapshot)
            after = set(router.pools[pool].routable)
            now = time.perf_counter()
            for endpoint_id in before ^ after:
                self.changes.setdefault(endpoint_id, []).append((now, endpoint_id in after))
            return changed

        router.apply = apply  # type: ignore[method-assign]

    def lag(self, endpoint_id: str, routable: bool, since: float) -> float | None:
        for at, state in self.changes.get(endpoint_id, ()):
            if at >= since and state == routable:
                return at - since
        return None


async def churn(api: ApiServer, balancer: balancer_app.Balancer, *, pods: int, per_slice: int,
                rate: float, events: int) -> list[float]:
    """Flip one pod's readiness per event, ``rate`` events a second, each event rewriting its
    whole slice as the EndpointSlice controller does; returns each event's lag from the
    change in the API server to the ring update. Pods flip in an order that spreads over
    the slices, each at most once, so every event is a real ring change."""
    watcher = RingWatcher(balancer)
    loop = asyncio.get_running_loop()
    ready = dict.fromkeys(range(pods), True)
    flipped: list[tuple[int, float]] = []
    start = loop.time()
    for k in range(events):
        i = (k * 7919) % pods  # a prime stride visits every pod once before repeating
        ready[i] = not ready[i]
        base = (i // per_slice) * per_slice
        api.apply(endpoint_slice(f"vllm-{i // per_slice}", [
            endpoint(f"vllm-{j}", pod_ip(j), ready=ready[j])
            for j in range(base, min(base + per_slice, pods))]))
        flipped.append((i, api.events[-1].at))
        await asyncio.sleep(max(0.0, start + (k + 1) / rate - loop.time()))
    pool = balancer.router.pools["llama"]
    expected = {f"vllm-{i}" for i in range(pods) if ready[i]}
    await eventually(lambda: set(pool.routable) == expected, timeout=10)
    lags = []
    for i, at in flipped:
        lag = watcher.lag(f"vllm-{i}", ready[i], at)
        assert lag is not None, f"vllm-{i} never reached its state"
        lags.append(lag)
    return lags


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def agreement(a: Pool, b: Pool, keys: int = 10_000) -> float:
    """Share of keys whose first choice is the same endpoint in both pools."""
    same = sum(a.choose(hash_key(f"key-{i}")).endpoint == b.choose(hash_key(f"key-{i}")).endpoint
               for i in range(keys))
    return same / keys


def first_choices(pool: Pool, keys: int = 10_000) -> list[str]:
    return [pool.choose(hash_key(f"key-{i}")).endpoint for i in range(keys)]


async def _main(pods: int, rate: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as directory:
        async with ApiServer.running(bookmark_interval=1.0) as api:
            settings = discovery_settings(api, Path(directory))
            await _lag(api, settings, pods, rate, seconds)
            api.objects.clear()
            await _agreement(api, settings)


async def _start(settings: Settings) -> tuple[balancer_app.Balancer, balancer_app.Running]:
    balancer = balancer_app.build(settings, registry=CollectorRegistry())
    return balancer, await balancer_app.start(balancer, host="127.0.0.1", port=0, admin_port=0)


async def _lag(api: ApiServer, settings: Settings, pods: int, rate: float,
               seconds: float) -> None:
    for item in service_slices(pods, 100):
        api.apply(item)
    balancer, running = await _start(settings)
    await eventually(lambda: len(balancer.router.pools["llama"].routable) == pods, 30)
    lags = await churn(api, balancer, pods=pods, per_slice=100, rate=rate,
                       events=int(rate * seconds))
    await running.stop()
    print(f"lag, watch event -> ring update, {pods} endpoints, {rate:g} events/s, "
          f"{len(lags)} events: p50 {statistics.median(lags) * 1000:.1f} ms, "
          f"p99 {percentile(lags, 0.99) * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms")


async def _agreement(api: ApiServer, settings: Settings) -> None:
    for item in service_slices(8, 100):
        api.apply(item)
    runs = [await _start(settings) for _ in range(2)]
    pools = [balancer.router.pools["llama"] for balancer, _ in runs]
    await eventually(lambda: all(len(p.routable) == 8 for p in pools))
    before = first_choices(pools[0])
    print(f"agreement of two replicas, 8 endpoints, 10000 keys: "
          f"{agreement(*pools) * 100:.2f}%")
    for item in service_slices(9, 100):
        api.apply(item)
    await eventually(lambda: all(len(p.routable) == 9 for p in pools))
    after = first_choices(pools[0])
    moved = sum(x != y for x, y in zip(before, after, strict=True))
    to_new = sum(x != y and y == "vllm-8" for x, y in zip(before, after, strict=True))
    print(f"keys moved when a 9th pod joins 8: {moved / len(before) * 100:.2f}% "
          f"(ideal 1/9 = 11.11%; {to_new} of {moved} to the new pod)")
    print(f"agreement of two replicas, 9 endpoints, 10000 keys: "
          f"{agreement(*pools) * 100:.2f}%")
    for _, running in runs:
        await running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(_main(args.pods, args.rate, args.seconds))


if __name__ == "__main__":
    main()
