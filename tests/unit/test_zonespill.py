"""The zone spill: how many of a zone's keys skip the zone preference, by the zone's work."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.ring import HashRing, hash_key
from balancer.zonespill import GAIN, MAX_STEP, UPDATE_INTERVAL, ZoneSpill, spread

KEYS = [hash_key(f"conversation {i}") for i in range(2000)]


def test_a_zone_over_its_allowance_raises_the_share_by_the_relative_excess() -> None:
    """Two equal zones, factor 1.1: the zone may carry 55% of the work. Carrying 80 of 100,
    it is 25 over its allowance of 55, so the first update (half a second) moves the share
    by GAIN x 25/55 x 0.5."""
    spill = ZoneSpill(1.1, floor=4)
    spill.update(0.0, local_work=80, total_work=100, local_endpoints=2, endpoints=4)
    assert math.isclose(spill.allowed, 55)
    assert spill.work_share == 0.8
    assert math.isclose(spill.share, GAIN * (80 - 55) / 55 * UPDATE_INTERVAL)


def test_a_zone_under_its_allowance_lowers_the_share_to_nothing() -> None:
    spill = ZoneSpill(1.1, floor=4)
    spill.share = 0.3
    for second in range(1, 10):
        spill.update(float(second), local_work=40, total_work=100, local_endpoints=2,
                     endpoints=4)
    assert spill.share == 0.0


def test_a_nearly_idle_pool_keeps_every_key_in_the_zone() -> None:
    """Under the floor (4 requests per local endpoint) shares mean nothing: no spill."""
    spill = ZoneSpill(1.1, floor=4)
    spill.update(0.0, local_work=6, total_work=6, local_endpoints=2, endpoints=4)
    assert spill.share == 0.0 and not any(spill.spills(k) for k in KEYS)


def test_an_update_after_a_long_quiet_spell_moves_the_share_as_after_a_short_one() -> None:
    spill = ZoneSpill(1.1, floor=4)
    spill.update(0.0, local_work=80, total_work=100, local_endpoints=2, endpoints=4)
    first = spill.share
    spill.update(3600.0, local_work=80, total_work=100, local_endpoints=2, endpoints=4)
    assert math.isclose(spill.share - first, GAIN * (25 / 55) * MAX_STEP)


def test_updates_are_due_every_interval() -> None:
    spill = ZoneSpill(1.1, floor=4)
    assert spill.due(0.0)
    spill.update(10.0, 0, 0, 2, 4)
    assert not spill.due(10.0 + UPDATE_INTERVAL / 2) and spill.due(10.0 + UPDATE_INTERVAL)


def test_no_local_endpoint_no_spill() -> None:
    spill = ZoneSpill(1.1, floor=4)
    spill.share = 0.5
    spill.update(0.0, 10, 100, local_endpoints=0, endpoints=4)
    assert spill.share == 0.0


def test_the_spilled_keys_are_a_share_of_all_keys_spread_over_the_whole_ring() -> None:
    """Half the keys spill, and their homes on the ring are every endpoint, about evenly:
    the spill does not pick an arc of the ring, whose homes would be one or two pods."""
    spill = ZoneSpill(1.1, floor=4)
    spill.share = 0.5
    spilled = [k for k in KEYS if spill.spills(k)]
    assert 0.45 < len(spilled) / len(KEYS) < 0.55
    ring = HashRing([f"vllm-{i}" for i in range(8)], virtual_nodes=256)
    homes = [next(iter(ring.walk(k))) for k in spilled]
    counts = [homes.count(f"vllm-{i}") for i in range(8)]
    assert min(counts) > len(spilled) / 8 * 0.6


@settings(max_examples=200, deadline=None)
@given(key_hash=st.integers(0, 2**64 - 1), low=st.floats(0, 1), high=st.floats(0, 1))
def test_a_key_that_spills_under_a_share_spills_under_every_larger_one(
    key_hash: int, low: float, high: float
) -> None:
    """A key's fate moves only one way as the share moves: keys do not flap in and out of
    the zone while the share rises (or falls)."""
    low, high = sorted((low, high))
    a, b = ZoneSpill(1.1, 4), ZoneSpill(1.1, 4)
    a.share, b.share = low, high
    assert not a.spills(key_hash) or b.spills(key_hash)
    assert 0.0 <= spread(key_hash) < 1.0


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0, 1000), st.floats(0, 1000),
                                st.floats(0.0, 100.0)), max_size=30),
       factor=st.floats(1.0, 3.0), local=st.integers(1, 8), others=st.integers(0, 8))
def test_the_share_stays_between_nothing_and_everything(
    steps: list[tuple[float, float, float]], factor: float, local: int, others: int
) -> None:
    spill = ZoneSpill(factor, 4)
    now = 0.0
    for local_work, other_work, dt in steps:
        now += dt
        spill.update(now, local_work, local_work + other_work, local, local + others)
        assert 0.0 <= spill.share <= 1.0


def test_closed_loop_a_zone_with_80_percent_of_the_clients_settles_near_its_allowance() -> None:
    """A toy plant: the zone's clients bring 80% of the work; the keys that spill take the
    plain walk, where half of them land in the other zone. The zone's work follows the share
    with a lag of two seconds (requests in flight). The share settles where the zone carries
    about its 55% (1.1 x half), at 0.625 (0.8 - 0.4 x 0.625 = 0.55), without swinging."""
    spill = ZoneSpill(1.1, floor=4)
    total = 400.0
    work = 0.8 * total
    shares = []
    for tick in range(0, 240):
        now = tick * UPDATE_INTERVAL
        spill.update(now, work, total, local_endpoints=2, endpoints=4)
        target = (0.8 - 0.4 * spill.share) * total
        work += (target - work) * UPDATE_INTERVAL / 2.0
        shares.append(spill.share)
    assert abs(shares[-1] - 0.625) < 0.03
    late = shares[-60:]
    assert max(late) - min(late) < 0.03
    assert max(shares) < 0.8  # no large overshoot on the way
