"""Keys and validation read only the start of a huge request, and key small ones as before.

A reference copy of the earlier implementation (which joined every token id and checked every
message) stands against the bounded one: for every small body both give the same key and
accept or reject alike, and for huge ones the bounded one never touches the tail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import KeyMode
from balancer.errors import BadRequestError
from balancer.prefix import CHECKED_ITEMS, Kind, key_text, routing_key, validate
from balancer.route import is_first_turn

FIRST_USER = KeyMode.FIRST_USER_MESSAGE
PROMPT_PREFIX = KeyMode.PROMPT_PREFIX

# -- the reference: the whole-body implementation these keys must not differ from ---------


def ref_content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise BadRequestError(f"{where}[{i}] must be an object", param=f"{where}[{i}]")
            text = part.get("text")
            if isinstance(text, str):
                pieces.append(text)
                continue
            pieces.append(ref_attachment(part))
        return "".join(pieces)
    raise BadRequestError(f"{where} must be a string, a list of content parts or null",
                          param=where)


def ref_attachment(part: Mapping[str, Any]) -> str:
    for value in part.values():
        if isinstance(value, Mapping):
            for field in ("url", "data", "file_data", "file_id"):
                reference = value.get(field)
                if isinstance(reference, str) and reference:
                    digest = xxhash.xxh3_64_hexdigest(reference.encode("utf-8", "surrogatepass"))
                    return f"<{part.get('type', 'part')}:{digest}>"
    return ""


def ref_messages(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise BadRequestError(f"messages[{i}].role must be a string",
                                  param=f"messages[{i}].role")
    return messages


def ref_prompt_text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        first = value[0]
        if all(isinstance(x, str) for x in value):
            return str(first)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return ",".join(map(str, value))
        if all(isinstance(x, list) and x and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x) for x in value):
            return ",".join(map(str, first))
    raise BadRequestError(f"'{field}' is malformed", param=field)


def ref_validate(kind: Kind, body: Mapping[str, Any]) -> None:
    if kind is Kind.CHAT:
        for i, message in enumerate(ref_messages(body)):
            ref_content_text(message.get("content"), f"messages[{i}].content")
    elif kind is Kind.COMPLETIONS:
        ref_prompt_text(body.get("prompt"), "prompt")
    else:
        ref_prompt_text(body.get("input"), "input")


def ref_key_text(kind: Kind, body: Mapping[str, Any], mode: KeyMode, prefix_chars: int,
                 min_key_chars: int) -> str:
    if kind is Kind.COMPLETIONS:
        return ref_prompt_text(body.get("prompt"), "prompt")[:prefix_chars]
    if kind is Kind.EMBEDDINGS:
        return ref_prompt_text(body.get("input"), "input")[:prefix_chars]
    messages = ref_messages(body)
    if mode is KeyMode.FIRST_USER_MESSAGE:
        for i, message in enumerate(messages):
            if message.get("role") == "user":
                text = ref_content_text(message.get("content"), f"messages[{i}].content")
                if len(text) >= min_key_chars or len(text) >= prefix_chars:
                    return text[:prefix_chars]
                pieces = [text]
                for j in range(i + 1, min(i + 3, len(messages))):
                    content = ref_content_text(messages[j].get("content"),
                                               f"messages[{j}].content")
                    pieces.append(f"\n{messages[j]['role']}:{content}")
                return "".join(pieces)[:prefix_chars]
    pieces = []
    size = 0
    for i, message in enumerate(messages):
        text = ref_content_text(message.get("content"), f"messages[{i}].content")
        piece = f"{message['role']}:{text}\n"
        pieces.append(piece)
        size += len(piece)
        if size >= prefix_chars:
            break
    return "".join(pieces)[:prefix_chars]


def outcome(call: Any) -> tuple[str, Any]:
    """What a call gave: its value, or the param of the BadRequestError it raised."""
    try:
        return "ok", call()
    except BadRequestError as e:
        return "rejected", e.param


# -- generated bodies ----------------------------------------------------------------------

token_id = st.integers(-10, 10**12)
token_ids = st.lists(token_id, min_size=1, max_size=400)
well_formed_prompt = st.one_of(
    st.text(max_size=300),
    st.lists(st.text(max_size=80), min_size=1, max_size=5),
    token_ids,
    st.lists(token_ids, min_size=1, max_size=4),
)
odd_item = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3),
                     token_id, st.lists(token_id, max_size=3), st.just([]),
                     st.dictionaries(st.text(max_size=2), token_id, max_size=1))
any_prompt = st.one_of(well_formed_prompt, odd_item, st.lists(odd_item, max_size=6),
                       st.lists(st.lists(odd_item, max_size=3), max_size=3))

part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=60)),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, st.text(max_size=40)),
    st.builds(lambda d: {"type": "input_audio", "input_audio": {"data": d}},
              st.text(max_size=40)),
    st.just({"type": "image_url", "image_url": {"detail": "low"}}),
)
content = st.one_of(st.none(), st.text(max_size=200), st.lists(part, max_size=4))
role = st.sampled_from(["system", "user", "assistant", "tool"])
message = st.builds(lambda r, c: {"role": r, "content": c}, role, content)
odd_message = st.one_of(message, st.just("hi"), st.just({"content": "x"}),
                        st.builds(lambda c: {"role": "user", "content": c},
                                  st.one_of(st.integers(), st.just({"text": "x"}),
                                            st.just(["not a part"]))))
lengths = {"prefix_chars": st.integers(1, 300), "min_key_chars": st.integers(0, 120)}


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from([Kind.COMPLETIONS, Kind.EMBEDDINGS]), prompt=any_prompt,
       **lengths)
def test_prompts_key_and_validate_as_the_whole_body_implementation_did(
        kind: Kind, prompt: Any, prefix_chars: int, min_key_chars: int) -> None:
    """For every small prompt, well formed or not, the key and the verdict are the old ones."""
    field = "prompt" if kind is Kind.COMPLETIONS else "input"
    body = {"model": "m", field: prompt}
    want = outcome(lambda: ref_validate(kind, body))
    assert outcome(lambda: validate(kind, body)) == want
    if want[0] == "ok":
        for mode in KeyMode:
            assert key_text(kind, body, mode, prefix_chars, min_key_chars) == ref_key_text(
                kind, body, mode, prefix_chars, min_key_chars)


@settings(max_examples=400, deadline=None)
@given(messages=st.lists(message, min_size=1, max_size=8), mode=st.sampled_from(KeyMode),
       **lengths)
def test_chat_bodies_key_as_the_whole_body_implementation_did(
        messages: list[dict[str, Any]], mode: KeyMode, prefix_chars: int,
        min_key_chars: int) -> None:
    """Cutting each message's text to what the key can reach changes no chat key."""
    body = {"model": "m", "messages": messages}
    validate(Kind.CHAT, body)
    assert key_text(Kind.CHAT, body, mode, prefix_chars, min_key_chars) == ref_key_text(
        Kind.CHAT, body, mode, prefix_chars, min_key_chars)


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(odd_message, min_size=0, max_size=6))
def test_small_chat_bodies_are_rejected_exactly_as_before(messages: list[Any]) -> None:
    """Under CHECKED_ITEMS items, validation names the same field the old one named."""
    body = {"model": "m", "messages": messages}
    assert outcome(lambda: validate(Kind.CHAT, body)) == outcome(
        lambda: ref_validate(Kind.CHAT, body))


