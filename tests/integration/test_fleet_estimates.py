"""Two balancer replicas in front of the same simulated pods hold the same picture of each
pod's queue: they read the same pods' reports, and differ only by their own recent traffic."""

from __future__ import annotations

import asyncio
import random
import statistics
from dataclasses import replace

from balancer.config import LoadSettings, validate
from loadtest.simserver import DEFAULT_MODEL, EngineConfig, SimConfig, pod_configs, run_pods
from tests.conftest import make_settings

# Two sequences at a time per pod, 0.05 wall seconds per simulated second: a queue forms.
POD = SimConfig(time_scale=0.05, models=(DEFAULT_MODEL,), engine=EngineConfig(max_num_seqs=2))


def _estimates(run) -> dict[str, float]:
    """Each endpoint's queue estimate, read directly: both replicas run in this process, so
    reading one after the other without awaiting samples them at the same instant."""
    states = run.balancer.router.pools["llama"].states
    return {endpoint_id: state.queue.queued for endpoint_id, state in states.items()}


async def test_two_replicas_agree_on_every_pods_queue(start_balancer):
    async with run_pods(pod_configs(POD, 2)) as pods:
        settings = make_settings([p.url for p in pods], models=(DEFAULT_MODEL,))
        settings = validate(replace(settings, load=LoadSettings(poll_interval=0.1)))
        replicas = [await start_balancer(settings), await start_balancer(settings)]
        rng = random.Random(7)
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                run = replicas[rng.randrange(2)]
                body = {"model": DEFAULT_MODEL, "max_tokens": 16,
                        "messages": [{"role": "user", "content": f"client {i} {rng.random()}"}]}
                async with run.http.post(run.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    await r.read()

        clients = [asyncio.create_task(client(i)) for i in range(12)]
        gaps, peak = [], 0.0
        try:
            await asyncio.sleep(0.5)
            for _ in range(20):
                a, b = _estimates(replicas[0]), _estimates(replicas[1])
                assert set(a) == set(b)
                for endpoint_id in a:
                    gaps.append(abs(a[endpoint_id] - b[endpoint_id]))
                    peak = max(peak, a[endpoint_id], b[endpoint_id])
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
    assert peak >= 3  # the pods did queue: the agreement below is not about empty queues
    # Each replica adds its own unstarted requests to the pod's last report: the two
    # estimates differ by about the other replica's requests since that report.
    assert statistics.median(gaps) <= 2, gaps
    assert sorted(gaps)[int(0.9 * len(gaps))] <= 4, gaps
