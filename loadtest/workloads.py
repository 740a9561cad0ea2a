"""Seeded workload generators that write request traces (format: :mod:`balancer.trace`).

Six workloads, each chosen to show one thing about prefix-aware routing:

``multi-turn``
    Chat conversations in the shape of the KubeAI/ShareGPT benchmark. A few shared system
    prompts (1-3k tokens each); each conversation picks one and runs 3-10 turns. The first turn
    sends the system prompt and a user message; every later turn is ``append: true``: the client
    appends the reply it actually received and a new user message (20-200 tokens) after a think
    time drawn from an exponential distribution. New conversations arrive as a Poisson process.
    Prefix routing keeps a conversation's growing history cached on one pod.
``templated``
    Multi-turn chat as real apps send it: 70% of conversations open their first user message
    with one of 4 instruction templates of 150-400 characters (a customer assistant, a
    summarizer, RAG over a context, house rules) before the user's own text, 15% open with a
    greeting alone, the rest as ``multi-turn``; bodies carry ``temperature: 0.7``. Shows whether
    a routing key separates conversations whose first messages agree for hundreds of
    characters.
``greetings``
    Greeting-heavy chat: 60% of conversations open with a short greeting alone ("hi",
    "Hello!"..., a few of them most of the time), the question coming in the second user
    message; the rest as ``multi-turn``. Sampled replies (``temperature: 0.7``) make the
    conversations part at the first reply, as with a real model. Shows whether a key tells
    apart conversations whose whole first message is the same.
``agent``
    Agent sessions: 2 agents, each a long system prompt (4-6k tokens) and 5-10 tool
    definitions in the body's ``tools`` (OpenAI function tools, shared by all of that agent's
    sessions). A session's first user message is a task (half open with one of 2 task
    templates); then 8-20 short turns each append a tool result (a ``tool`` message of 50-300
    tokens) 0.1-0.5 s after the reply. Shows routing under long shared prefixes, many short
    turns and fast turn-around.
``shared-docs``
    A few long documents (4-8k tokens) and many short single-turn questions about them: the
    prompt is the document followed by the question. Requests arrive as a Poisson process and
    pick a document at random. Routing each document's questions together saves most prefill.
``unique``
    Single-turn prompts of random text (500-2000 tokens) that share no prefix (no two prompts
    share their first 64 characters). Nothing can be cached, so routing can only add harm: a
    good balancer shows none.

``templated``, ``greetings`` and ``agent`` are presets of the multi-turn generator
(:data:`TEMPLATED_SHAPE`, :data:`GREETINGS_SHAPE`, :data:`AGENT_SHAPE`): one generator, shapes
that differ, and any field can be changed (``--shape KEY=VALUE`` here and in
:mod:`loadtest.compare`). Openings are drawn per conversation (``template_share``,
``greeting_share``); a shape that asks for none of the new features gives byte for byte the
conversations it gave before they existed. Templates are distinct from their first characters
on (no two share their first 50). The simulated server answers a request with ``temperature``
> 0 with a reply drawn for that request, and one without with the prompt's own reply (greedy
decoding), see :mod:`loadtest.simserver.server`.

Text is pseudo-natural English words from a seeded RNG; lengths are in pseudo-tokens of about
4 characters (the simulated model server counts the same way). Content and arrival times use
separate RNGs derived from the seed, so changing the rate or duration keeps the content of the
conversations that remain. The same seed and flags give a byte-identical file.

The defaults suit a laptop demo of about 60 s against 4 simulated pods: about 60 conversations
(some 400 requests; ``agent``: about 1,000) of multi-turn chat, or about 120 requests of the
single-turn shapes, so every shared prefix recurs many times and most conversations get through
several turns. Raise ``--rate`` to add load.

Command line::

    python -m loadtest.workloads multi-turn --seed 1 --out trace.jsonl [--rate 1.0] [--duration 60]
        [--conversations N] [--system-prompts 4] [--system-tokens 1000-3000] [--turns 3-10]
        [--user-tokens 20-200] [--think-mean 2.0] [--max-tokens 32-128] [--model NAME]
        [--shape KEY=VALUE ...]
    python -m loadtest.workloads templated|greetings|agent --seed 1 --out trace.jsonl ...
        (the same flags, defaults from the preset)
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
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from loadtest.trace import Conversation, TraceRecord, dump_trace, records_of, write_trace

__all__ = [
    "AGENT_SHAPE",
    "CHARS_PER_TOKEN",
    "DEFAULT_MODEL",
    "GREETINGS",
    "GREETINGS_SHAPE",
    "MULTI_TURN_WORKLOADS",
    "SHAPES",
    "TEMPLATED_SHAPE",
    "TEMPLATE_DISTINCT_CHARS",
    "TEMPLATE_OPENERS",
    "WORKLOADS",
    "MultiTurnShape",
    "SharedDocsShape",
    "TextGenerator",
    "UniqueShape",
    "agent",
    "conversation_stream",
    "generate",
    "greetings",
    "main",
    "multi_turn",
    "parse_shape",
    "schedule",
    "shared_docs",
    "templated",
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
_TASK_OPENERS = (
    "Find out why",
    "Check whether",
    "Update the records so that",
    "Compare the two reports on",
    "List every case where",
    "Fix the problem where",
    "Collect the figures on",
    "Write a short note on",
)

TEMPLATE_DISTINCT_CHARS = 50
"""Templates are regenerated until no two share this many leading characters."""

TEMPLATE_OPENERS: dict[str, tuple[str, ...]] = {
    "app": (
        "You are helping a customer of {Word} {Word}. Answer using only the product notes"
        " below; be brief and polite, and never promise a refund.",
        "Summarize the following {word} {word} for a busy reader in three short points,"
        " keeping every figure and name as written.",
        "Use the {word} context below to answer the question at the end. If the context"
        " does not hold the answer, say so. Context:",
        "You are the {word} assistant of {Word} {Word}. Follow these rules in every reply:",
        "Rewrite the {word} text that follows in plain English for a {word} audience,"
        " keeping its meaning:",
        "Classify the {word} message below as a {word}, {word} or {word} request, then draft"
        " a short reply.",
        "Extract every {word}, {word} and date from the document below and return them as a"
        " list.",
        "Translate the following {word} notes into clear English, keeping the headings:",
    ),
    "task": (
        "Task for the {word} agent: work through the {word} {word} issue below with the tools"
        " you have. Read before you change anything.",
        "You are running the scheduled {word} check for {Word} {Word}. Gather the records,"
        " compare them with last week's and file a report.",
        "Fix the following {word} problem: reproduce it, find its cause, change what is"
        " needed and run the {word} checks again.",
        "Research request from the {word} team: collect what the {word} sources say about"
        " the topic below and cite each one.",
    ),
}
"""Openings of instruction templates by kind; ``{word}`` and ``{Word}`` are filled with seeded
words (lower case, capitalized) so that templates differ from their first characters on."""

GREETINGS: tuple[tuple[str, float], ...] = (
    ("hi", 20.0),
    ("Hello!", 12.0),
    ("hey", 9.0),
    ("Hi", 7.0),
    ("hello", 6.0),
    ("Hi there!", 4.0),
    ("hey there", 3.0),
    ("Good morning!", 3.0),
    ("Hi, can you help me?", 3.0),
    ("Hello, are you there?", 2.0),
    ("Hey!", 2.0),
    ("hii", 1.5),
    ("Good afternoon", 1.5),
    ("yo", 1.0),
    ("Hi, I have a question.", 1.0),
)
"""Greetings that open chat conversations, with relative weights: a few dominate (``hi`` is
about a quarter of them), as in chat UIs' logs."""

