"""``make demo``: CHWBL against round-robin on four simulated pods, in about three minutes.

The same seeded multi-turn chat trace is played through balancer twice, once per strategy,
each time against four fresh simulated H100 pods (empty caches). Conversations are picked up
mid-way with 2-8 earlier exchanges, as in recorded-chat (ShareGPT) replays, and 12 new
conversations arrive per second: three quarters of CHWBL's knee and past round-robin's in the
rate sweep (README, "Rate sweep"), the load at which routing decides whether pods prefill
histories they already had. Latency counts from when each request was due, every request is
accounted for, the first 25 s (caches filling, conversations building up) and the last 5 s are
left out, and a run the host could not keep up with is flagged. The table, its JSON, every
request's sample and five plots land in ``results/demo/``.

Flags after the demo's own replace them: ``python -m loadtest.demo --workload templated``
plays the templated workload instead (any of ``multi-turn``, ``templated``, ``greetings`` and
``agent``: the demo's ``--shape`` fields are those of the multi-turn generator).

Every process the demo starts (pods, balancers) is stopped when it ends, on error or Ctrl-C.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from loadtest import compare

DEMO_ARGS = [
    "--contenders", "chwbl,round-robin",
    "--workload", "multi-turn",
    "--rate", "12",
    "--duration", "70",
    "--shape", "history_turns=2-8",
    "--shape", "user_tokens=20-300",
    "--out", "results/demo",
]


def main(argv: Sequence[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    print("balancer demo: 4 simulated KV-caching pods (Llama-3.1-8B on H100 cost model), "
          "CHWBL vs round-robin, 70 s each\n")
    return compare.main([*DEMO_ARGS, *extra])


if __name__ == "__main__":
    raise SystemExit(main())
