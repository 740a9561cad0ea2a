"""Plots of a comparison or a rate sweep that a person can read at a glance.

What the plots show, and why:

* ``pod_load.png``: the **time-weighted number of requests in flight** at each pod over time,
  one panel per contender. Requests *served* per pod hide imbalance: a pod that got the long
  conversations serves as many requests as the others while carrying twice the load. In
  flight is what fills a pod's batch and KV cache, so that is what is drawn.
* ``ttft_over_time.png``: TTFT p50 and p90 per 5-s bucket, to see queues build (or drain)
  during a run, which one percentile over the whole window averages away.
* ``ttft_cdf.png``: the whole TTFT distribution, with p50 and p99 marked and labelled.
* ``throughput.png``, ``hit_rate.png``: one bar per contender, with min-max whiskers over
  repeats when the rows carry them.
* ``sweep.png``: latency, throughput and goodput against the offered rate, with each
  contender's knee (see :mod:`loadtest.sweep_core`) marked.

Every figure carries a title and, under it, a subtitle with the run's parameters, so a PNG
that travels alone (pasted in an issue) still says what it measured. Every contender keeps
one colour across all plots (:func:`contender_colours`).

The data preparation (:func:`in_flight_series`, :func:`ttft_over_time`, :func:`ratio_words`)
is pure and tested exactly; matplotlib is imported lazily inside the plotting functions, with
the non-interactive Agg backend, so importing this module is cheap and needs no display.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.stats import Sample, Window, percentile

__all__ = [
    "FALLBACK_COLOURS",
    "KNOWN_COLOURS",
    "MINUS",
    "contender_colours",
    "in_flight_series",
    "plot_comparison",
    "plot_sweep",
    "ratio_words",
    "ttft_over_time",
]

KNOWN_COLOURS: dict[str, str] = {
    "chwbl": "#d62728",  # tab:red, the strongest: the contender the plots are about
    "least-request": "#1f77b4",  # tab:blue
    "round-robin": "#ff7f0e",  # tab:orange
    "random": "#7f7f7f",  # tab:grey: the baseline nobody would run
    "sticky-oracle": "#2ca02c",  # tab:green: the upper bound
    "haproxy": "#9467bd",  # tab:purple
    "vllm-router": "#8c564b",  # tab:brown
}
"""Fixed colours of the known contenders (tab10, the most distinct qualitative palette)."""

FALLBACK_COLOURS = (
    "#17becf", "#bcbd22", "#e377c2", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
)
"""For unknown names: tab10's unused colours, then dark tab20b ones (none near a known one)."""

_VARIANT_SHADES = (-0.3, 0.35, -0.5, 0.55)
"""How a variant of a known contender ("chwbl x4") is shaded from its base colour: negative
mixes in black (darker), positive white (lighter); more variants than this use the cycle."""

PRIMARY = "chwbl"
TTFT_BUCKET_S = 5.0
DPI = 110
_LOAD_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_MAX_LOAD_BUCKETS = 150
_POD_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                "#666666")
"""Dark2 for pods: a palette unlike the contenders', since pods are not contenders."""


# -- colours ------------------------------------------------------------------------------------


def _mix(colour: str, amount: float) -> str:
    """``colour`` (#rrggbb) mixed with black (``amount`` < 0) or white (> 0)."""
    channels = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    target = 255 if amount > 0 else 0
    weight = abs(amount)
    mixed = [round(c + (target - c) * weight) for c in channels]
    return "#" + "".join(f"{c:02x}" for c in mixed)


def _base_name(name: str) -> str | None:
    """The known contender ``name`` is a variant of ("chwbl x4" → "chwbl"), if any: the
    longest known name it starts with, followed by something other than a letter or digit."""
    bases = [k for k in KNOWN_COLOURS
             if len(name) > len(k) and name.startswith(k) and not name[len(k)].isalnum()]
    return max(bases, key=len, default=None)


