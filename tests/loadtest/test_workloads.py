"""Seeded workload generators, the trace format and the loader for users' own traces."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loadtest import workloads
from loadtest.trace import (
    TraceError,
    TraceRecord,
    dump_trace,
    group_conversations,
    load_trace,
    parse_trace,
)
from loadtest.workloads import CHARS_PER_TOKEN, TextGenerator

WORD_SLACK = 30
"""Texts are cut at a word boundary, so they may be this many characters short."""


def _cli(tmp_path: Path, name: str, *args: str) -> bytes:
    out = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.jsonl"
    assert workloads.main([name, "--out", str(out), *args]) == 0
    return out.read_bytes()


def _tokens(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN


@pytest.mark.parametrize("name", ["multi-turn", "shared-docs", "unique"])
def test_same_seed_writes_the_same_file(tmp_path: Path, name: str) -> None:
    """A seed fixes the trace byte for byte; another seed gives another trace."""
    first = _cli(tmp_path, name, "--seed", "7", "--duration", "10")
    again = _cli(tmp_path, name, "--seed", "7", "--duration", "10")
    other = _cli(tmp_path, name, "--seed", "8", "--duration", "10")
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", ["multi-turn", "shared-docs", "unique"])
def test_written_traces_load_back_unchanged(tmp_path: Path, name: str) -> None:
    """Generated traces pass the loader and round-trip exactly."""
    records = workloads.generate(name, 3, duration_s=5.0)
    path = tmp_path / "trace.jsonl"
    dump_trace(records, path)
    assert load_trace(path) == records


def test_multi_turn_shape() -> None:
    """System prompts, turn counts, user message lengths, think times and appends hold."""
    records = workloads.multi_turn(1, conversations=40)
    conversations = group_conversations(records)
    assert len(conversations) == 40
    systems: Counter[str] = Counter()
    for conversation in conversations:
        turns = conversation.turns
        assert 3 <= len(turns) <= 10
        assert [t.turn for t in turns] == list(range(len(turns)))
        assert {t.at for t in turns} == {conversation.at}
        first, *later = turns
        assert not first.append and first.think_s == 0
        system, user = first.body["messages"]
        assert system["role"] == "system" and user["role"] == "user"
        assert 1000 - WORD_SLACK <= _tokens(system["content"]) <= 3000 + WORD_SLACK
        systems[system["content"]] += 1
        for turn in later:
            assert turn.append and turn.think_s >= 0
            (message,) = turn.body["messages"]
            assert message["role"] == "user"
            assert 20 - WORD_SLACK <= _tokens(message["content"]) <= 200 + WORD_SLACK
        for turn in turns:
            assert 32 <= turn.body["max_tokens"] <= 128
            assert turn.body["model"] == workloads.DEFAULT_MODEL
    assert 2 <= len(systems) <= 4  # a few system prompts, each shared by many conversations
    first_users = [c.turns[0].body["messages"][1]["content"] for c in conversations]
    assert len(set(first_users)) == len(first_users)
    think = [t.think_s for c in conversations for t in c.turns[1:]]
    assert 1.0 <= sum(think) / len(think) <= 3.0  # exponential around the 2 s mean


def test_arrivals_follow_the_rate_and_duration() -> None:
    """Poisson arrivals: sorted, within the duration, about rate x duration of them."""
    records = workloads.multi_turn(5, rate=2.0, duration_s=100.0)
    arrivals = [c.at for c in group_conversations(records)]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0 and arrivals[-1] < 100.0
    assert 150 <= len(arrivals) <= 250  # mean 200, standard deviation about 14


def test_changing_the_rate_keeps_the_content() -> None:
    """Content and arrivals use separate RNGs: a new rate changes times, not prompts."""
    slow = group_conversations(workloads.multi_turn(2, rate=0.5, conversations=5))
    fast = group_conversations(workloads.multi_turn(2, rate=5.0, conversations=5))
    assert [c.turns[0].body for c in slow] == [c.turns[0].body for c in fast]
    assert [c.at for c in slow] != [c.at for c in fast]


def test_a_steady_start_picks_up_conversations_in_progress() -> None:
    """With a steady start the trace opens with conversations under way: picked up at their
    next turn, their earlier turns (and generated replies) sent as history, nothing before
    0, and about rate x a conversation's life of them, as in steady state."""
    shape = workloads.MultiTurnShape(steady_start_s=60.0)
    records = workloads.multi_turn(5, rate=2.0, duration_s=30.0, shape=shape)
    conversations = group_conversations(records)
    assert all(record.at >= 0 for record in records)
    for conversation in conversations:
        first, *later = conversation.turns
        assert first.turn == 0 and not first.append and first.at == conversation.at
        assert [t.turn for t in later] == list(range(1, len(later) + 1))
        assert all(t.append for t in later)
        roles = [m["role"] for m in first.body["messages"]]
        assert roles[0] == "system" and roles[-1] == "user"
        assert roles[1:-1] == ["user", "assistant"] * ((len(roles) - 2) // 2)
    picked_up = [c for c in conversations if len(c.turns[0].body["messages"]) > 2]
    # Turns of 3-10 (mean 6.5), 2 s think + 2.5 s assumed reply: lives of ~25 s, so about
    # 2/s x 25 s = 50 conversations are under way at the start; all of them begin in the
    # first turn gap.
    assert 25 <= len(picked_up) <= 80
    assert all(c.at < 30 for c in picked_up)
    assert max(c.at for c in picked_up) > 1.0  # spread over a turn's gap, not a burst at 0
    again = workloads.multi_turn(5, rate=2.0, duration_s=30.0, shape=shape)
    assert again == records
    assert parse_trace(json.dumps(r.to_json()) for r in records) == records


def test_without_a_steady_start_the_trace_is_unchanged() -> None:
    """steady_start_s = 0 (the default) leaves traces exactly as before."""
    plain = workloads.multi_turn(5, rate=2.0, duration_s=20.0)
    assert workloads.multi_turn(
        5, rate=2.0, duration_s=20.0, shape=workloads.MultiTurnShape(steady_start_s=0.0)
    ) == plain
    assert min(r.at for r in plain) == 0.0


def test_shared_docs_shape() -> None:
    """A few long documents, each followed by many short questions."""
    records = workloads.shared_docs(1, requests=120)
    assert len(records) == 120
    documents: Counter[str] = Counter()
    for record in records:
        assert record.turn == 0 and not record.append
        (message,) = record.body["messages"]
        document, question = message["content"].split("\n\nQuestion: ")
        assert 4000 - WORD_SLACK <= _tokens(document) <= 8000 + WORD_SLACK
        assert _tokens(question) <= 40 + WORD_SLACK and question.endswith("?")
        documents[document] += 1
    assert len(documents) == 4
    assert min(documents.values()) >= 10


def test_unique_prompts_share_no_prefix() -> None:
    """No two unique prompts share their first 64 characters; lengths stay in range."""
    records = workloads.unique(1, requests=300)
    prompts = [r.body["messages"][0]["content"] for r in records]
    assert len({p[:64] for p in prompts}) == len(prompts)
    assert all(500 - WORD_SLACK <= _tokens(p) <= 2000 + WORD_SLACK for p in prompts)


def test_text_looks_like_words() -> None:
    """Pseudo-natural text: capitalized sentences of words, cut to the requested size."""
    text = TextGenerator(random.Random(1)).text(250)
    assert 1000 - WORD_SLACK <= len(text) <= 1000
    assert text[0].isupper() and "  " not in text
    assert all(word.strip(".,").isalpha() for word in text.split())


def test_shape_flags_reach_the_trace(tmp_path: Path) -> None:
    """Ranges and counts given on the command line shape the trace."""
    raw = _cli(
        tmp_path, "multi-turn", "--seed", "1", "--conversations", "6", "--turns", "2",
        "--system-prompts", "1", "--system-tokens", "100-120", "--max-tokens", "5",
        "--model", "tiny", "--think-mean", "0",
    )  # fmt: skip
    records = [json.loads(line) for line in raw.decode().splitlines()]
    assert len(records) == 12
    assert {r["body"]["model"] for r in records} == {"tiny"}
    assert {r["body"]["max_tokens"] for r in records} == {5}
    assert {r["think_s"] for r in records} == {0.0}
    systems = {r["body"]["messages"][0]["content"] for r in records if r["turn"] == 0}
    assert len(systems) == 1


@pytest.mark.parametrize("value", ["0", "5-3", "x", "1-y"])
def test_bad_ranges_are_refused(tmp_path: Path, value: str) -> None:
    """A malformed range is a usage error."""
    with pytest.raises(SystemExit):
        workloads.main(
            ["unique", "--seed", "1", "--out", str(tmp_path / "t"), "--prompt-tokens", value]
        )


def test_conversation_stream_is_endless_and_seeded() -> None:
    """Closed-loop users draw from an endless, seeded stream."""
    first = workloads.conversation_stream("unique", 4)
    again = workloads.conversation_stream("unique", 4)
    taken = [next(first) for _ in range(3)]
    assert taken == [next(again) for _ in range(3)]
    with pytest.raises(ValueError):
        workloads.conversation_stream("nope", 1)


# --- loading users' traces ------------------------------------------------------------------


def _lines(*objects: Any) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objects]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_loader_accepts_bare_bodies() -> None:
    """Bare chat and completions bodies load, with conversation ids and timestamps stripped."""
    records = parse_trace(
        _lines(
            {**CHAT, "conversation_id": "a", "timestamp": 100.0},
            {"model": "m", "prompt": "once upon", "timestamp": 101.5},
            {**CHAT, "conversation_id": "a", "timestamp": 104.0},
            "",
        )
    )
    by_id = {(r.conversation_id, r.turn): r for r in records}
    first, second = by_id["a", 0], by_id["a", 1]
    assert first.body == CHAT and "timestamp" not in second.body
    assert (first.at, second.think_s, second.append) == (0.0, 4.0, False)
    prompt = by_id["line-2", 0]
    assert prompt.kind == "completions" and prompt.at == 1.5


