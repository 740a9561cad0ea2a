"""Rate sweep: each contender over a ladder of offered rates, and where each one's knee is.

``python -m loadtest.sweep`` plays the same seeded workload at each rate of a ladder through
every contender (as :mod:`loadtest.compare` does for one rate: fresh pods per run, open-loop
timing, every request accounted for, warm-up and cool-down left out, host-limited runs flagged)
and plots TTFT p50/p99, output tokens/s and goodput against the offered rate. Each contender's
*knee* is the highest rate of the ladder at which goodput (completed requests/s within the SLO)
is still at least 95% of the requests offered, at that rate and every lower one
(:func:`loadtest.sweep_core.find_knee`). Rates are arrivals per second: new conversations for
the multi-turn workloads (whose later turns wait for the replies, so the requests offered
depend on the contender), requests for the others. That is how operating points are chosen:
a comparison at "80% of the knee" means the same thing for every contender and every machine.

Rates ascend in the outer loop and contenders alternate inside it (with ``--repeat``, repeats
in between), so slow drift of the host spreads over every contender. Writes ``sweep.md``,
``sweep.json``, ``samples.jsonl`` (every request of every run, with its contender, rate and
repeat) and ``sweep.png`` in ``--out``.

Example (3 contenders x 6 rates, about 18 minutes on 2 cores)::

    python -m loadtest.sweep --contenders chwbl,round-robin,sticky-oracle --rates 4,8,12,16,20,24
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import compare
from loadtest.cells import fixed
from loadtest.procs import raise_fd_limit
from loadtest.stats import write_samples
from loadtest.sweep_core import DEFAULT_SHARE, find_knee, knee_line, rate_ladder
from loadtest.workloads import MULTI_TURN_WORKLOADS

DEFAULT_RATES = "4,8,12,16,20,24"
"""New conversations per second for the default multi-turn workload on 4 simulated pods: from
well below the knee of every contender to well past CHWBL's."""

DEFAULT_DURATION_S = 50.0
"""Per run. With the 25 s warm-up and 5 s cool-down that leaves a 20 s window: a sweep of 3
contenders over 6 rates takes about 18 minutes on 2 cores."""

POINT_KEYS = ("offered", "completed", "failed", "unfinished", "offered_per_s", "ttft_p50_s",
              "ttft_p99_s", "ttft_p99_censored_s", "itl_p50_s", "output_tokens_per_s",
              "goodput_per_s", "goodput_share", "hit_rate", "load_max_over_mean",
              "cross_zone_share")


def build_parser() -> argparse.ArgumentParser:
    parser = compare.build_parser()
    parser.prog = "python -m loadtest.sweep"
    parser.description = ("Play one workload at a ladder of rates through each contender and "
                          "find each one's knee.")
    parser.add_argument("--rates", default=None,
                        help=f"comma-separated arrival rates (default: {DEFAULT_RATES})")
    parser.add_argument("--ladder", nargs=3, metavar=("LOW", "HIGH", "STEPS"), default=None,
                        help="evenly spaced rates from LOW to HIGH instead of --rates")
    parser.add_argument("--knee-share", type=float, default=DEFAULT_SHARE,
                        help="goodput share of offered that defines the knee (default: "
                             "%(default)s)")
    parser.set_defaults(contenders="chwbl,round-robin,sticky-oracle",
                        duration=DEFAULT_DURATION_S, out="results/sweep")
    return parser


def rates_from(args: argparse.Namespace) -> list[float]:
    if args.rate is not None:
        raise SystemExit("--rate is for loadtest.compare; a sweep takes --rates or --ladder")
    if args.ladder is not None:
        if args.rates is not None:
            raise SystemExit("give --rates or --ladder, not both")
        low, high, steps = args.ladder
        try:
            return rate_ladder(float(low), float(high), int(steps))
        except ValueError as e:
            raise SystemExit(f"--ladder: {e}") from e
    try:
        rates = sorted(float(r) for r in (args.rates or DEFAULT_RATES).split(",") if r.strip())
    except ValueError as e:
        raise SystemExit(f"--rates: {e}") from e
    if not rates or rates[0] <= 0:
        raise SystemExit("--rates: give positive rates")
    return rates


