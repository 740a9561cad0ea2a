"""A body's summary is what the request path read of the parsed body, whichever way it went.

Three ways must agree on every body, valid or not: the request path as it was before
summaries (parse, ``keyed_view``'s validation, then ``decide`` reading the key and the first
turn from the parsed body), :func:`read_keyed` on the event loop, and :func:`read_keyed` as a
worker process runs it (:func:`guarded`, its answer pickled and unpickled). The decision made
from a summary is the one made from the parsed body.
"""

from __future__ import annotations

import json
import pickle
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.config import KeyMode, PoolSettings, RoutingSettings, Settings, validate
from balancer.discovery import StaticDiscovery
from balancer.errors import BadRequestError, BalancerError, InvalidJSONError
from balancer.prefix import CHECKED_ITEMS, Kind, routing_key, session_key
from balancer.prefix import validate as validate_body
from balancer.route import decide, keyed_view, summarized_view
from balancer.router import Router
from balancer.summary import (
    KeyRule,
    Summary,
    guarded,
    is_first_response_turn,
    is_first_turn,
    read_keyed,
)

MODEL = "llama"

# -- the reference: the request path before summaries ----------------------------------------


def ref_parse(body: bytes) -> dict[str, Any]:
    """The proxy's body parse before summaries (``Proxy._parse_json``)."""
    if not body:
        raise InvalidJSONError("request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJSONError(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidJSONError(f"request body is not valid JSON: {e.msg} at line "
                               f"{e.lineno} column {e.colno}") from None
    except ValueError:
        raise InvalidJSONError(f"request body holds a number of more than "
                               f"{sys.get_int_max_str_digits()} digits") from None
    except RecursionError:
        raise InvalidJSONError("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequestError(f"request body must be a JSON object, not "
                              f"{type(data).__name__}")
    return data


def failure(exc: BalancerError) -> tuple[Any, ...]:
    return ("error", type(exc), exc.message, exc.param)


def reference(kind: Kind, raw: bytes, session: str | None, rule: KeyRule,
              first_turn: bool) -> tuple[Any, ...]:
    """Parse and validate (the handler and keyed_view), then the key and first turn as
    decide read them from the parsed body."""
    try:
        data = ref_parse(raw)
        validate_body(kind, data)
    except BalancerError as exc:
        return failure(exc)
    explicit = session_key(session, data)
    key: Any
    try:
        key = explicit or routing_key(kind, data, rule.mode, rule.prefix_chars,
                                      rule.min_key_chars)
    except BadRequestError as exc:
        key = failure(exc)
    responses = kind is Kind.RESPONSES
    first = (is_first_turn(data) if kind is Kind.CHAT
             else responses and is_first_response_turn(data))
    return ("ok", data["model"], data.get("stream") is True, key, explicit is not None,
            first_turn and first,
            data.get("previous_response_id") if responses else None,
            not responses or data.get("store") is not False)


def outcome(read: Any) -> tuple[Any, ...]:
    """What a read gave (a Summary, or the BalancerError it raised or returned), in the
    reference's terms."""
    if isinstance(read, BalancerError):
        return failure(read)
    assert isinstance(read, Summary)
    key: Any
    try:
        key = read.routing_key()
    except BadRequestError as exc:
        key = failure(exc)
    return ("ok", read.model, read.stream, key, read.session, read.first_turn,
            read.response_ref, read.store)


def on_loop(kind: Kind, raw: bytes, session: str | None, rule: KeyRule,
            first_turn: bool) -> tuple[Any, ...]:
    try:
        return outcome(read_keyed(kind, raw, session, rule, first_turn))
    except BalancerError as exc:
        return failure(exc)


def in_worker(kind: Kind, raw: bytes, session: str | None, rule: KeyRule,
              first_turn: bool) -> tuple[Any, ...]:
    """As a worker process answers: the guarded call, pickled there and unpickled here."""
    answer = guarded(read_keyed, kind, raw, session, rule, first_turn)
    return outcome(pickle.loads(pickle.dumps(answer)))


