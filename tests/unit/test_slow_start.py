"""Slow start: an endpoint that joins or comes back takes a growing share of the bound."""

from __future__ import annotations

import time

from balancer.config import HealthSettings, PoolSettings, Settings, validate
from balancer.endpoints import static_endpoint
from balancer.ring import HashRing, hash_key
from balancer.router import Router
from balancer.strategy import BoundedLoad

URLS = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]


def router(slow_start: float = 30.0) -> Router:
    settings = validate(Settings(pools=(PoolSettings("p", ("m",), tuple(URLS)),),
                                 health=HealthSettings(slow_start=slow_start)))
    return Router(settings)


def key_owned_by(ring: HashRing, endpoint: str) -> int:
    for i in range(10_000):
        key = hash_key(f"k{i}")
        if next(iter(ring.walk(key))) == endpoint:
            return key
    raise AssertionError("no key")


def test_a_ramping_endpoint_takes_its_share_of_the_bound_then_the_next_takes_the_rest():
    ring = HashRing()
    ring.update(["a", "b", "c", "d"])
    strategy = BoundedLoad(ring, load_factor=1.0, min_bound=1)
    key = key_owned_by(ring, "a")
    load = {"a": 2, "b": 0, "c": 6, "d": 4}  # total 12: bound ceil(13 / 4) = 4
    assert strategy.choose(key, ["a", "b", "c", "d"], load, 12).endpoint == "a"
    half = strategy.choose(key, ["a", "b", "c", "d"], load, 12, ramp={"a": 0.5})
    assert half.endpoint != "a" and half.outcome == "overflow"  # floor(0.5 * 4) = 2 taken
    assert strategy.choose(key, ["a", "b", "c", "d"], {**load, "a": 1, "c": 7}, 12,
                           ramp={"a": 0.5}).endpoint == "a"
    # At the very start it may still take one request.
    assert strategy.choose(key, ["a", "b", "c", "d"], {**load, "a": 0}, 10,
                           ramp={"a": 0.0}).endpoint == "a"


def test_endpoints_present_at_start_do_not_ramp_and_a_pool_from_empty_does_not_either():
    r = router()
    pool = r.pools["p"]
    pool.set_endpoints([static_endpoint(u) for u in URLS])
    assert not pool.ramping
    pool.set_endpoints([])
    pool.set_endpoints([static_endpoint(URLS[0])])
    assert not pool.ramping


def test_a_joining_and_a_returning_endpoint_ramp_over_the_period():
    r = router(slow_start=30.0)
    pool = r.pools["p"]
    pool.set_endpoints([static_endpoint(u) for u in URLS[:3]])
    pool.set_endpoints([static_endpoint(u) for u in URLS])
    new = static_endpoint(URLS[3]).id
    assert set(pool.ramping) == {new}
    now = time.monotonic()
    share = pool.ramp(now + 15)
    assert share is not None and abs(share[new] - 0.5) < 0.01
    assert pool.ramp(now + 31) is None and not pool.ramping  # over: forgotten
    # Ejected and back: ramps again.
    back = static_endpoint(URLS[1]).id
    pool.set_out(frozenset({back}))
    assert back not in pool.ramping
    pool.set_out(frozenset())
    assert set(pool.ramping) == {back}


def test_off_by_default_and_not_in_panic():
    r = router(slow_start=0.0)
    pool = r.pools["p"]
    pool.set_endpoints([static_endpoint(u) for u in URLS[:3]])
    pool.set_endpoints([static_endpoint(u) for u in URLS])
    assert not pool.ramping
    r = router()
    pool = r.pools["p"]
    pool.set_endpoints([static_endpoint(u) for u in URLS])
    ids = [static_endpoint(u).id for u in URLS]
    pool.set_out(frozenset(ids[:3]))  # 3 of 4 out: panic, every endpoint back on the ring
    assert pool.panic and not pool.ramping


def test_a_pool_in_slow_start_routes_the_new_endpoints_keys_to_their_old_endpoint():
    """A new pod takes its keys from the endpoints after it on the ring; while it ramps and
    is busy, those keys go on to exactly the endpoint that served them before it joined."""
    r = router(slow_start=60.0)
    pool = r.pools["p"]
    pool.set_endpoints([static_endpoint(u) for u in URLS[:3]])
    before = {i: pool.choose(hash_key(f"k{i}")).endpoint for i in range(400)}
    pool.set_endpoints([static_endpoint(u) for u in URLS])
    new = static_endpoint(URLS[3]).id
    pool.assume_load({new: 1})
    moved = 0
    for i in range(400):
        choice = pool.choose(hash_key(f"k{i}"))
        if choice.probes[0].endpoint == new:
            moved += 1
            assert choice.endpoint == before[i]
    assert moved > 50
