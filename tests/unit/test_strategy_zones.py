"""CHWBL with a zone preference: the balancer's own zone first, within the pool-wide bound."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.ring import HashRing, hash_key
from balancer.strategy import BoundedLoad, Choice, Probe, chwbl_bound

ENDPOINTS = tuple(f"vllm-{i}" for i in range(8))
KEY = hash_key("llama-3-8b\x00You are a helpful assistant. Summarise this contract.")
VNODES = 64


def chwbl(members: tuple[str, ...] = ENDPOINTS, load_factor: float = 1.25,
          min_bound: int = 1) -> BoundedLoad:
    return BoundedLoad(HashRing(members, virtual_nodes=VNODES), load_factor, min_bound)


def decided(choice: Choice | None) -> tuple[object, ...] | None:
    """What a choice decided, leaving out whether a preference was given."""
    return None if choice is None else tuple(choice)[:5]


def zone_walk(prefer: set[str], key_hash: int) -> list[str]:
    """The preferred endpoints in the order a ring of just them gives."""
    return list(HashRing(sorted(prefer), virtual_nodes=VNODES).walk(key_hash))


# -- examples ------------------------------------------------------------------------------


def test_an_idle_pool_sends_a_key_to_its_first_endpoint_in_the_preferred_zone() -> None:
    """With nothing in flight, the key goes to the first preferred endpoint of its walk, as a
    primary choice within the zone, even when another zone's endpoint comes first."""
    strategy = chwbl()
    walk = list(strategy.ring.walk(KEY))
    prefer = frozenset(walk[1::2])  # the key's own endpoint is not preferred
    choice = strategy.choose(KEY, ENDPOINTS, {}, 0, prefer=prefer)
    assert choice == Choice(walk[1], "primary", (Probe(walk[1], 0),), 1, "in-flight", True)


def test_a_busy_zone_endpoint_overflows_to_the_next_in_the_same_zone() -> None:
    """The first preferred endpoint at the bound passes the request to the next preferred
    one, not to the other zone's endpoints in between."""
    strategy = chwbl(load_factor=1.0)
    walk = list(strategy.ring.walk(KEY))
    prefer = frozenset(walk[1::2])
    load = {walk[1]: 3}
    choice = strategy.choose(KEY, ENDPOINTS, load, 3, prefer=prefer)
    assert choice is not None
    assert choice.endpoint == walk[3]
    assert choice.outcome == "overflow" and choice.preferred is True
    assert [p.endpoint for p in choice.probes] == [walk[1], walk[3]]


def test_a_zone_busier_than_the_pool_spills_to_the_other_zone_in_ring_order() -> None:
    """When every preferred endpoint is at the pool-wide bound, the walk goes on over the
    other zone's endpoints from the key, skipping the preferred ones already probed."""
    strategy = chwbl(load_factor=1.0)
    walk = list(strategy.ring.walk(KEY))
    prefer = frozenset(walk[1::2])
    load = dict.fromkeys(prefer, 2)
    total = sum(load.values())  # 8 over 8 endpoints: bound ceil(9 / 8) = 2
    choice = strategy.choose(KEY, ENDPOINTS, load, total, prefer=prefer)
    assert choice is not None
    assert choice.endpoint == walk[0]
    assert choice.outcome == "overflow" and choice.preferred is False
    probed = [p.endpoint for p in choice.probes]
    assert probed == [*zone_walk(set(prefer), KEY), walk[0]]


def test_the_bound_is_the_pools_so_a_zone_keeps_its_keys_up_to_c_times_the_pool_average(
) -> None:
    """A zone with twice the other's load keeps a key while its endpoint is within
    c times the pool's average: the bound does not shrink to the zone's own."""
    strategy = chwbl(load_factor=1.5)
    walk = list(strategy.ring.walk(KEY))
    prefer = frozenset(walk[1::2])
    load = {e: (2 if e in prefer else 1) for e in ENDPOINTS}
    total = sum(load.values())  # 12: bound ceil(1.5 * 13 / 8) = 3
    choice = strategy.choose(KEY, ENDPOINTS, load, total, prefer=prefer)
    assert choice is not None and choice.bound == 3
    assert choice.endpoint == walk[1] and choice.preferred is True


def test_excluded_preferred_endpoints_are_skipped_in_both_walks() -> None:
    """A retry never goes back to an endpoint it tried, in the zone or out of it."""
    strategy = chwbl()
    walk = list(strategy.ring.walk(KEY))
    prefer = frozenset(walk[:2])
    choice = strategy.choose(KEY, ENDPOINTS, {}, 0, exclude=prefer, prefer=prefer)
    assert choice is not None
    assert choice.endpoint == walk[2] and choice.preferred is False
    assert choice.outcome == "primary"  # the first endpoint probed, as a retry without zones


def test_nothing_under_the_bound_falls_back_to_the_least_loaded_of_every_probe() -> None:
    """With excluded endpoints leaving no room anywhere, the least loaded probed is taken,
    and it says whether it is in the zone."""
    strategy = chwbl(("a", "b", "c"), load_factor=1.0)
    load = {"a": 5, "b": 4, "c": 6}
    choice = strategy.choose(KEY, ("a", "b", "c"), load, 0, prefer=frozenset({"b", "c"}))
    assert choice is not None
    assert choice.outcome == "fallback"
    assert choice.endpoint == "b" and choice.preferred is True
    assert {p.endpoint for p in choice.probes} == {"a", "b", "c"}