# -- generated bodies ---------------------------------------------------------------------------

texts = st.text(max_size=12)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": texts})}),
    st.fixed_dictionaries({"type": st.just("input_audio"),
                           "input_audio": st.fixed_dictionaries({"data": texts})}),
    texts, st.integers(), st.none(),
)
contents = st.one_of(st.none(), texts, st.lists(parts, max_size=3), st.integers(),
                     st.booleans())
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), st.integers(),
                  st.none())
messages = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": contents}),
    st.fixed_dictionaries({"content": contents}),
    texts, st.integers(),
)
ids = st.lists(st.integers(0, 200_000), max_size=6)
prompts = st.one_of(texts, st.lists(texts, max_size=3), ids, st.lists(ids, max_size=3),
                    st.lists(st.booleans(), max_size=2), st.lists(st.one_of(texts, st.integers()),
                                                                  max_size=3),
                    st.dictionaries(texts, texts, max_size=1), st.none(), st.integers())
bodies = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from([MODEL, "other"]), st.just(""), st.integers(),
                       st.none()),
    "stream": st.one_of(st.booleans(), st.none(), texts, st.integers()),
    "user": st.one_of(texts, st.none(), st.integers()),
    "messages": st.one_of(st.lists(messages, max_size=5), texts, st.none()),
    "prompt": prompts,
    "input": st.one_of(prompts, st.lists(messages, max_size=4)),
    "instructions": st.one_of(texts, st.none(), st.integers()),
    "previous_response_id": st.one_of(texts, st.none(), st.integers()),
    "store": st.one_of(st.booleans(), st.none(), texts),
    "max_tokens": st.integers(0, 10),
})


def long_chat(tail: list[Any], **extra: Any) -> bytes:
    """A chat whose first CHECKED_ITEMS messages are valid system messages, then ``tail``:
    what validation does not inspect and the first-user-message key still reads."""
    head = [{"role": "system", "content": "s"}] * CHECKED_ITEMS
    return json.dumps({"model": MODEL, "messages": head + tail, **extra}).encode()


SPECIAL = [
    long_chat([5, {"role": "user", "content": "late"}]),
    long_chat([{"role": 7}, {"role": "user", "content": "late"}]),
    long_chat([{"role": "user", "content": [3]}]),
    long_chat([{"role": "user", "content": "late"}, {"role": "assistant", "content": "a"}]),
    long_chat([5, {"role": "user", "content": "late"}], user="u-1"),
    json.dumps({"model": "other", "prompt": [[*range(CHECKED_ITEMS), True]]}).encode(),
    b'{"model": "llama", "prompt": [1' + b"7" * 5000 + b"]}",
    b'{"model": "llama", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model": "llama", "prompt": "\xff"}',
    b'{"model": "llama", "prompt": "x"',
    b"[1, 2]",
    b'"text"',
    b"",
    b"\xef\xbb\xbf{}",
]

raws = st.one_of(
    bodies.map(lambda b: json.dumps(b).encode()),
    bodies.map(lambda b: json.dumps(b).encode()[: max(1, len(json.dumps(b)) // 2)]),
    st.binary(max_size=20),
    st.sampled_from(SPECIAL),
)
rules = st.builds(KeyRule, st.sampled_from(list(KeyMode)), st.integers(1, 40),
                  st.integers(0, 16))
sessions = st.one_of(st.none(), st.just(""), texts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(Kind)), raw=raws, session=sessions, rule=rules,
       first_turn=st.booleans())
def test_a_summary_reads_what_the_request_path_read_of_the_parsed_body(
        kind: Kind, raw: bytes, session: str | None, rule: KeyRule, first_turn: bool) -> None:
    """Same model, stream flag, key (or the same error for it), session flag and first turn,
    or the same error with the same message and param, as parsing and keying did before."""
    assert on_loop(kind, raw, session, rule, first_turn) == reference(kind, raw, session, rule,
                                                                      first_turn)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(Kind)), raw=raws, session=sessions, rule=rules,
       first_turn=st.booleans())
