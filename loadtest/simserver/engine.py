"""A simulated LLM inference engine: continuous batching over a prefix-cached KV pool.

The engine behaves like vLLM's scheduler, in simulated milliseconds, without any real model:

* A request's prompt is split into pseudo-tokens (:mod:`.text`) and its full KV blocks into
  chained hashes. When it is admitted, its longest cached block prefix is reused; the rest of the
  prompt is *prefilled*.
* Each :meth:`Engine.step` builds one batch under a token budget: first one decode token for each
  running sequence that has finished its prefill, then prefill chunks of running sequences, then
  newly admitted waiting sequences, first come first served (chunked prefill). Admission stops
  at ``max_num_seqs`` running sequences or when the KV pool cannot hold the next sequence.
* The step lasts ``base + prefill tokens x cost per token + decoding sequences x cost per
  sequence``. A sequence whose prefill completes emits its first token at the end of that step
  (its time to first token); afterwards it emits one token per step until it has ``max_tokens``.
* Blocks are cached as soon as they are computed (prompt blocks during prefill, output blocks as
  they fill up) and stay pinned while their sequence runs; when it finishes they become
  evictable, most recently used.
* An admitted sequence reserves KV blocks for its whole context (prompt plus ``max_tokens``), so
  it never has to be preempted. vLLM allocates blocks as a sequence grows and preempts when the
  pool runs out; the two differ only when the pool is nearly full.

The engine is pure and synchronous: time only moves in :meth:`Engine.step` (by the step's
duration) and in :meth:`Engine.add_request` (an idle engine jumps to the arrival time). A server
maps simulated time onto the wall clock.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from dataclasses import dataclass, fields
from typing import Final

from .cache import PrefixCache
from .text import (
    BLOCK_CHARS,
    BLOCK_TOKENS,
    ROOT_HASH,
    PseudoWords,
    block_hashes,
    chain_hash,
    count_tokens,
    text_seed,
)

# Defaults: Llama-3.1-8B in bf16 on one NVIDIA H100 80GB, from the project's calibration notes
# (h100-llama8b-calibration.md, "Cost model for a simulated engine: measured on an NVIDIA H100
# 80GB HBM3"): measured prefill costs plus a memory-bandwidth roofline for decode.

DEFAULT_PREFILL_MS_PER_TOKEN: Final = 0.03
"""Uncached prefill cost. Measured: 31-33k tokens/s for 1,024-8,192-token prompts, i.e. about
0.031 ms per prompt token (2,048 tokens: 62 ms; 8,192 tokens: 263 ms). Cached tokens cost
nothing: 64-1,024 new tokens after a 2,048-6,144-token cached prefix cost only the new tokens."""

DEFAULT_STEP_BASE_MS: Final = 5.5
"""Fixed cost of a forward pass. Roofline for memory-bound decode: reading 16 GB of weights at
~3 TB/s takes about 5.5 ms per step. (The eager-mode floor measured, 25-30 ms, is launch
overhead that a serving engine with CUDA graphs mostly removes.)"""

DEFAULT_STEP_MS_PER_SEQ: Final = 0.09
"""Extra cost per decoding sequence. Roofline: 128 KB of KV cache per token; a sequence with a
2k-token context adds ~256 MB of reads per step, ~0.09 ms at ~3 TB/s."""

DEFAULT_KV_CACHE_BLOCKS: Final = 29_000
"""KV pool size: 128 KB per token, ~60 GB left after the weights -> ~470k tokens, about 29k blocks
of 16 tokens."""

DEFAULT_MAX_NUM_SEQS: Final = 256
"""Running sequences per step: a vLLM-like choice, not a measurement."""

DEFAULT_MAX_NUM_BATCHED_TOKENS: Final = 8192
"""Token budget per step (decode tokens plus prefill chunks): a vLLM-like choice, not a
measurement."""

DEFAULT_MAX_MODEL_LEN: Final = 131_072
"""Context length of Llama-3.1-8B."""

DEFAULT_MAX_TOKENS: Final = 128
"""Output length of a request that names none."""


class EngineError(ValueError):
    """A request the engine cannot take (the server answers 400)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Shape and cost model of a simulated engine. Durations in simulated milliseconds."""

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    """Most sequences running (in prefill or decode) at once."""
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    """Token budget of one step: decode tokens plus prefill chunks."""
    kv_cache_blocks: int = DEFAULT_KV_CACHE_BLOCKS
    """KV pool size, in blocks of 16 tokens; also bounds the prefix cache."""
    prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN
    """Step time added per uncached prompt token prefilled in the step (ms)."""
    step_base_ms: float = DEFAULT_STEP_BASE_MS
    """Step time of any non-empty step (ms)."""
    step_ms_per_seq: float = DEFAULT_STEP_MS_PER_SEQ
    """Step time added per decoding sequence in the step (ms)."""
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    """Longest prompt plus output accepted, in tokens."""
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    """Output tokens of a request that does not say how many it wants."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_model_len", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("prefill_ms_per_token", "step_base_ms", "step_ms_per_seq"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # As in vLLM: every running sequence must be able to decode in every step.
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


class SeqState(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class Sequence:
    """One request inside the engine. Read its public attributes; the engine writes them."""

    __slots__ = (
        "_committed",
        "_held",
        "_last_hash",
        "_pending",
        "_reserved",
        "_words",
        "arrival_ms",
        "cached_tokens",
        "computed_tokens",
        "finish_ms",
        "first_token_ms",
        "id",
        "max_tokens",
        "output",
        "prompt",
        "prompt_hashes",
        "prompt_tokens",
        "state",
    )

    def __init__(self, seq_id: int, prompt: str, max_tokens: int, arrival_ms: float) -> None:
        self.id = seq_id
        self.prompt = prompt
        self.prompt_tokens = count_tokens(prompt)
        self.max_tokens = max_tokens
        self.arrival_ms = arrival_ms
        self.prompt_hashes = block_hashes(prompt)
        """Chained hashes of the prompt's full blocks."""
        self.state = SeqState.WAITING
        self.cached_tokens = 0
        """Prompt tokens found in the prefix cache at admission."""
        self.computed_tokens = 0
        """Prompt tokens whose KV exists (cached or prefilled)."""
        self.output: list[str] = []
        """Generated tokens, four characters each."""
        self.first_token_ms: float | None = None
        self.finish_ms: float | None = None
        self._words = PseudoWords(text_seed(prompt))
        self._held: list[int] = []
        self._reserved = 0
        self._committed = 0
        self._last_hash = self.prompt_hashes[-1] if self.prompt_hashes else ROOT_HASH
        self._pending = prompt[len(self.prompt_hashes) * BLOCK_CHARS :]

    @property
    def ttft_ms(self) -> float | None:
        """Time from arrival to the first token, once there is one."""
        if self.first_token_ms is None:
            return None
        return self.first_token_ms - self.arrival_ms

    @property
    def text(self) -> str:
        """Text generated so far."""
        return "".join(self.output)

    @property
    def prefilling(self) -> bool:
        return self.computed_tokens < self.prompt_tokens

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.id}, state={self.state.value}, prompt_tokens={self.prompt_tokens},"
            f" cached={self.cached_tokens}, computed={self.computed_tokens},"
            f" output={len(self.output)}/{self.max_tokens})"
        )


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """A token emitted by a sequence at the end of a step."""

    seq: Sequence
    token: str
    first: bool
    """The sequence's first token: its prefill completed in this step."""
    finished: bool
    """The sequence's last token: it has now generated `max_tokens`."""


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one engine step did."""

    start_ms: float
    end_ms: float
    prefill_tokens: int
    """Uncached prompt tokens computed in the step."""
    decode_seqs: int
    """Sequences that decoded one token in the step."""
    prefill_seqs: int
    """Sequences that computed a prefill chunk in the step."""
    admitted: int
    """Waiting sequences admitted in the step."""
    outputs: list[TokenOutput]

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms

    @property
    def batched_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


@dataclass(slots=True)
class EngineStats:
    """Counters of an engine. Token counts are in pseudo-tokens, times in simulated ms."""

    requests_added: int = 0
    requests_admitted: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    """Prompt tokens of admitted requests."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache (vLLM: ``prefix_cache_queries``)."""
    prefix_cache_hits: int = 0
    """Prompt tokens found there (vLLM: ``prefix_cache_hits``)."""
    prefill_tokens: int = 0
    """Prompt tokens actually computed (not cached)."""
    generation_tokens: int = 0
    steps: int = 0
    busy_ms: float = 0.0
    """Sum of step durations."""

    def minus(self, other: EngineStats) -> EngineStats:
        """Counter differences `self - other`."""
        return EngineStats(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    def copy(self) -> EngineStats:
        return EngineStats(**{f.name: getattr(self, f.name) for f in fields(self)})


class Engine:
    """A simulated engine. Not thread-safe; drive it from one thread or event loop."""

    def __init__(self, config: EngineConfig | None = None, *, now_ms: float = 0.0) -> None:
        self.config = config if config is not None else EngineConfig()
        self.now = now_ms
        """Simulated clock (ms): the end of the last step, or the last arrival at an idle engine."""
        self.latency_multiplier = 1.0
        """Multiplies every step's duration (fault injection: a slow GPU)."""
        self.cache = PrefixCache(self.config.kv_cache_blocks)
        self.totals = EngineStats()
        """Counters since creation (never reset)."""
        self.peak_running = 0
        """Most running sequences seen since the last :meth:`reset_stats`."""
        self.peak_waiting = 0
        """Longest waiting queue seen since the last :meth:`reset_stats`."""
        self._baseline = EngineStats()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._ids = itertools.count(1)

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV pool held by running sequences."""
        return self.cache.usage

    @property
    def running(self) -> list[Sequence]:
        """Running sequences in admission order (a copy)."""
        return list(self._running)

    @property
    def waiting(self) -> list[Sequence]:
        """Waiting sequences in arrival order (a copy)."""
        return list(self._waiting)

    def stats(self) -> EngineStats:
        """Counters since the last :meth:`reset_stats`."""
        return self.totals.minus(self._baseline)

    def reset_stats(self) -> None:
        """Start new counters for :meth:`stats`; the cache and running work are untouched."""
        self._baseline = self.totals.copy()
        self.peak_running = len(self._running)
        self.peak_waiting = len(self._waiting)

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV blocks a sequence holds for its whole context."""
        return math.ceil((prompt_tokens + max_tokens) / BLOCK_TOKENS)

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self, prompt: str, max_tokens: int | None = None, *, now_ms: float | None = None
    ) -> Sequence:
        """Queue a request arriving at `now_ms` (default: the engine's clock).

        An idle engine's clock jumps forward to the arrival. A busy engine whose clock is behind
        the arrival time (its host fell behind) counts the request as arriving now.
        """
        if max_tokens is None:
            max_tokens = self.config.default_max_tokens
        if max_tokens < 1:
            raise EngineError("max_tokens must be at least 1")
        prompt_tokens = count_tokens(prompt)
        if prompt_tokens < 1:
            raise EngineError("the prompt is empty")
        if prompt_tokens + max_tokens > self.config.max_model_len:
            raise EngineError(
                f"This model's maximum context length is {self.config.max_model_len} tokens. "
                f"However, you requested {prompt_tokens + max_tokens} tokens "
                f"({prompt_tokens} in the prompt, {max_tokens} in the completion)."
            )
        if self.blocks_needed(prompt_tokens, max_tokens) > self.cache.capacity:
            raise EngineError(
                f"the request needs {self.blocks_needed(prompt_tokens, max_tokens)} KV blocks;"
                f" the cache holds {self.cache.capacity}"
            )
        if now_ms is None:
            now_ms = self.now
        if not self.has_work:
            self.now = max(self.now, now_ms)
        seq = Sequence(next(self._ids), prompt, max_tokens, min(now_ms, self.now))
        self._waiting.append(seq)
        self.totals.requests_added += 1
        self.peak_waiting = max(self.peak_waiting, len(self._waiting))
        return seq

    def abort(self, seq: Sequence) -> bool:
        """Drop a waiting or running sequence and free its blocks; False if it had ended."""
        if seq.state is SeqState.WAITING:
            self._waiting.remove(seq)
        elif seq.state is SeqState.RUNNING:
            self._running.remove(seq)
            self._release(seq)
        else:
            return False
        seq.state = SeqState.ABORTED
        seq.finish_ms = self.now
        self.totals.requests_aborted += 1
        return True

    # -- scheduling ----------------------------------------------------------------------------

    def _cached_blocks_for(self, seq: Sequence) -> int:
        # vLLM recomputes at least the last prompt token (it needs its logits), so a fully
        # cached prompt still prefills its last block.
        limit = (seq.prompt_tokens - 1) // BLOCK_TOKENS
        return min(self.cache.match(seq.prompt_hashes[:limit]), limit)

    def _try_admit(self, seq: Sequence) -> bool:
        cache = self.cache
        hits = seq.prompt_hashes[: self._cached_blocks_for(seq)]
        new_blocks = self.blocks_needed(seq.prompt_tokens, seq.max_tokens) - len(hits)
        # Pinning an evictable hit takes it out of the free pool too.
        evictable_hits = sum(1 for block_hash in hits if cache.refcount(block_hash) == 0)
        if new_blocks > cache.free_blocks - evictable_hits:
            return False
        cache.pin(hits)
        cache.reserve(new_blocks)
        seq._held = list(hits)
        seq._reserved = new_blocks
        seq._committed = len(hits)
        seq.cached_tokens = seq.computed_tokens = len(hits) * BLOCK_TOKENS
        seq.state = SeqState.RUNNING
        totals = self.totals
        totals.requests_admitted += 1
        totals.prompt_tokens += seq.prompt_tokens
        totals.prefix_cache_queries += seq.prompt_tokens
        totals.prefix_cache_hits += seq.cached_tokens
        return True

    def step(self) -> StepOutput | None:
        """Run one step from the current clock; None (and no time passes) if there is no work."""
        config = self.config
        budget = config.max_num_batched_tokens
        decode: list[Sequence] = []
        prefill: list[tuple[Sequence, int]] = []
        for seq in self._running:
            if not seq.prefilling and budget > 0:
                decode.append(seq)
                budget -= 1
        for seq in self._running:
            if seq.prefilling and budget > 0:
                chunk = min(seq.prompt_tokens - seq.computed_tokens, budget)
                prefill.append((seq, chunk))
                budget -= chunk
        admitted = 0
        waiting = self._waiting
        while waiting and budget > 0 and len(self._running) < config.max_num_seqs:
            seq = waiting[0]
            if not self._try_admit(seq):
                break  # first come, first served: nobody overtakes the head of the queue
            waiting.popleft()
            self._running.append(seq)
            admitted += 1
            chunk = min(seq.prompt_tokens - seq.computed_tokens, budget)
            prefill.append((seq, chunk))
            budget -= chunk
        if not decode and not prefill:
            return None

        prefill_tokens = sum(chunk for _, chunk in prefill)
        duration = (
            config.step_base_ms
            + config.prefill_ms_per_token * prefill_tokens
            + config.step_ms_per_seq * len(decode)
        ) * self.latency_multiplier
        start = self.now
        end = self.now = start + duration

        outputs: list[TokenOutput] = []
        for seq in decode:
            outputs.append(self._emit(seq, end, first=False))
        for seq, chunk in prefill:
            seq.computed_tokens += chunk
            self._commit_prompt_blocks(seq)
            if not seq.prefilling:
                seq.first_token_ms = end
                outputs.append(self._emit(seq, end, first=True))
        finished = [out.seq for out in outputs if out.finished]
        if finished:
            done = {id(seq) for seq in finished}
            self._running = [seq for seq in self._running if id(seq) not in done]

        totals = self.totals
        totals.prefill_tokens += prefill_tokens
        totals.generation_tokens += len(outputs)
        totals.requests_finished += len(finished)
        totals.steps += 1
        totals.busy_ms += duration
        self.peak_running = max(self.peak_running, len(self._running) + len(finished))
        return StepOutput(
            start_ms=start,
            end_ms=end,
            prefill_tokens=prefill_tokens,
            decode_seqs=len(decode),
            prefill_seqs=len(prefill),
            admitted=admitted,
            outputs=outputs,
        )

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[StepOutput]:
        """Step until there is no work left (at most `max_steps` steps)."""
        steps: list[StepOutput] = []
        for _ in range(max_steps):
            out = self.step()
            if out is None:
                break
            steps.append(out)
        return steps

    # -- blocks --------------------------------------------------------------------------------

    def _commit(self, seq: Sequence, block_hash: int) -> None:
        if self.cache.commit(block_hash):
            seq._held.append(block_hash)
            seq._reserved -= 1

    def _commit_prompt_blocks(self, seq: Sequence) -> None:
        target = min(seq.computed_tokens // BLOCK_TOKENS, len(seq.prompt_hashes))
        for index in range(seq._committed, target):
            self._commit(seq, seq.prompt_hashes[index])
        seq._committed = max(seq._committed, target)

    def _emit(self, seq: Sequence, now: float, *, first: bool) -> TokenOutput:
        last = len(seq.output) + 1 == seq.max_tokens
        token = seq._words.next_token(last=last)
        seq.output.append(token)
        # Output tokens extend the sequence's text; each 64 characters make a cacheable block
        # that the next turn of a conversation (prompt + this reply + more) starts with.
        pending = seq._pending + token
        if len(pending) >= BLOCK_CHARS:
            seq._last_hash = chain_hash(seq._last_hash, pending[:BLOCK_CHARS])
            self._commit(seq, seq._last_hash)
            pending = pending[BLOCK_CHARS:]
        seq._pending = pending
        if last:
            seq.state = SeqState.FINISHED
            seq.finish_ms = now
            self._release(seq)
        return TokenOutput(seq=seq, token=token, first=first, finished=last)

    def _release(self, seq: Sequence) -> None:
        self.cache.release(seq._held, seq._reserved)
        seq._held = []
        seq._reserved = 0
