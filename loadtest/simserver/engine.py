"""A simulated LLM inference engine: continuous batching over a prefix-cached KV pool.

The engine behaves like vLLM V1's scheduler, in simulated milliseconds, without any real model:

* A request's prompt is split into pseudo-tokens (:mod:`.text`) and its full KV blocks into
  chained hashes. When it is admitted, its longest cached block prefix is reused; the rest of the
  prompt is *prefilled*.
* Each :meth:`Engine.step` builds one batch under a token budget: first one decode token for each
  running sequence that has finished its prefill, then prefill chunks of running sequences, then
  newly admitted waiting sequences, first come first served (chunked prefill). Admission stops
  at ``max_num_seqs`` running sequences or when the KV pool cannot hold the next prompt, and is
  skipped in a step that had to preempt.
* A step's duration follows the calibration (``shared/data/h100-llama8b-calibration.md``)::

      step_base_ms                                   weights read once per step
    + kv_read_ms_per_token   x context tokens read    every decoding sequence's whole context
                                                      and every prefill chunk's prefix
    + prefill_ms_per_token   x uncached tokens        prefill of the step's chunks
    + attn_ms_per_million_pairs x 1e-6 x pairs        prefill attention: each new token of a
                                                      chunk attends to its prefix and to itself

  A sequence whose prefill completes emits its first token at the end of that step (its time to
  first token); afterwards it emits one token per step until it has ``max_tokens``.
* KV blocks are allocated as the context grows, as vLLM V1 does: at admission a sequence takes
  blocks for its prompt (less the cached blocks it reuses), then one more block whenever a decode
  step's token starts a new block. When the pool has no free or evictable block for a running
  sequence's next token, the most recently admitted running sequence is *preempted* (recompute
  mode): its blocks are released (its computed full blocks stay cached, evictable), and it goes
  back to the front of the waiting queue with the tokens it already generated. Re-admitted, it
  prefills its prompt plus that output (mostly prefix-cache hits) and carries on generating;
  tokens it already emitted are not emitted again and its time to first token is kept.
* Blocks are cached as soon as they are computed (prompt blocks during prefill, output blocks as
  they fill up) and stay pinned while their sequence runs; when it finishes they become
  evictable, most recently used.

The engine is pure and synchronous: time only moves in :meth:`Engine.step` (by the step's
duration) and in :meth:`Engine.add_request` (an idle engine jumps to the arrival time). A server
maps simulated time onto the wall clock.
"""

from __future__ import annotations

import enum
import itertools
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
# (shared/data/h100-llama8b-calibration.md and .json, "Cost model for a simulated engine: measured
# on an NVIDIA H100 80GB HBM3"): measured prefill costs plus a memory-bandwidth roofline for
# decode, taken at the bandwidth serving engines actually reach.

MODEL_WEIGHT_BYTES: Final = 16.06e9
"""Bytes of weights read by every forward pass: 8.03 B parameters in bf16 ("16 GB")."""

KV_BYTES_PER_TOKEN: Final = 128 * 1024
"""KV cache per context token: 32 layers x (K, V) x 8 KV heads x 128 dims x 2 bytes = 128 KiB."""

HBM_BYTES_PER_S: Final = 3.0e12
"""The card's measured memory bandwidth used by the calibration's roofline ("~3 TB/s"; the H100
SXM's data sheet says 3.35 TB/s)."""

BANDWIDTH_EFFICIENCY: Final = 0.7
"""Share of the roofline bandwidth a serving engine reaches: the calibration says 60-80%."""

EFFECTIVE_BYTES_PER_S: Final = HBM_BYTES_PER_S * BANDWIDTH_EFFICIENCY
"""Bandwidth of the decode cost model: 2.1 TB/s."""

DEFAULT_STEP_BASE_MS: Final = round(MODEL_WEIGHT_BYTES / EFFECTIVE_BYTES_PER_S * 1e3, 2)
"""Fixed cost of a forward pass: the weights read at the effective bandwidth, 16.06 GB / 2.1 TB/s
= 7.65 ms (the calibration's roofline at 100% of ~3 TB/s is 5.5 ms). The eager-mode floor
measured, 25-30 ms, is launch overhead that a serving engine with CUDA graphs mostly removes."""

