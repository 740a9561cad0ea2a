"""The pure health state machines and their effect on ring membership."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from balancer.config import (
    ConfigError,
    HealthSettings,
    PoolSettings,
    RoutingSettings,
    Settings,
    validate,
)
from balancer.endpoints import Endpoint
from balancer.health import (
    Capped,
    EndpointHealth,
    Failure,
    ejection_cap,
    ejection_limit,
)
from balancer.logs import Throttle
from balancer.metrics import Metrics
from balancer.monitor import HealthMonitor
from balancer.ring import hash_key
from balancer.router import Pool
from balancer.strategy import Choice

SETTINGS = HealthSettings(consecutive_failures=3, ejection_time=5.0, max_ejection_time=30.0,
                          unhealthy_threshold=2, healthy_threshold=2)


def test_consecutive_failures_eject_and_a_success_resets_the_count():
    """Three failures in a row eject; a success between them starts the count again."""
    health = EndpointHealth()
    assert health.failed(Failure.STATUS, 0.0, SETTINGS) is None
    assert health.failed(Failure.TIMEOUT, 0.1, SETTINGS) is None
    health.succeeded()
    assert health.failed(Failure.RESET, 0.2, SETTINGS) is None
    assert health.failed(Failure.RESET, 0.3, SETTINGS) is None
    ejection = health.failed(Failure.RESET, 0.4, SETTINGS)
    assert ejection is not None and ejection.seconds == 5.0
    assert health.is_out


def test_a_refused_connection_ejects_at_once():
    """Nothing listens: one connect error is enough."""
    health = EndpointHealth()
    ejection = health.failed(Failure.CONNECT, 0.0, SETTINGS)
    assert ejection is not None and ejection.cause is Failure.CONNECT
    assert health.is_out


def test_back_off_doubles_on_failed_trials_up_to_the_cap_and_a_trial_success_returns():
    """Each failed half-open trial doubles the ejection (5, 10, 20, 30 capped); a passed
    trial brings the endpoint back for good."""
    health = EndpointHealth()
    now = 0.0
    seen = []
    for _ in range(4):
        ejection = health.failed(Failure.CONNECT, now, SETTINGS)
        assert ejection is not None
        seen.append(ejection.seconds)
        assert health.expire(now + ejection.seconds - 0.01) is False
        now += ejection.seconds
        assert health.expire(now) is True
        assert not health.is_out
    assert seen == [5.0, 10.0, 20.0, 30.0]
    assert health.succeeded() is True
    assert health.trial is False
    # Off trial, one non-connect failure no longer ejects.
    assert health.failed(Failure.STATUS, now + 1, SETTINGS) is None


def test_failures_while_ejected_do_not_extend_the_ejection():
    """Requests that started before the ejection and fail after it change nothing."""
    health = EndpointHealth()
    health.failed(Failure.CONNECT, 0.0, SETTINGS)
    assert health.failed(Failure.RESET, 1.0, SETTINGS) is None
    assert health.ejected_until == 5.0


def test_active_checks_need_thresholds_both_ways():
    """Two failed checks take an endpoint out; two passed checks bring it back."""
    health = EndpointHealth()
    assert health.checked(True, SETTINGS) is False
    assert health.checked(False, SETTINGS) is False
    assert health.checked(False, SETTINGS) is True
    assert health.is_out
    assert health.checked(True, SETTINGS) is False
    assert health.checked(True, SETTINGS) is True
    assert not health.is_out


def test_the_pool_takes_serving_endpoints_whose_health_is_out_off_the_ring():
    """update_out reads each endpoint state's health: out ones leave the ring."""
    pool = _pool(3)
    pool.states["e1"].health.failed(Failure.CONNECT, 0.0, SETTINGS)
    pool.update_out()
    assert pool.routable == ("e0", "e2")
    pool.states["e1"].health.expire(10.0)
    pool.update_out()
    assert pool.routable == ("e0", "e1", "e2")


def _pool(n: int) -> Pool:
    pool = Pool(PoolSettings("p", ("m",)), RoutingSettings(virtual_nodes=256))
    pool.set_endpoints(Endpoint(f"e{i}", f"http://10.0.0.{i}:8000") for i in range(n))
    return pool


def test_ejection_only_moves_the_keys_of_the_ejected_endpoint():
    """Out and back: keys of other endpoints never move, and the ejected one's come back."""
    pool = _pool(5)
    keys = [hash_key(f"key-{i}") for i in range(2000)]
    before = {k: pool.choose(k).endpoint for k in keys}
    pool.set_out(frozenset({"e2"}))
    during = {k: pool.choose(k).endpoint for k in keys}
    assert all(during[k] == before[k] for k in keys if before[k] != "e2")
    assert "e2" not in during.values()
    pool.set_out(frozenset())
    assert {k: pool.choose(k).endpoint for k in keys} == before


