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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import aiohttp
import uvloop

from loadtest.hostcpu import CpuMeter, background_cpu, free_port, raise_fd_limit
from loadtest.stats import percentile

HOST: Final = "127.0.0.1"
MODEL: Final = "bench-model"
CHAT_PATH: Final = "/v1/chat/completions"
CHUNKS: Final = 20
"""chat.completion.chunk events per streamed response (plus ``data: [DONE]``)."""
BODY_VARIANTS: Final = 64
"""Distinct request bodies (distinct first user messages, so distinct routing keys)."""
REPO_ROOT: Final = Path(__file__).resolve().parent.parent

# balancer's performance targets (for a 2-core machine).
TARGET_NONSTREAM_RPS: Final = 5000.0
TARGET_STREAM_RPS: Final = 3000.0
TARGET_ADDED_P50_MS: Final = 1.0
TARGET_ADDED_P99_MS: Final = 5.0

NA: Final = "n/a"
"""Table cell for a value that was not measured."""
LATE_MS: Final = 3.0
"""Client schedule lag (p99) above which the report warns: event-loop timers fire up to a
millisecond late by design, more means the client itself was busy."""
SATURATED_PERCENT: Final = 85.0
"""CPU (% of one core) at which a single-threaded process counts as the bottleneck."""
FOREIGN_CPU_NOTE: Final = 25.0
"""CPU (% of one core) taken by unrelated processes during a run above which the report
says the run shared the machine."""
HAPROXY_MAXCONN: Final = 4000
STARTUP_TIMEOUT: Final = 20.0
REQUEST_TIMEOUT: Final = 10.0
HAPROXY_SEARCH_DIRS: Final = ("/usr/local/sbin", "/usr/sbin", "/sbin")
"""HAProxy installs into sbin, which is often not on a normal user's PATH."""


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- request bodies ---------------------------------------------------------------------------


def chat_bodies(model: str, *, stream: bool, n: int = BODY_VARIANTS) -> list[bytes]:
    """OpenAI chat bodies with distinct first user messages, so the proxy hashes real keys."""
    bodies = []
    for i in range(n):
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user",
                 "content": f"Conversation {i}: in one sentence, what does a load balancer do?"},
            ],
            "max_tokens": CHUNKS,
        }
        if stream:
            body["stream"] = True
        bodies.append(json.dumps(body).encode())
    return bodies


def wrk_script(bodies: Sequence[bytes]) -> str:
    """A wrk Lua script that POSTs the bodies in turn, formatted once per thread in init()."""
    items = []
    for body in bodies:
        text = body.decode()
        if "]==]" in text:
            raise ValueError("body cannot be embedded in a Lua long string")
        items.append(f"  [==[{text}]==],")
    return "\n".join([
        "-- Generated by loadtest.bench_proxy: POST JSON chat bodies in turn.",
        "local bodies = {",
        *items,
        "}",
        "local requests = {}",
        "local i = 0",
        "function init(args)",
        "  for k, body in ipairs(bodies) do",
        f'    requests[k] = wrk.format("POST", "{CHAT_PATH}",',
        '      {["Content-Type"] = "application/json"}, body)',
        "  end",
        "end",
        "function request()",
        "  i = i % #requests + 1",
        "  return requests[i]",
        "end",
        "",
    ])


