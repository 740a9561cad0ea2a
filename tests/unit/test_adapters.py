"""Models served by some endpoints only: the subset ring cache, per-endpoint model sets in a
pool, the model-not-found 404 and the LoRA gauge in a vLLM exposition."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from balancer.config import (
    LoadSettings,
    LoadSource,
    ModelDiscoverySettings,
    PoolSettings,
    RoutingSettings,
    Settings,
)
from balancer.config import Strategy as StrategyName
from balancer.endpoints import Endpoint
from balancer.errors import NoEndpointsError
from balancer.forward import model_not_found
from balancer.load import LoadReport
from balancer.loadpoll import lora_adapters
from balancer.models import STALE_REFRESH_INTERVAL, ModelLearner
from balancer.prefix import Kind
from balancer.ring import HashRing, RingCache, hash_key
from balancer.route import decide, explain, keyed_view, redecide
from balancer.router import Pool, Router
from balancer.strategy import chwbl_bound

BASE = "llama"
IDS = [f"vllm-{i}" for i in range(4)]


def learning_pool(models: dict[str, set[str]] | None = None, *, seed: int = 0,
                  load: LoadSettings | None = None, **routing: Any) -> Pool:
    """A pool that learns its models, with IDS as endpoints and ``models`` as each one's
    report (endpoint id -> models; missing ones not heard from)."""
    routing.setdefault("virtual_nodes", 64)
    pool = Pool(PoolSettings("p", ()), RoutingSettings(**routing), random.Random(seed),
                load=load)
    pool.set_endpoints(Endpoint(i, f"http://10.0.0.{n}:8000") for n, i in enumerate(IDS))
    for endpoint_id, served in (models or {}).items():
        pool.set_endpoint_models(endpoint_id, frozenset(served))
    pool.models = tuple(sorted(set().union(*(models or {}).values())))
    pool._update_subsets()
    return pool


SERVED = {
    "vllm-0": {BASE, "sql", "code"},
    "vllm-1": {BASE, "chat", "code"},
    "vllm-2": {BASE, "chat"},
    "vllm-3": {BASE, "code"},
}


# -- the ring cache -------------------------------------------------------------------------


def test_a_member_set_gets_one_ring_built_once() -> None:
    cache = RingCache(virtual_nodes=16)
    ring = cache.ring(frozenset({"a", "b"}))
    assert cache.ring(frozenset({"b", "a"})) is ring
    assert ring.members == {"a", "b"}
    assert len(cache) == 1


def test_keep_drops_rings_of_sets_no_longer_in_use() -> None:
    cache = RingCache(virtual_nodes=16)
    ab, bc = frozenset({"a", "b"}), frozenset({"b", "c"})
    ring_ab = cache.ring(ab)
    cache.ring(bc)
    cache.keep([ab])
    assert ab in cache and bc not in cache
    assert cache.ring(ab) is ring_ab


def test_ring_cache_refuses_zero_virtual_nodes() -> None:
    with pytest.raises(ValueError, match="virtual_nodes"):
        RingCache(virtual_nodes=0)


@given(st.sets(st.sampled_from([f"e{i}" for i in range(8)]), min_size=1),
       st.lists(st.text(max_size=20), min_size=1, max_size=20))
def test_a_cached_ring_routes_as_a_ring_built_from_scratch(members: set[str],
                                                           keys: list[str]) -> None:
    """The ring depends on the member ids only (not on insertion or set order), so every
    replica seeing the same subset sends a key to the same endpoint."""
    cache = RingCache(virtual_nodes=8)
    ring = cache.ring(frozenset(members))
    fresh = HashRing(reversed(sorted(members)), virtual_nodes=8)
    for key in keys:
        assert ring.first(hash_key(key)) == fresh.first(hash_key(key))
        assert ring.first(hash_key(key)) in members


# -- a pool's subsets -----------------------------------------------------------------------


def test_models_served_by_every_endpoint_take_the_pools_own_ring() -> None:
    pool = learning_pool(SERVED)
    assert BASE not in pool.subsets
    assert pool.subsets["sql"].members == ("vllm-0",)
    assert pool.subsets["chat"].members == ("vllm-1", "vllm-2")
    assert pool.subsets["code"].members == ("vllm-0", "vllm-1", "vllm-3")
    assert pool.ring_for(BASE) is pool.ring
    assert pool.ring_for("chat").members == {"vllm-1", "vllm-2"}


def test_models_with_the_same_servers_share_one_subset_and_ring() -> None:
    served = {i: {BASE} for i in IDS}
    served["vllm-1"] |= {"a", "b"}
    served["vllm-2"] |= {"a", "b"}
    pool = learning_pool(served)
    assert pool.subsets["a"] is pool.subsets["b"]
    assert pool._rings is not None and len(pool._rings) == 1


@pytest.mark.parametrize("model", ["sql", "chat", "code"])
def test_keys_of_a_partial_model_go_only_to_its_endpoints(model: str) -> None:
    pool = learning_pool(SERVED)
    allowed = {i for i, served in SERVED.items() if model in served}
    seen = Counter(pool.choose(hash_key(f"key {k}"), model=model).endpoint
                   for k in range(300))
    assert set(seen) == allowed


def test_a_base_model_spreads_over_every_endpoint() -> None:
    pool = learning_pool(SERVED)
    seen = Counter(pool.choose(hash_key(f"key {k}"), model=BASE).endpoint for k in range(300))
    assert set(seen) == set(IDS)


def test_the_bound_is_taken_over_the_subset_and_overflow_stays_in_it() -> None:
    """The subset's average load sets the bound; a busy first choice overflows to another
    endpoint serving the model, never to one that does not."""
    pool = learning_pool(SERVED)
    pool.assume_load({"vllm-0": 0, "vllm-1": 5, "vllm-2": 0, "vllm-3": 9})
    for k in range(100):
        choice = pool.choose(hash_key(f"k{k}"), model="chat")
        assert choice.endpoint in {"vllm-1", "vllm-2"}
        routing = pool.routing
        assert choice.bound == chwbl_bound(5, 2, routing.load_factor, routing.min_bound)
    pool.assume_load({"vllm-1": 20})
    choices = {pool.choose(hash_key(f"k{k}"), model="chat").endpoint for k in range(100)}
    assert choices == {"vllm-2"}


def test_queue_routing_reads_the_subsets_queues() -> None:
    pool = learning_pool(SERVED, load=LoadSettings(source=LoadSource.REPORTS))
    pool.assume_report("vllm-1", LoadReport(waiting=50.0, running=1.0))
    pool.assume_report("vllm-2", LoadReport(waiting=0.0, running=1.0))
    choice = pool.choose(hash_key("x"), model="chat")
    assert choice.signal == "queue" and choice.endpoint == "vllm-2"


def test_exclude_within_a_subset_leaves_the_others_and_then_none() -> None:
    pool = learning_pool(SERVED)
    first = pool.choose(hash_key("x"), model="chat").endpoint
    other = ({"vllm-1", "vllm-2"} - {first}).pop()
    assert pool.choose(hash_key("x"), model="chat",
                       exclude=frozenset({first})).endpoint == other
    with pytest.raises(NoEndpointsError, match="serves model 'chat'"):
        pool.choose(hash_key("x"), model="chat", exclude=frozenset({"vllm-1", "vllm-2"}))


@pytest.mark.parametrize("strategy", [StrategyName.LEAST_REQUEST, StrategyName.ROUND_ROBIN,
                                      StrategyName.RANDOM])
def test_keyless_strategies_pick_within_the_subset(strategy: StrategyName) -> None:
    pool = learning_pool(SERVED, strategy=strategy)
    seen = {pool.choose(hash_key(f"k{k}"), model="code").endpoint for k in range(60)}
    assert seen == {"vllm-0", "vllm-1", "vllm-3"}


def test_passthrough_requests_naming_a_model_pick_within_the_subset() -> None:
    pool = learning_pool(SERVED)
    seen = {pool.choose(0, keyed=False, model="chat").endpoint for _ in range(60)}
    assert seen == {"vllm-1", "vllm-2"}


def test_an_endpoint_not_heard_from_serves_every_model_until_it_is() -> None:
    served = {i: SERVED[i] for i in ("vllm-0", "vllm-1", "vllm-2")}
    pool = learning_pool(served)
    assert pool.subsets["chat"].members == ("vllm-1", "vllm-2", "vllm-3")
    assert pool.set_endpoint_models("vllm-3", frozenset({BASE}))
    assert pool.subsets["chat"].members == ("vllm-1", "vllm-2")
    assert not pool.set_endpoint_models("vllm-3", frozenset({BASE}))


def test_a_model_no_routable_endpoint_serves_is_unavailable_not_misrouted() -> None:
    pool = learning_pool(SERVED)
    pool.set_out(frozenset({"vllm-0"}))
    assert pool.subsets["sql"].members == ()
    with pytest.raises(NoEndpointsError):
        pool.choose(hash_key("x"), model="sql")
    pool.set_out(frozenset())
    assert pool.subsets["sql"].members == ("vllm-0",)


def test_dropping_a_model_from_an_endpoint_reroutes_it() -> None:
    pool = learning_pool(SERVED)
    assert pool.drop_endpoint_model("vllm-1", "chat")
    assert pool.subsets["chat"].members == ("vllm-2",)
    assert not pool.drop_endpoint_model("vllm-1", "chat")
    assert not pool.drop_endpoint_model("vllm-9", "chat")


def test_adapters_seen_are_added_only_to_endpoints_already_heard_from() -> None:
    served = {i: SERVED[i] for i in ("vllm-0", "vllm-1", "vllm-2")}
    pool = learning_pool(served)
    assert pool.add_endpoint_models("vllm-2", frozenset({"sql"}))
    assert pool.subsets["sql"].members == ("vllm-0", "vllm-2", "vllm-3")
    assert not pool.add_endpoint_models("vllm-2", frozenset({"sql"}))
    assert not pool.add_endpoint_models("vllm-3", frozenset({"sql"}))  # base not known yet
    assert pool.states["vllm-3"].models is None


def test_an_endpoint_leaving_updates_the_subsets() -> None:
    pool = learning_pool(SERVED)
    pool.set_endpoints(Endpoint(i, f"http://10.0.0.{n}:8000")
                       for n, i in enumerate(IDS) if i != "vllm-2")
    assert pool.subsets["chat"].members == ("vllm-1",)
    assert pool._rings is not None
    assert frozenset({"vllm-1", "vllm-2"}) not in pool._rings


def test_a_pool_with_configured_models_has_no_subsets() -> None:
    pool = Pool(PoolSettings("p", (BASE,)), RoutingSettings(virtual_nodes=16))
    pool.set_endpoints(Endpoint(i, f"http://10.0.0.{n}:8000") for n, i in enumerate(IDS))
    pool.set_endpoint_models("vllm-0", frozenset({BASE, "sql"}))
    assert pool.subsets == {}
    assert pool.choose(hash_key("x"), model=BASE).endpoint in IDS


@given(st.dictionaries(st.sampled_from(IDS),
                       st.sets(st.sampled_from(["a", "b", "c", BASE]), min_size=1)),
       st.frozensets(st.sampled_from(IDS)), st.sampled_from(["a", "b", "c", BASE]),
       st.integers(0, 2**64 - 1))
def test_a_choice_for_a_model_is_an_endpoint_that_serves_it_or_is_unknown(
        served: dict[str, set[str]], out: frozenset[str], model: str, key_hash: int) -> None:
    pool = learning_pool(served)
    assume(model in pool.models)  # others are refused before a pool is asked (404)
    pool.set_out(out)
    try:
        choice = pool.choose(key_hash, model=model)
    except NoEndpointsError:
        assert not any(model in (pool.states[i].models or {model}) for i in pool.routable)
        return
    assert choice.endpoint in pool.routable
    models = pool.states[choice.endpoint].models
    assert models is None or model in models


# -- the model-not-found 404 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "model", "expected"),
    [
        ({"object": "error", "message": "The model `sql` does not exist.",
          "type": "NotFoundError", "param": None, "code": 404}, "sql", True),
        ({"error": {"message": "The model `sql` does not exist.", "type": "NotFoundError",
                    "param": "model", "code": 404}}, "sql", True),
        ({"error": {"message": "LoRA adapter sql not found", "code": 404}}, "sql", True),
        ({"object": "error", "message": "The model `other` does not exist."}, "sql", False),
        ({"detail": "Not Found"}, "sql", False),
        ({"message": "Not Found"}, "sql", False),
        (["The model `sql` does not exist."], "sql", False),
        ({"message": 5}, "sql", False),
        ({"message": "The model `` does not exist."}, "", False),
    ],
)
def test_model_not_found_reads_vllms_404(body: object, model: str, expected: bool) -> None:
    assert model_not_found(json.dumps(body).encode(), model) is expected


@pytest.mark.parametrize("payload", [b"", b"not json", b"[" * 100_000, b"\xff\xfe",
                                     b'{"message": "sql does not exist"' + b" " * 70_000 + b"}"])
def test_model_not_found_is_false_for_unreadable_bodies(payload: bytes) -> None:
    assert model_not_found(payload, "sql") is False


# -- vLLM's LoRA gauge ----------------------------------------------------------------------

EXPOSITION = """\
# vLLM keeps a series per state it logged, valued with the time it was set.
# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 0.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.5e+09
vllm:lora_requests_info{running_lora_adapters="sql,chat",waiting_lora_adapters="code"} 1.7e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.6e+09
vllm:lora_requests_info_other{running_lora_adapters="nope"} 2e+09
"""


def test_lora_adapters_reads_the_newest_series() -> None:
    assert lora_adapters(EXPOSITION) == {"sql", "chat", "code"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", set()),
        ('vllm:num_requests_waiting{model_name="llama"} 0.0\n', set()),
        ('vllm:lora_requests_info{running_lora_adapters="a, b ,",max_lora="1"} 1\n',
         {"a", "b"}),
        ('vllm:lora_requests_info{running_lora_adapters="a\\"b",waiting_lora_adapters="c"} 1\n',
         {'a"b', "c"}),
        ('vllm:lora_requests_info{running_lora_adapters="a"} NaN\n', set()),
        ('vllm:lora_requests_info{running_lora_adapters="a"\n', set()),
        ('vllm:lora_requests_info 1\n', set()),
        ('# vllm:lora_requests_info{running_lora_adapters="a"} 1\n', set()),
        ('vllm:lora_requests_info{running_lora_adapters="a"} 1 1700000000000', {"a"}),
    ],
)
def test_lora_adapters_reads_samples_as_the_format_defines_them(text: str,
                                                                 expected: set[str]) -> None:
    assert lora_adapters(text) == expected


def test_lora_adapters_agrees_with_prometheus_clients_own_writer() -> None:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    gauge = Gauge("vllm:lora_requests_info", "lora", ["max_lora", "waiting_lora_adapters",
                                                      "running_lora_adapters"],
                  registry=registry)
    gauge.labels("2", "", "x").set(100.0)
    gauge.labels("2", "w1", "r1,r2").set(200.0)
    text = generate_latest(registry).decode()
    assert lora_adapters(text) == {"w1", "r1", "r2"}


# -- the router, explanations and the learner -----------------------------------------------


def learning_router() -> Router:
    router = Router(Settings(pools=(PoolSettings("p", ()),),
                             routing=RoutingSettings(virtual_nodes=32)))
    pool = router.pools["p"]
    pool.set_endpoints(Endpoint(i, f"http://10.0.0.{n}:8000") for n, i in enumerate(IDS))
    for endpoint_id, served in SERVED.items():
        pool.set_endpoint_models(endpoint_id, frozenset(served))
    router.set_models("p", set().union(*SERVED.values()))
    return router


def test_an_explanation_walks_the_models_own_ring() -> None:
    router = learning_router()
    view = keyed_view(Kind.CHAT, {"model": "chat", "messages": [
        {"role": "user", "content": "hello there"}]}, None)
    decision = decide(view, router)
    assert decision.model == "chat"
    explained = explain(decision, view=view)
    assert {step["endpoint"] for step in explained["ring_walk"]} == {"vllm-1", "vllm-2"}
    assert explained["endpoint"] in {"vllm-1", "vllm-2"}


def test_a_retry_for_a_missing_model_stays_among_its_endpoints() -> None:
    router = learning_router()
    view = keyed_view(Kind.CHAT, {"model": "code", "messages": [
        {"role": "user", "content": "x"}]}, None)
    decision = decide(view, router)
    asked: list[tuple[str, str]] = []
    router.on_models_stale = lambda pool, endpoint_id: asked.append((pool.name, endpoint_id))
    router.model_missing(decision.pool, decision.choice.endpoint, "code")
    assert asked == [("p", decision.choice.endpoint)]
    following = redecide(decision, frozenset({decision.choice.endpoint}))
    assert following.model == "code"
    assert following.choice.endpoint in {"vllm-0", "vllm-1", "vllm-3"} - {
        decision.choice.endpoint}


async def test_the_learner_asks_a_stale_endpoint_again_at_most_every_interval() -> None:
    router = learning_router()
    learner = ModelLearner(router, ModelDiscoverySettings())
    pool = router.pools["p"]
    learner.stale(pool, "vllm-1")
    learner.stale(pool, "vllm-1")
    learner.stale(pool, "vllm-2")
    assert learner._stale == {("p", "vllm-1"), ("p", "vllm-2")}
    learner._stale.clear()
    learner.stale(pool, "vllm-1")  # within STALE_REFRESH_INTERVAL of the first
    assert learner._stale == set()
    learner._stale_at[("p", "vllm-1")] -= STALE_REFRESH_INTERVAL
    learner.stale(pool, "vllm-1")
    assert learner._stale == {("p", "vllm-1")}


async def test_adapters_seen_join_the_pools_models() -> None:
    router = learning_router()
    learner = ModelLearner(router, ModelDiscoverySettings())
    pool = router.pools["p"]
    learner.adapters_seen(pool, "vllm-3", frozenset({"fresh"}))
    assert router.pool_for_model("fresh") is pool
    assert pool.subsets["fresh"].members == ("vllm-3",)
