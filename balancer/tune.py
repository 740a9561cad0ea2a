"""Offline key tuning: how well each routing-key setting would separate a trace's conversations.

``balancer tune --trace FILE`` reads a trace (:mod:`balancer.trace`: the harness's own or a
user's recorded OpenAI bodies), builds the key every candidate setting (key mode,
``prefix_chars``, ``min_key_chars``) would give every request, with
:func:`balancer.prefix.routing_key` itself so the tuner and the proxy cannot disagree, and
measures per candidate:

* keys and conversations per key (mean, max). A key that several conversations share is a
  collision: CHWBL sends them to one pod until the load bound spills them at random.
* colliding conversations and requests: those (outside shared openings, below) whose key
  another conversation also has.
* the hottest key's share of requests and the top ten keys' share, against a fair share of
  ``1/pods``: a key hotter than that cannot stay on one pod.
* key changes within a conversation: at turn 2 (one move, expected when a greeting's key goes
  on into the reply) and later (affinity lost mid-conversation).
* split shared openings: conversations whose first user message (or prompt) shares at least
  ``shared_chars`` leading characters with another conversation's (a shared document) are
  meant to share a pod's cache; a request whose key differs from its group's usual key is
  split off.

Histories. An ``append`` turn is rebuilt as the player sends it: the previous request's
messages, the assistant reply, the new messages. The real reply is not in the trace, so a
placeholder stands in that is distinct per conversation and turn, as a sampled reply would be.
Bodies with full histories (recorded traffic) are used as they are. Requests the proxy would
refuse (400) are counted and left out.

Recommendation (:func:`recommend`): candidates are ranked by, in order, fewer key changes after
turn 2, fewer split shared-opening requests, fewer colliding requests, fewer moves at turn 2,
a cooler hottest key (last: a key that moves spreads a conversation's requests over two keys,
which cools the hottest one without helping). Ties go to the current setting, then to the
smallest change from it (its ``prefix_chars``, its ``min_key_chars``), then to the shorter key
(``prefix_chars``, then ``min_key_chars``), then to ``first-user-message``.

Cost: a key depends only on the first few messages (:func:`_read_count`), so each call gets
those alone, and a conversation whose key can no longer change (the messages it reads are all
there and an ``append`` turn only adds after them) reuses its key. Candidates are measured one
at a time, so memory holds one candidate's key counts.
"""

from __future__ import annotations

import dataclasses
import heapq
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from balancer.config import KeyMode, RoutingSettings
from balancer.errors import BadRequestError
from balancer.prefix import EXTENDED_MESSAGES, Kind, key_text, routing_key, validate
from balancer.trace import TraceRecord, group_conversations

DEFAULT_PODS: Final = 4
"""Pods the hottest key's share is compared with (fair share ``1/pods``)."""

DEFAULT_SHARED_CHARS: Final = 2000
"""Leading characters two conversations' openings must share to count as a shared document:
about 500 tokens, a prefix worth a pod's cache. App templates (150-400 characters) are not."""

PREFIX_CHARS_GRID: Final = (100, 250, 500, 1000, 2000, 4000)
MIN_KEY_CHARS_GRID: Final = (0, 64, 128)
PROMPT_PREFIX_CHARS: Final = 1000

TOP_KEYS: Final = 10

WHOLE: Final = 1 << 62
"""``prefix_chars`` that cuts nothing: the whole text a key is taken from."""


@dataclass(frozen=True, order=True)
class Candidate:
    """One routing-key setting. ``min_key_chars`` is 0 under prompt-prefix (it is unused)."""

    key: KeyMode
    prefix_chars: int
    min_key_chars: int

    @classmethod
    def of(cls, key: KeyMode, prefix_chars: int, min_key_chars: int) -> Candidate:
        return cls(key, prefix_chars, 0 if key is KeyMode.PROMPT_PREFIX else min_key_chars)

    @classmethod
    def from_settings(cls, routing: RoutingSettings) -> Candidate:
        return cls.of(routing.key, routing.prefix_chars, routing.min_key_chars)

    @property
    def label(self) -> str:
        if self.key is KeyMode.PROMPT_PREFIX:
            return f"prompt-prefix {self.prefix_chars}"
        return f"prefix_chars {self.prefix_chars}, min_key_chars {self.min_key_chars}"


