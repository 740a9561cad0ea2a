"""Prompt rendering, pseudo-tokens, KV block hashes and generated text.

The simulator has no real tokenizer. A *pseudo-token* is a slice of four characters of the
rendered prompt (the last one may be shorter), which is close to the average of BPE tokenizers on
English text. Everything here is pure and deterministic.

Chat messages are rendered so that a conversation grows by appending: the rendering of a prompt
followed by the text generated for it is an exact prefix of the rendering of the next turn, when
the client appends the reply as an assistant message and adds a new user message. Because
pseudo-tokens are fixed slices of that text, the KV blocks of a finished turn (prompt *and* output)
are the leading blocks of the next turn.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import xxhash

CHARS_PER_TOKEN = 4
"""Characters per pseudo-token: about what BPE tokenizers average on English text."""

BLOCK_TOKENS = 16
"""Tokens per KV block, vLLM's default block size."""

BLOCK_CHARS = CHARS_PER_TOKEN * BLOCK_TOKENS
"""Characters of rendered text covered by one full KV block."""

ROOT_HASH = 0
"""Parent hash of the first block of every prompt."""

VOCAB_SIZE = 128_256
"""Size of the id space `/tokenize` reports ids in (Llama 3's vocabulary size)."""

ASSISTANT_PREFIX = "<|assistant|>\n"
"""Generation prompt appended after the last chat message."""

_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

_SYLLABLE_TEXT = (
    "ka lo mi ne ru sa ti vo be da fu go hi ja ko le ma no pe qui "
    "ra se to va xe yo zu an el in or um est per con tra lum gen dor mar"
)
_SYLLABLES = tuple(_SYLLABLE_TEXT.split())


class PromptError(ValueError):
    """The request body does not describe a prompt the simulator can render."""


def _content_text(content: Any) -> str:
    """Return the text of a chat message's `content` (a string, text parts or null)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping):
                raise PromptError("message content parts must be objects")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise PromptError("a text content part needs a string 'text'")
                texts.append(text)
            # Other part types (images, audio) add no text: the simulator ignores them.
        return "".join(texts)
    raise PromptError("message content must be a string, a list of parts or null")


def render_tools(tools: Any) -> str:
    """Render a chat request's ``tools`` as ``<|tools|>\\nJSON\\n`` ("" for none).

    The JSON keeps the client's key order, so the same definitions always render alike.
    """
    if tools is None:
        return ""
    if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
        raise PromptError("'tools' must be a list of objects")
    if not tools:
        return ""
    return f"<|tools|>\n{json.dumps(tools, ensure_ascii=False, separators=(',', ':'))}\n"


def render_chat(messages: Any, tools: Any = None) -> str:
    """Render OpenAI chat messages as one prompt string, ending with the generation prompt.

    Each message becomes ``<|role|>\\ncontent\\n``; ``<|assistant|>\\n`` follows the last one.
    Tool definitions (:func:`render_tools`) go right after a leading system message, or first
    when there is none, as chat templates place them: they are part of every turn's prefix.
    """
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    tools_text = render_tools(tools)
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise PromptError("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise PromptError("each message needs a string 'role'")
        if tools_text and (parts or role != "system"):
            parts.append(tools_text)
            tools_text = ""
        parts.append(f"<|{role}|>\n{_content_text(message.get('content'))}\n")
    parts.append(tools_text)
    parts.append(ASSISTANT_PREFIX)
    return "".join(parts)


def render_token_ids(ids: Sequence[int]) -> str:
    """Render token ids as text, four characters per id, so the token count is preserved."""
    chars: list[str] = []
    for token_id in ids:
        value = token_id % 64**4
        for shift in (18, 12, 6, 0):
            chars.append(_ID_ALPHABET[(value >> shift) & 63])
    return "".join(chars)


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    )


def render_completion_prompts(prompt: Any) -> list[str]:
    """Render a completions `prompt` as one string per prompt in the batch.

    Accepts a string, a list of strings, a list of token ids or a list of lists of token ids.
    """
    if isinstance(prompt, str):
        rendered = [prompt]
    elif _is_token_ids(prompt):
        rendered = [render_token_ids(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        rendered = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_token_ids(p) for p in prompt):
        rendered = [render_token_ids(p) for p in prompt]
    else:
        raise PromptError(
            "'prompt' must be a string, a list of strings, a list of token ids "
            "or a list of lists of token ids"
        )
    if any(not text for text in rendered):
        raise PromptError("'prompt' must not be empty")
    return rendered


def count_tokens(text: str) -> int:
    """Number of pseudo-tokens in `text`."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


_TOKEN_MIX = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F], dtype=np.uint64)
"""Odd multipliers that mix a pseudo-token's four code points into one id."""


def token_ids(text: str) -> list[int]:
    """Deterministic token ids for `text`, one per pseudo-token (as `/tokenize` returns them).

    Computed over all code points at once: a router that asks every pod to tokenize every
    prompt (vLLM router's ``cache_aware``) sends thousands of tokens per request, and a
    per-token Python loop made the pods' process, not the modelled GPUs, the bottleneck.
    """
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    padding = -len(points) % CHARS_PER_TOKEN
    if padding:
        points = np.concatenate([points, np.zeros(padding, dtype=np.uint64)])
    mixed = (points.reshape(-1, CHARS_PER_TOKEN) * _TOKEN_MIX).sum(axis=1, dtype=np.uint64)
    ids: list[int] = ((mixed ^ (mixed >> np.uint64(29))) % np.uint64(VOCAB_SIZE)).tolist()
    return ids


def chain_hash(parent: int, block_text: str) -> int:
    """Hash of a KV block: xxh3_64 of its parent's hash and its own tokens.

    Because the parent's hash is part of the input, a block's hash covers its whole prefix.
    """
    return xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + block_text.encode())


def block_hashes(text: str, parent: int = ROOT_HASH) -> list[int]:
    """Chained hashes of the full KV blocks of `text` (a partial last block has none)."""
    hashes: list[int] = []
    for start in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
        parent = chain_hash(parent, text[start : start + BLOCK_CHARS])
        hashes.append(parent)
    return hashes


def text_seed(text: str) -> int:
    """Seed for the generated text of a prompt, so that a prompt always gets the same reply."""
    return xxhash.xxh3_64_intdigest(text.encode())


def sampled_seed(text: str, seed: int) -> int:
    """Seed for the reply to a prompt sampled with a request's ``seed``: the same prompt and
    seed give the same reply, other seeds (and greedy decoding) other replies."""
    return xxhash.xxh3_64_intdigest(b"seed:%d:" % seed + text.encode())


class PseudoWords:
    """Deterministic pseudo-words, handed out as tokens of exactly four characters.

    The text is lower-case words joined by single spaces; the last token ends with a full stop,
    so a reply never starts or ends with white space (clients that strip replies keep the
    conversation's prefix intact).
    """

    __slots__ = ("_buffer", "_rng")

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._buffer = self._word()

    def _word(self) -> str:
        rng = self._rng
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))

    def next_token(self, last: bool = False) -> str:
        """Return the next four characters of text; `last` ends it with a full stop."""
        while len(self._buffer) < CHARS_PER_TOKEN:
            self._buffer += " " + self._word()
        token, self._buffer = self._buffer[:CHARS_PER_TOKEN], self._buffer[CHARS_PER_TOKEN:]
        if last:
            token = token[:-1] + "."
        return token

    def tokens(self, count: int) -> Iterator[str]:
        """Yield `count` tokens, the last one ending the text."""
        for i in range(count):
            yield self.next_token(last=i == count - 1)
