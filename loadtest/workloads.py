"""Seeded workload generators that write request traces (format: :mod:`balancer.trace`).

Three shapes, each chosen to show one thing about prefix-aware routing:

``multi-turn``
    Chat conversations in the shape of the KubeAI/ShareGPT benchmark. A few shared system
    prompts (1-3k tokens each); each conversation picks one and runs 3-10 turns. The first turn
    sends the system prompt and a user message; every later turn is ``append: true``: the client
    appends the reply it actually received and a new user message (20-200 tokens) after a think
    time drawn from an exponential distribution. New conversations arrive as a Poisson process.
    Prefix routing keeps a conversation's growing history cached on one pod.
``shared-docs``
    A few long documents (4-8k tokens) and many short single-turn questions about them: the
    prompt is the document followed by the question. Requests arrive as a Poisson process and
    pick a document at random. Routing each document's questions together saves most prefill.
``unique``
    Single-turn prompts of random text (500-2000 tokens) that share no prefix (no two prompts
    share their first 64 characters). Nothing can be cached, so routing can only add harm: a
    good balancer shows none.

Text is pseudo-natural English words from a seeded RNG; lengths are in pseudo-tokens of about
4 characters (the simulated model server counts the same way). Content and arrival times use
separate RNGs derived from the seed, so changing the rate or duration keeps the content of the
conversations that remain. The same seed and flags give a byte-identical file.

The defaults suit a laptop demo of about 60 s against 4 simulated pods: about 60 conversations
(some 400 requests) of multi-turn chat, or about 120 requests of the single-turn shapes, so every
shared prefix recurs many times and most conversations get through several turns. Raise
``--rate`` to add load.

Command line::

    python -m loadtest.workloads multi-turn --seed 1 --out trace.jsonl [--rate 1.0] [--duration 60]
        [--conversations N] [--system-prompts 4] [--system-tokens 1000-3000] [--turns 3-10]
        [--user-tokens 20-200] [--think-mean 2.0] [--max-tokens 32-128] [--model NAME]
    python -m loadtest.workloads shared-docs --seed 1 --out trace.jsonl [--rate 2.0] [--duration 60]
        [--requests N] [--documents 4] [--document-tokens 4000-8000] [--question-tokens 10-40] ...
    python -m loadtest.workloads unique --seed 1 --out trace.jsonl [--rate 2.0] [--duration 60]
        [--requests N] [--prompt-tokens 500-2000] ...

Ranges are ``LO-HI`` (inclusive, drawn uniformly) or a single number. ``--conversations`` or
``--requests`` fixes the count instead of the duration.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.trace import Conversation, TraceRecord, dump_trace, records_of, write_trace

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_MODEL",
    "WORKLOADS",
    "MultiTurnShape",
    "SharedDocsShape",
    "TextGenerator",
    "UniqueShape",
    "conversation_stream",
    "generate",
    "main",
    "multi_turn",
    "schedule",
    "shared_docs",
    "unique",
]

CHARS_PER_TOKEN = 4
"""Pseudo-token size; a rough average for English text with BPE tokenizers."""

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
"""Model name written into bodies (the simulated server's default); players can override it."""

UNIQUE_PREFIX_CHARS = 64
"""Unique prompts are regenerated until no two share this many leading characters."""

_VOCABULARY = """
    the of and to in is was for on that with as by at from it this be are an or which have not
    has had but were all their they one more been can there other also its than new when into
    only after most some time these two may first any such would could about over many between
    under while where then each those both through during before because should very well made
    system model data value process result method level point group order field state number
    part case area form report team change control service network memory cache request
    response server client user query answer question document section chapter table figure
    example reason effect design plan policy market energy water light power price cost rate
    history language science theory practice research study analysis measure signal pattern
    structure function version support account record source target output input context
    small large early late long short high low strong weak clear simple common general
    special public private local global recent major minor direct final initial central
    careful quick slow open closed full empty true false real basic complex stable
    describe explain consider provide include require develop follow increase reduce improve
    allow create define apply compare observe select measure produce receive remain return
    suggest support assume expect contain indicate represent determine establish maintain
    river mountain city village garden window kitchen station harbor bridge forest island
    morning evening winter summer season weather journey letter story music picture paper
"""
_WORDS = tuple(_VOCABULARY.split())

_QUESTION_OPENERS = (
    "What",
    "Why",
    "How",
    "When",
    "Where",
    "Which",
    "Could you explain",
    "Can you summarize",
    "Is it true that",
    "Please describe",
)


class TextGenerator:
    """Pseudo-natural text from a seeded RNG: sentences of common English words."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def sentence(self) -> str:
        """One sentence of 6-18 words with an occasional comma."""
        rng = self._rng
        count = rng.randint(6, 18)
        words = [rng.choice(_WORDS) for _ in range(count)]
        if count > 8 and rng.random() < 0.4:
            comma = rng.randint(3, count - 3)
            words[comma] += ","
        return words[0].capitalize() + " " + " ".join(words[1:]) + "."

    def text(self, tokens: int) -> str:
        """About ``tokens`` pseudo-tokens: exactly ``tokens * 4`` characters or a word fewer."""
        limit = tokens * CHARS_PER_TOKEN
        parts: list[str] = []
        size = 0
        while size < limit:
            sentence = self.sentence()
            parts.append(sentence)
            size += len(sentence) + 1
        text = " ".join(parts)
        if len(text) > limit:
            cut = text.rfind(" ", 0, limit + 1)
            text = text[:cut] if cut > 0 else text[:limit]
        return text

    def question(self, tokens: int) -> str:
        """A question of about ``tokens`` pseudo-tokens."""
        opener = self._rng.choice(_QUESTION_OPENERS)
        body = self.text(max(1, tokens - len(opener) // CHARS_PER_TOKEN))
        return f"{opener} {body[0].lower()}{body[1:].rstrip('.,')}?"


def _uniform(rng: random.Random, bounds: tuple[int, int]) -> int:
    return rng.randint(bounds[0], bounds[1])


# --- shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiTurnShape:
    """Shape of the multi-turn chat workload; token counts are pseudo-tokens."""

    system_prompts: int = 4
    """Distinct system prompts shared by all conversations (KubeAI's benchmark uses a handful)."""
    system_tokens: tuple[int, int] = (1000, 3000)
    """Length of each system prompt."""
    turns: tuple[int, int] = (3, 10)
    """Turns per conversation."""
    user_tokens: tuple[int, int] = (20, 200)
    """Length of each user message."""
    think_mean_s: float = 2.0
    """Mean think time between a reply and the next turn (exponential); short, so a 60 s demo
    sees conversations through several turns."""
    max_tokens: tuple[int, int] = (32, 128)
    """``max_tokens`` of each request: reply length."""
    history_turns: tuple[int, int] = (0, 0)
    """Earlier exchanges that a conversation's first request already carries, as in replays
    of recorded chats (ShareGPT): the conversation is picked up mid-way, with a history no
    server has cached yet."""
    history_reply_tokens: tuple[int, int] = (100, 400)
    """Length of each earlier reply in that history (recorded chat replies run long)."""
    steady_start_s: float = 0.0
    """Start the trace in steady state: conversations also arrive during this many seconds
    *before* it, and those still in progress at its start are picked up at their next turn,
    their earlier turns (with replies written by the generator) sent as recorded history. A
    trace that starts with no conversation in progress takes about a conversation's life to
    reach its steady load, longer than a warm-up can cut; set this to about the longest
    conversation's life (turns x (think time + reply time)). 0: off."""
    steady_reply_s: float = 2.5
    """Assumed reply time (s) when working out which turn a conversation that began before
    the trace has reached: about E2E p50 at moderate load on the simulated pods."""


@dataclass(frozen=True)
class SharedDocsShape:
    """Shape of the shared-documents workload."""

    documents: int = 4
    """Distinct long documents."""
    document_tokens: tuple[int, int] = (4000, 8000)
    """Length of each document."""
    question_tokens: tuple[int, int] = (10, 40)
    """Length of each question."""
    max_tokens: tuple[int, int] = (32, 128)
    """``max_tokens`` of each request."""


@dataclass(frozen=True)
class UniqueShape:
    """Shape of the unique-prompts workload."""

    prompt_tokens: tuple[int, int] = (500, 2000)
    """Length of each prompt."""
    max_tokens: tuple[int, int] = (32, 128)
    """``max_tokens`` of each request."""


# --- conversation streams (endless; arrival times are assigned by schedule()) ---------------


def _content_rng(seed: int) -> random.Random:
    return random.Random(f"{seed}:content")


def iter_multi_turn(
    seed: int, shape: MultiTurnShape = MultiTurnShape(), *, model: str = DEFAULT_MODEL
) -> Iterator[Conversation]:
    """Endless multi-turn conversations (``at`` = 0); deterministic for a seed."""
    rng = _content_rng(seed)
    text = TextGenerator(rng)
    systems = [
        f"You are assistant {index + 1}. "
        + text.text(max(1, _uniform(rng, shape.system_tokens) - 5))
        for index in range(shape.system_prompts)
    ]
    for number in itertools.count():
        conversation_id = f"mt-{number:05d}"
        system = rng.choice(systems)
        turns = []
        history: list[dict[str, str]] = []
        if shape.history_turns[1] > 0:
            for _ in range(_uniform(rng, shape.history_turns)):
                history.append(
                    {"role": "user", "content": text.question(_uniform(rng, shape.user_tokens))})
                history.append({"role": "assistant",
                                "content": text.text(_uniform(rng, shape.history_reply_tokens))})
        for turn in range(_uniform(rng, shape.turns)):
            user = {"role": "user", "content": text.question(_uniform(rng, shape.user_tokens))}
            messages = (
                [{"role": "system", "content": system}, *history, user] if turn == 0 else [user]
            )
            body: dict[str, Any] = {
                "model": model,
                "messages": messages,
                "max_tokens": _uniform(rng, shape.max_tokens),
            }
            think = 0.0
            if turn > 0 and shape.think_mean_s > 0:
                think = round(rng.expovariate(1.0 / shape.think_mean_s), 3)
            turns.append(TraceRecord(conversation_id, turn, 0.0, think, turn > 0, body))
        yield Conversation(conversation_id, 0.0, tuple(turns))


def iter_shared_docs(
    seed: int, shape: SharedDocsShape = SharedDocsShape(), *, model: str = DEFAULT_MODEL
) -> Iterator[Conversation]:
    """Endless single-turn questions about a few shared documents (``at`` = 0)."""
    rng = _content_rng(seed)
    text = TextGenerator(rng)
    documents = [
        f"Document {index + 1}.\n\n" + text.text(max(1, _uniform(rng, shape.document_tokens) - 4))
        for index in range(shape.documents)
    ]
    for number in itertools.count():
        conversation_id = f"sd-{number:05d}"
        document = rng.choice(documents)
        question = text.question(_uniform(rng, shape.question_tokens))
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": f"{document}\n\nQuestion: {question}"}],
            "max_tokens": _uniform(rng, shape.max_tokens),
        }
        record = TraceRecord(conversation_id, 0, 0.0, 0.0, False, body)
        yield Conversation(conversation_id, 0.0, (record,))


def iter_unique(
    seed: int, shape: UniqueShape = UniqueShape(), *, model: str = DEFAULT_MODEL
) -> Iterator[Conversation]:
    """Endless single-turn prompts with no shared prefix (``at`` = 0)."""
    rng = _content_rng(seed)
    text = TextGenerator(rng)
    seen: set[str] = set()
    for number in itertools.count():
        conversation_id = f"un-{number:05d}"
        while True:
            prompt = text.text(_uniform(rng, shape.prompt_tokens))
            if prompt[:UNIQUE_PREFIX_CHARS] not in seen:
                seen.add(prompt[:UNIQUE_PREFIX_CHARS])
                break
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": _uniform(rng, shape.max_tokens),
        }
        record = TraceRecord(conversation_id, 0, 0.0, 0.0, False, body)
        yield Conversation(conversation_id, 0.0, (record,))


