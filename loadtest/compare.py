"""Compare routing strategies on simulated KV-caching model servers, in one run.

``python -m loadtest.compare`` generates one seeded workload and plays the same trace through
each contender, every one against fresh simulated pods (empty caches), and writes a table
(markdown and JSON) and plots (PNG):

* ``chwbl``, ``least-request``, ``round-robin``, ``random``: balancer with that strategy;
* ``sticky-oracle``: no balancer; the client pins each conversation to one pod, handing new
  conversations to pods in turn. It knows what no proxy can (the conversation id and when a
  conversation starts), so its cache hit rate is the ceiling for affinity routing;
* ``haproxy`` (when installed): HAProxy 2.6 with ``hash-type consistent`` and
  ``hash-balance-factor`` on the ``x-session-id`` header, which the client sets to the
  conversation id (HAProxy cannot read a JSON body, so it gets the oracle's key);
* ``vllm-router`` (when installed, ``pip install vllm-router``): its ``cache_aware`` policy,
  which keeps an approximate prefix tree of what it sent to each worker.

Each contender's pods run in their own process (so a slow pod process never stalls the
client's clock) and so does balancer; the client is this process. Figures per contender: TTFT
p50/p90/p99, E2E p50, requests/s, output tokens/s, prefix-cache hit rate (from the pods'
own counters), max/mean requests per pod, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from balancer.config import RoutingSettings
from loadtest.player import play
from loadtest.stats import Sample, percentile, summarize
from loadtest.trace import TraceRecord
from loadtest.workloads import DEFAULT_MODEL, generate

STRATEGIES = ("chwbl", "least-request", "round-robin", "random")
ORACLE = "sticky-oracle"
HAPROXY = "haproxy"
VLLM_ROUTER = "vllm-router"
CONTENDERS = (*STRATEGIES, ORACLE, HAPROXY, VLLM_ROUTER)
OPTIONAL_TOOLS = {HAPROXY: "apt-get install haproxy", VLLM_ROUTER: "pip install vllm-router"}
SESSION_HEADER = "x-session-id"
STARTUP_TIMEOUT_S = 30.0


@dataclass
class PodOptions:
    """How the simulated pods are started (flags of ``python -m loadtest.simserver``)."""

    pods: int = 4
    time_scale: float = 1.0
    extra: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    name: str
    summary: dict[str, Any]
    pods: list[dict[str, Any]]
    ttfts: list[float]
    in_flight: dict[str, float] = field(default_factory=dict)
    """Mean requests in flight per pod over the run (time-weighted): the load CHWBL bounds."""

    def row(self) -> dict[str, Any]:
        s = self.summary
        served = [p.get("requests_served", 0) for p in self.pods]
        mean = sum(served) / len(served) if served else 0
        queries = sum(p.get("prefix_cache_queries", 0) for p in self.pods)
        hits = sum(p.get("prefix_cache_hits", 0) for p in self.pods)
        return {
            "contender": self.name,
            "ttft_p50_s": s["ttft_p50_s"],
            "ttft_p90_s": s["ttft_p90_s"],
            "ttft_p99_s": s["ttft_p99_s"],
            "e2e_p50_s": s["e2e_p50_s"],
            "requests_per_s": s["requests_per_s"],
            "output_tokens_per_s": s["output_tokens_per_s"],
            "hit_rate": hits / queries if queries else None,
            "pod_requests": served,
            "requests_max_over_mean": max(served) / mean if mean else None,
            "pod_in_flight": [round(v, 2) for v in self.in_flight.values()],
            "load_max_over_mean": _max_over_mean(list(self.in_flight.values())),
            "requests": s["requests"],
            "errors": s["errors"],
        }


def _tool_path() -> str:
    """PATH plus this interpreter's directory, where pip puts the scripts of a venv."""
    return os.pathsep.join([os.environ.get("PATH", ""), os.path.dirname(sys.executable)])


