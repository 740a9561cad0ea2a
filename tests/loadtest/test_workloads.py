"""Seeded workload generators, the trace format and the loader for users' own traces."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loadtest import workloads
from loadtest.trace import (
    Conversation,
    TraceError,
    TraceRecord,
    dump_trace,
    group_conversations,
    load_trace,
    parse_trace,
    write_trace,
)
from loadtest.workloads import (
    AGENT_SHAPE,
    CHARS_PER_TOKEN,
    GREETINGS,
    TEMPLATE_DISTINCT_CHARS,
    MultiTurnShape,
    TextGenerator,
)

WORD_SLACK = 30
"""Texts are cut at a word boundary, so they may be this many characters short."""


def _cli(tmp_path: Path, name: str, *args: str) -> bytes:
    out = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.jsonl"
    assert workloads.main([name, "--out", str(out), *args]) == 0
    return out.read_bytes()


def _tokens(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN


@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_same_seed_writes_the_same_file(tmp_path: Path, name: str) -> None:
    """A seed fixes the trace byte for byte; another seed gives another trace."""
    first = _cli(tmp_path, name, "--seed", "7", "--duration", "10")
    again = _cli(tmp_path, name, "--seed", "7", "--duration", "10")
    other = _cli(tmp_path, name, "--seed", "8", "--duration", "10")
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
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


# --- workloads that look like real apps ------------------------------------------------------

GREETING_TEXTS = {greeting for greeting, _ in GREETINGS}

PINNED_MULTI_TURN = {
    "plain": "cc5b2d92574a5d3d70ce8eed2c0f17c9702194f0188a2c56681baacb94a767a1",
    "steady": "3b02cd3914622dbd325bbbf45a77c27ef256a3202cb3dc0ee072557a7be098de",
}
"""SHA-256 of two multi-turn traces (seed 1, 2/s for 20 s; plain, and started in steady state
with recorded history), as written before templates, greetings and tools existed: the
measurements in the README were made on these conversations."""


def _digest(records: list[TraceRecord]) -> str:
    out = io.StringIO()
    write_trace(records, out)
    return hashlib.sha256(out.getvalue().encode()).hexdigest()


def _first_user(conversation: Conversation) -> str:
    content: str = next(
        m["content"] for m in conversation.turns[0].body["messages"] if m["role"] == "user"
    )
    return content


def test_multi_turn_traces_are_byte_for_byte_as_before() -> None:
    """The new shape fields at their defaults draw nothing: multi-turn traces are unchanged."""
    plain = workloads.multi_turn(1, rate=2.0, duration_s=20.0)
    steady = workloads.multi_turn(
        1, rate=2.0, duration_s=20.0,
        shape=MultiTurnShape(steady_start_s=40.0, history_turns=(1, 3)),
    )  # fmt: skip
    assert _digest(plain) == PINNED_MULTI_TURN["plain"]
    assert _digest(steady) == PINNED_MULTI_TURN["steady"]
    assert all("temperature" not in r.body and "tools" not in r.body for r in plain)


def test_templated_openings_come_in_the_configured_shares() -> None:
    """About 70% of conversations open with one of 4 templates of 150-400 characters before the
    user's own question, about 15% with a greeting alone, the rest with a plain question."""
    conversations = group_conversations(workloads.templated(1, conversations=400))
    assert len(conversations) == 400
    templates: Counter[str] = Counter()
    greeted = plain = 0
    for conversation in conversations:
        first = _first_user(conversation)
        if first in GREETING_TEXTS:
            greeted += 1
        elif "\n\n" in first:
            template, own = first.split("\n\n")
            templates[template] += 1
            assert own.endswith("?")
        else:
            plain += 1
            assert first.endswith("?")
        assert all(t.body["temperature"] == 0.7 for t in conversation.turns)
    # Binomial over 400: standard deviations of 2.3 (templated) and 1.8 (greeting) points.
    assert 0.63 <= sum(templates.values()) / 400 <= 0.77
    assert 0.10 <= greeted / 400 <= 0.20
    assert plain == 400 - greeted - sum(templates.values())
    assert len(templates) == 4 and min(templates.values()) >= 30
    assert all(150 - WORD_SLACK <= len(t) <= 400 for t in templates)
    assert len({t[:TEMPLATE_DISTINCT_CHARS] for t in templates}) == 4


