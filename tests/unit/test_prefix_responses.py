"""Routing keys of Responses API bodies, their validation, and what the summary reads."""

from __future__ import annotations

from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import KeyMode
from balancer.errors import BadRequestError
from balancer.prefix import CHECKED_ITEMS, Kind, key_source, key_text, routing_key, validate
from balancer.summary import KeyRule, is_first_response_turn, read_keyed, summarize

FIRST_USER = KeyMode.FIRST_USER_MESSAGE
PROMPT_PREFIX = KeyMode.PROMPT_PREFIX
IMAGE = "data:image/png;base64," + "iVBORw0KGgo" * 50


def responses(value: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "llama", "input": value, **extra}


def message(role: str, content: Any) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": content}


def text(value: str) -> dict[str, Any]:
    return {"type": "input_text", "text": value}


KEY_TEXT_CASES = [
    ("a string input is the user message",
     responses("hello world, a question"), FIRST_USER, 100, 0, "hello world, a question"),
    ("cut to prefix_chars", responses("abcdefghij"), FIRST_USER, 4, 0, "abcd"),
    ("instructions stay out of the first-user key",
     responses("the question", instructions="You are terse."), FIRST_USER, 100, 0,
     "the question"),
    ("instructions lead the rendered key",
     responses("the question", instructions="You are terse."), PROMPT_PREFIX, 100, 0,
     "system:You are terse.\nuser:the question\n"),
    ("the first user message among items",
     responses([message("developer", "rules"), message("user", [text("first "), text("q")]),
                message("assistant", "answer")]), FIRST_USER, 100, 0, "first q"),
    ("an item without type is a message too",
     responses([{"role": "user", "content": "plain"}]), FIRST_USER, 100, 0, "plain"),
    ("a short first message goes on through two items",
     responses([message("user", "hi"), message("assistant", "Hello!"),
                message("user", "tell me"), message("assistant", "more")]), FIRST_USER, 100,
     10, "hi\nassistant:Hello!\nuser:tell me"),
    ("tool results render by their type",
     responses([message("user", "hi"),
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "42"}]),
     FIRST_USER, 100, 10, "hi\nfunction_call:{}\nfunction_call_output:42"),
    ("no user message: the rendered prompt",
     responses([{"type": "function_call_output", "call_id": "c", "output": "42"}],
               instructions="sys"), FIRST_USER, 100, 0, "system:sys\nfunction_call_output:42\n"),
    ("rendered items cut to prefix_chars",
     responses([message("user", "abcdef"), message("assistant", "ghijkl")]), PROMPT_PREFIX, 9,
     0, "user:abcd"),
]


@pytest.mark.parametrize(("body", "mode", "prefix_chars", "min_key_chars", "expected"),
                         [case[1:] for case in KEY_TEXT_CASES],
                         ids=[case[0] for case in KEY_TEXT_CASES])
def test_key_text_of_responses_bodies(body, mode, prefix_chars, min_key_chars, expected):
    """Each body shape keys on the text its mode says (and validates first)."""
    validate(Kind.RESPONSES, body)
    assert key_text(Kind.RESPONSES, body, mode, prefix_chars, min_key_chars) == expected
    assert key_source(Kind.RESPONSES, body, mode, prefix_chars, min_key_chars)