def test_a_long_first_message_made_of_parts_keys_as_before() -> None:
    """A content list longer than the key is cut between parts, never inside the key."""
    parts = [{"type": "text", "text": f"part {i} "} for i in range(5000)]
    parts.insert(3, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    for mode in KeyMode:
        assert key_text(Kind.CHAT, body, mode, 1000, 64) == ref_key_text(
            Kind.CHAT, body, mode, 1000, 64)


# -- huge bodies: the tail is never touched ------------------------------------------------


class Poison:
    """An item no key or check may look at: any use of it fails the test."""

    def _touched(self, *args: Any) -> Any:
        raise AssertionError("the tail of a huge field was read")

    __str__ = __repr__ = __eq__ = __hash__ = __bool__ = __len__ = __iter__ = _touched
    __format__ = __getattr__ = _touched  # type: ignore[assignment]


TAIL = 1_000_000


def test_a_million_token_ids_key_on_the_first_ones_only() -> None:
    """The key of a 1M-id prompt is the key of its first prefix_chars ids, and neither the
    key nor validation reads an id past them (the tail here would fail any use)."""
    head = list(range(1000, 3000))
    body = {"model": "m", "prompt": head + [Poison()] * TAIL}
    validate(Kind.COMPLETIONS, body)
    for prefix_chars in (1, 7, 1000, 2000):
        assert key_text(Kind.COMPLETIONS, body, FIRST_USER, prefix_chars) == (
            ",".join(map(str, head))[:prefix_chars])
    assert routing_key(Kind.COMPLETIONS, body, FIRST_USER, 1000) == routing_key(
        Kind.COMPLETIONS, {"model": "m", "prompt": head}, FIRST_USER, 1000)


def test_a_batch_of_token_id_lists_keys_on_the_start_of_the_first() -> None:
    """A batch of long token-id prompts reads only the start of the first one."""
    first = list(range(5000)) + [Poison()] * TAIL
    body = {"model": "m", "input": [first] + [[1, 2, 3]] * 10 + [Poison()] * TAIL}
    validate(Kind.EMBEDDINGS, body)
    assert key_text(Kind.EMBEDDINGS, body, FIRST_USER, 1000) == (
        ",".join(map(str, range(5000)))[:1000])


def test_a_batch_of_many_prompts_keys_on_the_first_alone() -> None:
    """A list of a million string prompts keys on its first, checking only its start."""
    body = {"model": "m", "prompt": ["Once upon a time"] * CHECKED_ITEMS + [Poison()] * TAIL}
    validate(Kind.COMPLETIONS, body)
    assert key_text(Kind.COMPLETIONS, body, FIRST_USER, 1000) == "Once upon a time"


@pytest.mark.parametrize("mode", list(KeyMode))
def test_a_hundred_thousand_messages_are_not_walked(mode: KeyMode) -> None:
    """Validation and the key read the first messages of a long conversation, not all."""
    messages: list[Any] = [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "Hello!"}]
    messages += [{"role": "user", "content": "more"}] * CHECKED_ITEMS + [Poison()] * 100_000
    body = {"model": "m", "messages": messages}
    validate(Kind.CHAT, body)
    small = {"model": "m", "messages": messages[:CHECKED_ITEMS]}
    assert key_text(Kind.CHAT, body, mode, 1000, 64) == key_text(Kind.CHAT, small, mode,
                                                                 1000, 64)


