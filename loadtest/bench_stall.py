"""Does one request stall the event loop? Loop lag per request shape, at the body-size limit.

Every stream on a balancer replica shares one event loop: while one request's body is parsed,
keyed or its answer read, no other stream moves. ``python -m loadtest.bench_stall`` sends one
request of each shape that can make that work large, at ``limits.max_body_bytes`` (10 MiB by
default), and reports how long each held the loop:

* ``chat-one-message``: one user message filling the body;
* ``chat-many-messages``: ~140k short messages;
* ``completions-token-ids``: a prompt of ~1.5M token ids;
* ``completions-batch``: ~160k string prompts;
* ``embeddings-input-list``: ~340k input strings;
* ``chat-image``: a 9 MiB ``data:`` URL image and a question (less under a lower limit);
* ``nested-json``: arrays nested millions deep (a 400);
* ``response-1mib``: a small request answered by a ~1 MiB non-streaming JSON with usage last;
* ``chat-small``: a 100-byte chat request, for reference.

How the stall is measured. balancer runs **in this process**, on uvloop as ``balancer serve``
does, next to a probe task on the same loop that sleeps 1 ms over and over and records how
late it wakes (by ``time.perf_counter``: uvloop's clock has millisecond steps). A request's
stall is the probe's longest late wake-up while that request is in flight. The requests come
from a child process (``--peer``), which is also the model-server double on 127.0.0.1, so
neither building a 10 MiB body nor sending or answering it runs on the measured loop. One
request at a time; a full garbage collection runs between requests, outside the measured
windows, so no request pays for another's garbage. The idle probe (no request) is reported
as the floor the figures stand on.

Also reported, timed directly on the same bodies (median of three, outside the servers): the
parts of the work on the loop: ``json.loads`` of the body, validation and key
(``route.keyed_view`` and ``prefix.routing_key``), and freeing the parsed body; for the 1 MiB
answer, reading its usage (``forward.body_usage``) against a whole ``json.loads``.

Bounded: ``--repeat`` requests per shape (default 5, at most 50), each with a 60 s timeout,
the whole run within ``--max-seconds``; everything listens on and connects to 127.0.0.1 only,
and the child process is stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from balancer import app as balancer_app
from balancer.config import (
    KeyMode,
    LimitsSettings,
    PoolSettings,
    ServerSettings,
    Settings,
    validate,
)
from balancer.forward import body_usage
from balancer.prefix import Kind, routing_key
from balancer.route import KEYED_PATHS, keyed_view
from loadtest.procs import HOST, Services, free_port, wait_ready

MODEL: Final = "bench-model"
CHAT: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
EMBEDDINGS: Final = "/v1/embeddings"
ANSWER_HEADER: Final = "x-bench-answer"
"""Sent by the peer's client and passed on by balancer: ``big`` asks the double for the
~1 MiB answer."""
BIG_ANSWER_BYTES: Final = (1 << 20) - 4096
"""Under the 1 MiB up to which balancer reads a non-streaming answer whole (and its usage)."""
MARGIN: Final = 4096
"""Bytes left under the body limit by every generated body."""
REQUEST_TIMEOUT_S: Final = 60.0
PROBE_INTERVAL_S: Final = 0.001
TARGET_MS: Final = 5.0
SENTENCE: Final = "The quick brown fox jumps over the lazy dog while the river runs past the mill. "


# -- the request bodies (built the same way in both processes) --------------------------------


def _filled(head: str, tail: str, item: Callable[[int], str], limit: int,
            sep: str = ", ") -> bytes:
    """``head`` + as many ``item(i)`` as fit (joined by ``sep``) + ``tail``, under ``limit``."""
    room = limit - MARGIN - len(head) - len(tail)
    items: list[str] = []
    size = 0
    i = 0
    while True:
        text = item(i)
        grow = len(text) + (len(sep) if items else 0)
        if size + grow > room:
            break
        items.append(text)
        size += grow
        i += 1
    return (head + sep.join(items) + tail).encode()


def _one_message(limit: int) -> bytes:
    head = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "'
    tail = '"}], "max_tokens": 1}'
    room = limit - MARGIN - len(head) - len(tail)
    text = (SENTENCE * (room // len(SENTENCE) + 1))[:room]
    return (head + text + tail).encode()


def _many_messages(limit: int) -> bytes:
    def message(i: int) -> str:
        role = "user" if i % 2 == 0 else "assistant"
        return json.dumps({"role": role, "content": f"turn {i}: the mill, the river, a fox."})

    return _filled(f'{{"model": "{MODEL}", "messages": [', '], "max_tokens": 1}', message,
                   limit)


def _token_ids(limit: int) -> bytes:
    return _filled(f'{{"model": "{MODEL}", "max_tokens": 1, "prompt": [', "]}",
                   lambda i: str((i * 7919 + 13) % 128_000), limit)


def _batch(limit: int) -> bytes:
    return _filled(f'{{"model": "{MODEL}", "max_tokens": 1, "prompt": [', "]}",
                   lambda i: f'"Prompt {i}: summarise the report on the mill by the river."',
                   limit)


def _input_list(limit: int) -> bytes:
    return _filled(f'{{"model": "{MODEL}", "input": [', "]}",
                   lambda i: f'"sentence {i} on topic {i % 97}"', limit)


def _image(limit: int) -> bytes:
    """A 9 MiB data URL (less under a lower limit) and a question."""
    url_size = min(9 << 20, limit - MARGIN - 512)
    raw = random.Random(0).randbytes(url_size * 3 // 4 - 24)
    url = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in this picture?"}]}]}
    return json.dumps(body).encode()


def _nested(limit: int) -> bytes:
    head = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "x": '
    depth = (limit - MARGIN - len(head) - 1) // 2
    return (head + "[" * depth + "]" * depth + "}").encode()


def _small(limit: int) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "Hello there"}]}).encode()


@dataclass(frozen=True)
class Shape:
    name: str
    path: str
    build: Callable[[int], bytes]
    big_answer: bool = False


SHAPES: Final = (
    Shape("chat-small", CHAT, _small),
    Shape("chat-one-message", CHAT, _one_message),
    Shape("chat-many-messages", CHAT, _many_messages),
    Shape("completions-token-ids", COMPLETIONS, _token_ids),
    Shape("completions-batch", COMPLETIONS, _batch),
    Shape("embeddings-input-list", EMBEDDINGS, _input_list),
    Shape("chat-image", CHAT, _image),
    Shape("nested-json", CHAT, _nested),
    Shape("response-1mib", CHAT, _small, big_answer=True),
)
BY_NAME: Final = {shape.name: shape for shape in SHAPES}


def big_answer() -> bytes:
    """An embeddings answer of about 1 MiB, ``usage`` last (as vLLM and OpenAI write it)."""
    head = f'{{"object": "list", "model": "{MODEL}", "data": ['
    tail = ('], "usage": {"prompt_tokens": 9000, "total_tokens": 9000, '
            '"prompt_tokens_details": {"cached_tokens": 4096}}}')

    def item(i: int) -> str:
        vector = ", ".join(f"{((i * 31 + j) % 1000) / 997:.6f}" for j in range(32))
        return f'{{"object": "embedding", "index": {i}, "embedding": [{vector}]}}'

    return _filled(head, tail, item, BIG_ANSWER_BYTES + MARGIN)


# -- the peer: model-server double and client, in a child process -----------------------------


class Peer:
    """Answers as a model server (reading each body whole, parsing none) and, on
    ``POST /bench/send``, sends one request of a shape to balancer and reports how it went."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Built before serving, so no measured window waits for one.
        self.bodies = {shape.name: shape.build(limit) for shape in SHAPES}
        self.answer = big_answer()
        self.small = json.dumps({
            "id": "cmpl-1", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}).encode()
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * self.limit)
        for path in (CHAT, COMPLETIONS, EMBEDDINGS):
            app.router.add_post(path, self.model_server)
        app.router.add_get("/health", self.health)
        app.router.add_post("/bench/send", self.send)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def model_server(self, request: web.Request) -> web.Response:
        await request.read()
        body = self.answer if request.headers.get(ANSWER_HEADER) == "big" else self.small
        return web.Response(body=body, content_type="application/json")

    async def send(self, request: web.Request) -> web.Response:
        order = await request.json()
        shape = BY_NAME[order["shape"]]
        body = self.bodies[shape.name]
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
        headers = {"Content-Type": "application/json"}
        if shape.big_answer:
            headers[ANSWER_HEADER] = "big"
        started = time.perf_counter()
        async with self.session.post(order["url"] + shape.path, data=body,
                                     headers=headers) as response:
            answer = await response.read()
        return web.json_response({"status": response.status, "request_bytes": len(body),
                                  "answer_bytes": len(answer),
                                  "seconds": time.perf_counter() - started})


