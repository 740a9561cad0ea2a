"""The simulator's KV block pool and LRU prefix cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.simserver.cache import CacheFullError, PrefixCache


def _cached(cache: PrefixCache, hashes: list[int]) -> list[int]:
    """Reserve and commit `hashes` as one sequence would, returning what it now holds."""
    cache.reserve(len(hashes))
    held = [h for h in hashes if cache.commit(h)]
    return held


def test_match_counts_leading_cached_blocks() -> None:
    """A lookup finds the longest cached prefix and stops at the first miss."""
    cache = PrefixCache(10)
    held = _cached(cache, [1, 2, 3])
    cache.release(held, 0)
    assert cache.match([1, 2, 3, 4]) == 3
    assert cache.match([1, 9, 3]) == 1
    assert cache.match([9, 1]) == 0
    assert cache.match([]) == 0


def test_release_makes_blocks_evictable_with_the_prefix_last() -> None:
    """Released blocks join the LRU tail-first, so a prefix outlives its tails."""
    cache = PrefixCache(10)
    held = _cached(cache, [1, 2, 3])
    assert cache.lru_order() == []
    cache.release(held, 0)
    assert cache.lru_order() == [3, 2, 1]
    assert cache.used_blocks == 0
    assert cache.cached_blocks == 3


def test_lru_eviction_order() -> None:
    """The least recently released blocks are evicted first; a reuse refreshes a block."""
    cache = PrefixCache(6)
    cache.release(_cached(cache, [1, 2]), 0)
    cache.release(_cached(cache, [3, 4]), 0)
    cache.release(_cached(cache, [5, 6]), 0)
    assert cache.lru_order() == [2, 1, 4, 3, 6, 5]
    # Reusing [1, 2] pins them, and releasing puts them at the most recent end.
    cache.pin([1, 2])
    cache.release([1, 2], 0)
    assert cache.lru_order() == [4, 3, 6, 5, 2, 1]
    cache.reserve(3)
    assert cache.lru_order() == [5, 2, 1]
    assert 4 not in cache and 3 not in cache and 6 not in cache
    assert cache.evictions == 3


def test_pinned_blocks_are_never_evicted() -> None:
    """Blocks referenced by a running sequence stay, and do not count as free."""
    cache = PrefixCache(4)
    held = _cached(cache, [1, 2])
    assert cache.free_blocks == 2
    cache.reserve(2)
    assert 1 in cache and 2 in cache
    with pytest.raises(CacheFullError):
        cache.reserve(1)
    cache.release([], 2)
    cache.release(held, 0)
    assert cache.free_blocks == 4


def test_pinning_takes_an_evictable_block_out_of_the_lru() -> None:
    """A cache hit pins the block: it leaves the LRU and counts as used again."""
    cache = PrefixCache(4)
    cache.release(_cached(cache, [1, 2]), 0)
    cache.pin([1])
    assert cache.lru_order() == [2]
    assert cache.refcount(1) == 1
    assert cache.used_blocks == 1
    cache.pin([1])
    assert cache.refcount(1) == 2
    cache.release([1], 0)
    assert cache.lru_order() == [2]
    cache.release([1], 0)
    assert cache.lru_order() == [2, 1]


def test_duplicate_commit_stays_reserved() -> None:
    """A block computed twice is cached once; the second copy stays a private reservation."""
    cache = PrefixCache(4)
    first = _cached(cache, [7])
    cache.reserve(1)
    assert cache.commit(7) is False
    assert cache.used_blocks == 2
    cache.release(first, 1)
    assert cache.used_blocks == 0
    assert cache.lru_order() == [7]


def test_bad_uses_are_refused() -> None:
    """Negative or impossible operations raise instead of corrupting the pool."""
    with pytest.raises(ValueError):
        PrefixCache(0)
    cache = PrefixCache(2)
    with pytest.raises(CacheFullError):
        cache.commit(1)
    with pytest.raises(ValueError):
        cache.reserve(-1)
    with pytest.raises(ValueError):
        cache.release([], 1)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["run", "finish"]),
        st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=6),
        st.integers(min_value=0, max_value=4),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(min_value=1, max_value=12), ops=_OPS)
def test_pool_invariants_hold_under_any_workload(
    capacity: int, ops: list[tuple[str, list[int], int]]
) -> None:
    """Whatever sequences come and go, the pool never overflows and pins hold.

    A "sequence" here is a chain of block ids (a prefix path), which it reuses as far as cached,
    then reserves room for the rest plus some output blocks, then commits its new blocks.
    """
    cache = PrefixCache(capacity)
    running: list[tuple[list[int], int]] = []  # (held hashes, reserved left)
    for op, path, extra in ops:
        if op == "finish" and running:
            held, reserved = running.pop(0)
            cache.release(held, reserved)
        else:
            # Chain ids so that a block's identity depends on its prefix, like chained hashes.
            chain = [hash(tuple(path[: i + 1])) for i in range(len(path))]
            hit = cache.match(chain)
            new = len(chain) - hit + extra
            evictable_hits = sum(1 for h in chain[:hit] if cache.refcount(h) == 0)
            if new > cache.free_blocks - evictable_hits:
                with pytest.raises(CacheFullError):
                    cache.reserve(cache.free_blocks + 1)
                continue
            cache.pin(chain[:hit])
            cache.reserve(new)
            held = list(chain[:hit])
            reserved = new
            for h in chain[hit:]:
                if cache.commit(h):
                    held.append(h)
                    reserved -= 1
            running.append((held, reserved))
        # Invariants.
        pinned = {h for held, _ in running for h in held}
        assert all(h in cache for h in pinned), "a pinned block was evicted"
        assert all(cache.refcount(h) == 0 for h in cache.lru_order())
        assert cache.cached_blocks + sum(r for _, r in running) <= capacity
        assert cache.used_blocks == len(pinned) + sum(r for _, r in running)
        assert 0 <= cache.free_blocks <= capacity
    for held, reserved in running:
        cache.release(held, reserved)
    assert cache.used_blocks == 0
    assert cache.evictable_blocks == cache.cached_blocks