def default_candidates(current: Candidate) -> list[Candidate]:
    """The current setting, the first-user-message grid and prompt-prefix at 1000."""
    grid = [Candidate.of(KeyMode.FIRST_USER_MESSAGE, p, m)
            for p in PREFIX_CHARS_GRID for m in MIN_KEY_CHARS_GRID]
    grid.append(Candidate.of(KeyMode.PROMPT_PREFIX, PROMPT_PREFIX_CHARS, 0))
    if current not in grid:
        grid.insert(0, current)
    return grid


@dataclass(frozen=True)
class Crowd:
    """The key most conversations share (shared openings aside), and the text they all open
    with."""

    conversations: int
    common_chars: int
    opening: str


@dataclass
class CandidateReport:
    candidate: Candidate
    requests: int = 0
    conversations: int = 0
    keys: int = 0
    conversations_per_key_mean: float = 0.0
    conversations_per_key_max: int = 0
    colliding_keys: int = 0
    colliding_conversations: int = 0
    colliding_requests: int = 0
    hottest_requests: int = 0
    top_requests: int = 0
    changes_at_turn_2: int = 0
    changes_later: int = 0
    conversations_changed_later: int = 0
    split_groups: int = 0
    split_requests: int = 0
    crowd: Crowd | None = None

    @property
    def hottest_share(self) -> float:
        return self.hottest_requests / self.requests if self.requests else 0.0

    @property
    def top_share(self) -> float:
        return self.top_requests / self.requests if self.requests else 0.0

    def rank(self) -> tuple[int, int, int, int, int]:
        """What :func:`recommend` compares, worst news first (lower is better)."""
        return (self.changes_later, self.split_requests, self.colliding_requests,
                self.changes_at_turn_2, self.hottest_requests)


@dataclass(frozen=True)
class Refused:
    """A request the proxy would answer with 400, and why."""

    conversation_id: str
    turn: int
    message: str


@dataclass
class TuneReport:
    requests: int
    conversations: int
    appended_turns: int
    shared_groups: int
    shared_conversations: int
    refused: list[Refused]
    pods: int
    shared_chars: int
    candidates: list[CandidateReport]
    current: CandidateReport
    recommended: CandidateReport
    reason: str
    notes: list[str] = field(default_factory=list)


