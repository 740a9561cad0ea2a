"""The pure parts of a rate sweep: the rate ladder and the knee rule."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtest.sweep_core import find_knee, knee_line, rate_ladder


def point(offered: float | None, share: float | None, **extra: Any) -> dict[str, Any]:
    """A sweep point whose goodput is ``share`` of what was offered."""
    goodput = None if offered is None or share is None else offered * share
    return {"offered_per_s": offered, "goodput_per_s": goodput, **extra}


# -- rate_ladder --------------------------------------------------------------------------------


def test_ladder_is_evenly_spaced_with_both_ends() -> None:
    assert rate_ladder(2, 10, 5) == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert rate_ladder(0.5, 1.5, 2) == [0.5, 1.5]


def test_ladder_ends_exactly_at_high() -> None:
    ladder = rate_ladder(0.1, 0.7, 7)
    assert ladder[-1] == 0.7
    assert ladder == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


@pytest.mark.parametrize(
    ("low", "high", "steps", "message"),
    [
        (1, 10, 1, "at least 2 steps"),
        (1, 10, 0, "at least 2 steps"),
        (1, 10, 2.5, "integer"),
        (1, 10, True, "integer"),
        (10, 1, 3, "below the highest"),
        (5, 5, 3, "below the highest"),
        (0, 5, 3, "above 0"),
        (-1, 5, 3, "above 0"),
        (1, float("inf"), 3, "finite"),
        (float("nan"), 5, 3, "finite"),
    ],
)
def test_ladder_rejects_bad_input(low: float, high: float, steps: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rate_ladder(low, high, steps)


# -- find_knee ----------------------------------------------------------------------------------


def test_clean_knee() -> None:
    points = [point(2, 1.0), point(4, 0.99), point(6, 0.96), point(8, 0.7), point(10, 0.3)]
    assert find_knee(points) == 6


def test_never_meets() -> None:
    assert find_knee([point(2, 0.9), point(4, 0.5)]) is None


def test_always_meets_gives_highest_point() -> None:
    assert find_knee([point(2, 1.0), point(4, 1.0), point(6, 0.95)]) == 6


def test_exactly_the_share_passes() -> None:
    # 19 good of 20 offered over 10 s: float rounding must not fail it.
    assert find_knee([{"offered_per_s": 20 / 10, "goodput_per_s": 19 / 10}]) == 2.0


def test_noisy_point_above_the_collapse_is_ignored() -> None:
    points = [point(2, 1.0), point(4, 0.98), point(6, 0.6), point(8, 0.97), point(10, 0.2)]
    assert find_knee(points) == 4


def test_invalid_points_are_skipped() -> None:
    points = [
        point(2, 1.0),
        point(4, 0.5, invalid=True),  # host-limited: would fail, but measured the client
        point(6, 0.97),
        point(8, 1.0, invalid=True),  # would pass, but does not count either
        point(10, 0.5),
    ]
    assert find_knee(points) == 6
    assert find_knee([point(2, 1.0, invalid=True)]) is None


def test_unsorted_input() -> None:
    points = [point(8, 0.7), point(2, 1.0), point(6, 0.96), point(10, 0.3), point(4, 0.99)]
    assert find_knee(points) == 6


def test_missing_figures_fail() -> None:
    assert find_knee([point(2, 1.0), point(4, None), point(6, 1.0)]) == 2
    assert find_knee([point(2, 1.0), {"rate": 3.0, "goodput_per_s": 3.0}, point(6, 1.0)]) == 2
    assert find_knee([point(2, 1.0), point(4, float("nan")), point(6, 1.0)]) == 2
    assert find_knee([point(0, 1.0)]) is None


def test_points_are_ordered_by_the_rate_asked_for_not_the_requests_offered() -> None:
    """In a closed-loop workload a saturated contender is offered fewer requests than at a
    lower rate; the knee follows the ladder, and is reported on it."""
    points = [
        {"rate": 12, "offered_per_s": 70.0, "goodput_per_s": 70.0},
        {"rate": 16, "offered_per_s": 82.0, "goodput_per_s": 82.0},
        {"rate": 20, "offered_per_s": 77.0, "goodput_per_s": 47.0},  # collapsed, offered less
        {"rate": 24, "offered_per_s": 69.0, "goodput_per_s": 14.0},
    ]
    assert find_knee(points) == 16
    assert knee_line("chwbl", 16, points, unit="new conversations/s") == (
        "chwbl: knee at 16.0 new conversations/s (goodput ≥ 95% of offered up to there; "
        "below from 20.0 new conversations/s)")


def test_failure_tied_with_a_pass_wins() -> None:
    assert find_knee([point(2, 1.0), point(4, 1.0), point(4, 0.5)]) == 2


def test_point_without_any_rate_is_rejected() -> None:
    with pytest.raises(ValueError, match="neither offered_per_s nor rate"):
        find_knee([{"goodput_per_s": 1.0}])


def test_share_is_validated_and_used() -> None:
    points = [point(2, 1.0), point(4, 0.9), point(6, 0.5)]
    assert find_knee(points, share=0.9) == 4
    with pytest.raises(ValueError, match="share"):
        find_knee(points, share=0)
    with pytest.raises(ValueError, match="share"):
        find_knee(points, share=1.5)


@given(
    rates=st.lists(
        st.floats(min_value=0.1, max_value=1000, allow_nan=False), min_size=1, max_size=12,
        unique=True,
    ),
    permilles=st.lists(st.integers(min_value=0, max_value=1000), min_size=12, max_size=12),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_knee_is_the_last_rate_meeting_the_share(
    rates: list[float], permilles: list[int], seed: int
) -> None:
    """Goodput shares falling as the rate rises: the knee is the last rate with share ≥ 95%,
    whatever order the points come in."""
    rates = sorted(rates)
    shares = sorted((k / 1000 for k in permilles[: len(rates)]), reverse=True)
    points = [point(rate, share) for rate, share in zip(rates, shares, strict=True)]
    random.Random(seed).shuffle(points)
    meeting = [rate for rate, share in zip(rates, shares, strict=True) if share >= 0.95]
    assert find_knee(points) == (meeting[-1] if meeting else None)


# -- knee_line ----------------------------------------------------------------------------------


def test_knee_line_words() -> None:
    points = [point(4.6, 1.0), point(9.2, 0.97), point(13.8, 0.96), point(18.4, 0.6)]
    knee = find_knee(points)
    assert knee_line("chwbl", knee, points) == (
        "chwbl: knee at 13.8 requests/s (goodput ≥ 95% of offered up to there; "
        "below from 18.4 requests/s)"
    )


def test_knee_line_without_knee() -> None:
    points = [point(6.0, 0.5), point(4.0, 0.8)]
    assert knee_line("round-robin", find_knee(points), points) == (
        "round-robin: no knee: goodput below 95% of offered already at 4.0 requests/s"
    )


def test_knee_line_when_every_rate_passes() -> None:
    points = [point(0.5, 1.0), point(1.0, 1.0)]
    line = knee_line("sticky-oracle", find_knee(points), points)
    assert line == ("sticky-oracle: knee at 1.0 requests/s or higher "
                    "(goodput ≥ 95% of offered at every rate tried)")


def test_knee_line_with_only_invalid_points() -> None:
    points = [point(2, 1.0, invalid=True)]
    assert "no valid points" in knee_line("random", find_knee(points), points)
