"""The consistent-hash ring: placement, walks, shares, and what moves when membership changes."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer import ring as ring_module
from balancer.ring import HashRing, endpoint_points, hash_key

RING_SIZE = 1 << 64
KEY_COUNT = 40_000
ENDPOINT_COUNTS = (2, 3, 5, 8, 16)

# Endpoint ids as they appear in practice: static host:port ids and Kubernetes pod names.
ID_SCHEMES = {
    "static": "10.0.0.{}:8000",
    "pods": "vllm-{}",
}

# Key hashes are computed once: every distribution test walks the same keys.
KEY_HASHES = tuple(hash_key(f"llama-3-8b\x00conversation {i}") for i in range(KEY_COUNT))

endpoint_ids = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
)
endpoint_sets = st.sets(endpoint_ids, min_size=1, max_size=8)
key_hashes = st.integers(min_value=0, max_value=RING_SIZE - 1)


def ids(scheme: str, n: int) -> list[str]:
    return [ID_SCHEMES[scheme].format(i) for i in range(n)]


def owners(ring: HashRing) -> list[str | None]:
    return [ring.first(h) for h in KEY_HASHES]


def assert_same_ring(a: HashRing, b: HashRing) -> None:
    assert a.members == b.members
    assert a.shares() == b.shares()
    for h in KEY_HASHES[:500]:
        assert list(a.walk(h)) == list(b.walk(h))


# -- hashing -------------------------------------------------------------------------------


def test_key_hash_is_xxh3_64_of_the_utf8_bytes() -> None:
    """A key's position is xxh3_64 of its UTF-8 bytes, so every replica and release agrees."""
    assert hash_key("") == 0x2D06800538D394C2  # the published XXH3_64 digest of no input
    assert hash_key("model\x00hello") == 7707321801193588731


def test_key_hash_accepts_lone_surrogates() -> None:
    """A key with an unpaired surrogate (from a JSON escape) still hashes instead of raising."""
    assert 0 <= hash_key("\ud800 broken") < RING_SIZE


def test_endpoint_points_depend_only_on_the_id() -> None:
    """An endpoint's virtual nodes are a pure function of its id and their count."""
    assert endpoint_points("vllm-0", 2) == [11881030918898858223, 15607862566738689297]
    assert endpoint_points("vllm-0", 256)[:2] == endpoint_points("vllm-0", 2)
    assert len(set(endpoint_points("vllm-0", 256))) == 256


# -- basic behaviour -----------------------------------------------------------------------


def test_an_empty_ring_has_no_owner_walk_or_shares() -> None:
    """A ring with no endpoints answers None, an empty walk and no shares."""
    ring = HashRing()
    assert len(ring) == 0
    assert ring.first(123) is None
    assert list(ring.walk(123)) == []
    assert ring.shares() == {}
    assert ring.members == frozenset()


@pytest.mark.parametrize("virtual_nodes", [0, -1])
def test_a_ring_needs_at_least_one_virtual_node(virtual_nodes: int) -> None:
    """Zero or negative virtual nodes per endpoint is rejected."""
    with pytest.raises(ValueError, match="virtual_nodes"):
        HashRing(["a"], virtual_nodes=virtual_nodes)


def test_membership_reflects_the_endpoints_added() -> None:
    """len, `in` and members describe the endpoints on the ring."""
    ring = HashRing(["a", "b"])
    assert len(ring) == 2
    assert "a" in ring
    assert "c" not in ring
    assert ring.members == frozenset({"a", "b"})


