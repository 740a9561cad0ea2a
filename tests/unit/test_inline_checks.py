"""The request path's inline checks agree with the functions they stand in for.

Validation, keying and response-header filtering test JSON's own types inline and call the
general functions only for anything else (a call per message or header cost more than the
test). Each property here runs the code as written before the inlining (a reference kept in
this file) against the code now, over bodies and headers of every shape, and asks for the
same result: the same value, or the same error with the same message and ``param``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import KeyMode
from balancer.errors import BadRequestError
from balancer.forward import _NOT_FORWARDED_RESPONSE, filter_response_headers
from balancer.prefix import (
    CHECKED_ITEMS,
    EXTENDED_MESSAGES,
    SEPARATOR,
    Kind,
    _check_content,
    _content_text,
    _keys_alone,
    _message,
    _messages,
    key_text,
    model_of,
    routing_key,
    validate,
)
from balancer.summary import KeyRule, summarize


class Role(str):
    """A str subclass: not JSON's type, still a string role."""


# -- references: the checks as they were written before they were inlined ------------------


def reference_validate_chat(body: Mapping[str, Any]) -> None:
    model_of(body)
    messages = _messages(body)
    checked = range(min(len(messages), CHECKED_ITEMS))
    for i in checked:
        _message(messages, i)
    budget = CHECKED_ITEMS
    for i in checked:
        if budget <= 0:
            break
        budget = _check_content(messages[i].get("content"), i, budget - 1)


def reference_first_user_key(body: Mapping[str, Any], prefix_chars: int,
                             min_key_chars: int) -> str:
    messages = _messages(body)
    for i in range(len(messages)):
        message = _message(messages, i)
        if message["role"] == "user":
            text = _content_text(message.get("content"), f"messages[{i}].content",
                                 prefix_chars)
            if _keys_alone(len(text), prefix_chars, min_key_chars):
                return text[:prefix_chars]
            pieces = [text]
            for j in range(i + 1, min(i + 1 + EXTENDED_MESSAGES, len(messages))):
                following = _message(messages, j)
                content = _content_text(following.get("content"), f"messages[{j}].content",
                                        prefix_chars)
                pieces.append(f"\n{following['role']}:{content}")
            return "".join(pieces)[:prefix_chars]
    return key_text(Kind.CHAT, body, KeyMode.PROMPT_PREFIX, prefix_chars)


def outcome(function: Any, *args: Any) -> Any:
    """What a call gives: its value, or its BadRequestError as (message, param)."""
    try:
        return ("value", function(*args))
    except BadRequestError as exc:
        return ("error", exc.message, exc.param)


# -- bodies of every shape ---------------------------------------------------------------------

texts = st.text(alphabet="ab \u00e9", max_size=12)
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]),
                  st.builds(Role, st.sampled_from(["user", "assistant"])),
                  st.none(), st.integers(0, 3))
parts = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                  st.fixed_dictionaries({"type": st.just("image_url"),
                                         "image_url": st.fixed_dictionaries({"url": texts})}),
                  st.integers(0, 3), texts)
contents = st.one_of(texts, st.builds(Role, texts), st.none(), st.lists(parts, max_size=3),
                     st.integers(0, 3), st.dictionaries(texts, texts, max_size=1))


@st.composite
def messages(draw: st.DrawFn) -> Any:
    shape = draw(st.sampled_from(["dict", "dict", "dict", "mapping", "no_role", "other"]))
    if shape == "other":
        return draw(st.one_of(texts, st.integers(0, 3), st.none(), st.lists(texts, max_size=1)))
    message: dict[str, Any] = {"content": draw(contents)}
    if shape != "no_role":
        message["role"] = draw(roles)
    if draw(st.booleans()):
        del message["content"]
    return MappingProxyType(message) if shape == "mapping" else message


chat_bodies = st.fixed_dictionaries({
    "model": st.one_of(st.just("llama"), st.just(""), st.integers(0, 1)),
    "messages": st.one_of(st.lists(messages(), max_size=5), st.just("x")),
})
budgets = st.integers(1, 40)


