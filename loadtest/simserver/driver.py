"""Runs a simulated engine on the wall clock inside an asyncio event loop.

The driver steps the engine back to back while it has work and sleeps each step's duration,
scaled by `time_scale`. Steps are scheduled on a deadline derived from the engine's simulated
clock (``start + simulated_ms x time_scale``), so sleeping late on one step shortens the next
one's sleep instead of accumulating drift. When idle, it waits on an event and burns no CPU.

Simulated time maps onto the monotonic clock: ``simulated_ms = (clock - origin) x 1000 /
time_scale``. If the host falls behind by more than :data:`MAX_LAG_S` (too much work for the
CPU), the origin moves forward: simulated time pauses rather than racing to catch up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .engine import Engine, EngineError, StepOutput, TokenOutput
from .engine import Sequence as EngineSequence

log = logging.getLogger(__name__)

MAX_LAG_S = 0.1
"""Wall seconds the driver may run behind its schedule before it stops catching up."""

TokenListener = Callable[[TokenOutput], None]


@dataclass(slots=True)
class Submission:
    """Sequences of one HTTP request, and the queue their tokens arrive on as ``(index, token)``
    (index: position of the sequence in `seqs`)."""

    seqs: list[EngineSequence]
    queue: asyncio.Queue[tuple[int, TokenOutput]] = field(default_factory=asyncio.Queue)


class EngineDriver:
    """Steps one engine in real time and routes each token to its submission's queue."""

    def __init__(
        self,
        engine: Engine,
        time_scale: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        listener: TokenListener | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.engine = engine
        self.time_scale = time_scale
        self.clock_resets = 0
        """Times the host fell more than MAX_LAG_S behind and simulated time paused."""
        self.paused_s = 0.0
        """Wall seconds simulated time stood still because the host fell behind."""
        self.host_cpu_s = 0.0
        """CPU seconds burnt per step (fault injection: a starved host)."""
        self._clock = clock
        self._listener = listener
        self._origin = clock() - engine.now * time_scale / 1000.0
        self._wake = asyncio.Event()
        self._sinks: dict[int, tuple[asyncio.Queue[tuple[int, TokenOutput]], int]] = {}

    def model_now(self) -> float:
        """Simulated time (ms) corresponding to the clock now."""
        return (self._clock() - self._origin) * 1000.0 / self.time_scale

    def wall_seconds(self, model_ms: float) -> float:
        """Wall-clock length of a simulated duration."""
        return model_ms * self.time_scale / 1000.0

    def submit(
        self,
        prompts: Sequence[str],
        max_tokens: int,
        reply_seeds: Sequence[int | None] | None = None,
    ) -> Submission:
        """Queue one sequence per prompt, each reply seeded by its entry of `reply_seeds` (None:
        by its prompt); raises :class:`EngineError` and queues none if any is refused."""
        now = self.model_now()
        seeds = [None] * len(prompts) if reply_seeds is None else reply_seeds
        seqs: list[EngineSequence] = []
        try:
            for prompt, seed in zip(prompts, seeds, strict=True):
                seqs.append(
                    self.engine.add_request(prompt, max_tokens, now_ms=now, reply_seed=seed)
                )
        except EngineError:
            for seq in seqs:
                self.engine.abort(seq)
            raise
        submission = Submission(seqs)
        for index, seq in enumerate(seqs):
            self._sinks[seq.id] = (submission.queue, index)
        self._wake.set()
        return submission

    def abort(self, submission: Submission) -> int:
        """Abort the submission's unfinished sequences, freeing their slots; returns how many."""
        aborted = 0
        for seq in submission.seqs:
            self._sinks.pop(seq.id, None)
            if self.engine.abort(seq):
                aborted += 1
        return aborted

    def abort_all(self) -> int:
        """Abort every sequence the engine runs or queues (its process was killed): their
        tokens go nowhere any more; returns how many were aborted."""
        self._sinks.clear()
        engine = self.engine
        return sum(engine.abort(seq) for seq in [*engine.running, *engine.waiting])

    async def run(self) -> None:
        """Step the engine forever (until cancelled)."""
        try:
            await self._run()
        except Exception:
            log.exception("the simulated engine failed; this pod will not answer any more")
            raise

    async def _run(self) -> None:
        engine = self.engine
        while True:
            await self._wake.wait()
            out = engine.step()
            if out is None:
                self._wake.clear()
                continue
            if self.host_cpu_s:
                _burn(self.host_cpu_s)
            delay = self._origin + self.wall_seconds(engine.now) - self._clock()
            if delay < -MAX_LAG_S:
                self._origin -= delay
                self.clock_resets += 1
                self.paused_s -= delay
                log.debug("engine fell %.3f s behind; simulated time paused", -delay)
                delay = 0.0
            await asyncio.sleep(max(delay, 0.0))
            self._deliver(out)

    def _deliver(self, out: StepOutput) -> None:
        sinks, listener = self._sinks, self._listener
        for token in out.outputs:
            if listener is not None:
                listener(token)
            sink = sinks.get(token.seq.id)
            if sink is None:
                continue
            queue, index = sink
            queue.put_nowait((index, token))
            if token.finished:
                del sinks[token.seq.id]


def _burn(seconds: float) -> None:
    """Keep the CPU busy for ``seconds`` (a starved host; blocking on purpose)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
