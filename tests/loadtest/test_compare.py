"""The strategy comparison runner: its pure parts, and one short end-to-end run.

The end-to-end run is ``python -m loadtest.compare`` as a subprocess: it starts its own
simulated pods and balancers (real processes on 127.0.0.1) and stops them before it exits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.config import KeyMode, Strategy, from_mapping, validate
from loadtest.compare import (
    ORACLE,
    STRATEGIES,
    Outcome,
    aggregate,
    balancer_config,
    build_parser,
    invalid_reasons,
    markdown_table,
    mean_in_flight,
    parse_routing,
    parse_shape,
    ratios,
)
from loadtest.stats import RunResult, Sample, Window
from loadtest.workloads import (
    AGENT_SHAPE,
    TEMPLATED_SHAPE,
    WORKLOADS,
    MultiTurnShape,
    SharedDocsShape,
    UniqueShape,
)

REPO = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CONTENDERS = ["chwbl", "round-robin", ORACLE]
PLOTS = ("ttft_cdf.png", "ttft_over_time.png", "throughput.png", "hit_rate.png", "pod_load.png")
RUN_TIMEOUT_S = 90.0
INTERRUPT_TIMEOUT_S = 20.0


def _summary(**values: Any) -> dict[str, Any]:
    """A run summary with the keys a comparison row reads."""
    summary: dict[str, Any] = {
        "offered": 52, "sent": 52, "completed": 50, "failed": 1, "failed_by": {"http": 1},
        "unfinished": 1, "unsent": 0, "ttft_p50_s": 0.1, "ttft_p90_s": 0.2, "ttft_p99_s": 0.4,
        "ttft_p99_censored_s": 0.5, "itl_p50_s": 0.01, "e2e_p50_s": 1.0, "requests_per_s": 5.0,
        "output_tokens_per_s": 400.0, "goodput_per_s": 4.5, "offered_per_s": 5.2,
    }  # fmt: skip
    summary.update(values)
    return summary


def _pod(served: int, queries: int, hits: int) -> dict[str, Any]:
    return {"requests_served": served, "prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "busy_fraction": 0.5, "preemptions": 1}


def _outcome(name: str, pods: list[dict[str, Any]] | None = None, *, repeat: int = 0,
             cpu: dict[str, float | None] | None = None, paused_s: float = 0.0,
             **summary: Any) -> Outcome:
    pods = pods if pods is not None else [_pod(10, 1000, 500), _pod(30, 1000, 700)]
    return Outcome(name, repeat, RunResult([], 60.0), _summary(**summary), pods,
                   cpu if cpu is not None else {"pods": 40.0, "machine": 90.0}, paused_s,
                   {"p1": 1.0, "p2": 3.0}, 50.0)


def _row(name: str, **values: Any) -> dict[str, Any]:
    """A contender's aggregated row as the runner builds it; ``values`` override its fields."""
    row = aggregate([_outcome(name).row()])
    row.update(values)
    return row


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [cell.strip() for cell in line[1:-1].split("|")]


# -- rows and the table --------------------------------------------------------------------------


def test_a_row_takes_hit_rate_and_pod_load_from_the_pods_counters() -> None:
    """A row's hit rate is all pods' hits over all their queries; its load imbalance is the
    time-weighted in-flight max over mean, not requests served."""
    row = _outcome("chwbl").row()
    assert row["contender"] == "chwbl"
    assert row["hit_rate"] == pytest.approx(1200 / 2000)
    assert row["pod_requests"] == [10, 30]
    assert row["load_max_over_mean"] == pytest.approx(1.5)
    assert row["preemptions"] == 2 and row["pod_busy_fraction"] == [0.5, 0.5]
    assert (row["offered"], row["completed"], row["failed"], row["unfinished"]) == (52, 50, 1, 1)
    assert row["invalid"] is False and row["invalid_reasons"] == []


def test_a_row_without_prefix_cache_queries_has_no_hit_rate() -> None:
    """Pods that answered no prefix-cache query give a hit rate of None, not a division error."""
    assert _outcome("random", [_pod(0, 0, 0), _pod(0, 0, 0)]).row()["hit_rate"] is None


@pytest.mark.parametrize(
    ("cpu", "paused_s", "reason"),
    [
        ({"pods": 95.0, "machine": 120.0}, 0.0, "pods process at 95% of a core"),
        ({"balancer": 91.0, "machine": 120.0}, 0.0, "balancer process at 91% of a core"),
        ({"generator": 99.0, "machine": 120.0}, 0.0, "generator process at 99% of a core"),
        ({"pods": 50.0, "machine": 100.0 * (os.cpu_count() or 1)}, 0.0, "host CPU at 100%"),
        ({"pods": 50.0, "machine": 60.0}, 0.75, "simulated clocks stood still 0.75 s (1.5%"),
    ],
)
def test_a_run_limited_by_the_host_is_invalid_and_says_why(
    cpu: dict[str, float | None], paused_s: float, reason: str
) -> None:
    """A saturated process, a saturated machine or simulated clocks that stood still for more
    than 1% of the run flag it."""
    reasons = invalid_reasons(cpu, paused_s, 50.0)
    assert any(r.startswith(reason) for r in reasons), reasons
    row = _outcome("chwbl", cpu=cpu, paused_s=paused_s).row()
    assert row["invalid"] is True