@pytest.mark.parametrize(("out", "panic"), [(1, False), (2, False), (3, True), (4, True)])
def test_panic_mode_routes_across_the_whole_pool_when_more_than_half_is_out(out, panic):
    """Of 4 endpoints, 2 out is tolerated; 3 out is panic: all 4 routable again."""
    pool = _pool(4)
    pool.set_out(frozenset(f"e{i}" for i in range(out)))
    assert pool.panic is panic
    assert len(pool.routable) == (4 if panic else 4 - out)


# -- the cap on passive ejection ----------------------------------------------------------


@pytest.mark.parametrize(
    ("serving", "percent", "limit"),
    [
        (0, 10.0, 1), (1, 10.0, 1), (2, 10.0, 1), (4, 10.0, 1), (9, 10.0, 1), (19, 10.0, 1),
        (20, 10.0, 2), (39, 10.0, 3), (100, 10.0, 10),
        (2, 50.0, 1), (3, 50.0, 1), (4, 50.0, 2), (5, 50.0, 2),
        (3, 34.0, 1), (4, 12.5, 1), (8, 12.5, 1), (16, 12.5, 2),
        (4, 100.0, 4), (1, 100.0, 1), (7, 0.5, 1),
    ],
)
def test_ejection_limit_is_the_percentage_rounded_down_but_at_least_one(
        serving, percent, limit):
    """10% of 2-19 endpoints is one (never none: one dead pod must be ejectable), of 20 it
    is two; 100% caps nothing."""
    assert ejection_limit(serving, percent) == limit


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2000), st.integers(1, 100))
def test_ejection_limit_for_whole_percentages_is_exact(serving, percent):
    """No rounding error at the boundaries: the limit is floor(n * p / 100) in integers."""
    assert ejection_limit(serving, float(percent)) == max(1, serving * percent // 100)


def _healths(ejected: int, active_out: int = 0, healthy: int = 0) -> list[EndpointHealth]:
    """Serving endpoints' health: ``ejected`` passively ejected, ``active_out`` failing
    their checks, ``healthy`` in service."""
    out = [EndpointHealth(ejected_until=100.0) for _ in range(ejected)]
    out += [EndpointHealth(check_down=True) for _ in range(active_out)]
    return out + [EndpointHealth() for _ in range(healthy)]


def test_the_first_ejection_of_a_small_pool_is_allowed_and_the_second_is_capped():
    """4 serving endpoints at 10%: the first may go, the second is held back with the
    numbers that forbid it."""
    pool = _healths(0, healthy=4)
    assert ejection_cap(pool, pool[0], 10.0) is None
    pool[0].ejected_until = 100.0
    assert ejection_cap(pool, pool[1], 10.0) == Capped(serving=4, ejected=1, limit=1)


def test_at_fifty_percent_half_the_pool_may_be_ejected():
    pool = _healths(1, healthy=3)
    assert ejection_cap(pool, pool[1], 50.0) is None
    pool[1].ejected_until = 100.0
    assert ejection_cap(pool, pool[2], 50.0) == Capped(4, 2, 2)


def test_endpoints_out_on_active_checks_do_not_count_towards_the_cap():
    """Only passive ejections use up the cap: three failing their checks leave room."""
    pool = _healths(0, active_out=3, healthy=1)
    assert ejection_cap(pool, pool[3], 10.0) is None


def test_the_candidate_never_counts_against_itself():
    """An endpoint whose ejection ended but whose timer has not run yet is not counted
    when it fails again."""
    pool = _healths(1, healthy=3)
    assert ejection_cap(pool, pool[0], 10.0) is None


def test_an_endpoint_that_is_not_serving_may_always_be_ejected():
    """A draining endpoint is off the ring already: ejecting it takes nothing out."""
    pool = _healths(1, healthy=3)
    draining = EndpointHealth()
    assert ejection_cap(pool, draining, 10.0) is None


def test_a_spared_endpoint_needs_a_new_run_of_failures():
    """Over the cap: the failure count starts again, so the next try needs another
    consecutive_failures; on trial it stays on trial, so its next failure tries again."""
    health = EndpointHealth()
    for t in (0.0, 0.1):
        assert health.due(Failure.STATUS, t, SETTINGS) is False
    assert health.due(Failure.STATUS, 0.2, SETTINGS) is True
    health.spare()
    assert not health.is_out and health.failures == 0
    assert health.due(Failure.STATUS, 0.3, SETTINGS) is False

    on_trial = EndpointHealth(trial=True)
    assert on_trial.due(Failure.STATUS, 0.0, SETTINGS) is True
    on_trial.spare()
    assert on_trial.trial and on_trial.due(Failure.STATUS, 0.1, SETTINGS) is True


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("fail"), st.integers(0, 11), st.sampled_from(list(Failure))),
        st.tuples(st.just("ok"), st.integers(0, 11), st.just(None)),
        st.tuples(st.just("tick"), st.floats(0.0, 20.0), st.just(None)),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.sampled_from([1.0, 10.0, 25.0, 33.3, 50.0, 100.0]), EVENTS)