_TOOL_VERBS = ("search", "get", "list", "read", "create", "update", "run", "send", "fetch",
               "check", "find", "write")
_NOUN_TEXT = """
    system model data value process result method level point group order field state number
    report team service network memory cache request response server client user query answer
    document section table figure record source target output input context river city station
    harbor bridge forest island letter story music picture paper
"""
_NOUNS = tuple(_NOUN_TEXT.split())
_PARAMETER_TYPES = ("string", "string", "integer", "boolean")
_PLACEHOLDER = re.compile(r"\{(word|Word)\}")


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

    def task(self, tokens: int) -> str:
        """An instruction to an agent of about ``tokens`` pseudo-tokens."""
        opener = self._rng.choice(_TASK_OPENERS)
        body = self.text(max(1, tokens - len(opener) // CHARS_PER_TOKEN))
        return f"{opener} {body[0].lower()}{body[1:]}"

    def template(self, opener: str, chars: int) -> str:
        """An instruction template of about ``chars`` characters (cut at a word): ``opener``
        with its placeholders filled, then sentences."""
        rng = self._rng

        def word(match: re.Match[str]) -> str:
            chosen = rng.choice(_NOUNS)
            return chosen.capitalize() if match.group(1) == "Word" else chosen

        head = _PLACEHOLDER.sub(word, opener)
        room = (chars - len(head) - 1) // CHARS_PER_TOKEN
        return head if room < 1 else f"{head} {self.text(room)}"

    def tool(self, name: str) -> dict[str, Any]:
        """An OpenAI function tool called ``name``: a description and 1-4 parameters."""
        rng = self._rng
        names = rng.sample(_NOUNS, rng.randint(1, 4))
        properties = {
            parameter: {"type": rng.choice(_PARAMETER_TYPES), "description": self.sentence()}
            for parameter in names
        }
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": self.sentence(),
                "parameters": {
                    "type": "object",
                    "properties": properties,
                    "required": names[: rng.randint(1, len(names))],
                },
            },
        }


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
    templates: int = 0
    """Distinct instruction templates of the app (0: none). A templated conversation's first
    user message is one of them followed by the user's own text, as when a product assistant,
    a RAG app or an agent framework wraps every request in the same instructions."""
    template_chars: tuple[int, int] = (150, 400)
    """Length of each template in characters (about: cut at a word). No two templates share
    their first :data:`TEMPLATE_DISTINCT_CHARS` characters."""
    template_share: float = 0.0
    """Fraction of conversations whose first user message opens with a template."""
    template_kind: str = "app"
    """``app``: app instructions (a customer assistant, a summarizer, RAG over a context...)
    and users' own text as questions; ``task``: an agent's task instructions, and users' own
    text as tasks."""
    greeting_share: float = 0.0
    """Fraction of conversations whose first user message is a short greeting alone ("hi",
    "Hello!"; a few dominate); the real question comes in the second user message."""
    tools: tuple[int, int] = (0, 0)
    """Tool definitions per system prompt (an agent), sent in every body's ``tools`` (OpenAI
    function tools) by all conversations on that system prompt. 0: no ``tools``."""
    tool_turn_share: float = 0.0
    """Fraction of later turns that append a tool result (a ``tool`` message) instead of a user
    message, as an agent loop does after each tool call."""
    tool_result_tokens: tuple[int, int] = (50, 300)
    """Length of each tool result."""
    think_range_s: tuple[float, float] = (0.0, 0.0)
    """When its upper end is > 0, think times are drawn uniformly from this range instead of
    the exponential of ``think_mean_s`` (an agent runs its tools in a bounded time)."""
    temperature: float = 0.0
    """``temperature`` written into every body when > 0: chat apps sample, so two conversations
    that open alike get different replies (the simulated server follows it). 0: the field is
    left out (greedy on the simulated server)."""

    def __post_init__(self) -> None:
        shares = (self.template_share, self.greeting_share, self.tool_turn_share)
        if not all(0.0 <= share <= 1.0 for share in shares):
            raise ValueError("template_share, greeting_share and tool_turn_share must be in 0..1")
        if self.template_share + self.greeting_share > 1.0:
            raise ValueError("template_share + greeting_share must be <= 1")
        if self.template_share > 0 and self.templates < 1:
            raise ValueError("template_share > 0 needs templates >= 1")
        if self.templates < 0 or self.template_chars[0] < 1:
            raise ValueError("templates must be >= 0 and template_chars >= 1")
        if self.template_kind not in TEMPLATE_OPENERS:
            raise ValueError(f"template_kind must be one of {', '.join(TEMPLATE_OPENERS)}")
        if self.tools[0] < 0 or self.tools[0] > self.tools[1]:
            raise ValueError("tools must be a range LO-HI with 0 <= LO <= HI")
        low, high = self.think_range_s
        if low < 0 or (high > 0 and high < low):
            raise ValueError("think_range_s must be a range LO-HI with 0 <= LO <= HI")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")


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


