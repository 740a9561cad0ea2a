"""What the request path needs of a request body, read by one pure function.

balancer forwards a request's body bytes as they came; of the parsed body it needs only what
routing and forwarding read: the model, the ``stream`` flag, the routing key (or the session
key that overrides it), whether a chat is a conversation's first turn, and whether the body is
valid at all (the 400s of :func:`parse_json` and :func:`balancer.prefix.validate`, with their
messages and ``param``). :func:`read_keyed` reads exactly that into a :class:`Summary` of a few
hundred bytes (the key text is at most ``routing.prefix_chars`` characters).

Why a summary rather than the parsed body: a 10 MiB body parses into millions of Python
objects, ~100 ms of ``json.loads`` and ~10 ms more to free them, and on the event loop that
every stream shares that is as long a stall for all of them. Threads cannot take it off the
loop (the parser holds the GIL throughout). So bodies above ``limits.offload_parse_bytes`` are
read in a worker process (:mod:`balancer.offload`), which sends back only the summary, and
smaller ones are read on the loop by the same function: the two paths cannot disagree on a key
or an error. :func:`balancer.route.decide` reads a summary too (building one from a parsed body
when it was given none), so ``/debug/route`` and ``balancer route`` key exactly as the proxy.

Everything here is pure and importable on its own (no asyncio, no metrics, nothing started at
import): this is the module a worker process imports, and what it sends back pickles small.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple, TypeVar

from balancer.config import KeyMode, RoutingSettings
from balancer.errors import BadRequestError, BalancerError, InvalidJSONError
from balancer.jsondoc import json_object
from balancer.prefix import (
    CHECKED_ITEMS,
    SEPARATOR,
    Kind,
    _is_object,
    key_text,
    model_of,
    session_key,
    validate,
)

T = TypeVar("T")


class KeyRule(NamedTuple):
    """The routing settings a key is made with (a worker gets these, not the settings)."""

    mode: KeyMode
    prefix_chars: int
    min_key_chars: int

    @classmethod
    def of(cls, routing: RoutingSettings) -> KeyRule:
        return cls(routing.key, routing.prefix_chars, routing.min_key_chars)


class Summary(NamedTuple):
    """What routing and forwarding read of a valid keyed request's body."""

    model: str
    stream: bool
    """``"stream": true`` in the body: the answer is relayed as a stream."""
    key: str
    """The routing key: the session key when :attr:`session`, else model plus prefix text
    (empty when :attr:`key_error` is set)."""
    session: bool
    """The key is explicit: the session header's or the body's ``user`` field."""
    first_turn: bool
    """A chat with no assistant message yet (computed only when asked for: False else)."""
    key_error: str | None = None
    """Why no key could be made (a malformed item the key reads, past the items that
    validation inspects); raised by :meth:`routing_key` only after the model's pool is
    known, so an unknown model is still a 404 first, as when routing read the body."""
    key_error_param: str | None = None
    response_ref: str | None = None
    """A Responses request's ``previous_response_id``: the stored response it continues,
    which only the endpoint that answered it holds (``balancer.affinity``)."""
    store: bool = True
    """A Responses request's ``store`` (default true): whether its answer is kept by the
    endpoint, so that its id is worth remembering."""

    def routing_key(self) -> str:
        """The key; raises the BadRequestError it could not be made for."""
        if self.key_error is not None:
            raise BadRequestError(self.key_error, param=self.key_error_param)
        return self.key


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; InvalidJSONError (or BadRequestError for another JSON
    value) naming what is wrong, never another exception."""
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
        # Not a JSONDecodeError: an integer longer than Python converts (a 500 otherwise).
        raise InvalidJSONError(f"request body holds a number of more than "
                               f"{sys.get_int_max_str_digits()} digits") from None
    except RecursionError:
        raise InvalidJSONError("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequestError(f"request body must be a JSON object, not "
                              f"{type(data).__name__}")
    return data


def summarize(kind: Kind, body: Mapping[str, Any], session: str | None, rule: KeyRule,
              first_turn: bool) -> Summary:
    """The summary of a body that :func:`balancer.prefix.validate` has passed.

    ``session``: the session header's value. ``first_turn``: whether to tell a chat's first
    turn (a walk over all its messages, done only for pools that route first turns apart)."""
    model = model_of(body)
    explicit = session_key(session, body)
    error: BadRequestError | None = None
    if explicit is not None:
        key = explicit
    else:
        try:
            # routing_key's key (model plus prefix text) without reading the model again
            text = key_text(kind, body, rule.mode, rule.prefix_chars, rule.min_key_chars)
            key = f"{model}{SEPARATOR}{text}"
        except BadRequestError as exc:
            key, error = "", exc
    if kind is Kind.RESPONSES:
        ref = body.get("previous_response_id")
        return Summary(
            model, body.get("stream") is True, key, explicit is not None,
            first_turn and is_first_response_turn(body),
            None if error is None else error.message, None if error is None else error.param,
            ref if isinstance(ref, str) and ref else None, body.get("store") is not False,
        )
    return Summary(
        model, body.get("stream") is True, key, explicit is not None,
        first_turn and kind is Kind.CHAT and is_first_turn(body),
        None if error is None else error.message, None if error is None else error.param,
    )


def read_keyed(kind: Kind, raw: bytes, session: str | None, rule: KeyRule,
               first_turn: bool) -> Summary:
    """Parse, validate and summarize a keyed request's body: the one function both the
    event loop and the worker processes run. Raises InvalidJSONError or BadRequestError."""
    body = parse_json(raw)
    validate(kind, body)
    return summarize(kind, body, session, rule, first_turn)


def passthrough_model(raw: bytes) -> str | None:
    """The ``model`` a pass-through request's JSON body names, if it is a JSON object with a
    string ``model`` (anything else, unreadable JSON included, names none)."""
    data = json_object(raw)
    if data is not None and isinstance(data.get("model"), str):
        return str(data["model"])
    return None


def is_first_turn(body: Mapping[str, Any]) -> bool:
    """A chat request that carries no assistant message yet: a new conversation, whose only
    cacheable prefix (the system prompt) is shared with many others.

    Validation inspects only the first messages of a long list, so an item further on may be
    no object; it is skipped (the model server rejects the request). Only the first
    :data:`~balancer.prefix.CHECKED_ITEMS` messages are looked at, so that a body of a
    hundred thousand user messages costs no more than a short one; a conversation that long
    is not new."""
    messages = body["messages"]
    if len(messages) > CHECKED_ITEMS:
        messages = messages[:CHECKED_ITEMS]  # a copy only for the rare huge list
        whole = False
    else:
        whole = True
    for message in messages:
        # type() first: _is_object's own test, without a call for each message
        if (type(message) is dict or _is_object(message)) and message.get("role") == "assistant":
            return False
    return whole


_CONTINUED_ITEMS: Final = frozenset({"function_call", "function_call_output", "reasoning",
                                    "item_reference"})
"""Responses input item types that only exist after a model answered: a request carrying
one continues a conversation."""


def is_first_response_turn(body: Mapping[str, Any]) -> bool:
    """A Responses request that starts a conversation: no ``previous_response_id`` and, among
    its first :data:`~balancer.prefix.CHECKED_ITEMS` input items, no assistant message and no
    item that follows a model's answer (see :func:`is_first_turn`)."""
    if body.get("previous_response_id"):
        return False
    items = body.get("input")
    if not isinstance(items, list):
        return True
    whole = len(items) <= CHECKED_ITEMS
    for item in items[:CHECKED_ITEMS] if not whole else items:
        if _is_object(item) and (item.get("role") == "assistant"
                                 or item.get("type") in _CONTINUED_ITEMS):
            return False
    return whole


def guarded(function: Callable[..., T], *args: Any) -> T | BalancerError:
    """``function(*args)``, or the BalancerError it raised as a value: what a worker process
    runs, so a 400 travels back as a small pickled error (message, param; its class gives
    status and type) rather than as a raised exception with a formatted remote traceback."""
    try:
        return function(*args)
    except BalancerError as exc:
        exc.__traceback__ = None
        return exc


def worker_pid(delay: float) -> int:
    """The process id of the worker that runs this, after ``delay`` seconds: started with a
    pool, one call per worker, the delay keeps a worker from taking two calls before the
    others have started, so the pids of all of them come back."""
    time.sleep(delay)
    return os.getpid()
