"""Pools and the router: endpoint snapshots, draining, leases and in-flight bookkeeping."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from balancer.config import PoolSettings, RoutingSettings, Settings
from balancer.config import Strategy as StrategyName
from balancer.endpoints import Endpoint
from balancer.errors import ModelNotFoundError, NoEndpointsError
from balancer.ring import HashRing, hash_key
from balancer.router import Lease, Pool, Router, make_strategy
from balancer.strategy import BoundedLoad, LeastRequest, Random, RoundRobin, chwbl_bound
from balancer.upstream import Connector

CHAT_POOL = PoolSettings("chat", ("llama", "mistral"))
EMBED_POOL = PoolSettings("embed", ("bge",))


def ep(i: int, *, serving: bool = True, port: int = 8000) -> Endpoint:
    return Endpoint(f"vllm-{i}", f"http://10.0.0.{i}:{port}", serving=serving)


def make_pool(n: int = 0, *, seed: int = 0, **routing: Any) -> Pool:
    routing.setdefault("virtual_nodes", 64)
    pool = Pool(CHAT_POOL, RoutingSettings(**routing), random.Random(seed))
    if n:
        pool.set_endpoints(ep(i) for i in range(n))
    return pool


def take(pool: Pool, key: str = "hot prefix", **kwargs: Any) -> Lease:
    return pool.acquire(pool.choose(hash_key(key), **kwargs))


def routable_sum(pool: Pool) -> int:
    return sum(pool.load.get(i, 0) for i in pool.routable)


# -- strategies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (StrategyName.CHWBL, BoundedLoad),
        (StrategyName.LEAST_REQUEST, LeastRequest),
        (StrategyName.ROUND_ROBIN, RoundRobin),
        (StrategyName.RANDOM, Random),
    ],
)
def test_each_configured_strategy_name_builds_its_strategy(name: StrategyName, cls: type) -> None:
    """The routing.strategy setting selects the strategy class a pool uses."""
    strategy = make_strategy(RoutingSettings(strategy=name), HashRing(), random.Random(0))
    assert isinstance(strategy, cls)


def test_chwbl_is_built_with_the_configured_factor_floor_and_the_pools_ring() -> None:
    """A CHWBL pool's strategy reads c and min_bound from settings and walks the pool's ring."""
    pool = make_pool(load_factor=1.5, min_bound=3)
    assert isinstance(pool.strategy, BoundedLoad)
    assert (pool.strategy.load_factor, pool.strategy.min_bound) == (1.5, 3)
    assert pool.strategy.ring is pool.ring
    assert pool.ring.virtual_nodes == 64


def test_keyless_requests_use_least_request_whatever_the_strategy() -> None:
    """choose(keyed=False) probes two endpoints and takes the less loaded one."""
    pool = make_pool(4)
    busy = take(pool)
    for _ in range(50):
        choice = pool.choose(0, keyed=False)
        assert len(choice.probes) == 2
        assert choice.endpoint == min(choice.probes, key=lambda p: p.load).endpoint
    busy.release()


# -- endpoint snapshots --------------------------------------------------------------------


def test_a_first_snapshot_makes_its_serving_endpoints_routable() -> None:
    """The first endpoint set is a change; its serving endpoints join the ring sorted by id."""
    pool = make_pool()
    assert pool.set_endpoints([ep(2), ep(0), ep(1)]) is True
    assert pool.routable == ("vllm-0", "vllm-1", "vllm-2")
    assert pool.ring.members == frozenset(pool.routable)
    assert pool.load == {"vllm-0": 0, "vllm-1": 0, "vllm-2": 0}


def test_an_unchanged_snapshot_changes_nothing_and_leaves_the_ring_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same endpoints again, in any order and as new objects, are not a change."""
    pool = make_pool(3)
    shares = pool.ring.shares()
    updates: list[object] = []
    monkeypatch.setattr(HashRing, "update", lambda self, ids: updates.append(ids))
    assert pool.set_endpoints([ep(2), ep(1), ep(0)]) is False
    assert updates == []
    assert pool.ring.shares() == shares