def test_passive_ejection_never_holds_out_more_than_the_limit(n, percent, events):
    """Any sequence of failures, successes and time: the passively ejected endpoints never
    exceed the limit, and while none is ejected a due ejection always happens."""
    s = replace(SETTINGS, max_ejection_percent=percent)
    pool = [EndpointHealth() for _ in range(n)]
    limit = ejection_limit(n, percent)
    now = 0.0
    for kind, value, failure in events:
        if kind == "tick":
            now += value
            for health in pool:
                health.expire(now)
        elif kind == "ok":
            pool[int(value) % n].succeeded()
        else:
            health = pool[int(value) % n]
            assert failure is not None
            if not health.due(failure, now, s):
                continue
            none_out = not any(h.ejected_until for h in pool if h is not health)
            if ejection_cap(pool, health, percent) is None:
                health.eject(failure, now, s)
            else:
                assert not none_out
                health.spare()
        assert sum(1 for h in pool if h.ejected_until) <= limit


def test_the_throttle_lets_one_through_per_interval_and_counts_the_rest():
    throttle = Throttle(10.0)
    assert throttle.allow(0.0) == 0
    assert throttle.allow(1.0) is None
    assert throttle.allow(9.9) is None
    assert throttle.allow(10.0) == 2
    assert throttle.allow(15.0) is None
    assert throttle.allow(30.0) == 1
    assert throttle.allow(40.0) == 0


@pytest.mark.parametrize("value", [0.0, -1.0, 100.5, float("nan"), float("inf")])
def test_max_ejection_percent_out_of_range_is_rejected_naming_the_key(value):
    settings = Settings(pools=(PoolSettings("p", ("m",), ("http://h:1",)),),
                        health=HealthSettings(max_ejection_percent=value))
    with pytest.raises(ConfigError, match=r"health\.max_ejection_percent"):
        validate(settings)


@pytest.mark.parametrize("value", [0.01, 10.0, 100.0])
def test_max_ejection_percent_in_range_is_accepted(value):
    validate(Settings(pools=(PoolSettings("p", ("m",), ("http://h:1",)),),
                      health=HealthSettings(max_ejection_percent=value)))


def _fail(monitor: HealthMonitor, pool: Pool, endpoint: str, failure: Failure) -> None:
    lease = pool.acquire(Choice(endpoint, "primary"))
    lease.failure = failure
    monitor.observe(lease)
    lease.release()


async def test_the_monitor_ejects_up_to_the_cap_then_counts_and_throttles_the_rest(caplog):
    """Three of four endpoints refuse connections: one is ejected; the others stay on the
    ring, each held-back ejection counted, one log line per interval saying how many."""
    pool = _pool(4)
    registry = CollectorRegistry()
    metrics = Metrics(registry, process=False)
    monitor = HealthMonitor(SETTINGS, {"p": pool}, metrics)
    caplog.set_level(logging.WARNING, logger="balancer.health")
    for _ in range(5):
        for endpoint in ("e0", "e1", "e2"):
            _fail(monitor, pool, endpoint, Failure.CONNECT)
    await asyncio.sleep(0)
    assert pool.out == frozenset({"e0"}) and not pool.panic
    assert pool.routable == ("e1", "e2", "e3")
    skipped = registry.get_sample_value("balancer_pool_ejections_skipped_total",
                                        {"pool": "p", "reason": "max_ejection_percent",
                                         "cause": "connect"})
    assert skipped == 10
    # Every held-back ejection came within one log interval (10 s): one line.
    lines = [r.getMessage() for r in caplog.records if "not ejecting" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "1 of 4 serving endpoints are ejected already" in lines[0]
    await monitor.close()