def contender_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour (#rrggbb) per name, the same in every plot.

    Known contenders have fixed colours (:data:`KNOWN_COLOURS`); a variant of one (a fleet
    size, a setting: "chwbl x4") gets a darker or lighter shade of its base; any other name
    takes the next colour of :data:`FALLBACK_COLOURS`. Variants and unknown names are
    assigned in sorted order, so the result does not depend on the order of ``names``.
    """
    colours: dict[str, str] = {}
    variants: dict[str, list[str]] = defaultdict(list)
    strangers: list[str] = []
    for name in sorted(set(names)):
        if name in KNOWN_COLOURS:
            colours[name] = KNOWN_COLOURS[name]
        elif (base := _base_name(name)) is not None:
            variants[base].append(name)
        else:
            strangers.append(name)
    for base, members in variants.items():
        for i, name in enumerate(members):
            if i < len(_VARIANT_SHADES):
                colours[name] = _mix(KNOWN_COLOURS[base], _VARIANT_SHADES[i])
            else:
                strangers.append(name)
    for i, name in enumerate(sorted(strangers)):
        colours[name] = FALLBACK_COLOURS[i % len(FALLBACK_COLOURS)]
    return {name: colours[name] for name in names}


def _emphasis(name: str) -> dict[str, Any]:
    """Line width and z-order: the primary contender (and its variants) on top, thicker."""
    primary = name == PRIMARY or _base_name(name) == PRIMARY
    return {"linewidth": 2.4 if primary else 1.5, "zorder": 3 if primary else 2}


# -- pure data preparation ----------------------------------------------------------------------


def _check_bucket(bucket_s: float) -> None:
    if not (math.isfinite(bucket_s) and bucket_s > 0):
        raise ValueError(f"bucket_s must be a positive number of seconds, got {bucket_s}")


def _bucket_of(t: float, bucket_s: float) -> int:
    """Index of the bucket ``[k * bucket_s, (k + 1) * bucket_s)`` holding ``t``, robust to
    the rounding of ``t / bucket_s`` (0.7 / 0.1 is 6.999...)."""
    k = math.floor(t / bucket_s)
    if (k + 1) * bucket_s <= t:
        return k + 1
    if k * bucket_s > t:
        return k - 1
    return k


def in_flight_series(
    samples: Sequence[Sample], bucket_s: float
) -> dict[str, list[tuple[float, float]]]:
    """Per pod, the time-weighted mean number of requests in flight in each bucket.

    A request is in flight at its pod from ``sent_s`` to ``end_s``; in each bucket it counts
    with the share of the bucket it overlaps, so the value is exactly the mean in flight over
    the bucket, not a count of requests that started there. Samples without a pod, a send
    time or an end (never sent, never answered) are left out.

    Every pod gets the same buckets, from the run's start (0, or earlier if a request was sent
    before it) to the last end, as ``(bucket start, mean in flight)``; the last bucket is
    averaged over its full length even if the run ended inside it.
    """
    _check_bucket(bucket_s)
    spans: list[tuple[str, float, float]] = []
    for sample in samples:
        end = sample.end_s
        if sample.pod is None or sample.sent_s is None or end is None or end < sample.sent_s:
            continue
        spans.append((sample.pod, sample.sent_s, end))
    if not spans:
        return {}
    first = min(0, _bucket_of(min(sent for _, sent, _ in spans), bucket_s))
    last_end = max(end for _, _, end in spans)
    stop = _bucket_of(last_end, bucket_s)
    stop += 1 if stop * bucket_s < last_end else 0  # buckets first .. stop - 1
    stop = max(stop, first + 1)
    load: dict[str, list[float]] = {pod: [0.0] * (stop - first)
                                    for pod in sorted({pod for pod, _, _ in spans}, key=_natural)}
    for pod, sent, end in spans:
        for k in range(_bucket_of(sent, bucket_s), _bucket_of(end, bucket_s) + 1):
            overlap = min(end, (k + 1) * bucket_s) - max(sent, k * bucket_s)
            if overlap > 0 and first <= k < stop:
                load[pod][k - first] += overlap / bucket_s
    return {pod: [((first + i) * bucket_s, value) for i, value in enumerate(values)]
            for pod, values in load.items()}


def ttft_over_time(
    samples: Sequence[Sample], bucket_s: float
) -> list[tuple[float, float | None, float | None]]:
    """``(bucket start, TTFT p50, TTFT p90)`` of the completed requests, bucketed by due time.

    Buckets run from the run's start (0) to the last due request of any outcome, so a stretch
    in which nothing completed shows as a gap (None), not as nothing at all.
    """
    _check_bucket(bucket_s)
    if not samples:
        return []
    first = min(0, _bucket_of(min(s.due_s for s in samples), bucket_s))
    last = _bucket_of(max(s.due_s for s in samples), bucket_s)
    ttfts: dict[int, list[float]] = defaultdict(list)
    for sample in samples:
        if sample.ok and sample.ttft_s is not None:
            ttfts[_bucket_of(sample.due_s, bucket_s)].append(sample.ttft_s)
    return [(k * bucket_s, percentile(ttfts[k], 50), percentile(ttfts[k], 90))
            for k in range(first, last + 1)]


RATIO_FIGURES = (
    ("ttft_p50_s", "TTFT p50"),
    ("ttft_p99_s", "TTFT p99"),
    ("output_tokens_per_s", "output tokens/s"),
    ("goodput_per_s", "goodput"),
)
"""The figures :func:`ratio_words` compares, in the order it names them."""


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


MINUS = "\u2212"
"""The minus sign of :func:`ratio_words` (U+2212): as wide as the plus, not a hyphen."""


def _percent_change(mine: float, other: float) -> str:
    """``mine`` against ``other`` in whole percents, halves away from zero, Unicode minus."""
    change = (mine - other) * 100 / other
    whole = math.floor(abs(change) + 0.5)
    if whole == 0:
        return "±0%"
    return f"{'+' if change > 0 else MINUS}{whole}%"


def ratio_words(mine: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    """How ``mine`` compares with ``other``, e.g. ``"TTFT p50 -55%, TTFT p99 -94%, output
    tokens/s +104%, goodput +30%"`` (with :data:`MINUS`, not a hyphen, for the decreases).

    Always a percent change against ``other`` (+104% is 2.04 times, -50% is half), never a
    factor, so one line cannot mix two conventions. A figure missing, non-positive or not
    finite on either side is left out; "" if none is left.
    """
    parts = []
    for key, label in RATIO_FIGURES:
        a, b = _finite(mine.get(key)), _finite(other.get(key))
        if a is None or b is None or a <= 0 or b <= 0:
            continue
        parts.append(f"{label} {_percent_change(a, b)}")
    return ", ".join(parts)


# -- matplotlib helpers -------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _natural(name: str) -> list[Any]:
    """Sort key putting "pod-2" before "pod-10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _header(fig: Any, title: str, subtitle: str) -> float:
    """Title and (wrapped, smaller, grey) subtitle at the top of ``fig``; returns the figure
    fraction below them, for ``tight_layout(rect=...)``. Heights are in inches, so the header
    looks the same whatever the figure's size."""
    height = fig.get_figheight()
    title_lines = title.count("\n") + 1
    lines = textwrap.wrap(subtitle, width=max(40, int(fig.get_figwidth() * 14)))
    fig.text(0.5, 1 - 0.08 / height, title, ha="center", va="top", fontsize=13,
             fontweight="bold")
    below_title = 0.08 + 0.27 * title_lines + 0.05
    if lines:
        fig.text(0.5, 1 - below_title / height, "\n".join(lines), ha="center", va="top",
                 fontsize=9, color="0.35")
    return float(1 - (below_title + 0.17 * len(lines) + 0.05) / height)


