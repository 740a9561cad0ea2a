"""What does balancer cost? Throughput and added latency against direct access and HAProxy.

``python -m loadtest.bench_proxy`` starts, each as its own process on 127.0.0.1: a fast upstream
double (:mod:`loadtest.bench_upstream`), balancer in front of it, and HAProxy in front of it
with the same kind of routing (consistent hashing with a 1.25 load bound). It then measures,
in one run so every number shares the same machine state:

1. **Max throughput**: ``wrk -t1 -c32`` per target (direct, balancer, HAProxy) and per mode
   (non-streaming, 20-event SSE stream), POSTing JSON chat bodies, after a warm-up.
2. **Added latency at a fixed rate**: an open-loop aiohttp client sends a fixed request rate
   (streaming 200/s and non-streaming 500/s by default) to each target, interleaved in rounds so
   drift on a shared machine hits all targets alike, and times each request to its first SSE
   event and to its end. balancer's and HAProxy's *added* latency is their percentile minus
   direct's percentile from the same run.

It writes a markdown report (stdout and ``OUT/bench-proxy.md``) and the raw numbers
(``OUT/bench-proxy.json``), with the CPU each process used in every run, which shows which
process is the bottleneck, and whether balancer meets its targets.

Why a separate upstream double and not the simulated model server: the proxy's cost is only
visible when the server behind it is much cheaper than the proxy. Why HAProxy: it is the
reference an operator would otherwise deploy, and it puts balancer's numbers in proportion.

Without wrk, a built-in asyncio load generator takes its place (labelled in the report: it
spends more CPU per request than wrk, so its numbers compare only with runs made the same way).
Without HAProxy its rows are skipped with a note. ``loadtest/install-bench-tools.sh`` installs
both on Debian/Ubuntu.

Every process binds 127.0.0.1 on a free port, every load run is bounded in time (under 2
minutes in all with the defaults), and every process started is stopped at the end, also on
Ctrl-C, SIGTERM or an error.

This module is the command line and the order of events; the parts live with their concern:
servers in :mod:`loadtest.procs`, HAProxy's configuration in :mod:`loadtest.haproxy`, wrk in
:mod:`loadtest.wrk`, the built-in generators in :mod:`loadtest.loadgen`, the results and
targets in :mod:`loadtest.bench_results`, the markdown in :mod:`loadtest.bench_report`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import aiohttp
import uvloop

from loadtest import haproxy, loadgen, wrk
from loadtest.bench_report import machine_info, render_markdown
from loadtest.bench_results import (
    FOREIGN_CPU_NOTE,
    LatencyRun,
    ThroughputRun,
    add_latency_over_direct,
    latency_notes,
    latency_run,
    number,
    target_checks,
    throughput_notes,
    throughput_ratios,
)
from loadtest.bench_upstream import CHAT_PATH, DEFAULT_MODEL
from loadtest.hostcpu import CpuMeter, background_cpu
from loadtest.loadgen import BODY_VARIANTS, REQUEST_TIMEOUT_S, RoundTrip, chat_bodies
from loadtest.procs import (
    HOST,
    Services,
    StartupError,
    free_port,
    raise_fd_limit,
    wait_ready,
)

MODEL: Final = DEFAULT_MODEL
CHUNKS: Final = 20
"""chat.completion.chunk events per streamed response (plus ``data: [DONE]``)."""
LOAD_FACTOR: Final = 1.25
"""HAProxy's load bound (no server above 125 % of the mean load). With one upstream server it
never changes where a request goes; it makes HAProxy do the bounded-load bookkeeping that
balancer does per request, so the cost compared is like for like."""


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- servers ----------------------------------------------------------------------------------


@dataclass
class Targets:
    """The servers under test: each target's base URL, and per target the pids whose CPU its
    runs meter (``upstream``, and ``proxy`` for balancer and HAProxy)."""

    urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, dict[str, int]] = field(default_factory=dict)
    haproxy_config: str | None = None
    """The configuration HAProxy ran with, for the JSON (None without HAProxy)."""


async def start_servers(args: argparse.Namespace, services: Services, tmpdir: Path,
                        haproxy_bin: str | None, notes: list[str]) -> Targets:
    """The upstream double, balancer and (when installed) HAProxy, each serving. HAProxy
    failing to start costs only its rows (with a note); anything else is fatal."""
    targets = Targets()
    upstream_port = free_port()
    upstream = f"http://{HOST}:{upstream_port}"
    up = services.start("upstream", [
        sys.executable, "-m", "loadtest.bench_upstream", "--host", HOST,
        "--port", str(upstream_port), "--model", MODEL, "--chunks", str(CHUNKS),
    ])
    await wait_ready(up, upstream + "/health")
    targets.urls["direct"] = upstream
    targets.pids["direct"] = {"upstream": up.pid}

    port, admin_port = free_port(), free_port()
    bal = services.start("balancer", [
        sys.executable, "-m", "balancer", "serve",
        "--endpoint", upstream, "--model", MODEL,
        "--host", HOST, "--port", str(port), "--admin-port", str(admin_port),
        "--log-level", "warning", *args.balancer_arg,
    ])
    await wait_ready(bal, f"http://{HOST}:{admin_port}/readyz")
    await wait_ready(bal, f"http://{HOST}:{port}/v1/models")
    targets.urls["balancer"] = f"http://{HOST}:{port}"
    targets.pids["balancer"] = {"upstream": up.pid, "proxy": bal.pid}

    if haproxy_bin is not None:
        hport = free_port()
        text = haproxy.config([upstream], port=hport, balance=haproxy.BALANCE_URI,
                              load_factor=LOAD_FACTOR,
                              maxconn=haproxy.maxconn_within_fd_limit())
        cfg = tmpdir / "haproxy.cfg"
        cfg.write_text(text, encoding="utf-8")
        hap = services.start("haproxy", haproxy.argv(haproxy_bin, cfg))
        try:
            await wait_ready(hap, f"http://{HOST}:{hport}/health")
        except StartupError as e:
            notes.append(f"HAProxy did not start, its rows are skipped: {e}")
            services.stop("haproxy")
        else:
            targets.urls["haproxy"] = f"http://{HOST}:{hport}"
            targets.pids["haproxy"] = {"upstream": up.pid, "proxy": hap.pid}
            targets.haproxy_config = text
    return targets


def smoke_check(base_url: str) -> str | None:
    """One request of each mode; the error, or None when both answers are complete."""
    try:
        body = chat_bodies(MODEL, stream=False, max_tokens=CHUNKS, n=1)[0]
        req = urllib.request.Request(base_url + CHAT_PATH, data=body, method="POST",
                                     headers=loadgen.JSON_HEADERS)
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            data = json.loads(response.read())
        if not data.get("choices"):
            return f"non-streaming answer without choices: {data!r}"[:300]
        body = chat_bodies(MODEL, stream=True, max_tokens=CHUNKS, n=1)[0]
        req = urllib.request.Request(base_url + CHAT_PATH, data=body, method="POST",
                                     headers=loadgen.JSON_HEADERS)
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            text = response.read()
        events = [line for line in text.split(b"\n") if line.startswith(b"data: ")]
        if len(events) != CHUNKS + 1 or events[-1] != b"data: [DONE]":
            return f"stream had {len(events)} data lines, expected {CHUNKS + 1} ending [DONE]"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _smoke_check_all(targets: Targets, services: Services, notes: list[str]) -> None:
    """Every target answers both modes whole; HAProxy failing costs only its rows."""
    for name in list(targets.urls):
        problem = smoke_check(targets.urls[name])
        if problem is None:
            continue
        if name == "haproxy":
            notes.append(f"HAProxy failed the smoke check, its rows are skipped: {problem}")
            del targets.urls[name]
            services.stop("haproxy")
            continue
        raise StartupError(f"{name} failed the smoke check: {problem}")


# -- max throughput ---------------------------------------------------------------------------


def _throughput_wrk(run: ThroughputRun, wrk_bin: str, url: str, script: Path,
                    args: argparse.Namespace, pids: Mapping[str, int]) -> None:
    if args.warmup > 0:
        wrk.run(wrk_bin, url, script, connections=args.connections, seconds=args.warmup,
                latency=False)
    meter = CpuMeter(pids, "children")
    text = wrk.run(wrk_bin, url, script, connections=args.connections, seconds=args.duration,
                   latency=True)
    run.cpu_percent = meter.stop()
    report = wrk.parse(text)
    run.take_wrk(report)
    if report.requests_per_sec is None:
        raise RuntimeError(f"cannot parse wrk output: {text[:300]!r}")


def _throughput_builtin(run: ThroughputRun, port: int, requests: Sequence[bytes],
                        args: argparse.Namespace, pids: Mapping[str, int]) -> None:
    async def go() -> tuple[loadgen.ClosedLoopStats, float, dict[str, float | None]]:
        if args.warmup > 0:
            await loadgen.closed_loop(port, requests, args.connections, args.warmup,
                                      measure=False)
        meter = CpuMeter(pids, "self")
        t0 = time.perf_counter()
        stats = await loadgen.closed_loop(port, requests, args.connections, args.duration,
                                          measure=True)
        return stats, time.perf_counter() - t0, meter.stop()

    stats, elapsed, cpu = uvloop.run(go())
    run.cpu_percent = cpu
    run.take_closed_loop(stats, elapsed)


def measure_throughput(args: argparse.Namespace, targets: Targets, tmpdir: Path,
                       wrk_bin: str | None) -> list[ThroughputRun]:
    """Each target at full speed, non-streaming then streaming, with wrk or the built-in
    generator; a run that fails keeps its error and the others go on."""
    runs: list[ThroughputRun] = []
    for stream in (False, True):
        mode = "streaming" if stream else "non-streaming"
        bodies = chat_bodies(MODEL, stream=stream, max_tokens=CHUNKS)
        script = tmpdir / f"{mode}.lua"
        script.write_text(wrk.script(bodies, CHAT_PATH), encoding="utf-8")
        for name, base in targets.urls.items():
            run = ThroughputRun(name, mode, "wrk" if wrk_bin else "built-in generator")
            log(f"throughput: {name} {mode} ({args.warmup:g} s warm-up + {args.duration:g} s)")
            try:
                if wrk_bin:
                    _throughput_wrk(run, wrk_bin, base + CHAT_PATH, script, args,
                                    targets.pids[name])
                else:
                    port_of = int(base.rsplit(":", 1)[1])
                    _throughput_builtin(run, port_of, loadgen.raw_requests(bodies, port_of),
                                        args, targets.pids[name])
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                run.error = str(e)[:300]
            run.derive()
            log(f"  {number(run.requests_per_sec, 0)} req/s, {run.errors} errors, "
                f"CPU {run.cpu_percent}")
            runs.append(run)
    return runs


# -- added latency ----------------------------------------------------------------------------


async def measure_latency(targets: Mapping[str, str], pids: Mapping[str, Mapping[str, int]],
                          *, stream: bool, rate: float, count: int, rounds: int,
                          warmup: int) -> list[LatencyRun]:
    """Open-loop runs against every target, interleaved in ``rounds`` so that anything else
    happening on the machine during the run lands on all targets alike."""
    bodies = chat_bodies(MODEL, stream=stream, max_tokens=CHUNKS)
    trips: dict[str, list[RoundTrip]] = {name: [] for name in targets}
    cpu: dict[str, list[dict[str, float | None]]] = {name: [] for name in targets}
    sessions: dict[str, aiohttp.ClientSession] = {}
    try:
        for name in targets:
            sessions[name] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            )
        for name, base in targets.items():  # open connections, fill caches
            await loadgen.open_loop(sessions[name], base + CHAT_PATH, bodies, stream, rate,
                                    warmup)
        per_round = max(1, count // rounds)
        for r in range(rounds):
            for name, base in targets.items():
                gc.collect()
                gc.disable()  # a collection in the client would land on one target only
                meter = CpuMeter(pids[name], "self")
                try:
                    got = await loadgen.open_loop(sessions[name], base + CHAT_PATH, bodies,
                                                  stream, rate, per_round, offset=r * per_round)
                finally:
                    gc.enable()
                cpu[name].append(meter.stop())
                trips[name].extend(got)
    finally:
        for session in sessions.values():
            await session.close()
    runs = [latency_run(name, stream=stream, rate=rate, trips=trips[name], cpu=cpu[name])
            for name in targets]
    add_latency_over_direct(runs)
    return runs


def measure_latencies(args: argparse.Namespace, targets: Targets,
                      notes: list[str]) -> list[list[LatencyRun]]:
    """The fixed-rate runs: streaming, then non-streaming unless its rate is 0."""
    latency: list[list[LatencyRun]] = []
    modes = [(True, args.rate)]
    if args.nonstream_rate > 0:
        modes.append((False, args.nonstream_rate))
    for stream, rate in modes:
        mode = "streaming" if stream else "non-streaming"
        log(f"latency: {args.latency_requests} {mode} requests per target at {rate:g}/s "
            f"(~{len(targets.urls) * args.latency_requests / rate:.0f} s)")
        runs = uvloop.run(measure_latency(
            targets.urls, targets.pids, stream=stream, rate=rate, count=args.latency_requests,
            rounds=args.rounds, warmup=max(20, int(rate / 4)),
        ))
        for r in runs:
            log(f"  {r.target}: first event {r.first_event_ms}, end {r.end_ms}, "
                f"errors {r.errors}, added end {r.added_end_ms}")
            notes += latency_notes(r)
        latency.append(runs)
    return latency


# -- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_proxy",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=int, default=8,
                        help="seconds of each measured max-throughput run (whole seconds, "
                             "as wrk takes them)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of load before each max-throughput run, not measured")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent connections in the max-throughput runs")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="streaming requests/s in the fixed-rate latency runs")
    parser.add_argument("--nonstream-rate", type=float, default=500.0,
                        help="non-streaming requests/s in the fixed-rate runs (0: skip)")
    parser.add_argument("--latency-requests", type=int, default=2000,
                        help="requests per target and mode in the fixed-rate runs")
    parser.add_argument("--rounds", type=int, default=4,
                        help="interleaved rounds the fixed-rate requests are split into")
    parser.add_argument("--skip-haproxy", action="store_true", help="do not run HAProxy")
    parser.add_argument("--no-wrk", action="store_true",
                        help="use the built-in asyncio load generator even if wrk exists")
    parser.add_argument("--wrk", default=None, metavar="PATH", help="wrk binary (default: PATH)")
    parser.add_argument("--haproxy", default=None, metavar="PATH",
                        help="haproxy binary (default: PATH, then the sbin directories)")
    parser.add_argument("--balancer-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `balancer serve` (repeatable; write "
                             "--balancer-arg=--strategy=round-robin for values with dashes)")
    parser.add_argument("--out", default="results", metavar="DIR",
                        help="directory for bench-proxy.md and bench-proxy.json")
    parser.add_argument("--fail-on-miss", action="store_true",
                        help="exit with status 1 when a balancer target is not met")
    return parser



def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C does, so the ``finally`` cleanup always runs."""
    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, _raise_on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1 or args.rate <= 0:
        raise SystemExit("--duration, --connections and --rate must be positive")
    if args.latency_requests < 1 or args.rounds < 1 or args.nonstream_rate < 0:
        raise SystemExit("--latency-requests and --rounds must be >= 1, --nonstream-rate >= 0")
    command = "python -m loadtest.bench_proxy" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    raise_fd_limit()
    wrk_bin = None if args.no_wrk else shutil.which(args.wrk or "wrk")
    haproxy_bin = None if args.skip_haproxy else haproxy.find(args.haproxy)
    notes: list[str] = []
    if wrk_bin is None:
        notes.append("wrk " + ("disabled (--no-wrk)" if args.no_wrk else "not found")
                     + ": max throughput comes from the built-in asyncio generator (raw "
                     "HTTP/1.1 over asyncio streams in the benchmark process). It spends more "
                     "CPU per request than wrk, CPU the targets then lack on a small machine, "
                     "so compare its req/s only with runs made the same way "
                     "(`loadtest/install-bench-tools.sh` installs wrk).")
    if args.skip_haproxy:
        notes.append("HAProxy skipped (--skip-haproxy).")
    elif haproxy_bin is None:
        notes.append("HAProxy not found: its rows are skipped "
                     "(see `loadtest/install-bench-tools.sh`).")
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    log("measuring background CPU for 1 s")
    background = background_cpu()
    machine = machine_info(wrk_bin, haproxy_bin)
    if background is not None and background > FOREIGN_CPU_NOTE:
        notes.append(f"The machine was already {background:.0f}% busy (of one core) before "
                     "the benchmark started; numbers may be lower than on an idle machine.")

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, _signals_exit():
        tmpdir = Path(tmp)
        services = Services(tmpdir)
        try:
            result = _run(args, services, tmpdir, wrk_bin, haproxy_bin, notes)
        except StartupError as e:
            log(f"error: {e}")
            return 2
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            log("stopping servers")
            logs = {name: (svc.log_lines(), svc.log_tail())
                    for name, svc in services.running.items()}
            services.stop_all()
    for name, (count, tail) in logs.items():
        if count:
            notes.append(f"{name} wrote {count} log lines (last: {tail[-1][:200]!r}); see "
                         "`logs` in the JSON.")
    result.update(
        started=started, command=command, machine=machine, background_cpu_percent=background,
        notes=notes,
        logs={name: tail for name, (count, tail) in logs.items() if count},
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(result)
    (out / "bench-proxy.md").write_text(markdown, encoding="utf-8")
    (out / "bench-proxy.json").write_text(json.dumps(result, indent=2, default=str) + "\n",
                                          encoding="utf-8")
    print(markdown)
    missed = [c["name"] for c in result["targets"] if c["met"] is False]
    summary = ("all balancer targets met" if not missed
               else "targets NOT met: " + "; ".join(missed))
    print(summary)
    log(f"wrote {out / 'bench-proxy.md'} and {out / 'bench-proxy.json'}; {summary}")
    return 1 if missed and args.fail_on_miss else 0


def _run(args: argparse.Namespace, services: Services, tmpdir: Path, wrk_bin: str | None,
         haproxy_bin: str | None, notes: list[str]) -> dict[str, Any]:
    """Start the servers, run every measurement, return the result (minus machine info)."""
    targets = uvloop.run(start_servers(args, services, tmpdir, haproxy_bin, notes))
    _smoke_check_all(targets, services, notes)
    log("servers ready: " + ", ".join(f"{n} {u}" for n, u in targets.urls.items()))
    throughput = measure_throughput(args, targets, tmpdir, wrk_bin)
    latency = measure_latencies(args, targets, notes)
    notes += throughput_notes(throughput)
    flat_latency = [r for runs in latency for r in runs]
    return {
        "config": {
            "duration": args.duration, "warmup": args.warmup, "connections": args.connections,
            "rate": args.rate, "nonstream_rate": args.nonstream_rate,
            "latency_requests": args.latency_requests, "rounds": args.rounds,
            "balancer_args": args.balancer_arg, "model": MODEL, "stream_chunks": CHUNKS,
            "body_variants": BODY_VARIANTS,
            "haproxy_config": targets.haproxy_config if "haproxy" in targets.urls else None,
        },
        "generator": "wrk -t1" if wrk_bin else "built-in asyncio generator",
        "throughput": [dataclasses.asdict(r) | {"errors": r.errors} for r in throughput],
        "latency": [[dataclasses.asdict(r) for r in runs] for runs in latency],
        "ratios": throughput_ratios(throughput),
        "targets": target_checks(throughput, flat_latency, wrk_bin is not None, args.rate),
    }


if __name__ == "__main__":
    raise SystemExit(main())