def raw_requests(bodies: Sequence[bytes], port: int) -> list[bytes]:
    """Whole HTTP/1.1 requests for the built-in generator (no per-request formatting)."""
    return [
        (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        + body
        for body in bodies
    ]


# -- processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM if the benchmark dies, even by SIGKILL,
    so no server outlives it. Best effort: elsewhere the ``finally`` cleanup is all there is."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class Service:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def log_lines(self) -> int:
        try:
            return len(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines())
        except OSError:
            return 0


class Services:
    """Every process the benchmark starts; :meth:`stop_all` ends them (by pid) whatever
    happened, so a failed or interrupted run leaves nothing listening."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, Service] = {}

    def start(self, name: str, argv: list[str]) -> Service:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        service = Service(name, argv, popen, log_path)
        self.running[name] = service
        return service

    def stop(self, name: str, grace: float = 5.0) -> None:
        service = self.running.pop(name, None)
        if service is None or service.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            service.popen.send_signal(signal.SIGTERM)
        try:
            service.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                service.popen.kill()
            service.popen.wait(grace)

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


class StartupError(RuntimeError):
    pass


def wait_ready(service: Service, port: int, *, http_path: str | None = None,
               timeout: float = STARTUP_TIMEOUT) -> None:
    """Poll until the port accepts connections (and ``http_path`` answers 200)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        code = service.popen.poll()
        if code is not None:
            raise StartupError(f"{service.name} exited with status {code} at start:\n  "
                               + "\n  ".join(service.log_tail()))
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                pass
            if http_path is None:
                return
            url = f"http://{HOST}:{port}{http_path}"
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise StartupError(f"{service.name} not ready on port {port} after {timeout:g} s ({last}):"
                       "\n  " + "\n  ".join(service.log_tail()))


def smoke_check(base_url: str) -> str | None:
    """One request of each mode; the error, or None when both answers are complete."""
    try:
        body = chat_bodies(MODEL, stream=False, n=1)[0]
        req = urllib.request.Request(base_url + CHAT_PATH, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as response:
            data = json.loads(response.read())
        if not data.get("choices"):
            return f"non-streaming answer without choices: {data!r}"[:300]
        body = chat_bodies(MODEL, stream=True, n=1)[0]
        req = urllib.request.Request(base_url + CHAT_PATH, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as response:
            text = response.read()
        events = [line for line in text.split(b"\n") if line.startswith(b"data: ")]
        if len(events) != CHUNKS + 1 or events[-1] != b"data: [DONE]":
            return f"stream had {len(events)} data lines, expected {CHUNKS + 1} ending [DONE]"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def haproxy_config(port: int, upstream_port: int, maxconn: int) -> str:
    """HAProxy doing what balancer does, as closely as its config allows: consistent hashing
    with a 125 % load bound, one thread (balancer is one event loop), keep-alive both ways."""
    return f"""\
# Generated by loadtest.bench_proxy.
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    # Without it HAProxy holds the first chunk of a stream back (Nagle-like merging) for
    # up to ~200 ms, which would dominate the streaming latency.
    option http-no-delay
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend bench
    bind {HOST}:{port}
    maxconn {maxconn}
    default_backend upstream

backend upstream
    balance uri
    hash-type consistent
    hash-balance-factor 125
    server upstream-0 {HOST}:{upstream_port} maxconn {maxconn}
"""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# -- max throughput: wrk ----------------------------------------------------------------------


@dataclass
class ThroughputRun:
    target: str
    mode: str
    generator: str
    requests_per_sec: float | None = None
    requests: int = 0
    seconds: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    cpu_percent: dict[str, float | None] = field(default_factory=dict)
    proxy_cpu_us_per_request: float | None = None
    upstream_cpu_us_per_request: float | None = None
    limited_by: str | None = None
    error: str | None = None

    def derive(self) -> None:
        """CPU per request (robust to how much CPU the run got) and the saturated process."""
        self.proxy_cpu_us_per_request = _cpu_per_request(self.cpu_percent.get("proxy"),
                                                         self.requests_per_sec)
        self.upstream_cpu_us_per_request = _cpu_per_request(self.cpu_percent.get("upstream"),
                                                            self.requests_per_sec)
        self.limited_by = limiting_process(self.cpu_percent, self.target, self.generator)

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def _cpu_per_request(percent: float | None, rate: float | None) -> float | None:
    """Microseconds of CPU per request from a CPU share (% of one core) and a request rate."""
    if percent is None or not rate:
        return None
    return round(percent / 100 / rate * 1e6, 1)


def limiting_process(cpu: Mapping[str, float | None], target: str, generator: str) -> str:
    """Which process held the run back: the busiest one if it used nearly a whole core (each
    is single-threaded, so that is its ceiling), else all CPUs if the machine was full."""
    names = {"upstream": "upstream double", "proxy": target, "generator": generator}
    busy = {names[k]: v for k, v in cpu.items() if k in names and v is not None}
    if busy:
        name, value = max(busy.items(), key=lambda item: item[1])
        if value >= SATURATED_PERCENT:
            return name
    machine = cpu.get("machine")
    if machine is not None and machine >= 0.9 * 100 * (os.cpu_count() or 1):
        return "all CPUs"
    return "no single process"


_UNITS: Final = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """The numbers from wrk's text report (it has no machine-readable output)."""
    out: dict[str, Any] = {"latency_ms": {}, "socket_errors": {}, "non_2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["requests_per_sec"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    if m:
        out["requests"] = int(m.group(1))
        out["seconds"] = _to_ms(m.group(2), m.group(3)) / 1000
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+"
                  r"([\d.]+)(us|ms|s|m|h)", text)
    if m:
        out["latency_ms"]["avg"] = round(_to_ms(m.group(1), m.group(2)), 3)
        out["latency_ms"]["max"] = round(_to_ms(m.group(5), m.group(6)), 3)
    for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)", text, re.MULTILINE):
        out["latency_ms"][f"p{m.group(1)}"] = round(_to_ms(m.group(2), m.group(3)), 3)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = {k: int(v) for k, v in
                                zip(("connect", "read", "write", "timeout"), m.groups(),
                                    strict=True)}
    return out


def run_wrk(wrk: str, url: str, script: Path, *, connections: int, seconds: float,
            latency: bool) -> str:
    # wrk only takes whole seconds.
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s",
            "--timeout", "5s", "-s", str(script)]
    if latency:
        argv.append("--latency")
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                          check=False)
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[:300]
        raise RuntimeError(f"wrk exited with {done.returncode}: {output}")
    return done.stdout


