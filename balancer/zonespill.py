"""How many of a zone's keys leave it, so that a zone preference cannot bury the zone's pods.

With ``routing.prefer_zone`` a keyed request tries the balancer's own zone first, within the
pool-wide CHWBL bound. That bound is per pod and proportional, and it is not enough when the
zone's clients send more than the zone's share of the traffic: at moderate load the pods'
queues sit under their floor while the busy zone's pods run twice the batch of the others'
and decode slower, and when a pod does pass the bound, the keys it sheds come back as soon as
it drops under it, each move a lost cache.

:class:`ZoneSpill` keeps a *share* of the zone's keys off the preference instead: the keys
whose hash falls under it take the plain walk over the whole ring (their home there, in any
zone), the others stay in the zone. The share follows the zone's part of the pool's *work*
(running plus queued requests as the pods report them, else this replica's in-flight
requests) against its part of the endpoints times ``routing.zone_factor``: an integral
controller, raised while the zone carries more than that and lowered while it carries less,
at most :data:`GAIN` per second per unit of relative excess. A key's fate depends only on
its hash and the share, and the share moves slowly, so a key that leaves the zone stays out
while the imbalance lasts instead of flapping with each pod's load; every replica of a zone
reads the same reports, so they keep nearly the same share and send a key to the same pod.

Pure and synchronous: the pool feeds it the work figures and the time.
"""

from __future__ import annotations

import math
from typing import Final

GAIN: Final = 0.5
"""Share of the zone's keys moved per second per unit of relative excess work (the zone
carrying 1.2x its allowance raises the share by 0.1 a second). A request lasts seconds, so
the work answers a change of the share within a few seconds; a higher gain overshoots."""

UPDATE_INTERVAL: Final = 0.5
"""Seconds between two updates of the share (each sums the pool's work: O(endpoints))."""

MAX_STEP: Final = 2.0
"""Longest interval one update integrates (seconds): after a quiet spell the share moves as
after a short one, not by the whole gap."""

_MASK: Final = (1 << 64) - 1


def spread(key_hash: int) -> float:
    """The key's place in [0, 1), independent of where the hash lands on the ring: the
    splitmix64 finalizer, so the keys under a share are not one arc of the ring (whose homes
    would be a few pods) but a sample of all of them."""
    z = key_hash & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return z / 2.0**64


class ZoneSpill:
    """The share of a zone's keys that skip the zone preference; one per pool."""

    __slots__ = ("allowed", "factor", "floor", "share", "updated", "work_share")

    def __init__(self, factor: float, floor: float) -> None:
        self.factor = factor
        """``routing.zone_factor``: the zone may carry this times its share of endpoints."""
        self.floor = floor
        """Work per local endpoint the zone may always carry (requests): under it a nearly
        idle pool keeps everything local whatever the shares say."""
        self.share = 0.0
        """Share of the zone's keys sent over the whole ring, 0 to 1."""
        self.updated = -math.inf
        """When the share was last updated (``time.monotonic()``)."""
        self.work_share = 0.0
        """The zone's part of the pool's work at the last update (for explanations)."""
        self.allowed = 0.0
        """The work the zone was allowed at the last update (requests)."""

    def due(self, now: float) -> bool:
        return now - self.updated >= UPDATE_INTERVAL

    def update(self, now: float, local_work: float, total_work: float, local_endpoints: int,
               endpoints: int) -> None:
        """Move the share by how far the zone's work is over (or under) its allowance."""
        step = UPDATE_INTERVAL if self.updated == -math.inf else min(now - self.updated,
                                                                     MAX_STEP)
        self.updated = now
        if endpoints <= 0 or local_endpoints <= 0:
            self.share = self.work_share = self.allowed = 0.0
            return
        allowed = max(self.factor * local_endpoints / endpoints * total_work,
                      self.floor * local_endpoints)
        self.allowed = allowed
        self.work_share = local_work / total_work if total_work > 0 else 0.0
        excess = (local_work - allowed) / allowed
        self.share = min(1.0, max(0.0, self.share + GAIN * max(-1.0, excess) * step))

    def spills(self, key_hash: int) -> bool:
        """Whether this key skips the zone preference now."""
        return self.share > 0.0 and spread(key_hash) < self.share