def test_a_run_within_the_hosts_means_is_valid() -> None:
    """Busy but not saturated processes and a clock hiccup of a tenth of a second leave the
    run valid."""
    assert invalid_reasons({"pods": 70.0, "balancer": 40.0, "generator": 60.0,
                            "machine": 100.0, "other": 5.0, "irq": 3.0}, 0.12, 50.0) == []
    assert invalid_reasons({"pods": None, "machine": None}) == []


def test_mean_in_flight_is_time_weighted_within_the_window() -> None:
    """A request counts at its pod from sent to end, clipped to the window."""
    samples = [
        Sample("a", 0, 0.0, sent_s=0.0, e2e_s=10.0, pod="p1"),  # 5 s inside [5, 15)
        Sample("b", 0, 6.0, sent_s=7.0, e2e_s=3.0, pod="p1"),  # 7 to 9: 2 s
        Sample("c", 0, 5.0, sent_s=5.0, e2e_s=20.0, pod="p2"),  # 5 to 15: 10 s
        Sample("d", 0, 5.0, sent_s=None, e2e_s=2.0, pod=None, outcome="unfinished"),
    ]
    load = mean_in_flight(samples, Window(5.0, 15.0))
    assert load == {"p1": pytest.approx(0.7), "p2": pytest.approx(1.0)}


def test_repeats_aggregate_to_the_median_with_min_and_max() -> None:
    """Figures become medians with their range; counts add up; invalid runs are counted."""
    rows = [
        _outcome("chwbl", repeat=0, ttft_p50_s=0.1, output_tokens_per_s=300.0).row(),
        _outcome("chwbl", repeat=1, ttft_p50_s=0.3, output_tokens_per_s=500.0).row(),
        _outcome("chwbl", repeat=2, ttft_p50_s=0.2, output_tokens_per_s=100.0,
                 paused_s=2.0).row(),
    ]
    row = aggregate(rows)
    assert row["repeats"] == 3
    assert (row["ttft_p50_s"], row["ttft_p50_s_min"], row["ttft_p50_s_max"]) == (0.2, 0.1, 0.3)
    assert row["output_tokens_per_s"] == 300.0
    assert (row["offered"], row["completed"], row["failed_by"]) == (156, 150, {"http": 3})
    assert row["invalid_runs"] == 1 and row["clock_paused_s"] == 2.0


def test_markdown_table_has_a_header_a_separator_and_one_line_per_row() -> None:
    """The table is well formed: every line has as many cells as the header."""
    rows = [_row("chwbl"), _row("round-robin"), _row(ORACLE)]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    header = _cells(lines[0])
    assert header[0] == "contender" and "TTFT p50 (s)" in header and header[-1] == "valid"
    assert {"offered", "completed", "failed", "unfinished", "TTFT p99 censored (s)"} <= set(header)
    assert set(_cells(lines[1])) == {"---"} and len(_cells(lines[1])) == len(header)
    for line, row in zip(lines[2:], rows, strict=True):
        cells = _cells(line)
        assert len(cells) == len(header), line
        assert cells[0] == row["contender"]


def test_markdown_table_formats_figures_spreads_and_missing_ones() -> None:
    """Seconds get three decimals, failures their causes, repeats a range, None a dash."""
    rows = [aggregate([_outcome("chwbl", ttft_p50_s=0.12345).row(),
                       _outcome("chwbl", repeat=1, ttft_p50_s=0.2, paused_s=1.0).row()])]
    rows[0]["hit_rate"] = None
    lines = markdown_table(rows).splitlines()
    by_column = dict(zip(_cells(lines[0]), _cells(lines[2]), strict=True))
    assert by_column["TTFT p50 (s)"] == "0.162 (0.123..0.200)"
    assert by_column["prefix-cache hit rate"] == "-"
    assert by_column["failed"] == "2 (http 2)"
    assert by_column["TTFT p99 censored (s)"].startswith("≥ 0.500")
    assert by_column["valid"] == "no (1)"


def test_markdown_table_of_no_rows_is_just_the_header() -> None:
    """With no contender the table still has its header and separator."""
    assert len(markdown_table([]).splitlines()) == 2


# -- ratios --------------------------------------------------------------------------------------