DEFAULT_KV_READ_MS_PER_TOKEN: Final = round(KV_BYTES_PER_TOKEN / EFFECTIVE_BYTES_PER_S * 1e3, 7)
"""Step time per context token read: 128 KiB of KV at 2.1 TB/s = 6.24e-5 ms. Each decoding
sequence reads its whole context every step (2,048 tokens: 0.128 ms, the calibration's ~0.09 ms
at 100% bandwidth), so a decode step grows with the context of every running sequence. A prefill
chunk reads the KV of its prefix (cached or computed earlier) once: the calibration measured the
cached prefix as almost free (64-256 new tokens after 2,048-6,144 cached: 25-35 ms, inside the
eager floor), and this term keeps it small (6,144 tokens: 0.38 ms)."""

DEFAULT_PREFILL_MS_PER_TOKEN: Final = 0.0257
"""Uncached prefill cost per token (the linear part: GEMMs). Fitted with
:data:`DEFAULT_ATTN_MS_PER_MILLION_PAIRS` to the measured uncached prefills over the step base
(2,048 tokens: 62.3 ms; 4,096: 124.7 ms; 8,192: 262.9 ms; the model gives 63.1, 124.1, 263.1).
Overall that is the calibration's ~0.03 ms per prompt token (31-33k tokens/s)."""

DEFAULT_ATTN_MS_PER_MILLION_PAIRS: Final = 1.34
"""Prefill attention compute, per million (new token, attended token) pairs: a chunk of n new
tokens after p tokens of prefix attends to n x p + n(n+1)/2 pairs. Fitted to the uncached
prefills, whose cost per token grows with the length (0.0304 ms from 2k to 4k tokens, 0.0338 ms
from 4k to 8k): 1.34e-6 ms per pair is ~390 TFLOP/s at 0.5 MFLOP per pair (4 x 128 dims x 32
heads x 32 layers), what flash attention reaches on an H100. The calibration's cached-prefix
figures show this term: 1,024 new tokens cost 7.3 ms more after 2,048 cached tokens and 17.4 ms
more after 6,144 than 1,024 uncached ones (2.8-3.5e-6 ms per pair: eager attention over a cached
prefix with an explicit mask, 2-3x slower than the flash kernels a serving engine uses)."""

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
    """Step time added per uncached token prefilled in the step (ms per token)."""
    step_base_ms: float = DEFAULT_STEP_BASE_MS
    """Step time of any non-empty step: the weights read once (ms)."""
    kv_read_ms_per_token: float = DEFAULT_KV_READ_MS_PER_TOKEN
    """Step time added per context token whose KV the step reads (ms per token): the whole
    context (prompt and output so far) of each decoding sequence, the prefix of each prefill
    chunk."""
    attn_ms_per_million_pairs: float = DEFAULT_ATTN_MS_PER_MILLION_PAIRS
    """Step time added per million (new token, attended token) pairs of the step's prefill chunks
    (ms per 10^6 pairs)."""
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
        for name in (
            "prefill_ms_per_token",
            "step_base_ms",
            "kv_read_ms_per_token",
            "attn_ms_per_million_pairs",
        ):
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


