"""The routing decision shared by the proxy, /debug/route and `balancer route`."""

from __future__ import annotations

from typing import Any

import pytest

from balancer.affinity import Pin
from balancer.config import (
    BackendSettings,
    KeyMode,
    PoolSettings,
    RouteSettings,
    RoutingSettings,
    Settings,
    validate,
)
from balancer.discovery import StaticDiscovery
from balancer.errors import BadRequestError, ModelNotFoundError, NoEndpointsError
from balancer.prefix import Kind, routing_key
from balancer.ring import hash_key
from balancer.route import (
    KEYED_PATHS,
    RequestView,
    decide,
    explain,
    keyed_view,
    kind_for,
    passthrough_view,
    redecide,
)
from balancer.router import Router

CHAT = {"model": "llama", "messages": [{"role": "system", "content": "Be terse."},
                                       {"role": "user", "content": "Hello there"}]}


def router(*pools: PoolSettings, **routing: Any) -> Router:
    settings = validate(Settings(
        pools=pools or (PoolSettings("chat", ("llama",),
                                     tuple(f"http://10.0.0.{i}:8000" for i in range(1, 5))),),
        routing=RoutingSettings(virtual_nodes=64, **routing)))
    routed = Router(settings)
    routed.apply(StaticDiscovery(settings.pools).snapshot())
    return routed


@pytest.mark.parametrize(
    ("kind", "body", "session", "key", "source"),
    [
        (Kind.CHAT, CHAT, None, "llama\x00Hello there", "first-user-message"),
        (Kind.COMPLETIONS, {"model": "llama", "prompt": "Once upon"}, None,
         "llama\x00Once upon", "first-user-message"),
        (Kind.COMPLETIONS, {"model": "llama", "prompt": ["first", "second"]}, None,
         "llama\x00first", "first-user-message"),
        (Kind.EMBEDDINGS, {"model": "llama", "input": "embed me"}, None,
         "llama\x00embed me", "first-user-message"),
        (Kind.CHAT, CHAT, "s-1", "session\x00s-1", "session"),
        (Kind.CHAT, {**CHAT, "user": "u-9"}, None, "user\x00u-9", "session"),
        (Kind.CHAT, {**CHAT, "user": "u-9"}, "s-1", "session\x00s-1", "session"),
    ],
)
def test_a_keyed_request_gets_its_key_its_hash_and_the_rings_choice(
        kind: Kind, body: dict[str, Any], session: str | None, key: str, source: str) -> None:
    """The key comes from the session header, else the body's user, else the prefix; the
    endpoint is the first one on the ring walk of its hash (an idle pool)."""
    routed = router()
    decision = decide(keyed_view(kind, body, session), routed)
    assert (decision.key, decision.key_source, decision.key_hash) == (key, source,
                                                                      hash_key(key))
    assert decision.keyed and decision.session is (source == "session")
    assert decision.pool is routed.pools["chat"]
    assert decision.choice.endpoint == next(decision.pool.ring.walk(decision.key_hash))
    assert decision.choice.outcome == ("session" if source == "session" else "primary")


def test_prompt_prefix_mode_keys_on_the_rendered_prompt() -> None:
    """With key=prompt-prefix the system prompt is part of the key."""
    decision = decide(keyed_view(Kind.CHAT, CHAT, None),
                      router(key=KeyMode.PROMPT_PREFIX, prefix_chars=20))
    assert decision.key == routing_key(Kind.CHAT, CHAT, KeyMode.PROMPT_PREFIX, 20)
    assert decision.key_source == "prompt-prefix"


def test_deciding_takes_no_load() -> None:
    """A decision reads the pool and changes nothing: no in-flight count is taken."""
    routed = router()
    decide(keyed_view(Kind.CHAT, CHAT, None), routed)
    assert routed.pools["chat"].total_load == 0
    assert set(routed.pools["chat"].load.values()) == {0}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({**CHAT, "model": "gpt-4"}, ModelNotFoundError),
        ({"model": "llama", "messages": []}, BadRequestError),
        ({**CHAT, "stream": "yes"}, BadRequestError),
    ],
)
def test_bad_requests_are_refused_before_any_choice(body: dict[str, Any],
                                                    error: type[Exception]) -> None:
    """Unknown models and malformed fields raise the error the proxy answers with."""
    with pytest.raises(error):
        decide(keyed_view(Kind.CHAT, body, None), router())


