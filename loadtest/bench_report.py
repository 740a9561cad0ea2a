"""The proxy benchmark's report: the machine it ran on, and its results as markdown.

:func:`render_markdown` works from the JSON-ready dict :mod:`loadtest.bench_proxy` writes to
``bench-proxy.json``, not from live objects, so a saved result can be rendered again. Every
table says what its columns mean: a reader of a benchmark must be able to tell a slow proxy
from a busy machine or a busy client.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.bench_results import NA, SATURATED_PERCENT, number
from loadtest.procs import REPO_ROOT

__all__ = ["machine_info", "render_markdown"]


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(wrk: str | None, haproxy: str | None) -> dict[str, Any]:
    """What the numbers were measured on and with: CPUs, versions, the commit, limits."""
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        from balancer import __version__ as balancer_version
    except ImportError:
        balancer_version = "?"
    commit = _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--",
                         "balancer"])
    return {
        "nproc": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "balancer": balancer_version,
        "git_commit": None if commit is None else commit + (" (balancer/ modified)"
                                                            if dirty else ""),
        "haproxy": (_first_line([haproxy, "-v"]) if haproxy else None),
        "wrk": (_first_line([wrk, "-v"]) if wrk else None),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def _cpu_cell(cpu: Mapping[str, float | None], key: str) -> str:
    value = cpu.get(key)
    return NA if value is None else f"{value:.0f}%"


def _latency_table(runs: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any]) -> list[str]:
    first = runs[0]
    streaming = first["mode"] == "streaming"
    lines = [
        f"## Latency at {first['rate']:g} {first['mode']} req/s (open loop, aiohttp client, "
        f"{cfg['latency_requests']} requests per target in {cfg['rounds']} interleaved rounds)",
        "",
    ]
    if streaming:
        lines += [
            "*First event*: time to the first complete SSE `data:` event; *end*: time to the "
            "last byte; *added*: the target's percentile minus direct's. Times in ms; CPU in % "
            "of one core; *client lag*: how late the client sent (timer granularity is 1 ms).",
            "",
            "| target | requests | errors | first event p50 | p99 | end p50 | p99 "
            "| added first p50 | added first p99 | added end p50 | added end p99 "
            "| CPU upstream | CPU proxy | proxy µs/req | client lag p99 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "*Added*: the target's percentile minus direct's. Times in ms; CPU in % of one core; "
            "*client lag*: how late the client sent (timer granularity is 1 ms).",
            "",
            "| target | requests | errors | p50 | p99 | added p50 | added p99 "
            "| CPU upstream | CPU proxy | proxy µs/req | client lag p99 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for run in runs:
        fe, en = run["first_event_ms"], run["end_ms"]
        direct = run["target"] == "direct"

        def added(values: Mapping[str, float | None], q: str, skip: bool = direct) -> str:
            return "" if skip else number(values.get(q))

        cells = [run["target"], str(run["requests"]), str(run["errors"])]
        if streaming:
            cells += [number(fe["p50"]), number(fe["p99"]), number(en["p50"]), number(en["p99"]),
                      added(run["added_first_event_ms"], "p50"),
                      added(run["added_first_event_ms"], "p99"),
                      added(run["added_end_ms"], "p50"), added(run["added_end_ms"], "p99")]
        else:
            cells += [number(en["p50"]), number(en["p99"]),
                      added(run["added_end_ms"], "p50"), added(run["added_end_ms"], "p99")]
        cells += [_cpu_cell(run["cpu_percent"], "upstream"),
                  _cpu_cell(run["cpu_percent"], "proxy"),
                  number(run["proxy_cpu_us_per_request"], 0),
                  number(run["schedule_lag_ms"]["p99"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def render_markdown(result: Mapping[str, Any]) -> str:
    """The report of one benchmark run (the dict written to ``bench-proxy.json``)."""
    m = result["machine"]
    cfg = result["config"]
    lines = [
        "# Proxy benchmark: balancer vs HAProxy vs direct",
        "",
        f"{result['started']} · `{result['command']}`",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPUs | {m['nproc']} (usable {m['cpu_affinity']}), {m['cpu_model']} |",
        f"| OS | {m['platform']} |",
        f"| Python | {m['python']} |",
        f"| aiohttp / uvloop | {m['aiohttp']} / {m['uvloop']} |",
        f"| balancer | {m['balancer']}, commit {m['git_commit']} |",
        f"| HAProxy | {m['haproxy'] or 'not found'} |",
        f"| wrk | {m['wrk'] or 'not found (built-in asyncio generator used)'} |",
        f"| open files limit | {m['open_files_limit']} |",
        f"| CPU busy before start | {number(result['background_cpu_percent'], 0)}% of one core"
        " (other work on the machine) |",
        "",
    ]
    gen = result["generator"]
    lines += [
        f"## Max throughput ({gen}, {cfg['connections']} connections, "
        f"{cfg['duration']:g} s after a {cfg['warmup']:g} s warm-up)",
        "",
        "CPU columns: % of one core during the measured run; *other* is everything else on "
        "the machine (other processes, kernel interrupt time); *machine* is all CPUs together "
        f"(max {100 * (m['nproc'] or 1)}%). *µs/req*: the proxy's CPU time per request. "
        f"*Limited by*: the process at ≥ {SATURATED_PERCENT:g}% of a core (each one is "
        "single-threaded).",
        "",
        "| target | mode | req/s | p50 ms | p99 ms | errors | CPU upstream | CPU proxy "
        "| CPU generator | CPU other | CPU machine | proxy µs/req | limited by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in result["throughput"]:
        lat = run["latency_ms"]
        cpu = run["cpu_percent"]
        errors = run["non_2xx"] + sum(run["socket_errors"].values())
        err_cell = str(errors)
        if run["error"]:
            err_cell = f"failed: {run['error']}"
        elif errors:
            err_cell = (f"{errors} (non-2xx {run['non_2xx']}, socket "
                        + ", ".join(f"{k} {v}" for k, v in run["socket_errors"].items() if v)
                        + ")")
        lines.append(
            f"| {run['target']} | {run['mode']} | {number(run['requests_per_sec'], 0)} "
            f"| {number(lat.get('p50'))} | {number(lat.get('p99'))} "
            f"| {err_cell} | {_cpu_cell(cpu, 'upstream')} | {_cpu_cell(cpu, 'proxy')} "
            f"| {_cpu_cell(cpu, 'generator')} | {_cpu_cell(cpu, 'other')} "
            f"| {_cpu_cell(cpu, 'machine')} | {number(run['proxy_cpu_us_per_request'], 0)} "
            f"| {run['limited_by'] or NA} |"
        )
    lines.append("")
    if result["ratios"]:
        lines += ["Throughput ratios:", ""]
        for name, value in result["ratios"].items():
            lines.append(f"- {name}: {number(value)}")
        lines.append("")
    for mode_runs in result["latency"]:
        if mode_runs:
            lines += _latency_table(mode_runs, cfg)
    lines += ["## Targets for balancer", "", "| target | measured | met |", "|---|---:|---|"]
    for check in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
        if check.get("note"):
            met += f" ({check['note']})"
        lines.append(f"| {check['name']} | {check['measured']} | {met} |")
    lines.append("")
    if result["notes"]:
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in result["notes"]]
        lines.append("")
    return "\n".join(lines)