def test_a_changed_url_is_a_change_but_keeps_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new URL for the same id updates the endpoint without moving any key."""
    pool = make_pool(2)
    updates: list[object] = []
    monkeypatch.setattr(HashRing, "update", lambda self, ids: updates.append(ids))
    assert pool.set_endpoints([ep(0), ep(1, port=9000)]) is True
    assert pool.endpoints["vllm-1"].url == "http://10.0.0.1:9000"
    assert updates == []


@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param([ep(0)], [ep(0), ep(1, serving=False)], id="draining-endpoint-added"),
        pytest.param([ep(0), ep(1, serving=False)], [ep(0)], id="draining-endpoint-removed"),
        pytest.param([ep(0), ep(1)], [ep(0), ep(1, serving=False)], id="endpoint-starts-draining"),
        pytest.param([ep(0), ep(1, serving=False)], [ep(0), ep(1)], id="endpoint-serves-again"),
        pytest.param([ep(0)], [ep(0), ep(1)], id="endpoint-added"),
        pytest.param([ep(0), ep(1)], [ep(1)], id="endpoint-removed"),
        pytest.param([ep(0)], [], id="pool-emptied"),
    ],
)
def test_any_difference_in_the_endpoint_set_is_reported_as_a_change(
    before: list[Endpoint], after: list[Endpoint]
) -> None:
    """Adding, removing, draining or restoring an endpoint makes set_endpoints return True."""
    pool = make_pool()
    pool.set_endpoints(before)
    assert pool.set_endpoints(after) is True
    assert pool.set_endpoints(after) is False


def test_a_removed_endpoint_leaves_the_ring_and_its_idle_count_is_forgotten() -> None:
    """An idle endpoint that disappears is gone from the ring and from the load table."""
    pool = make_pool(3)
    pool.set_endpoints([ep(0), ep(2)])
    assert pool.routable == ("vllm-0", "vllm-2")
    assert "vllm-1" not in pool.ring
    assert "vllm-1" not in pool.load


# -- draining ------------------------------------------------------------------------------


def test_a_draining_endpoint_takes_no_new_requests() -> None:
    """An endpoint with serving=False is never chosen, whatever the key or load."""
    pool = make_pool()
    pool.set_endpoints([ep(0), ep(1, serving=False), ep(2)])
    assert pool.routable == ("vllm-0", "vllm-2")
    leases = [take(pool, f"key {i}") for i in range(300)]
    assert "vllm-1" not in {lease.endpoint.id for lease in leases}
    assert pool.load["vllm-1"] == 0


def test_a_draining_endpoint_keeps_its_in_flight_count_until_released() -> None:
    """Requests running on an endpoint that starts draining are still counted where they run."""
    pool = make_pool(2)
    lease = take(pool, "k")
    busy = lease.endpoint.id
    other = next(i for i in pool.routable if i != busy)
    pool.set_endpoints([Endpoint(busy, lease.endpoint.url, serving=False), pool.endpoints[other]])
    assert pool.routable == (other,)
    assert pool.load[busy] == 1
    assert pool.total_load == 0  # the average is over routable endpoints only
    lease.release()
    assert pool.load[busy] == 0
    assert pool.total_load == 0


def test_an_endpoint_that_left_keeps_its_count_until_its_last_request_ends() -> None:
    """A vanished endpoint's in-flight count lives until released, then is dropped."""
    pool = make_pool(2)
    lease = take(pool, "k")
    gone = lease.endpoint.id
    pool.set_endpoints([e for e in (ep(0), ep(1)) if e.id != gone])
    assert pool.load[gone] == 1
    assert gone not in pool.endpoints
    lease.release()
    assert gone not in pool.load
    assert pool.total_load == 0


def test_an_endpoint_serving_again_brings_its_in_flight_count_back_into_the_total() -> None:
    """When a draining endpoint with requests returns, the total counts them again."""
    pool = make_pool(2)
    lease = take(pool, "k")
    busy = lease.endpoint.id
    others = [ep(i) for i in range(2) if f"vllm-{i}" != busy]
    pool.set_endpoints([*others, Endpoint(busy, lease.endpoint.url, serving=False)])
    assert pool.total_load == 0
    pool.set_endpoints([*others, lease.endpoint])
    assert pool.total_load == 1
    lease.release()
    assert pool.total_load == 0


def test_a_pool_with_only_draining_endpoints_has_nothing_to_offer() -> None:
    """choose raises a 503 NoEndpointsError naming the pool when nothing is routable."""
    pool = make_pool()
    pool.set_endpoints([ep(0, serving=False)])
    with pytest.raises(NoEndpointsError, match="'chat'") as caught:
        pool.choose(hash_key("k"))
    assert caught.value.status == 503
    with pytest.raises(NoEndpointsError):
        pool.choose(0, keyed=False)