TEMPLATED_SHAPE = MultiTurnShape(
    templates=4, template_chars=(150, 400), template_share=0.70, greeting_share=0.15,
    temperature=0.7,
)  # fmt: skip
"""``templated``: 70% of conversations open with one of 4 app templates of 150-400 characters
before the user's own text, 15% with a greeting, the rest plain; sampled replies."""

GREETINGS_SHAPE = MultiTurnShape(greeting_share=0.60, temperature=0.7)
"""``greetings``: 60% of conversations open with a greeting alone, the rest plain; sampled
replies, so conversations that open alike part at the first reply."""

AGENT_SHAPE = MultiTurnShape(
    system_prompts=2, system_tokens=(4000, 6000), tools=(5, 10), templates=2,
    template_kind="task", template_share=0.5, turns=(8, 20), tool_turn_share=1.0,
    tool_result_tokens=(50, 300), think_mean_s=0.3, think_range_s=(0.1, 0.5), temperature=0.7,
)  # fmt: skip
"""``agent``: 2 agents, each a long system prompt (4-6k tokens) and 5-10 tools; a session's
first user message is a task (half of them open with one of 2 task templates), then 8-20
short turns that each append a tool result, 0.1-0.5 s apart; sampled replies."""

MULTI_TURN_WORKLOADS = ("multi-turn", "templated", "greetings", "agent")
"""Workloads made by the multi-turn generator: conversations whose rate counts new
conversations, not requests."""


