"""Retry budget, Retry-After parsing, and where a retry goes."""

from __future__ import annotations

import pytest

from balancer.config import PoolSettings, RoutingSettings, Strategy
from balancer.endpoints import Endpoint
from balancer.retry import RetryBudget, parse_retry_after
from balancer.ring import hash_key
from balancer.router import Pool


def test_budget_allows_the_minimum_then_the_ratio_of_requests():
    """With 0 requests only the floor is allowed; 100 requests at 20% allow 20."""
    budget = RetryBudget(ratio=0.2, window=10, min_retries=3)
    assert [budget.spend(0.5) for _ in range(4)] == [True, True, True, False]
    for _ in range(100):
        budget.request(1.0)
    allowed = sum(budget.spend(1.5) for _ in range(50))
    assert allowed == 20 - 3


def test_budget_window_slides():
    """Requests and retries older than the window no longer count."""
    budget = RetryBudget(ratio=0.2, window=10, min_retries=1)
    assert budget.spend(0.0)
    assert not budget.spend(5.0)
    assert budget.spend(11.0)


@pytest.mark.parametrize(("value", "expected"), [
    (None, 1.0), (b"7", 7.0), ("2.5", 2.5), (b"-3", 0.0), (b"99999", 60.0), (b"soon", 1.0),
    (b"nan", 1.0), ("Thu, 01 Jan 1970 00:00:30 GMT", 20.0),
])
def test_retry_after_is_seconds_or_a_date_within_the_cap(value, expected):
    assert parse_retry_after(value, now_epoch=10.0, default=1.0, cap=60.0) == expected


def _pool(strategy: Strategy = Strategy.CHWBL) -> Pool:
    pool = Pool(PoolSettings("p", ("m",)), RoutingSettings(strategy=strategy, virtual_nodes=64))
    pool.set_endpoints(Endpoint(f"e{i}", f"http://10.0.0.{i}:8000") for i in range(5))
    return pool


def test_chwbl_retry_goes_to_the_next_distinct_endpoint_on_the_walk():
    """Excluding the endpoints tried gives the next ones in ring order, in turn."""
    pool = _pool()
    for i in range(50):
        key = hash_key(f"k{i}")
        walk = list(pool.ring.walk(key))
        tried: set[str] = set()
        for expected in walk:
            choice = pool.choose(key, exclude=frozenset(tried))
            assert choice.endpoint == expected
            tried.add(choice.endpoint)


@pytest.mark.parametrize("strategy", [Strategy.LEAST_REQUEST, Strategy.ROUND_ROBIN,
                                      Strategy.RANDOM])
def test_other_strategies_never_pick_an_excluded_endpoint(strategy):
    pool = _pool(strategy)
    for _ in range(50):
        assert pool.choose(0, exclude=frozenset({"e0", "e1", "e2"})).endpoint in {"e3", "e4"}
