"""KV block pool with an LRU prefix cache, as in vLLM's automatic prefix caching.

The pool has a fixed number of blocks. A block is in one of three states:

* **reserved**: held by a running sequence, not (yet) identified by a hash: room for tokens the
  sequence has still to compute, or a block whose hash another block already has;
* **cached and pinned**: identified by its chained hash and referenced by at least one running
  sequence; never evicted;
* **cached and evictable**: identified by its hash, referenced by nobody, kept in LRU order; it
  is reused by a later prompt with the same prefix, or evicted when a reservation needs room.

Everything else is free. Pure and synchronous.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class CacheFullError(RuntimeError):
    """A reservation asked for more blocks than are free."""


class PrefixCache:
    """A pool of `capacity` KV blocks whose computed blocks are found again by hash."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least one block")
        self.capacity = capacity
        self._refs: dict[int, int] = {}
        """Reference count of every cached block, by hash."""
        self._lru: OrderedDict[int, None] = OrderedDict()
        """Cached blocks nobody references, least recently used first."""
        self._reserved = 0
        self.evictions = 0
        """Blocks evicted since creation."""

    @property
    def used_blocks(self) -> int:
        """Blocks held by running sequences (pinned cached blocks plus reservations)."""
        return len(self._refs) - len(self._lru) + self._reserved

    @property
    def free_blocks(self) -> int:
        """Blocks a reservation can take now (free ones plus evictable cached ones)."""
        return self.capacity - self.used_blocks

    @property
    def cached_blocks(self) -> int:
        """Blocks identified by a hash, pinned or not."""
        return len(self._refs)

    @property
    def evictable_blocks(self) -> int:
        """Cached blocks that nobody references."""
        return len(self._lru)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by running sequences (vLLM's KV cache usage)."""
        return self.used_blocks / self.capacity

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._refs

    def refcount(self, block_hash: int) -> int:
        """Number of running sequences referencing a cached block (0 if evictable or absent)."""
        return self._refs.get(block_hash, 0)

    def lru_order(self) -> list[int]:
        """Evictable blocks in eviction order (the first is evicted first)."""
        return list(self._lru)

    def match(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks of `hashes` that are cached. Changes nothing."""
        refs = self._refs
        for count, block_hash in enumerate(hashes):
            if block_hash not in refs:
                return count
        return len(hashes)

    def pin(self, hashes: Iterable[int]) -> None:
        """Reference cached blocks for a running sequence, so they cannot be evicted."""
        for block_hash in hashes:
            refs = self._refs[block_hash]
            if refs == 0:
                del self._lru[block_hash]
            self._refs[block_hash] = refs + 1

    def reserve(self, count: int) -> None:
        """Hold `count` blocks for a running sequence, evicting least recently used ones."""
        if count < 0:
            raise ValueError("count must not be negative")
        if count > self.free_blocks:
            raise CacheFullError(f"{count} blocks asked, {self.free_blocks} free")
        self._reserved += count
        while len(self._refs) + self._reserved > self.capacity:
            victim, _ = self._lru.popitem(last=False)
            del self._refs[victim]
            self.evictions += 1

    def commit(self, block_hash: int) -> bool:
        """Turn one reserved block into a cached block with hash `block_hash`.

        Returns True if the sequence now references the cached block (and the reservation is
        used up), False if a block with this hash is already cached: the sequence's copy then
        stays a plain reserved block, as vLLM keeps a duplicate block out of its hash table.
        """
        if self._reserved < 1:
            raise CacheFullError("commit without a reserved block")
        if block_hash in self._refs:
            return False
        self._reserved -= 1
        self._refs[block_hash] = 1
        return True

    def release(self, hashes: Sequence[int], reserved: int) -> None:
        """Drop a finished sequence's references and its `reserved` blocks.

        Blocks nobody references any more become evictable, most recently used. They are
        released from the last to the first, so a prefix outlives its tails, as in vLLM.
        """
        if reserved < 0 or reserved > self._reserved:
            raise ValueError("releasing more blocks than are reserved")
        self._reserved -= reserved
        for block_hash in reversed(hashes):
            refs = self._refs[block_hash] - 1
            self._refs[block_hash] = refs
            if refs == 0:
                self._lru[block_hash] = None
