"""The key tuner on small hand-made traces whose answers are known, and its invariants."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import KeyMode, RoutingSettings
from balancer.prefix import Kind, routing_key
from balancer.trace import TraceRecord, group_conversations
from balancer.tune import (
    Candidate,
    CandidateReport,
    TuneReport,
    as_json,
    default_candidates,
    placeholder_reply,
    render,
    trace_keys,
    tune,
)

MODEL = "m"
FIRST_USER = KeyMode.FIRST_USER_MESSAGE
DEFAULT = Candidate.from_settings(RoutingSettings())

TEMPLATE = ("You are the support assistant of Acme Corp. Answer the customer's question below "
            "politely, in at most three sentences, and never promise refunds or delivery "
            "dates. If the question is not about Acme products, say so and stop. Cite the "
            "manual section when you can. Customer question follows:\n").ljust(300, ".")
QUESTIONS = [f"{letter} question about my order number {i}, which came broken and late?"
             for i, letter in enumerate("ABCDEF")]
DOCUMENT = "Document 1.\n\n" + " ".join(f"word{i}" for i in range(600))  # ~4,300 characters
GREETINGS = ["hi", "hi", "hi", "Hello!", "hi", "Hello!"]


def chat(*messages: tuple[str, str]) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": r, "content": c} for r, c in messages]}


def conversation(conversation_id: str, first: dict[str, Any], *later: str) -> list[TraceRecord]:
    """A harness-style conversation: a full first body, then appended user messages."""
    records = [TraceRecord(conversation_id, 0, 0.0, 0.0, False, first)]
    records += [TraceRecord(conversation_id, turn, 0.0, 1.0, True, chat(("user", text)))
                for turn, text in enumerate(later, start=1)]
    return records


def templated() -> list[TraceRecord]:
    """Six three-turn conversations whose first messages open with one 300-character template."""
    return [r for i, q in enumerate(QUESTIONS)
            for r in conversation(f"t{i}", chat(("user", TEMPLATE + q)),
                                  f"thanks {i}", f"and another thing {i}")]


def greetings() -> list[TraceRecord]:
    """Six conversations that open with a greeting, then say what they want."""
    return [r for i, g in enumerate(GREETINGS)
            for r in conversation(f"g{i}", chat(("user", g)),
                                  f"I need help with invoice {i}", f"it is due on day {i}")]


def documents() -> list[TraceRecord]:
    """Eight single questions about one 4,300-character document."""
    return [TraceRecord(f"d{i}", 0, 0.0, 0.0, False,
                        chat(("user", f"{DOCUMENT}\n\nQuestion: what does part {i} say?")))
            for i in range(8)]


def by_candidate(report: TuneReport) -> dict[tuple[KeyMode, int, int], CandidateReport]:
    return {(r.candidate.key, r.candidate.prefix_chars, r.candidate.min_key_chars): r
            for r in report.candidates}


def first_user(prefix_chars: int, min_key_chars: int = 64) -> Candidate:
    return Candidate.of(FIRST_USER, prefix_chars, min_key_chars)


def run(records: list[TraceRecord], current: Candidate = DEFAULT, **kw: Any) -> TuneReport:
    return tune(records, default_candidates(current), current, **kw)


# --- known answers ----------------------------------------------------------------------------


def test_templated_openings_collide_at_100_and_separate_at_1000() -> None:
    """Six conversations share one key while the key ends inside the template."""
    found = by_candidate(run(templated()))
    at_100 = found[FIRST_USER, 100, 64]
    assert (at_100.keys, at_100.conversations_per_key_max) == (1, 6)
    assert (at_100.colliding_conversations, at_100.colliding_requests) == (6, 18)
    assert at_100.hottest_share == 1.0
    assert at_100.crowd is not None and at_100.crowd.conversations == 6
    assert at_100.crowd.common_chars == len(TEMPLATE)
    at_1000 = found[FIRST_USER, 1000, 64]
    assert (at_1000.keys, at_1000.conversations_per_key_max) == (6, 1)
    assert (at_1000.colliding_conversations, at_1000.colliding_requests) == (0, 0)
    assert at_1000.crowd is None
    assert (at_1000.changes_at_turn_2, at_1000.changes_later) == (0, 0)


def test_a_templated_trace_moves_a_short_key_past_the_template() -> None:
    """From prefix_chars 100 the tuner recommends the shortest key that reaches the question,
    and says why in words."""
    report = run(templated(), current=first_user(100, 0))
    assert report.recommended.candidate == first_user(500, 0)
    assert report.recommended is not report.current
    assert report.reason.startswith("prefix_chars 100, min_key_chars 0 gives 6 of 6 "
                                    "conversations a key that another conversation also has")
    assert "same 300-character text" in report.reason
    assert "prefix_chars 500, min_key_chars 0 leaves 0 such conversations" in report.reason


def test_nothing_beats_the_default_on_a_templated_trace() -> None:
    """Ties go to the current setting, and the tuner says to keep it."""
    report = run(templated())
    assert report.recommended is report.current
    assert report.reason.startswith("keep the current setting (prefix_chars 1000, "
                                    "min_key_chars 64): no candidate does better")


def test_greetings_collide_without_min_key_chars() -> None:
    """Without min_key_chars every turn of a greeting conversation keys on the greeting."""
    found = by_candidate(run(greetings()))
    plain = found[FIRST_USER, 1000, 0]
    assert plain.keys == 2  # "hi" and "Hello!"
    assert (plain.colliding_conversations, plain.colliding_requests) == (6, 18)
    assert plain.conversations_per_key_max == 4
    assert (plain.changes_at_turn_2, plain.changes_later) == (0, 0)


def test_greetings_separate_from_turn_2_with_min_key_chars() -> None:
    """With min_key_chars the key goes on into the reply and the next message: one move at
    turn 2, then one key per conversation; only the first turns still collide."""
    found = by_candidate(run(greetings()))
    extended = found[FIRST_USER, 1000, 64]
    assert extended.keys == 2 + 6
    assert (extended.changes_at_turn_2, extended.changes_later) == (6, 0)
    assert extended.colliding_requests == 6
    assert extended.conversations_changed_later == 0


def test_a_greeting_trace_recommends_min_key_chars() -> None:
    """Switched off, min_key_chars is recommended back, with fewer colliding requests as the
    reason."""
    report = run(greetings(), current=first_user(1000, 0))
    assert report.recommended.candidate == first_user(1000, 64)
    assert "(18 of 18 requests)" in report.reason
    assert "same 2-character text ('hi')" in report.reason
    assert "leaves 6 such conversations (6 requests)" in report.reason


def test_shared_documents_stay_grouped_while_the_key_ends_inside_the_document() -> None:
    """A document's questions share a key at every length that ends inside the document; they
    count as grouped, not as colliding."""
    report = run(documents())
    assert (report.shared_groups, report.shared_conversations) == (1, 8)
    found = by_candidate(report)
    grouped = found[FIRST_USER, 1000, 64]
    assert (grouped.keys, grouped.split_groups, grouped.split_requests) == (1, 0, 0)
    assert grouped.colliding_conversations == 0  # grouping a shared document is the point
    split = found[FIRST_USER, 4000, 64]
    assert (split.split_groups, split.split_requests) == (0, 0)
    beyond = found[FIRST_USER, 4000, 0]
    assert beyond.keys == 1  # the document is longer than 4,000 characters


def test_a_key_that_reaches_into_the_question_splits_the_document() -> None:
    """With a short document the longest keys take in the question: seven of eight requests
    leave their group's key, and the tuner recommends a key that keeps them together."""
    short = "Manual.\n\n" + " ".join(f"term{i}" for i in range(500))  # ~3,400 characters
    records = [TraceRecord(f"d{i}", 0, 0.0, 0.0, False,
                           chat(("user", f"{short}\n\nQuestion: part {i}?")))
               for i in range(8)]
    report = run(records, current=first_user(4000))
    split = report.current
    assert (split.keys, split.split_groups, split.split_requests) == (8, 1, 7)
    assert report.recommended.split_requests == 0
    assert report.reason.startswith("prefix_chars 4000, min_key_chars 64 splits 1 of the 1 "
                                    "shared openings")
    assert report.reason.endswith("keeps them grouped")