# --- the requests as the proxy would see them --------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    """One keyed request. A chat request's messages are ``messages[:length]``: the turns of an
    appending conversation share one growing list."""

    conversation: int
    position: int
    turn: int
    kind: Kind
    body: Mapping[str, Any]
    model: str
    messages: list[Any] | None
    length: int
    first_user: int | None
    group: int | None


def placeholder_reply(conversation_id: str, turn: int) -> str:
    """Stands in for the reply an ``append`` turn follows (not in the trace)."""
    return f"(reply before turn {turn} of conversation {conversation_id}: not in the trace)"


def _first_user(messages: list[Any], length: int) -> int | None:
    for i in range(length):
        if messages[i].get("role") == "user":
            return i
    return None


def _read_count(request: _Request, key: KeyMode, prefix_chars: int) -> tuple[int, bool]:
    """How many leading messages :func:`key_text` can read, and whether they are all there.

    At least as many as it reads: under first-user-message the first user message and the
    :data:`EXTENDED_MESSAGES` after it; otherwise (or with no user message yet) messages until
    their rendered text (``role:content\\n``, counting only string content, so never more than
    the real text) reaches ``prefix_chars``. Complete means later appended messages cannot
    change the key.
    """
    messages = request.messages
    assert messages is not None
    length = request.length
    if key is KeyMode.FIRST_USER_MESSAGE:
        if request.first_user is not None:
            need = request.first_user + 1 + EXTENDED_MESSAGES
            return min(need, length), length >= need
        # No user message yet: the rendered prompt now, the user message once one is appended.
        return length, False
    size = 0
    for i in range(length):
        message = messages[i]
        content = message.get("content")
        size += len(message["role"]) + 2 + (len(content) if isinstance(content, str) else 0)
        if size >= prefix_chars:
            return i + 1, True
    return length, False


def _key_body(request: _Request, count: int) -> Mapping[str, Any]:
    if request.messages is None:
        return request.body
    return {"model": request.model, "messages": request.messages[:count]}


def _text(request: _Request, key: KeyMode, prefix_chars: int, min_key_chars: int) -> str:
    """:func:`key_text` of the request, from the messages it reads."""
    count = _read_count(request, key, prefix_chars)[0] if request.messages is not None else 0
    return key_text(request.kind, _key_body(request, count), key, prefix_chars, min_key_chars)


@dataclass
class _Prepared:
    requests: list[_Request]
    conversation_ids: list[str]
    appended_turns: int
    refused: list[Refused]
    shared_groups: int
    shared_conversations: int


def _prepare(records: Iterable[TraceRecord], shared_chars: int) -> _Prepared:
    """Rebuild every request's body as sent, validate it, and find the shared openings."""
    requests: list[_Request] = []
    conversation_ids: list[str] = []
    refused: list[Refused] = []
    appended = 0
    for conversation in group_conversations(records):
        index = len(conversation_ids)
        conversation_ids.append(conversation.conversation_id)
        history: list[Any] | None = None
        owned = False
        for position, record in enumerate(conversation.turns):
            body = record.body
            kind = Kind.CHAT if "messages" in body else Kind.COMPLETIONS
            messages: list[Any] | None = None
            if kind is Kind.CHAT:
                new = body["messages"]
                if record.append and history is not None:
                    if not owned:
                        history, owned = list(history), True
                    history.append({"role": "assistant", "content": placeholder_reply(
                        conversation.conversation_id, record.turn)})
                    history.extend(new)
                    appended += 1
                else:
                    history, owned = new, False
                messages = history
            else:
                history = None
            try:
                validate(kind, body)
            except BadRequestError as e:
                refused.append(Refused(conversation.conversation_id, record.turn, e.message))
                continue
            length = len(messages) if messages is not None else 0
            first = _first_user(messages, length) if messages is not None else None
            requests.append(_Request(index, position, record.turn, kind, body, body["model"],
                                     messages, length, first, None))
    groups, conversations = _group_openings(requests, shared_chars)
    return _Prepared(requests, conversation_ids, appended, refused, groups, conversations)


def _group_openings(requests: list[_Request], shared_chars: int) -> tuple[int, int]:
    """Mark requests whose opening (first user message, or prompt) shares ``shared_chars``
    leading characters with another conversation's; returns (groups, conversations)."""
    openings: list[int | None] = []
    members: dict[int, set[int]] = {}
    for request in requests:
        text = _text(request, KeyMode.FIRST_USER_MESSAGE, shared_chars, 0)
        if len(text) < shared_chars:
            openings.append(None)
            continue
        opening = hash((request.model, text))
        openings.append(opening)
        members.setdefault(opening, set()).add(request.conversation)
    shared = {o: n for n, o in enumerate(o for o, convs in members.items() if len(convs) > 1)}
    for i, found in enumerate(openings):
        if found is not None and found in shared:
            r = requests[i]
            requests[i] = dataclasses.replace(r, group=shared[found])
    return len(shared), sum(len(members[o]) for o in shared)


# --- measuring one candidate ------------------------------------------------------------------


def _keys(requests: Sequence[_Request], candidate: Candidate) -> list[int]:
    """Every request's key (as a hash) under ``candidate``."""
    key, prefix_chars = candidate.key, candidate.prefix_chars
    min_key_chars = candidate.min_key_chars
    out: list[int] = []
    last_list: list[Any] | None = None
    last_conversation = -1
    last_key = 0
    settled = False
    for request in requests:
        messages = request.messages
        if messages is None:
            out.append(hash(routing_key(request.kind, request.body, key, prefix_chars,
                                        min_key_chars)))
            last_list = None
            continue
        if settled and messages is last_list and request.conversation == last_conversation:
            out.append(last_key)
            continue
        count, settled = _read_count(request, key, prefix_chars)
        body = {"model": request.model, "messages": messages[:count]}
        last_key = hash(routing_key(request.kind, body, key, prefix_chars, min_key_chars))
        last_list = messages
        last_conversation = request.conversation
        out.append(last_key)
    return out