# -- max throughput: built-in generator (no wrk) ----------------------------------------------


@dataclass
class _LoopStats:
    latencies: list[float] = field(default_factory=list)
    non_2xx: int = 0
    errors: int = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response whole; (status, server keeps the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    keep = b"\r\nconnection: close" not in lower
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
    if m:
        await reader.readexactly(int(m.group(1)))
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the empty line after (no trailers)
                break
            await reader.readexactly(size + 2)
    else:
        await reader.read()
        keep = False
    return status, keep


async def _closed_loop_connection(port: int, requests: Sequence[bytes], deadline: float,
                                  offset: int, stats: _LoopStats | None) -> None:
    loop = asyncio.get_running_loop()
    i = offset
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    try:
        while loop.time() < deadline:
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                started = time.perf_counter()
                writer.write(requests[i % len(requests)])
                i += 1
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, keep = await _read_response(reader)
                if stats is not None:
                    stats.latencies.append(time.perf_counter() - started)
                    if not 200 <= status < 400:
                        stats.non_2xx += 1
                if not keep:
                    writer.close()
                    writer = reader = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError, ValueError):
                if stats is not None:
                    stats.errors += 1
                if writer is not None:
                    writer.close()
                writer = reader = None
                await asyncio.sleep(0.01)
    finally:
        if writer is not None:
            writer.close()


async def closed_loop(port: int, requests: Sequence[bytes], connections: int,
                      seconds: float, measure: bool) -> _LoopStats:
    """``connections`` keep-alive connections, each sending its next request as soon as the
    previous answer is complete (what wrk does), for ``seconds``."""
    stats = _LoopStats()
    deadline = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(
        _closed_loop_connection(port, requests, deadline, k * 7, stats if measure else None)
        for k in range(connections)
    ))
    return stats


# -- added latency: open-loop client ----------------------------------------------------------


@dataclass
class Sample:
    first_event: float | None
    end: float | None
    lag: float
    error: str | None = None