def _save(plt: Any, fig: Any, path: Path, top: float) -> Path:
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _shade_outside(ax: Any, window: Window | None, x_min: float, x_max: float) -> None:
    """Grey over the warm-up and cool-down, which the statistics leave out."""
    if window is None:
        return
    style = {"color": "0.6", "alpha": 0.18, "linewidth": 0, "zorder": 0}
    if window.start_s > x_min:
        ax.axvspan(x_min, window.start_s, **style)
    if window.end_s < x_max:
        ax.axvspan(window.end_s, x_max, **style)


def _mark_down(ax: Any, down: Sequence[tuple[float, float]]) -> None:
    """Hatching over each span in which a restarted pod was down (``compare --restart``): no
    colour, since the contenders have them all."""
    for start, back in down:
        ax.axvspan(start, back, facecolor="none", edgecolor="0.45", hatch="//", linewidth=0,
                   zorder=0)
        ax.axvline(start, color="0.3", linestyle=":", linewidth=1, zorder=0)


def _tick(value: float) -> str:
    return f"{value:g}"


def _log_labels(ax: Any, which: str) -> None:
    """Plain numbers (0.2, 1, 5) on a log axis instead of powers of ten, with ticks between
    the decades labelled too: all of them within one decade, the 2s and 5s within three."""
    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    low, high = ax.get_ylim() if which == "y" else ax.get_xlim()
    span = high / low if low > 0 else math.inf
    shown = range(1, 10) if span <= 10 else (2, 5) if span <= 1000 else ()

    def minor(value: float, _: Any) -> str:
        if value <= 0:
            return ""
        leading = round(value / 10 ** math.floor(math.log10(value)))
        return _tick(value) if leading in shown else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: _tick(value)))
    axis.set_minor_formatter(FuncFormatter(minor))


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _auto_load_bucket(span_s: float) -> float:
    """The smallest of a few round bucket lengths that keeps a pod's line to at most
    :data:`_MAX_LOAD_BUCKETS` points."""
    return next((b for b in _LOAD_BUCKETS_S if span_s / b <= _MAX_LOAD_BUCKETS),
                _LOAD_BUCKETS_S[-1])