def trace_keys(records: Iterable[TraceRecord], candidate: Candidate) -> list[tuple[str, int, int]]:
    """``(conversation id, turn, hash of the key)`` of every request the proxy would route, as
    the tuner computes them."""
    prepared = _prepare(records, DEFAULT_SHARED_CHARS)
    keys = _keys(prepared.requests, candidate)
    return [(prepared.conversation_ids[r.conversation], r.turn, k)
            for r, k in zip(prepared.requests, keys, strict=True)]


def _measure(requests: Sequence[_Request], candidate: Candidate,
             shared_conversations: set[int]) -> tuple[CandidateReport, list[int], int | None]:
    """The candidate's figures, every request's key, and the key most conversations share
    (shared openings aside; None when no two do)."""
    keys = _keys(requests, candidate)
    report = CandidateReport(candidate, requests=len(requests))
    per_key_requests: dict[int, int] = {}
    per_key_conversations: dict[int, int] = {}
    per_key_unshared: dict[int, int] = {}
    per_key_unshared_conversations: dict[int, int] = {}
    last_conversation: dict[int, int] = {}
    group_keys: dict[int, dict[int, int]] = {}
    conversation_keys: dict[int, list[int]] = {}
    previous: tuple[int, int] | None = None
    changed_later: set[int] = set()
    for request, k in zip(requests, keys, strict=True):
        conversation = request.conversation
        per_key_requests[k] = per_key_requests.get(k, 0) + 1
        if last_conversation.get(k) != conversation:
            last_conversation[k] = conversation
            per_key_conversations[k] = per_key_conversations.get(k, 0) + 1
            conversation_keys.setdefault(conversation, []).append(k)
            if conversation not in shared_conversations:
                per_key_unshared_conversations[k] = per_key_unshared_conversations.get(k, 0) + 1
        if request.group is None:
            per_key_unshared[k] = per_key_unshared.get(k, 0) + 1
        else:
            counts = group_keys.setdefault(request.group, {})
            counts[k] = counts.get(k, 0) + 1
        if previous is not None and previous[0] == conversation and previous[1] != k:
            if request.position == 1:
                report.changes_at_turn_2 += 1
            else:
                report.changes_later += 1
                changed_later.add(conversation)
        previous = (conversation, k)
    report.conversations = len(conversation_keys)
    report.conversations_changed_later = len(changed_later)
    report.keys = len(per_key_requests)
    if report.keys:
        report.conversations_per_key_mean = sum(per_key_conversations.values()) / report.keys
        report.conversations_per_key_max = max(per_key_conversations.values())
        report.hottest_requests = max(per_key_requests.values())
        report.top_requests = sum(heapq.nlargest(TOP_KEYS, per_key_requests.values()))
    colliding = {k for k, n in per_key_conversations.items() if n > 1}
    report.colliding_keys = len(colliding)
    report.colliding_requests = sum(per_key_unshared.get(k, 0) for k in colliding)
    report.colliding_conversations = sum(
        1 for conversation, ks in conversation_keys.items()
        if conversation not in shared_conversations and any(k in colliding for k in ks))
    for counts in group_keys.values():
        if len(counts) > 1:
            report.split_groups += 1
            report.split_requests += sum(counts.values()) - max(counts.values())
    crowded = [k for k in colliding if per_key_unshared_conversations.get(k, 0)]
    crowd = max(crowded, key=per_key_unshared_conversations.__getitem__, default=None)
    return report, keys, crowd


def _crowd(requests: Sequence[_Request], keys: list[int], candidate: Candidate,
           crowded: int, shared_conversations: set[int]) -> Crowd:
    """The conversations on the ``crowded`` key and the leading text they all share (of the
    text the candidate's key is cut from)."""
    texts: dict[int, str] = {}
    for request, k in zip(requests, keys, strict=True):
        conversation = request.conversation
        if k == crowded and conversation not in texts and conversation not in shared_conversations:
            texts[conversation] = _text(request, candidate.key, WHOLE, 0)
    common = _common_start(list(texts.values()))
    first = next(iter(texts.values()))
    return Crowd(len(texts), common, first[:common])