def test_loader_accepts_wrapped_records_and_iso_timestamps() -> None:
    """Wrapped records keep their fields; ISO 8601 timestamps become relative seconds."""
    records = parse_trace(
        _lines(
            {"conversation_id": 7, "turn": 1, "append": True, "think_s": 2, "body": CHAT},
            {"conversation_id": 7, "turn": 0, "at": 3, "body": CHAT},
            {"body": CHAT, "timestamp": "2024-05-01T10:00:00Z"},
            {"body": CHAT, "timestamp": "2024-05-01T10:00:02.5+00:00"},
        )
    )
    conversations = {c.conversation_id: c for c in group_conversations(records)}
    seven = conversations["7"]
    assert [t.turn for t in seven.turns] == [0, 1]
    assert (seven.at, seven.turns[1].think_s, seven.turns[1].append) == (3.0, 2.0, True)
    assert conversations["line-4"].at == 2.5


def test_loaded_records_without_timing_arrive_at_once() -> None:
    """Without at, think_s or timestamps everything starts at 0."""
    records = parse_trace(_lines(CHAT, CHAT))
    assert [r.at for r in records] == [0.0, 0.0]
    assert isinstance(records[0], TraceRecord)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"model": "m"}, "neither a wrapped record"),
        ({"body": CHAT, "turns": 1}, "unknown field(s) 'turns'"),
        ({"body": {"model": "m", "messages": []}}, "'messages' must be a non-empty list"),
        ({"body": {"messages": [{"content": "x"}]}}, "needs a string 'role'"),
        ({"body": {"messages": [{"role": "user", "content": 5}]}}, "content must be"),
        ({"body": {"prompt": "x", "messages": []}}, "exactly one of"),
        ({"body": CHAT, "at": -1}, "'at' must be finite and >= 0"),
        ({"body": CHAT, "turn": "1"}, "'turn' must be an integer"),
        ({"body": CHAT, "append": "yes"}, "'append' must be true or false"),
        ({"body": CHAT, "append": True}, "'append' on the first turn"),
        ({"body": {"prompt": "x"}, "append": True}, "'append' needs a chat body"),
        ({**CHAT, "timestamp": "yesterday"}, "not an ISO 8601 time"),
        ({**CHAT, "max_tokens": 0}, "'max_tokens' must be a positive integer"),
    ],
)
def test_loader_rejects_bad_lines_with_their_numbers(line: Any, message: str) -> None:
    """Each kind of bad line is reported with its line number."""
    with pytest.raises(TraceError) as caught:
        parse_trace(_lines(CHAT, line), source="mine.jsonl")
    assert caught.value.errors[0][0] == 2
    assert message in str(caught.value)
    assert str(caught.value).startswith("mine.jsonl:2: ")


def test_loader_reports_every_bad_line() -> None:
    """All bad lines are listed, not just the first."""
    with pytest.raises(TraceError) as caught:
        parse_trace(_lines(CHAT, "x", CHAT, "[]", "{}"))
    assert [line for line, _ in caught.value.errors] == [2, 4, 5]


def test_loader_rejects_repeated_turns() -> None:
    """Two lines claiming the same turn of a conversation are an error at the second."""
    with pytest.raises(TraceError) as caught:
        parse_trace(
            _lines(
                {"conversation_id": "a", "turn": 0, "body": CHAT},
                {"conversation_id": "a", "turn": 0, "body": CHAT},
            )
        )
    assert caught.value.errors[0][0] == 2 and "repeats line 1" in str(caught.value)


def test_load_trace_reads_files(tmp_path: Path) -> None:
    """load_trace names the file in its errors."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHAT) + "\n{\n", encoding="utf-8")
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: not valid JSON"):
        load_trace(path)
