"""Request traces: the JSONL format the load generators write, the players read and
``balancer tune`` analyses.

A trace is a file of JSON objects, one per line. Each line is one request (one turn of a
conversation)::

    {"conversation_id": "mt-00003", "turn": 1, "at": 4.183, "think_s": 2.71, "append": true,
     "body": {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_tokens": 96,
              "messages": [{"role": "user", "content": "Why does the ..."}]}}

Fields:

``conversation_id`` (str)
    Groups the turns of one conversation. A single-turn request is a conversation of one turn.
``turn`` (int, from 0)
    Position in the conversation. Turns are played in this order, each after the previous
    turn's reply has been received in full.
``at`` (float, seconds)
    When the conversation's first turn is sent, counted from the start of the run. Every turn of
    a conversation carries the same value.
``think_s`` (float, seconds)
    The pause between receiving the previous turn's reply and sending this turn (the user's
    think time). Always 0 on turn 0.
``append`` (bool)
    ``true`` (only on turns after the first, only for chat bodies): ``body.messages`` holds just
    the new messages (normally one user message). The player sends the conversation's history,
    that is the previous request's messages plus the assistant reply it actually received, followed
    by these messages. ``false``: ``body`` is complete and is sent as it is; for chat bodies its
    messages then become the new history.
``body`` (object)
    An OpenAI request body: chat completions (with ``messages``) or completions (with
    ``prompt``). Players force streaming (``stream``, ``stream_options.include_usage``) and may
    override ``model`` and ``max_tokens``.

Times are relative, so a trace replays the same way whenever it is started.

Users' own traces
-----------------
:func:`load_trace` also reads traces recorded elsewhere. Each line is either

* wrapped, as above: an object with a ``body`` and any of ``conversation_id``, ``turn``,
  ``at``, ``think_s``, ``append`` and ``timestamp``; or
* bare: an OpenAI request body itself (it has ``messages`` or ``prompt``), optionally with
  ``conversation_id`` and ``timestamp`` keys, which are removed before sending.

Missing fields are filled in: a line without ``conversation_id`` is a conversation of its own;
without ``turn``, the turns of a conversation follow file order. ``timestamp`` (seconds as a
number, e.g. a Unix time, or an ISO 8601 string) is made relative to the earliest timestamp in
the file: a conversation's ``at`` is its first turn's timestamp and a later turn's ``think_s``
is the gap to the previous turn's timestamp (which includes the original reply time, so a replay
is if anything slower-paced than the recording). Without ``at``, ``think_s`` or ``timestamp``
they are 0: everything arrives at once and the player's concurrency cap paces the run.
Recorded bodies carry full histories, so ``append`` defaults to ``false``.

Bad lines raise :class:`TraceError`, which lists every problem with its line number.

Pure (the standard library only), so the installed package can read traces without the
load-test harness; ``loadtest.trace`` re-exports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

__all__ = [
    "Conversation",
    "TraceError",
    "TraceRecord",
    "body_kind",
    "dump_trace",
    "group_conversations",
    "load_trace",
    "parse_trace",
    "records_of",
    "write_trace",
]

WRAPPED_KEYS = frozenset(
    {"conversation_id", "turn", "at", "think_s", "append", "timestamp", "body"}
)
"""Keys allowed at the top level of a wrapped line; anything else is reported as a typo."""

BARE_EXTRA_KEYS = ("conversation_id", "timestamp")
"""Keys taken out of a bare body before it is sent (no OpenAI server knows them)."""

MAX_REPORTED_ERRORS = 50
"""A broken file can have thousands of bad lines; the error message lists this many."""


class TraceError(ValueError):
    """A trace file has bad lines; ``errors`` holds ``(line number, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[int, str]]) -> None:
        self.source = source
        self.errors = errors
        shown = [f"{source}:{line}: {message}" for line, message in errors[:MAX_REPORTED_ERRORS]]
        if len(errors) > MAX_REPORTED_ERRORS:
            shown.append(f"... and {len(errors) - MAX_REPORTED_ERRORS} more")
        super().__init__("\n".join(shown))


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace: one turn of a conversation (see the module docstring)."""

    conversation_id: str
    turn: int
    at: float
    think_s: float
    append: bool
    body: dict[str, Any] = field(hash=False, compare=True)

    @property
    def kind(self) -> str:
        """``"chat"`` for a chat completions body, ``"completions"`` otherwise."""
        return body_kind(self.body)

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object, keys in the documented order."""
        return {
            "conversation_id": self.conversation_id,
            "turn": self.turn,
            "at": self.at,
            "think_s": self.think_s,
            "append": self.append,
            "body": self.body,
        }


