"""The driver that runs the simulated engine on the wall clock."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from loadtest.simserver.driver import EngineDriver
from loadtest.simserver.engine import Engine, EngineConfig, EngineError, SeqState


async def _collect(driver: EngineDriver, prompts: list[str], max_tokens: int) -> list[str]:
    submission = driver.submit(prompts, max_tokens)
    texts = [""] * len(prompts)
    remaining = len(prompts)
    while remaining:
        index, token = await submission.queue.get()
        texts[index] += token.token
        remaining -= token.finished
    return texts


async def test_tokens_reach_their_submission_in_order() -> None:
    """Each submission receives exactly its own sequences' tokens, tagged by prompt index."""
    engine = Engine()
    driver = EngineDriver(engine, time_scale=0.001)
    task = asyncio.create_task(driver.run())
    try:
        first, second = await asyncio.wait_for(
            asyncio.gather(_collect(driver, ["alpha", "beta"], 5), _collect(driver, ["gamma"], 3)),
            timeout=5,
        )
    finally:
        task.cancel()
    assert [len(t) for t in first] == [20, 20] and len(second[0]) == 12
    reference = Engine()
    seq = reference.add_request("gamma", 3)
    reference.run_until_idle()
    assert second[0] == seq.text


async def test_a_refused_prompt_queues_nothing() -> None:
    """If one prompt of a batch is refused, none of the batch stays queued."""
    engine = Engine(EngineConfig(max_model_len=100))
    driver = EngineDriver(engine, time_scale=0.001)
    with pytest.raises(EngineError):
        driver.submit(["fine", "x" * 1000], 10)
    assert engine.num_waiting == 0


async def test_abort_frees_the_engine() -> None:
    """Aborting a submission ends its sequences in the engine."""
    engine = Engine()
    driver = EngineDriver(engine, time_scale=1.0)
    submission = driver.submit(["abc"], 1000)
    assert driver.abort(submission) == 1
    assert submission.seqs[0].state is SeqState.ABORTED
    assert not engine.has_work


async def test_a_host_that_falls_behind_pauses_simulated_time() -> None:
    """When the clock runs far ahead of the schedule the driver re-anchors instead of racing."""
    ticks = itertools.count()

    def clock() -> float:  # every reading is one second later
        return float(next(ticks))

    engine = Engine()
    driver = EngineDriver(engine, time_scale=1.0, clock=clock)
    task = asyncio.create_task(driver.run())
    start = time.monotonic()
    try:
        (text,) = await asyncio.wait_for(_collect(driver, ["late"], 5), timeout=5)
    finally:
        task.cancel()
    assert len(text) == 20
    assert driver.clock_resets >= 4
    assert time.monotonic() - start < 1.0


def test_time_scale_must_be_positive() -> None:
    """A zero or negative time scale is refused."""
    with pytest.raises(ValueError):
        EngineDriver(Engine(), time_scale=0)