def test_prompt_prefix_groups_by_system_prompt() -> None:
    """prompt-prefix keys on the system prompt, so its conversations share a key; the first
    user message keeps them apart."""
    systems = ["A" * 1200, "B" * 1200]
    records = [r for i in range(6)
               for r in conversation(f"s{i}", chat(("system", systems[i % 2]),
                                                   ("user", f"question {i} " * 10)),
                                     f"follow-up {i}")]
    found = by_candidate(run(records))
    prompt = found[KeyMode.PROMPT_PREFIX, 1000, 0]
    assert (prompt.keys, prompt.conversations_per_key_max) == (2, 3)
    assert prompt.colliding_conversations == 6
    assert found[FIRST_USER, 1000, 64].keys == 6


def test_a_prompt_prefix_key_shorter_than_the_prompt_changes_every_turn() -> None:
    """With a short system prompt a long prompt-prefix key grows with the history: the tuner
    counts the changes after turn 2 as lost affinity and steers away from it."""
    records = [r for i in range(3)
               for r in conversation(f"c{i}", chat(("system", "Be brief."),
                                                   ("user", f"question {i} " * 5)),
                                     "more " * 40, "again " * 40, "last " * 40)]
    report = run(records, current=Candidate.of(KeyMode.PROMPT_PREFIX, 1000, 0))
    assert report.current.changes_later == 6
    assert report.current.conversations_changed_later == 3
    assert report.recommended.changes_later == 0
    assert "after their second turn" in report.reason