@dataclass(frozen=True)
class Conversation:
    """The turns of one conversation, in order; ``at`` is when the first turn is sent."""

    conversation_id: str
    at: float
    turns: tuple[TraceRecord, ...]


def body_kind(body: dict[str, Any]) -> str:
    """``"chat"`` if the body has ``messages``, else ``"completions"``."""
    return "chat" if "messages" in body else "completions"


def records_of(conversations: Iterable[Conversation]) -> list[TraceRecord]:
    """Flatten conversations back into records (conversation by conversation)."""
    return [turn for conversation in conversations for turn in conversation.turns]


def group_conversations(records: Iterable[TraceRecord]) -> list[Conversation]:
    """Group records into conversations ordered by arrival (ties keep first-seen order)."""
    by_id: dict[str, list[TraceRecord]] = {}
    for record in records:
        by_id.setdefault(record.conversation_id, []).append(record)
    conversations = []
    for conversation_id, turns in by_id.items():
        turns.sort(key=lambda r: r.turn)
        conversations.append(Conversation(conversation_id, turns[0].at, tuple(turns)))
    conversations.sort(key=lambda c: c.at)
    return conversations


def write_trace(records: Iterable[TraceRecord], out: IO[str]) -> int:
    """Write records as JSONL to an open text file; returns the number of lines."""
    count = 0
    for record in records:
        out.write(json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")))
        out.write("\n")
        count += 1
    return count


def dump_trace(records: Iterable[TraceRecord], path: str | Path) -> int:
    """Write records as JSONL to ``path``; returns the number of lines."""
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        return write_trace(records, out)


def load_trace(path: str | Path) -> list[TraceRecord]:
    """Read and validate a trace file (ours or a user's own; see the module docstring)."""
    with open(path, encoding="utf-8") as lines:
        return parse_trace(lines, source=str(path))


@dataclass
class _Line:
    """A parsed line before conversation-level defaults are filled in."""

    number: int
    conversation_id: str | None
    turn: int | None
    at: float | None
    think_s: float | None
    append: bool
    timestamp: float | None
    body: dict[str, Any]


def parse_trace(lines: Iterable[str], *, source: str = "<trace>") -> list[TraceRecord]:
    """Parse and validate JSONL trace lines; raises :class:`TraceError` listing bad lines."""
    errors: list[tuple[int, str]] = []
    parsed: list[_Line] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            parsed.append(_parse_line(number, text))
        except _LineError as e:
            errors.append((number, str(e)))
    if not errors:
        records = _complete(parsed, errors)
        if not errors:
            return records
    raise TraceError(source, errors)


class _LineError(ValueError):
    pass


def _parse_line(number: int, text: str) -> _Line:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _LineError(f"not valid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
    if "body" in obj:
        unknown = sorted(set(obj) - WRAPPED_KEYS)
        if unknown:
            raise _LineError(f"unknown field(s) {', '.join(map(repr, unknown))}")
        body = obj["body"]
        if not isinstance(body, dict):
            raise _LineError("'body' must be an object")
        meta = obj
    elif "messages" in obj or "prompt" in obj:
        meta = {key: obj[key] for key in BARE_EXTRA_KEYS if key in obj}
        body = {key: value for key, value in obj.items() if key not in BARE_EXTRA_KEYS}
    else:
        raise _LineError(
            "neither a wrapped record (no 'body') nor a request body (no 'messages' or 'prompt')"
        )
    append = meta.get("append", False)
    if not isinstance(append, bool):
        raise _LineError("'append' must be true or false")
    _check_body(body, append=append)
    return _Line(
        number=number,
        conversation_id=_conversation_id(meta.get("conversation_id")),
        turn=_turn(meta.get("turn")),
        at=_seconds(meta.get("at"), "at"),
        think_s=_seconds(meta.get("think_s"), "think_s"),
        append=append,
        timestamp=_timestamp(meta.get("timestamp")),
        body=body,
    )


def _check_body(body: dict[str, Any], *, append: bool) -> None:
    has_messages, has_prompt = "messages" in body, "prompt" in body
    if has_messages == has_prompt:
        raise _LineError(
            "the body needs exactly one of 'messages' (chat) or 'prompt' (completions)"
        )
    if has_prompt:
        prompt = body["prompt"]
        if append:
            raise _LineError("'append' needs a chat body ('messages'), not a completions body")
        if not isinstance(prompt, str | list) or not prompt:
            raise _LineError("'prompt' must be a non-empty string or list")
        return
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _LineError("'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _LineError(f"messages[{index}] must be an object")
        if not isinstance(message.get("role"), str):
            raise _LineError(f"messages[{index}] needs a string 'role'")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _LineError(f"messages[{index}].content must be a string, a list or null")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _LineError("'stream' must be true or false")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise _LineError(f"'{key}' must be a positive integer")


def _conversation_id(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _LineError("'conversation_id' must be a string or an integer")
    if value == "":
        raise _LineError("'conversation_id' must not be empty")
    return str(value)


def _turn(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _LineError("'turn' must be an integer >= 0")
    return value


def _seconds(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _LineError(f"'{name}' must be a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise _LineError(f"'{name}' must be finite and >= 0")
    return float(value)


def _timestamp(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError as e:
            raise _LineError(f"'timestamp' is not an ISO 8601 time: {value!r}") from e
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _LineError("'timestamp' must be a number of seconds or an ISO 8601 string")
    return float(value)


def _complete(lines: list[_Line], errors: list[tuple[int, str]]) -> list[TraceRecord]:
    """Fill in defaults per conversation and check turn order; appends to ``errors``."""
    stamps = [line.timestamp for line in lines if line.timestamp is not None]
    origin = min(stamps) if stamps else 0.0
    conversations: dict[str, list[_Line]] = {}
    for line in lines:
        key = line.conversation_id if line.conversation_id is not None else f"line-{line.number}"
        conversations.setdefault(key, []).append(line)
    records: list[TraceRecord] = []
    for conversation_id, turns in conversations.items():
        records.extend(_complete_conversation(conversation_id, turns, origin, errors))
    records.sort(key=lambda r: r.at)
    return records


def _complete_conversation(
    conversation_id: str, turns: list[_Line], origin: float, errors: list[tuple[int, str]]
) -> Iterator[TraceRecord]:
    numbered = [line for line in turns if line.turn is not None]
    if numbered and len(numbered) != len(turns):
        first = next(line for line in turns if line.turn is None)
        errors.append(
            (first.number, f"conversation {conversation_id!r} numbers some turns but not this one")
        )
        return
    if numbered:
        turns = sorted(turns, key=lambda line: line.turn or 0)
        seen: dict[int, int] = {}
        for line in turns:
            assert line.turn is not None
            if line.turn in seen:
                errors.append(
                    (
                        line.number,
                        f"turn {line.turn} of {conversation_id!r} repeats line {seen[line.turn]}",
                    )
                )
                return
            seen[line.turn] = line.number
    first = turns[0]
    if first.append:
        errors.append(
            (first.number, "'append' on the first turn of a conversation (no history to append to)")
        )
        return
    if first.at is not None:
        at = first.at
    elif first.timestamp is not None:
        at = first.timestamp - origin
    else:
        at = 0.0
    previous_stamp = first.timestamp
    for index, line in enumerate(turns):
        if line.append and body_kind(turns[index - 1].body) != "chat":
            errors.append((line.number, "'append' after a completions turn (no chat history)"))
            return
        if index == 0:
            think = 0.0
        elif line.think_s is not None:
            think = line.think_s
        elif line.timestamp is not None and previous_stamp is not None:
            think = max(0.0, line.timestamp - previous_stamp)
        else:
            think = 0.0
        if line.timestamp is not None:
            previous_stamp = line.timestamp
        yield TraceRecord(
            conversation_id=conversation_id,
            turn=line.turn if line.turn is not None else index,
            at=at,
            think_s=think,
            append=line.append,
            body=line.body,
        )