def _max_over_mean(values: Sequence[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean else None


# -- processes ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def process(args: Sequence[str], *, name: str, log_dir: Path
                  ) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run a child process, its output to a log file; always terminate it (then kill)."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()


def _read_log(path: Path) -> str:
    """A child's log so far (small, local: read synchronously)."""
    return path.read_text(errors="replace")


async def wait_for_line(log_path: Path, pattern: str, count: int,
                        proc: asyncio.subprocess.Process) -> list[re.Match[str]]:
    """Wait until ``count`` lines of the log match ``pattern`` (bounded)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"{log_path.stem} exited early:\n{_read_log(log_path)[-2000:]}")
        matches = [m for m in map(regex.search, _read_log(log_path).splitlines()) if m]
        if len(matches) >= count:
            return matches
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{log_path.stem} did not start:\n{_read_log(log_path)[-2000:]}")


async def wait_http(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never became ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def balancer_config(pod_urls: Sequence[str], strategy: str, model: str, port: int,
                    admin_port: int, extra: dict[str, Any]) -> str:
    routing = {"strategy": strategy, **extra}
    return json.dumps({
        "server": {"host": "127.0.0.1", "port": port, "admin_port": admin_port,
                   "log_level": "warning"},
        "pools": [{"name": "sim", "models": [model], "endpoints": list(pod_urls)}],
        "routing": routing,
    })


def haproxy_config(pod_urls: Sequence[str], port: int, load_factor: float) -> str:
    servers = "\n".join(
        f"  server pod{i} {url.removeprefix('http://')}" for i, url in enumerate(pod_urls))
    return f"""global
  maxconn 4000
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  option http-no-delay
frontend front
  bind 127.0.0.1:{port}
  default_backend pods
backend pods
  balance hdr({SESSION_HEADER})
  hash-type consistent
  hash-balance-factor {round(load_factor * 100)}
{servers}
"""


# -- one contender -----------------------------------------------------------------------------


class Progress:
    """A one-line live view of a run: elapsed time, requests, errors, TTFT p50."""

    def __init__(self, name: str, duration_s: float) -> None:
        self.name = name
        self.duration_s = duration_s
        self.ttfts: list[float] = []
        self.requests = 0
        self.errors = 0
        self.started = time.monotonic()
        self.tty = sys.stdout.isatty()

    def on_sample(self, sample: Sample) -> None:
        if sample.cancelled:
            return
        self.requests += 1
        if sample.error is not None:
            self.errors += 1
        elif sample.ttft_s is not None:
            self.ttfts.append(sample.ttft_s)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        p50 = percentile(self.ttfts[-500:], 50)
        ttft = f"{p50:6.3f} s" if p50 is not None else "     - "
        return (f"  {self.name:<14} {min(elapsed, self.duration_s):5.0f}/{self.duration_s:.0f} s"
                f"  requests {self.requests:6d}  errors {self.errors:4d}  TTFT p50 (recent) {ttft}")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0 if self.tty else 10.0)
            if self.tty:
                print("\r" + self.line(), end="", flush=True)
            else:
                print(self.line(), flush=True)


async def run_contender(
    name: str,
    trace: list[TraceRecord],
    *,
    pods: PodOptions,
    duration_s: float,
    model: str,
    routing: dict[str, Any],
    log_dir: Path,
    concurrency: int,
) -> Outcome:
    """Fresh pods, the contender in front of them, the trace played through it."""
    python = sys.executable
    pod_args = [python, "-m", "loadtest.simserver", "--pods", str(pods.pods),
                "--port", "0", "--model", model, "--time-scale", str(pods.time_scale),
                "--log-level", "warning", *pods.extra]
    async with contextlib.AsyncExitStack() as stack:
        pod_proc = await stack.enter_async_context(
            process(pod_args, name=f"{name}-pods", log_dir=log_dir))
        matches = await wait_for_line(log_dir / f"{name}-pods.log",
                                      r"listening on (http://\S+)", pods.pods, pod_proc)
        pod_urls = [m.group(1) for m in matches]
        session = await stack.enter_async_context(aiohttp.ClientSession())
        for url in pod_urls:
            await wait_http(session, url + "/health")

        route: Callable[[str], str] | None = None
        base_url = ""
        session_header: str | None = None
        if name == ORACLE:
            assigned: dict[str, str] = {}

            def route(conversation_id: str) -> str:
                url = assigned.get(conversation_id)
                if url is None:
                    url = assigned[conversation_id] = pod_urls[len(assigned) % len(pod_urls)]
                return url + "/v1"
        elif name == HAPROXY:
            port = free_port()
            config = log_dir / "haproxy.cfg"
            # The same bound as balancer's, for a like-for-like comparison.
            load_factor = routing.get("load_factor", RoutingSettings().load_factor)
            config.write_text(haproxy_config(pod_urls, port, load_factor))
            await stack.enter_async_context(
                process(["haproxy", "-f", str(config)], name="haproxy", log_dir=log_dir))
            base_url = f"http://127.0.0.1:{port}/v1"
            session_header = SESSION_HEADER
            await wait_http(session, f"http://127.0.0.1:{port}/v1/models")
        elif name == VLLM_ROUTER:
            port, metrics_port = free_port(), free_port()
            executable = shutil.which(VLLM_ROUTER, path=_tool_path()) or VLLM_ROUTER
            await stack.enter_async_context(process(
                [executable, "--host", "127.0.0.1", "--port", str(port),
                 "--worker-urls", *pod_urls, "--policy", "cache_aware",
                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
                 "--log-level", "warning"],
                name=VLLM_ROUTER, log_dir=log_dir))
            base_url = f"http://127.0.0.1:{port}/v1"
            await wait_http(session, f"http://127.0.0.1:{port}/v1/models")
        else:
            port, admin_port = free_port(), free_port()
            config = log_dir / f"{name}.yaml"
            config.write_text(balancer_config(pod_urls, name, model, port, admin_port, routing))
            await stack.enter_async_context(process(
                [python, "-m", "balancer", "serve", "--config", str(config)],
                name=f"{name}-balancer", log_dir=log_dir))
            await wait_http(session, f"http://127.0.0.1:{admin_port}/readyz")
            base_url = f"http://127.0.0.1:{port}/v1"

        progress = Progress(name, duration_s)
        ticker = asyncio.create_task(progress.run())
        try:
            result = await play(
                trace, base_url or pod_urls[0] + "/v1", duration_s=duration_s,
                concurrency=concurrency, route=route, session_header=session_header,
                on_sample=progress.on_sample, grace_s=5.0, request_timeout_s=120.0,
            )
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        print(("\r" if progress.tty else "") + progress.line(), flush=True)
        pod_stats = []
        for url in pod_urls:
            async with session.get(url + "/stats") as response:
                pod_stats.append(await response.json())
    ttfts = sorted(s.ttft_s for s in result.samples
                   if s.error is None and not s.cancelled and s.ttft_s is not None)
    busy: dict[str, float] = {str(p.get("pod")): 0.0 for p in pod_stats}
    for sample in result.samples:
        if sample.pod is not None and sample.e2e_s is not None:
            busy[sample.pod] = busy.get(sample.pod, 0.0) + sample.e2e_s
    in_flight = {pod: total / result.wall_s for pod, total in busy.items()} if result.wall_s else {}
    return Outcome(name, summarize(result), pod_stats, ttfts, in_flight)


# -- report ------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("| contender | TTFT p50 (s) | TTFT p90 (s) | TTFT p99 (s) | E2E p50 (s) | req/s "
              "| output tok/s | prefix-cache hit rate | pod load max/mean (in flight) "
              "| pod requests max/mean | errors |")
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['contender']} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p90_s'])} "
            f"| {_fmt(r['ttft_p99_s'])} | {_fmt(r['e2e_p50_s'])} "
            f"| {_fmt(r['requests_per_s'], 1)} | {_fmt(r['output_tokens_per_s'], 0)} "
            f"| {_fmt(r['hit_rate'])} | {_fmt(r['load_max_over_mean'], 2)} "
            f"| {_fmt(r['requests_max_over_mean'], 2)} | {r['errors']}/{r['requests']} |")
    return "\n".join(lines)


def ratios(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """CHWBL against round-robin, least-request and the oracle, where those ran."""
    by = {r["contender"]: r for r in rows}
    out: dict[str, Any] = {}
    chwbl = by.get("chwbl")
    if chwbl is None:
        return out

    def change(key: str, other: str) -> float | None:
        a, b = chwbl.get(key), by.get(other, {}).get(key)
        return (a / b - 1) if a is not None and b else None

    for other in ("round-robin", "least-request", "random", HAPROXY, VLLM_ROUTER):
        if other in by:
            out[f"vs_{other}"] = {
                "ttft_p50_change": change("ttft_p50_s", other),
                "ttft_p99_change": change("ttft_p99_s", other),
                "output_tokens_per_s_change": change("output_tokens_per_s", other),
                "requests_per_s_change": change("requests_per_s", other),
            }
    if ORACLE in by and chwbl["hit_rate"] and by[ORACLE]["hit_rate"]:
        out["hit_rate_vs_oracle"] = chwbl["hit_rate"] / by[ORACLE]["hit_rate"]
    return out


def plot(outcomes: Sequence[Outcome], rows: Sequence[dict[str, Any]], out_dir: Path
         ) -> list[Path]:
    """TTFT CDF, throughput, hit rate and load per pod, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = [r["contender"] for r in rows]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for outcome in outcomes:
        if outcome.ttfts:
            n = len(outcome.ttfts)
            ax.plot(outcome.ttfts, [(i + 1) / n for i in range(n)], label=outcome.name)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(out_dir / "ttft_cdf.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    for key, label, filename in (
        ("output_tokens_per_s", "output tokens/s", "throughput.png"),
        ("hit_rate", "prefix-cache hit rate (pods' counters)", "hit_rate.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        values = [r[key] or 0 for r in rows]
        bars = ax.bar(names, values, color="tab:blue")
        ax.bar_label(bars, labels=[_fmt(v, 2 if key == "hit_rate" else 0) for v in values])
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
        paths.append(out_dir / filename)
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        served = r["pod_requests"]
        ax.bar([p + i * width for p in range(len(served))], served, width, label=r["contender"])
    pods = len(rows[0]["pod_requests"]) if rows else 0
    ax.set_xticks([p + width * (len(rows) - 1) / 2 for p in range(pods)],
                  [f"pod {p}" for p in range(pods)])
    ax.set_ylabel("requests served")
    ax.set_title("load per pod")
    ax.legend(fontsize="small", ncol=min(3, len(rows)), loc="upper center",
              bbox_to_anchor=(0.5, -0.12))
    paths.append(out_dir / "pod_load.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.compare",
        description="Play one workload through each routing strategy on simulated pods.",
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated, from {', '.join(CONTENDERS)} "
                             "(haproxy and vllm-router are skipped when not installed)")
    parser.add_argument("--workload", default="multi-turn",
                        choices=("multi-turn", "shared-docs", "unique"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=None,
                        help="arrivals per second (conversations or requests); workload default")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds each contender is driven")
    parser.add_argument("--pods", type=int, default=4, help="simulated pods")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="simulated pods' wall seconds per simulated second")
    parser.add_argument("--pod-arg", action="append", default=[],
                        help="extra flag for the simulated pods, "
                             "e.g. --pod-arg=--kv-cache-blocks=4000")
    parser.add_argument("--shape", action="append", default=[], metavar="KEY=VALUE",
                        help="workload shape field, e.g. --shape max_tokens=100-300 "
                             "--shape think_mean_s=1 (see loadtest/workloads.py)")
    parser.add_argument("--routing", action="append", default=[], metavar="KEY=VALUE",
                        help="balancer routing setting, e.g. --routing prefix_chars=200")
    parser.add_argument("--concurrency", type=int, default=512,
                        help="requests in flight at most on the client side")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="results/compare", help="output directory")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def parse_routing(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    routing: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--routing {item!r}: expected KEY=VALUE")
        routing[key.strip()] = yaml.safe_load(value)
    return routing


def parse_shape(workload: str, items: Sequence[str]) -> Any:
    """``KEY=VALUE`` pairs onto the workload's shape dataclass (``LO-HI`` for ranges)."""
    import dataclasses

    from loadtest import workloads

    shape_cls = {"multi-turn": workloads.MultiTurnShape, "shared-docs": workloads.SharedDocsShape,
                 "unique": workloads.UniqueShape}[workload]
    shape = shape_cls()
    fields = {f.name: f for f in dataclasses.fields(shape)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--shape {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(fields)}")
        current = getattr(shape, key)
        if isinstance(current, tuple):
            lo, _, hi = value.partition("-")
            changes[key] = (int(lo), int(hi or lo))
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(shape, **changes)


async def run_all(args: argparse.Namespace) -> list[Outcome]:
    """Play the workload through every contender, one after the other."""
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(unknown)}")
    for tool, install in OPTIONAL_TOOLS.items():
        if tool in contenders and shutil.which(tool, path=_tool_path()) is None:
            print(f"{tool} is not installed: skipping it ({install})")
            contenders.remove(tool)
    options: dict[str, Any] = {"duration_s": args.duration, "model": args.model}
    if args.rate is not None:
        options["rate"] = args.rate
    if args.shape:
        options["shape"] = parse_shape(args.workload, args.shape)
    trace = generate(args.workload, args.seed, **options)
    routing = parse_routing(args.routing)
    pods = PodOptions(pods=args.pods, time_scale=args.time_scale, extra=list(args.pod_arg))
    print(f"workload {args.workload} (seed {args.seed}): {len(trace)} requests over "
          f"{args.duration:g} s, {args.pods} simulated pods, contenders: {', '.join(contenders)}")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="balancer-compare-") as tmp:
        log_dir = Path(tmp)
        for name in contenders:
            outcomes.append(await run_contender(
                name, trace, pods=pods, duration_s=args.duration, model=args.model,
                routing=routing, log_dir=log_dir, concurrency=args.concurrency))
    return outcomes


def write_report(args: argparse.Namespace, argv: Sequence[str], outcomes: Sequence[Outcome]
                 ) -> dict[str, Any]:
    """The markdown table, the JSON report and the plots, in ``args.out``."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [o.row() for o in outcomes]
    report = {
        "command": " ".join(["python -m loadtest.compare", *argv]),
        "workload": args.workload,
        "seed": args.seed,
        "rate": args.rate,
        "duration_s": args.duration,
        "pods": args.pods,
        "pod_args": list(args.pod_arg),
        "routing": parse_routing(args.routing),
        "shape": list(args.shape),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "rows": rows,
        "ratios": ratios(rows),
        "summaries": {o.name: o.summary for o in outcomes},
    }
    table = markdown_table(rows)
    (out_dir / "compare.md").write_text(
        f"# Strategy comparison\n\n`{report['command']}`\n\n{table}\n")
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2))
    print()
    print(table)
    for key, value in report["ratios"].items():
        print(f"  chwbl {key}: {json.dumps(value)}")
    if not args.no_plots:
        paths = plot(outcomes, rows, out_dir)
        print("plots: " + ", ".join(str(p) for p in paths))
    print(f"table: {out_dir / 'compare.md'} and {out_dir / 'compare.json'}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # SIGTERM stops a run like Ctrl-C does, so the pods and balancers it started are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        import uvloop

        outcomes = uvloop.run(run_all(args))
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    write_report(args, argv, outcomes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