def test_full_histories_key_like_appended_turns() -> None:
    """A bare trace carrying whole histories gives the keys that the appended form does when
    its replies are the placeholders."""
    appended = greetings() + templated()
    full = []
    for conv in group_conversations(appended):
        history: list[dict[str, Any]] = []
        for record in conv.turns:
            if record.append:
                history = [*history,
                           {"role": "assistant",
                            "content": placeholder_reply(conv.conversation_id, record.turn)},
                           *record.body["messages"]]
            else:
                history = list(record.body["messages"])
            full.append(TraceRecord(conv.conversation_id, record.turn, 0.0, 0.0, False,
                                    {"model": MODEL, "messages": history}))
    for candidate in default_candidates(DEFAULT):
        assert sorted(trace_keys(appended, candidate)) == sorted(trace_keys(full, candidate))


def test_requests_the_proxy_would_refuse_are_left_out_and_noted() -> None:
    """A body without a model is a 400 at the proxy: counted, named, not keyed."""
    bad = TraceRecord("bad", 0, 0.0, 0.0, False, {"messages": [{"role": "user", "content": "x"}]})
    records = [*templated(), bad]
    report = run(records)
    assert report.requests == 18
    assert [(r.conversation_id, r.turn) for r in report.refused] == [("bad", 0)]
    assert any("'model' must be a non-empty string" in note for note in report.notes)


def test_appended_turns_are_noted_as_placeholder_replies() -> None:
    report = run(greetings())
    assert report.appended_turns == 12
    assert any("placeholder distinct per conversation and turn" in n for n in report.notes)
    assert not any("placeholder" in n for n in run(documents()).notes)


def test_the_current_setting_is_added_when_it_is_not_a_default_candidate() -> None:
    current = first_user(1500, 32)
    candidates = default_candidates(current)
    assert candidates[0] == current and len(candidates) == 20
    assert len(default_candidates(DEFAULT)) == 19
    assert Candidate.of(KeyMode.PROMPT_PREFIX, 1000, 64) in default_candidates(DEFAULT)


def test_the_table_marks_the_current_and_recommended_rows() -> None:
    text = render(run(templated(), current=first_user(100, 0)))
    rows = {line.split()[1] + "/" + line.split()[2]: line for line in text.splitlines()
            if line.startswith(("first-user-message", "prompt-prefix"))}
    assert len(rows) == 19
    assert rows["100/0"].endswith("<- current")
    assert rows["500/0"].endswith("<- recommended")
    assert "recommended: prefix_chars 500, min_key_chars 0\n" in text