@pytest.mark.parametrize("strategy", list(StrategyName))
def test_an_empty_pool_raises_no_endpoints_for_every_strategy(strategy: StrategyName) -> None:
    """Every strategy turns an empty pool into NoEndpointsError, not None or a crash."""
    with pytest.raises(NoEndpointsError):
        make_pool(strategy=strategy).choose(hash_key("k"))


# -- leases --------------------------------------------------------------------------------


def test_acquiring_counts_the_request_on_its_endpoint_and_in_the_total() -> None:
    """A lease adds one in-flight request to its endpoint and to the pool total."""
    pool = make_pool(3)
    lease = take(pool)
    assert pool.load[lease.endpoint.id] == 1
    assert pool.total_load == 1
    assert lease.endpoint == pool.endpoints[lease.choice.endpoint]


def test_releasing_a_lease_twice_counts_it_once() -> None:
    """release is idempotent: the second call does not lower the counts again."""
    pool = make_pool(3)
    first, second = take(pool), take(pool)
    assert first.endpoint == second.endpoint
    first.release()
    first.release()
    assert first.released
    assert pool.load[first.endpoint.id] == 1
    assert pool.total_load == 1
    second.release()
    assert pool.total_load == 0


def test_a_lease_used_as_a_context_manager_releases_on_exit_even_on_error() -> None:
    """Leaving a `with lease:` block, normally or by an exception, releases it once."""
    pool = make_pool(2)
    with pytest.raises(RuntimeError), take(pool) as lease:
        assert pool.total_load == 1
        raise RuntimeError("upstream broke")
    assert lease.released
    assert pool.total_load == 0
    lease.release()
    assert pool.total_load == 0


class PoolMachine(RuleBasedStateMachine):
    """Random snapshots, acquisitions and (double) releases against a CHWBL pool."""

    leases = Bundle("leases")

    @initialize(seed=st.integers(0, 2**16), min_bound=st.integers(1, 3))
    def start(self, seed: int, min_bound: int) -> None:
        self.pool = make_pool(seed=seed, min_bound=min_bound)
        self.held: Counter[str] = Counter()

    @rule(members=st.dictionaries(st.integers(0, 5), st.booleans(), max_size=6))
    def snapshot(self, members: dict[int, bool]) -> None:
        self.pool.set_endpoints([ep(i, serving=serving) for i, serving in members.items()])

    @rule(target=leases, key=st.integers(0, 50), keyed=st.booleans())
    def acquire(self, key: int, keyed: bool) -> Lease | None:
        pool = self.pool
        if not pool.routable:
            with pytest.raises(NoEndpointsError):
                pool.choose(hash_key(str(key)), keyed=keyed)
            return None
        choice = pool.choose(hash_key(str(key)), keyed=keyed)
        assert choice.endpoint in pool.routable
        if keyed:
            bound = chwbl_bound(pool.total_load, len(pool.routable), pool.routing.load_factor,
                                pool.routing.min_bound)
            assert choice.outcome in ("primary", "overflow")
            assert pool.load[choice.endpoint] < bound
        lease = pool.acquire(choice)
        self.held[lease.endpoint.id] += 1
        return lease

    @rule(lease=consumes(leases))
    def release(self, lease: Lease | None) -> None:
        if lease is not None:
            lease.release()
            self.held[lease.endpoint.id] -= 1
            lease.release()

    @invariant()
    def total_is_the_sum_over_routable_endpoints(self) -> None:
        assert self.pool.total_load == routable_sum(self.pool)

    @invariant()
    def counts_match_unreleased_leases(self) -> None:
        for endpoint_id, load in self.pool.load.items():
            assert load == self.held[endpoint_id] >= 0
        for endpoint_id, count in self.held.items():
            if count:
                assert self.pool.load[endpoint_id] == count
        assert set(self.pool.endpoints) <= set(self.pool.load)
        for endpoint_id in set(self.pool.load) - set(self.pool.endpoints):
            assert self.pool.load[endpoint_id] > 0


TestPoolBookkeeping = PoolMachine.TestCase
TestPoolBookkeeping.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- the load bound through the pool -------------------------------------------------------