def _common_start(texts: list[str]) -> int:
    """Length of the longest leading text that all ``texts`` share."""
    common = min(len(t) for t in texts)
    first = texts[0]
    for text in texts[1:]:
        low, high = 0, common
        while low < high:  # the longest m with first[:m] == text[:m]
            mid = (low + high + 1) // 2
            if first[:mid] == text[:mid]:
                low = mid
            else:
                high = mid - 1
        common = low
    return common


# --- the whole analysis -----------------------------------------------------------------------


def tune(records: Iterable[TraceRecord], candidates: Sequence[Candidate], current: Candidate,
         *, pods: int = DEFAULT_PODS, shared_chars: int = DEFAULT_SHARED_CHARS) -> TuneReport:
    """Measure every candidate on the trace and recommend one (see the module docstring)."""
    if pods < 1:
        raise ValueError("pods must be >= 1")
    if shared_chars < 1:
        raise ValueError("shared_chars must be >= 1")
    if current not in candidates:
        candidates = [current, *candidates]
    prepared = _prepare(records, shared_chars)
    requests = prepared.requests
    shared = {r.conversation for r in requests if r.group is not None}
    reports: list[CandidateReport] = []
    for candidate in dict.fromkeys(candidates):
        report, keys, crowded = _measure(requests, candidate, shared)
        if crowded is not None:
            report.crowd = _crowd(requests, keys, candidate, crowded, shared)
        reports.append(report)
    by_candidate = {r.candidate: r for r in reports}
    current_report = by_candidate[current]
    recommended = recommend(reports, current)
    result = TuneReport(
        requests=len(requests),
        conversations=len({r.conversation for r in requests}),
        appended_turns=prepared.appended_turns,
        shared_groups=prepared.shared_groups,
        shared_conversations=prepared.shared_conversations,
        refused=prepared.refused,
        pods=pods,
        shared_chars=shared_chars,
        candidates=reports,
        current=current_report,
        recommended=recommended,
        reason="",
    )
    result.reason = explain(result)
    result.notes = _notes(result)
    return result


def recommend(reports: Sequence[CandidateReport], current: Candidate) -> CandidateReport:
    """The best candidate by :meth:`CandidateReport.rank`; ties to the current setting, then
    to the smallest change from it, then to the shorter key, then to first-user-message."""
    def order(r: CandidateReport) -> tuple[Any, ...]:
        c = r.candidate
        return (r.rank(), c != current, c.prefix_chars != current.prefix_chars,
                c.min_key_chars != current.min_key_chars, c.prefix_chars, c.min_key_chars,
                c.key is not KeyMode.FIRST_USER_MESSAGE)
    return min(reports, key=order)


def _n(value: int) -> str:
    return f"{value:,}"


def _pct(value: float) -> str:
    return "<0.1%" if 0 < value < 0.0005 else f"{value:.1%}"


def _crowd_words(r: CandidateReport) -> str:
    crowd = r.crowd
    if crowd is None:
        return ""
    shown = crowd.opening if len(crowd.opening) <= 40 else crowd.opening[:37] + "..."
    return (f"; {_n(crowd.conversations)} of them share one key: they open with the same "
            f"{_n(crowd.common_chars)}-character text ({shown!r})")