async def _timed_request(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool,
                         lag: float) -> Sample:
    started = time.perf_counter()
    try:
        async with session.post(url, data=body,
                                headers={"Content-Type": "application/json"}) as response:
            if not stream:
                await response.read()
                end = time.perf_counter() - started
                error = None if response.status == 200 else f"HTTP {response.status}"
                return Sample(end, end, lag, error)
            first: float | None = None
            head = b""
            tail = b""
            async for chunk in response.content.iter_any():
                if first is None:
                    head += chunk
                    if head.startswith(b"data: ") and b"\n\n" in head:
                        first = time.perf_counter() - started
                tail = (tail + chunk)[-32:]
            end = time.perf_counter() - started
            error = None
            if response.status != 200:
                error = f"HTTP {response.status}"
            elif not tail.endswith(b"data: [DONE]\n\n"):
                error = "stream ended without [DONE]"
            return Sample(first, end, lag, error)
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return Sample(None, None, lag, f"{type(e).__name__}: {e}"[:200])


async def open_loop(session: aiohttp.ClientSession, url: str, bodies: Sequence[bytes],
                    stream: bool, rate: float, count: int, offset: int = 0) -> list[Sample]:
    """Send ``count`` requests at ``rate`` per second on a fixed schedule, each in its own task,
    whether or not earlier ones have finished (open loop: a slow target cannot slow the
    arrivals and hide its own latency). ``lag`` records how late the client itself was."""
    tasks: list[asyncio.Task[Sample]] = []
    # perf_counter, not loop.time(): uvloop's clock only moves in whole milliseconds.
    t0 = time.perf_counter() + 0.01
    for i in range(count):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = bodies[(offset + i) % len(bodies)]
        lag = max(0.0, time.perf_counter() - due)
        tasks.append(asyncio.create_task(_timed_request(session, url, body, stream, lag)))
    return list(await asyncio.gather(*tasks))


@dataclass
class LatencyRun:
    target: str
    mode: str
    rate: float
    requests: int
    errors: int
    first_event_ms: dict[str, float | None]
    end_ms: dict[str, float | None]
    schedule_lag_ms: dict[str, float | None]
    cpu_percent: dict[str, float | None]
    proxy_cpu_us_per_request: float | None = None
    added_first_event_ms: dict[str, float | None] = field(default_factory=dict)
    added_end_ms: dict[str, float | None] = field(default_factory=dict)
    first_error: str | None = None