@pytest.mark.parametrize(("min_bound", "endpoints_used"), [(1, 3), (4, 1)])
def test_the_bound_floor_keeps_a_hot_key_together_in_a_pool_of_200(
    min_bound: int, endpoints_used: int
) -> None:
    """Three concurrent requests for one prefix share an endpoint unless the floor is 1."""
    pool = make_pool(200, min_bound=min_bound, virtual_nodes=16)
    leases = [take(pool, "hot") for _ in range(3)]
    assert len({lease.endpoint.id for lease in leases}) == endpoints_used
    assert leases[0].choice.outcome == "primary"


async def test_a_hot_key_under_concurrent_load_spreads_without_passing_the_bound() -> None:
    """Interleaved requests for one prefix overflow along the ring but never over the bound."""
    pool = make_pool(8, min_bound=1)
    rng = random.Random(5)
    peak: Counter[str] = Counter()

    async def request(i: int) -> None:
        await asyncio.sleep(0)
        bound = chwbl_bound(pool.total_load, len(pool.routable), pool.routing.load_factor, 1)
        with take(pool, "a very popular system prompt") as lease:
            assert pool.load[lease.endpoint.id] <= bound
            peak[lease.endpoint.id] = max(peak[lease.endpoint.id], pool.load[lease.endpoint.id])
            for _ in range(rng.randrange(1, 20)):
                await asyncio.sleep(0)

    await asyncio.gather(*(request(i) for i in range(200)))
    assert len(peak) > 1
    assert pool.total_load == 0
    assert set(pool.load.values()) == {0}


# -- the router ----------------------------------------------------------------------------


def two_pool_settings(**routing: Any) -> Settings:
    routing.setdefault("virtual_nodes", 64)
    return Settings(pools=(CHAT_POOL, EMBED_POOL), routing=RoutingSettings(**routing))


def test_each_model_maps_to_the_pool_that_serves_it() -> None:
    """Model names resolve to their pool, and the router lists them all."""
    router = Router(two_pool_settings())
    assert router.pool_for_model("llama").name == "chat"
    assert router.pool_for_model("mistral").name == "chat"
    assert router.pool_for_model("bge").name == "embed"
    assert router.models == ("llama", "mistral", "bge")


def test_an_unknown_model_is_a_404_that_lists_the_known_models() -> None:
    """Asking for a model no pool serves names it and the models that exist."""
    router = Router(two_pool_settings())
    with pytest.raises(ModelNotFoundError) as caught:
        router.pool_for_model("gpt-4")
    error = caught.value
    assert (error.status, error.param) == (404, "model")
    assert "'gpt-4'" in error.message
    assert "Known models: llama, mistral, bge" in error.message


def test_the_default_pool_exists_only_when_there_is_one_pool() -> None:
    """Requests without a model go to the only pool, or nowhere if there are several."""
    assert Router(Settings(pools=(CHAT_POOL,))).default_pool() is not None
    assert Router(two_pool_settings()).default_pool() is None


def test_applying_a_snapshot_reports_the_pools_that_changed() -> None:
    """apply returns changed pool names and ignores pools it does not know."""
    router = Router(two_pool_settings())
    assert router.apply({"chat": [ep(0)], "embed": [ep(1)], "ghost": [ep(2)]}) == [
        "chat",
        "embed",
    ]
    assert router.apply({"chat": [ep(0)], "embed": [ep(1), ep(3)]}) == ["embed"]
    assert router.apply({"chat": [ep(0)]}) == []


def test_the_router_is_ready_only_when_every_pool_can_route() -> None:
    """ready() needs a routable endpoint in each pool; draining ones do not count."""
    router = Router(two_pool_settings())
    assert not router.ready()
    router.apply({"chat": [ep(0)]})
    assert not router.ready()
    router.apply({"embed": [ep(1, serving=False)]})
    assert not router.ready()
    router.apply({"embed": [ep(1)]})
    assert router.ready()
    router.apply({"chat": []})
    assert not router.ready()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    steps=st.lists(st.tuples(st.integers(0, 30), st.booleans(), st.booleans()), max_size=50),
)
def test_two_routers_from_the_same_settings_make_identical_choices(
    n: int, seed: int, steps: list[tuple[int, bool, bool]]
) -> None:
    """Separately built routers, fed endpoints in different orders, agree on every choice."""
    endpoints = [ep(i) for i in range(n)]
    shuffled = endpoints[:]
    random.Random(seed).shuffle(shuffled)
    first = Router(two_pool_settings(min_bound=1), random.Random(1))
    second = Router(two_pool_settings(min_bound=1), random.Random(2))
    first.apply({"chat": endpoints})
    for endpoint in shuffled:  # the second learns its endpoints one at a time
        second.apply({"chat": shuffled[: shuffled.index(endpoint) + 1]})
    held: list[tuple[Lease, Lease]] = []
    for key, keep, release_one in steps:
        a = first.pool_for_model("llama").choose(hash_key(f"key {key}"))
        b = second.pool_for_model("llama").choose(hash_key(f"key {key}"))
        assert a == b
        if keep:
            held.append((first.pools["chat"].acquire(a), second.pools["chat"].acquire(b)))
        if release_one and held:
            for lease in held.pop(key % len(held)):
                lease.release()


