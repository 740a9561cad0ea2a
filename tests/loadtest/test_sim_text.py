"""Prompt rendering, pseudo-tokens, chained block hashes and generated text of the simulator."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtest.simserver.text import (
    BLOCK_CHARS,
    VOCAB_SIZE,
    PromptError,
    PseudoWords,
    block_hashes,
    chain_hash,
    count_tokens,
    render_chat,
    render_completion_prompts,
    render_token_ids,
    token_ids,
)


def test_chat_rendering_has_role_markers_and_generation_prompt() -> None:
    """Each message is rendered as <|role|>, its content, and the prompt ends for the assistant."""
    text = render_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_chat_content_parts_are_joined_and_other_parts_ignored() -> None:
    """Text parts are concatenated; image parts add nothing; null content is empty."""
    text = render_chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image_url", "image_url": {"url": "x"}},
                    {"type": "text", "text": "b"},
                ],
            },
            {"role": "assistant", "content": None},
        ]
    )
    assert text == "<|user|>\nab\n<|assistant|>\n\n<|assistant|>\n"


@given(
    history=st.lists(st.text(min_size=0, max_size=200), min_size=1, max_size=4),
    reply=st.text(min_size=1, max_size=300),
    question=st.text(max_size=100),
)
def test_prompt_plus_reply_is_a_prefix_of_the_next_turn(
    history: list[str], reply: str, question: str
) -> None:
    """Appending the reply and a new user message extends the previous rendering."""
    messages = [{"role": "user", "content": h} for h in history]
    first = render_chat(messages)
    second = render_chat(
        [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": question}]
    )
    assert second.startswith(first + reply)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
TOOLS_TEXT = '<|tools|>\n[{"type":"function","function":{"name":"get_weather","parameters":{}}}]\n'


def test_tools_are_rendered_after_the_system_message() -> None:
    """Tool definitions follow a leading system message, or open the prompt without one."""
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hi"}
    assert render_chat([system, user], TOOLS) == (
        f"<|system|>\nBe brief.\n{TOOLS_TEXT}<|user|>\nHi\n<|assistant|>\n"
    )
    assert render_chat([user], TOOLS) == f"{TOOLS_TEXT}<|user|>\nHi\n<|assistant|>\n"
    assert render_chat([system], TOOLS).endswith(f"{TOOLS_TEXT}<|assistant|>\n")
    assert render_chat([system, user], []) == render_chat([system, user], None)


def test_tool_turns_extend_the_previous_rendering() -> None:
    """With tools in every body, appending the reply and a tool result extends the prompt, so
    the system prompt and the tools stay cached across an agent's turns."""
    messages = [{"role": "system", "content": "Agent."}, {"role": "user", "content": "Go"}]
    first = render_chat(messages, TOOLS)
    result = {"role": "tool", "tool_call_id": "call-1", "content": "42"}
    second = render_chat([*messages, {"role": "assistant", "content": "ok"}, result], TOOLS)
    assert second.startswith(first + "ok")
    assert second.endswith("<|tool|>\n42\n<|assistant|>\n")


@pytest.mark.parametrize("tools", ["x", {"type": "function"}, [1]])
def test_bad_tools_are_refused(tools: object) -> None:
    with pytest.raises(PromptError):
        render_chat([{"role": "user", "content": "Hi"}], tools)


@pytest.mark.parametrize(
    "messages",
    [None, [], "hello", [1], [{"content": "x"}], [{"role": "user", "content": 3}],
     [{"role": "user", "content": [{"type": "text"}]}]],
)  # fmt: skip
def test_bad_messages_are_refused(messages: object) -> None:
    """Malformed messages raise PromptError, which the server answers with 400."""
    with pytest.raises(PromptError):
        render_chat(messages)


