"""A consistent-hash ring with virtual nodes.

Every endpoint is placed at ``virtual_nodes`` points ``xxh3_64(f"{endpoint_id}#{i}")`` on a
64-bit circle; a key hashes to a point and is served by the endpoints met walking clockwise
from it. The positions depend only on the endpoint ids, so every balancer replica that sees
the same endpoints computes the same ring (sidecars agree without talking), and adding or
removing one endpoint moves only the keys whose walk meets it first: about 1/n of them.

Pure and synchronous. Changes cost O(total points) memory copies of the sorted array plus
O(points changed x log total) work in Python, never a full re-hash: points per endpoint are
computed once and kept.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator

import xxhash


def hash_key(key: str) -> int:
    """The ring position of a routing key."""
    return int(xxhash.xxh3_64_intdigest(key.encode("utf-8", "surrogatepass")))


def endpoint_points(endpoint_id: str, virtual_nodes: int) -> list[int]:
    return [
        int(xxhash.xxh3_64_intdigest(f"{endpoint_id}#{i}".encode("utf-8", "surrogatepass")))
        for i in range(virtual_nodes)
    ]


def _merge(points: array[int], new: list[int]) -> array[int]:
    """Two sorted runs merged into one.

    Adding one endpoint to a big ring is the common case (a pod scaled up or ready again):
    1,024 points into, say, 500 x 1,024. Each insertion point is found by bisection and the
    runs between them are copied as slices of an unboxed array (plain memory copies), about
    2 ms there against ~40 ms for re-sorting a list of the lot. Many new points at once
    (building a ring) are cheaper to sort.
    """
    if len(new) * 8 > len(points):
        return array("Q", sorted([*points, *new]))
    out = array("Q")
    start = 0
    for point in new:
        index = bisect.bisect_left(points, point, start)
        out += points[start:index]
        out.append(point)
        start = index
    out += points[start:]
    return out


def _without(points: array[int], removed: list[int]) -> array[int]:
    """A sorted array without some of its (unique) points, the runs between them copied as
    slices, as in :func:`_merge`."""
    out = array("Q")
    start = 0
    for point in removed:
        index = bisect.bisect_left(points, point, start)
        out += points[start:index]
        start = index + 1
    out += points[start:]
    return out


class HashRing:
    """Sorted ring points and their owners.

    On the (astronomically rare) collision of two endpoints' points, the smaller endpoint id
    owns the point, so the outcome does not depend on the order endpoints were added in.
    """

    __slots__ = ("_claims", "_owner", "_points", "_points_of", "virtual_nodes")

    def __init__(self, endpoint_ids: Iterable[str] = (), virtual_nodes: int = 256) -> None:
        if virtual_nodes < 1:
            raise ValueError("virtual_nodes must be >= 1")
        self.virtual_nodes = virtual_nodes
        self._points_of: dict[str, list[int]] = {}
        self._owner: dict[int, str] = {}
        self._claims: dict[int, set[str]] = {}
        """Every endpoint claiming a point, for the rare points claimed more than once."""
        self._points: array[int] = array("Q")
        """Every point, sorted; unboxed, so updates copy memory rather than references."""
        self.update(endpoint_ids)

    def __len__(self) -> int:
        return len(self._points_of)

    def __contains__(self, endpoint_id: object) -> bool:
        return endpoint_id in self._points_of

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._points_of)

    def update(self, endpoint_ids: Iterable[str]) -> None:
        """Make the ring hold exactly these endpoints, touching only what changed."""
        wanted = set(endpoint_ids)
        current = set(self._points_of)
        for endpoint_id in sorted(current - wanted):
            self.remove(endpoint_id)
        added = sorted(wanted - current)
        if added:
            self._add_many(added)

    def add(self, endpoint_id: str) -> None:
        if endpoint_id not in self._points_of:
            self._add_many([endpoint_id])

    def _add_many(self, endpoint_ids: list[str]) -> None:
        new_points: list[int] = []
        for endpoint_id in endpoint_ids:
            points = endpoint_points(endpoint_id, self.virtual_nodes)
            self._points_of[endpoint_id] = points
            for point in points:
                holder = self._owner.get(point)
                if holder == endpoint_id:
                    continue  # one endpoint's own points collided: nothing to share
                if holder is None:
                    self._owner[point] = endpoint_id
                    new_points.append(point)
                    continue
                self._claims.setdefault(point, {holder}).add(endpoint_id)
                if endpoint_id < holder:
                    self._owner[point] = endpoint_id
        new_points.sort()
        self._points = _merge(self._points, new_points)

    def remove(self, endpoint_id: str) -> None:
        points = self._points_of.pop(endpoint_id, None)
        if points is None:
            return
        freed = set()
        for point in set(points):
            claims = self._claims.get(point)
            if claims is not None:
                # A colliding endpoint takes the point over.
                claims.discard(endpoint_id)
                self._owner[point] = min(claims)
                if len(claims) == 1:
                    del self._claims[point]
            else:
                del self._owner[point]
                freed.add(point)
        if freed:
            self._points = _without(self._points, sorted(freed))

    def walk(self, key_hash: int) -> Iterator[str]:
        """Distinct endpoints in clockwise order from the key's position."""
        points = self._points
        count = len(points)
        if not count:
            return
        owner = self._owner
        distinct = len(self._points_of)
        start = bisect.bisect_left(points, key_hash)
        seen: set[str] = set()
        for offset in range(count):
            endpoint_id = owner[points[(start + offset) % count]]
            if endpoint_id not in seen:
                seen.add(endpoint_id)
                yield endpoint_id
                if len(seen) == distinct:
                    return

    def first(self, key_hash: int) -> str | None:
        """The endpoint that owns a key when load does not matter."""
        points = self._points
        if not points:
            return None
        index = bisect.bisect_left(points, key_hash)
        return self._owner[points[index % len(points)]]

    def shares(self) -> dict[str, float]:
        """Fraction of the 64-bit circle each endpoint owns (what share of keys it gets)."""
        points = self._points
        if not points:
            return {}
        size = 1 << 64
        result = dict.fromkeys(self._points_of, 0.0)
        previous = points[-1] - size
        for point in points:
            # The arc (previous, point] belongs to the owner of point.
            result[self._owner[point]] += (point - previous) / size
            previous = point
        return result