def _no_data(ax: Any, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


# -- comparison plots ---------------------------------------------------------------------------


def plot_comparison(
    series: Mapping[str, Sequence[Sample]],
    rows: Sequence[Mapping[str, Any]],
    out_dir: Path,
    subtitle: str,
    *,
    window: Window | None = None,
    load_bucket_s: float | None = None,
    ttft_bucket_s: float = TTFT_BUCKET_S,
    down: Sequence[tuple[float, float]] = (),
) -> list[Path]:
    """Write ``pod_load.png``, ``ttft_over_time.png``, ``ttft_cdf.png``, ``throughput.png``
    and ``hit_rate.png`` into ``out_dir``; returns their paths.

    ``series`` maps each contender to the samples of one representative run; ``rows`` are the
    summary rows (``contender``, ``output_tokens_per_s``, ``hit_rate``, optionally
    ``<key>_min`` and ``<key>_max`` over repeats). ``window`` is the measured window: shaded
    outside on the time plots, and the only requests in the CDF. ``load_bucket_s`` defaults to
    a round length giving at most 150 points per line. ``down``: spans (start, end, seconds
    since the start) in which a restarted pod was down, hatched on the time plots.
    """
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*series, *(str(r["contender"]) for r in rows)]))
    colours = contender_colours(names)
    return [
        _plot_pod_load(plt, series, out_dir / "pod_load.png", subtitle, colours, window,
                       load_bucket_s, down),
        _plot_ttft_over_time(plt, series, out_dir / "ttft_over_time.png", subtitle, colours,
                             window, ttft_bucket_s, down),
        _plot_ttft_cdf(plt, series, out_dir / "ttft_cdf.png", subtitle, colours, window),
        _plot_bars(plt, rows, "output_tokens_per_s", out_dir / "throughput.png", subtitle,
                   colours),
        _plot_bars(plt, rows, "hit_rate", out_dir / "hit_rate.png", subtitle, colours),
    ]


def _busiest_over_mean(
    load: Mapping[str, Sequence[tuple[float, float]]], pods: Sequence[str],
    window: Window | None, bucket_s: float,
) -> float | None:
    """Mean in flight of the busiest pod over the mean of all pods, in the measured window."""
    totals = []
    for pod in pods:
        totals.append(math.fsum(
            value for start, value in load.get(pod, ())
            if window is None or (start >= window.start_s and start + bucket_s <= window.end_s)
        ))
    mean = math.fsum(totals) / len(totals) if totals else 0.0
    return max(totals) / mean if mean > 0 else None


