"""Command line: ``python -m loadtest.simserver --pods 4 --port 8001``.

Serves N simulated pods from one process on consecutive ports and prints one line per pod:
``sim pod sim-8001 listening on http://127.0.0.1:8001``. Stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

from .config import DEFAULT_CROSS_ZONE_RTT_S, DEFAULT_MODEL, SimConfig
from .engine import (
    DEFAULT_ATTN_MS_PER_MILLION_PAIRS,
    DEFAULT_KV_CACHE_BLOCKS,
    DEFAULT_KV_READ_MS_PER_TOKEN,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_MS_PER_TOKEN,
    DEFAULT_STEP_BASE_MS,
    EngineConfig,
)
from .faults import ERROR_STATUSES, FaultConfig
from .metrics import METRICS_FLAVORS
from .server import pod_configs, serve_pods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.simserver",
        description="Simulated vLLM-compatible model servers (an engine model, no GPU).",
        epilog="Replies follow each request's sampling fields: without 'temperature' (or with"
        " 0) a prompt always gets the same reply (greedy); with 'seed' the reply is fixed by"
        " the prompt and the seed; with 'temperature' > 0 and no seed each request gets its own"
        " reply, drawn from the pod's RNG (seeded by --seed). Chat 'tools' are rendered into"
        " the prompt after the system message, so they are prefilled and cached.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pods = parser.add_argument_group("pods")
    pods.add_argument("--host", default="127.0.0.1", help="address to listen on")
    pods.add_argument(
        "--port",
        type=int,
        default=8001,
        help="port of the first pod; pod i listens on PORT+i (0: an ephemeral port for each)",
    )
    pods.add_argument("--pods", type=int, default=1, help="number of independent pods to serve")
    pods.add_argument(
        "--name-prefix", default="sim", help="pods are named PREFIX-PORT (sent as x-sim-pod)"
    )
    pods.add_argument(
        "--model",
        action="append",
        dest="models",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help=f"model name to serve; repeat for several (default: {DEFAULT_MODEL})",
    )
    pods.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="wall seconds per simulated second (0.1 runs ten times faster than the GPU)",
    )
    pods.add_argument("--log-level", default="info", help="debug, info, warning or error")
    pods.add_argument(
        "--zones",
        default="",
        metavar="ZONE,...",
        help="zones of the pods, in turn: pod i runs in the (i mod count)-th (empty: zones are"
        " not simulated); a request whose x-sim-client-zone header names another zone pays"
        " --cross-zone-rtt and is counted in /stats (cross_zone_requests)",
    )
    pods.add_argument(
        "--cross-zone-rtt",
        type=float,
        default=DEFAULT_CROSS_ZONE_RTT_S,
        help="simulated seconds a request from another zone waits before the pod sees it:"
        " one round trip between zones of a region (about 1 ms)",
    )

    reports = parser.add_argument_group("load reports")
    reports.add_argument(
        "--metrics-flavor",
        choices=METRICS_FLAVORS,
        default="vllm",
        help="/metrics under vLLM's names (vllm:num_requests_waiting...), SGLang's"
        " (sglang:num_queue_reqs...), or none (404: a server that reports nothing)",
    )
    reports.add_argument(
        "--orca",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer requests carrying endpoint-load-metrics-format: text|json with an ORCA"
        " load report in endpoint-load-metrics, as vLLM does; --no-orca: a server without"
        " ORCA support",
    )
    reports.add_argument(
        "--orca-running",
        action="store_true",
        help="add named_metrics.num_requests_running (a count) to ORCA reports; vLLM sends"
        " only num_requests_waiting and kv_cache_usage_perc",
    )
    reports.add_argument(
        "--orca-streams",
        action="store_true",
        help="put ORCA reports on streamed answers too, read as the stream starts; vLLM"
        " reports on non-streamed answers only",
    )

    engine = parser.add_argument_group("engine (Llama-3.1-8B on one H100 by default)")
    engine.add_argument(
        "--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS, help="most running sequences"
    )
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
        help="token budget per step (decode tokens + prefill chunks), in tokens",
    )
    engine.add_argument(
        "--kv-cache-blocks",
        type=int,
        default=DEFAULT_KV_CACHE_BLOCKS,
        help="KV pool (and prefix cache) size, in blocks of 16 tokens",
    )
    engine.add_argument(
        "--step-base-ms",
        type=float,
        default=DEFAULT_STEP_BASE_MS,
        help="fixed time of every step (the weights read once), in simulated ms",
    )
    engine.add_argument(
        "--kv-read-ms-per-token",
        type=float,
        default=DEFAULT_KV_READ_MS_PER_TOKEN,
        help="step time per context token whose KV the step reads (each decoding sequence's"
        " prompt + output so far, each prefill chunk's prefix), in simulated ms",
    )
    engine.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=DEFAULT_PREFILL_MS_PER_TOKEN,
        help="step time per uncached token prefilled, in simulated ms",
    )
    engine.add_argument(
        "--attn-ms-per-million-pairs",
        type=float,
        default=DEFAULT_ATTN_MS_PER_MILLION_PAIRS,
        help="prefill attention: step time per million (new token, attended token) pairs,"
        " in simulated ms",
    )
    engine.add_argument(
        "--max-model-len",
        type=int,
        default=DEFAULT_MAX_MODEL_LEN,
        help="longest prompt + output accepted, in tokens",
    )
    engine.add_argument(
        "--default-max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="output tokens of a request that names no max_tokens",
    )

    faults = parser.add_argument_group("fault injection (also live: POST /sim/faults)")
    faults.add_argument(
        "--error-rate", type=float, default=0.0, help="share of requests failed at once (0..1)"
    )
    faults.add_argument(
        "--error-status",
        type=int,
        default=500,
        choices=sorted(ERROR_STATUSES),
        help="HTTP status of injected errors",
    )
    faults.add_argument(
        "--retry-after",
        type=int,
        default=1,
        help="Retry-After of injected 429/503 answers, in seconds",
    )
    faults.add_argument(
        "--slow-start",
        type=float,
        default=0.0,
        help="seconds after start during which /health and requests answer 503",
    )
    faults.add_argument(
        "--hang-rate",
        type=float,
        default=0.0,
        help="share of requests that hang until the client gives up (0..1)",
    )
    faults.add_argument(
        "--hang-after-chunks",
        type=int,
        default=0,
        help="a hanging streamed request sends this many chunks, then stalls (0: no answer)",
    )
    faults.add_argument(
        "--exit-after",
        type=int,
        default=None,
        help="exit the process abruptly when request N+1 arrives (a crash); None: never",
    )
    faults.add_argument(
        "--latency-multiplier",
        type=float,
        default=1.0,
        help="multiplies every step's duration (a slow GPU)",
    )
    faults.add_argument(
        "--host-cpu-ms",
        type=float,
        default=0.0,
        help="CPU ms the process burns per engine step (a starved host)",
    )
    faults.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of fault decisions (pod i uses SEED+i)",
    )
    return parser


def configs_from_args(args: argparse.Namespace) -> list[SimConfig]:
    """One config per pod from parsed arguments."""
    engine = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_blocks=args.kv_cache_blocks,
        prefill_ms_per_token=args.prefill_ms_per_token,
        step_base_ms=args.step_base_ms,
        kv_read_ms_per_token=args.kv_read_ms_per_token,
        attn_ms_per_million_pairs=args.attn_ms_per_million_pairs,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
    )
    faults = FaultConfig(
        error_rate=args.error_rate,
        error_status=args.error_status,
        retry_after=args.retry_after,
        slow_start=args.slow_start,
        hang_rate=args.hang_rate,
        hang_after_chunks=args.hang_after_chunks,
        exit_after=args.exit_after,
        latency_multiplier=args.latency_multiplier,
        host_cpu_ms=args.host_cpu_ms,
        seed=args.seed,
    )
    base = SimConfig(
        models=tuple(getattr(args, "models", None) or [DEFAULT_MODEL]),
        time_scale=args.time_scale,
        engine=engine,
        faults=faults,
        orca=args.orca,
        orca_running=args.orca_running,
        orca_streams=args.orca_streams,
        metrics_flavor=args.metrics_flavor,
        cross_zone_rtt=args.cross_zone_rtt,
    )
    return with_zones(pod_configs(base, args.pods), args.zones)


def with_zones(configs: Sequence[SimConfig], zones: str) -> list[SimConfig]:
    """Pod i in the (i mod count)-th of the comma-separated ``zones`` (none: unchanged)."""
    names = [z.strip() for z in zones.split(",") if z.strip()]
    if not names:
        return list(configs)
    return [replace(c, zone=names[i % len(names)]) for i, c in enumerate(configs)]


async def _serve(args: argparse.Namespace, configs: Sequence[SimConfig]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve_pods(
            configs,
            host=args.host,
            port=args.port,
            name_prefix=args.name_prefix,
            stop=stop,
            announce=lambda line: print(line, flush=True),
        )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.pods < 1:
        parser.error("--pods must be at least 1")
    try:
        configs = configs_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        _run(_serve(args, configs))
    except OSError as e:
        print(f"simserver: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