class RingCache:
    """Rings over subsets of a pool's endpoints, one per distinct member set.

    A model (a LoRA adapter, say) that only some endpoints serve is routed by CHWBL over a
    ring of just those endpoints. Many models share a member set (the adapters loaded on the
    same pods), so rings are kept by the frozenset of their members and built once: a request
    costs a dict lookup, not a ring. A ring depends only on its members' ids (as
    :class:`HashRing` does), so every replica that sees the same endpoints serving a model
    builds the same ring and sends a key to the same endpoint.

    Pure and synchronous. The owner calls :meth:`keep` with the member sets in use after the
    endpoints or their models change; rings of sets no longer in use are dropped.
    """

    __slots__ = ("_rings", "virtual_nodes")

    def __init__(self, virtual_nodes: int = 256) -> None:
        if virtual_nodes < 1:
            raise ValueError("virtual_nodes must be >= 1")
        self.virtual_nodes = virtual_nodes
        self._rings: dict[frozenset[str], HashRing] = {}

    def __len__(self) -> int:
        return len(self._rings)

    def __contains__(self, members: object) -> bool:
        return members in self._rings

    def ring(self, members: frozenset[str]) -> HashRing:
        """The ring of exactly these endpoints, built on first use."""
        ring = self._rings.get(members)
        if ring is None:
            ring = self._rings[members] = HashRing(sorted(members), self.virtual_nodes)
        return ring

    def keep(self, in_use: Iterable[frozenset[str]]) -> None:
        """Drop the rings of member sets not in ``in_use``."""
        wanted = set(in_use)
        for members in [m for m in self._rings if m not in wanted]:
            del self._rings[members]
