"""What does one request cost balancer in CPU instructions? A deterministic measure.

``python -m loadtest.bench_instructions`` runs ``balancer serve`` under valgrind's callgrind,
in front of the upstream double (:mod:`loadtest.bench_upstream`), and sends it ``--requests``
chat completions one after the other on one keep-alive connection: once non-streaming
(``plain``), once as 20-event SSE streams (``stream``). Each mode runs twice, with those
requests and with none; the difference, divided by the number of requests, is what one
request costs: parsing, routing, the upstream hop, relaying and the bookkeeping after it,
without start-up and shutdown.

Why instructions and not requests/s: on a shared machine the req/s of one build varies by
tens of percent between runs (:mod:`loadtest.bench_proxy` reports them, and the other work
on the machine), while the instructions a request takes hardly depend on what else runs.
Whatever would make them depend on timing is held still:

- requests go one at a time, so no run batches more events per loop iteration than another;
- the upstream double sends each stream in one piece (``--whole-streams``): balancer reads
  and relays it in one go, where the number of pieces a stream arrives in otherwise depends
  on scheduling, and each piece costs tens of thousands of instructions. (So the per-event
  cost of a long stream is not what this measures; the per-stream cost is.);
- active health checks are off: they run on a timer, so their cost grows with the
  wall-clock time, which callgrind stretches and other work on the machine stretches more;
- one string-hash seed (``PYTHONHASHSEED``) for every run.

On an idle machine two runs of one build then agree to about 0.01%. Other work competing for
the CPU still moves the count, by up to about 1% (fewer event-loop iterations: each one finds
more to do), so compare builds measured in one run (``--baseline``) on a machine that is
as quiet as it can be; a change of a percent or two on the request path then shows.

``--baseline REV`` measures that git revision too (checked out with ``git worktree`` into a
temporary directory, removed afterwards) and prints this checkout's cost relative to it.
Both run against the same upstream double, from this checkout.

Needs valgrind (``apt-get install valgrind``). callgrind runs Python about fifty times
slower, so a run takes a few minutes: about four for both modes, eight with a baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from loadtest.bench_upstream import CHAT_PATH, DEFAULT_MODEL
from loadtest.procs import (
    HOST,
    REPO_ROOT,
    Services,
    StartupError,
    find_executable,
    free_port,
    wait_ready,
)

MODES: Final = ("plain", "stream")
CHUNKS: Final = 20
"""Events per streamed completion, as in :mod:`loadtest.bench_proxy`."""
VALGRIND_STARTUP_S: Final = 600.0
"""How long balancer may take to serve under callgrind, which slows Python down ~50x."""
VALGRIND_STOP_S: Final = 300.0
"""How long it may take to drain, exit and write its callgrind file after SIGTERM."""
_DETERMINISTIC: Final = {"PYTHONHASHSEED": "0"}
"""One string-hash seed for every run: how often set and dict lookups collide, and so how
many instructions they take, otherwise changes from run to run."""
_TOTAL: Final = re.compile(rb"^(?:summary|totals): (\d+)", re.M)


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the results."""
    print(f"[instructions {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def chat_body(stream: bool) -> bytes:
    return json.dumps({"model": DEFAULT_MODEL, "stream": stream,
                       "messages": [{"role": "user", "content": "hello there"}]}).encode()


def send_requests(port: int, count: int, stream: bool) -> None:
    """``count`` chat completions, one at a time on one keep-alive connection."""
    body = chat_body(stream)
    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        for _ in range(count):
            connection.request("POST", CHAT_PATH, body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"balancer answered {response.status} to a chat completion")
    finally:
        connection.close()


def callgrind_total(path: Path) -> int:
    """The instruction count a callgrind output file reports for the whole run."""
    match = _TOTAL.search(path.read_bytes())
    if match is None:
        raise RuntimeError(f"no instruction total in {path}")
    return int(match.group(1))


class Meter:
    """Runs ``balancer serve`` of one checkout under callgrind against one upstream."""

    def __init__(self, services: Services, valgrind: str, upstream: str, out_dir: Path,
                 balancer_args: Sequence[str]) -> None:
        self.services = services
        self.valgrind = valgrind
        self.upstream = upstream
        self.out_dir = out_dir
        self.balancer_args = list(balancer_args)

    def total(self, checkout: Path, label: str, mode: str, requests: int) -> int:
        """Instructions balancer executes from start to exit, answering ``requests``."""
        port, admin_port = free_port(), free_port()
        name = f"balancer-{label}-{mode}-{requests}"
        out = self.out_dir / f"callgrind.{label}.{mode}.{requests}"
        service = self.services.start(name, [
            self.valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, "-m", "balancer", "serve", "--endpoint", self.upstream,
            "--model", DEFAULT_MODEL, "--host", HOST, "--port", str(port),
            "--admin-port", str(admin_port), "--log-level", "warning",
            "--set", "drain.delay=0", "--set", "health.active=false", *self.balancer_args,
        ], cwd=checkout, env=_DETERMINISTIC)
        try:
            asyncio.run(wait_ready(service, f"http://{HOST}:{admin_port}/readyz",
                                   timeout_s=VALGRIND_STARTUP_S))
            send_requests(port, requests, stream=mode == "stream")
        finally:
            service.stop(VALGRIND_STOP_S)
            self.services.stop(name)
        return callgrind_total(out)

    def per_request(self, checkout: Path, label: str, mode: str, requests: int) -> float:
        """Instructions per request: a run with ``requests`` less a run with none."""
        log(f"{label} {mode}: a run with no requests")
        idle = self.total(checkout, label, mode, 0)
        log(f"{label} {mode}: a run with {requests} requests")
        busy = self.total(checkout, label, mode, requests)
        return (busy - idle) / requests


@contextlib.contextmanager
def worktree(revision: str, parent: Path) -> Iterator[Path]:
    """A detached ``git worktree`` of ``revision`` under ``parent``, removed afterwards."""
    path = parent / "baseline"
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "--quiet",
                    str(path), revision], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force",
                        str(path)], check=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_instructions",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per measured run (the cost is per request)")
    parser.add_argument("--mode", choices=MODES, action="append", default=None,
                        help="plain (non-streaming) or stream; repeatable (default: both)")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also measure this git revision and print the ratio to it")
    parser.add_argument("--balancer-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `balancer serve` (repeatable; e.g. "
                             "--balancer-arg=--log-level=info to include the access log)")
    parser.add_argument("--callgrind-dir", metavar="DIR", default=None,
                        help="keep the callgrind files here (for callgrind_annotate)")
    return parser