def test_a_single_endpoint_owns_every_key() -> None:
    """With one endpoint, every key's first choice and walk is that endpoint."""
    ring = HashRing(["only"], virtual_nodes=4)
    assert ring.shares() == {"only": 1.0}
    for h in (0, 1, RING_SIZE // 2, RING_SIZE - 1):
        assert ring.first(h) == "only"
        assert list(ring.walk(h)) == ["only"]


def test_a_key_on_a_point_belongs_to_that_points_owner() -> None:
    """A key hashing exactly onto a virtual node is owned by that node's endpoint."""
    ring = HashRing(["a", "b", "c"], virtual_nodes=16)
    for endpoint in ("a", "b", "c"):
        for point in endpoint_points(endpoint, 16):
            assert ring.first(point) == endpoint
            assert next(ring.walk(point)) == endpoint


def test_a_key_past_the_last_point_wraps_to_the_first_point() -> None:
    """The ring is a circle: keys after the highest point go to the owner of the lowest."""
    ring = HashRing(["a", "b", "c"], virtual_nodes=16)
    all_points = sorted(p for e in ("a", "b", "c") for p in endpoint_points(e, 16))
    lowest_owner = next(e for e in ("a", "b", "c") if all_points[0] in endpoint_points(e, 16))
    assert ring.first(all_points[-1] + 1) == lowest_owner
    assert ring.first(RING_SIZE - 1) == lowest_owner
    assert ring.first(0) == lowest_owner


def test_adding_an_endpoint_twice_or_removing_a_stranger_changes_nothing() -> None:
    """add of a member and remove of a non-member are no-ops."""
    ring = HashRing(["a", "b"])
    before = ring.shares()
    ring.add("a")
    ring.remove("zzz")
    assert ring.shares() == before
    assert len(ring) == 2


# -- walks ---------------------------------------------------------------------------------


@settings(max_examples=200)
@given(members=endpoint_sets, key_hash=key_hashes, virtual_nodes=st.integers(1, 16))
def test_a_walk_yields_every_endpoint_exactly_once(
    members: set[str], key_hash: int, virtual_nodes: int
) -> None:
    """Walking from any key visits each member once and nothing else."""
    ring = HashRing(members, virtual_nodes=virtual_nodes)
    walk = list(ring.walk(key_hash))
    assert sorted(walk) == sorted(members)


@settings(max_examples=200)
@given(members=endpoint_sets, key_hash=key_hashes)
def test_a_walk_starts_at_the_keys_first_choice(members: set[str], key_hash: int) -> None:
    """The first endpoint of a walk is the ring's first choice for the key."""
    ring = HashRing(members, virtual_nodes=8)
    assert next(ring.walk(key_hash)) == ring.first(key_hash)


def test_a_walk_meets_endpoints_in_clockwise_point_order() -> None:
    """The walk order is the order in which endpoints' points follow the key on the circle."""
    members = ["a", "b", "c", "d"]
    ring = HashRing(members, virtual_nodes=8)
    points = sorted((p, e) for e in members for p in endpoint_points(e, 8))
    for key_hash in (0, points[5][0], points[5][0] + 1, RING_SIZE - 1):
        expected: list[str] = []
        rotated = [pe for pe in points if pe[0] >= key_hash] + [
            pe for pe in points if pe[0] < key_hash
        ]
        for _, endpoint in rotated:
            if endpoint not in expected:
                expected.append(endpoint)
        assert list(ring.walk(key_hash)) == expected


# -- shares and balance --------------------------------------------------------------------


@settings(max_examples=100)
@given(members=endpoint_sets, virtual_nodes=st.integers(1, 32))
def test_shares_cover_the_whole_circle(members: set[str], virtual_nodes: int) -> None:
    """Every member has a share and the shares add up to the whole ring."""
    shares = HashRing(members, virtual_nodes=virtual_nodes).shares()
    assert set(shares) == members
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(share > 0 for share in shares.values())


@pytest.mark.parametrize("n", ENDPOINT_COUNTS)
def test_shares_predict_the_fraction_of_keys_each_endpoint_owns(n: int) -> None:
    """The arc an endpoint owns matches the share of sampled keys whose first choice it is."""
    ring = HashRing(ids("pods", n), virtual_nodes=256)
    counts = Counter(owners(ring))
    for endpoint, share in ring.shares().items():
        # A key count is binomial around KEY_COUNT * share; allow 4.5 standard deviations.
        sigma = (KEY_COUNT * share * (1 - share)) ** 0.5
        assert abs(counts[endpoint] - KEY_COUNT * share) <= 4.5 * sigma


@pytest.mark.parametrize("scheme", sorted(ID_SCHEMES))
@pytest.mark.parametrize("n", ENDPOINT_COUNTS)
def test_each_endpoint_owns_one_nth_of_keys_within_ten_percent_with_1024_points(
    n: int, scheme: str
) -> None:
    """With 1024 virtual nodes every endpoint's share of keys and of the circle is 1/n ± 10%."""
    ring = HashRing(ids(scheme, n), virtual_nodes=1024)
    counts = Counter(owners(ring))
    for endpoint, share in ring.shares().items():
        assert share * n == pytest.approx(1.0, abs=0.10)
        assert counts[endpoint] * n / KEY_COUNT == pytest.approx(1.0, abs=0.10)


@pytest.mark.parametrize("scheme", sorted(ID_SCHEMES))
@pytest.mark.parametrize("n", ENDPOINT_COUNTS)
def test_each_endpoint_owns_one_nth_of_keys_within_a_quarter_with_256_points(
    n: int, scheme: str
) -> None:
    """With 256 virtual nodes every endpoint's share of keys is 1/n ± 25%."""
    # One endpoint's share spreads by about 1/sqrt(256) = 6.25% of 1/n, so ±10% is only 1.6
    # standard deviations: with 5 or more endpoints some endpoint usually lies outside it
    # (10.0.0.{0..4}:8000 reaches +17%). ±25% is 4 standard deviations.
    ring = HashRing(ids(scheme, n), virtual_nodes=256)
    counts = Counter(owners(ring))
    for endpoint, share in ring.shares().items():
        assert share * n == pytest.approx(1.0, abs=0.25)
        assert counts[endpoint] * n / KEY_COUNT == pytest.approx(1.0, abs=0.25)


def test_typical_share_error_with_256_points_is_within_ten_percent() -> None:
    """Across pools of 2 to 16 endpoints, the root-mean-square share error at 256 points is <10%."""
    errors = []
    for scheme in ID_SCHEMES:
        for n in ENDPOINT_COUNTS:
            ring = HashRing(ids(scheme, n), virtual_nodes=256)
            errors += [share * n - 1 for share in ring.shares().values()]
    rms = (sum(e * e for e in errors) / len(errors)) ** 0.5
    assert rms < 0.10


def test_more_virtual_nodes_even_out_the_shares() -> None:
    """The largest share error shrinks as the number of virtual nodes grows."""
    members = ids("static", 8)

    def worst(virtual_nodes: int) -> float:
        shares = HashRing(members, virtual_nodes=virtual_nodes).shares()
        return max(abs(share * 8 - 1) for share in shares.values())

    assert worst(1024) < worst(256) < worst(16) < worst(1)


# -- membership changes --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(ID_SCHEMES))
@pytest.mark.parametrize("n", ENDPOINT_COUNTS)
def test_adding_an_endpoint_moves_few_keys_and_only_to_it(n: int, scheme: str) -> None:
    """Growing from n to n+1 endpoints moves at most 1.3/(n+1) of keys, all to the newcomer."""
    members = ids(scheme, n + 1)
    newcomer = members[-1]
    before = owners(HashRing(members[:-1], virtual_nodes=256))
    after = owners(HashRing(members, virtual_nodes=256))
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert len(moved) / KEY_COUNT <= 1.3 / (n + 1)
    assert {new for _, new in moved} == {newcomer}


@pytest.mark.parametrize("scheme", sorted(ID_SCHEMES))
@pytest.mark.parametrize("n", ENDPOINT_COUNTS)
def test_removing_an_endpoint_moves_only_its_own_keys(n: int, scheme: str) -> None:
    """Shrinking from n+1 to n endpoints moves exactly the keys the leaver owned."""
    members = ids(scheme, n + 1)
    leaver = members[n // 2]
    ring = HashRing(members, virtual_nodes=256)
    before = owners(ring)
    ring.remove(leaver)
    after = owners(ring)
    for old, new in zip(before, after, strict=True):
        if old == leaver:
            assert new != leaver
        else:
            assert new == old


@settings(max_examples=100)
@given(
    members=st.sets(endpoint_ids, min_size=2, max_size=6),
    key_hash=key_hashes,
    data=st.data(),
)
def test_removing_an_endpoint_leaves_the_walk_order_of_the_rest(
    members: set[str], key_hash: int, data: st.DataObject
) -> None:
    """Without one endpoint, a key's walk is the old walk with that endpoint left out."""
    leaver = data.draw(st.sampled_from(sorted(members)))
    ring = HashRing(members, virtual_nodes=8)
    before = list(ring.walk(key_hash))
    ring.remove(leaver)
    assert list(ring.walk(key_hash)) == [e for e in before if e != leaver]


@settings(max_examples=100)
@given(members=endpoint_sets, seed=st.integers(0, 2**32 - 1))
def test_insertion_order_does_not_change_the_ring(members: set[str], seed: int) -> None:
    """Rings built from the same endpoints in any order, or one at a time, are identical."""
    shuffled = sorted(members)
    random.Random(seed).shuffle(shuffled)
    one_by_one = HashRing(virtual_nodes=8)
    for endpoint in shuffled:
        one_by_one.add(endpoint)
    assert_same_ring(HashRing(sorted(members), virtual_nodes=8), one_by_one)
    assert_same_ring(HashRing(reversed(sorted(members)), virtual_nodes=8), one_by_one)


@settings(max_examples=100)
@given(members=endpoint_sets)
def test_updating_to_the_same_members_is_idempotent(members: set[str]) -> None:
    """Applying the same membership twice leaves the ring as it was after the first time."""
    ring = HashRing(virtual_nodes=8)
    ring.update(members)
    once = HashRing(members, virtual_nodes=8)
    ring.update(members)
    ring.update(list(members) + list(members))
    assert_same_ring(ring, once)


@settings(max_examples=100)
@given(snapshots=st.lists(st.sets(st.sampled_from("abcdefgh")), min_size=1, max_size=8))
def test_a_ring_updated_through_any_history_equals_one_built_fresh(
    snapshots: list[set[str]],
) -> None:
    """After a series of updates the ring equals a ring built from the last membership."""
    ring = HashRing(virtual_nodes=8)
    for snapshot in snapshots:
        ring.update(snapshot)
    assert_same_ring(ring, HashRing(snapshots[-1], virtual_nodes=8))


# -- point collisions ----------------------------------------------------------------------


@pytest.fixture
def colliding_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoints "a" and "b" share the point 500; "c" has points of its own."""
    table = {"a": [100, 500], "b": [500, 900], "c": [300, 700]}
    monkeypatch.setattr(ring_module, "endpoint_points", lambda e, _n: list(table[e]))


@pytest.mark.usefixtures("colliding_points")
@pytest.mark.parametrize("order", [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "a"]])
def test_a_shared_point_belongs_to_the_smaller_id_whatever_the_order(order: list[str]) -> None:
    """When two endpoints hash to the same point, the smaller id owns it in every replica."""
    ring = HashRing(virtual_nodes=2)
    for endpoint in order:
        ring.add(endpoint)
    assert ring.first(450) == "a"
    assert ring.first(500) == "a"
    assert list(ring.walk(450)) == ["a", "c", "b"]


@pytest.mark.usefixtures("colliding_points")
def test_a_shared_point_passes_to_the_other_endpoint_when_its_owner_leaves() -> None:
    """Removing the owner of a shared point hands the point to the endpoint that shares it."""
    ring = HashRing(["a", "b", "c"], virtual_nodes=2)
    ring.remove("a")
    assert ring.first(450) == "b"
    assert ring.first(50) == "c"  # a's own point 100 is gone; 300 is next
    # b now owns the arcs (300, 500] and (700, 900]; c owns the rest.
    assert ring.shares()["b"] == pytest.approx(400 / RING_SIZE, rel=1e-9)


@pytest.mark.usefixtures("colliding_points")
def test_a_shared_point_stays_with_its_owner_when_the_other_endpoint_leaves() -> None:
    """Removing the endpoint that does not own a shared point keeps the point where it was."""
    ring = HashRing(["a", "b", "c"], virtual_nodes=2)
    ring.remove("b")
    assert ring.first(450) == "a"
    assert ring.first(800) == "a"  # b's own point 900 is gone; the walk wraps to 100
    assert sorted(ring.walk(800)) == ["a", "c"]