async def measure_latency(targets: Mapping[str, str], pids: Mapping[str, Mapping[str, int]],
                          *, stream: bool, rate: float, count: int, rounds: int,
                          warmup: int) -> list[LatencyRun]:
    """Open-loop runs against every target, interleaved in ``rounds`` so that anything else
    happening on the machine during the run lands on all targets alike."""
    bodies = chat_bodies(MODEL, stream=stream)
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    cpu: dict[str, list[dict[str, float | None]]] = {name: [] for name in targets}
    sessions: dict[str, aiohttp.ClientSession] = {}
    try:
        for name in targets:
            sessions[name] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            )
        for name, base in targets.items():  # open connections, fill caches
            await open_loop(sessions[name], base + CHAT_PATH, bodies, stream, rate, warmup)
        per_round = max(1, count // rounds)
        for r in range(rounds):
            for name, base in targets.items():
                gc.collect()
                gc.disable()  # a collection in the client would land on one target only
                meter = CpuMeter(pids[name], "self")
                try:
                    got = await open_loop(sessions[name], base + CHAT_PATH, bodies, stream,
                                          rate, per_round, offset=r * per_round)
                finally:
                    gc.enable()
                cpu[name].append(meter.stop())
                samples[name].extend(got)
    finally:
        for session in sessions.values():
            await session.close()
    runs = []
    for name in targets:
        got = samples[name]
        ok = [s for s in got if s.error is None]
        first = [s.first_event for s in ok if s.first_event is not None]
        end = [s.end for s in ok if s.end is not None]
        lags = [s.lag for s in got]
        errors = [s.error for s in got if s.error is not None]
        keys = {k for c in cpu[name] for k in c}
        mean_cpu: dict[str, float | None] = {}
        for k in sorted(keys):
            values = [v for c in cpu[name] if (v := c.get(k)) is not None]
            mean_cpu[k] = round(sum(values) / len(values), 1) if values else None
        runs.append(LatencyRun(
            target=name, mode="streaming" if stream else "non-streaming", rate=rate,
            requests=len(got), errors=len(errors),
            first_event_ms={"p50": _ms(percentile(first, 50)),
                            "p99": _ms(percentile(first, 99))},
            end_ms={"p50": _ms(percentile(end, 50)), "p99": _ms(percentile(end, 99))},
            schedule_lag_ms={"p99": _ms(percentile(lags, 99)), "max": _ms(max(lags, default=0))},
            cpu_percent=mean_cpu,
            proxy_cpu_us_per_request=_cpu_per_request(mean_cpu.get("proxy"), rate),
            first_error=errors[0] if errors else None,
        ))
    base_run = next((r for r in runs if r.target == "direct"), None)
    if base_run is not None:
        for run in runs:
            for q in ("p50", "p99"):
                run.added_first_event_ms[q] = _diff(run.first_event_ms[q],
                                                    base_run.first_event_ms[q])
                run.added_end_ms[q] = _diff(run.end_ms[q], base_run.end_ms[q])
    return runs


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


# -- machine info -----------------------------------------------------------------------------


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


# -- report -----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return NA if value is None else f"{value:,.{digits}f}"


def _fmt_rps(value: float | None) -> str:
    return NA if value is None else f"{value:,.0f}"


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
            return "" if skip else _fmt(values.get(q))

        cells = [run["target"], str(run["requests"]), str(run["errors"])]
        if streaming:
            cells += [_fmt(fe["p50"]), _fmt(fe["p99"]), _fmt(en["p50"]), _fmt(en["p99"]),
                      added(run["added_first_event_ms"], "p50"),
                      added(run["added_first_event_ms"], "p99"),
                      added(run["added_end_ms"], "p50"), added(run["added_end_ms"], "p99")]
        else:
            cells += [_fmt(en["p50"]), _fmt(en["p99"]),
                      added(run["added_end_ms"], "p50"), added(run["added_end_ms"], "p99")]
        cells += [_cpu_cell(run["cpu_percent"], "upstream"),
                  _cpu_cell(run["cpu_percent"], "proxy"),
                  _fmt(run["proxy_cpu_us_per_request"], 0),
                  _fmt(run["schedule_lag_ms"]["p99"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def render_markdown(result: Mapping[str, Any]) -> str:
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
        f"| CPU busy before start | {_fmt(result['background_cpu_percent'], 0)}% of one core"
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
            f"| {run['target']} | {run['mode']} | {_fmt_rps(run['requests_per_sec'])} "
            f"| {_fmt(lat.get('p50'))} | {_fmt(lat.get('p99'))} "
            f"| {err_cell} | {_cpu_cell(cpu, 'upstream')} | {_cpu_cell(cpu, 'proxy')} "
            f"| {_cpu_cell(cpu, 'generator')} | {_cpu_cell(cpu, 'other')} "
            f"| {_cpu_cell(cpu, 'machine')} | {_fmt(run['proxy_cpu_us_per_request'], 0)} "
            f"| {run['limited_by'] or NA} |"
        )
    lines.append("")
    if result["ratios"]:
        lines += ["Throughput ratios:", ""]
        for name, value in result["ratios"].items():
            lines.append(f"- {name}: {_fmt(value)}")
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


def target_checks(throughput: Sequence[ThroughputRun], latency: Sequence[LatencyRun],
                  generator_is_wrk: bool, rate: float) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for mode, threshold in (("non-streaming", TARGET_NONSTREAM_RPS),
                            ("streaming", TARGET_STREAM_RPS)):
        run = next((r for r in throughput if r.target == "balancer" and r.mode == mode), None)
        value = None if run is None else run.requests_per_sec
        met = None if value is None else value >= threshold
        note = None
        if not generator_is_wrk:
            note = "built-in generator, not wrk"
        checks.append({"name": f"{mode} throughput ≥ {threshold:,.0f} req/s",
                       "measured": _fmt_rps(value) + " req/s", "met": met, "note": note})
    run_l = next((r for r in latency if r.target == "balancer" and r.mode == "streaming"), None)
    for label, attr in (("first event", "added_first_event_ms"), ("end", "added_end_ms")):
        for q, threshold in (("p50", TARGET_ADDED_P50_MS), ("p99", TARGET_ADDED_P99_MS)):
            value = None if run_l is None else getattr(run_l, attr).get(q)
            checks.append({
                "name": f"added {q} ({label}) at {rate:g} streaming req/s ≤ {threshold:g} ms",
                "measured": NA if value is None else f"{value:.3f} ms",
                "met": None if value is None else value <= threshold,
            })
    return checks


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


def _find_haproxy(explicit: str | None) -> str | None:
    if explicit:
        return shutil.which(explicit)
    search = os.pathsep.join([os.environ.get("PATH", ""), *HAPROXY_SEARCH_DIRS])
    return shutil.which("haproxy", path=search)


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
    wrk = None if args.no_wrk else shutil.which(args.wrk or "wrk")
    haproxy = None if args.skip_haproxy else _find_haproxy(args.haproxy)
    notes: list[str] = []
    if wrk is None:
        notes.append("wrk " + ("disabled (--no-wrk)" if args.no_wrk else "not found")
                     + ": max throughput comes from the built-in asyncio generator (raw "
                     "HTTP/1.1 over asyncio streams in the benchmark process). It spends more "
                     "CPU per request than wrk, CPU the targets then lack on a small machine, "
                     "so compare its req/s only with runs made the same way "
                     "(`loadtest/install-bench-tools.sh` installs wrk).")
    if args.skip_haproxy:
        notes.append("HAProxy skipped (--skip-haproxy).")
    elif haproxy is None:
        notes.append("HAProxy not found: its rows are skipped "
                     "(see `loadtest/install-bench-tools.sh`).")
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    log("measuring background CPU for 1 s")
    background = background_cpu()
    machine = machine_info(wrk, haproxy)
    if background is not None and background > FOREIGN_CPU_NOTE:
        notes.append(f"The machine was already {background:.0f}% busy (of one core) before "
                     "the benchmark started; numbers may be lower than on an idle machine.")

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, _signals_exit():
        tmpdir = Path(tmp)
        services = Services(tmpdir)
        try:
            result = _run(args, services, tmpdir, wrk, haproxy, notes)
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


def _run(args: argparse.Namespace, services: Services, tmpdir: Path, wrk: str | None,
         haproxy: str | None, notes: list[str]) -> dict[str, Any]:
    """Start the servers, run every measurement, return the result (minus machine info)."""
    upstream_port = free_port()
    up = services.start("upstream", [
        sys.executable, "-m", "loadtest.bench_upstream", "--host", HOST,
        "--port", str(upstream_port), "--model", MODEL, "--chunks", str(CHUNKS),
    ])
    wait_ready(up, upstream_port, http_path="/health")
    targets: dict[str, str] = {"direct": f"http://{HOST}:{upstream_port}"}
    pids: dict[str, dict[str, int]] = {"direct": {"upstream": up.pid}}

    port, admin_port = free_port(), free_port()
    bal = services.start("balancer", [
        sys.executable, "-m", "balancer", "serve",
        "--endpoint", f"http://{HOST}:{upstream_port}", "--model", MODEL,
        "--host", HOST, "--port", str(port), "--admin-port", str(admin_port),
        "--log-level", "warning", *args.balancer_arg,
    ])
    wait_ready(bal, port)
    wait_ready(bal, admin_port, http_path="/readyz")
    targets["balancer"] = f"http://{HOST}:{port}"
    pids["balancer"] = {"upstream": up.pid, "proxy": bal.pid}

    haproxy_text: str | None = None
    if haproxy is not None:
        hport = free_port()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        maxconn = HAPROXY_MAXCONN
        if soft != resource.RLIM_INFINITY:
            maxconn = max(64, min(maxconn, (soft - 64) // 2))
        cfg = tmpdir / "haproxy.cfg"
        haproxy_text = haproxy_config(hport, upstream_port, maxconn)
        cfg.write_text(haproxy_text, encoding="utf-8")
        hap = services.start("haproxy", [haproxy, "-db", "-f", str(cfg)])
        try:
            wait_ready(hap, hport)
            targets["haproxy"] = f"http://{HOST}:{hport}"
            pids["haproxy"] = {"upstream": up.pid, "proxy": hap.pid}
        except StartupError as e:
            notes.append(f"HAProxy did not start, its rows are skipped: {e}")
            services.stop("haproxy")

    for name in list(targets):
        problem = smoke_check(targets[name])
        if problem is None:
            continue
        if name == "haproxy":
            notes.append(f"HAProxy failed the smoke check, its rows are skipped: {problem}")
            del targets[name]
            services.stop("haproxy")
            continue
        raise StartupError(f"{name} failed the smoke check: {problem}")
    log("servers ready: " + ", ".join(f"{n} {u}" for n, u in targets.items()))

    generator = "wrk -t1" if wrk else "built-in asyncio generator"
    throughput: list[ThroughputRun] = []
    for stream in (False, True):
        mode = "streaming" if stream else "non-streaming"
        bodies = chat_bodies(MODEL, stream=stream)
        script = tmpdir / f"{mode}.lua"
        script.write_text(wrk_script(bodies), encoding="utf-8")
        for name, base in targets.items():
            run = ThroughputRun(name, mode, "wrk" if wrk else "built-in generator")
            log(f"throughput: {name} {mode} ({args.warmup:g} s warm-up + {args.duration:g} s)")
            try:
                if wrk:
                    _throughput_wrk(run, wrk, base + CHAT_PATH, script, args, pids[name])
                else:
                    port_of = int(base.rsplit(":", 1)[1])
                    _throughput_builtin(run, port_of, raw_requests(bodies, port_of), args,
                                        pids[name])
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                run.error = str(e)[:300]
            run.derive()
            log(f"  {_fmt_rps(run.requests_per_sec)} req/s, {run.errors} errors, "
                f"CPU {run.cpu_percent}")
            throughput.append(run)

    latency: list[list[LatencyRun]] = []
    modes = [(True, args.rate)]
    if args.nonstream_rate > 0:
        modes.append((False, args.nonstream_rate))
    for stream, rate in modes:
        mode = "streaming" if stream else "non-streaming"
        log(f"latency: {args.latency_requests} {mode} requests per target at {rate:g}/s "
            f"(~{len(targets) * args.latency_requests / rate:.0f} s)")
        runs = uvloop.run(measure_latency(
            targets, pids, stream=stream, rate=rate, count=args.latency_requests,
            rounds=args.rounds, warmup=max(20, int(rate / 4)),
        ))
        for r in runs:
            log(f"  {r.target}: first event {r.first_event_ms}, end {r.end_ms}, "
                f"errors {r.errors}, added end {r.added_end_ms}")
            if r.errors:
                notes.append(f"{r.target} {mode} at {rate:g}/s: {r.errors} failed requests "
                             f"(first: {r.first_error})")
            lag = r.schedule_lag_ms.get("p99")
            if lag is not None and lag > LATE_MS:
                notes.append(f"{r.target} {mode} at {rate:g}/s: the client itself ran late "
                             f"(schedule lag p99 {lag:.1f} ms); latencies include some client "
                             "delay.")
        latency.append(runs)

    for run in throughput:
        foreign = _foreign_cpu(run.cpu_percent)
        if foreign is not None and foreign > FOREIGN_CPU_NOTE:
            notes.append(f"{run.target} {run.mode} max-throughput run shared the machine: "
                         f"about {foreign:.0f}% of a core went to other processes, so its "
                         "req/s is lower than on an idle machine.")
        if run.errors:
            notes.append(f"{run.target} {run.mode} max-throughput run had {run.errors} errors "
                         f"(non-2xx {run.non_2xx}, socket {run.socket_errors}).")
    ratios: dict[str, float | None] = {}
    for mode in ("non-streaming", "streaming"):
        rps = {r.target: r.requests_per_sec for r in throughput if r.mode == mode}
        for other in ("direct", "haproxy"):
            a, b = rps.get("balancer"), rps.get(other)
            if a is not None and b:
                label = "HAProxy" if other == "haproxy" else "direct"
                ratios[f"balancer / {label}, {mode}"] = round(a / b, 3)
    upstream_bound = [f"{r.target} {r.mode}" for r in throughput
                      if r.target == "haproxy" and r.limited_by == "upstream double"]
    if upstream_bound:
        notes.append("The upstream double, not HAProxy, was the bottleneck in the max-throughput "
                     f"run(s) {', '.join(upstream_bound)}: HAProxy's req/s there is the "
                     "double's ceiling, so balancer / HAProxy overstates balancer; the proxy "
                     "µs/req column compares the proxies themselves.")
    flat_latency = [r for runs in latency for r in runs]
    checks = target_checks(throughput, flat_latency, wrk is not None, args.rate)
    return {
        "config": {
            "duration": args.duration, "warmup": args.warmup, "connections": args.connections,
            "rate": args.rate, "nonstream_rate": args.nonstream_rate,
            "latency_requests": args.latency_requests, "rounds": args.rounds,
            "balancer_args": args.balancer_arg, "model": MODEL, "stream_chunks": CHUNKS,
            "body_variants": BODY_VARIANTS,
            "haproxy_config": haproxy_text if "haproxy" in targets else None,
        },
        "generator": generator,
        "throughput": [dataclasses.asdict(r) | {"errors": r.errors} for r in throughput],
        "latency": [[dataclasses.asdict(r) for r in runs] for runs in latency],
        "ratios": ratios,
        "targets": checks,
    }


def _foreign_cpu(cpu: Mapping[str, float | None]) -> float | None:
    """CPU used by processes that are not part of the benchmark (other minus interrupts)."""
    other, irq = cpu.get("other"), cpu.get("irq")
    return None if other is None else other - (irq or 0.0)


def _throughput_wrk(run: ThroughputRun, wrk: str, url: str, script: Path,
                    args: argparse.Namespace, pids: Mapping[str, int]) -> None:
    if args.warmup > 0:
        run_wrk(wrk, url, script, connections=args.connections, seconds=args.warmup,
                latency=False)
    meter = CpuMeter(pids, "children")
    text = run_wrk(wrk, url, script, connections=args.connections, seconds=args.duration,
                   latency=True)
    run.cpu_percent = meter.stop()
    parsed = parse_wrk(text)
    run.requests_per_sec = parsed["requests_per_sec"]
    run.requests = parsed.get("requests", 0)
    run.seconds = parsed.get("seconds", 0.0)
    run.latency_ms = parsed["latency_ms"]
    run.non_2xx = parsed["non_2xx"]
    run.socket_errors = parsed["socket_errors"]
    if run.requests_per_sec is None:
        raise RuntimeError(f"cannot parse wrk output: {text[:300]!r}")


def _throughput_builtin(run: ThroughputRun, port: int, requests: Sequence[bytes],
                        args: argparse.Namespace, pids: Mapping[str, int]) -> None:
    async def go() -> tuple[_LoopStats, float, dict[str, float | None]]:
        if args.warmup > 0:
            await closed_loop(port, requests, args.connections, args.warmup, measure=False)
        meter = CpuMeter(pids, "self")
        t0 = time.perf_counter()
        stats = await closed_loop(port, requests, args.connections, args.duration,
                                  measure=True)
        return stats, time.perf_counter() - t0, meter.stop()

    stats, elapsed, cpu = uvloop.run(go())
    run.cpu_percent = cpu
    run.requests = len(stats.latencies)
    run.seconds = round(elapsed, 3)
    run.requests_per_sec = round(len(stats.latencies) / elapsed, 2)
    lat = stats.latencies
    run.latency_ms = {"avg": _ms(sum(lat) / len(lat)) if lat else None,
                      "p50": _ms(percentile(lat, 50)), "p99": _ms(percentile(lat, 99)),
                      "max": _ms(max(lat, default=0))}
    run.non_2xx = stats.non_2xx
    run.socket_errors = {"other": stats.errors}


if __name__ == "__main__":
    raise SystemExit(main())
