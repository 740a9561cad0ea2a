"""Replicas agree without talking: two processes give every request of an app-shaped trace the
same key and the same first choice.

Each process builds its own router over the same static endpoints and routes every request of
a trace of templated openings, greetings and agent sessions (histories rebuilt as the player
sends them, with the tuner's placeholder replies). Nothing in a key or a ring may depend on the
process: not the hash seed, not dictionary order, not the time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from balancer.trace import dump_trace
from loadtest.workloads import generate

SCRIPT = r"""
import sys
from balancer.config import PoolSettings, Settings, validate
from balancer.discovery import StaticDiscovery
from balancer.prefix import Kind
from balancer.route import decide, keyed_view
from balancer.router import Router
from balancer.trace import load_trace
from balancer.tune import placeholder_reply

settings = validate(Settings(pools=(PoolSettings(
    "chat", ("meta-llama/Llama-3.1-8B-Instruct",),
    tuple(f"http://127.0.0.1:{8001 + i}" for i in range(8))),)))
router = Router(settings)
router.apply(StaticDiscovery(settings.pools).snapshot())
history = {}
for record in load_trace(sys.argv[1]):
    body = dict(record.body)
    if record.append:
        body["messages"] = [*history[record.conversation_id],
                            {"role": "assistant",
                             "content": placeholder_reply(record.conversation_id, record.turn)},
                            *body["messages"]]
    history[record.conversation_id] = body["messages"]
    decision = decide(keyed_view(Kind.CHAT, body, None), router)
    print(f"{decision.key_hash:016x} {decision.choice.endpoint}")
"""


def _route_all(trace: Path, hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(trace)], env=env, check=True,
                          capture_output=True, text=True, timeout=60)
    return done.stdout.splitlines()


def test_two_processes_route_every_request_of_an_app_trace_alike(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    records = []
    for name in ("templated", "greetings", "agent"):
        records += generate(name, 7, rate=4.0, duration_s=10.0)
    dump_trace(records, trace)
    first, second = _route_all(trace, "1"), _route_all(trace, "2")
    assert len(first) == len(records) > 100
    assert first == second
    endpoints = {line.split()[1] for line in first}
    assert len(endpoints) >= 6, "the trace should spread over the pool"