def test_a_workers_answer_is_the_loops_answer(
        kind: Kind, raw: bytes, session: str | None, rule: KeyRule, first_turn: bool) -> None:
    """The function a worker runs, its answer through pickle, reads as the loop's own call:
    a 400 comes back with its class, message and param."""
    assert in_worker(kind, raw, session, rule, first_turn) == on_loop(kind, raw, session, rule,
                                                                      first_turn)


@pytest.mark.parametrize("raw", SPECIAL)
def test_every_kind_of_edge_body_reads_alike_in_every_mode(raw: bytes) -> None:
    """The edge bodies (a key that fails past validation, unreadable JSON, a non-object) in
    every kind, key mode, session and first-turn setting: loop, worker and reference agree."""
    for kind in Kind:
        for mode in KeyMode:
            for session in (None, "", "s-1"):
                for first_turn in (False, True):
                    rule = KeyRule(mode, 20, 8)
                    want = reference(kind, raw, session, rule, first_turn)
                    assert on_loop(kind, raw, session, rule, first_turn) == want
                    assert in_worker(kind, raw, session, rule, first_turn) == want


def test_an_error_travels_back_from_a_worker_whole() -> None:
    """A returned error keeps its class (status, type, metric reason), message and param."""
    answer = guarded(read_keyed, Kind.CHAT, b'{"model": "llama", "messages": 3}', None,
                     KeyRule(KeyMode.FIRST_USER_MESSAGE, 100, 0), False)
    back = pickle.loads(pickle.dumps(answer))
    assert isinstance(back, BadRequestError)
    assert (back.status, back.type, back.reason, back.message, back.param) == (
        400, "invalid_request_error", "bad_request",
        "'messages' must be a non-empty array of message objects", "messages")
    assert len(pickle.dumps(answer)) < 300


def router(**routing: Any) -> Router:
    settings = validate(Settings(
        pools=(PoolSettings("chat", (MODEL,),
                            tuple(f"http://10.0.0.{i}:8000" for i in range(1, 5))),),
        routing=RoutingSettings(virtual_nodes=64, **routing)))
    routed = Router(settings)
    routed.apply(StaticDiscovery(settings.pools).snapshot())
    return routed


ROUTERS = {mode: router(key=mode, prefix_chars=20, min_key_chars=8) for mode in KeyMode}


def decided(call: Any) -> tuple[Any, ...]:
    try:
        d = call()
    except BalancerError as exc:
        return failure(exc)
    return (d.pool.name, d.choice.endpoint, d.key, d.key_hash, d.key_source, d.first_turn)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(Kind)), raw=raws, session=sessions,
       mode=st.sampled_from(list(KeyMode)))
def test_the_decision_from_a_summary_is_the_decision_from_the_parsed_body(
        kind: Kind, raw: bytes, session: str | None, mode: KeyMode) -> None:
    """Pool, endpoint, key, hash, key source and first turn (this router routes first turns
    apart), or the same 400/404 in the same order (an unknown model before a key error)."""
    routed = ROUTERS[mode]
    rule = KeyRule.of(routed.routing)

    def from_body() -> Any:
        return decide(keyed_view(kind, ref_parse(raw), session), routed)

    def from_summary() -> Any:
        return decide(summarized_view(kind, read_keyed(kind, raw, session, rule, True),
                                      session), routed)

    assert decided(from_summary) == decided(from_body)


@pytest.mark.parametrize("raw", SPECIAL[:5])
def test_a_key_error_past_validation_still_comes_after_an_unknown_model(raw: bytes) -> None:
    """A body naming an unknown model is a 404 even when its key cannot be made."""
    routed = ROUTERS[KeyMode.FIRST_USER_MESSAGE]
    body = json.loads(raw)
    body["model"] = "gpt-9"
    raw = json.dumps(body).encode()
    summary = read_keyed(Kind.CHAT, raw, None, KeyRule.of(routed.routing), True)
    with pytest.raises(BalancerError) as caught:
        decide(summarized_view(Kind.CHAT, summary, None), routed)
    assert caught.value.status == 404