@settings(max_examples=400, deadline=None)
@given(body=chat_bodies)
def test_chat_validation_refuses_what_the_reference_refuses_and_says_the_same(body):
    """validate's inline message and content checks pass and refuse exactly as _message and
    _check_content do, with the same error for the first fault."""
    assert outcome(validate, Kind.CHAT, body) == outcome(reference_validate_chat, body)


@settings(max_examples=400, deadline=None)
@given(body=chat_bodies, prefix_chars=budgets, min_key_chars=st.integers(0, 30))
def test_first_user_message_key_is_the_references(body, prefix_chars, min_key_chars):
    """The first-user-message key (with its inline type tests and the shortcut for a first
    user message with nothing after it) is the reference's, errors included."""
    assert (outcome(key_text, Kind.CHAT, body, KeyMode.FIRST_USER_MESSAGE, prefix_chars,
                    min_key_chars)
            == outcome(reference_first_user_key, body, prefix_chars, min_key_chars))


@settings(max_examples=300, deadline=None)
@given(body=chat_bodies, prefix_chars=budgets, min_key_chars=st.integers(0, 30),
       mode=st.sampled_from(list(KeyMode)))
def test_a_summarys_key_is_routing_key_with_the_model_read_once(body, prefix_chars,
                                                                min_key_chars, mode):
    """summarize makes the key as routing_key does (the model read once, not again after
    the text), and reports the same error when it cannot."""
    if outcome(validate, Kind.CHAT, body)[0] != "value":
        return  # summarize takes validated bodies only
    summary = summarize(Kind.CHAT, body, None, KeyRule(mode, prefix_chars, min_key_chars),
                        False)
    expected = outcome(routing_key, Kind.CHAT, body, mode, prefix_chars, min_key_chars)
    assert outcome(summary.routing_key) == expected
    assert expected[0] == "error" or expected[1].startswith(f"{body['model']}{SEPARATOR}")


# -- response headers --------------------------------------------------------------------------

header_names = st.sampled_from([b"content-type", b"Content-Type", b"x-trace", b"X-Trace",
                                b"connection", b"Connection", b"keep-alive", b"date",
                                b"server", b"content-length", b"endpoint-load-metrics",
                                b"transfer-encoding", b"x-other"])
connection_values = st.lists(st.sampled_from([b"close", b"keep-alive", b"x-trace", b" X-Trace",
                                              b"endpoint-load-metrics", b"", b"upgrade"]),
                             min_size=1, max_size=3).map(b",".join)
header_values = st.one_of(st.sampled_from([b"application/json", b"1", b"TEXT a=1",
                                           b"\xc3\xa9t\xc3\xa9", b"\xff"]), connection_values)


def two_passes(headers, keep_load):
    """The filter as it was: read every Connection header first, then drop what it names
    along with the hop-by-hop headers."""
    drop = set(_NOT_FORWARDED_RESPONSE)
    for name, value in headers:
        if name.lower() == b"connection":
            drop |= {t.strip().lower() for t in value.split(b",")}
    out, report = [("Server", "balancer")], None
    for name, value in headers:
        lower = name.lower()
        if lower == b"endpoint-load-metrics":
            report = value
            if not keep_load:
                continue
        if lower not in drop:
            out.append((name.decode("latin-1"), value.decode("utf-8", "replace")))
    return out, report


@settings(max_examples=400, deadline=None)
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=6),
       keep_load=st.booleans())
def test_one_pass_header_filter_gives_what_two_passes_gave(headers, keep_load):
    """The one-pass filter (a second pass only when Connection names a header not dropped
    anyway) gives the client the same headers, in the same order, and the same report as
    the two-pass filter that reads Connection first."""
    fast, fast_report = filter_response_headers(headers, keep_load=keep_load)
    slow, slow_report = two_passes(headers, keep_load)
    assert list(fast.items()) == slow
    assert fast_report == slow_report


def test_a_connection_header_naming_an_earlier_header_drops_it():
    """A header named by a later Connection header is not passed on, though the one pass
    had already added it."""
    out, _ = filter_response_headers([(b"x-trace", b"1"), (b"content-type", b"text/plain"),
                                      (b"connection", b"close, X-Trace")])
    assert "x-trace" not in out and out["content-type"] == "text/plain"
