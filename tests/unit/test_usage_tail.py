"""Reading ``usage`` from the end of a non-streaming JSON answer, against json.loads."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.forward import body_usage, tail_usage, usage_of

# -- generated answers ---------------------------------------------------------------------

tricky_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["usage", '"usage"', '"usage": {"prompt_tokens": 1}}', 'x\\"usage"',
                     "\\", '\\"', "}", "{", '{"usage": 7}', "é😀"]),
)
key = st.one_of(st.sampled_from(["usage", "id", "data", "model", "choices", "usage "]),
                st.text(max_size=6))
scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                   st.floats(allow_nan=False, allow_infinity=False), tricky_text)
json_value = st.recursive(
    scalar,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(key, children, max_size=4)),
    max_leaves=16,
)
usage_object = st.one_of(
    st.fixed_dictionaries(
        {"prompt_tokens": st.integers(0, 10**6)},
        optional={"completion_tokens": st.integers(0, 10**4),
                  "prompt_tokens_details": st.one_of(
                      st.none(), st.fixed_dictionaries(
                          {}, optional={"cached_tokens": st.one_of(st.none(),
                                                                   st.integers(0, 10**6))})),
                  "usage": json_value}),
    json_value,  # anything else: usage_of finds no counts
)
style = st.sampled_from([
    {"separators": (", ", ": ")}, {"separators": (",", ":")}, {"indent": 2},
    {"separators": (", ", ": "), "ensure_ascii": False}, {"indent": "\t", "ensure_ascii": False},
])

KEY_CANDIDATE = re.compile(r'(?<!\\)"usage"\s*:')
TRIES = 4  # tail_usage's _USAGE_CANDIDATES


def render(members: list[tuple[str, Any]], usage_at: int | None, usage: Any,
           fmt: dict[str, Any], trailing: str) -> tuple[str, int]:
    """The answer's JSON text with the top-level usage member at index ``usage_at`` (none
    when None), and the offset of that member's key (-1 without one)."""
    items = list(members)
    if usage_at is not None:
        items.insert(usage_at, ("usage", usage))
    newline = "indent" in fmt
    item_sep = ",\n  " if newline else fmt["separators"][0]
    colon = ": " if newline else fmt["separators"][1]
    text = "{\n  " if newline else "{"
    key_at = -1
    for i, (name, value) in enumerate(items):
        if i:
            text += item_sep
        if usage_at is not None and i == usage_at:
            key_at = len(text)
        text += json.dumps(name) + colon + json.dumps(value, **fmt)
    text += ("\n}" if newline else "}") + trailing
    return text, key_at


answer = st.tuples(
    st.dictionaries(key.filter(lambda k: k != "usage"), json_value, max_size=5)
    .map(lambda d: list(d.items())),
    st.one_of(st.none(), st.integers(0, 5)),
    usage_object, style, st.sampled_from(["", "\n", " \r\n\t"]),
)


@settings(max_examples=600, deadline=None)
@given(parts=answer, data=st.data())
def test_the_tail_reader_agrees_with_a_whole_parse(parts: Any, data: st.DataObject) -> None:
    """Whatever the members, strings mentioning usage, nested objects named usage and
    whitespace: the tail reader finds what json.loads finds, or (only when its window or its
    tries run out) nothing; never something else."""
    members, usage_at, usage, fmt, trailing = parts
    if usage_at is not None:
        usage_at = min(usage_at, len(members))
    text, key_at = render(members, usage_at, usage, fmt, trailing)
    payload = text.encode()
    expected = usage_of(json.loads(text))
    enough_tries = key_at < 0 or len(KEY_CANDIDATE.findall(text, key_at + 1)) < TRIES
    whole = tail_usage(payload, window=len(payload))
    if enough_tries:
        assert whole == expected
    else:
        assert whole in (expected, None)
    window = data.draw(st.integers(0, len(payload) + 10), label="window")
    windowed = tail_usage(payload, window=window)
    assert windowed in (expected, None)
    if enough_tries and key_at >= 0 and window >= len(payload) - len(text[:key_at].encode()) + 1:
        assert windowed == expected