def test_a_pool_without_endpoints_has_no_decision() -> None:
    """Nothing routable: NoEndpointsError (a 503)."""
    routed = router()
    routed.apply({"chat": []})
    with pytest.raises(NoEndpointsError):
        decide(keyed_view(Kind.CHAT, CHAT, None), routed)


def test_passthrough_requests_go_to_the_named_models_pool_or_the_only_one() -> None:
    """A pass-through request is unkeyed; its model picks the pool, else the only pool."""
    two = router(PoolSettings("chat", ("llama",), ("http://10.0.0.1:8000",)),
                 PoolSettings("embed", ("bge",), ("http://10.0.0.2:8000",)))
    decision = decide(passthrough_view("bge", "/v1/tokenize"), two)
    assert (decision.pool.name, decision.key, decision.keyed) == ("embed", None, False)
    assert decision.choice.endpoint == "10.0.0.2:8000"
    with pytest.raises(BadRequestError, match="/v1/tokenize names no model"):
        decide(passthrough_view(None, "/v1/tokenize"), two)
    with pytest.raises(ModelNotFoundError):
        decide(passthrough_view("nope", "/v1/tokenize"), two)
    one = router()
    assert decide(passthrough_view(None, "/v1/x"), one).pool.name == "chat"


def test_redecide_walks_on_past_excluded_endpoints() -> None:
    """A retry's decision keeps the key and takes the next distinct endpoint on the walk."""
    routed = router()
    first = decide(keyed_view(Kind.CHAT, CHAT, None), routed)
    walk = list(first.pool.ring.walk(first.key_hash))
    second = redecide(first, frozenset(walk[:1]))
    assert (second.key, second.key_hash) == (first.key, first.key_hash)
    assert second.choice.endpoint == walk[1]
    assert second.choice.outcome == "primary"
    with pytest.raises(NoEndpointsError):
        redecide(first, frozenset(walk))


@pytest.mark.parametrize(
    ("body", "path", "kind"),
    [
        (CHAT, None, Kind.CHAT),
        ({"prompt": "x"}, None, Kind.COMPLETIONS),
        ({"input": "x"}, None, Kind.EMBEDDINGS),
        ({"input": [{"role": "user", "content": "x"}]}, None, Kind.RESPONSES),
        ({"input": "x", "instructions": "Be terse."}, None, Kind.RESPONSES),
        ({"input": "x", "previous_response_id": "resp_1"}, None, Kind.RESPONSES),
        ({"prompt": "x"}, "/v1/chat/completions", Kind.CHAT),
        *((CHAT, path, kind) for path, kind in KEYED_PATHS.items()),
    ],
)
def test_the_kind_comes_from_the_path_else_from_the_fields(
        body: dict[str, Any], path: str | None, kind: Kind) -> None:
    assert kind_for(body, path) is kind


def test_a_kind_that_cannot_be_told_is_a_bad_request() -> None:
    with pytest.raises(BadRequestError, match="no messages, prompt or input"):
        kind_for({"model": "llama"})
    with pytest.raises(BadRequestError, match="'/v1/models'"):
        kind_for(CHAT, "/v1/models")


def test_explain_describes_the_decision() -> None:
    """The explanation is the decision's: key, hash, walk, bound, endpoint and reason."""
    routed = router()
    decision = decide(keyed_view(Kind.CHAT, CHAT, None), routed)
    result = explain(decision, walk_limit=2)
    assert result["key"] == decision.key
    assert result["key_hash"] == f"{decision.key_hash:016x}"
    assert result["endpoint"] == decision.choice.endpoint
    assert result["url"] == f"http://{decision.choice.endpoint}"
    assert [s["endpoint"] for s in result["ring_walk"]] == list(
        decision.pool.ring.walk(decision.key_hash))[:2]
    assert (result["bound"], result["outcome"], result["strategy"]) == (2, "primary", "chwbl")
    assert result["probes"] == [{"endpoint": decision.choice.endpoint, "in_flight": 0}]


@pytest.mark.parametrize(("messages", "first"), [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], True),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "q"}], False),
])
def test_a_first_turn_is_a_chat_request_without_an_assistant_message(
        messages: list[dict[str, str]], first: bool) -> None:
    from balancer.route import is_first_turn

    assert is_first_turn({"messages": messages}) is first


FOLLOW_UP = {"model": "llama", "input": "and then?", "previous_response_id": "resp_1"}


