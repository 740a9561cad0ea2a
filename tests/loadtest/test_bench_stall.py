"""The stall benchmark's request bodies and answer are what it claims to send."""

from __future__ import annotations

import json

import pytest

from balancer.forward import body_usage
from balancer.prefix import validate
from balancer.route import KEYED_PATHS
from loadtest.bench_stall import BIG_ANSWER_BYTES, MARGIN, SHAPES, Shape, big_answer

LIMIT = 256 << 10


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.name != "nested-json"],
                         ids=lambda s: s.name)
def test_every_body_fills_the_limit_and_is_a_valid_request(shape: Shape) -> None:
    """Each body is valid JSON under the limit (within the margin, bar the small ones) and
    passes validation for its path."""
    body = shape.build(LIMIT)
    assert len(body) <= LIMIT - MARGIN
    if shape.build(LIMIT) != shape.build(1 << 20):
        assert len(body) > LIMIT - MARGIN - 1024
    validate(KEYED_PATHS[shape.path], json.loads(body))


def test_the_nested_body_is_deeper_than_any_parser_recurses() -> None:
    """nested-json fills the limit with brackets that json.loads refuses."""
    (nested,) = [s for s in SHAPES if s.name == "nested-json"]
    body = nested.build(LIMIT)
    assert LIMIT - MARGIN - 2 <= len(body) <= LIMIT - MARGIN
    with pytest.raises(RecursionError):
        json.loads(body)


def test_the_big_answer_is_read_whole_and_has_usage_last() -> None:
    """The answer is under the 1 MiB balancer buffers, and its usage is found at its end."""
    answer = big_answer()
    assert BIG_ANSWER_BYTES - 1024 < len(answer) <= BIG_ANSWER_BYTES
    assert list(json.loads(answer))[-1] == "usage"
    assert body_usage(answer) == (9000, 4096)