def render(results: dict[str, dict[str, float]], labels: Sequence[str],
           requests: int) -> str:
    """The results as a small table: instructions per request, and the ratio to the
    baseline when there is one."""
    lines = [f"instructions per request ({requests} requests on one keep-alive connection, "
             "less a run with none)",
             f"{'mode':<8}" + "".join(f"{label:>14}" for label in labels)
             + (f"{'ratio':>8}" if len(labels) == 2 else "")]
    for mode, costs in results.items():
        row = f"{mode:<8}" + "".join(f"{costs[label]:>14,.0f}" for label in labels)
        if len(labels) == 2:
            row += f"{costs[labels[0]] / costs[labels[1]]:>8.3f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1:
        raise SystemExit("--requests must be >= 1")
    valgrind = find_executable("valgrind")
    if valgrind is None:
        print("valgrind not found: this benchmark counts instructions with valgrind's "
              "callgrind (on Debian/Ubuntu: apt-get install valgrind)", file=sys.stderr)
        return 2
    modes = args.mode or list(MODES)
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp, \
            Services(Path(tmp)) as services:
        tmpdir = Path(tmp)
        out_dir = Path(args.callgrind_dir) if args.callgrind_dir else tmpdir
        out_dir.mkdir(parents=True, exist_ok=True)
        upstream_port = free_port()
        upstream = services.start("upstream", [
            sys.executable, "-m", "loadtest.bench_upstream", "--host", HOST,
            "--port", str(upstream_port), "--model", DEFAULT_MODEL, "--chunks", str(CHUNKS),
            "--whole-streams",
        ])
        try:
            asyncio.run(wait_ready(upstream, f"http://{HOST}:{upstream_port}/health"))
            meter = Meter(services, valgrind, f"http://{HOST}:{upstream_port}", out_dir,
                          args.balancer_arg)
            labels = ["checkout"]
            results = {mode: {"checkout": meter.per_request(REPO_ROOT, "checkout", mode,
                                                            args.requests)}
                       for mode in modes}
            if args.baseline:
                labels.append(args.baseline)
                with worktree(args.baseline, tmpdir) as base:
                    for mode in modes:
                        results[mode][args.baseline] = meter.per_request(
                            base, "baseline", mode, args.requests)
        except (StartupError, RuntimeError, OSError, subprocess.CalledProcessError) as e:
            log(f"error: {e}")
            return 2
        except KeyboardInterrupt:
            log("interrupted")
            return 130
    print(render(results, labels, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