def test_ratios_are_empty_without_chwbl() -> None:
    """Ratios compare CHWBL with the others, so without a CHWBL row there are none."""
    assert ratios([_row("round-robin"), _row(ORACLE)]) == {}


def test_ratios_are_words_against_each_other_contender() -> None:
    """CHWBL's figures against each other contender read as signed percentages."""
    rows = [
        _row("chwbl", ttft_p50_s=0.05, ttft_p99_s=0.2, output_tokens_per_s=816.0),
        _row("round-robin", ttft_p50_s=0.1, ttft_p99_s=0.4, output_tokens_per_s=400.0),
    ]
    out = ratios(rows)
    assert set(out) == {"vs round-robin"}
    words = out["vs round-robin"]
    assert "TTFT p50 \u221250%" in words and "TTFT p99 \u221250%" in words
    assert "output tokens/s +104%" in words


def test_ratios_compare_the_hit_rate_with_the_oracle_when_both_have_one() -> None:
    """CHWBL's hit rate as a share of the sticky oracle's is reported, when both have one."""
    rows = [_row("chwbl", hit_rate=0.45), _row(ORACLE, hit_rate=0.5)]
    assert ratios(rows)["hit rate vs sticky-oracle"] == "90.0% of the oracle's"
    assert "hit rate vs sticky-oracle" not in ratios([_row("chwbl"), _row(ORACLE, hit_rate=None)])


# -- command-line parsing ------------------------------------------------------------------------


def test_parse_shape_sets_ranges_single_values_and_floats() -> None:
    """``LO-HI`` and ``N`` fill a range field, and scalar fields take their own type."""
    shape = parse_shape(
        "multi-turn", ["max_tokens=100-300", "turns=4", "think_mean_s=0.5", "system_prompts=2"]
    )
    assert isinstance(shape, MultiTurnShape)
    assert shape.max_tokens == (100, 300)
    assert shape.turns == (4, 4)
    assert shape.think_mean_s == 0.5 and isinstance(shape.think_mean_s, float)
    assert shape.system_prompts == 2 and isinstance(shape.system_prompts, int)
    assert shape.user_tokens == MultiTurnShape().user_tokens  # untouched fields keep defaults


def test_parse_shape_picks_each_workloads_shape() -> None:
    """Every workload has its own shape class, defaults when no field is given."""
    assert parse_shape("multi-turn", []) == MultiTurnShape()
    assert parse_shape("shared-docs", ["documents=8"]) == SharedDocsShape(documents=8)
    assert parse_shape("unique", ["prompt_tokens=10-20"]) == UniqueShape(prompt_tokens=(10, 20))


def test_parse_shape_starts_from_a_presets_shape() -> None:
    """The app-like workloads start from their presets; their fields parse like the others,
    and a field that breaks the shape stops with the reason."""
    assert parse_shape("agent", []) == AGENT_SHAPE
    shape = parse_shape("templated", ["template_share=0.5", "template_chars=300-900"])
    assert shape == replace(TEMPLATED_SHAPE, template_share=0.5, template_chars=(300, 900))
    assert parse_shape("greetings", ["think_range_s=0.1-0.5"]).think_range_s == (0.1, 0.5)
    with pytest.raises(SystemExit, match="greeting_share"):
        parse_shape("greetings", ["greeting_share=2"])


def test_every_workload_can_be_chosen() -> None:
    """``--workload`` offers every generator in loadtest.workloads."""
    for name in WORKLOADS:
        assert build_parser().parse_args(["--workload", name]).workload == name


@pytest.mark.parametrize("item", ["no_such_field=3", "max_tokens", "documents=8"])
def test_parse_shape_rejects_unknown_fields_and_missing_values(item: str) -> None:
    """An unknown field (for this workload) or a missing ``=VALUE`` stops with a message."""
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        parse_shape("multi-turn", [item])


def test_parse_routing_reads_values_as_yaml_scalars() -> None:
    """Numbers become numbers and words stay strings, as they would in the config file."""
    routing = parse_routing(["load_factor=1.5", "prefix_chars=200", "key=prompt-prefix"])
    assert routing == {"load_factor": 1.5, "prefix_chars": 200, "key": "prompt-prefix"}
    assert parse_routing([]) == {}


def test_parse_routing_rejects_an_item_without_a_value() -> None:
    """An item without ``=`` stops with a message naming it."""
    with pytest.raises(SystemExit, match="load_factor"):
        parse_routing(["load_factor"])


# -- generated configurations --------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_balancer_config_is_accepted_by_the_balancers_own_validation(strategy: str) -> None:
    """The generated config parses as YAML and passes from_mapping and validate unchanged."""
    pods = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    text = balancer_config(pods, strategy, MODEL, 18080, 19090, {})
    settings = validate(from_mapping(yaml.safe_load(text)))
    assert settings.routing.strategy == Strategy(strategy)
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 18080)
    assert settings.server.admin_port == 19090
    (pool,) = settings.pools
    assert pool.models == (MODEL,)
    assert pool.endpoints == tuple(pods)