def schedule(
    conversations: Iterator[Conversation],
    *,
    seed: int,
    rate: float,
    duration_s: float | None = None,
    count: int | None = None,
) -> list[Conversation]:
    """Give conversations Poisson arrival times at ``rate`` per second.

    The first arrives at 0 (a run starts with traffic). Stops after ``count`` conversations, or
    at the first arrival at or past ``duration_s`` when no count is given.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if count is None and duration_s is None:
        raise ValueError("give a duration or a count")
    if count is not None and count < 0:
        raise ValueError("count must be >= 0")
    rng = random.Random(f"{seed}:arrivals")
    scheduled: list[Conversation] = []
    at = 0.0
    for conversation in conversations:
        if count is not None and len(scheduled) >= count:
            break
        if count is None and duration_s is not None and at >= duration_s:
            break
        rounded = round(at, 3)
        turns = tuple(replace(turn, at=rounded) for turn in conversation.turns)
        scheduled.append(replace(conversation, at=rounded, turns=turns))
        at += rng.expovariate(rate)
    return scheduled


def multi_turn(
    seed: int,
    *,
    rate: float = 1.0,
    duration_s: float | None = 60.0,
    conversations: int | None = None,
    shape: MultiTurnShape = MultiTurnShape(),
    model: str = DEFAULT_MODEL,
) -> list[TraceRecord]:
    """A multi-turn chat trace: Poisson arrivals over ``duration_s`` (or ``conversations``),
    started in steady state when ``shape.steady_start_s`` is set."""
    stream = iter_multi_turn(seed, shape, model=model)
    lead = shape.steady_start_s
    if lead <= 0 or conversations is not None:
        return records_of(
            schedule(stream, seed=seed, rate=rate, duration_s=duration_s, count=conversations)
        )
    span = None if duration_s is None else duration_s + lead
    early = schedule(stream, seed=seed, rate=rate, duration_s=span)
    rng = random.Random(f"{seed}:pick-up")
    text = TextGenerator(rng)
    picked = []
    for conversation in early:
        at = round(conversation.at - lead, 3)
        if at >= 0:
            picked.append(_shifted(conversation, at))
        elif (resumed := _pick_up(conversation, at, shape, text, rng)) is not None:
            picked.append(resumed)
    picked.sort(key=lambda c: c.at)
    return records_of(picked)


def _shifted(conversation: Conversation, at: float) -> Conversation:
    turns = tuple(replace(turn, at=at) for turn in conversation.turns)
    return replace(conversation, at=at, turns=turns)


def _pick_up(
    conversation: Conversation,
    began: float,
    shape: MultiTurnShape,
    text: TextGenerator,
    rng: random.Random,
) -> Conversation | None:
    """A conversation that began at ``began`` < 0, as it stands at 0: its first turn due at or
    after 0, earlier turns folded into that turn's messages as recorded history; None if it
    ended before 0."""
    due = began
    for index, turn in enumerate(conversation.turns):
        if index > 0:
            due += shape.steady_reply_s + turn.think_s
        if due >= 0:
            break
    else:
        return None
    if index == 0:
        return _shifted(conversation, round(due, 3))
    messages: list[dict[str, Any]] = []
    for earlier in conversation.turns[:index]:
        messages += earlier.body["messages"]
        reply = text.text(_uniform(rng, shape.max_tokens))
        messages.append({"role": "assistant", "content": reply})
    first = conversation.turns[index]
    at = round(due, 3)
    body = {**first.body, "messages": [*messages, *first.body["messages"]]}
    turns = [replace(first, turn=0, at=at, think_s=0.0, append=False, body=body)]
    turns += [replace(turn, turn=number, at=at)
              for number, turn in enumerate(conversation.turns[index + 1:], start=1)]
    return replace(conversation, at=at, turns=tuple(turns))


def shared_docs(
    seed: int,
    *,
    rate: float = 2.0,
    duration_s: float | None = 60.0,
    requests: int | None = None,
    shape: SharedDocsShape = SharedDocsShape(),
    model: str = DEFAULT_MODEL,
) -> list[TraceRecord]:
    """A shared-documents trace: Poisson arrivals over ``duration_s`` (or ``requests``)."""
    stream = iter_shared_docs(seed, shape, model=model)
    return records_of(schedule(stream, seed=seed, rate=rate, duration_s=duration_s, count=requests))


def unique(
    seed: int,
    *,
    rate: float = 2.0,
    duration_s: float | None = 60.0,
    requests: int | None = None,
    shape: UniqueShape = UniqueShape(),
    model: str = DEFAULT_MODEL,
) -> list[TraceRecord]:
    """A unique-prompts trace: Poisson arrivals over ``duration_s`` (or ``requests``)."""
    stream = iter_unique(seed, shape, model=model)
    return records_of(schedule(stream, seed=seed, rate=rate, duration_s=duration_s, count=requests))


WORKLOADS: dict[str, Callable[..., list[TraceRecord]]] = {
    "multi-turn": multi_turn,
    "shared-docs": shared_docs,
    "unique": unique,
}
"""Trace generators by workload name."""


def conversation_stream(
    name: str, seed: int, *, model: str = DEFAULT_MODEL
) -> Iterator[Conversation]:
    """An endless stream of a workload's conversations in default shapes (closed-loop users)."""
    if name == "multi-turn":
        return iter_multi_turn(seed, model=model)
    if name == "shared-docs":
        return iter_shared_docs(seed, model=model)
    if name == "unique":
        return iter_unique(seed, model=model)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def generate(name: str, seed: int, **options: Any) -> list[TraceRecord]:
    """Generate the named workload's trace; ``options`` go to its generator."""
    try:
        generator = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None
    return generator(seed, **options)