def test_preferred_endpoints_not_on_the_ring_are_never_chosen() -> None:
    """A preference naming endpoints the ring lacks walks on to the ring's own."""
    strategy = chwbl(("a", "b"))
    choice = strategy.choose(KEY, ("a", "b"), {}, 0, prefer=frozenset({"zz"}))
    assert choice is not None and choice.endpoint in {"a", "b"}
    assert choice.preferred is False


# -- properties ----------------------------------------------------------------------------

LOADS = st.lists(st.integers(0, 8), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(loads=LOADS, extra=st.integers(0, 20), key_hash=st.integers(0, 2**64 - 1),
       min_bound=st.integers(1, 3), load_factor=st.floats(1.0, 2.0),
       excluded=st.sets(st.integers(0, 7), max_size=3), everyone=st.booleans())
def test_no_preference_or_every_candidate_preferred_decides_as_without_zones(
    loads: list[int], extra: int, key_hash: int, min_bound: int, load_factor: float,
    excluded: set[int], everyone: bool,
) -> None:
    """Same endpoint, outcome, probes and bound as CHWBL without a preference."""
    members = ENDPOINTS[: len(loads)]
    load = dict(zip(members, loads, strict=True))
    total = sum(loads) + extra
    exclude = frozenset(members[i] for i in excluded if i < len(members))
    strategy = chwbl(members, load_factor, min_bound)
    plain = strategy.choose(key_hash, members, load, total, exclude=exclude)
    prefer = frozenset(members) if everyone else frozenset()
    zoned = strategy.choose(key_hash, members, load, total, exclude=exclude, prefer=prefer)
    assert decided(zoned) == decided(plain)
    if not everyone and zoned is not None:
        assert zoned.preferred is None


@settings(max_examples=300, deadline=None)
@given(loads=LOADS, extra=st.integers(0, 20), key_hash=st.integers(0, 2**64 - 1),
       min_bound=st.integers(1, 3), load_factor=st.floats(1.0, 2.0),
       zone=st.sets(st.integers(0, 7), min_size=1, max_size=7),
       excluded=st.sets(st.integers(0, 7), max_size=2))
def test_the_zone_keeps_a_request_while_any_of_it_is_under_the_pool_bound(
    loads: list[int], extra: int, key_hash: int, min_bound: int, load_factor: float,
    zone: set[int], excluded: set[int],
) -> None:
    """The first preferred endpoint under the pool-wide bound, in the order of a ring of the
    zone alone; else the first other endpoint under it in ring order; else the least loaded
    of everything probed."""
    members = ENDPOINTS[: len(loads)]
    load = dict(zip(members, loads, strict=True))
    total = sum(loads) + extra
    prefer = frozenset(members[i] for i in zone if i < len(members))
    exclude = frozenset(members[i] for i in excluded if i < len(members))
    if not prefer:
        return  # no preference: the test above
    strategy = chwbl(members, load_factor, min_bound)
    choice = strategy.choose(key_hash, members, load, total, exclude=exclude, prefer=prefer)
    if set(members) <= exclude:
        assert choice is None
        return
    assert choice is not None
    bound = chwbl_bound(total, len(members), load_factor, min_bound)
    assert choice.bound == bound
    in_zone = [e for e in zone_walk(set(prefer), key_hash) if e not in exclude]
    others = [e for e in strategy.ring.walk(key_hash) if e not in prefer and e not in exclude]
    zone_room = [e for e in in_zone if load[e] < bound]
    other_room = [e for e in others if load[e] < bound]
    if zone_room:
        assert (choice.endpoint, choice.preferred) == (zone_room[0], True)
    elif other_room:
        assert (choice.endpoint, choice.preferred) == (other_room[0], False)
    else:
        assert choice.outcome == "fallback"
        assert load[choice.endpoint] == min(load[e] for e in in_zone + others)
    if choice.outcome != "fallback":
        assert choice.outcome in {"primary", "overflow"}
        assert (choice.outcome == "primary") == (len(choice.probes) == 1)
    assert len({p.endpoint for p in choice.probes}) == len(choice.probes)  # none probed twice


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 8), key_hash=st.integers(0, 2**64 - 1),
       zone=st.sets(st.integers(0, 7), min_size=1, max_size=7), others=st.integers(0, 8))
def test_replicas_in_one_zone_agree_whatever_else_their_rings_hold(
    n: int, key_hash: int, zone: set[int], others: int
) -> None:
    """Two replicas that see the same zone endpoints but a different number of other
    endpoints send an idle key to the same endpoint of the zone."""
    prefer = frozenset(ENDPOINTS[i] for i in zone if i < n)
    if not prefer:
        return
    mine = tuple(sorted(prefer | set(ENDPOINTS[:n])))
    theirs = tuple(sorted(prefer | {f"other-{i}" for i in range(others)}))
    a = chwbl(mine).choose(key_hash, mine, {}, 0, prefer=prefer)
    b = chwbl(theirs).choose(key_hash, theirs, {}, 0, prefer=prefer)
    assert a is not None and b is not None
    assert a.endpoint == b.endpoint == zone_walk(set(prefer), key_hash)[0]
