"""A pool's zone: its local set kept as endpoints come, go and are ejected, and keyed
requests preferring it (pool ring, queue strategy and a model's subset)."""

from __future__ import annotations

import random
from typing import Any

from prometheus_client import CollectorRegistry

from balancer.config import LoadSettings, LoadSource, PoolSettings, RoutingSettings
from balancer.endpoints import Endpoint
from balancer.load import LoadReport
from balancer.metrics import Metrics
from balancer.ring import hash_key
from balancer.route import explain_zone
from balancer.router import Pool

ZONES = ("zone-a", "zone-b")
KEYS = [hash_key(f"conversation {i}") for i in range(200)]


def ep(i: int, zone: str | None = None, *, serving: bool = True) -> Endpoint:
    """Endpoint ``vllm-i``; by default in zone-a for even i, zone-b for odd i."""
    zone = ZONES[i % 2] if zone is None else zone
    return Endpoint(f"vllm-{i}", f"http://10.0.0.{i}:8000", zone=zone, serving=serving)


def zoned_pool(n: int = 4, *, prefer: bool = True, zone: str = "zone-a",
               settings: PoolSettings | None = None, metrics: Metrics | None = None,
               load: LoadSettings | None = None, **routing: Any) -> Pool:
    routing.setdefault("virtual_nodes", 64)
    pool = Pool(settings or PoolSettings("chat", ("llama",)),
                RoutingSettings(zone=zone, prefer_zone=prefer, **routing),
                random.Random(0), metrics, load)
    pool.set_endpoints(ep(i) for i in range(n))
    return pool


def test_the_local_set_is_the_routable_endpoints_in_the_zone() -> None:
    """Endpoints of the balancer's zone are local and preferred; others are not."""
    pool = zoned_pool(4)
    assert pool.local == {"vllm-0", "vllm-2"}
    assert pool.prefer == pool.local


def test_the_local_set_follows_endpoints_as_they_come_and_go() -> None:
    """A new zone endpoint joins it, a departed one leaves it, a draining one is not in it."""
    pool = zoned_pool(4)
    pool.set_endpoints([ep(0), ep(1), ep(2), ep(3), ep(4)])
    assert pool.local == {"vllm-0", "vllm-2", "vllm-4"}
    pool.set_endpoints([ep(1), ep(2), ep(3), ep(4, serving=False)])
    assert pool.local == {"vllm-2"}
    assert pool.prefer == {"vllm-2"}


def test_an_endpoint_changing_zone_alone_updates_the_local_set() -> None:
    """Same ids and serving states, a new zone: the ring is unchanged, the local set not."""
    pool = zoned_pool(4)
    pool.set_endpoints([ep(0, "zone-b"), ep(1), ep(2), ep(3, "zone-a")])
    assert pool.local == {"vllm-2", "vllm-3"}


def test_ejected_endpoints_leave_the_local_set_and_panic_brings_them_back() -> None:
    """Health taking a zone endpoint out takes it off the preference too; panic mode routes
    to every serving endpoint again, local ones included."""
    pool = zoned_pool(6)
    pool.set_out(frozenset({"vllm-0"}))
    assert pool.local == {"vllm-2", "vllm-4"}
    pool.set_out(frozenset({"vllm-0", "vllm-2", "vllm-4", "vllm-1"}))  # 4 of 6: panic
    assert pool.panic
    assert pool.local == {"vllm-0", "vllm-2", "vllm-4"}


def test_no_preference_when_it_is_off_the_zone_is_empty_or_everything_is_local() -> None:
    """Locality is still known without ``prefer_zone``, but nothing is preferred; a zone
    with no endpoint or with all of them gives no preference either."""
    off = zoned_pool(4, prefer=False)
    assert off.local == {"vllm-0", "vllm-2"} and not off.prefer
    elsewhere = zoned_pool(4, zone="zone-c")
    assert not elsewhere.local and not elsewhere.prefer
    everything = zoned_pool(2)
    everything.set_endpoints([ep(0), ep(2)])
    assert everything.local == {"vllm-0", "vllm-2"} and not everything.prefer


