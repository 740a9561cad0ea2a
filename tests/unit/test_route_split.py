"""Routes' pure core: the weighted split by key, the chain, and the model renames."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.ring import hash_key
from balancer.routes import Hop, ModelRename, Route, rename_model

KEYS = [hash_key(f"conversation {i}") for i in range(20_000)]


def split(route: Route) -> Counter[str]:
    return Counter(route.first(k).pool for k in KEYS)


def test_a_key_goes_to_each_backend_in_proportion_to_its_weight():
    route = Route("chat", [Hop("v2", "", 90), Hop("v3", "", 10)])
    shares = split(route)
    assert abs(shares["v3"] / len(KEYS) - 0.10) < 0.01
    three = split(Route("chat", [Hop("a", "", 1), Hop("b", "", 2), Hop("c", "", 5)]))
    for pool, weight in (("a", 1), ("b", 2), ("c", 5)):
        assert abs(three[pool] / len(KEYS) - weight / 8) < 0.015, three


def test_weights_are_unitless():
    assert split(Route("m", [Hop("a", "", 9), Hop("b", "", 1)])) == split(
        Route("m", [Hop("a", "", 90), Hop("b", "", 10)]))


def test_changing_one_weight_moves_conversations_only_into_or_out_of_that_backend():
    before = Route("m", [Hop("a", "", 50), Hop("b", "", 30), Hop("c", "", 20)])
    after = Route("m", [Hop("a", "", 50), Hop("b", "", 30), Hop("c", "", 40)])
    moved = Counter((before.first(k).pool, after.first(k).pool) for k in KEYS
                    if before.first(k).pool != after.first(k).pool)
    assert moved and all(dest == "c" for _, dest in moved), moved
    # The same weights in another order split the same way (seeded by pool name).
    shuffled = Route("m", [Hop("c", "", 20), Hop("a", "", 50), Hop("b", "", 30)])
    assert all(before.first(k).pool == shuffled.first(k).pool for k in KEYS[:2000])


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(0, 100), min_size=2, max_size=5),
       which=st.integers(0, 4), new=st.integers(0, 100))
def test_property_a_weight_change_moves_keys_only_to_or_from_its_backend(weights, which, new):
    if not any(weights):
        weights[0] = 1
    which %= len(weights)
    changed = list(weights)
    changed[which] = new
    if not any(changed):
        return
    names = [f"p{i}" for i in range(len(weights))]
    before = Route("m", [Hop(n, "", w) for n, w in zip(names, weights, strict=True)])
    after = Route("m", [Hop(n, "", w) for n, w in zip(names, changed, strict=True)])
    for key in KEYS[:300]:
        a, b = before.first(key).pool, after.first(key).pool
        assert a == b or names[which] in (a, b)


def test_weight_zero_takes_no_new_conversation_but_stays_in_the_chain():
    route = Route("m", [Hop("old", "", 1), Hop("new", "", 0)], [Hop("small", "m-small")])
    assert set(split(route)) == {"old"}
    chain = route.chain(KEYS[0])
    assert [h.pool for h in chain] == ["old", "new", "small"]


def test_the_chain_is_the_ranking_then_the_fallbacks_once_each():
    route = Route("m", [Hop("a", "", 1), Hop("b", "", 1)], [Hop("b", ""), Hop("c", "")])
    firsts = set()
    for key in KEYS[:200]:
        chain = [h.pool for h in route.chain(key)]
        assert sorted(chain[:2]) == ["a", "b"] and chain[2:] == ["c"]
        assert chain[0] == route.first(key).pool
        firsts.add(chain[0])
    assert firsts == {"a", "b"}
    assert route.pools() == ("a", "b", "c")


def test_rename_model_sets_only_the_top_level_model():
    body = json.dumps({"model": "chat", "messages": [
        {"role": "user", "content": '{"model": "chat"} is how you ask, ünïcode'}],
        "temperature": 0.7, "tools": [{"model": "chat"}]}).encode()
    out = json.loads(rename_model(body, "meta-llama/Llama-3.1-8B"))
    assert out["model"] == "meta-llama/Llama-3.1-8B"
    assert out["messages"][0]["content"] == '{"model": "chat"} is how you ask, ünïcode'
    assert out["tools"] == [{"model": "chat"}] and out["temperature"] == 0.7
    assert list(out) == ["model", "messages", "temperature", "tools"]
    with pytest.raises((ValueError, TypeError)):
        rename_model(b"[1, 2]", "x")


def answer(served: str) -> bytes:
    events = [{"id": "c", "model": served, "choices": [{"delta": {"content":
               f'the "model":"{served}" text'}}]} for _ in range(3)]
    compact = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n"
                       for e in events)
    spaced = b"data: " + json.dumps(events[0]).encode() + b"\n\n"
    return compact + spaced + b"data: [DONE]\n\n"


def test_a_whole_answer_is_renamed_and_strings_inside_are_not():
    rename = ModelRename("llama-3", "chat")
    out = rename.whole(answer("llama-3"))
    assert out.count(b'"model":"chat"') == 3 and out.count(b'"model": "chat"') == 1
    assert b'"model":"llama-3"' not in out and b'"model": "llama-3"' not in out
    # The same text inside a content string (its quotes escaped) is left alone.
    assert out.count(b'the \\"model\\":\\"llama-3\\" text') == 4


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(1, 600), max_size=12),
       served=st.sampled_from(["llama-3", "m", "org/model-v2 ü"]))
def test_property_chunked_renaming_equals_whole_renaming(cuts, served):
    """However the answer is cut into chunks, the bytes written are the whole rename."""
    payload = answer(served)
    rename = ModelRename(served, "chat")
    expected = ModelRename(served, "chat").whole(payload)
    points = sorted({min(c, len(payload)) for c in cuts})
    pieces = [payload[a:b] for a, b in zip([0, *points], [*points, len(payload)], strict=True)]
    out = b"".join(rename.feed(p) for p in pieces if p) + rename.end()
    assert out == expected


def test_nothing_is_held_back_at_an_event_boundary():
    rename = ModelRename("llama-3", "chat")
    assert rename.feed(b'data: {"model":"llama-3"}\n\n') == b'data: {"model":"chat"}\n\n'
    assert rename.feed(b'data: {"model":"lla') == b'data: {'
    assert rename.feed(b'ma-3"}\n\n') == b'"model":"chat"}\n\n'
    assert rename.end() == b""
