"""Admission: one `async with` takes an endpoint for an attempt and always gives it back."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import CollectorRegistry

from balancer.admission import Admission
from balancer.config import (
    LimitsSettings,
    PoolSettings,
    RetrySettings,
    RoutingSettings,
    Settings,
)
from balancer.endpoints import Endpoint
from balancer.errors import (
    ModelNotFoundError,
    NoEndpointsError,
    OverloadedError,
    RateLimitedError,
)
from balancer.metrics import Metrics
from balancer.ring import hash_key
from balancer.route import Decision, passthrough_view
from balancer.router import Lease, Pool, Router


def make_pool(n: int) -> Pool:
    pool = Pool(PoolSettings("p", ("m",)), RoutingSettings(virtual_nodes=64),
                random.Random(0))
    pool.set_endpoints(Endpoint(f"e{i}", f"http://10.0.0.{i}:8000") for i in range(n))
    return pool


def decision(pool: Pool, key: str = "k") -> Decision:
    key_hash = hash_key(key)
    return Decision(pool, pool.choose(key_hash), key_hash, key, "first-user-message")


def admission(limit: int = 0, queue: int = 100, timeout: float = 5.0,
              seen: list[Lease] | None = None) -> Admission:
    limits = LimitsSettings(max_in_flight_per_endpoint=limit, queue_size=queue,
                            queue_timeout=timeout)
    return Admission(limits, RetrySettings(), None if seen is None else seen.append)


async def test_a_lease_is_released_and_observed_however_the_attempt_ends():
    """Normal end or exception: the count goes back and health hears the attempt once."""
    pool = make_pool(2)
    seen: list[Lease] = []
    admit = admission(seen=seen)
    d = decision(pool)
    async with admit.lease(d) as lease:
        assert lease.state.id == d.choice.endpoint
        assert pool.load[lease.state.id] == 1
    with pytest.raises(RuntimeError):
        async with admit.lease(d):
            raise RuntimeError("the attempt broke")
    assert pool.total_load == 0 and set(pool.load.values()) == {0}
    assert len(seen) == 2


async def test_health_does_not_hear_attempts_whose_client_went_away():
    """A client that left says nothing about the endpoint."""
    pool = make_pool(1)
    seen: list[Lease] = []
    async with admission(seen=seen).lease(decision(pool)) as lease:
        lease.client_gone = True
    assert seen == [] and pool.total_load == 0


async def test_a_full_endpoint_passes_the_request_to_the_next_on_the_walk():
    """At the per-endpoint limit, the next endpoint of the key's walk takes the request."""
    pool = make_pool(3)
    admit = admission(limit=1)
    d = decision(pool)
    walk = list(pool.ring.walk(d.key_hash))
    async with admit.lease(d) as first, admit.lease(d) as second:
        assert (first.state.id, second.state.id) == (walk[0], walk[1])
        assert second.choice.outcome == "primary"


async def test_tried_endpoints_are_never_admitted_again():
    pool = make_pool(3)
    d = decision(pool)
    walk = list(pool.ring.walk(d.key_hash))
    async with admission(limit=1).lease(d, frozenset(walk[:2])) as lease:
        assert lease.state.id == walk[2]