def test_a_pinned_request_goes_to_the_endpoint_holding_its_response() -> None:
    """The endpoint that stored the response takes a request naming it, whatever its load
    and its key; once tried (or excluded) the key's walk takes over."""
    routed = router()
    view = keyed_view(Kind.RESPONSES, FOLLOW_UP, None)
    by_key = decide(view, routed).choice.endpoint
    holder = next(e for e in routed.pools["chat"].routable if e != by_key)
    routed.pools["chat"].assume_load({holder: 50})
    pinned = view._replace(pinned=Pin("chat", holder))
    decision = decide(pinned, routed)
    assert (decision.choice.endpoint, decision.choice.outcome) == (holder, "affinity")
    assert decision.key == "llama\x00and then?"
    again = redecide(decision, frozenset({holder}))
    assert again.choice.endpoint != holder and again.choice.outcome != "affinity"
    assert decide(pinned, routed, exclude=frozenset({holder})).choice.endpoint != holder
    explained = explain(decision, view=pinned)
    assert explained["outcome"] == "affinity" and "stored the response" in explained["reason"]


@pytest.mark.parametrize("pin", [Pin("other", "10.0.0.1:8000"), Pin("chat", "10.9.9.9:8000")],
                         ids=["another-pool", "gone"])
def test_a_pin_that_cannot_take_the_request_falls_back_to_the_key(pin: Pin) -> None:
    """A pin in another pool than the model's, or to an endpoint no longer routable, is
    ignored: the key decides."""
    routed = router()
    view = keyed_view(Kind.RESPONSES, FOLLOW_UP, None)
    assert decide(view._replace(pinned=pin), routed) == decide(view, routed)


def test_a_pinned_pass_through_request_picks_its_pool_without_a_model() -> None:
    """``GET /v1/responses/{id}`` names no model: a known id's pool is the pool, even with
    several; its endpoint takes it."""
    routed = router(PoolSettings("a", ("llama",), ("http://10.0.0.1:8000",)),
                    PoolSettings("b", ("mistral",), ("http://10.0.1.1:8000",
                                                     "http://10.0.1.2:8000")))
    view: RequestView = passthrough_view(None, "/v1/responses/resp_1",
                                         Pin("b", "10.0.1.2:8000"))
    decision = decide(view, routed)
    assert (decision.pool.name, decision.choice.endpoint) == ("b", "10.0.1.2:8000")
    assert decision.choice.outcome == "affinity"
    with pytest.raises(BadRequestError, match="several pools"):
        decide(passthrough_view(None, "/v1/responses/resp_1"), routed)


def test_a_pinned_request_for_a_route_goes_to_the_pool_of_the_chain_holding_it() -> None:
    """A route's conversation may live in any pool of its chain: the pinned endpoint's pool
    takes it (with the model name that pool serves), whatever the key's ranking; a pin
    outside the chain leaves the ranking to decide."""
    settings = validate(Settings(
        pools=(PoolSettings("a", ("llama-a",), ("http://10.0.0.1:8000",)),
               PoolSettings("b", ("llama-b",), ("http://10.0.1.1:8000",
                                                "http://10.0.1.2:8000"))),
        routes=(RouteSettings("chat", (BackendSettings("a"),), (BackendSettings("b"),)),),
        routing=RoutingSettings(virtual_nodes=64)))
    routed = Router(settings)
    routed.apply(StaticDiscovery(settings.pools).snapshot())
    view = keyed_view(Kind.RESPONSES, {**FOLLOW_UP, "model": "chat"}, None)
    assert decide(view, routed).pool.name == "a"
    pinned = decide(view._replace(pinned=Pin("b", "10.0.1.2:8000")), routed)
    assert (pinned.pool.name, pinned.choice.endpoint, pinned.choice.outcome) == (
        "b", "10.0.1.2:8000", "affinity")
    assert pinned.model == "llama-b" and pinned.hop == 1
    elsewhere = decide(view._replace(pinned=Pin("c", "10.0.9.9:8000")), routed)
    assert elsewhere.pool.name == "a" and elsewhere.choice.outcome != "affinity"
    get = decide(passthrough_view("chat", "/v1/responses/resp_1", Pin("b", "10.0.1.1:8000")),
                 routed)
    assert (get.pool.name, get.choice.endpoint) == ("b", "10.0.1.1:8000")
