"""What the host itself was doing during a measurement: CPU per process and for the machine.

A load test on one machine measures the machine as much as the software: when the simulated
pods' process, a proxy or the load generator saturates its core, or the machine as a whole runs
out of CPU, latencies grow for reasons no routing decision caused. Benchmarks read these
counters around each run and say (or flag the run) when the host was the bottleneck.

Linux only (``/proc``); elsewhere every reading is None and nothing is flagged.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CpuMeter",
    "SystemCpu",
    "background_cpu",
    "process_cpu_seconds",
    "system_cpu",
]

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all threads), from /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass(frozen=True)
class SystemCpu:
    """Jiffies over all CPUs since boot, from the first line of /proc/stat."""

    busy: float
    """Everything but idle, iowait and steal."""
    irq: float
    """Interrupt and softirq time, most of it loopback networking in these runs."""
    steal: float
    """Time a virtual CPU waited for the hypervisor: nonzero means a noisy host."""
    total: float

    def percent_since(self, before: SystemCpu) -> dict[str, float] | None:
        """Each part as % of one core between two readings (up to 100 per CPU)."""
        span = self.total - before.total
        if span <= 0:
            return None
        scale = 100 * (os.cpu_count() or 1) / span
        return {"machine": round((self.busy - before.busy) * scale, 1),
                "irq": round((self.irq - before.irq) * scale, 1),
                "steal": round((self.steal - before.steal) * scale, 1)}


def system_cpu() -> SystemCpu | None:
    """The machine's CPU counters; None where there is no /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            first = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal
    v = [float(x) for x in first[1:9]] + [0.0] * max(0, 9 - len(first))
    total = sum(v[:8])
    return SystemCpu(busy=total - v[3] - v[4] - v[7], irq=v[5] + v[6], steal=v[7],
                     total=total)


class CpuMeter:
    """CPU used by each named process, by the load generator and by the whole machine over
    one measurement, as a percentage of one core. This is what tells a proxy that saturates
    its core apart from one starved by the generator or by the upstream double.

    ``generator``: ``"children"`` when the load comes from a child process (wrk), ``"self"``
    when this process is the client.
    """

    def __init__(self, pids: Mapping[str, int], generator: str) -> None:
        self.pids = dict(pids)
        self.generator = generator
        self._t0 = time.perf_counter()
        self._proc0 = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        self._gen0 = self._generator_seconds()
        self._sys0 = system_cpu()

    def _generator_seconds(self) -> float:
        who = resource.RUSAGE_CHILDREN if self.generator == "children" else resource.RUSAGE_SELF
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    def stop(self) -> dict[str, float | None]:
        """Percent of one core per process (by name), ``generator``, and for the machine
        ``machine`` (all busy time, up to 100 per CPU), ``irq``, ``steal`` and ``other``
        (what none of the named processes used)."""
        wall = max(time.perf_counter() - self._t0, 1e-9)
        out: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            before, after = self._proc0[name], process_cpu_seconds(pid)
            out[name] = (None if before is None or after is None
                         else round(100 * (after - before) / wall, 1))
        out["generator"] = round(100 * (self._generator_seconds() - self._gen0) / wall, 1)
        sys1 = system_cpu()
        parts = None if self._sys0 is None or sys1 is None else sys1.percent_since(self._sys0)
        if parts is not None:
            ours = sum(v for v in out.values() if v is not None)
            out.update(parts)
            # Everything else: other processes on a shared machine, kernel threads, and
            # interrupt time the kernel does not charge to any process.
            out["other"] = round(max(0.0, parts["machine"] - ours), 1)
        else:
            out["machine"] = out["other"] = None
        return out


def background_cpu(seconds: float = 1.0) -> float | None:
    """Machine CPU busy (% of one core) before anything starts: other work on a shared
    machine skews every number, so the report states it."""
    first = system_cpu()
    time.sleep(seconds)
    second = system_cpu()
    parts = None if first is None or second is None else second.percent_since(first)
    return None if parts is None else parts["machine"]
