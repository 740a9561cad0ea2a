"""The simulated engine: prefix-cache accounting and vLLM-like continuous batching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.simserver.engine import (
    Engine,
    EngineConfig,
    EngineError,
    SeqState,
    Sequence,
    StepOutput,
)
from loadtest.simserver.text import BLOCK_CHARS, BLOCK_TOKENS, render_chat

# Round numbers make expected step times easy to write down.
SIMPLE = EngineConfig(
    step_base_ms=10.0,
    prefill_ms_per_token=0.01,
    step_ms_per_seq=1.0,
    max_num_seqs=8,
    max_num_batched_tokens=4096,
    kv_cache_blocks=10_000,
)


def _prompt(tokens: int, seed: str = "p") -> str:
    """A prompt of exactly `tokens` pseudo-tokens; different seeds differ from the start."""
    return "".join(f"{seed}:{i};" for i in range(tokens))[: 4 * tokens]


def _ttft(engine: Engine, prompt: str, max_tokens: int = 1) -> float:
    seq = engine.add_request(prompt, max_tokens)
    engine.run_until_idle()
    assert seq.ttft_ms is not None
    return seq.ttft_ms


def test_step_time_is_base_plus_prefill_plus_decode() -> None:
    """A step costs its base, its uncached prefill tokens and its decoding sequences."""
    engine = Engine(SIMPLE)
    engine.add_request(_prompt(100), max_tokens=3)
    first = engine.step()
    assert first is not None
    assert first.prefill_tokens == 100 and first.decode_seqs == 0
    assert first.duration_ms == pytest.approx(10.0 + 100 * 0.01)
    engine.add_request(_prompt(50, "q"), max_tokens=3)
    second = engine.step()
    assert second is not None
    assert second.decode_seqs == 1 and second.prefill_tokens == 50
    assert second.duration_ms == pytest.approx(10.0 + 50 * 0.01 + 1.0)


def test_ttft_grows_with_uncached_tokens() -> None:
    """A longer uncached prompt takes longer to its first token, linearly in its length."""
    ttfts = [_ttft(Engine(SIMPLE), _prompt(n)) for n in (100, 1000, 4000)]
    assert ttfts == pytest.approx([10.0 + n * 0.01 for n in (100, 1000, 4000)])
    assert ttfts[0] < ttfts[1] < ttfts[2]


def test_cached_prompt_gives_much_lower_ttft() -> None:
    """A repeated prompt reuses its blocks: only the last block is computed again."""
    engine = Engine()
    prompt = _prompt(4000)
    cold = _ttft(engine, prompt)
    seq = engine.add_request(prompt, 1)
    engine.run_until_idle()
    assert seq.cached_tokens == ((4000 - 1) // BLOCK_TOKENS) * BLOCK_TOKENS
    assert seq.ttft_ms is not None
    assert cold == pytest.approx(5.5 + 0.03 * 4000)
    assert seq.ttft_ms == pytest.approx(5.5 + 0.03 * (4000 - seq.cached_tokens))
    assert seq.ttft_ms < cold / 10


def test_hit_accounting_counts_tokens_like_vllm() -> None:
    """Queries count prompt tokens looked up, hits count cached tokens."""
    engine = Engine(SIMPLE)
    shared = _prompt(64, "s")
    engine.add_request(shared + _prompt(20, "a"), 1)
    engine.run_until_idle()
    seq = engine.add_request(shared + _prompt(36, "b"), 1)
    engine.run_until_idle()
    stats = engine.stats()
    assert stats.prefix_cache_queries == 84 + 100
    assert stats.prefix_cache_hits == 64 == seq.cached_tokens
    assert stats.prompt_tokens == 184
    assert stats.prefill_tokens == 184 - 64


def test_fully_cached_prompt_still_computes_its_last_block() -> None:
    """As in vLLM, the last prompt token is always computed, so a block-aligned prompt cached
    in full reuses all but its last block."""
    engine = Engine(SIMPLE)
    prompt = _prompt(3 * BLOCK_TOKENS)
    assert len(prompt) == 3 * BLOCK_CHARS
    engine.add_request(prompt, 1)
    engine.run_until_idle()
    seq = engine.add_request(prompt, 1)
    engine.run_until_idle()
    assert seq.cached_tokens == 2 * BLOCK_TOKENS


def test_ttft_grows_with_queue_depth() -> None:
    """Requests queued behind others wait for the steps before theirs."""
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=4096)
    engine = Engine(config)
    seqs = [engine.add_request(_prompt(1000, f"{i}"), max_tokens=4) for i in range(5)]
    engine.run_until_idle()
    ttfts = [seq.ttft_ms for seq in seqs if seq.ttft_ms is not None]
    assert len(ttfts) == 5
    assert ttfts == sorted(ttfts)
    assert len(set(ttfts)) == 5


def test_prefill_budget_queues_long_prompts_behind_each_other() -> None:
    """With room for one long prompt per step, simultaneous long prompts get staggered TTFTs."""
    engine = Engine(EngineConfig(max_num_batched_tokens=8192))
    seqs = [engine.add_request(_prompt(8000, f"{i}"), max_tokens=1) for i in range(3)]
    steps = engine.run_until_idle()
    # Step 1: all of the first prompt and 192 tokens of the second; step 2: the rest of the
    # second and 384 tokens of the third; step 3: the rest of the third.
    full = 5.5 + 0.03 * 8192
    expected = [full, 2 * full, 2 * full + 5.5 + 0.03 * 7616]
    assert [s.ttft_ms for s in seqs] == pytest.approx(expected)
    assert all(step.batched_tokens <= 8192 for step in steps)


def test_batch_limits_are_respected() -> None:
    """No step runs more than max_num_seqs sequences or more than its token budget."""
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=600)
    engine = Engine(config)
    for i in range(12):
        engine.add_request(_prompt(250, f"{i}"), max_tokens=5)
    while (out := engine.step()) is not None:
        assert engine.num_running <= 4
        assert out.decode_seqs + out.prefill_seqs <= 4
        assert out.batched_tokens <= 600
    assert engine.stats().requests_finished == 12


def test_chunked_prefill_spreads_a_long_prompt_across_steps() -> None:
    """A prompt longer than the budget is prefilled in budget-sized chunks."""
    config = EngineConfig(max_num_batched_tokens=1024, max_num_seqs=8)
    engine = Engine(config)
    seq = engine.add_request(_prompt(3000), max_tokens=2)
    chunks = []
    while seq.prefilling:
        out = engine.step()
        assert out is not None
        chunks.append(out.prefill_tokens)
        assert (seq.first_token_ms is None) == seq.prefilling
    assert chunks == [1024, 1024, 952]
    assert seq.ttft_ms == pytest.approx(3 * 5.5 + 0.03 * 3000)


def test_decode_tokens_come_first_then_prefill_chunks() -> None:
    """A decoding sequence gets its token in every step even while a long prompt prefills."""
    config = EngineConfig(max_num_batched_tokens=256, max_num_seqs=8)
    engine = Engine(config)
    decoding = engine.add_request(_prompt(10, "d"), max_tokens=20)
    engine.step()
    assert not decoding.prefilling
    long = engine.add_request(_prompt(1000, "l"), max_tokens=1)
    for _ in range(3):
        before = len(decoding.output)
        out = engine.step()
        assert out is not None
        assert len(decoding.output) == before + 1
        assert out.prefill_tokens == 255
    assert long.prefilling


def test_each_decoding_sequence_emits_one_token_per_step() -> None:
    """A request with max_tokens=M takes one prefill step and M-1 decode steps."""
    engine = Engine(SIMPLE)
    seqs = [engine.add_request(_prompt(30, f"{i}"), max_tokens=10) for i in range(3)]
    steps = engine.run_until_idle()
    assert len(steps) == 10
    for step in steps:
        assert sorted(o.seq.id for o in step.outputs) == sorted(s.id for s in seqs)
    assert all(len(s.output) == 10 and s.state is SeqState.FINISHED for s in seqs)
    assert steps[0].outputs[0].first and steps[-1].outputs[0].finished
    assert seqs[0].finish_ms == pytest.approx(steps[-1].end_ms)


def test_admission_is_limited_by_free_kv_blocks() -> None:
    """A sequence waits until the pool can hold its whole context."""
    config = EngineConfig(kv_cache_blocks=20, max_num_seqs=8)
    engine = Engine(config)
    first = engine.add_request(_prompt(150, "a"), max_tokens=42)  # 12 blocks
    second = engine.add_request(_prompt(150, "b"), max_tokens=42)
    engine.step()
    assert [first.state, second.state] == [SeqState.RUNNING, SeqState.WAITING]
    assert engine.cache.used_blocks == 12
    while first.finish_ms is None:
        engine.step()
    engine.step()
    assert second.state is SeqState.RUNNING
    engine.run_until_idle()
    assert engine.cache.used_blocks == 0


def test_running_blocks_are_pinned_and_finished_blocks_evicted_lru() -> None:
    """Blocks of a running sequence survive pressure; older finished ones are evicted first."""
    config = EngineConfig(kv_cache_blocks=12, max_num_seqs=8)
    engine = Engine(config)
    old = engine.add_request(_prompt(64, "o"), max_tokens=1)  # 4 cached prompt blocks
    engine.run_until_idle()
    newer = engine.add_request(_prompt(64, "n"), max_tokens=1)
    engine.run_until_idle()
    assert engine.cache.match(old.prompt_hashes) == 4
    running = engine.add_request(_prompt(64, "r"), max_tokens=40)  # 7 blocks
    engine.step()
    assert running.state is SeqState.RUNNING
    # 12 blocks: 7 reserved by `running` leave room for 5 of the 8 cached ones.
    assert engine.cache.match(old.prompt_hashes) < 4
    assert engine.cache.match(newer.prompt_hashes) == 4
    squeezed = engine.add_request(_prompt(40, "x"), max_tokens=40)  # 5 blocks
    engine.step()
    assert squeezed.state is SeqState.RUNNING
    assert engine.cache.match(running.prompt_hashes) == 4  # pinned
    assert engine.cache.match(newer.prompt_hashes) == 0
    engine.run_until_idle()


def test_blocks_are_shared_as_soon_as_they_are_computed() -> None:
    """A prompt arriving while another with the same prefix decodes already hits its blocks."""
    engine = Engine(SIMPLE)
    document = _prompt(2000, "d")
    first = engine.add_request(document + "question one", max_tokens=50)
    engine.step()
    second = engine.add_request(document + "question two", max_tokens=50)
    engine.step()
    assert first.state is SeqState.RUNNING
    assert second.cached_tokens == 2000


def test_output_blocks_are_reused_by_the_next_turn() -> None:
    """Prompt and reply of a finished turn are the cached prefix of the next turn."""
    engine = Engine(SIMPLE)
    messages = [
        {"role": "system", "content": "You are terse. " * 20},
        {"role": "user", "content": "Tell me a story."},
    ]
    first_prompt = render_chat(messages)
    turn = engine.add_request(first_prompt, max_tokens=100)
    engine.run_until_idle()
    messages += [
        {"role": "assistant", "content": turn.text},
        {"role": "user", "content": "And then?"},
    ]
    second_prompt = render_chat(messages)
    assert second_prompt.startswith(first_prompt + turn.text)
    nxt = engine.add_request(second_prompt, max_tokens=5)
    engine.run_until_idle()
    reusable = (len(first_prompt + turn.text) // BLOCK_CHARS) * BLOCK_TOKENS
    assert nxt.cached_tokens == reusable
    assert reusable > 100  # more than the first prompt's own blocks: the reply counts


def test_generation_is_deterministic_per_prompt() -> None:
    """The same prompt gets the same reply on any engine."""
    replies = []
    for _ in range(2):
        engine = Engine(SIMPLE)
        seq = engine.add_request("hello there", max_tokens=12)
        engine.run_until_idle()
        replies.append(seq.text)
    assert replies[0] == replies[1]
    assert len(replies[0]) == 4 * 12


def test_latency_multiplier_scales_step_time() -> None:
    """A slowed engine takes proportionally longer per step."""
    engine = Engine(SIMPLE)
    engine.latency_multiplier = 3.0
    engine.add_request(_prompt(100), 1)
    out = engine.step()
    assert out is not None
    assert out.duration_ms == pytest.approx(3 * (10.0 + 1.0))


def test_abort_frees_the_slot_and_blocks() -> None:
    """Aborting a running or waiting sequence releases it; aborting twice does nothing."""
    engine = Engine(EngineConfig(max_num_seqs=1))
    running = engine.add_request(_prompt(100), max_tokens=100)
    waiting = engine.add_request(_prompt(100, "w"), max_tokens=100)
    engine.step()
    assert engine.cache.used_blocks > 0
    assert engine.abort(waiting) and engine.abort(running)
    assert not engine.abort(running)
    assert engine.num_running == engine.num_waiting == 0
    assert engine.cache.used_blocks == 0
    assert engine.step() is None
    assert engine.stats().requests_aborted == 2


def test_idle_engine_waits_for_arrivals_without_time_passing() -> None:
    """An idle engine does no step; its clock jumps to the next arrival."""
    engine = Engine(SIMPLE)
    assert engine.step() is None
    assert engine.now == 0.0
    seq = engine.add_request(_prompt(10), 1, now_ms=1000.0)
    assert engine.now == 1000.0 and seq.arrival_ms == 1000.0
    engine.run_until_idle()
    assert seq.ttft_ms == pytest.approx(10.0 + 0.1)


def test_busy_engine_clamps_late_arrivals_to_its_clock() -> None:
    """An arrival stamped after a busy engine's clock counts as arriving now, and one that came
    during a step waits for that step to end."""
    engine = Engine(SIMPLE)
    engine.add_request(_prompt(10), 50)
    engine.step()
    late = engine.add_request(_prompt(10, "l"), 1, now_ms=engine.now + 500)
    assert late.arrival_ms == engine.now
    early = engine.add_request(_prompt(10, "e"), 1, now_ms=engine.now - 5)
    engine.step()
    assert early.ttft_ms is not None and early.ttft_ms > 5


def test_requests_the_engine_cannot_hold_are_refused() -> None:
    """Empty prompts, too-long contexts and contexts bigger than the pool are refused."""
    engine = Engine(EngineConfig(max_model_len=1000, kv_cache_blocks=10))
    with pytest.raises(EngineError):
        engine.add_request("", 1)
    with pytest.raises(EngineError, match="maximum context length"):
        engine.add_request(_prompt(990), 20)
    with pytest.raises(EngineError, match="KV blocks"):
        engine.add_request(_prompt(200), 1)
    with pytest.raises(EngineError):
        engine.add_request("x", 0)


def test_config_is_validated() -> None:
    """Impossible engine shapes are refused when configured."""
    with pytest.raises(ValueError):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError):
        EngineConfig(max_num_seqs=300, max_num_batched_tokens=256)
    with pytest.raises(ValueError):
        EngineConfig(prefill_ms_per_token=-1)


def test_reset_stats_zeroes_counters_not_the_cache() -> None:
    """Counters restart from zero; cached blocks still give hits."""
    engine = Engine(SIMPLE)
    engine.add_request(_prompt(100), 1)
    engine.run_until_idle()
    engine.reset_stats()
    assert engine.stats().prompt_tokens == 0
    assert engine.totals.prompt_tokens == 100
    seq = engine.add_request(_prompt(100), 1)
    engine.run_until_idle()
    assert seq.cached_tokens > 0
    assert engine.stats().prefix_cache_hits == seq.cached_tokens


def _check_invariants(engine: Engine, seqs: list[Sequence]) -> None:
    cache = engine.cache
    running = [s for s in seqs if s.state is SeqState.RUNNING]
    pinned = {h for s in running for h in s._held}
    assert cache.used_blocks == len(pinned) + sum(s._reserved for s in running)
    assert cache.cached_blocks + sum(s._reserved for s in running) <= cache.capacity
    assert len(running) == engine.num_running <= engine.config.max_num_seqs


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3),  # shared prefix id
            st.integers(min_value=1, max_value=300),  # own tokens
            st.integers(min_value=1, max_value=40),  # max_tokens
            st.integers(min_value=0, max_value=3),  # steps before the next arrival
        ),
        min_size=1,
        max_size=25,
    ),
    capacity=st.integers(min_value=30, max_value=200),
    max_num_seqs=st.integers(min_value=1, max_value=6),
    budget=st.integers(min_value=6, max_value=700),
)
def test_engine_invariants_under_random_load(
    requests: list[tuple[int, int, int, int]], capacity: int, max_num_seqs: int, budget: int
) -> None:
    """Every request finishes with exactly max_tokens; hits never exceed queries; the pool is
    never overcommitted and is fully released at the end."""
    config = EngineConfig(
        kv_cache_blocks=capacity, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget
    )
    engine = Engine(config)
    seqs: list[Sequence] = []
    steps: list[StepOutput] = []
    for prefix, own, max_tokens, gap in requests:
        prompt = _prompt(100, f"s{prefix}") + _prompt(own, f"o{len(seqs)}")
        if engine.blocks_needed(100 + own, max_tokens) > capacity:
            continue
        seqs.append(engine.add_request(prompt, max_tokens))
        for _ in range(gap):
            out = engine.step()
            if out is not None:
                steps.append(out)
            _check_invariants(engine, seqs)
    steps += engine.run_until_idle()
    assert all(s.state is SeqState.FINISHED for s in seqs)
    assert all(len(s.output) == s.max_tokens for s in seqs)
    assert all(s.cached_tokens < s.prompt_tokens for s in seqs)
    assert all(
        out.batched_tokens <= budget and out.decode_seqs + out.prefill_seqs <= max_num_seqs
        for out in steps
    )
    stats = engine.stats()
    assert stats.prefix_cache_hits <= stats.prefix_cache_queries
    assert stats.generation_tokens == sum(s.max_tokens for s in seqs)
    assert stats.prefill_tokens + stats.prefix_cache_hits == stats.prompt_tokens
    assert engine.cache.used_blocks == 0
    assert engine.cache.cached_blocks <= capacity