def explain(report: TuneReport) -> str:
    """The recommendation in words: what the current setting gets wrong that the recommended
    one gets right, or that nothing beats the current setting."""
    cur, rec = report.current, report.recommended
    if report.requests == 0:
        return "the trace has no request the proxy would route"
    keeps = ""
    if report.shared_groups and rec.split_requests == 0:
        keeps = (f" and keeps the {_n(report.shared_groups)} shared openings "
                 f"({_n(report.shared_conversations)} conversations) grouped")
    if rec is cur:
        return (f"keep the current setting ({cur.candidate.label}): no candidate does better on "
                f"this trace. It {_summary(report, cur)}")
    label = cur.candidate.label
    better = rec.candidate.label
    if cur.changes_later > rec.changes_later:
        return (f"{label} changes the key of {_n(cur.conversations_changed_later)} conversations "
                f"after their second turn ({_n(cur.changes_later)} changes), so they lose their "
                f"pod's cache mid-conversation; {better} "
                + ("keeps every conversation on one key from turn 2" if rec.changes_later == 0
                   else f"changes {_n(rec.changes_later)}") + keeps)
    if cur.split_requests > rec.split_requests:
        return (f"{label} splits {_n(cur.split_groups)} of the {_n(report.shared_groups)} shared "
                f"openings (at least {_n(report.shared_chars)} leading characters in common): "
                f"{_n(cur.split_requests)} requests get another key than the rest of their "
                f"group; {better} "
                + ("keeps them grouped" if rec.split_requests == 0
                   else f"splits {_n(rec.split_requests)} requests"))
    if cur.colliding_requests > rec.colliding_requests:
        return (f"{label} gives {_n(cur.colliding_conversations)} of "
                f"{_n(report.conversations)} conversations a key that another conversation "
                f"also has ({_n(cur.colliding_requests)} of {_n(report.requests)} requests)"
                f"{_crowd_words(cur)}. {better} leaves "
                f"{_n(rec.colliding_conversations)} such conversations "
                f"({_n(rec.colliding_requests)} requests){keeps}")
    if cur.changes_at_turn_2 > rec.changes_at_turn_2:
        return (f"{better} moves {_n(rec.changes_at_turn_2)} conversations to another key at "
                f"turn 2 where {label} moves {_n(cur.changes_at_turn_2)}, and is as good "
                f"otherwise{keeps}")
    return (f"{label}'s hottest key carries {_pct(cur.hottest_share)} of requests (a pod's "
            f"fair share is {_pct(1 / report.pods)}); {better}'s carries "
            f"{_pct(rec.hottest_share)}{keeps}")


def _summary(report: TuneReport, r: CandidateReport) -> str:
    parts = []
    parts.append("changes no conversation's key after its second turn" if r.changes_later == 0
                 else f"changes {_n(r.changes_later)} keys after the second turn")
    if report.shared_groups:
        parts.append(f"keeps the {_n(report.shared_groups)} shared openings grouped"
                     if r.split_requests == 0
                     else f"splits {_n(r.split_requests)} shared-opening requests")
    parts.append(f"{_n(r.colliding_conversations)} of {_n(report.conversations)} conversations "
                 f"share a key with another ({_n(r.colliding_requests)} requests)")
    parts.append(f"its hottest key carries {_pct(r.hottest_share)} of requests (fair share "
                 f"{_pct(1 / report.pods)})")
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def _notes(report: TuneReport) -> list[str]:
    notes = []
    if report.appended_turns:
        notes.append(
            f"{_n(report.appended_turns)} turns append to the conversation's history; the "
            "replies before them are not in the trace, so each is a placeholder distinct per "
            "conversation and turn, as a sampled reply would be (identical replies, e.g. to "
            "the same greeting at temperature 0, would keep more greeting conversations on "
            "one key)")
    if report.refused:
        first = report.refused[0]
        notes.append(
            f"{_n(len(report.refused))} requests left out: the proxy would refuse them (400), "
            f"e.g. conversation {first.conversation_id!r} turn {first.turn}: {first.message}")
    hot = [r for r in report.candidates if r.hottest_share > 1 / report.pods]
    if hot:
        notes.append(
            f"{len(hot)} candidate{'s' if len(hot) > 1 else ''} put more than a pod's fair share "
            f"({_pct(1 / report.pods)}) of requests on one key: that key's conversations "
            "cannot all stay on one pod")
    return notes


# --- output -----------------------------------------------------------------------------------