def test_a_pool_without_a_zone_keeps_no_local_set() -> None:
    pool = Pool(PoolSettings("chat", ("llama",)), RoutingSettings(virtual_nodes=64))
    pool.set_endpoints(ep(i) for i in range(4))
    assert not pool.routing.zone and not pool.local and not pool.prefer


def test_idle_keyed_requests_all_stay_in_the_zone() -> None:
    """Every key lands on a local endpoint while the zone is under the bound; pass-through
    requests are not steered."""
    pool = zoned_pool(6)
    chosen = {pool.choose(k).endpoint for k in KEYS}
    assert chosen == {"vllm-0", "vllm-2", "vllm-4"}
    passthrough = {pool.choose(0, keyed=False).endpoint for _ in range(200)}
    assert passthrough - pool.local  # least-request goes anywhere


def test_without_the_preference_keys_spread_over_both_zones() -> None:
    pool = zoned_pool(6, prefer=False)
    chosen = {pool.choose(k).endpoint for k in KEYS}
    assert chosen - pool.local and chosen & pool.local


def test_a_busy_zone_spills_to_the_other_zone() -> None:
    """With the zone's endpoints at the pool-wide bound, keyed requests leave the zone."""
    pool = zoned_pool(4, load_factor=1.0, min_bound=1)
    for endpoint_id in ("vllm-0", "vllm-2"):
        for _ in range(2):
            pool.acquire(pool.choose(0, keyed=False, exclude=frozenset(
                {"vllm-1", "vllm-3", *({"vllm-0", "vllm-2"} - {endpoint_id})})))
    assert pool.total_load == 4  # bound ceil(5 / 4) = 2: the zone is full
    choice = pool.choose(KEYS[0])
    assert choice.endpoint in {"vllm-1", "vllm-3"}
    assert choice.preferred is False and choice.outcome == "overflow"


def test_the_queue_strategy_prefers_the_zone_too() -> None:
    """Routing on the pods' queues (load.source reports) takes the same preference."""
    pool = zoned_pool(6, load=LoadSettings(source=LoadSource.REPORTS))
    choices = [pool.choose(k) for k in KEYS[:50]]
    assert {c.signal for c in choices} == {"queue"}
    assert {c.endpoint for c in choices} <= pool.local


def test_a_models_subset_prefers_its_local_members() -> None:
    """A model only some endpoints serve prefers the local ones among those."""
    pool = zoned_pool(6, settings=PoolSettings("chat", ()))
    pool.set_endpoints_models({f"vllm-{i}": frozenset({"llama"}) for i in range(6)})
    pool.set_endpoints_models({"vllm-2": frozenset({"llama", "lora"}),
                               "vllm-3": frozenset({"llama", "lora"}),
                               "vllm-5": frozenset({"llama", "lora"})})
    pool.models = ("llama", "lora")
    pool._update_subsets()
    subset = pool.subsets["lora"]
    assert subset.prefer == {"vllm-2"}
    assert {pool.choose(k, model="lora").endpoint for k in KEYS} == {"vllm-2"}
    pool.set_out(frozenset({"vllm-2"}))
    assert not pool.subsets["lora"].prefer  # no local member left: no preference


def test_locality_is_counted_per_keyed_request() -> None:
    """``balancer_zone_requests_total`` by pool and locality."""
    registry = CollectorRegistry()
    pool = zoned_pool(4, prefer=False, metrics=Metrics(registry, process=False))
    for endpoint_id in ("vllm-0", "vllm-1", "vllm-3"):
        pool.count_locality(endpoint_id)

    def value(locality: str) -> float | None:
        return registry.get_sample_value("balancer_zone_requests_total",
                                         {"pool": "chat", "locality": locality})

    assert (value("local"), value("remote")) == (1.0, 2.0)