@settings(max_examples=300, deadline=None)
@given(parts=answer, cut=st.integers(0, 10**6))
def test_a_broken_answer_never_raises(parts: Any, cut: int) -> None:
    """A truncated or non-object body gives usage or none, never an exception."""
    members, usage_at, usage, fmt, trailing = parts
    text, _ = render(members, usage_at, usage, fmt, trailing)
    payload = text.encode()
    broken = payload[: cut % (len(payload) + 1)]
    for body in (broken, b"[" + payload + b"]", payload[1:]):
        found = tail_usage(body, window=1 << 16)
        assert found is None or all(type(n) is int for n in found)


@settings(max_examples=200, deadline=None)
@given(head=st.binary(max_size=200), tail=st.sampled_from([
    b"", b'"usage": {"prompt_tokens": 1}}', b'"usage"', b'\\"usage": 1}', b"\xff\xfe}"]))
def test_arbitrary_bytes_never_raise(head: bytes, tail: bytes) -> None:
    """Garbage, invalid UTF-8 and cut characters included, never raises."""
    for window in (0, 1, 5, 64, 1 << 16):
        found = tail_usage(head + tail, window=window)
        assert found is None or all(type(n) is int for n in found)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2}}', (2, 0)),
    ('{"a": {"usage": {"prompt_tokens": 9}}, "usage": {"prompt_tokens": 3}}', (3, 0)),
    ('{"usage": {"prompt_tokens": 3}, "a": {"usage": {"prompt_tokens": 9}}}', (3, 0)),
    ('{"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}}', (3, 2)),
    ('{"a": {"usage": {"prompt_tokens": 9}}}', None),
    ('[{"usage": {"prompt_tokens": 9}}]', None),
    ('{"note": "\\"usage\\": {\\"prompt_tokens\\": 9}}"}', None),
    ('{"note": "usage", "usage": null}', None),
    ('{"usage" : {"prompt_tokens": 4}\n}\n', (4, 0)),
    ('{"usage": {"prompt_tokens": 4}}{"x": 1}', None),
    ('{"usage": {"prompt_tokens": 4},}', None),
])
def test_edge_cases(text: str, expected: tuple[int, int] | None) -> None:
    """Duplicates (the last wins, as in json), nesting, usage in strings, trailing junk."""
    assert tail_usage(text.encode()) == expected


def test_an_escaped_later_duplicate_is_no_usage_rather_than_a_wrong_one() -> None:
    """json.loads takes a later key spelled with escapes; the reader declines to guess."""
    text = '{"usage": {"prompt_tokens": 1}, "\\u0075sage": {"prompt_tokens": 2}}'
    assert usage_of(json.loads(text)) == (2, 0)
    assert tail_usage(text.encode()) is None


def embeddings_answer(size: int, *, usage_first: bool = False) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": [0.001 * i] * 64}
            for i in range(size)]
    usage = {"prompt_tokens": 812, "total_tokens": 812}
    body = ({"usage": usage, "object": "list", "data": data} if usage_first
            else {"object": "list", "data": data, "model": "bge", "usage": usage})
    return json.dumps(body).encode()


def test_a_big_answer_is_read_from_its_tail_only() -> None:
    """A 1 MiB answer's usage comes from its last bytes: a head that no parser could read
    does not matter, so nothing but the tail was parsed."""
    payload = embeddings_answer(2000)
    assert len(payload) > 256 << 10
    assert body_usage(payload) == (812, 0)
    spoiled = b'{"data": [oops' + payload[len(b'{"object": "list", "data": ['):]
    with pytest.raises(ValueError):
        json.loads(spoiled)
    assert body_usage(spoiled) == (812, 0)


def test_a_big_answer_with_usage_first_reports_none_and_a_small_one_is_parsed_whole() -> None:
    """Past the window a usage is not looked for; a small answer is parsed whole and its
    usage found wherever it is."""
    assert body_usage(embeddings_answer(1000, usage_first=True)) is None
    assert body_usage(embeddings_answer(3, usage_first=True)) == (812, 0)