def as_json(report: TuneReport) -> dict[str, Any]:
    """The report as plain JSON types (``balancer tune --json``)."""
    def candidate(r: CandidateReport) -> dict[str, Any]:
        c = r.candidate
        crowd = r.crowd
        return {
            "key": c.key.value,
            "prefix_chars": c.prefix_chars,
            "min_key_chars": c.min_key_chars,
            "current": c == report.current.candidate,
            "recommended": c == report.recommended.candidate,
            "requests": r.requests,
            "conversations": r.conversations,
            "keys": r.keys,
            "conversations_per_key": {"mean": round(r.conversations_per_key_mean, 4),
                                      "max": r.conversations_per_key_max},
            "colliding": {"keys": r.colliding_keys, "conversations": r.colliding_conversations,
                          "requests": r.colliding_requests},
            "hottest_key": {"requests": r.hottest_requests, "share": round(r.hottest_share, 6)},
            "most_shared_key": (
                {"conversations": crowd.conversations, "common_chars": crowd.common_chars}
                if crowd else None),
            "top_keys_share": round(r.top_share, 6),
            "key_changes": {"at_turn_2": r.changes_at_turn_2, "later": r.changes_later,
                            "conversations_changed_later": r.conversations_changed_later},
            "split_shared": {"groups": r.split_groups, "requests": r.split_requests},
        }

    rec = report.recommended.candidate
    return {
        "trace": {
            "requests": report.requests,
            "conversations": report.conversations,
            "appended_turns": report.appended_turns,
            "placeholder_replies": report.appended_turns > 0,
            "shared_openings": {"groups": report.shared_groups,
                                "conversations": report.shared_conversations},
            "refused": [{"conversation_id": r.conversation_id, "turn": r.turn,
                         "message": r.message} for r in report.refused],
        },
        "pods": report.pods,
        "fair_share": round(1 / report.pods, 6),
        "shared_chars": report.shared_chars,
        "top_keys": TOP_KEYS,
        "candidates": [candidate(r) for r in report.candidates],
        "recommendation": {
            "key": rec.key.value,
            "prefix_chars": rec.prefix_chars,
            "min_key_chars": rec.min_key_chars,
            "is_current": rec == report.current.candidate,
            "reason": report.reason,
        },
        "notes": report.notes,
    }


COLUMNS: Final = ("key", "prefix", "min", "keys", "conv/key", "max", "colliding conv",
                  "hottest", "top-10", "moves t2", "later", "split")


def render(report: TuneReport) -> str:
    """A table, one row per candidate, then the recommendation and notes."""
    fair = 1 / report.pods
    rows: list[tuple[str, ...]] = []
    for r in report.candidates:
        c = r.candidate
        marks = []
        if r is report.current:
            marks.append("current")
        if r is report.recommended:
            marks.append("recommended")
        rows.append((
            c.key.value, str(c.prefix_chars),
            "-" if c.key is KeyMode.PROMPT_PREFIX else str(c.min_key_chars),
            _n(r.keys), f"{r.conversations_per_key_mean:.2f}", _n(r.conversations_per_key_max),
            _n(r.colliding_conversations),
            _pct(r.hottest_share) + ("!" if r.hottest_share > fair else ""),
            _pct(r.top_share), _n(r.changes_at_turn_2), _n(r.changes_later),
            _n(r.split_requests), " <- " + ", ".join(marks) if marks else "",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(COLUMNS)]
    def line(cells: Sequence[str]) -> str:
        head = [cells[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in
                                              zip(cells[1:len(COLUMNS)], widths[1:], strict=True)]
        return "  ".join(head) + "".join(cells[len(COLUMNS):])
    out = [
        f"trace: {_n(report.requests)} requests in {_n(report.conversations)} conversations; "
        f"{_n(report.shared_groups)} shared openings (>= {_n(report.shared_chars)} characters "
        f"in common) across {_n(report.shared_conversations)} conversations",
        "",
        line(COLUMNS),
    ]
    out.extend(line(row) for row in rows)
    legend = (
        "colliding conv: conversations sharing a key with another (shared openings aside); "
        f"hottest, top-10: share of requests on the hottest key and the {TOP_KEYS} hottest "
        f"(! above a pod's fair share, {_pct(fair)} of {report.pods} pods); moves t2, later: "
        "key changes at a conversation's turn 2 and after it; split: shared-opening requests "
        "keyed apart from their group")
    out += ["", _wrapped("", legend), "",
            f"recommended: {report.recommended.candidate.label}"
            + (" (the current setting)" if report.recommended is report.current else ""),
            _wrapped("why: ", report.reason)]
    out.extend(_wrapped("note: ", note) for note in report.notes)
    return "\n".join(out) + "\n"


def _wrapped(head: str, text: str, width: int = 100) -> str:
    return textwrap.fill(head + text, width, subsequent_indent=" " * len(head),
                         break_long_words=False, break_on_hyphens=False)