# --- command line -----------------------------------------------------------------------------


def _token_range(text: str) -> tuple[int, int]:
    """Parse ``LO-HI`` or ``N`` into an inclusive range of positive integers."""
    lo_text, _, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if hi_text else lo
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI or N, got {text!r}") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.workloads",
        description="Write a seeded workload trace (JSONL; format in balancer/trace.py).",
    )
    sub = parser.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")

    def common(p: argparse.ArgumentParser, rate: float, count_flag: str) -> None:
        p.add_argument("--seed", type=int, required=True, help="RNG seed")
        p.add_argument(
            "--out", type=Path, required=True, help="trace file to write ('-' for stdout)"
        )
        p.add_argument(
            "--model", default=DEFAULT_MODEL, help="model name in each body (%(default)s)"
        )
        p.add_argument(
            "--rate", type=_positive_float, default=rate, help="arrivals per second (%(default)s)"
        )
        p.add_argument(
            "--duration",
            type=_positive_float,
            default=60.0,
            help="seconds of arrivals (%(default)s)",
        )
        p.add_argument(
            count_flag, type=_positive_int, help="generate this many instead of --duration"
        )
        p.add_argument(
            "--max-tokens", type=_token_range, default=(32, 128), help="reply length (32-128)"
        )

    mt = sub.add_parser("multi-turn", help="multi-turn chat over shared system prompts")
    common(mt, 1.0, "--conversations")
    mt.add_argument(
        "--system-prompts", type=_positive_int, default=4, help="distinct system prompts (4)"
    )
    mt.add_argument("--system-tokens", type=_token_range, default=(1000, 3000), help="(1000-3000)")
    mt.add_argument(
        "--turns", type=_token_range, default=(3, 10), help="turns per conversation (3-10)"
    )
    mt.add_argument("--user-tokens", type=_token_range, default=(20, 200), help="(20-200)")
    mt.add_argument("--think-mean", type=float, default=2.0, help="mean think time, s (2.0)")

    sd = sub.add_parser("shared-docs", help="short questions about a few long documents")
    common(sd, 2.0, "--requests")
    sd.add_argument("--documents", type=_positive_int, default=4, help="distinct documents (4)")
    sd.add_argument(
        "--document-tokens", type=_token_range, default=(4000, 8000), help="(4000-8000)"
    )
    sd.add_argument("--question-tokens", type=_token_range, default=(10, 40), help="(10-40)")

    un = sub.add_parser("unique", help="prompts with no shared prefix")
    common(un, 2.0, "--requests")
    un.add_argument("--prompt-tokens", type=_token_range, default=(500, 2000), help="(500-2000)")
    return parser