def _plot_pod_load(
    plt: Any, series: Mapping[str, Sequence[Sample]], path: Path, subtitle: str,
    colours: Mapping[str, str], window: Window | None, bucket_s: float | None,
    down: Sequence[tuple[float, float]] = (),
) -> Path:
    ends = [end for samples in series.values() for s in samples if (end := s.end_s) is not None]
    x_max = max([*ends, window.end_s if window else 0.0, 1.0])
    bucket = bucket_s if bucket_s is not None else _auto_load_bucket(x_max)
    loads = {name: in_flight_series(samples, bucket) for name, samples in series.items()}
    # Each contender runs against its own fresh pods: a panel shows only its pods, numbered
    # in natural order, so "pod 1" has one colour in every panel.

    count = max(1, len(series))
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 2.9 * nrows + 1.2),
                             sharex=True, sharey=True, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (name, load) in zip(flat, loads.items(), strict=False):
        _shade_outside(ax, window, 0.0, x_max)
        _mark_down(ax, down)
        starts = sorted({start for points in load.values() for start, _ in points})
        pods = sorted(load, key=_natural)
        for i, pod in enumerate(pods):
            values = dict(load.get(pod, ()))
            ax.plot([t + bucket / 2 for t in starts], [values.get(t, 0.0) for t in starts],
                    color=_POD_COLOURS[i % len(_POD_COLOURS)], linewidth=1.2,
                    label=f"pod {i + 1}")
        if starts and pods:
            even = [math.fsum(dict(load.get(p, ())).get(t, 0.0) for p in pods) / len(pods)
                    for t in starts]
            ax.plot([t + bucket / 2 for t in starts], even, color="black", linestyle=":",
                    linewidth=1.2, label="even split (mean of pods)")
        else:
            _no_data(ax, "no requests with a pod")
        ratio = _busiest_over_mean(load, pods, window, bucket)
        note = f"busiest pod +{round((ratio - 1) * 100)}% over mean" if ratio else ""
        ax.set_title(f"{name}" + (f"  ({note})" if note else ""), color=colours[name],
                     fontsize=10, fontweight="bold" if name == PRIMARY else "normal")
        ax.set_xlim(0, x_max)
        ax.grid(True, alpha=0.3)
    for ax in flat[len(loads):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("requests in flight")
    for ax in axes[-1]:
        ax.set_xlabel("time since start (s)")
    handles, labels = max((ax.get_legend_handles_labels() for ax in flat),
                          key=lambda pair: len(pair[0]))
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(6, len(handles)), fontsize="small", frameon=False)
    hatched = "; hatched: a pod down" if down else ""
    top = _header(fig, f"Load per pod over time (time-weighted requests in flight, "
                       f"{bucket:g}-s buckets; grey: not measured{hatched})", subtitle)
    return _save(plt, fig, path, top)


def _plot_ttft_over_time(
    plt: Any, series: Mapping[str, Sequence[Sample]], path: Path, subtitle: str,
    colours: Mapping[str, str], window: Window | None, bucket_s: float,
    down: Sequence[tuple[float, float]] = (),
) -> Path:
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, 5.2))
    x_max = 1.0
    drawn = False
    for name, samples in series.items():
        buckets = ttft_over_time(samples, bucket_s)
        if not buckets:
            continue
        xs = [start + bucket_s / 2 for start, _, _ in buckets]
        x_max = max(x_max, buckets[-1][0] + bucket_s)
        p50 = [math.nan if v is None else v for _, v, _ in buckets]
        p90 = [math.nan if v is None else v for _, _, v in buckets]
        style = _emphasis(name)
        ax.plot(xs, p50, color=colours[name], **style)
        ax.plot(xs, p90, color=colours[name], linestyle="--",
                **{**style, "linewidth": style["linewidth"] * 0.8})
        drawn = drawn or any(v > 0 for v in [*p50, *p90] if not math.isnan(v))
    if window is not None:
        x_max = max(x_max, window.end_s)
    _shade_outside(ax, window, 0.0, x_max)
    _mark_down(ax, down)
    ax.set_xlim(0, x_max)
    if drawn:
        ax.set_yscale("log")
        _log_labels(ax, "y")
    else:
        _no_data(ax, "no completed requests")
    ax.set_xlabel(f"time since start (s), by when requests were due; {bucket_s:g}-s buckets")
    ax.set_ylabel("time to first token (s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colours[name], **_emphasis(name), label=name)
               for name in series]
    handles += [Line2D([], [], color="0.3", label="p50"),
                Line2D([], [], color="0.3", linestyle="--", label="p90")]
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    hatched = "; hatched: a pod down" if down else ""
    top = _header(fig, f"TTFT over time (p50 solid, p90 dashed; grey: not measured{hatched})",
                  subtitle)
    return _save(plt, fig, path, top)