# -- endpoint states -----------------------------------------------------------------------


def test_each_endpoint_has_one_state_and_an_idle_one_that_leaves_has_none() -> None:
    """States follow the snapshots: one per endpoint, gone with an idle endpoint."""
    pool = make_pool(3)
    assert set(pool.states) == {"vllm-0", "vllm-1", "vllm-2"}
    state = pool.states["vllm-1"]
    pool.set_endpoints([ep(0), ep(2)])
    assert "vllm-1" not in pool.states
    assert not state.present


def test_a_busy_endpoint_that_leaves_keeps_its_state_until_its_last_request_ends() -> None:
    """The state outlives the endpoint while requests run on it, and no longer."""
    pool = make_pool(2)
    first, second = take(pool, "k"), take(pool, "k")
    gone = first.endpoint.id
    assert second.endpoint.id == gone
    pool.set_endpoints([e for e in (ep(0), ep(1)) if e.id != gone])
    state = pool.states[gone]
    assert not state.present and state.in_flight == 2
    first.release()
    assert pool.states[gone] is state
    second.release()
    assert gone not in pool.states


def test_an_endpoint_back_before_its_last_request_ended_keeps_its_state() -> None:
    """Leaving and coming back while busy is the same endpoint: same state, same count."""
    pool = make_pool(2)
    lease = take(pool, "k")
    busy = lease.endpoint.id
    state = pool.states[busy]
    pool.set_endpoints([e for e in (ep(0), ep(1)) if e.id != busy])
    pool.set_endpoints([ep(0), ep(1)])
    assert pool.states[busy] is state and state.present
    lease.release()
    assert pool.states[busy] is state and state.in_flight == 0


def test_pauses_are_counted_expire_and_leave_with_their_endpoint() -> None:
    """A 429 pause skips the endpoint until its time; the count stays exact."""
    pool = make_pool(3)
    pool.pause("vllm-0", 10.0)
    pool.pause("vllm-0", 12.0)
    pool.pause("vllm-1", 5.0)
    assert pool.pauses == 2
    assert pool.paused(4.0) == {"vllm-0", "vllm-1"}
    assert pool.pause_left(4.0) == 1.0
    assert pool.paused(6.0) == {"vllm-0"} and pool.pauses == 1
    pool.set_endpoints([ep(1), ep(2)])
    assert pool.pauses == 0 and pool.paused(6.0) == frozenset()
    assert pool.pause_left(6.0) is None


async def test_a_new_url_gets_new_connections() -> None:
    """An endpoint that moves closes its idle connections and opens a pool to the new URL
    on its next request."""
    pool = make_pool(1)
    connector = Connector(connect_timeout=1)
    old = pool.states["vllm-0"].open(connector)
    pool.set_endpoints([ep(0, port=9000)])
    assert old.closed
    new = pool.states["vllm-0"].open(connector)
    assert new is not old and new.port == 9000
    new.close()


# -- routing on the pods' reported queues ------------------------------------------------------


def queue_pool(source: str = "auto", n: int = 4, **load: Any) -> Pool:
    """A pool of n endpoints routing on load ``source`` (auto by default here)."""
    from balancer.config import LoadSettings, LoadSource

    settings = LoadSettings(source=LoadSource(source), **load)
    pool = Pool(CHAT_POOL, RoutingSettings(virtual_nodes=64), random.Random(0), None, settings)
    pool.set_endpoints(ep(i) for i in range(n))
    return pool


def report_all(pool: Pool, waiting: dict[str, float], default: float = 0.0) -> None:
    from balancer.load import LoadReport

    for endpoint_id in pool.routable:
        pool.assume_report(endpoint_id, LoadReport(waiting=waiting.get(endpoint_id, default)))


