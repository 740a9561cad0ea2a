"""The reclaimer: when it trims, and that it tunes and trims nothing where it cannot."""

from __future__ import annotations

import asyncio

from balancer.memory import ARENAS, Allocator, Reclaimer, glibc


class FakeAllocator:
    """Counts the calls a real glibc would get (the real ones run in the adversarial suite,
    which measures the memory they give back)."""

    def __init__(self) -> None:
        self.trims = 0
        self.arena_limits: list[int] = []

    def allocator(self) -> Allocator:
        return Allocator(trim=self._trim, set_arena_max=self.arena_limits.append)

    def _trim(self) -> int:
        self.trims += 1
        return 1


async def trimmed(fake: FakeAllocator, count: int, within: float = 5.0) -> None:
    """Wait (bounded, generously) until ``count`` trims happened: the trim runs in a thread,
    which a loaded machine may start late."""
    deadline = asyncio.get_running_loop().time() + within
    while fake.trims < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert fake.trims == count


def reclaimer(delay: float = 0.05, within: float = 0.5) -> tuple[Reclaimer, FakeAllocator]:
    fake = FakeAllocator()
    return Reclaimer(delay=delay, within=within, allocator=fake.allocator()), fake


async def test_start_limits_the_allocator_to_one_arena():
    r, fake = reclaimer()
    r.start()
    assert fake.arena_limits == [ARENAS] == [1]


async def test_a_quiet_proxy_without_large_bodies_is_never_trimmed():
    r, fake = reclaimer()
    r.quiet()
    await asyncio.sleep(0.15)
    assert fake.trims == 0


async def test_one_trim_shortly_after_the_proxy_goes_quiet():
    r, fake = reclaimer(delay=0.05, within=10)
    for _ in range(16):  # a burst: one trim for all of it
        r.large_body()
    await asyncio.sleep(0.1)
    assert fake.trims == 0  # still busy: waits for quiet (or `within`)
    r.quiet()
    r.quiet()
    await trimmed(fake, 1)
    await r.close()  # waits for the trim's task, which counts it
    assert r.trims == 1
    r.quiet()  # nothing new since: no trim
    await asyncio.sleep(0.1)
    assert fake.trims == 1


async def test_a_proxy_never_quiet_is_trimmed_within_the_bound():
    r, fake = reclaimer(delay=0.05, within=0.1)
    r.large_body()
    await trimmed(fake, 1)
    r.large_body()
    await trimmed(fake, 2)
    await r.close()


async def test_close_cancels_a_pending_trim():
    r, fake = reclaimer(delay=0.05, within=0.1)
    r.large_body()
    await r.close()
    await asyncio.sleep(0.2)
    assert fake.trims == 0


async def test_without_glibc_nothing_is_scheduled():
    r = Reclaimer(allocator=None)
    r.start()
    r.large_body()
    r.quiet()
    await r.close()
    assert r.trims == 0


def test_this_linux_has_glibc_calls():
    """On the glibc machines the project runs on the calls resolve and succeed."""
    found = glibc()
    assert found is not None
    assert found.trim() in (0, 1)