async def run_peer(port: int, limit: int) -> None:
    runner = web.AppRunner(Peer(limit).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    try:
        await asyncio.Event().wait()  # until SIGTERM
    finally:
        await runner.cleanup()


# -- the measurement ---------------------------------------------------------------------------


class LagProbe:
    """Sleeps ``interval`` over and over on the loop it runs on and keeps the worst lateness
    since the last :meth:`reset`, and all of them while ``record`` is set."""

    def __init__(self, interval: float = PROBE_INTERVAL_S) -> None:
        self.interval = interval
        self.worst = 0.0
        self.samples: list[float] | None = None

    def reset(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        clock = time.perf_counter
        while True:
            before = clock()
            await asyncio.sleep(self.interval)
            late = clock() - before - self.interval
            if late > self.worst:
                self.worst = late
            if self.samples is not None:
                self.samples.append(late)


@dataclass
class ShapeResult:
    name: str
    request_bytes: int = 0
    answer_bytes: int = 0
    statuses: list[int] = field(default_factory=list)
    stalls_ms: list[float] = field(default_factory=list)
    parts_ms: dict[str, float] = field(default_factory=dict)


def _median_ms(call: Callable[[], Any], times: int = 3) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _route(kind: Kind, body: dict[str, Any], prefix_chars: int) -> None:
    """What the proxy does with a parsed body before forwarding it."""
    keyed_view(kind, body, None)
    routing_key(kind, body, KeyMode.FIRST_USER_MESSAGE, prefix_chars, 64)


def measure_parts(shape: Shape, limit: int, prefix_chars: int) -> dict[str, float]:
    """The loop's work for one body, timed directly: parse, validate and key, free."""
    if shape.big_answer:
        answer = big_answer()
        return {"usage read": _median_ms(lambda: body_usage(answer)),
                "json.loads of the answer": _median_ms(lambda: json.loads(answer))}
    body = shape.build(limit)
    text = body.decode()
    kind = KEYED_PATHS[shape.path]

    def parse() -> Any:
        try:
            return json.loads(text)
        except RecursionError:
            return None

    parts = {"json.loads": _median_ms(parse)}
    parsed = parse()
    if parsed is None:
        return parts

    parts["validate + key"] = _median_ms(lambda: _route(kind, parsed, prefix_chars))
    parsed = None
    frees = []
    gc.disable()
    try:
        for _ in range(3):
            garbage = parse()
            started = time.perf_counter()
            del garbage
            frees.append((time.perf_counter() - started) * 1000)
    finally:
        gc.enable()
    parts["free"] = statistics.median(frees)
    return parts


async def measure(args: argparse.Namespace, peer_url: str,
                  results: dict[str, ShapeResult]) -> dict[str, float]:
    """Run balancer here, send every shape ``args.repeat`` times through the peer; the idle
    lag figures (ms)."""
    settings = validate(Settings(
        server=ServerSettings(host=HOST, log_level="warning"),
        pools=(PoolSettings("bench", (MODEL,), (peer_url,)),),
        limits=LimitsSettings(max_body_bytes=args.max_body_bytes,
                              offload_parse_bytes=args.offload_parse_bytes),
    ))
    balancer = balancer_app.build(settings, registry=CollectorRegistry())
    running = await balancer_app.start(balancer, host=HOST, port=0, admin_port=0)
    probe = LagProbe()
    task = asyncio.create_task(probe.run())
    try:
        await asyncio.wait_for(balancer.synced.wait(), 10)
        await _start_parsers(balancer)
        url = f"http://{HOST}:{running.port}"
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S + 10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            idle = await _idle(probe)
            for _ in range(3):  # warm-up: connections, first-call costs
                await _send(session, peer_url, url, "chat-small")
            for shape in SHAPES:
                result = results[shape.name]
                for _ in range(args.repeat):
                    gc.collect()
                    await asyncio.sleep(0.05)
                    probe.reset()
                    outcome = await _send(session, peer_url, url, shape.name)
                    result.stalls_ms.append(probe.worst * 1000)
                    result.statuses.append(outcome["status"])
                    result.request_bytes = outcome["request_bytes"]
                    result.answer_bytes = outcome["answer_bytes"]
                print(f"  {shape.name:<24} stall max {max(result.stalls_ms):7.1f} ms",
                      file=sys.stderr)
        return idle
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await running.stop()


async def _start_parsers(balancer: balancer_app.Balancer) -> None:
    """Start the body-parsing workers before measuring, as ``balancer serve`` does at start."""
    async with asyncio.timeout(60):
        await balancer.proxy.parsers.ready()


async def _idle(probe: LagProbe, seconds: float = 2.0) -> dict[str, float]:
    probe.samples = []
    await asyncio.sleep(seconds)
    samples = sorted(probe.samples)
    probe.samples = None
    return {"p50": samples[len(samples) // 2] * 1000,
            "p99": samples[int(len(samples) * 0.99)] * 1000, "max": samples[-1] * 1000}


async def _send(session: aiohttp.ClientSession, peer_url: str, url: str,
                shape: str) -> dict[str, Any]:
    async with session.post(peer_url + "/bench/send", json={"shape": shape, "url": url}) as r:
        if r.status != 200:
            raise RuntimeError(f"the peer failed to send {shape}: {await r.text()}")
        outcome: dict[str, Any] = await r.json()
        return outcome


# -- report ------------------------------------------------------------------------------------


def host_line() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({model}), load average {load}; "
            f"{platform.python_implementation()} {platform.python_version()}, "
            f"uvloop {uvloop.__version__}, aiohttp {aiohttp.__version__}")


def render(results: dict[str, ShapeResult], idle: dict[str, float], repeat: int,
           limit: int, offload: int = 0) -> str:
    """The report; a body over ``offload`` bytes (0: none) was parsed in a worker process,
    so its parts ran there, not on the loop."""
    lines = [
        f"Event-loop stall per request, body limit {limit} bytes, {repeat} requests per shape, "
        + (f"bodies over {offload} bytes parsed in worker processes" if offload
           else "every body parsed on the loop"),
        f"host: {host_line()}",
        f"idle probe lateness: p50 {idle['p50']:.2f} ms, p99 {idle['p99']:.2f} ms, "
        f"max {idle['max']:.2f} ms",
        "",
        "| request | body | answer | status | stall p50 / max, ms | parts, ms (where) |",
        "|---|---:|---:|---|---:|---|",
    ]
    over = []
    for result in results.values():
        stalls = result.stalls_ms
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in result.parts_ms.items())
        in_worker = offload and result.request_bytes > offload
        parts += " (in a worker)" if in_worker else " (on the loop)"
        statuses = "/".join(str(s) for s in sorted(set(result.statuses)))
        lines.append(f"| {result.name} | {_size(result.request_bytes)} | "
                     f"{_size(result.answer_bytes)} | {statuses} | "
                     f"{statistics.median(stalls):.1f} / {max(stalls):.1f} | {parts} |")
        if max(stalls) > TARGET_MS:
            over.append(result.name)
    lines.append("")
    lines.append(f"over the {TARGET_MS:g} ms target (max): {', '.join(over) or 'none'}")
    return "\n".join(lines)


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.0f} KiB"
    return f"{n} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_stall",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5,
                        help="requests per shape (1-50; default 5)")
    parser.add_argument("--max-body-bytes", type=int, default=10 << 20,
                        help="balancer's limits.max_body_bytes, which the bodies fill")
    parser.add_argument("--offload-parse-bytes", type=int,
                        default=LimitsSettings.offload_parse_bytes,
                        help="balancer's limits.offload_parse_bytes: bodies over it are parsed "
                             "in worker processes (0: all on the loop, as before it existed)")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="bound on the whole measurement (default 600)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.peer:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(run_peer(args.port, args.max_body_bytes))
        return 0
    if not 1 <= args.repeat <= 50:
        raise SystemExit("--repeat must be 1-50")
    results = {shape.name: ShapeResult(shape.name) for shape in SHAPES}
    print("timing the parts directly...", file=sys.stderr)
    for shape in SHAPES:
        results[shape.name].parts_ms = measure_parts(shape, args.max_body_bytes, 1000)
    with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp, Services(Path(tmp)) as services:
        port = free_port()
        peer = services.start("peer", [sys.executable, "-m", "loadtest.bench_stall", "--peer",
                                       "--port", str(port),
                                       "--max-body-bytes", str(args.max_body_bytes)])
        peer_url = f"http://{HOST}:{port}"

        async def run() -> dict[str, float]:
            async with asyncio.timeout(args.max_seconds):
                await wait_ready(peer, peer_url + "/health")
                print("sending...", file=sys.stderr)
                return await measure(args, peer_url, results)

        idle = uvloop.run(run())
    report = render(results, idle, args.repeat, args.max_body_bytes, args.offload_parse_bytes)
    print(report)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "host": host_line(), "idle_ms": idle, "limit": args.max_body_bytes,
            "offload_parse_bytes": args.offload_parse_bytes,
            "shapes": {name: vars(result) for name, result in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
