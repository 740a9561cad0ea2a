"""Reading outside JSON documents as objects: anything else is no document, never an error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.jsondoc import json_object


@pytest.mark.parametrize("data", [b"", b"not json", b"[1, 2]", b'"text"', b"3", b"null",
                                  b"{" * 100_000, b'{"a": 1', "\ud800"])
def test_anything_but_an_object_is_none(data: bytes | str) -> None:
    assert json_object(data) is None


def test_an_object_is_read_from_bytes_or_text() -> None:
    assert json_object(b'{"id": "resp_1", "usage": {"prompt_tokens": 3}}') == {
        "id": "resp_1", "usage": {"prompt_tokens": 3}}
    assert json_object('{"model": "llama"}') == {"model": "llama"}


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)))
def test_whatever_json_holds_reads_as_json_does_when_an_object(value: object) -> None:
    data = json.dumps(value).encode()
    assert json_object(data) == (value if isinstance(value, dict) else None)
