"""Pod restarts in a comparison: the schedule's parsing, the phases' figures on synthetic
samples, their aggregation and table, and the restart call against a real simulated pod."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtest.compare import (
    Outcome,
    aggregate,
    build_parser,
    down_spans,
    markdown_table,
    run_options_from,
)
from loadtest.plots import plot_comparison
from loadtest.procs import free_port
from loadtest.restarts import (
    AFTER_RETURN,
    BEFORE,
    DEFAULT_PHASE_WINDOW_S,
    DOWN,
    Restart,
    aggregate_phases,
    parse_restart,
    phase_figures,
    phase_table,
    phase_windows,
    restart_pods,
)
from loadtest.simserver import SimConfig, run_pods
from loadtest.stats import RunResult, Sample, Window
from tests.loadtest.test_compare import _run_compare

# -- the schedule ------------------------------------------------------------------------------


def test_parse_restart_reads_pod_time_and_down() -> None:
    """``1@30:5`` is pod 1, 30 s into the run, down 5 s; fractions are allowed."""
    assert parse_restart("1@30:5", pods=4, duration_s=75) == Restart(1, 30.0, 5.0)
    assert parse_restart(" 0@2.5:0.5 ", pods=1, duration_s=3) == Restart(0, 2.5, 0.5)


@given(pod=st.integers(0, 63), at=st.floats(0, 1e4), down=st.floats(0, 1e4))
def test_a_restarts_spec_reads_back_as_itself(pod: int, at: float, down: float) -> None:
    """Whatever the numbers, the spec a restart writes in reports parses to the same schedule
    (up to the six significant digits the spec keeps)."""
    restart = Restart(pod, at, down)
    back = parse_restart(restart.spec, pods=64, duration_s=2e4)
    assert back.pod == pod
    assert back.at_s == pytest.approx(at, rel=1e-5, abs=1e-9)
    assert back.down_s == pytest.approx(down, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("1@30", "expected POD@T:DOWN"),
        ("one@30:5", "expected POD@T:DOWN"),
        ("1@-3:5", "expected POD@T:DOWN"),
        ("1@3.3.3:5", "expected POD@T:DOWN"),
        ("1@nan:5", "expected POD@T:DOWN"),
        ("1@3:inf", "expected POD@T:DOWN"),
        ("4@30:5", r"pod 4 does not exist \(4 pods: 0\.\.3\)"),
        ("1@75:5", "75 s is not within the 75-s run"),
    ],
)
def test_parse_restart_rejects_bad_specs_and_says_why(item: str, message: str) -> None:
    """A malformed spec, a pod that does not exist or a time past the run stop the command."""
    with pytest.raises(SystemExit, match=message):
        parse_restart(item, pods=4, duration_s=75)


def test_the_command_line_takes_repeated_restarts_and_a_phase_window() -> None:
    """``--restart`` repeats, ``--phase-window`` sets the after-return phase; without them a
    run has no restarts and the default window."""
    args = build_parser().parse_args(
        ["--restart", "1@30:5", "--restart", "0@50:2", "--phase-window", "20"])
    run = run_options_from(args)
    assert run.restarts == (Restart(1, 30.0, 5.0), Restart(0, 50.0, 2.0))
    assert run.phase_window_s == 20.0
    plain = run_options_from(build_parser().parse_args([]))
    assert plain.restarts == () and plain.phase_window_s == DEFAULT_PHASE_WINDOW_S
    with pytest.raises(SystemExit, match="--phase-window"):
        run_options_from(build_parser().parse_args(["--phase-window", "0"]))
    with pytest.raises(SystemExit, match="pod 9"):
        run_options_from(build_parser().parse_args(["--restart", "9@3:1"]))


# -- phases on synthetic samples ---------------------------------------------------------------


def _record(**values: Any) -> dict[str, Any]:
    """A restart as :func:`restart_pods` records it: pod 1 at 10 s, down 2 s."""
    record = {"restart": "1@10:2", "pod": 1, "at_s": 10.0, "down_s": 2.0, "called_at_s": 10.0,
              "pod_name": "sim-b", "serving_in_s": 2.0, "requests_killed": 3}
    record.update(values)
    return record


def _ok(due: float, pod: str, ttft: float, prompt: int = 100, cached: int = 50) -> Sample:
    return Sample("c", 0, due, sent_s=due, ttft_s=ttft, e2e_s=ttft + 1.0, prompt_tokens=prompt,
                  cached_tokens=cached, pod=pod, status=200)


def _failed(due: float, cause: str = "http") -> Sample:
    sample = Sample("c", 0, due, sent_s=due, e2e_s=0.01, status=503)
    sample.fail(cause, "HTTP 503")
    return sample


def test_phase_windows_follow_the_pods_return_and_stop_at_the_end_of_the_run() -> None:
    """Before lasts the phase window up to the restart (from the run's start at the earliest);
    down lasts until the pod serves again (its slow start included); after-return lasts the
    phase window; all are cut at the end of the run."""
    record = _record(serving_in_s=3.5)
    assert phase_windows(record, 30.0, 100.0) == [
        (BEFORE, Window(0.0, 10.0)), (DOWN, Window(10.0, 13.5)),
        (AFTER_RETURN, Window(13.5, 43.5))]
    assert phase_windows(record, 4.0, 20.0)[0] == (BEFORE, Window(6.0, 10.0))
    assert phase_windows(record, 30.0, 20.0)[2] == (AFTER_RETURN, Window(13.5, 20.0))
    assert phase_windows(record, 30.0, 12.0)[1:] == [
        (DOWN, Window(10.0, 12.0)), (AFTER_RETURN, Window(12.0, 12.0))]
    unanswered = {k: v for k, v in record.items() if k != "serving_in_s"}
    assert phase_windows(unanswered, 5.0, 100.0)[2] == (AFTER_RETURN, Window(12.0, 17.0))


def test_phase_figures_count_each_phase_and_the_restarted_pods_share_and_hit_rate() -> None:
    """Requests due before the restart, in the down phase and after the return are counted in
    their own phase; hit rate, the pod's share and its own hit rate come from the replies."""
    samples = [
        _ok(1.0, "sim-b", 0.1),  # before the restart, and before the phase window
        _ok(5.0, "sim-a", 0.1),  # before
        _ok(6.0, "sim-b", 0.3, cached=90),
        _failed(10.5),  # down
        _ok(11.0, "sim-a", 0.2, cached=100),
        _failed(11.5, "stream"),
        _ok(12.0, "sim-b", 0.9, cached=0),  # after return: the cold pod
        _ok(13.0, "sim-b", 0.5, cached=20),
        _ok(14.0, "sim-a", 0.1, cached=80),
        _ok(15.0, "sim-c", 0.1, cached=100),
        _ok(40.0, "sim-b", 0.1),  # past the phase window
    ]
    before, down, after = phase_figures(samples, [_record()], phase_window_s=8.0, end_s=60.0)
    assert (before["phase"], before["start_s"], before["end_s"]) == (BEFORE, 2.0, 10.0)
    assert (before["offered"], before["completed"]) == (2, 2)
    assert before["pod_share"] == 0.5 and before["pod_hit_rate"] == pytest.approx(0.9)
    assert (down["restart"], down["phase"], down["start_s"], down["end_s"]) == (
        "1@10:2", DOWN, 10.0, 12.0)
    assert (down["offered"], down["completed"], down["failed"], down["unfinished"]) == (
        3, 1, 2, 0)
    assert down["pod_share"] == 0.0 and down["pod_hit_rate"] is None
    assert down["ttft_p50_s"] == pytest.approx(0.2)

    assert (after["phase"], after["start_s"], after["end_s"]) == (AFTER_RETURN, 12.0, 20.0)
    assert (after["offered"], after["completed"], after["failed"]) == (4, 4, 0)
    assert after["pod_share"] == pytest.approx(2 / 4)
    assert after["hit_rate"] == pytest.approx(200 / 400)
    assert after["pod_hit_rate"] == pytest.approx(20 / 200)
    assert after["ttft_p50_s"] == pytest.approx(0.3)
    assert after["ttft_p99_s"] == pytest.approx(0.9, abs=0.02)
    assert after["pod_name"] == "sim-b"


def test_phase_figures_of_an_empty_phase_are_missing_not_zero() -> None:
    """A phase with no request due has no latency, hit rate or share."""
    phases = phase_figures([], [_record()], phase_window_s=10.0, end_s=60.0)
    assert [p["phase"] for p in phases] == [BEFORE, DOWN, AFTER_RETURN]
    for phase in phases:
        assert phase["offered"] == 0
        assert phase["ttft_p50_s"] is None and phase["hit_rate"] is None
        assert phase["pod_share"] is None and phase["pod_hit_rate"] is None


def test_phases_aggregate_over_repeats_to_medians_and_summed_counts() -> None:
    """Each (restart, phase) pair becomes one row: counts summed, figures as the median with
    the min and max."""
    runs = [
        phase_figures([_ok(12.5, "sim-b", ttft)], [_record()], phase_window_s=5.0, end_s=60.0)
        for ttft in (0.1, 0.3, 0.2)
    ]
    _, down, after = aggregate_phases(runs)
    assert (down["phase"], down["repeats"], down["offered"]) == (DOWN, 3, 0)
    assert (after["phase"], after["offered"], after["completed"]) == (AFTER_RETURN, 3, 3)
    assert after["ttft_p50_s"] == pytest.approx(0.2)
    assert (after["ttft_p50_s_min"], after["ttft_p50_s_max"]) == pytest.approx((0.1, 0.3))
    assert after["pod_share"] == 1.0


def test_rows_carry_phases_only_for_runs_with_restarts() -> None:
    """A run without restarts keeps its row (and the table) as before; one with restarts adds
    its restarts and phases, aggregated over repeats, and a second table."""
    samples = [_failed(10.5), _ok(12.5, "sim-b", 0.4)]
    result = RunResult(samples, 60.0, window_end_s=60.0)
    phases = phase_figures(samples, [_record()], phase_window_s=5.0, end_s=60.0)
    summary = {"failed_by": {}, "offered": 2, "completed": 1, "failed": 1, "unfinished": 0}
    plain = Outcome("chwbl", 0, result, summary, [], {}, 0.0, {}, 0.0)
    restarted = replace(plain, restarts=[_record()], phases=phases)
    assert "phases" not in plain.row() and "phases" not in aggregate([plain.row()])
    assert phase_table([aggregate([plain.row()])], 4) == ""

    row = aggregate([restarted.row(), replace(restarted, repeat=1).row()])
    assert [p["phase"] for p in row["phases"]] == [BEFORE, DOWN, AFTER_RETURN]
    assert row["phases"][1]["failed"] == 2
    table = phase_table([row], 4)
    lines = table.splitlines()
    assert lines[0].startswith("| contender | restart | phase |")
    assert lines[2].startswith("| chwbl | 1@10:2 | before | 5-10 | 0 | 0 | 0 | 0 | - |")
    assert lines[3].startswith("| chwbl | 1@10:2 | down | 10-12 | 2 | 0 | 2 | 0 |")
    assert lines[4].startswith("| chwbl | 1@10:2 | after return | 12-17 | 2 | 2 | 0 | 0 |")
    assert "fair: 1/4 = 0.250" in table
    assert "| chwbl |" in markdown_table([row])  # the main table is unchanged by phases


def test_the_plots_mark_when_the_pod_was_down(tmp_path: Path) -> None:
    """The down spans come from the first run that restarted a pod (the schedule is the same
    in every run); the time plots are drawn with them."""
    samples = [_ok(t / 4, f"sim-{'abc'[t % 3]}", 0.1 + t / 400) for t in range(80)]
    result = RunResult(samples, 20.0, window_end_s=20.0)
    plain = Outcome("chwbl", 0, result, {}, [], {}, 0.0, {}, 0.0)
    restarted = replace(plain, name="ss30", restarts=[_record(), _record(at_s=15.0)])
    assert down_spans([plain]) == []
    assert down_spans([plain, restarted]) == [(10.0, 12.0), (15.0, 17.0)]
    paths = plot_comparison({"chwbl": samples}, [{"contender": "chwbl"}], tmp_path, "",
                            window=Window(2.0, 20.0), down=down_spans([restarted]))
    assert [p.name for p in paths][:2] == ["pod_load.png", "ttft_over_time.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


# -- the restart call, against a real simulated pod --------------------------------------------


async def test_restart_pods_restarts_each_pod_on_time_and_records_its_answer() -> None:
    """The pod is restarted about when scheduled and says so; a pod that cannot be reached
    gives a record with the error instead of stopping the run."""
    config = SimConfig(time_scale=0.01)
    async with run_pods([config]) as (pod,), aiohttp.ClientSession() as session:
        dead = f"http://127.0.0.1:{free_port()}"
        began = time.perf_counter()
        records = await restart_pods(
            session, [pod.url, dead], [Restart(0, 0.2, 0.3), Restart(1, 0.0, 1.0)], began)
        ok, failed = records
        assert ok["restart"] == "0@0.2:0.3" and ok["pod_name"] == pod.name
        assert ok["serving_in_s"] == 0.3 and ok["requests_killed"] == 0
        assert 0.15 <= ok["called_at_s"] < 2.0  # on time, within a busy host's slack
        assert pod.pod.counters.restarts == 1
        assert "error" in failed and "pod_name" not in failed


# -- end to end --------------------------------------------------------------------------------

FAST_HEALTH = ["--set", "health.interval=0.5", "--set", "health.timeout=0.4",
               "--set", "health.unhealthy_threshold=1", "--set", "health.healthy_threshold=1",
               "--set", "health.ejection_time=0.5"]
"""The README's restart-run health settings, scaled down to a 5-s run."""


def test_a_comparison_with_a_restart_reports_the_phases_around_it(tmp_path: Path) -> None:
    """A 5-s run of CHWBL and the sticky oracle in which pod 1 restarts 1.5 s in, down 1 s:
    the pod answers the restart in both runs, the phases account for their requests, and
    the returned pod serves again (the oracle hands it every fourth new conversation; where
    balancer's ring puts it depends on the pods' ports, so its share is not asserted)."""
    out = tmp_path / "restart"
    code, output = _run_compare(
        ["--contenders", "chwbl,sticky-oracle", "--duration", "5", "--warmup", "0.5",
         "--cooldown", "0",
         "--rate", "4", "--time-scale", "0.2", "--restart", "1@1.5:1", "--phase-window", "2",
         "--no-plots", "--out", str(out), *FAST_HEALTH]
    )  # fmt: skip
    assert code == 0, output
    report = json.loads((out / "compare.json").read_text())
    assert report["restarts"] == {"schedule": ["1@1.5:1"], "phase_window_s": 2.0}
    runs = {run["contender"]: run for run in report["runs"]}
    assert list(runs) == ["chwbl", "sticky-oracle"]
    for run in runs.values():
        (restart,) = run["restarts"]
        assert restart["serving_in_s"] == 1.0 and restart["pod_name"].startswith("sim-")
        assert 1.45 <= restart["called_at_s"] < 3.0, restart  # the loop may wake a bit early
        before, down, after = run["phases"]
        assert (before["phase"], before["start_s"], before["end_s"]) == (BEFORE, 0.0, 1.5)
        assert (down["phase"], down["start_s"], down["end_s"]) == (DOWN, 1.5, 2.5)
        assert (after["phase"], after["start_s"], after["end_s"]) == (AFTER_RETURN, 2.5, 4.5)
        for phase in (before, down, after):
            assert phase["offered"] == (
                phase["completed"] + phase["failed"] + phase["unfinished"]), phase
            assert phase["offered"] > 0, phase
        assert after["pod_share"] is not None
    assert runs["sticky-oracle"]["phases"][2]["pod_share"] > 0, output
    assert [p["phase"] for p in report["rows"][0]["phases"]] == [BEFORE, DOWN, AFTER_RETURN]
    table = (out / "compare.md").read_text()
    assert "## Around the restarts" in table
    assert "| sticky-oracle | 1@1.5:1 | after return |" in table