def test_attachments_key_by_a_hash_of_their_whole_reference():
    """Two images whose data URLs share their first hundred characters key apart; the same
    image keys alike; a file id and a nested audio payload count too."""
    def keyed(part: dict[str, Any]) -> str:
        body = responses([message("user", [text("look: "), part])])
        return key_text(Kind.RESPONSES, body, FIRST_USER, 1000)

    one, two = IMAGE + "A", IMAGE + "B"
    image_one = keyed({"type": "input_image", "image_url": one})
    assert image_one == keyed({"type": "input_image", "image_url": one})
    assert image_one != keyed({"type": "input_image", "image_url": two})
    digest = xxhash.xxh3_64_hexdigest(one.encode())
    assert image_one == f"look: <input_image:{digest}>"
    assert keyed({"type": "input_file", "file_id": "file-1"}) != keyed(
        {"type": "input_file", "file_id": "file-2"})
    assert keyed({"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}) != (
        keyed({"type": "input_audio", "input_audio": {"data": "BBB", "format": "wav"}}))


@settings(max_examples=150)
@given(value=st.text(max_size=300), prefix_chars=st.integers(1, 400),
       min_key_chars=st.integers(0, 100))
def test_a_string_input_keys_as_a_chat_with_that_user_message(value, prefix_chars,
                                                               min_key_chars):
    """``input: "..."`` and a chat whose only message is that user message get one key in
    either mode, so a client moving between the two APIs keeps its conversations' pods."""
    chat = {"model": "llama", "messages": [{"role": "user", "content": value}]}
    body = responses(value)
    for mode in (FIRST_USER, PROMPT_PREFIX):
        assert (routing_key(Kind.RESPONSES, body, mode, prefix_chars, min_key_chars)
                == routing_key(Kind.CHAT, chat, mode, prefix_chars, min_key_chars))


roles = st.sampled_from(["system", "developer", "user", "assistant"])
contents = st.text(max_size=80)


@settings(max_examples=150)
@given(items=st.lists(st.tuples(roles, contents), min_size=1, max_size=8),
       prefix_chars=st.integers(1, 300), min_key_chars=st.integers(0, 60))
def test_message_items_key_as_the_same_chat_messages(items, prefix_chars, min_key_chars):
    """A list of message items keys as the chat made of the same messages (first-user mode,
    and the rendered prefix too when there are no instructions); never longer than
    prefix_chars."""
    chat = {"model": "llama", "messages": [{"role": r, "content": c} for r, c in items]}
    body = responses([message(r, c) for r, c in items])
    for mode in (FIRST_USER, PROMPT_PREFIX):
        got = key_text(Kind.RESPONSES, body, mode, prefix_chars, min_key_chars)
        assert got == key_text(Kind.CHAT, chat, mode, prefix_chars, min_key_chars)
        assert len(got) <= prefix_chars


@settings(max_examples=100)
@given(items=st.lists(st.tuples(roles, contents), min_size=1, max_size=6),
       later=st.lists(st.tuples(roles, contents), max_size=6),
       prefix_chars=st.integers(1, 300))
def test_appending_items_never_changes_a_first_user_key(items, later, prefix_chars):
    """A client that resends its whole conversation (``store: false``) keeps its key as it
    appends items, once the first user message is long enough to key alone."""
    items = [("user", "x" * 70), *items]
    first = responses([message(r, c) for r, c in items])
    longer = responses([message(r, c) for r, c in items + later])
    assert (key_text(Kind.RESPONSES, first, FIRST_USER, prefix_chars, 64)
            == key_text(Kind.RESPONSES, longer, FIRST_USER, prefix_chars, 64))


INVALID = [
    ("no input", {"model": "llama"}, "input"),
    ("input a number", responses(3), "input"),
    ("an item not an object", responses(["hi"]), "input[0]"),
    ("a role not a string", responses([{"role": 1, "content": "x"}]), "input[0].role"),
    ("content not text or parts", responses([message("user", 5)]), "input[0].content"),
    ("a part not an object", responses([message("user", ["x"])]), "input[0].content[0]"),
    ("instructions not a string", responses("x", instructions=["a"]), "instructions"),
    ("previous_response_id empty", responses("x", previous_response_id=""),
     "previous_response_id"),
    ("previous_response_id a number", responses("x", previous_response_id=3),
     "previous_response_id"),
    ("store not a boolean", responses("x", store="yes"), "store"),
    ("stream not a boolean", responses("x", stream="yes"), "stream"),
    ("no model", {"input": "x"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_malformed_bodies_are_refused_naming_the_field(body, param):
    """Each malformed field is a 400 whose ``param`` names it."""
    with pytest.raises(BadRequestError) as caught:
        validate(Kind.RESPONSES, body)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_validation_inspects_a_bounded_number_of_items():
    """A malformed item past the checked ones is left to the model server; one the key reads
    is still refused when the key is made."""
    items = [message("assistant", "x")] * CHECKED_ITEMS + [message("user", 5)]
    body = responses(items)
    validate(Kind.RESPONSES, body)
    with pytest.raises(BadRequestError):
        key_text(Kind.RESPONSES, body, FIRST_USER, 100)


RULE = KeyRule(FIRST_USER, 1000, 64)


def test_the_summary_carries_the_previous_response_and_store():
    """A follow-up's summary names the response it continues; ``store: false`` says its
    answer is not kept; a first request is a first turn, a follow-up is not."""
    raw = b'{"model": "llama", "input": "next", "previous_response_id": "resp_1"}'
    summary = read_keyed(Kind.RESPONSES, raw, None, RULE, True)
    assert (summary.response_ref, summary.store, summary.first_turn) == ("resp_1", True, False)
    assert summary.key == "llama\x00next"
    raw = b'{"model": "llama", "input": "first", "store": false, "stream": true}'
    summary = read_keyed(Kind.RESPONSES, raw, None, RULE, True)
    assert (summary.response_ref, summary.store, summary.first_turn, summary.stream) == (
        None, False, True, True)
    chat = summarize(Kind.CHAT, {"model": "llama", "messages": [message("user", "x")]}, None,
                     RULE, False)
    assert (chat.response_ref, chat.store) == (None, True)


@pytest.mark.parametrize(("body", "first"), [
    (responses("hi"), True),
    (responses([message("user", "hi")]), True),
    (responses([message("user", "hi"), message("assistant", "yo")]), False),
    (responses([{"type": "function_call_output", "call_id": "c", "output": "1"}]), False),
    (responses("hi", previous_response_id="resp_1"), False),
    (responses([message("user", "hi")] * (CHECKED_ITEMS + 1)), False),
])
def test_first_turns_of_responses(body, first):
    """No previous response and nothing that follows a model's answer: a first turn (a list
    too long to inspect whole is taken for a conversation)."""
    assert is_first_response_turn(body) is first


def test_a_session_header_overrides_the_responses_key():
    """The explicit session key wins, as for chat."""
    summary = read_keyed(Kind.RESPONSES, b'{"model": "llama", "input": "x"}', "s-1", RULE,
                         False)
    assert summary.session and summary.key == "session\x00s-1"