def _records_from_args(args: argparse.Namespace) -> list[TraceRecord]:
    common: dict[str, Any] = {"rate": args.rate, "duration_s": args.duration, "model": args.model}
    if args.workload == "multi-turn":
        if args.think_mean < 0:
            raise SystemExit("--think-mean must be >= 0")
        mt_shape = MultiTurnShape(
            system_prompts=args.system_prompts,
            system_tokens=args.system_tokens,
            turns=args.turns,
            user_tokens=args.user_tokens,
            think_mean_s=args.think_mean,
            max_tokens=args.max_tokens,
        )
        return multi_turn(args.seed, conversations=args.conversations, shape=mt_shape, **common)
    if args.workload == "shared-docs":
        sd_shape = SharedDocsShape(
            documents=args.documents,
            document_tokens=args.document_tokens,
            question_tokens=args.question_tokens,
            max_tokens=args.max_tokens,
        )
        return shared_docs(args.seed, requests=args.requests, shape=sd_shape, **common)
    un_shape = UniqueShape(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens)
    return unique(args.seed, requests=args.requests, shape=un_shape, **common)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m loadtest.workloads``."""
    args = _parser().parse_args(argv)
    records = _records_from_args(args)
    if str(args.out) == "-":
        count = write_trace(records, sys.stdout)
    else:
        count = dump_trace(records, args.out)
    conversations = len({record.conversation_id for record in records})
    last = max((record.at for record in records), default=0.0)
    print(
        f"{args.workload}: {count} requests in {conversations} conversations, "
        f"arrivals over {last:.1f} s -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
