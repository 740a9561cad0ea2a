"""Series labelled by endpoint leave with their endpoints: over 100 rollouts, /metrics stays
the same size.

Each generation is a new set of pods at new addresses (two model-server doubles and one
address nobody listens on), replacing the last through discovery, with traffic that creates
every kind of endpoint series: a stream with usage, a whole answer, a refused connection
(an upstream error, an ejection, a retry). Only the live generation's series may remain.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

from prometheus_client import generate_latest

from balancer.config import LoadSettings, RetrySettings
from balancer.discovery import QueueDiscovery
from balancer.endpoints import static_endpoint
from loadtest.procs import free_port
from tests.conftest import make_settings
from tests.integration.test_endpoint_lifecycle import body_for

GENERATIONS = 100
SETTLED = 10
"""Generations after which every pool-labelled series has appeared."""
CHAT = "/v1/chat/completions"
ENDPOINT_LABEL = re.compile(r'endpoint="([^"]*)"')


async def test_a_hundred_generations_of_pods_leave_the_exposition_flat(
        upstreams, start_balancer):
    """Only the live generation's endpoints label any series, and the exposition stops
    growing once every pool-labelled series has appeared."""
    source = QueueDiscovery()
    # A retry per generation: more than the default budget's floor of 10 per 10 s.
    # No load polls: whether one fails (a departed pod, the dead one) is a matter of timing,
    # and its pool-labelled error series would appear in whichever generation it happens.
    settings = replace(make_settings(["http://127.0.0.1:1"]),
                       retries=RetrySettings(budget_min_retries=10 * GENERATIONS),
                       load=LoadSettings(poll_interval=0.0))
    run = await start_balancer(settings, source=source)
    registry = run.balancer.metrics.registry
    pool = run.balancer.router.pools["llama"]
    sizes: list[int] = []
    previous = []
    for generation in range(GENERATIONS):
        a, b = await upstreams(2)
        dead = f"http://127.0.0.1:{free_port()}"
        endpoints = frozenset(static_endpoint(u) for u in (a.url, b.url, dead))
        ids = {e.id for e in endpoints}
        source.push({"llama": endpoints})
        async with asyncio.timeout(5):
            while set(pool.endpoints) != ids:
                await asyncio.sleep(0.005)
        for old in previous:  # the old pods are gone
            assert old.server is not None
            await old.server.close()
        previous = [a, b]

        stream = body_for(run, a.endpoint_id, stream=True,
                          stream_options={"include_usage": True})
        async with run.http.post(run.url + CHAT, json=stream) as r:
            assert r.status == 200
            await r.read()
        async with run.http.post(run.url + CHAT, json=body_for(run, b.endpoint_id)) as r:
            assert r.status == 200
        dead_id = static_endpoint(dead).id
        async with run.http.post(run.url + CHAT, json=body_for(run, dead_id)) as r:
            assert r.status == 200  # refused, ejected, retried on a live pod
        await run.wait_idle()
        assert dead_id in pool.out

        text = generate_latest(registry).decode()
        labelled = set(ENDPOINT_LABEL.findall(text))
        assert labelled <= ids, f"generation {generation}: {sorted(labelled - ids)} linger"
        assert {a.endpoint_id, b.endpoint_id} <= labelled
        assert set(pool.states) == ids and pool.ring.members <= ids
        sizes.append(text.count("\n"))

    print(f"\nFIGURE series over {GENERATIONS} generations: first {sizes[0]} lines, "
          f"max of the first {SETTLED} {max(sizes[:SETTLED])}, "
          f"range after {min(sizes[SETTLED:])}..{max(sizes[SETTLED:])}")
    # Removal works: without it each generation would add some 40 lines.
    assert max(sizes[SETTLED:]) <= max(sizes[:SETTLED])
    assert max(sizes[SETTLED:]) - min(sizes[SETTLED:]) <= 4
    assert await run.metric("balancer_endpoint_ejections_total") == 1  # the live one's