def test_a_ten_mebibyte_message_keys_on_its_start() -> None:
    """A huge message's key is its first prefix_chars characters, in either mode."""
    text = "x" * (10 << 20)
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    validate(Kind.CHAT, body)
    assert key_text(Kind.CHAT, body, FIRST_USER, 1000) == "x" * 1000
    assert key_text(Kind.CHAT, body, PROMPT_PREFIX, 1000) == "user:" + "x" * 995


def test_a_message_past_the_checked_ones_may_be_anything() -> None:
    """A malformed message past CHECKED_ITEMS is left to the model server; is_first_turn
    never reads it (nor any message past CHECKED_ITEMS): a conversation that long is not
    new, whatever its tail holds."""
    messages: list[Any] = [{"role": "user", "content": "q"}] * CHECKED_ITEMS + ["junk", 5]
    body = {"model": "m", "messages": messages}
    validate(Kind.CHAT, body)
    assert not is_first_turn(body)
    assert is_first_turn({"messages": messages[:CHECKED_ITEMS]})
    assert not is_first_turn({"messages": [{"role": "assistant", "content": "a"},
                                           *messages[:CHECKED_ITEMS - 1]]})


# -- validation: a clear 400 ---------------------------------------------------------------

MALFORMED_PROMPTS = [
    pytest.param(None, id="null"),
    pytest.param(5, id="number"),
    pytest.param({"text": "x"}, id="object"),
    pytest.param([], id="empty-list"),
    pytest.param([[]], id="empty-token-list"),
    pytest.param([1.5], id="float-token"),
    pytest.param([1, 2.0], id="float-among-ids"),
    pytest.param([True, 1], id="boolean-first"),
    pytest.param([1, False], id="boolean-among-ids"),
    pytest.param([None], id="null-item"),
    pytest.param(["a", 1], id="string-then-id"),
    pytest.param([1, "a"], id="id-then-string"),
    pytest.param([[1], "a"], id="token-list-then-string"),
    pytest.param([[1, "a"]], id="string-in-token-list"),
    pytest.param([[[1]]], id="nested-too-deep"),
    pytest.param([{"ids": [1]}], id="object-item"),
    pytest.param([1] * (CHECKED_ITEMS - 1) + ["late"], id="last-checked-id-wrong"),
]


@pytest.mark.parametrize("field", ["prompt", "input"])
@pytest.mark.parametrize("prompt", MALFORMED_PROMPTS)
def test_a_prompt_of_the_wrong_shape_is_a_400_naming_the_allowed_ones(
        prompt: Any, field: str) -> None:
    """Anything but a string, strings, token ids or token-id lists is a 400 on the field."""
    kind = Kind.COMPLETIONS if field == "prompt" else Kind.EMBEDDINGS
    with pytest.raises(BadRequestError) as caught:
        validate(kind, {"model": "m", field: prompt})
    error = caught.value
    assert (error.status, error.param) == (400, field)
    assert error.message == (f"'{field}' must be a string, an array of strings, an array of "
                             "token ids or an array of token-id arrays")


def test_a_malformed_id_past_the_checked_items_is_left_to_the_model_server() -> None:
    """Only the first CHECKED_ITEMS ids are checked (the key's own are always checked)."""
    body = {"model": "m", "prompt": [1] * CHECKED_ITEMS + ["late"]}
    validate(Kind.COMPLETIONS, body)
    with pytest.raises(BadRequestError):
        key_text(Kind.COMPLETIONS, body, FIRST_USER, CHECKED_ITEMS + 1)


def test_the_key_checks_the_ids_it_reads() -> None:
    """An id the key would read that is no int is rejected even without validation."""
    for prompt in ([1, True], [[1, None]], [2, "x"]):
        with pytest.raises(BadRequestError) as caught:
            key_text(Kind.COMPLETIONS, {"model": "m", "prompt": prompt}, FIRST_USER, 100)
        assert caught.value.param == "prompt"