def test_completion_prompt_forms() -> None:
    """A string, strings, token ids and lists of token ids each render to one text per prompt."""
    assert render_completion_prompts("abc") == ["abc"]
    assert render_completion_prompts(["a", "b"]) == ["a", "b"]
    ids = render_completion_prompts([1, 2, 3])
    assert len(ids) == 1 and count_tokens(ids[0]) == 3
    assert render_completion_prompts([[1, 2], [3]]) == [
        render_token_ids([1, 2]),
        render_token_ids([3]),
    ]
    assert render_token_ids([7, 8]) == render_token_ids([7, 8])
    assert render_token_ids([7]) != render_token_ids([8])


@pytest.mark.parametrize("prompt", ["", [], [""], [1, "a"], [[1], []], [True], 5, None, {}])
def test_bad_completion_prompts_are_refused(prompt: object) -> None:
    """Empty, mixed or wrongly typed prompts raise PromptError."""
    with pytest.raises(PromptError):
        render_completion_prompts(prompt)


def test_tokens_are_four_characters() -> None:
    """A pseudo-token is four characters; a partial last one still counts."""
    assert count_tokens("") == 0
    assert count_tokens("abcd") == 1
    assert count_tokens("abcde") == 2
    assert len(token_ids("abcdefghi")) == 3
    assert token_ids("abcdabcd")[0] == token_ids("abcdabcd")[1]


@given(st.text(max_size=200), st.text(max_size=200))
def test_token_ids_of_a_prefix_are_a_prefix_of_the_ids(head: str, tail: str) -> None:
    """Ids depend only on each token's own four characters, so whole tokens of a prefix keep
    their ids (what a prefix-tree router relies on); every id is within the vocabulary."""
    head = head[: len(head) - len(head) % 4]
    ids = token_ids(head + tail)
    assert ids[: len(head) // 4] == token_ids(head)
    assert len(ids) == count_tokens(head + tail)
    assert all(0 <= i < VOCAB_SIZE for i in ids)


def test_token_ids_tell_tokens_apart() -> None:
    """Different four-character tokens, non-ASCII ones included, get different ids."""
    words = ["abcd", "abce", "bacd", "éèàü", "日本語で", "    ", "1234"]
    assert len({token_ids(word)[0] for word in words}) == len(words)
    assert token_ids("") == []


def test_block_hashes_cover_full_blocks_only() -> None:
    """Only complete 16-token (64-character) blocks get a hash."""
    assert block_hashes("x" * (BLOCK_CHARS - 1)) == []
    assert len(block_hashes("x" * BLOCK_CHARS)) == 1
    assert len(block_hashes("x" * (3 * BLOCK_CHARS + 10))) == 3


def test_same_block_under_different_parents_hashes_differently() -> None:
    """A block's hash covers its whole prefix, not only its own tokens."""
    block = "b" * BLOCK_CHARS
    under_a = block_hashes("a" * BLOCK_CHARS + block)
    under_c = block_hashes("c" * BLOCK_CHARS + block)
    assert under_a[1] != under_c[1]
    assert chain_hash(1, block) != chain_hash(2, block)
    # Identical block contents in one prompt get distinct hashes too.
    repeated = block_hashes(block * 3)
    assert len(set(repeated)) == 3


def test_shared_prefix_shares_blocks() -> None:
    """Two prompts agree on the hashes of the blocks they share and differ after."""
    prefix = "s" * (2 * BLOCK_CHARS)
    first = block_hashes(prefix + "x" * BLOCK_CHARS)
    second = block_hashes(prefix + "y" * BLOCK_CHARS)
    assert first[:2] == second[:2]
    assert first[2] != second[2]


def test_pseudo_words_are_deterministic_four_character_tokens() -> None:
    """The same seed gives the same text; tokens are four characters; the text ends cleanly."""
    first = list(PseudoWords(42).tokens(50))
    assert first == list(PseudoWords(42).tokens(50))
    assert first != list(PseudoWords(43).tokens(50))
    assert all(len(token) == 4 for token in first)
    text = "".join(first)
    assert text == text.strip()
    assert text.endswith(".")
    assert "  " not in text