def _plot_ttft_cdf(
    plt: Any, series: Mapping[str, Sequence[Sample]], path: Path, subtitle: str,
    colours: Mapping[str, str], window: Window | None,
) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.2))
    drawn = 0
    for name, samples in series.items():
        ttfts = sorted(s.ttft_s for s in samples if s.ok and s.ttft_s is not None
                       and (window is None or window.holds(s.due_s)))
        if not ttfts:
            continue
        n = len(ttfts)
        p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
        assert p50 is not None and p99 is not None
        colour = colours[name]
        ax.plot(ttfts, [(i + 1) / n for i in range(n)], color=colour, drawstyle="steps-post",
                label=f"{name}: p50 {_seconds(p50)}, p99 {_seconds(p99)} (n={n})",
                **_emphasis(name))
        for value, level, marker, tag in ((p50, 0.5, "o", "p50"), (p99, 0.99, "D", "p99")):
            ax.plot([value], [level], marker=marker, color=colour, markersize=6, zorder=4,
                    markeredgecolor="white")
            ax.annotate(f"{tag} {_seconds(value)}", (value, level), xytext=(6, -10 - 9 * drawn),
                        textcoords="offset points", fontsize=7, color=colour, zorder=5,
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                              "edgecolor": "none", "alpha": 0.75})
        drawn += 1
    if drawn:
        ax.set_xscale("log")
        _log_labels(ax, "x")
        ax.legend(fontsize="small", loc="lower right")
    else:
        _no_data(ax, "no completed requests")
    for level in (0.5, 0.99):
        ax.axhline(level, color="0.6", linewidth=0.8, linestyle=":", zorder=1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("share of completed requests")
    ax.grid(True, which="both", alpha=0.3)
    scope = "requests due in the measured window" if window is not None else "all requests"
    top = _header(fig, f"TTFT distribution ({scope}; left and steep is better)", subtitle)
    return _save(plt, fig, path, top)


_BAR_FIGURES = {
    "output_tokens_per_s": ("Output tokens/s (higher is better)", "output tokens/s"),
    "hit_rate": ("Prefix-cache hit rate (pods' counters; higher is better)",
                 "prefix-cache hit rate"),
}


def _bar_label(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if key == "hit_rate" else f"{value:,.0f}"


def _plot_bars(
    plt: Any, rows: Sequence[Mapping[str, Any]], key: str, path: Path, subtitle: str,
    colours: Mapping[str, str],
) -> Path:
    title, ylabel = _BAR_FIGURES[key]
    names = [str(r["contender"]) for r in rows]
    values = [_finite(r.get(key)) for r in rows]
    heights = [v if v is not None else 0.0 for v in values]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2.5), 4.8))
    xs = list(range(len(rows)))
    ax.bar(xs, heights, color=[colours[n] for n in names], width=0.7, zorder=2)
    tops = list(heights)
    whiskers = False
    for i, (row, value) in enumerate(zip(rows, values, strict=True)):
        low, high = _finite(row.get(f"{key}_min")), _finite(row.get(f"{key}_max"))
        if value is None or low is None or high is None:
            continue
        ax.errorbar([i], [value], yerr=[[max(0.0, value - low)], [max(0.0, high - value)]],
                    fmt="none", ecolor="black", elinewidth=1.2, capsize=5, zorder=3)
        tops[i] = max(value, high)
        whiskers = True
    for i, value in enumerate(values):
        ax.annotate(_bar_label(key, value), (i, tops[i]), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs, names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    if key == "hit_rate":
        from matplotlib.ticker import PercentFormatter

        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.margins(y=0.12)
    ax.grid(True, axis="y", alpha=0.3, zorder=0)
    if whiskers:
        ax.text(0.99, 0.99, "whiskers: lowest and highest over repeats", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="0.35")
    top = _header(fig, title, subtitle)
    return _save(plt, fig, path, top)


# -- sweep plot ---------------------------------------------------------------------------------


_SWEEP_PANELS = (
    ("ttft_p50_s", "TTFT p50 (lower is better)", "seconds, log scale", True),
    ("ttft_p99_s", "TTFT p99 (lower is better)", "seconds, log scale", True),
    ("output_tokens_per_s", "Output tokens/s", "tokens/s", False),
    ("goodput_share", "Goodput: share of offered requests completed within the SLO",
     "share of offered", False),
)


def _knee_label(name: str, knee: float | None, unit: str) -> str:
    return f"{name} (no knee)" if knee is None else f"{name} (knee {knee:g} {unit})"


def plot_sweep(
    points: Mapping[str, Sequence[Mapping[str, Any]]],
    knees: Mapping[str, float | None],
    out_dir: Path,
    subtitle: str,
    *,
    share: float = 0.95,
    unit: str = "requests/s",
) -> list[Path]:
    """Write ``sweep.png``: TTFT p50, TTFT p99, output tokens/s and the goodput share against
    the offered rate, one colour per contender, each contender's knee as a dotted vertical line.

    ``points[contender]`` are dicts with ``rate`` (the x axis: the arrival rate asked for, in
    ``unit``; ``offered_per_s`` where a point has none), ``ttft_p50_s``, ``ttft_p99_s``,
    ``output_tokens_per_s``, ``goodput_share`` and optionally ``invalid`` (host-limited: hollow
    markers). The x axis is the rate asked for, not the requests offered: in a multi-turn
    workload each turn waits for the previous reply, so a saturated contender is offered fewer
    requests than a fast one at the same arrival rate. The goodput panel carries the lines
    "all offered met the SLO" and ``share``, between which the knee rule passes.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    out_dir.mkdir(parents=True, exist_ok=True)
    colours = contender_colours(list(points))
    fig, grid = plt.subplots(2, 2, figsize=(12, 8.6), sharex=True)
    axes = [ax for row in grid for ax in row]
    x_max = 0.0
    drawn = [False] * len(axes)
    for name, raw in points.items():
        placed = sorted(((x, p) for p in raw
                         if (x := _finite(p.get("rate", p.get("offered_per_s")))) is not None),
                        key=lambda xp: xp[0])
        x_max = max([x_max, *(x for x, _ in placed)])
        colour, style = colours[name], _emphasis(name)
        for i, (ax, (key, _, _, log)) in enumerate(zip(axes, _SWEEP_PANELS, strict=True)):
            xy = [(x, y, bool(p.get("invalid"))) for x, p in placed
                  if (y := _finite(p.get(key))) is not None and (y > 0 or not log)]
            if not xy:
                continue
            drawn[i] = True
            ax.plot([x for x, _, _ in xy], [y for _, y, _ in xy], color=colour, **style)
            for hollow in (False, True):
                chosen = [(x, y) for x, y, bad in xy if bad == hollow]
                if chosen:
                    ax.plot([x for x, _ in chosen], [y for _, y in chosen], linestyle="none",
                            marker="o", markersize=6, color=colour, zorder=style["zorder"] + 1,
                            markerfacecolor="white" if hollow else colour)
        knee = knees.get(name)
        if knee is not None:
            for ax in axes:
                ax.axvline(knee, color=colour, linestyle=":", linewidth=1.6, zorder=1)
    x_max = max([x_max, *(k for k in knees.values() if k is not None), 1e-9]) * 1.05
    goodput = axes[3]
    goodput.axhline(1.0, color="black", linestyle="--", linewidth=1,
                    label="all offered met the SLO")
    goodput.axhline(share, color="0.5", linestyle="-.", linewidth=1,
                    label=f"{share:.0%} of offered")
    goodput.legend(fontsize="small", loc="lower left")
    for ax, (_, title, y_unit, log), filled in zip(axes, _SWEEP_PANELS, drawn, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(y_unit)
        if not filled:
            _no_data(ax)
        elif log:
            ax.set_yscale("log")
            _log_labels(ax, "y")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlim(0, x_max)
        ax.grid(True, which="both", alpha=0.3)
    for ax in grid[-1]:
        ax.set_xlabel(f"offered rate ({unit})")
    handles = [Line2D([], [], color=colours[name], marker="o", **_emphasis(name),
                      label=_knee_label(name, knees.get(name), unit))
               for name in points]
    handles += [
        Line2D([], [], color="0.3", marker="o", linestyle="none", markerfacecolor="white",
               label="hollow: host-limited run (not counted)"),
        Line2D([], [], color="0.3", linestyle=":", label=f"knee: goodput ≥ {share:.0%} of "
                                                         "offered up to here"),
    ]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, len(handles)), fontsize="small", frameon=False)
    top = _header(fig, "Rate sweep: latency, throughput and goodput against the offered rate",
                  subtitle)
    return [_save(plt, fig, out_dir / "sweep.png", top)]
