"""The comparison and sweep plots: their pure data preparation exactly, the drawing briefly."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from loadtest.plots import (
    KNOWN_COLOURS,
    contender_colours,
    in_flight_series,
    plot_comparison,
    plot_sweep,
    ratio_words,
    ttft_over_time,
)
from loadtest.stats import OK, Sample, Window

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def request(
    due: float,
    *,
    sent: float | None = None,
    e2e: float | None = None,
    pod: str | None = "pod-0",
    ttft: float | None = None,
    outcome: str = OK,
) -> Sample:
    return Sample(conversation_id="c", turn=0, due_s=due, sent_s=due if sent is None else sent,
                  e2e_s=e2e, ttft_s=ttft, pod=pod, outcome=outcome)


def values(series: list[tuple[float, float]]) -> list[float]:
    return [v for _, v in series]


# -- in_flight_series ---------------------------------------------------------------------------


def test_request_spanning_buckets_partially() -> None:
    # In flight from 1.5 to 4.0 s: half of bucket [0, 2), all of [2, 4).
    series = in_flight_series([request(1.5, e2e=2.5)], 2.0)
    assert list(series) == ["pod-0"]
    assert [t for t, _ in series["pod-0"]] == [0.0, 2.0]
    assert values(series["pod-0"]) == pytest.approx([0.25, 1.0])


def test_two_overlapping_requests() -> None:
    samples = [request(0.0, e2e=3.0), request(1.0, e2e=1.5)]  # [0, 3) and [1, 2.5)
    series = in_flight_series(samples, 1.0)
    assert values(series["pod-0"]) == pytest.approx([1.0, 2.0, 1.5])


def test_in_flight_counts_from_sent_not_due() -> None:
    # Due at 0, waited in the client until 1, ended at 2: in flight at the pod only 1..2.
    series = in_flight_series([request(0.0, sent=1.0, e2e=2.0)], 1.0)
    assert values(series["pod-0"]) == pytest.approx([0.0, 1.0])


def test_pods_share_buckets_and_are_sorted_naturally() -> None:
    samples = [request(0.0, e2e=1.0, pod="pod-10"), request(2.0, e2e=2.0, pod="pod-2")]
    series = in_flight_series(samples, 1.0)
    assert list(series) == ["pod-2", "pod-10"]
    assert values(series["pod-10"]) == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert values(series["pod-2"]) == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_samples_without_pod_send_or_end_are_skipped() -> None:
    never_sent = request(0.0, e2e=5.0)
    never_sent.sent_s = None
    samples = [
        request(0.0, e2e=1.0),
        request(0.0, e2e=9.0, pod=None),
        request(0.0, e2e=None),
        never_sent,
    ]
    series = in_flight_series(samples, 1.0)
    assert list(series) == ["pod-0"]
    assert values(series["pod-0"]) == pytest.approx([1.0])
    assert in_flight_series([request(0.0, e2e=None)], 1.0) == {}


def test_bucket_boundaries_do_not_lose_time_to_rounding() -> None:
    series = in_flight_series([request(0.3, e2e=0.4)], 0.1)  # in flight 0.3 .. 0.7
    assert sum(values(series["pod-0"])) * 0.1 == pytest.approx(0.4)
    assert values(series["pod-0"]) == pytest.approx([0, 0, 0, 1, 1, 1, 1], abs=1e-9)


def test_total_in_flight_time_is_conserved() -> None:
    rng = random.Random(7)
    samples = [request(due := rng.uniform(0, 30), sent=due + rng.uniform(0, 1),
                       e2e=rng.uniform(1.5, 8), pod=f"pod-{rng.randrange(3)}")
               for _ in range(200)]
    series = in_flight_series(samples, 2.5)
    busy = sum(s.e2e_s - s.wait_s for s in samples if s.e2e_s is not None and s.wait_s is not None)
    assert sum(sum(values(points)) for points in series.values()) * 2.5 == pytest.approx(busy)


def test_bucket_must_be_positive() -> None:
    with pytest.raises(ValueError, match="bucket_s"):
        in_flight_series([], 0)
    with pytest.raises(ValueError, match="bucket_s"):
        ttft_over_time([], -1)


# -- ttft_over_time -----------------------------------------------------------------------------


def test_ttft_over_time_buckets_by_due_time() -> None:
    samples = [
        request(0.5, e2e=2, ttft=0.1),
        request(1.0, e2e=2, ttft=0.3),
        request(4.9, e2e=2, ttft=0.2),
        request(5.0, e2e=2, ttft=9.0, outcome="timeout"),  # failed: no TTFT counted
        request(12.0, e2e=2, ttft=1.0),
    ]
    buckets = ttft_over_time(samples, 5.0)
    assert [start for start, _, _ in buckets] == [0.0, 5.0, 10.0]
    _, p50, p90 = buckets[0]
    assert p50 == pytest.approx(0.2)
    assert p90 == pytest.approx(0.28)  # linear interpolation, as loadtest.stats.percentile
    assert buckets[1] == (5.0, None, None)  # only a failure: a gap, not a zero
    assert buckets[2] == (10.0, 1.0, 1.0)
    assert ttft_over_time([], 5.0) == []


# -- ratio_words --------------------------------------------------------------------------------


def test_ratio_words_signs_and_rounding() -> None:
    mine = {"ttft_p50_s": 0.45, "ttft_p99_s": 0.06, "output_tokens_per_s": 2040.0,
            "goodput_per_s": 13.0}
    other = {"ttft_p50_s": 1.0, "ttft_p99_s": 1.0, "output_tokens_per_s": 1000.0,
             "goodput_per_s": 10.0}
    assert ratio_words(mine, other) == (
        "TTFT p50 \u221255%, TTFT p99 \u221294%, output tokens/s +104%, goodput +30%"
    )


def test_ratio_words_rounds_halves_away_from_zero_and_marks_no_change() -> None:
    assert ratio_words({"goodput_per_s": 1.125}, {"goodput_per_s": 1.0}) == "goodput +13%"
    assert ratio_words({"goodput_per_s": 0.875}, {"goodput_per_s": 1.0}) == "goodput \u221213%"
    assert ratio_words({"goodput_per_s": 1.004}, {"goodput_per_s": 1.0}) == "goodput ±0%"


def test_ratio_words_skips_missing_or_zero_figures() -> None:
    mine: dict[str, Any] = {"ttft_p50_s": 0.5, "ttft_p99_s": None, "output_tokens_per_s": 0.0,
                            "goodput_per_s": 3.0}
    other: dict[str, Any] = {"ttft_p50_s": 0.25, "ttft_p99_s": 2.0, "output_tokens_per_s": 10.0}
    assert ratio_words(mine, other) == "TTFT p50 +100%"
    assert ratio_words({}, other) == ""
    assert ratio_words({"goodput_per_s": 2.0}, {"goodput_per_s": 0}) == ""


# -- contender_colours --------------------------------------------------------------------------


def test_known_colours_are_fixed_and_distinct() -> None:
    names = list(KNOWN_COLOURS)
    colours = contender_colours(names)
    assert colours == KNOWN_COLOURS
    assert len(set(colours.values())) == len(names)
    assert colours["chwbl"] == "#d62728"


def test_colours_are_stable_whatever_the_order() -> None:
    names = ["chwbl", "round-robin", "chwbl x4", "chwbl x2", "mystery", "other", "haproxy"]
    first = contender_colours(names)
    again = contender_colours(list(reversed(names)))
    assert first == again
    assert list(first) == names
    assert len(set(first.values())) == len(names)


def test_variants_get_a_shade_of_their_base() -> None:
    colours = contender_colours(["chwbl", "chwbl x2", "chwbl x4", "least-request (tuned)"])
    assert len(set(colours.values())) == 4
    for variant in ("chwbl x2", "chwbl x4"):
        r, g, b = (int(colours[variant][i : i + 2], 16) for i in (1, 3, 5))
        assert r > g and r > b  # still a red
    r, g, b = (int(colours["least-request (tuned)"][i : i + 2], 16) for i in (1, 3, 5))
    assert b > r and b > g  # still a blue
    # "chwblx" is not a variant of chwbl: a name, not a separator, follows.
    assert contender_colours(["chwblx"])["chwblx"] not in KNOWN_COLOURS.values()


# -- drawing ------------------------------------------------------------------------------------


def assert_pngs(paths: list[Path], names: list[str]) -> None:
    assert [p.name for p in paths] == names
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5000


def synthetic_run(seed: int, slow: float) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for i in range(120):
        due = i * 0.25
        ttft = rng.uniform(0.05, 0.3) * slow
        samples.append(Sample(
            conversation_id=str(i % 10), turn=i // 10, due_s=due, sent_s=due + 0.01,
            ttft_s=ttft, e2e_s=ttft + rng.uniform(1, 3), output_tokens=100,
            pod=f"pod-{rng.randrange(3)}", outcome="timeout" if i == 50 else OK,
        ))
    return samples


def test_plot_comparison_writes_pngs(tmp_path: Path) -> None:
    series = {"chwbl": synthetic_run(1, 1.0), "round-robin": synthetic_run(2, 2.5),
              "chwbl x2": synthetic_run(3, 1.2)}
    rows: list[dict[str, Any]] = [
        {"contender": "chwbl", "output_tokens_per_s": 2040.0, "hit_rate": 0.62,
         "output_tokens_per_s_min": 1990.0, "output_tokens_per_s_max": 2100.0,
         "hit_rate_min": 0.6, "hit_rate_max": 0.65},
        {"contender": "round-robin", "output_tokens_per_s": 1000.0, "hit_rate": None},
        {"contender": "chwbl x2", "output_tokens_per_s": None, "hit_rate": 0.5},
    ]
    paths = plot_comparison(series, rows, tmp_path / "plots",
                            "multi-turn, 4 conv/s, 3 pods, 30 s (5 s warm-up), 1 repeat",
                            window=Window(5.0, 28.0))
    assert_pngs(paths, ["pod_load.png", "ttft_over_time.png", "ttft_cdf.png", "throughput.png",
                        "hit_rate.png"])


def test_plot_comparison_survives_empty_runs(tmp_path: Path) -> None:
    failed = [request(1.0, e2e=None, pod=None, outcome="connect")]
    paths = plot_comparison({"random": failed}, [{"contender": "random",
                            "output_tokens_per_s": None, "hit_rate": None}], tmp_path, "")
    assert len(paths) == 5
    assert all(p.stat().st_size > 0 for p in paths)


def test_plot_sweep_writes_png(tmp_path: Path) -> None:
    def points(capacity: float) -> list[dict[str, Any]]:
        out = []
        for rate in (2.0, 4.0, 6.0, 8.0):
            share = 1.0 if rate <= capacity else capacity / rate
            out.append({"rate": rate, "offered_per_s": rate * 0.98, "ttft_p50_s": 0.1 / share,
                        "ttft_p99_s": 0.5 / share**3, "output_tokens_per_s": 200 * rate * share,
                        "goodput_per_s": rate * 0.98 * share, "invalid": rate == 8.0})
        return out

    curves = {"chwbl": points(6.5), "round-robin": points(3.0), "random": []}
    knees = {"chwbl": 5.88, "round-robin": 1.96, "random": None}
    paths = plot_sweep(curves, knees, tmp_path, "multi-turn, 4 pods, 20 s per rate")
    assert_pngs(paths, ["sweep.png"])