async def run_sweep(args: argparse.Namespace, rates: Sequence[float]
                    ) -> list[tuple[float, compare.Outcome]]:
    """Every (rate, repeat, contender) run, rates ascending, contenders interleaved."""
    run = compare.run_options_from(args)
    contenders = compare.contenders_from(args.contenders, list(run.variants))
    routing = compare.parse_routing(args.routing)
    pods = compare.pod_options_from(args)
    total = len(rates) * args.repeat * len(contenders)
    print(f"sweep: {', '.join(contenders)} at {', '.join(f'{r:g}' for r in rates)}/s, "
          f"{args.duration:g} s per run, {total} runs")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="balancer-sweep-") as tmp:
        log_dir = Path(tmp)
        for rate in rates:
            trace = compare.trace_from(args, rate)
            rate_dir = log_dir / f"rate-{rate:g}"
            rate_dir.mkdir()
            print(f"rate {rate:g}/s: {len(trace)} requests in the trace")
            for repeat in range(args.repeat):
                for name in contenders:
                    outcome = await compare.run_contender(
                        name, trace, pods=pods, run=run, model=args.model, routing=routing,
                        log_dir=rate_dir, repeat=repeat)
                    outcomes.append((rate, outcome))
    return outcomes


def points_of(outcomes: Sequence[tuple[float, compare.Outcome]]
              ) -> dict[str, list[dict[str, Any]]]:
    """Per contender, one point per rate: the repeats aggregated (medians)."""
    points: dict[str, list[dict[str, Any]]] = {}
    keys = list(dict.fromkeys((o.name, rate) for rate, o in outcomes))
    for name, rate in keys:
        rows = [o.row() for r, o in outcomes if (o.name, r) == (name, rate)]
        row = compare.aggregate(rows)
        point = {"rate": rate, **{key: row.get(key) for key in POINT_KEYS},
                 "invalid": row["invalid_runs"] > 0, "invalid_reasons": row["invalid_reasons"]}
        points.setdefault(name, []).append(point)
    return points


def rate_unit(workload: str) -> str:
    """What a workload's rate counts: conversations for multi-turn chat, else requests."""
    return "new conversations/s" if workload in MULTI_TURN_WORKLOADS else "requests/s"


def markdown(points: dict[str, list[dict[str, Any]]], lines: Sequence[str], unit: str) -> str:
    """A table per contender and the knee sentences."""
    out = []
    for name, series in points.items():
        out += [f"### {name}", "",
                f"| rate ({unit}) | offered (req/s) | TTFT p50 (s) | TTFT p99 (s) "
                "| TTFT p99 censored (s) | output tok/s | goodput (req/s) | goodput share "
                "| unfinished | valid |",
                "|" + "---|" * 10]
        for p in series:
            out.append(
                f"| {p['rate']:g} | {fixed(p['offered_per_s'], 2)} | {fixed(p['ttft_p50_s'])} "
                f"| {fixed(p['ttft_p99_s'])} | ≥ {fixed(p['ttft_p99_censored_s'])} "
                f"| {fixed(p['output_tokens_per_s'], 0)} | {fixed(p['goodput_per_s'], 2)} "
                f"| {fixed(p['goodput_share'], 2)} | {p['unfinished']} "
                f"| {'no' if p['invalid'] else 'yes'} |")
        out.append("")
    out += ["### Knees", "", *[f"- {line}" for line in lines]]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    rates = rates_from(args)
    compare.run_options_from(args)  # reject bad window settings before anything starts
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise_fd_limit()
    try:
        import uvloop

        outcomes = uvloop.run(run_sweep(args, rates))
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    points = points_of(outcomes)
    knees = {name: find_knee(series, args.knee_share) for name, series in points.items()}
    unit = rate_unit(args.workload)
    lines = [knee_line(name, knees[name], series, share=args.knee_share, unit=unit)
             for name, series in points.items()]
    run = compare.run_options_from(args)
    subtitle = (f"{args.workload} (seed {args.seed}), {args.pods} pods, {args.duration:g} s per "
                f"run ({args.warmup:g} s warm-up, {args.cooldown:g} s cool-down), SLO TTFT ≤ "
                f"{run.slo.ttft_s:g} s and ITL ≤ {run.slo.itl_s:g} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(points, lines, unit)
    command = " ".join(["python -m loadtest.sweep", *argv])
    (out / "sweep.md").write_text(f"# Rate sweep\n\n`{command}`\n\n{subtitle}\n\n{text}\n")
    (out / "sweep.json").write_text(json.dumps(
        {"command": command, "parameters": subtitle, "rates": rates, "points": points,
         "knees": knees, "knee_share": args.knee_share,
         "runs": [{"rate": rate, **o.row()} for rate, o in outcomes]}, indent=2))
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for rate, o in outcomes:
            write_samples(o.result.samples, f, contender=o.name, rate=rate, repeat=o.repeat)
    print()
    print(text)
    if not args.no_plots:
        from loadtest.plots import plot_sweep

        paths = plot_sweep(points, knees, out, subtitle, share=args.knee_share, unit=unit)
        print("plots: " + ", ".join(str(p) for p in paths))
    print(f"written: {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'samples.jsonl'}")
    invalid = any(p["invalid"] for series in points.values() for p in series)
    return compare.INVALID_EXIT if args.strict and invalid else 0


if __name__ == "__main__":
    raise SystemExit(main())
