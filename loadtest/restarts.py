"""Pod restarts in a comparison run, and the figures of the phases around them.

``python -m loadtest.compare --restart POD@T:DOWN`` restarts simulated pod ``POD`` (an index)
``T`` seconds after each contender's run starts, down for ``DOWN`` seconds (the simulator's
``POST /sim/restart``: in-flight requests are cut, the prefix cache is emptied, the pod
answers 503 while down). Every contender gets the same schedule, so their runs compare.

Around each restart the report adds three phases, by due time like the measured window:

* **before**: the ``--phase-window`` seconds before the restart (from the run's start at the
  earliest): the baseline. The balancer hashes the pods' addresses, which differ from run to
  run, so the restarted pod's share of the keys differs too; read its share after the return
  against its share here;
* **down**: from the restart until the pod serves again (``DOWN`` plus the pod's own slow
  start, as the pod reports it);
* **after return**: the ``--phase-window`` seconds (default 30) after that, cut at the end of
  the run: the pod is back with a cold cache, and how soon the router gives it its share, and
  what that costs in TTFT, is what slow start trades.

Each phase reports its accounting, TTFT p50/p99 of completed requests, the prefix-cache hit
rate (cached / prompt tokens of completed requests, from each reply's ``usage``), the
returning pod's share of the completed requests (``x-sim-pod``; a fair share is 1 / pods) and
that pod's own hit rate. The pure parts (:func:`parse_restart`, :func:`phase_figures`,
:func:`aggregate_phases`, :func:`phase_table`) have no I/O; :func:`restart_pods` is the
schedule.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest.cells import fixed
from loadtest.stats import Sample, Slo, Window, summarize_samples

DEFAULT_PHASE_WINDOW_S = 30.0
"""Seconds after a pod's return that the "after return" phase covers: long enough for a
multi-turn workload's conversations (turns a few seconds apart) to come back to the pod
several times, short enough that most of a 75-s run is left for the steady state."""

RESTART_TIMEOUT_S = 10.0
"""Seconds the restart request to a pod may take (it answers at once)."""

BEFORE = "before"
DOWN = "down"
AFTER_RETURN = "after return"
PHASES = (BEFORE, DOWN, AFTER_RETURN)




@dataclass(frozen=True)
class Restart:
    """One scheduled restart: pod index, seconds after the run starts, seconds down."""

    pod: int
    at_s: float
    down_s: float

    @property
    def spec(self) -> str:
        return f"{self.pod}@{self.at_s:g}:{self.down_s:g}"


def parse_restart(item: str, *, pods: int, duration_s: float) -> Restart:
    """``POD@T:DOWN`` from ``--restart``: a pod index below ``pods``, a time within the run."""
    pod, at_sign, rest = item.strip().partition("@")
    at, colon, down = rest.partition(":")
    try:
        if not (at_sign and colon and pod.isdigit()):
            raise ValueError
        restart = Restart(int(pod), float(at), float(down))
        if not all(math.isfinite(v) and v >= 0 for v in (restart.at_s, restart.down_s)):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--restart {item!r}: expected POD@T:DOWN, e.g. 1@30:5 (pod 1, 30 s "
                         "into the run, down 5 s)") from None
    if restart.pod >= pods:
        raise SystemExit(f"--restart {item!r}: pod {restart.pod} does not exist "
                         f"({pods} pods: 0..{pods - 1})")
    if not restart.at_s < duration_s:
        raise SystemExit(f"--restart {item!r}: {restart.at_s:g} s is not within the "
                         f"{duration_s:g}-s run")
    return restart


async def restart_pods(session: aiohttp.ClientSession, pod_urls: Sequence[str],
                       restarts: Sequence[Restart], began: float) -> list[dict[str, Any]]:
    """Restart each pod at its time after ``began`` (``perf_counter``); returns what each did:
    the schedule, when it was asked (``called_at_s``) and the pod's answer (``pod_name``,
    ``serving_in_s``, ``requests_killed``), or ``error``."""

    async def one(restart: Restart) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, began + restart.at_s - time.perf_counter()))
        record: dict[str, Any] = {"restart": restart.spec, "pod": restart.pod,
                                  "at_s": restart.at_s, "down_s": restart.down_s,
                                  "called_at_s": round(time.perf_counter() - began, 3)}
        try:
            async with session.post(
                pod_urls[restart.pod] + "/sim/restart", json={"down": restart.down_s},
                timeout=aiohttp.ClientTimeout(total=RESTART_TIMEOUT_S),
            ) as response:
                answer = await response.json(content_type=None)
                if response.status != 200:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status,
                        message=str(answer.get("error", answer)))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            record["error"] = f"{type(e).__name__}: {e}"
            return record
        record.update(pod_name=answer["pod"], serving_in_s=answer["serving_in_s"],
                      requests_killed=answer["requests_killed"])
        return record

    return list(await asyncio.gather(*(one(r) for r in restarts)))


def phase_windows(record: Mapping[str, Any], phase_window_s: float, end_s: float
                  ) -> list[tuple[str, Window]]:
    """The phases of one restart (as :func:`restart_pods` records it) as due-time windows,
    ``phase_window_s`` long before it and after the return, cut at ``end_s``. The pod serves
    again ``serving_in_s`` after the scheduled time (down plus its own slow start); without an
    answer, ``down_s`` after it."""
    start = float(record["at_s"])
    back = start + float(record.get("serving_in_s", record["down_s"]))
    return [(BEFORE, Window(max(0.0, start - phase_window_s), min(start, end_s))),
            (DOWN, Window(start, min(back, end_s))),
            (AFTER_RETURN, Window(min(back, end_s), min(back + phase_window_s, end_s)))]


def phase_figures(samples: Sequence[Sample], records: Sequence[Mapping[str, Any]], *,
                  phase_window_s: float, end_s: float, slo: Slo | None = None
                  ) -> list[dict[str, Any]]:
    """Per restart and phase: accounting, TTFT, hit rate and the restarted pod's share.

    ``samples``: one run's; ``records``: its restarts (:func:`restart_pods`); ``end_s``: the
    end of the span in which requests could become due.
    """
    out = []
    for record in records:
        name = record.get("pod_name")
        for phase, window in phase_windows(record, phase_window_s, end_s):
            s = summarize_samples(samples, window, slo=slo)
            per_pod: dict[str, int] = s["per_pod"]
            known = sum(per_pod.values())
            mine = [x for x in samples if window.holds(x.due_s) and x.ok and x.pod == name
                    and x.prompt_tokens and x.cached_tokens is not None]
            prompt = sum(x.prompt_tokens or 0 for x in mine)
            out.append({
                "restart": record["restart"], "phase": phase, "pod_name": name,
                "start_s": window.start_s, "end_s": window.end_s,
                **{key: s[key] for key in PHASE_COUNTS},
                **{key: s[key] for key in ("ttft_p50_s", "ttft_p99_s", "ttft_p99_censored_s",
                                           "e2e_p50_s")},
                "hit_rate": s["cached_token_share"],
                "pod_share": per_pod.get(name, 0) / known if name and known else None,
                "pod_hit_rate": (sum(x.cached_tokens or 0 for x in mine) / prompt
                                 if prompt else None),
            })
    return out


PHASE_COUNTS = ("offered", "completed", "failed", "unfinished")
"""Phase counts, added up over repeats."""

PHASE_FIGURES = ("ttft_p50_s", "ttft_p99_s", "ttft_p99_censored_s", "e2e_p50_s", "hit_rate",
                 "pod_share", "pod_hit_rate")
"""Phase figures, reported as the median over repeats with their min and max."""


def aggregate_phases(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One contender's phases over its repeats (each a :func:`phase_figures` list): medians
    with ``*_min``/``*_max``, summed counts, in the first run's order."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for phases in runs:
        for p in phases:
            groups.setdefault((p["restart"], p["phase"]), []).append(p)
    out = []
    for (restart, phase), items in groups.items():
        row: dict[str, Any] = {"restart": restart, "phase": phase, "repeats": len(items),
                               "start_s": items[0]["start_s"], "end_s": items[0]["end_s"]}
        for key in PHASE_COUNTS:
            row[key] = sum(p.get(key) or 0 for p in items)
        for key in PHASE_FIGURES:
            values = [p[key] for p in items if p.get(key) is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_min"] = min(values) if values else None
            row[f"{key}_max"] = max(values) if values else None
        out.append(row)
    return out


PHASE_NOTE = (
    "Phases by due time around each restart `POD@T:DOWN`: *before* the phase window before "
    "it (the baseline: ring positions follow the pods' addresses, which differ between runs), "
    "*down* from the restart until the pod serves again (DOWN plus its own slow start), "
    "*after return* the phase window after that. *hit rate*: cached / prompt tokens of "
    "completed requests; *pod share*: the restarted pod's share of completed requests (fair: "
    "{fair}); *pod hit rate*: its own. With repeats: median (min-max); counts summed."
)


def phase_table(rows: Sequence[Mapping[str, Any]], pods: int) -> str:
    """The phases of every contender (rows with a ``phases`` list, see
    :func:`aggregate_phases`) as one markdown table; empty if no row has any."""
    if not any(r.get("phases") for r in rows):
        return ""

    def cell(p: Mapping[str, Any], key: str, digits: int = 3) -> str:
        value = fixed(p.get(key), digits)
        low, high = p.get(f"{key}_min"), p.get(f"{key}_max")
        if p.get("repeats", 1) > 1 and None not in (p.get(key), low, high) and low != high:
            return f"{value} ({fixed(low, digits)}..{fixed(high, digits)})"
        return value

    lines = ["| contender | restart | phase | due (s) | offered | completed | failed "
             "| unfinished | TTFT p50 (s) | TTFT p99 (s) | hit rate | pod share "
             "| pod hit rate |", "|" + "---|" * 13]
    for r in rows:
        for p in r.get("phases") or ():
            lines.append(
                f"| {r['contender']} | {p['restart']} | {p['phase']} "
                f"| {p['start_s']:g}-{p['end_s']:g} | {p['offered']} | {p['completed']} "
                f"| {p['failed']} | {p['unfinished']} | {cell(p, 'ttft_p50_s')} "
                f"| {cell(p, 'ttft_p99_s')} | {cell(p, 'hit_rate')} | {cell(p, 'pod_share')} "
                f"| {cell(p, 'pod_hit_rate')} |")
    return "\n".join(lines) + "\n\n" + PHASE_NOTE.format(fair=f"1/{pods} = {1 / pods:.3f}")
