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
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.config import KeyMode, Strategy, from_mapping, validate
from loadtest.compare import (
    ORACLE,
    STRATEGIES,
    Outcome,
    balancer_config,
    haproxy_config,
    markdown_table,
    parse_routing,
    parse_shape,
    ratios,
)
from loadtest.workloads import MultiTurnShape, SharedDocsShape, UniqueShape

REPO = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CONTENDERS = ["chwbl", "round-robin", ORACLE]
PLOTS = ("ttft_cdf.png", "throughput.png", "hit_rate.png", "pod_load.png")
RUN_TIMEOUT_S = 90.0
INTERRUPT_TIMEOUT_S = 20.0


def _summary(**values: Any) -> dict[str, Any]:
    """A run summary with the keys a comparison row reads."""
    summary: dict[str, Any] = {
        "ttft_p50_s": 0.1,
        "ttft_p90_s": 0.2,
        "ttft_p99_s": 0.4,
        "e2e_p50_s": 1.0,
        "requests_per_s": 5.0,
        "output_tokens_per_s": 400.0,
        "requests": 50,
        "errors": 0,
    }
    summary.update(values)
    return summary


def _pod(served: int, queries: int, hits: int) -> dict[str, Any]:
    return {"requests_served": served, "prefix_cache_queries": queries, "prefix_cache_hits": hits}


def _row(name: str, **values: Any) -> dict[str, Any]:
    """A comparison row as the runner builds it; ``values`` override its fields."""
    pods = [_pod(10, 1000, 500), _pod(30, 1000, 700)]
    row = Outcome(name, _summary(), pods, [0.1, 0.2]).row()
    row.update(values)
    return row


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [cell.strip() for cell in line[1:-1].split("|")]


# -- rows and the table --------------------------------------------------------------------------


def test_a_row_takes_hit_rate_and_pod_load_from_the_pods_counters() -> None:
    """A row's hit rate is all pods' hits over all their queries, and it lists each pod's load."""
    row = _row("chwbl")
    assert row["contender"] == "chwbl"
    assert row["hit_rate"] == pytest.approx(1200 / 2000)
    assert row["pod_requests"] == [10, 30]
    assert row["ttft_p50_s"] == 0.1 and row["errors"] == 0 and row["requests"] == 50


def test_a_row_without_prefix_cache_queries_has_no_hit_rate() -> None:
    """Pods that answered no prefix-cache query give a hit rate of None, not a division error."""
    row = Outcome("random", _summary(), [_pod(0, 0, 0), _pod(0, 0, 0)], []).row()
    assert row["hit_rate"] is None


def test_markdown_table_has_a_header_a_separator_and_one_line_per_row() -> None:
    """The table is well formed: every line has as many cells as the header."""
    rows = [_row("chwbl"), _row("round-robin"), _row(ORACLE)]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    header = _cells(lines[0])
    assert header[0] == "contender" and "TTFT p50 (s)" in header and header[-1] == "errors"
    assert set(_cells(lines[1])) == {"---"} and len(_cells(lines[1])) == len(header)
    for line, row in zip(lines[2:], rows, strict=True):
        cells = _cells(line)
        assert len(cells) == len(header), line
        assert cells[0] == row["contender"]


def test_markdown_table_formats_figures_and_shows_missing_ones_as_dashes() -> None:
    """Seconds get three decimals, errors read 'errors/requests', and None becomes '-'."""
    rows = [_row("chwbl", ttft_p50_s=0.12345, hit_rate=None, errors=2, requests=40)]
    lines = markdown_table(rows).splitlines()
    header, cells = _cells(lines[0]), _cells(lines[2])
    by_column = dict(zip(header, cells, strict=True))
    assert by_column["TTFT p50 (s)"] == "0.123"
    assert by_column["prefix-cache hit rate"] == "-"
    assert by_column["errors"] == "2/40"


def test_markdown_table_of_no_rows_is_just_the_header() -> None:
    """With no contender the table still has its header and separator."""
    assert len(markdown_table([]).splitlines()) == 2


# -- ratios --------------------------------------------------------------------------------------


def test_ratios_are_empty_without_chwbl() -> None:
    """Ratios compare CHWBL with the others, so without a CHWBL row there are none."""
    assert ratios([_row("round-robin"), _row(ORACLE)]) == {}