# --- conversation streams (endless; arrival times are assigned by schedule()) ---------------


def _content_rng(seed: int) -> random.Random:
    return random.Random(f"{seed}:content")


def iter_multi_turn(
    seed: int,
    shape: MultiTurnShape = MultiTurnShape(),
    *,
    model: str = DEFAULT_MODEL,
    prefix: str = "mt",
) -> Iterator[Conversation]:
    """Endless multi-turn conversations (``at`` = 0); deterministic for a seed.

    Conversation ids are ``<prefix>-00000``, ``<prefix>-00001``... Openings, tools and tool
    turns draw from the content RNG only when the shape asks for them, so a shape without them
    gives the same conversations as before they existed.
    """
    rng = _content_rng(seed)
    text = TextGenerator(rng)
    systems = [
        f"You are assistant {index + 1}. "
        + text.text(max(1, _uniform(rng, shape.system_tokens) - 5))
        for index in range(shape.system_prompts)
    ]
    templates = _templates(rng, text, shape)
    toolsets = _toolsets(rng, text, shape, len(systems))
    for number in itertools.count():
        conversation_id = f"{prefix}-{number:05d}"
        agent = rng.choice(range(len(systems)))
        system = {"role": "system", "content": systems[agent]}
        extra: dict[str, Any] = {}
        if toolsets and toolsets[agent]:
            extra["tools"] = toolsets[agent]
        if shape.temperature > 0:
            extra["temperature"] = shape.temperature
        opening = _opening(rng, shape)
        history: list[dict[str, str]] = []
        if shape.history_turns[1] > 0:
            for _ in range(_uniform(rng, shape.history_turns)):
                history.append(
                    {"role": "user", "content": text.question(_uniform(rng, shape.user_tokens))})
                history.append({"role": "assistant",
                                "content": text.text(_uniform(rng, shape.history_reply_tokens))})
        greeting = _greeting(rng) if opening == "greeting" else None
        template = rng.choice(templates) if opening == "template" else None
        if history and greeting is not None:
            reply = text.text(_uniform(rng, GREETING_REPLY_TOKENS))
            history = [{"role": "user", "content": greeting},
                       {"role": "assistant", "content": reply}, *history]
        if history and template is not None:
            history[0] = {"role": "user", "content": f"{template}\n\n{history[0]['content']}"}
        turns: list[TraceRecord] = []
        if greeting is not None and not history:
            body: dict[str, Any] = {
                "model": model,
                "messages": [system, {"role": "user", "content": greeting}],
                "max_tokens": _uniform(rng, shape.max_tokens),
                **extra,
            }
            turns.append(TraceRecord(conversation_id, 0, 0.0, 0.0, False, body))
        for turn in range(_uniform(rng, shape.turns)):
            index = len(turns)
            message: dict[str, str]
            if turn > 0 and _is_tool_turn(rng, shape):
                message = {
                    "role": "tool",
                    "tool_call_id": f"call-{number:05d}-{index:02d}",
                    "content": text.text(_uniform(rng, shape.tool_result_tokens)),
                }
            else:
                ask = text.task if shape.template_kind == "task" else text.question
                content = ask(_uniform(rng, shape.user_tokens))
                if turn == 0 and template is not None and not history:
                    content = f"{template}\n\n{content}"
                message = {"role": "user", "content": content}
            messages = [system, *history, message] if index == 0 else [message]
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": _uniform(rng, shape.max_tokens),
                **extra,
            }
            think = _think(rng, shape) if index > 0 else 0.0
            turns.append(TraceRecord(conversation_id, index, 0.0, think, index > 0, body))
        yield Conversation(conversation_id, 0.0, tuple(turns))


GREETING_REPLY_TOKENS = (8, 30)
"""Length of the recorded reply to a greeting, in a history that a conversation picked up
mid-way already carries."""

