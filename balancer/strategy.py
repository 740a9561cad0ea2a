"""Routing strategies: given a key and the current loads, pick an endpoint and say why.

Pure and synchronous: no I/O, no metrics, no logging. Each strategy is a :class:`Chooser`;
each decision is a :class:`Choice` value that the proxy records (metrics, logs, response
headers) and that ``balancer route`` and ``/debug/route`` print for operators.

**CHWBL** — consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
arXiv:1608.01350). Walk the ring clockwise from the key over distinct endpoints and take the
first whose load after this request stays within

    bound = max(min_bound, ceil(c * (total_in_flight + 1) / n))

(an endpoint in slow start, within its share of it, at least one request)
With c >= 1 some ring endpoint is always within it (``total_in_flight`` counts the ring's
endpoints only; if every load were >= bound the total would be >= n * bound >= c * (total +
1) > total), so a request overflows to the next endpoint on the ring only when its first
choice is genuinely busier than average. Every replica that sees the same endpoints makes the
same first choice for a key; where it overflows to depends on that replica's own in-flight
counts. The floor (``min_bound``) keeps a hot prefix from cascading over hundreds of endpoints
when the pool is nearly idle. Only ``exclude`` (endpoints a retry tried, that are full or that
asked for a pause) can leave no endpoint within the bound; then a fallback takes the least
loaded endpoint probed.

The load is whatever the pool hands in, the same walk either way (``Choice.signal`` says
which): this process's in-flight requests per endpoint, or each pod's queue as the pods
report it (``balancer.load``), bounded with its own factor and floor. On queues the bound
lets a key stay on the pod that holds its prefix for as long as that pod does not queue more
than its share, whatever its batch size, and every replica of a fleet reads the same reports.

**Zone preference** (``prefer``, from ``routing.prefer_zone``): walk the ring from the key over
the preferred endpoints only (the balancer's own zone), taking the first within the bound; only
when none is within it, walk the whole ring as above (the request leaves the zone). The bound
is the same pool-wide one, so a zone keeps its keys until its endpoints are busier than c times
the *pool's* average, not its own: a busy zone spills into an idle one rather than queueing.
The preferred endpoints are met in the order a ring of just them would give (an endpoint's
points depend only on its id), so every replica in a zone sends a key to the same endpoint,
and replicas in different zones each keep it on their own zone's endpoint (one cache copy per
zone). No preference, or every candidate preferred, decides exactly as without one.

Cost: O(log V) to find the key's position and O(k) for the k endpoints probed (with a
preference, the endpoints of other zones met before the zone's first are walked past too).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from typing import Literal, NamedTuple, Protocol

from balancer.ring import HashRing

Outcome = Literal["primary", "overflow", "session", "fallback", "affinity"]

# Probe and Choice are named tuples rather than frozen dataclasses: as immutable, but built
# for every request, and a frozen dataclass's __init__ sets each field through
# object.__setattr__, which makes a Choice cost more than twice as much to build.


class Probe(NamedTuple):
    """One endpoint considered during a decision, with its load at the time."""

    endpoint: str
    load: float


class Choice(NamedTuple):
    """An endpoint picked for a request, and what the strategy saw on the way."""

    endpoint: str
    outcome: Outcome
    """primary: the key's own endpoint (or the only pick of a keyless strategy);
    overflow: a later endpoint on the ring because earlier ones were at the bound;
    session: the first choice for an explicit session key;
    fallback: nothing was within the bound, the least loaded was taken;
    affinity: the endpoint holding the stored response the request names (no bound)."""
    probes: tuple[Probe, ...] = ()
    bound: float | None = None
    signal: str = "in-flight"
    """The load the bound was taken on: "in-flight" (this process's requests) or "queue"
    (the pods' reported queues)."""
    preferred: bool | None = None
    """With a zone preference: whether the endpoint is one of the preferred (True) or the
    request spilled to another zone (False); None: no preference was given."""


class Chooser(Protocol):
    """A routing strategy (``config.Strategy`` names which one a pool uses)."""

    def choose(
        self,
        key_hash: int,
        candidates: Sequence[str],
        load: Mapping[str, float],
        total_load: float,
        *,
        session: bool = False,
        exclude: Collection[str] = (),
        ramp: Mapping[str, float] | None = None,
        prefer: Collection[str] = (),
    ) -> Choice | None:
        """Pick one of ``candidates`` (all routable) but none of ``exclude`` (endpoints a
        retry already tried), or None if there are none. ``ramp``: endpoints in slow start,
        each with the share of the bound it may take now (0..1); ``prefer``: endpoints to
        favour (the balancer's zone). Only CHWBL reads either; the keyless strategies ignore
        them."""
        ...


def chwbl_bound(total_load: float, endpoints: int, load_factor: float, min_bound: int) -> int:
    """Most load (requests in flight, or queued) one endpoint may hold once this request is
    placed."""
    if endpoints <= 0:
        return min_bound
    return max(min_bound, math.ceil(load_factor * (total_load + 1) / endpoints))


def _ramped(share: float, bound: int) -> int:
    """The load an endpoint in slow start may hold: its share of the bound, at least one
    request. (Called only for such endpoints: the common probe compares with the bound
    itself, no call.)"""
    return max(1, math.floor(share * bound))


def _outcome(probes: list[Probe], session: bool) -> Outcome:
    """The first endpoint probed took it (primary, or session for a session key), or a
    later one (overflow)."""
    if len(probes) == 1:
        return "session" if session else "primary"
    return "overflow"


class BoundedLoad:
    """CHWBL over a :class:`HashRing` whose members are the routable endpoints."""

    def __init__(self, ring: HashRing, load_factor: float = 1.25, min_bound: int = 1,
                 signal: str = "in-flight") -> None:
        self.ring = ring
        self.load_factor = load_factor
        self.min_bound = min_bound
        self.signal = signal
        """What the loads it is given count (recorded on each choice)."""

    def choose(
        self,
        key_hash: int,
        candidates: Sequence[str],
        load: Mapping[str, float],
        total_load: float,
        *,
        session: bool = False,
        exclude: Collection[str] = (),
        ramp: Mapping[str, float] | None = None,
        prefer: Collection[str] = (),
    ) -> Choice | None:
        """See :class:`Chooser`; ``prefer``: endpoints (on the ring) to try first, within
        the same bound (the balancer's zone; see the module's docstring)."""
        n = len(candidates)
        if n == 0:
            return None
        bound = chwbl_bound(total_load, n, self.load_factor, self.min_bound)
        probes: list[Probe] = []
        if prefer:
            choice = self._walk_preferred(key_hash, load, bound, probes, session, exclude,
                                          prefer, ramp)
            if choice is not None:
                return choice
        for endpoint in self.ring.walk(key_hash):
            if exclude and endpoint in exclude:
                continue
            if prefer and endpoint in prefer:
                continue  # probed above, over the bound
            current = load.get(endpoint, 0)
            probes.append(Probe(endpoint, current))
            limit = bound if not ramp or endpoint not in ramp else _ramped(ramp[endpoint], bound)
            if current + 1 <= limit:
                return Choice(endpoint, _outcome(probes, session), tuple(probes), bound,
                              self.signal, False if prefer else None)
        if not probes:
            return None
        least = min(probes, key=lambda p: p.load)
        return Choice(least.endpoint, "fallback", tuple(probes), bound, self.signal,
                      (least.endpoint in prefer) if prefer else None)

    def _walk_preferred(self, key_hash: int, load: Mapping[str, float], bound: int,
                        probes: list[Probe], session: bool, exclude: Collection[str],
                        prefer: Collection[str],
                        ramp: Mapping[str, float] | None) -> Choice | None:
        """The first preferred endpoint on the walk within ``bound``, or None (every one
        probed is in ``probes``). Stops once every preferred endpoint was met, so a zone
        whose endpoints are all busy costs one walk over them, not the whole ring twice."""
        left = len(prefer)
        for endpoint in self.ring.walk(key_hash):
            if endpoint not in prefer:
                continue
            left -= 1
            if not (exclude and endpoint in exclude):
                current = load.get(endpoint, 0)
                probes.append(Probe(endpoint, current))
                limit = (bound if not ramp or endpoint not in ramp
                         else _ramped(ramp[endpoint], bound))
                if current + 1 <= limit:
                    return Choice(endpoint, _outcome(probes, session), tuple(probes), bound,
                                  self.signal, True)
            if not left:
                break
        return None


class LeastRequest:
    """Power of two choices: sample two endpoints, take the less loaded.

    Nearly as balanced as a full scan at O(1) cost, and it avoids the herd effect of always
    picking the global minimum when several balancers share endpoints.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(
        self,
        key_hash: int,
        candidates: Sequence[str],
        load: Mapping[str, float],
        total_load: float,
        *,
        session: bool = False,
        exclude: Collection[str] = (),
        ramp: Mapping[str, float] | None = None,
        prefer: Collection[str] = (),
    ) -> Choice | None:
        if exclude:
            candidates = [c for c in candidates if c not in exclude]
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            only = candidates[0]
            return Choice(only, "primary", (Probe(only, load.get(only, 0)),))
        i, j = self.rng.sample(range(n), 2)
        a, b = candidates[i], candidates[j]
        pa, pb = Probe(a, load.get(a, 0)), Probe(b, load.get(b, 0))
        best = pa if pa.load <= pb.load else pb
        return Choice(best.endpoint, "primary", (pa, pb))


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(
        self,
        key_hash: int,
        candidates: Sequence[str],
        load: Mapping[str, float],
        total_load: float,
        *,
        session: bool = False,
        exclude: Collection[str] = (),
        ramp: Mapping[str, float] | None = None,
        prefer: Collection[str] = (),
    ) -> Choice | None:
        if exclude:
            candidates = [c for c in candidates if c not in exclude]
        if not candidates:
            return None
        endpoint = candidates[self._next % len(candidates)]
        self._next += 1
        return Choice(endpoint, "primary", (Probe(endpoint, load.get(endpoint, 0)),))


class Random:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(
        self,
        key_hash: int,
        candidates: Sequence[str],
        load: Mapping[str, float],
        total_load: float,
        *,
        session: bool = False,
        exclude: Collection[str] = (),
        ramp: Mapping[str, float] | None = None,
        prefer: Collection[str] = (),
    ) -> Choice | None:
        if exclude:
            candidates = [c for c in candidates if c not in exclude]
        if not candidates:
            return None
        endpoint = self.rng.choice(candidates)
        return Choice(endpoint, "primary", (Probe(endpoint, load.get(endpoint, 0)),))