def test_the_explanation_says_whether_the_request_stayed_in_the_zone() -> None:
    pool = zoned_pool(4)
    choice = pool.choose(KEYS[0])
    shown = explain_zone(pool, choice, None, KEYS[0])
    assert shown["zone"] == "zone-a" and shown["local"] is True
    assert shown["preferred"] == ["vllm-0", "vllm-2"]
    assert shown["reason"].startswith("stayed in the zone")
    assert shown["spill"]["this_key"] is False
    off = zoned_pool(4, prefer=False)
    assert "prefer_zone is off" in explain_zone(off, off.choose(KEYS[0]), None,
                                                KEYS[0])["reason"]


def _report_running(pool: Pool, running: dict[str, float]) -> None:
    for endpoint_id in pool.routable:
        pool.assume_report(endpoint_id, LoadReport(waiting=0.0,
                                                   running=running.get(endpoint_id, 0.0)))


BUSY_ZONE = {"vllm-0": 20.0, "vllm-2": 20.0, "vllm-1": 2.0, "vllm-3": 2.0}


def test_a_zone_running_more_than_its_share_raises_its_spill_share() -> None:
    """On queues all empty, the local pods running 20 requests each against the others' 2:
    the zone carries 91% of the work against 55% allowed (1.1 x half), so the first update
    sends (0.5 s x 0.5 x 0.65 excess) 16% of its keys over the whole ring, and these go where
    a pool with no preference sends them."""
    load = LoadSettings(source=LoadSource.REPORTS)
    zoned, plain = zoned_pool(4, load=load), zoned_pool(4, load=load, prefer=False)
    for pool in (zoned, plain):
        _report_running(pool, BUSY_ZONE)
    queues = zoned.queues()
    assert zoned.spill is not None and queues is not None
    zoned.spills(KEYS[0], queues)
    assert zoned.spill.work_share == 40 / 44
    assert 0.15 < zoned.spill.share < 0.17
    spilled = [k for k in KEYS if zoned.spill.spills(k)]
    assert 0.05 < len(spilled) / len(KEYS) < 0.3
    for k in KEYS:
        choice = zoned.choose(k)
        if k in spilled:
            assert choice.endpoint == plain.choose(k).endpoint and choice.preferred is None
        else:
            assert choice.endpoint in zoned.local and choice.preferred is True


def test_a_zone_within_its_share_keeps_its_keys() -> None:
    """The same with the work even (10 running everywhere): no key leaves the zone."""
    pool = zoned_pool(4, load=LoadSettings(source=LoadSource.REPORTS))
    _report_running(pool, dict.fromkeys(("vllm-0", "vllm-1", "vllm-2", "vllm-3"), 10.0))
    assert {pool.choose(k).endpoint for k in KEYS} <= pool.local
    assert pool.spill is not None and pool.spill.share == 0.0


def test_on_in_flight_counts_the_spill_weighs_this_replicas_requests() -> None:
    """Without reports the work is this replica's in-flight requests: the zone's pods
    holding 6 each and the others none is over any allowance."""
    pool = zoned_pool(4, load_factor=4.0, min_bound=1)
    for endpoint_id in ("vllm-0", "vllm-2"):
        others = frozenset({"vllm-0", "vllm-1", "vllm-2", "vllm-3"} - {endpoint_id})
        for _ in range(6):
            pool.acquire(pool.choose(0, keyed=False, exclude=others))
    assert pool.spills(KEYS[0], None) in {True, False}
    assert pool.spill is not None and pool.spill.share > 0


def test_no_spill_without_a_factor_or_a_preference() -> None:
    assert zoned_pool(4, zone_factor=0).spill is None
    assert zoned_pool(4, prefer=False).spill is None


def test_the_explanation_says_when_a_key_spilled() -> None:
    pool = zoned_pool(4)
    assert pool.spill is not None
    pool.spill.share = 1.0
    pool.spill.updated = float("inf")  # no update: keep the share set here
    choice = pool.choose(KEYS[0])
    shown = explain_zone(pool, choice, None, KEYS[0])
    assert shown["reason"].startswith("spilled:")
    assert shown["spill"]["this_key"] is True and shown["spill"]["share"] == 1.0