def test_ratios_give_relative_changes_against_each_baseline_that_ran() -> None:
    """CHWBL's figures are compared with each baseline as a relative change (a/b - 1)."""
    rows = [
        _row("chwbl", ttft_p50_s=0.05, ttft_p99_s=0.2, output_tokens_per_s=500.0),
        _row("round-robin", ttft_p50_s=0.1, ttft_p99_s=0.4, output_tokens_per_s=400.0),
    ]
    out = ratios(rows)
    assert set(out) == {"vs_round-robin"}
    versus = out["vs_round-robin"]
    assert versus["ttft_p50_change"] == pytest.approx(-0.5)
    assert versus["ttft_p99_change"] == pytest.approx(-0.5)
    assert versus["output_tokens_per_s_change"] == pytest.approx(0.25)
    assert versus["requests_per_s_change"] == pytest.approx(0.0)


def test_ratios_are_none_where_a_baseline_figure_is_missing_or_zero() -> None:
    """A change against a missing or zero figure is None rather than a division error."""
    rows = [
        _row("chwbl"),
        _row("least-request", ttft_p50_s=None, ttft_p99_s=0.0),
        _row("random"),
    ]
    out = ratios(rows)
    assert set(out) == {"vs_least-request", "vs_random"}
    assert out["vs_least-request"]["ttft_p50_change"] is None
    assert out["vs_least-request"]["ttft_p99_change"] is None
    assert out["vs_random"]["ttft_p50_change"] == pytest.approx(0.0)


def test_ratios_compare_the_hit_rate_with_the_oracle_when_both_have_one() -> None:
    """CHWBL's hit rate over the sticky oracle's is reported, and left out if either is None."""
    rows = [_row("chwbl", hit_rate=0.45), _row(ORACLE, hit_rate=0.5)]
    assert ratios(rows)["hit_rate_vs_oracle"] == pytest.approx(0.9)
    assert "hit_rate_vs_oracle" not in ratios([_row("chwbl"), _row(ORACLE, hit_rate=None)])
    assert "hit_rate_vs_oracle" not in ratios([_row("chwbl", hit_rate=None), _row(ORACLE)])


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


def test_haproxy_config_hashes_the_session_header_with_a_balance_factor() -> None:
    """HAProxy binds to 127.0.0.1, hashes x-session-id consistently and lists every pod."""
    text = haproxy_config(["http://127.0.0.1:8001", "http://127.0.0.1:8002"], 18081, 1.25)
    lines = [line.strip() for line in text.splitlines()]
    assert "bind 127.0.0.1:18081" in lines
    assert "balance hdr(x-session-id)" in lines
    assert "hash-type consistent" in lines
    assert "hash-balance-factor 125" in lines
    assert "server pod0 127.0.0.1:8001" in lines
    assert "server pod1 127.0.0.1:8002" in lines
    assert "http://" not in text
    assert "hash-balance-factor 150" in haproxy_config(["http://127.0.0.1:1"], 1, 1.5)


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


def test_a_short_comparison_writes_rows_a_table_and_four_plots(tmp_path: Path) -> None:
    """A 4-second run of three contenders exits 0 with error-free rows, a table and plots."""
    out = tmp_path / "compare"
    code, output = _run_compare(
        ["--contenders", ",".join(CONTENDERS), "--duration", "4", "--rate", "2",
         "--time-scale", "0.2", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, output

    report = json.loads((out / "compare.json").read_text())
    rows = {row["contender"]: row for row in report["rows"]}
    assert list(rows) == CONTENDERS, output
    for name, row in rows.items():
        assert row["errors"] == 0 and row["requests"] > 0, (name, row)
        for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s"):
            assert row[key] is not None and row[key] > 0, (name, key, row)
        assert row["requests_per_s"] > 0, (name, row)
        hit_rate = row["hit_rate"]
        if hit_rate is not None:
            assert isinstance(hit_rate, float) and math.isfinite(hit_rate), (name, row)
            assert 0.0 <= hit_rate <= 1.0, (name, row)
    assert isinstance(rows[ORACLE]["hit_rate"], float)  # the pods answered cache queries
    assert "vs_round-robin" in report["ratios"]

    table = (out / "compare.md").read_text()
    assert "| contender |" in table
    for name in CONTENDERS:
        assert f"| {name} |" in table
    for name in PLOTS:
        plot = out / name
        assert plot.exists() and plot.stat().st_size > 0, name
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