def test_json_shape() -> None:
    """One entry per candidate with the documented fields; exactly one current and one
    recommended."""
    result = as_json(run(documents(), pods=8, shared_chars=1000))
    assert set(result) == {"trace", "pods", "fair_share", "shared_chars", "top_keys",
                           "candidates", "recommendation", "notes"}
    assert (result["pods"], result["fair_share"], result["shared_chars"]) == (8, 0.125, 1000)
    assert result["trace"]["shared_openings"] == {"groups": 1, "conversations": 8}
    first = result["candidates"][0]
    assert set(first) == {"key", "prefix_chars", "min_key_chars", "current", "recommended",
                          "requests", "conversations", "keys", "conversations_per_key",
                          "colliding", "hottest_key", "most_shared_key", "top_keys_share",
                          "key_changes", "split_shared"}
    assert sum(c["current"] for c in result["candidates"]) == 1
    assert sum(c["recommended"] for c in result["candidates"]) == 1
    assert set(result["recommendation"]) == {"key", "prefix_chars", "min_key_chars",
                                             "is_current", "reason"}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="pods"):
        tune(templated(), [DEFAULT], DEFAULT, pods=0)
    with pytest.raises(ValueError, match="shared_chars"):
        tune(templated(), [DEFAULT], DEFAULT, shared_chars=0)


# --- invariants -------------------------------------------------------------------------------

WORDS = st.sampled_from(["hi", "Hello!", "the", "order", TEMPLATE, DOCUMENT, "x" * 70, ""])
TEXT = st.lists(WORDS, min_size=1, max_size=3).map(" ".join)
ROLE = st.sampled_from(["system", "user", "assistant", "tool"])
MESSAGE = st.builds(lambda r, c: {"role": r, "content": c}, ROLE, TEXT)


@st.composite
def traces(draw: st.DrawFn) -> list[TraceRecord]:
    records = []
    for c in range(draw(st.integers(1, 5))):
        model = draw(st.sampled_from(["m", "n"]))
        for turn in range(draw(st.integers(1, 4))):
            append = turn > 0 and draw(st.booleans())
            messages = draw(st.lists(MESSAGE, min_size=1, max_size=4))
            records.append(TraceRecord(f"c{c}", turn, 0.0, 0.0, append,
                                       {"model": model, "messages": messages}))
    return records


CANDIDATES = [first_user(10, 0), first_user(100, 64), first_user(4000, 128),
              Candidate.of(KeyMode.PROMPT_PREFIX, 50, 0),
              Candidate.of(KeyMode.PROMPT_PREFIX, 3000, 0)]


@settings(max_examples=150, deadline=None)
@given(traces())
def test_counts_add_up(records: list[TraceRecord]) -> None:
    """Requests are the sum over keys, every key has a conversation, the hottest key is one of
    the top ten, and a conversation changes key at most once per turn after its first."""
    report = tune(records, CANDIDATES, CANDIDATES[0], shared_chars=100)
    conversations = {r.conversation_id for r in records}
    for r in report.candidates:
        counts = Counter(k for _, _, k in trace_keys(records, r.candidate))
        assert r.requests == sum(counts.values()) == len(records)
        assert r.keys == len(counts) and r.hottest_requests == max(counts.values())
        assert r.conversations == len(conversations)
        assert r.conversations_per_key_max >= 1
        assert r.conversations_per_key_mean * r.keys >= r.conversations
        assert r.hottest_requests <= r.top_requests <= r.requests
        assert r.colliding_requests <= r.requests
        assert r.changes_at_turn_2 + r.changes_later <= r.requests - r.conversations
        assert r.split_requests <= r.requests
    assert report.recommended in report.candidates


@settings(max_examples=150, deadline=None)
@given(traces())
def test_the_tuner_keys_every_request_as_the_proxy_does(records: list[TraceRecord]) -> None:
    """Reading only the messages a key needs, and reusing settled keys, changes no key: the
    tuner agrees with routing_key on each request's whole rebuilt body."""
    expected = []
    for conv in group_conversations(records):
        history: list[dict[str, Any]] = []
        for record in conv.turns:
            new = record.body["messages"]
            history = ([*history, {"role": "assistant", "content": placeholder_reply(
                conv.conversation_id, record.turn)}, *new] if record.append else list(new))
            expected.append((conv.conversation_id, record.turn, {**record.body,
                                                                 "messages": history}))
    for candidate in CANDIDATES:
        want = sorted((cid, turn, hash(routing_key(Kind.CHAT, body, candidate.key,
                                                   candidate.prefix_chars,
                                                   candidate.min_key_chars)))
                      for cid, turn, body in expected)
        assert sorted(trace_keys(records, candidate)) == want