@pytest.mark.parametrize("kind", ["app", "task"])
def test_templates_differ_in_their_first_50_characters(kind: str) -> None:
    """Even with more templates than openings, no two templates share their first 50
    characters, and each reads as instructions from its first word."""
    shape = MultiTurnShape(
        templates=12, template_share=1.0, template_kind=kind, template_chars=(150, 200)
    )
    records = workloads.multi_turn(4, conversations=300, shape=shape)
    templates = {_first_user(c).split("\n\n")[0] for c in group_conversations(records)}
    assert len(templates) == 12
    assert len({t[:TEMPLATE_DISTINCT_CHARS] for t in templates}) == 12
    assert all(t[0].isupper() and 150 - WORD_SLACK <= len(t) <= 200 for t in templates)


def test_greeting_conversations_ask_their_question_in_the_second_message() -> None:
    """About 60% of conversations open with a greeting alone, a few greetings most of the time;
    their second user message is the question."""
    conversations = group_conversations(workloads.greetings(2, conversations=300))
    greetings: Counter[str] = Counter()
    for conversation in conversations:
        first = _first_user(conversation)
        if first not in GREETING_TEXTS:
            assert first.endswith("?")
            continue
        greetings[first] += 1
        opening, second, *_ = conversation.turns
        assert [m["role"] for m in opening.body["messages"]] == ["system", "user"]
        assert second.append and second.turn == 1
        (question,) = second.body["messages"]
        assert question["role"] == "user" and question["content"].endswith("?")
        assert 4 <= len(conversation.turns) <= 11  # the greeting, then 3-10 turns
    share = sum(greetings.values()) / 300
    assert 0.52 <= share <= 0.68  # binomial over 300: standard deviation 2.8 points
    top = [count for _, count in greetings.most_common(3)]
    assert top[0] / sum(greetings.values()) >= 0.15  # "hi" is about a quarter
    assert sum(top) / sum(greetings.values()) >= 0.4
    assert len(greetings) >= 8


def test_a_picked_up_greeting_conversation_keeps_its_greeting_first() -> None:
    """With recorded history, the greeting (and a short reply to it) opens the history."""
    shape = replace(workloads.GREETINGS_SHAPE, history_turns=(1, 2))
    conversations = group_conversations(workloads.multi_turn(3, conversations=60, shape=shape))
    opened = [c for c in conversations if _first_user(c) in GREETING_TEXTS]
    assert opened
    for conversation in opened:
        system, greeting, reply, question, *_ = conversation.turns[0].body["messages"]
        roles = [m["role"] for m in (system, greeting, reply, question)]
        assert roles == ["system", "user", "assistant", "user"]
        assert _tokens(reply["content"]) <= 30


