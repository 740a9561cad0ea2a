"""Routing strategies: CHWBL's bound and walk, power of two choices, round-robin, random."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.ring import HashRing, hash_key
from balancer.strategy import (
    BoundedLoad,
    Choice,
    LeastRequest,
    Probe,
    RoundRobin,
    chwbl_bound,
)
from balancer.strategy import Random as RandomStrategy

ENDPOINTS = tuple(f"vllm-{i}" for i in range(8))
KEY = hash_key("llama-3-8b\x00You are a helpful assistant. Summarise this contract.")


def chwbl(
    members: tuple[str, ...] = ENDPOINTS, load_factor: float = 1.25, min_bound: int = 1
) -> BoundedLoad:
    return BoundedLoad(HashRing(members, virtual_nodes=64), load_factor, min_bound)


def walk(strategy: BoundedLoad, key_hash: int = KEY) -> list[str]:
    return list(strategy.ring.walk(key_hash))


# -- the bound -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total_load", "endpoints", "load_factor", "min_bound", "expected"),
    [
        (0, 4, 1.25, 1, 1),  # ceil(1.25 * 1 / 4)
        (10, 4, 1.25, 1, 4),  # ceil(1.25 * 11 / 4) = ceil(3.4375)
        (7, 8, 1.0, 1, 1),  # c = 1 and exactly one request per endpoint: strict balance
        (8, 8, 1.0, 1, 2),  # ceil(9 / 8)
        (15, 4, 1.25, 1, 5),  # ceil(1.25 * 16 / 4) is exactly 5, not 6
        (99, 10, 2.0, 1, 20),  # ceil(2 * 100 / 10)
        (0, 200, 1.25, 4, 4),  # the floor wins in a large idle pool
        (1000, 200, 1.25, 4, 7),  # ceil(1.25 * 1001 / 200) = ceil(6.25625): above the floor
        (5, 0, 1.25, 3, 3),  # no endpoints: only the floor is left
    ],
)
def test_the_bound_is_the_ceiling_of_c_times_the_average_load_with_a_floor(
    total_load: int, endpoints: int, load_factor: float, min_bound: int, expected: int
) -> None:
    """bound = max(min_bound, ceil(c * (total + 1) / n)), counting the request being placed."""
    assert chwbl_bound(total_load, endpoints, load_factor, min_bound) == expected


# -- CHWBL decisions -----------------------------------------------------------------------


def test_chwbl_with_no_candidates_chooses_nothing() -> None:
    """An empty pool gives no choice."""
    assert chwbl(()).choose(KEY, (), {}, 0) is None


def test_chwbl_takes_the_keys_own_endpoint_when_idle() -> None:
    """An idle pool routes a key to the first endpoint of its walk, as a primary choice."""
    strategy = chwbl()
    first = walk(strategy)[0]
    choice = strategy.choose(KEY, ENDPOINTS, {}, 0)
    assert choice == Choice(first, "primary", (Probe(first, 0),), bound=1)


def test_chwbl_marks_an_explicit_session_keys_first_choice_as_session() -> None:
    """A session key routed to its own endpoint is reported as a session choice."""
    strategy = chwbl()
    choice = strategy.choose(KEY, ENDPOINTS, {}, 0, session=True)
    assert choice is not None
    assert (choice.endpoint, choice.outcome) == (walk(strategy)[0], "session")


@pytest.mark.parametrize("session", [False, True])
def test_chwbl_overflows_along_the_walk_past_endpoints_at_the_bound(session: bool) -> None:
    """Endpoints at the bound are skipped in ring order; the probes record what was seen."""
    strategy = chwbl(min_bound=2)
    order = walk(strategy)
    load = {order[0]: 2, order[1]: 2, order[2]: 1}
    choice = strategy.choose(KEY, ENDPOINTS, load, 5, session=session)
    # bound = max(2, ceil(1.25 * 6 / 8)) = 2: the first two are full, the third has room.
    assert choice == Choice(
        order[2], "overflow", (Probe(order[0], 2), Probe(order[1], 2), Probe(order[2], 1)), 2
    )


def test_chwbl_falls_back_to_the_least_loaded_when_nothing_is_under_the_bound() -> None:
    """If loads outside the total (draining work) fill every endpoint, the least loaded wins."""
    members = ("a", "b", "c")
    strategy = chwbl(members)
    order = walk(strategy)
    load = {order[0]: 5, order[1]: 3, order[2]: 4}
    choice = strategy.choose(KEY, members, load, 0)
    assert choice is not None
    assert (choice.endpoint, choice.outcome, choice.bound) == (order[1], "fallback", 1)
    assert [p.endpoint for p in choice.probes] == order


def test_chwbl_fallback_prefers_the_earliest_on_the_walk_among_equally_loaded() -> None:
    """Ties in the fallback go to the endpoint met first on the ring, so replicas agree."""
    members = ("a", "b", "c")
    strategy = chwbl(members)
    order = walk(strategy)
    choice = strategy.choose(KEY, members, dict.fromkeys(members, 3), 0)
    assert choice is not None
    assert (choice.endpoint, choice.outcome) == (order[0], "fallback")


def test_chwbl_with_an_empty_ring_chooses_nothing_even_with_candidates() -> None:
    """Candidates the ring does not hold cannot be reached by a walk."""
    assert BoundedLoad(HashRing()).choose(KEY, ("a",), {}, 0) is None


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 8),
    load_factor=st.floats(1.0, 3.0),
    min_bound=st.integers(1, 4),
    operations=st.lists(
        st.tuples(st.booleans(), st.integers(0, 2**64 - 1), st.integers(0, 10**6)),
        min_size=1,
        max_size=120,
    ),
)
def test_chwbl_never_places_a_request_above_the_bound_while_an_endpoint_is_under_it(
    n: int, load_factor: float, min_bound: int, operations: list[tuple[bool, int, int]]
) -> None:
    """Through any acquire/release sequence, the chosen endpoint had room whenever any had."""
    members = ENDPOINTS[:n]
    strategy = chwbl(members, load_factor, min_bound)
    load = dict.fromkeys(members, 0)
    held: list[str] = []
    for acquire, key_hash, pick in operations:
        if not acquire and held:
            load[held.pop(pick % len(held))] -= 1
            continue
        total = sum(load.values())
        choice = strategy.choose(key_hash, members, load, total)
        assert choice is not None
        bound = chwbl_bound(total, n, load_factor, min_bound)
        assert choice.bound == bound
        # With c >= 1 and every load counted in the total, someone always has room.
        assert choice.outcome != "fallback"
        assert load[choice.endpoint] < bound
        assert all(p.load >= bound for p in choice.probes[:-1])
        load[choice.endpoint] += 1
        held.append(choice.endpoint)
        assert load[choice.endpoint] <= bound


@settings(max_examples=150, deadline=None)
@given(
    loads=st.lists(st.integers(0, 12), min_size=1, max_size=8),
    total=st.integers(0, 40),
    key_hash=st.integers(0, 2**64 - 1),
    min_bound=st.integers(1, 4),
)
def test_chwbl_only_passes_an_endpoint_under_the_bound_when_none_is_left(
    loads: list[int], total: int, key_hash: int, min_bound: int
) -> None:
    """For any loads and total: under-bound choice if one exists, else the least loaded."""
    members = ENDPOINTS[: len(loads)]
    load = dict(zip(members, loads, strict=True))
    strategy = chwbl(members, 1.25, min_bound)
    choice = strategy.choose(key_hash, members, load, total)
    assert choice is not None
    bound = chwbl_bound(total, len(members), 1.25, min_bound)
    under = [e for e in walk(strategy, key_hash) if load[e] < bound]
    if under:
        assert choice.endpoint == under[0]
        assert choice.outcome == ("primary" if len(choice.probes) == 1 else "overflow")
    else:
        assert choice.outcome == "fallback"
        assert load[choice.endpoint] == min(loads)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(2, 8),
    seed=st.integers(0, 2**32 - 1),
    steps=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.booleans()), max_size=60),
)
def test_independent_chwbl_instances_make_identical_choices(
    n: int, seed: int, steps: list[tuple[int, bool]]
) -> None:
    """Two balancers with rings built in different orders route every key the same way."""
    members = list(ENDPOINTS[:n])
    shuffled = members[:]
    random.Random(seed).shuffle(shuffled)
    first = BoundedLoad(HashRing(members, virtual_nodes=64))
    second = BoundedLoad(HashRing(virtual_nodes=64))
    for endpoint in shuffled:
        second.ring.add(endpoint)
    load = dict.fromkeys(members, 0)
    for key_hash, keep in steps:
        total = sum(load.values())
        a = first.choose(key_hash, tuple(members), load, total)
        b = second.choose(key_hash, tuple(shuffled), load, total)
        assert a == b
        if keep and a is not None:
            load[a.endpoint] += 1


def test_a_hot_key_spreads_over_several_endpoints_without_exceeding_the_bound() -> None:
    """Many concurrent requests for one prefix fill its endpoint, then overflow along the ring."""
    strategy = chwbl(ENDPOINTS, 1.25, 1)
    load = dict.fromkeys(ENDPOINTS, 0)
    for _ in range(64):
        total = sum(load.values())
        choice = strategy.choose(KEY, ENDPOINTS, load, total)
        assert choice is not None
        load[choice.endpoint] += 1
        assert load[choice.endpoint] <= chwbl_bound(total, len(ENDPOINTS), 1.25, 1)
    # 64 requests over 8 endpoints: the bound ends at ceil(1.25 * 64 / 8) = 10.
    assert max(load.values()) <= 10
    assert sum(1 for v in load.values() if v) >= 6
    # The key's own endpoint is as full as the bound allows: affinity is kept where possible.
    assert load[walk(strategy)[0]] == max(load.values())


@pytest.mark.parametrize(
    ("min_bound", "requests", "endpoints_used"),
    [
        (1, 3, 3),  # bound 1: every concurrent request for the key cascades to a new endpoint
        (2, 3, 2),
        (4, 3, 1),  # the floor keeps all three on the key's own endpoint
        (4, 4, 1),
        (4, 5, 2),  # the fifth is over the floor of 4 and overflows
    ],
)
def test_the_bound_floor_stops_a_hot_key_cascading_over_a_large_idle_pool(
    min_bound: int, requests: int, endpoints_used: int
) -> None:
    """With 200 endpoints, concurrent requests for one key stay together up to min_bound."""
    members = tuple(f"vllm-{i}" for i in range(200))
    strategy = BoundedLoad(HashRing(members, virtual_nodes=16), 1.25, min_bound)
    load: Counter[str] = Counter()
    for _ in range(requests):
        choice = strategy.choose(KEY, members, load, sum(load.values()))
        assert choice is not None
        load[choice.endpoint] += 1
    assert len(load) == endpoints_used
    assert next(iter(load)) == next(strategy.ring.walk(KEY))


# -- least request (power of two choices) --------------------------------------------------


def test_least_request_with_no_candidates_chooses_nothing() -> None:
    """An empty pool gives no choice."""
    assert LeastRequest(random.Random(1)).choose(0, (), {}, 0) is None


def test_least_request_with_one_candidate_takes_it() -> None:
    """A single endpoint is the only pick, probed once."""
    choice = LeastRequest(random.Random(1)).choose(0, ("a",), {"a": 7}, 7)
    assert choice == Choice("a", "primary", (Probe("a", 7),))


@settings(max_examples=200)
@given(
    loads=st.lists(st.integers(0, 20), min_size=2, max_size=10),
    seed=st.integers(0, 2**32 - 1),
)
def test_least_request_picks_the_less_loaded_of_two_distinct_probes(
    loads: list[int], seed: int
) -> None:
    """P2C samples two different endpoints and takes the one with fewer in flight."""
    members = tuple(f"e{i}" for i in range(len(loads)))
    load = dict(zip(members, loads, strict=True))
    choice = LeastRequest(random.Random(seed)).choose(0, members, load, sum(loads))
    assert choice is not None
    first, second = choice.probes
    assert first.endpoint != second.endpoint
    assert first.load == load[first.endpoint] and second.load == load[second.endpoint]
    assert choice.endpoint == (first if first.load <= second.load else second).endpoint
    assert choice.outcome == "primary"


def test_least_request_never_picks_the_busiest_of_three_when_the_others_are_idle() -> None:
    """The busiest endpoint loses every pairing, so it is never chosen."""
    strategy = LeastRequest(random.Random(7))
    members = ("a", "b", "c")
    picks = Counter(
        choice.endpoint
        for _ in range(300)
        if (choice := strategy.choose(0, members, {"a": 0, "b": 0, "c": 9}, 9))
    )
    assert picks["c"] == 0
    assert picks["a"] > 50 and picks["b"] > 50


def test_least_request_keeps_loads_even_when_requests_accumulate() -> None:
    """Placing 400 requests one by one with P2C keeps the busiest within 4 of the idlest."""
    strategy = LeastRequest(random.Random(3))
    load = dict.fromkeys(ENDPOINTS, 0)
    for _ in range(400):
        choice = strategy.choose(0, ENDPOINTS, load, sum(load.values()))
        assert choice is not None
        load[choice.endpoint] += 1
    assert max(load.values()) - min(load.values()) <= 4


# -- round-robin and random ----------------------------------------------------------------


def test_round_robin_cycles_through_the_candidates_in_order() -> None:
    """Successive picks walk the candidate list and start over."""
    strategy = RoundRobin()
    picks = [strategy.choose(0, ("a", "b", "c"), {}, 0) for _ in range(7)]
    assert [c.endpoint for c in picks if c] == ["a", "b", "c", "a", "b", "c", "a"]
    assert {c.outcome for c in picks if c} == {"primary"}


def test_round_robin_ignores_the_key_and_the_load() -> None:
    """Neither the key nor the load changes the next round-robin pick."""
    strategy = RoundRobin()
    first = strategy.choose(KEY, ("a", "b"), {"a": 100}, 100)
    second = strategy.choose(0, ("a", "b"), {"b": 100}, 100)
    assert first == Choice("a", "primary", (Probe("a", 100),))
    assert second == Choice("b", "primary", (Probe("b", 100),))


def test_round_robin_keeps_cycling_when_the_candidates_change() -> None:
    """A shrinking candidate list is still cycled without an index error."""
    strategy = RoundRobin()
    picks = [strategy.choose(0, ("a", "b", "c"), {}, 0) for _ in range(2)]
    picks += [strategy.choose(0, ("a",), {}, 0) for _ in range(2)]
    assert [c.endpoint for c in picks if c] == ["a", "b", "a", "a"]


def test_round_robin_with_no_candidates_chooses_nothing() -> None:
    """An empty pool gives no choice."""
    assert RoundRobin().choose(0, (), {}, 0) is None


def test_random_spreads_requests_evenly() -> None:
    """Random picks give each of 5 endpoints about a fifth of 5000 requests."""
    strategy = RandomStrategy(random.Random(11))
    members = ENDPOINTS[:5]
    picks = Counter(
        choice.endpoint for _ in range(5000) if (choice := strategy.choose(KEY, members, {}, 0))
    )
    assert set(picks) == set(members)
    for count in picks.values():
        # Binomial(5000, 0.2) has a standard deviation of about 28; 150 is over 5 of them.
        assert abs(count - 1000) < 150


def test_random_reports_the_load_of_what_it_picked() -> None:
    """A random choice is primary and probes only the endpoint it took."""
    choice = RandomStrategy(random.Random(0)).choose(0, ("a",), {"a": 3}, 3)
    assert choice == Choice("a", "primary", (Probe("a", 3),))


def test_random_with_no_candidates_chooses_nothing() -> None:
    """An empty pool gives no choice."""
    assert RandomStrategy(random.Random(0)).choose(0, (), {}, 0) is None