def walk(pool: Pool, key: str = "hot prefix") -> list[str]:
    return list(pool.ring.walk(hash_key(key)))


def test_with_every_endpoint_reporting_the_bound_is_on_queues() -> None:
    pool = queue_pool()
    first = walk(pool)[0]
    report_all(pool, {})
    for _ in range(20):  # running requests never move a key whose pod does not queue
        take(pool).start()
    choice = pool.choose(hash_key("hot prefix"))
    assert (choice.endpoint, choice.outcome, choice.signal) == (first, "primary", "queue")
    assert choice.bound == 4  # min_queue: the pool queues nothing
    assert pool.signal() == "queue"


def test_a_queue_at_the_bound_overflows_along_the_ring() -> None:
    pool = queue_pool()
    first, second = walk(pool)[:2]
    report_all(pool, {first: 3.0})
    assert pool.choose(hash_key("hot prefix")).endpoint == first  # 3 + 1 <= 4
    report_all(pool, {first: 4.0})
    choice = pool.choose(hash_key("hot prefix"))
    assert (choice.endpoint, choice.outcome) == (second, "overflow")
    assert [p.load for p in choice.probes] == [4.0, 0.0]


def test_when_every_pod_queues_the_key_keeps_its_pod() -> None:
    """Moving a request costs its prefill elsewhere: when all pods queue alike, it stays."""
    pool = queue_pool()
    first = walk(pool)[0]
    report_all(pool, {}, default=10.0)
    choice = pool.choose(hash_key("hot prefix"))
    # ceil(1.5 * (40 + 1) / 4) = 16: ten queued everywhere is no imbalance
    assert (choice.endpoint, choice.outcome, choice.bound) == (first, "primary", 16)


def test_requests_sent_since_the_report_count_at_once() -> None:
    """A burst to one pod shows in the estimate before the pod's next report."""
    pool = queue_pool()
    first, second = walk(pool)[:2]
    report_all(pool, {})
    leases = [take(pool) for _ in range(4)]
    assert [lease.endpoint.id for lease in leases] == [first] * 4
    assert take(pool).endpoint.id == second  # first holds 4 unstarted requests
    for lease in leases:
        lease.start()  # they left the queue
    assert take(pool).endpoint.id == first


def test_auto_falls_back_to_in_flight_while_an_endpoint_has_no_fresh_report() -> None:
    from balancer.load import LoadReport

    pool = queue_pool()
    ids = list(pool.routable)
    for endpoint_id in ids[:-1]:
        pool.assume_report(endpoint_id, LoadReport(waiting=0.0))
    assert pool.signal() == "in-flight"
    assert pool.choose(hash_key("k")).signal == "in-flight"
    pool.assume_report(ids[-1], LoadReport(waiting=0.0))
    assert pool.signal() == "queue"
    for endpoint_id in ids:  # reports age out: back on in-flight counts
        pool.states[endpoint_id].queue.queue_at -= 10
    assert pool.signal() == "in-flight"


def test_reports_source_counts_unstarted_requests_where_no_report_is_fresh() -> None:
    pool = queue_pool("reports")
    first = walk(pool)[0]
    assert pool.signal() == "queue"
    queues = pool.queues()
    assert queues == {i: 0.0 for i in pool.routable}
    take(pool)
    assert pool.queues()[first] == 1.0


def test_local_source_never_routes_on_queues() -> None:
    pool = queue_pool("local")
    report_all(pool, {})
    assert pool.queue_strategy is None and pool.signal() == "in-flight"


def test_keyless_requests_stay_on_in_flight_counts() -> None:
    pool = queue_pool()
    report_all(pool, {})
    assert pool.choose(0, keyed=False).signal == "in-flight"


@given(st.lists(st.floats(0, 100), min_size=1, max_size=12), st.integers(0, 2**64 - 1))
def test_some_endpoint_is_always_within_the_queue_bound(queues: list[float], key: int) -> None:
    """CHWBL's guarantee holds on queues too: the walk ends within the bound, never in the
    fallback, whatever the reported queues."""
    pool = queue_pool(n=len(queues))
    report_all(pool, dict(zip(sorted(pool.routable), queues, strict=True)))
    choice = pool.choose(key)
    assert choice.outcome in ("primary", "overflow")
    assert choice.probes[-1].load + 1 <= choice.bound