def _blocks_for(tokens: int) -> int:
    """KV blocks holding `tokens` tokens."""
    return -(-tokens // BLOCK_TOKENS)


class Sequence:
    """One request inside the engine. Read its public attributes; the engine writes them."""

    __slots__ = (
        "_committed",
        "_hashes",
        "_held",
        "_last_hash",
        "_pending",
        "_reserved",
        "_target",
        "_words",
        "arrival_ms",
        "cached_tokens",
        "computed_tokens",
        "finish_ms",
        "first_token_ms",
        "id",
        "max_tokens",
        "output",
        "preemptions",
        "prompt",
        "prompt_hashes",
        "prompt_tokens",
        "state",
    )

    def __init__(
        self,
        seq_id: int,
        prompt: str,
        max_tokens: int,
        arrival_ms: float,
        reply_seed: int | None = None,
    ) -> None:
        self.id = seq_id
        self.prompt = prompt
        self.prompt_tokens = count_tokens(prompt)
        self.max_tokens = max_tokens
        self.arrival_ms = arrival_ms
        self.prompt_hashes = block_hashes(prompt)
        """Chained hashes of the prompt's full blocks."""
        self.state = SeqState.WAITING
        self.cached_tokens = 0
        """Prompt tokens found in the prefix cache at the first admission."""
        self.computed_tokens = 0
        """Tokens to prefill whose KV exists (cached or prefilled): tokens of the prompt, or after
        a preemption of the prompt and the output generated before it."""
        self.output: list[str] = []
        """Generated tokens, four characters each."""
        self.preemptions = 0
        """Times the sequence was preempted (and its KV recomputed)."""
        self.first_token_ms: float | None = None
        self.finish_ms: float | None = None
        self._words = PseudoWords(text_seed(prompt) if reply_seed is None else reply_seed)
        self._hashes = list(self.prompt_hashes)
        """Chained hashes of the full blocks of the prompt and the output so far."""
        self._target = self.prompt_tokens
        """Tokens to prefill before the next token: the prompt, or prompt and output so far."""
        self._held: list[int] = []
        """Hashes of the cached blocks the sequence references."""
        self._reserved = 0
        """Blocks the sequence holds that are not (or not uniquely) cached."""
        self._committed = 0
        """Leading entries of `_hashes` whose blocks were computed (or reused) in this run."""
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
        return self.computed_tokens < self._target

    @property
    def context_tokens(self) -> int:
        """Prompt plus output tokens so far: what a decode step of this sequence reads."""
        return self.prompt_tokens + len(self.output)

    @property
    def kv_blocks(self) -> int:
        """KV blocks the sequence holds now."""
        return len(self._held) + self._reserved

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.id}, state={self.state.value}, prompt_tokens={self.prompt_tokens},"
            f" cached={self.cached_tokens}, computed={self.computed_tokens}/{self._target},"
            f" output={len(self.output)}/{self.max_tokens}, preemptions={self.preemptions})"
        )


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """A token emitted by a sequence at the end of a step."""

    seq: Sequence
    token: str
    first: bool
    """The sequence's first token: its (first) prefill completed in this step."""
    finished: bool
    """The sequence's last token: it has now generated `max_tokens`."""


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one engine step did."""

    start_ms: float
    end_ms: float
    prefill_tokens: int
    """Uncached tokens computed in the step (prompt tokens, or recomputed ones)."""
    decode_seqs: int
    """Sequences that decoded one token in the step."""
    prefill_seqs: int
    """Sequences that computed a prefill chunk in the step."""
    admitted: int
    """Waiting sequences admitted in the step."""
    outputs: list[TokenOutput]
    preempted: int = 0
    """Running sequences preempted in the step to free KV blocks."""
    context_tokens: int = 0
    """Context tokens whose KV the step read: decoding sequences' contexts, prefill prefixes."""

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
    """Requests admitted for the first time (re-admissions after a preemption not counted)."""
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    """Prompt tokens of admitted requests."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache at first admission (vLLM:
    ``prefix_cache_queries``)."""
    prefix_cache_hits: int = 0
    """Prompt tokens found there (vLLM: ``prefix_cache_hits``)."""
    prefill_tokens: int = 0
    """Tokens actually computed in prefill (not cached), recomputations included."""
    recomputed_tokens: int = 0
    """Part of `prefill_tokens` computed for preempted sequences after their re-admission."""
    preemptions: int = 0
    """Running sequences preempted for lack of KV blocks (vLLM: ``num_preemptions``)."""
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
        self._decode_context = 0
        """Sum of `context_tokens` over running sequences past their prefill, kept up to date
        as tokens are emitted and sequences come and go (a step's KV read without a loop)."""
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
    def decode_context_tokens(self) -> int:
        """Total context of the running sequences past their prefill: the next decode's KV read."""
        return self._decode_context

    @property
    def running(self) -> list[Sequence]:
        """Running sequences in admission order (a copy)."""
        return list(self._running)

    @property
    def waiting(self) -> list[Sequence]:
        """Waiting sequences in queue order (a copy): preempted ones first, then by arrival."""
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
        """KV blocks of a sequence's whole context: more than it ever holds at once."""
        return _blocks_for(prompt_tokens + max_tokens)

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str,
        max_tokens: int | None = None,
        *,
        now_ms: float | None = None,
        reply_seed: int | None = None,
    ) -> Sequence:
        """Queue a request arriving at `now_ms` (default: the engine's clock).

        An idle engine's clock jumps forward to the arrival. A busy engine whose clock is behind
        the arrival time (its host fell behind) counts the request as arriving now. The reply's
        text is seeded by `reply_seed`, or by the prompt when it is None (greedy decoding: a
        prompt always gets the same reply).
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
        # A sequence alone on the engine must be able to grow to its whole context, or it would
        # preempt itself for ever.
        if self.blocks_needed(prompt_tokens, max_tokens) > self.cache.capacity:
            raise EngineError(
                f"the request needs {self.blocks_needed(prompt_tokens, max_tokens)} KV blocks;"
                f" the cache holds {self.cache.capacity}"
            )
        if now_ms is None:
            now_ms = self.now
        if not self.has_work:
            self.now = max(self.now, now_ms)
        seq = Sequence(next(self._ids), prompt, max_tokens, min(now_ms, self.now), reply_seed)
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
            if not seq.prefilling:
                self._decode_context -= seq.context_tokens
            self._release(seq)
        else:
            return False
        seq.state = SeqState.ABORTED
        seq.finish_ms = self.now
        self.totals.requests_aborted += 1
        return True

    def clear_cache(self) -> None:
        """Forget every cached block, as a restarted process has lost its GPU memory. Only an
        engine without work may: running sequences hold blocks (abort them first)."""
        if self.has_work:
            raise EngineError("the engine still has sequences; abort them before a restart")
        self.cache = PrefixCache(self.config.kv_cache_blocks)

    # -- scheduling ----------------------------------------------------------------------------

    def _cached_blocks_for(self, seq: Sequence) -> int:
        # vLLM recomputes at least the last token to prefill (it needs its logits), so a fully
        # cached prompt still prefills its last block.
        limit = (seq._target - 1) // BLOCK_TOKENS
        return min(self.cache.match(seq._hashes[:limit]), limit)

    def _try_admit(self, seq: Sequence) -> bool:
        """Admit `seq` with blocks for what it has to prefill, if the pool has them."""
        cache = self.cache
        hits = seq._hashes[: self._cached_blocks_for(seq)]
        new_blocks = _blocks_for(seq._target) - len(hits)
        # Pinning an evictable hit takes it out of the free pool too.
        evictable_hits = sum(1 for block_hash in hits if cache.refcount(block_hash) == 0)
        if new_blocks > cache.free_blocks - evictable_hits:
            return False
        cache.pin(hits)
        cache.reserve(new_blocks)
        seq._held = list(hits)
        seq._reserved = new_blocks
        seq._committed = len(hits)
        seq.computed_tokens = len(hits) * BLOCK_TOKENS
        seq.state = SeqState.RUNNING
        if seq.preemptions == 0:
            # As in vLLM, the cache counters and a request's cached tokens are those of its
            # first admission; a recomputation's hits are not reported.
            seq.cached_tokens = seq.computed_tokens
            totals = self.totals
            totals.requests_admitted += 1
            totals.prompt_tokens += seq.prompt_tokens
            totals.prefix_cache_queries += seq.prompt_tokens
            totals.prefix_cache_hits += seq.cached_tokens
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence (already out of the running list) back to the front of the
        waiting queue; it keeps its output and will prefill it with its prompt (recompute)."""
        if not seq.prefilling:
            self._decode_context -= seq.context_tokens
        self._release(seq)
        seq.state = SeqState.WAITING
        seq.preemptions += 1
        seq.computed_tokens = 0
        seq._committed = 0
        seq._target = seq.context_tokens
        self._waiting.appendleft(seq)
        self.totals.preemptions += 1

    def step(self) -> StepOutput | None:
        """Run one step from the current clock; None (and no time passes) if there is no work."""
        config = self.config
        cache = self.cache
        running = self._running
        budget = config.max_num_batched_tokens

        # Decode: every running sequence past its prefill computes the KV of its last token,
        # which needs a new block every 16 tokens. As in vLLM V1, when the pool has none the last
        # admitted running sequence is preempted, until the block is free or the sequence
        # needing it was the one preempted. Victims come from the end of the list, so no
        # sequence already scheduled in this step is ever preempted.
        decode: list[Sequence] = []
        preempted = 0
        index = 0
        while index < len(running):
            seq = running[index]
            index += 1
            if seq.computed_tokens < seq._target:
                continue
            need = (
                -(-(seq.prompt_tokens + len(seq.output)) // BLOCK_TOKENS)
                - len(seq._held)
                - seq._reserved
            )
            if need > 0:
                while cache.free_blocks < need:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted += 1
                    if victim is seq:
                        break
                if seq.state is not SeqState.RUNNING:
                    break  # it was the last running sequence
                cache.reserve(need)
                seq._reserved += need
            decode.append(seq)
            budget -= 1

        prefill: list[tuple[Sequence, int]] = []
        for seq in running:
            if budget <= 0:
                break
            if seq.computed_tokens < seq._target:
                chunk = min(seq._target - seq.computed_tokens, budget)
                prefill.append((seq, chunk))
                budget -= chunk

        # vLLM V1 admits nobody in a step that had to preempt.
        admitted = 0
        waiting = self._waiting
        while not preempted and waiting and budget > 0 and len(running) < config.max_num_seqs:
            seq = waiting[0]
            if not self._try_admit(seq):
                break  # first come, first served: nobody overtakes the head of the queue
            waiting.popleft()
            running.append(seq)
            admitted += 1
            chunk = min(seq._target - seq.computed_tokens, budget)
            prefill.append((seq, chunk))
            budget -= chunk
        if preempted:
            self.peak_waiting = max(self.peak_waiting, len(waiting))
        if not decode and not prefill:
            return None

        prefill_tokens = 0
        recomputed = 0
        prefix_tokens = 0
        pairs = 0
        for seq, chunk in prefill:
            done = seq.computed_tokens
            prefill_tokens += chunk
            prefix_tokens += done
            pairs += chunk * done + chunk * (chunk + 1) // 2
            if seq.preemptions:
                recomputed += chunk
        context_tokens = self._decode_context + prefix_tokens
        duration = (
            config.step_base_ms
            + config.kv_read_ms_per_token * context_tokens
            + config.prefill_ms_per_token * prefill_tokens
            + config.attn_ms_per_million_pairs * 1e-6 * pairs
        ) * self.latency_multiplier
        start = self.now
        end = self.now = start + duration

        outputs: list[TokenOutput] = []
        finished: list[Sequence] = []
        for seq in decode:
            out = self._emit(seq, end)
            outputs.append(out)
            if out.finished:
                finished.append(seq)
                self._decode_context -= seq.context_tokens - 1  # its context before the token
        self._decode_context += len(decode) - len(finished)
        for seq, chunk in prefill:
            seq.computed_tokens += chunk
            self._commit_computed_blocks(seq)
            if seq.computed_tokens >= seq._target:
                if seq.first_token_ms is None:
                    seq.first_token_ms = end
                out = self._emit(seq, end)
                outputs.append(out)
                if out.finished:
                    finished.append(seq)
                else:
                    self._decode_context += seq.context_tokens
        if finished:
            done_ids = {id(seq) for seq in finished}
            running[:] = [seq for seq in running if id(seq) not in done_ids]

        totals = self.totals
        totals.prefill_tokens += prefill_tokens
        totals.recomputed_tokens += recomputed
        totals.generation_tokens += len(outputs)
        totals.requests_finished += len(finished)
        totals.steps += 1
        totals.busy_ms += duration
        self.peak_running = max(self.peak_running, len(running) + len(finished))
        return StepOutput(
            start_ms=start,
            end_ms=end,
            prefill_tokens=prefill_tokens,
            decode_seqs=len(decode),
            prefill_seqs=len(prefill),
            admitted=admitted,
            outputs=outputs,
            preempted=preempted,
            context_tokens=context_tokens,
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

    def _commit_computed_blocks(self, seq: Sequence) -> None:
        target = min(seq.computed_tokens // BLOCK_TOKENS, len(seq._hashes))
        for index in range(seq._committed, target):
            self._commit(seq, seq._hashes[index])
        seq._committed = max(seq._committed, target)

    def _emit(self, seq: Sequence, now: float) -> TokenOutput:
        first = not seq.output
        last = len(seq.output) + 1 == seq.max_tokens
        token = seq._words.next_token(last=last)
        seq.output.append(token)
        # Output tokens extend the sequence's text; each 64 characters make a cacheable block
        # that the next turn of a conversation (prompt + this reply + more) starts with. The
        # sequence holds a block for it: it has one per 16 tokens of its context, and text has
        # at most 4 characters per token.
        pending = seq._pending + token
        if len(pending) >= BLOCK_CHARS:
            seq._last_hash = chain_hash(seq._last_hash, pending[:BLOCK_CHARS])
            seq._hashes.append(seq._last_hash)
            self._commit(seq, seq._last_hash)
            seq._committed = len(seq._hashes)
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