async def test_waiters_are_served_first_come_first_served():
    """With every endpoint full, requests queue; each release admits the oldest waiter."""
    pool = make_pool(1)
    admit = admission(limit=1, queue=2)
    d = decision(pool)
    order: list[str] = []
    release = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def request(name: str) -> None:
        async with admit.lease(d):
            order.append(name)
            await release[name].wait()

    async with admit.lease(d):
        a = asyncio.create_task(request("a"))
        await asyncio.sleep(0.01)
        b = asyncio.create_task(request("b"))
        await asyncio.sleep(0.01)
        assert len(pool.waiters) == 2 and order == []
    await asyncio.sleep(0.01)
    assert order == ["a"]
    release["a"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b"]
    release["b"].set()
    await asyncio.gather(a, b)
    assert not pool.waiters and pool.total_load == 0


async def test_a_full_queue_is_overloaded_at_once():
    """No room to wait: OverloadedError (503, Retry-After 1) without waiting."""
    pool = make_pool(1)
    admit = admission(limit=1, queue=0)
    d = decision(pool)
    async with admit.lease(d):
        with pytest.raises(OverloadedError) as caught:
            async with admit.lease(d):
                pass
    assert caught.value.retry_after == 1


async def test_a_wait_that_times_out_is_overloaded():
    pool = make_pool(1)
    admit = admission(limit=1, timeout=0.1)
    d = decision(pool)
    loop = asyncio.get_running_loop()
    async with admit.lease(d):
        started = loop.time()
        with pytest.raises(OverloadedError):
            async with admit.lease(d):
                pass
        # Bounded both ways: the full wait, and not much more on a loaded machine.
        assert 0.09 <= loop.time() - started < 2
    assert not pool.waiters


async def test_a_waiter_cancelled_after_its_turn_came_passes_the_slot_on():
    """The slot a cancelled waiter was given goes to the next waiter, not to waste."""
    pool = make_pool(1)
    admit = admission(limit=1)
    d = decision(pool)
    admitted: list[str] = []

    async def request(name: str) -> None:
        async with admit.lease(d):
            admitted.append(name)

    holder = await admit.lease(d).__aenter__()
    a = asyncio.create_task(request("a"))
    await asyncio.sleep(0.01)
    b = asyncio.create_task(request("b"))
    await asyncio.sleep(0.01)
    admit.release(holder)  # wakes a ...
    a.cancel()  # ... which goes away before it runs
    await asyncio.gather(a, return_exceptions=True)
    await asyncio.wait_for(b, 2)
    assert admitted == ["b"] and pool.total_load == 0


async def test_paused_endpoints_are_skipped_and_all_paused_is_rate_limited():
    """A paused first choice yields to the next endpoint; with all paused, RateLimitedError
    carries the shortest pause, rounded up."""
    pool = make_pool(2)
    admit = admission()
    d = decision(pool)
    now = asyncio.get_running_loop().time()
    first, second = list(pool.ring.walk(d.key_hash))
    pool.pause(first, now + 30)
    async with admit.lease(d) as lease:
        assert lease.state.id == second
    pool.pause(second, now + 2.5)
    with pytest.raises(RateLimitedError) as caught:
        async with admit.lease(d):
            pass
    assert caught.value.retry_after == 3
    assert pool.pauses == 2 and pool.total_load == 0


# -- waiting for an empty pool ---------------------------------------------------------------


def waiting_admission(wait: float, metrics: Metrics | None = None) -> Admission:
    return Admission(LimitsSettings(empty_pool_wait=wait), RetrySettings(), metrics=metrics)


def router_of(*pools: PoolSettings) -> Router:
    return Router(Settings(pools=pools, routing=RoutingSettings(virtual_nodes=64)))


def waits(metrics: Metrics, why: str, result: str) -> float:
    value = metrics.registry.get_sample_value("balancer_empty_pool_waits_total",
                                              {"why": why, "result": result})
    return value or 0.0


async def test_a_request_for_an_empty_pool_is_served_by_its_first_endpoint():
    """The wait ends when the endpoint arrives (woken, not polled), well before its limit."""
    router = router_of(PoolSettings("p", ("m",)))
    metrics = Metrics(CollectorRegistry(), process=False)
    admit = waiting_admission(30.0, metrics)
    waiting = asyncio.ensure_future(admit.decide(passthrough_view("m", "/v1/x"), router))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert metrics.registry.get_sample_value("balancer_empty_pool_waiting") == 1
    router.apply({"p": [Endpoint("e0", "http://10.0.0.1:8000")]})
    decided = await asyncio.wait_for(waiting, 5)  # generous; the wake-up is immediate
    assert decided.choice.endpoint == "e0"
    assert waits(metrics, "no_endpoints", "served") == 1
    assert metrics.registry.get_sample_value("balancer_empty_pool_waiting") == 0


async def test_a_pool_that_stays_empty_gives_503_with_retry_after_after_the_wait():
    """Bounded: after ``empty_pool_wait`` the request gets NoEndpointsError with a
    Retry-After, and the timeout is counted."""
    router = router_of(PoolSettings("p", ("m",)))
    metrics = Metrics(CollectorRegistry(), process=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoEndpointsError) as caught:
        await waiting_admission(0.2, metrics).decide(passthrough_view("m", "/v1/x"), router)
    assert 0.15 <= loop.time() - started < 5  # the wait, give or take the clock's grain
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1
    assert waits(metrics, "no_endpoints", "timeout") == 1


async def test_no_wait_configured_answers_at_once():
    """``empty_pool_wait: 0``: 503 with Retry-After at once."""
    router = router_of(PoolSettings("p", ("m",)))
    with pytest.raises(NoEndpointsError) as caught:
        await asyncio.wait_for(
            waiting_admission(0.0).decide(passthrough_view("m", "/v1/x"), router), 1)
    assert caught.value.retry_after is not None


async def test_an_unknown_model_waits_while_a_pool_learns_and_is_served_once_learned():
    """A pool that has not learned its models may serve the model: wait, then route."""
    router = router_of(PoolSettings("p", (), ()))
    router.apply({"p": [Endpoint("e0", "http://10.0.0.1:8000")]})
    metrics = Metrics(CollectorRegistry(), process=False)
    waiting = asyncio.ensure_future(
        waiting_admission(30.0, metrics).decide(passthrough_view("lora", "/v1/x"), router))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    router.set_models("p", ["lora"])
    assert (await asyncio.wait_for(waiting, 5)).pool.name == "p"
    assert waits(metrics, "model_unknown", "served") == 1


async def test_a_model_no_pool_learned_is_a_404_once_every_pool_knows_its_models():
    """Waiting for learning ends in 404 when the learned models do not include it, and a
    model unknown after learning is a 404 at once."""
    router = router_of(PoolSettings("p", (), ()))
    router.apply({"p": [Endpoint("e0", "http://10.0.0.1:8000")]})
    admit = waiting_admission(30.0)
    waiting = asyncio.ensure_future(admit.decide(passthrough_view("typo", "/v1/x"), router))
    await asyncio.sleep(0.05)
    router.set_models("p", ["m"])
    with pytest.raises(ModelNotFoundError):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(ModelNotFoundError):
        await asyncio.wait_for(admit.decide(passthrough_view("typo", "/v1/x"), router), 1)


async def test_a_client_that_leaves_while_waiting_is_counted_and_leaves_no_waiter():
    """Cancelling the wait (the client went away) is counted as gone."""
    router = router_of(PoolSettings("p", ("m",)))
    metrics = Metrics(CollectorRegistry(), process=False)
    waiting = asyncio.ensure_future(
        waiting_admission(30.0, metrics).decide(passthrough_view("m", "/v1/x"), router))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert waits(metrics, "no_endpoints", "gone") == 1
    assert metrics.registry.get_sample_value("balancer_empty_pool_waiting") == 0


async def test_at_shutdown_waiting_requests_get_their_503_at_once():
    """Closing wakes the waiting requests with a 503 rather than leave them to be cut off."""
    router = router_of(PoolSettings("p", ("m",)))
    metrics = Metrics(CollectorRegistry(), process=False)
    admit = waiting_admission(30.0, metrics)
    waiting = asyncio.ensure_future(admit.decide(passthrough_view("m", "/v1/x"), router))
    await asyncio.sleep(0.05)
    admit.close(router)
    with pytest.raises(NoEndpointsError):
        await asyncio.wait_for(waiting, 5)
    assert waits(metrics, "no_endpoints", "shutdown") == 1