def test_a_first_turn_moves_at_a_tighter_bound_than_an_established_conversation() -> None:
    """With first_turn_factor < queue_factor, a new conversation leaves a pod that queues
    more than its share while a later turn (its history cached there) stays."""
    pool = queue_pool(queue_factor=2.0, first_turn_factor=1.0, min_queue=1)
    first, second = walk(pool)[:2]
    report_all(pool, {first: 6.0}, default=2.0)  # total 12: ceil(2*13/4)=7, ceil(13/4)=4
    later = pool.choose(hash_key("hot prefix"))
    new = pool.choose(hash_key("hot prefix"), first_turn=True)
    assert (later.endpoint, later.outcome, later.bound) == (first, "primary", 7)
    assert (new.endpoint, new.outcome, new.bound) == (second, "overflow", 4)


def test_first_turns_follow_the_in_flight_rule_under_the_local_source() -> None:
    pool = queue_pool("local", first_turn_factor=1.0)
    assert pool.first_turn_strategy is None
    assert pool.choose(hash_key("hot prefix"), first_turn=True).signal == "in-flight"


# -- the last resort: terminating endpoints that still serve -------------------------------


def terminating(i: int) -> Endpoint:
    """An endpoint whose pod terminates but still serves (ready=false, serving=true)."""
    return Endpoint(f"vllm-{i}", f"http://10.0.0.{i}:8000", serving=False, terminating=True)


def test_terminating_endpoints_are_routable_only_while_no_endpoint_is_ready() -> None:
    """As kube-proxy: a pool whose every pod terminates keeps routing to those that still
    serve, and leaves them the moment a ready endpoint appears."""
    pool = make_pool()
    pool.set_endpoints([ep(0), terminating(1)])
    assert pool.routable == ("vllm-0",)
    pool.set_endpoints([terminating(1), terminating(2)])
    assert pool.routable == ("vllm-1", "vllm-2")
    assert take(pool).endpoint.id in {"vllm-1", "vllm-2"}
    pool.set_endpoints([terminating(1), ep(3)])
    assert pool.routable == ("vllm-3",)


def test_a_draining_endpoint_that_is_not_terminating_is_never_a_last_resort() -> None:
    """serving=True, ready=False without terminating is not what kube-proxy falls back to."""
    pool = make_pool()
    pool.set_endpoints([ep(0, serving=False)])
    assert pool.routable == ()


def test_with_every_ready_endpoint_out_panic_mode_wins_over_terminating_ones() -> None:
    """Health taking every serving endpoint out routes to all of them (panic), not to the
    terminating ones."""
    pool = make_pool()
    pool.set_endpoints([ep(0), ep(1), terminating(2)])
    pool.set_out(frozenset({"vllm-0", "vllm-1"}))
    assert pool.panic and pool.routable == ("vllm-0", "vllm-1")


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(0, 12), st.sampled_from(["ready", "terminating",
                                                             "unready"]), max_size=8))
def test_routable_is_the_ready_endpoints_else_the_terminating_ones(
        members: dict[int, str]) -> None:
    """For any mix of ready, terminating and not-ready endpoints."""
    pool = make_pool()
    made = {"ready": ep, "terminating": terminating,
            "unready": lambda i: ep(i, serving=False)}
    pool.set_endpoints([made[kind](i) for i, kind in members.items()])
    ready = sorted(f"vllm-{i}" for i, kind in members.items() if kind == "ready")
    last = sorted(f"vllm-{i}" for i, kind in members.items() if kind == "terminating")
    assert list(pool.routable) == (ready or last)
    assert pool.total_load == 0


async def test_the_router_announces_a_pools_first_endpoint_and_learned_models() -> None:
    """changed() returns when an empty pool gets an endpoint or a pool learns models, and
    not for changes that let no waiting request through."""
    router = Router(Settings(pools=(PoolSettings("chat", (), ()),),
                             routing=RoutingSettings(virtual_nodes=64)))
    assert router.learning()
    waiter = asyncio.ensure_future(router.changed())
    router.apply({"chat": [ep(0, serving=False)]})
    await asyncio.sleep(0)
    assert not waiter.done()
    router.apply({"chat": [ep(0)]})
    await asyncio.wait_for(waiter, 5)
    waiter = asyncio.ensure_future(router.changed())
    router.apply({"chat": [ep(0), ep(1)]})
    await asyncio.sleep(0)
    assert not waiter.done()
    router.set_models("chat", ["m"])
    await asyncio.wait_for(waiter, 5)
    assert not router.learning()
