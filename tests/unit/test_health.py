"""The pure health state machines and their effect on ring membership."""

from __future__ import annotations

import pytest

from balancer.config import HealthSettings, PoolSettings, RoutingSettings
from balancer.endpoints import Endpoint
from balancer.health import EndpointHealth, Failure
from balancer.ring import hash_key
from balancer.router import Pool

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