def test_agent_sessions_carry_tools_and_append_tool_results() -> None:
    """Agent sessions: 2 long system prompts, each with its own 5-10 function tools sent in
    every body; a task first, then 8-20 short turns that append one tool message each, 0.1-0.5
    s apart; the trace parser reads it all back."""
    records = workloads.agent(3, conversations=40)
    conversations = group_conversations(records)
    tools_of: dict[str, list[Any]] = {}
    for conversation in conversations:
        first, *later = conversation.turns
        assert 8 <= len(conversation.turns) <= 20
        system, task = first.body["messages"]
        assert system["role"] == "system" and task["role"] == "user"
        assert 4000 - WORD_SLACK <= _tokens(system["content"]) <= 6000 + WORD_SLACK
        tools = first.body["tools"]
        assert tools_of.setdefault(system["content"], tools) == tools
        assert 5 <= len(tools) <= 10
        assert len({tool["function"]["name"] for tool in tools}) == len(tools)
        for tool in tools:
            assert tool["type"] == "function"
            parameters = tool["function"]["parameters"]
            assert parameters["type"] == "object" and parameters["properties"]
            assert set(parameters["required"]) <= set(parameters["properties"])
        for turn in later:
            assert turn.append and 0.1 <= turn.think_s <= 0.5
            assert turn.body["tools"] == tools and turn.body["temperature"] == 0.7
            (message,) = turn.body["messages"]
            assert message["role"] == "tool" and message["tool_call_id"]
            assert 50 - WORD_SLACK <= _tokens(message["content"]) <= 300
    assert len(tools_of) == 2
    think = [t.think_s for c in conversations for t in c.turns[1:]]
    assert 0.27 <= sum(think) / len(think) <= 0.33
    templated = [c for c in conversations if "\n\n" in _first_user(c)]
    assert 0.25 <= len(templated) / len(conversations) <= 0.75  # half, over 40
    assert parse_trace(json.dumps(r.to_json()) for r in records) == records


def test_new_workloads_have_their_own_conversation_ids_and_streams() -> None:
    """Each preset names its conversations apart and streams the same conversations as its
    trace generator."""
    for name, prefix in [("templated", "tp"), ("greetings", "gr"), ("agent", "ag")]:
        stream = workloads.conversation_stream(name, 5)
        streamed = [next(stream) for _ in range(3)]
        generated = group_conversations(workloads.generate(name, 5, conversations=3))
        assert [c.conversation_id for c in streamed] == [f"{prefix}-0000{i}" for i in range(3)]
        assert [c.turns[0].body for c in streamed] == [c.turns[0].body for c in generated]


@pytest.mark.parametrize(
    "changes",
    [
        {"template_share": 0.5},  # no templates to open with
        {"templates": 2, "template_share": 0.8, "greeting_share": 0.3},
        {"greeting_share": 1.5},
        {"template_kind": "poem"},
        {"tools": (4, 2)},
        {"think_range_s": (0.5, 0.1)},
        {"temperature": -1.0},
    ],
)
def test_impossible_shapes_are_refused(changes: dict[str, Any]) -> None:
    """Shares outside 0..1 or adding up past 1, unknown kinds and reversed ranges raise."""
    with pytest.raises(ValueError):
        MultiTurnShape(**changes)


def test_parse_shape_starts_from_the_workloads_preset() -> None:
    """``--shape`` changes a preset's fields and keeps the rest; float ranges parse too."""
    shape = workloads.parse_shape("agent", ["tools=3", "think_range_s=0.2-0.4"])
    assert shape.tools == (3, 3) and shape.think_range_s == (0.2, 0.4)
    assert shape.system_tokens == AGENT_SHAPE.system_tokens
    assert workloads.parse_shape("templated", []) == workloads.TEMPLATED_SHAPE
    with pytest.raises(ValueError, match="greeting_share"):
        workloads.parse_shape("templated", ["greeting_share=0.5"])  # 0.7 + 0.5 > 1
    with pytest.raises(ValueError, match="not a float"):
        workloads.parse_shape("greetings", ["greeting_share=lots"])


def test_preset_commands_take_flags_and_shape_fields(tmp_path: Path) -> None:
    """The preset subcommands start from their preset; flags and ``--shape`` change it."""
    raw = _cli(
        tmp_path, "agent", "--seed", "1", "--conversations", "3", "--turns", "2",
        "--shape", "tools=2", "--shape", "temperature=0.2",
    )  # fmt: skip
    records = [json.loads(line) for line in raw.decode().splitlines()]
    assert len(records) == 6
    assert all(len(r["body"]["tools"]) == 2 and r["body"]["temperature"] == 0.2 for r in records)
    assert {r["body"]["messages"][0]["role"] for r in records if r["turn"] == 1} == {"tool"}
    with pytest.raises(SystemExit):
        _cli(tmp_path, "templated", "--seed", "1", "--shape", "greeting_share=0.9")


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