_GREETING_TEXTS = tuple(greeting for greeting, _ in GREETINGS)
_GREETING_WEIGHTS = tuple(itertools.accumulate(weight for _, weight in GREETINGS))


def _templates(rng: random.Random, text: TextGenerator, shape: MultiTurnShape) -> list[str]:
    """The shape's instruction templates, no two alike in their first characters."""
    openers = TEMPLATE_OPENERS[shape.template_kind]
    templates: list[str] = []
    seen: set[str] = set()
    for index in range(shape.templates):
        for _ in range(1000):
            template = text.template(
                openers[index % len(openers)], _uniform(rng, shape.template_chars)
            )
            if template[:TEMPLATE_DISTINCT_CHARS] not in seen:
                break
        else:
            raise ValueError(f"cannot make {shape.templates} distinct templates")
        seen.add(template[:TEMPLATE_DISTINCT_CHARS])
        templates.append(template)
    return templates


def _toolsets(
    rng: random.Random, text: TextGenerator, shape: MultiTurnShape, count: int
) -> list[list[dict[str, Any]]]:
    """Tool definitions for each of ``count`` system prompts; none when the shape has no
    tools."""
    if shape.tools[1] < 1:
        return []
    toolsets = []
    for _ in range(count):
        names: list[str] = []
        size = _uniform(rng, shape.tools)
        while len(names) < size:
            name = f"{rng.choice(_TOOL_VERBS)}_{rng.choice(_NOUNS)}"
            if name not in names:
                names.append(name)
        toolsets.append([text.tool(name) for name in names])
    return toolsets


def _opening(rng: random.Random, shape: MultiTurnShape) -> str:
    """How a conversation opens: ``greeting``, ``template`` or ``plain``."""
    if shape.greeting_share <= 0 and shape.template_share <= 0:
        return "plain"
    draw = rng.random()
    if draw < shape.greeting_share:
        return "greeting"
    if draw < shape.greeting_share + shape.template_share:
        return "template"
    return "plain"


def _greeting(rng: random.Random) -> str:
    return rng.choices(_GREETING_TEXTS, cum_weights=_GREETING_WEIGHTS)[0]


def _is_tool_turn(rng: random.Random, shape: MultiTurnShape) -> bool:
    share = shape.tool_turn_share
    if share <= 0:
        return False
    return share >= 1 or rng.random() < share


def _think(rng: random.Random, shape: MultiTurnShape) -> float:
    low, high = shape.think_range_s
    if high > 0:
        return round(rng.uniform(low, high), 3)
    if shape.think_mean_s > 0:
        return round(rng.expovariate(1.0 / shape.think_mean_s), 3)
    return 0.0


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
    prefix: str = "mt",
) -> list[TraceRecord]:
    """A multi-turn chat trace: Poisson arrivals over ``duration_s`` (or ``conversations``),
    started in steady state when ``shape.steady_start_s`` is set; ``prefix`` starts the
    conversation ids."""
    stream = iter_multi_turn(seed, shape, model=model, prefix=prefix)
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


def templated(
    seed: int, *, shape: MultiTurnShape = TEMPLATED_SHAPE, **options: Any
) -> list[TraceRecord]:
    """Multi-turn chat whose first messages open with app templates or greetings (see
    :data:`TEMPLATED_SHAPE`); options as :func:`multi_turn`."""
    return multi_turn(seed, shape=shape, prefix="tp", **options)


def greetings(
    seed: int, *, shape: MultiTurnShape = GREETINGS_SHAPE, **options: Any
) -> list[TraceRecord]:
    """Greeting-heavy multi-turn chat (see :data:`GREETINGS_SHAPE`); options as
    :func:`multi_turn`."""
    return multi_turn(seed, shape=shape, prefix="gr", **options)


def agent(seed: int, *, shape: MultiTurnShape = AGENT_SHAPE, **options: Any) -> list[TraceRecord]:
    """Agent sessions with tools and tool results (see :data:`AGENT_SHAPE`); options as
    :func:`multi_turn`."""
    return multi_turn(seed, shape=shape, prefix="ag", **options)


WORKLOADS: dict[str, Callable[..., list[TraceRecord]]] = {
    "multi-turn": multi_turn,
    "templated": templated,
    "greetings": greetings,
    "agent": agent,
    "shared-docs": shared_docs,
    "unique": unique,
}
"""Trace generators by workload name."""