def test_balancer_config_carries_routing_settings_from_the_command_line() -> None:
    """``--routing`` items reach the config's routing section with their types."""
    extra = parse_routing(["load_factor=1.5", "prefix_chars=200", "key=prompt-prefix"])
    text = balancer_config(["http://127.0.0.1:8001"], "chwbl", MODEL, 18080, 19090, extra)
    routing = validate(from_mapping(yaml.safe_load(text))).routing
    assert routing.strategy == Strategy.CHWBL
    assert routing.load_factor == 1.5
    assert routing.prefix_chars == 200
    assert routing.key == KeyMode.PROMPT_PREFIX


# -- end to end ----------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (empty where /proc is missing)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found.extend(children)
        queue.extend(children)
    return found


def _run_compare(args: list[str]) -> tuple[int, str]:
    """Run the comparison; on a timeout interrupt it (it then stops its pods and balancers)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest.compare", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=INTERRUPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            output = b""
        pytest.fail(f"compare ran over {RUN_TIMEOUT_S} s:\n{output.decode(errors='replace')}")
    finally:
        if process.poll() is None:
            for child in _descendants(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            process.kill()
            process.wait()
    return process.returncode, output.decode(errors="replace")


def test_a_short_comparison_accounts_for_every_request_and_writes_its_report(
    tmp_path: Path,
) -> None:
    """A 4-second run of three contenders, twice, exits 0 with rows in which offered =
    completed + failed + unfinished, a table, one sample per request and the plots."""
    out = tmp_path / "compare"
    code, output = _run_compare(
        ["--contenders", ",".join(CONTENDERS), "--duration", "4", "--warmup", "1",
         "--cooldown", "0.5", "--rate", "2", "--time-scale", "0.2", "--repeat", "2",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0, output

    report = json.loads((out / "compare.json").read_text())
    rows = {row["contender"]: row for row in report["rows"]}
    assert list(rows) == CONTENDERS, output
    runs = report["runs"]
    assert [(r["contender"], r["repeat"]) for r in runs] == [
        (name, repeat) for repeat in (0, 1) for name in CONTENDERS]  # interleaved
    for run in runs:
        assert run["offered"] == run["completed"] + run["failed"] + run["unfinished"], run
        assert run["offered"] > 0 and run["failed"] == 0, run
    for name, row in rows.items():
        assert row["repeats"] == 2
        for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s"):
            assert row[key] is not None and row[key] > 0, (name, key, row)
            assert row[f"{key}_min"] <= row[key] <= row[f"{key}_max"], (name, key, row)
        assert row["requests_per_s"] > 0, (name, row)
        hit_rate = row["hit_rate"]
        if hit_rate is not None:
            assert isinstance(hit_rate, float) and math.isfinite(hit_rate), (name, row)
            assert 0.0 <= hit_rate <= 1.0, (name, row)
    assert isinstance(rows[ORACLE]["hit_rate"], float)  # the pods answered cache queries
    assert "vs round-robin" in report["ratios"]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for run in runs:
        mine = [s for s in samples
                if (s["contender"], s["repeat"]) == (run["contender"], run["repeat"])]
        in_window = [s for s in mine if 1.0 <= s["due_s"] < 3.5]
        assert len(in_window) == run["offered"], run

    table = (out / "compare.md").read_text()
    assert "| contender |" in table and "Unfinished" in table
    for name in CONTENDERS:
        assert f"| {name} |" in table
    for name in PLOTS:
        plot = out / name
        assert plot.exists() and plot.stat().st_size > 0, name
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_starved_simulator_is_flagged_and_strict_mode_fails(tmp_path: Path) -> None:
    """Pods whose every engine step burns 5 ms of CPU (four of them in one process, steps of
    ~8 ms) cannot keep up with the modelled GPUs: the process saturates its core, the clocks
    pause, the row is marked invalid with the reasons, and --strict exits 3."""
    out = tmp_path / "starved"
    code, output = _run_compare(
        ["--contenders", "chwbl", "--duration", "3", "--warmup", "0.5", "--cooldown", "0",
         "--rate", "4", "--pod-arg=--host-cpu-ms=5", "--strict", "--no-plots", "--out", str(out)]
    )  # fmt: skip
    assert code == 3, output
    (row,) = json.loads((out / "compare.json").read_text())["rows"]
    assert row["invalid_runs"] == 1
    assert any("stood still" in reason or "% of a core" in reason
               for reason in row["invalid_reasons"])
    assert "INVALID chwbl" in output
    assert "| no (1) |" in (out / "compare.md").read_text()
