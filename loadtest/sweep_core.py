"""The pure parts of a rate sweep: which rates to try, and where each contender's knee is.

A sweep plays the same workload at a ladder of rates and asks, per contender, up to which
offered rate it still serves (nearly) everything within the SLO. That rate is the *knee*:

    the highest offered rate such that this point **and every lower-rate point** meet
    ``goodput_per_s >= share * offered_per_s`` (``share`` is 0.95 by default).

Why "every lower-rate point" and not simply the highest passing point: once a system
collapses, a later point can pass by luck (a quiet stretch in the trace, a queue that had not
yet built up in a short run), and a knee that jumped to such a point would overstate capacity.
The first failure on the way up ends the search.

Further rules, so the answer does not depend on how the points happen to be stored:

* Points are considered in order of the ``rate`` asked for (the ladder), not in the order
  given, nor by the requests actually offered: in a closed-loop workload (multi-turn chat,
  where each turn waits for the previous reply) a saturated contender is offered *fewer*
  requests than at a lower rate, so ordering by ``offered_per_s`` would put collapsed points
  among healthy ones. A point without ``rate`` is placed by its ``offered_per_s``; one with
  neither is malformed (``ValueError``). The knee is reported on the same axis.
* Points tied on the rate axis must all pass: a failure ties with nothing, so the knee is
  always strictly below the first failing rate.
* A point with a missing, non-finite or non-positive figure **fails**: no measurement is not
  evidence of meeting the SLO.
* A point marked ``invalid`` (the load generator, not the system under test, was the limit:
  host-limited) is **skipped**: it neither passes nor fails, because it measured the client.
* The comparison allows a relative slack of 1e-9, so goodput exactly equal to ``share``
  times offered passes despite float rounding (19 of 20 requests good is 95%).

No imports beyond the standard library: the sweep driver and the tests use it without
matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DEFAULT_SHARE", "find_knee", "knee_line", "rate_ladder"]

DEFAULT_SHARE = 0.95
"""Goodput must reach this share of the offered rate for a point to pass."""

_SLACK = 1e-9
"""Relative tolerance of the pass test, for float rounding only."""


def rate_ladder(low: float, high: float, steps: int) -> list[float]:
    """``steps`` evenly spaced rates from ``low`` to ``high``, both included.

    Even spacing (not geometric) because the interesting region, the knee, is usually in the
    upper part of a ladder chosen around the expected capacity; the last rate is exactly
    ``high`` so the report shows the rate that was asked for.
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if steps < 2:
        raise ValueError(f"a ladder needs at least 2 steps, got {steps}")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"rates must be finite, got low={low} high={high}")
    if low <= 0:
        raise ValueError(f"the lowest rate must be above 0 requests/s, got {low}")
    if low >= high:
        raise ValueError(f"the lowest rate must be below the highest, got low={low} high={high}")
    span = high - low
    return [low + span * i / (steps - 1) for i in range(steps - 1)] + [float(high)]


def _number(value: Any) -> float | None:
    """A finite float, or None for anything missing, non-numeric or non-finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _position(point: Mapping[str, Any]) -> float:
    """Where a point sits on the rate axis: the rate asked for, else its offered rate."""
    for key in ("rate", "offered_per_s"):
        value = _number(point.get(key))
        if value is not None:
            return value
    raise ValueError(f"sweep point has neither offered_per_s nor rate: {dict(point)!r}")


def _passes(point: Mapping[str, Any], share: float) -> bool:
    offered = _number(point.get("offered_per_s"))
    goodput = _number(point.get("goodput_per_s"))
    if offered is None or goodput is None or offered <= 0 or goodput < 0:
        return False
    return goodput >= share * offered * (1 - _SLACK)


def _valid_in_order(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The points that count (not ``invalid``), by position on the rate axis (stable)."""
    return sorted((p for p in points if not p.get("invalid")), key=_position)


def _check_share(share: float) -> None:
    if not 0 < share <= 1:
        raise ValueError(f"share must be within (0, 1], got {share}")


def find_knee(points: Sequence[Mapping[str, Any]], share: float = DEFAULT_SHARE) -> float | None:
    """The knee: the highest ``offered_per_s`` up to which every point passes (see the module
    docstring for the rules); None if the lowest valid point already fails or none is valid.
    """
    _check_share(share)
    ordered = _valid_in_order(points)
    first_failure = _first_failure(ordered, share)
    passing = [_position(p) for p in ordered
               if first_failure is None or _position(p) < first_failure]
    return max(passing, default=None)


def _first_failure(ordered: Sequence[Mapping[str, Any]], share: float) -> float | None:
    """Position of the lowest failing point; None if all pass. A failing point tied with a
    passing one wins the tie, so the knee is strictly below any failure."""
    return next((_position(p) for p in ordered if not _passes(p, share)), None)


def _rate(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.2f}"


def knee_line(
    name: str,
    knee: float | None,
    points: Sequence[Mapping[str, Any]],
    *,
    share: float = DEFAULT_SHARE,
    unit: str = "requests/s",
) -> str:
    """One sentence for the report: where ``name``'s knee is, bracketed by the first failing
    rate, or why there is none. ``knee`` is :func:`find_knee` of ``points`` (passed in so the
    caller computes it once and the words cannot disagree with the plot)."""
    _check_share(share)
    goal = f"goodput ≥ {share:.0%} of offered"
    ordered = _valid_in_order(points)
    if not ordered:
        return f"{name}: no knee: no valid points (every run was host-limited or none ran)"
    if knee is None:
        lowest = _position(ordered[0])
        return (f"{name}: no knee: goodput below {share:.0%} of offered already at "
                f"{_rate(lowest)} {unit}")
    failure = _first_failure(ordered, share)
    if failure is None:
        return (f"{name}: knee at {_rate(knee)} {unit} or higher ({goal} at every rate "
                "tried)")
    return (f"{name}: knee at {_rate(knee)} {unit} ({goal} up to there; "
            f"below from {_rate(failure)} {unit})")