SHAPES: dict[str, MultiTurnShape | SharedDocsShape | UniqueShape] = {
    "multi-turn": MultiTurnShape(),
    "templated": TEMPLATED_SHAPE,
    "greetings": GREETINGS_SHAPE,
    "agent": AGENT_SHAPE,
    "shared-docs": SharedDocsShape(),
    "unique": UniqueShape(),
}
"""Each workload's default shape: what ``--shape KEY=VALUE`` changes."""

_ID_PREFIXES = {"multi-turn": "mt", "templated": "tp", "greetings": "gr", "agent": "ag"}


def conversation_stream(
    name: str, seed: int, *, model: str = DEFAULT_MODEL
) -> Iterator[Conversation]:
    """An endless stream of a workload's conversations in default shapes (closed-loop users)."""
    shape = SHAPES.get(name)
    if isinstance(shape, MultiTurnShape):
        return iter_multi_turn(seed, shape, model=model, prefix=_ID_PREFIXES[name])
    if isinstance(shape, SharedDocsShape):
        return iter_shared_docs(seed, shape, model=model)
    if isinstance(shape, UniqueShape):
        return iter_unique(seed, shape, model=model)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def parse_shape(workload: str, items: Sequence[str]) -> Any:
    """``KEY=VALUE`` pairs onto the workload's default shape (``LO-HI`` or ``N`` for ranges);
    raises ValueError with the reason."""
    try:
        shape = SHAPES[workload]
    except KeyError:
        raise ValueError(f"unknown workload {workload!r}") from None
    names = [f.name for f in fields(shape)]
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(names)}")
        current = getattr(shape, key)
        try:
            if isinstance(current, tuple):
                kind = type(current[0])
                lo, _, hi = value.partition("-")
                changes[key] = (kind(lo), kind(hi or lo))
            else:
                changes[key] = type(current)(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a {type(current).__name__}") from None
    try:
        return replace(shape, **changes)
    except ValueError as e:
        raise ValueError(f"{', '.join(items)}: {e}") from None


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

    helps = {
        "multi-turn": "multi-turn chat over shared system prompts",
        "templated": "multi-turn chat opening with app templates or greetings",
        "greetings": "multi-turn chat, most conversations opening with a greeting",
        "agent": "agent sessions: long system prompt, tools, many tool-result turns",
    }
    for name in MULTI_TURN_WORKLOADS:
        preset = SHAPES[name]
        assert isinstance(preset, MultiTurnShape)
        mt = sub.add_parser(name, help=helps[name])
        common(mt, 1.0, "--conversations")
        mt.add_argument("--system-prompts", type=_positive_int, default=preset.system_prompts,
                        help="distinct system prompts (%(default)s)")
        mt.add_argument("--system-tokens", type=_token_range, default=preset.system_tokens,
                        help=_range_help(preset.system_tokens))
        mt.add_argument("--turns", type=_token_range, default=preset.turns,
                        help="turns per conversation " + _range_help(preset.turns))
        mt.add_argument("--user-tokens", type=_token_range, default=preset.user_tokens,
                        help=_range_help(preset.user_tokens))
        mt.add_argument("--think-mean", type=float, default=preset.think_mean_s,
                        help="mean think time, s (%(default)s)")
        mt.add_argument("--shape", action="append", default=[], metavar="KEY=VALUE",
                        help="any other shape field, e.g. --shape greeting_share=0.3 "
                             "--shape template_chars=200-600 (MultiTurnShape)")

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


def _range_help(bounds: tuple[int, int]) -> str:
    return f"({bounds[0]}-{bounds[1]})"


def _records_from_args(args: argparse.Namespace) -> list[TraceRecord]:
    common: dict[str, Any] = {"rate": args.rate, "duration_s": args.duration, "model": args.model}
    if args.workload in MULTI_TURN_WORKLOADS:
        if args.think_mean < 0:
            raise SystemExit("--think-mean must be >= 0")
        try:
            base = parse_shape(args.workload, args.shape)
            mt_shape = replace(
                base,
                system_prompts=args.system_prompts,
                system_tokens=args.system_tokens,
                turns=args.turns,
                user_tokens=args.user_tokens,
                think_mean_s=args.think_mean,
                max_tokens=args.max_tokens,
            )
        except ValueError as e:
            raise SystemExit(f"--shape {e}") from None
        return multi_turn(
            args.seed,
            conversations=args.conversations,
            shape=mt_shape,
            prefix=_ID_PREFIXES[args.workload],
            **common,
        )
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
