"""Routing keys from request bodies, and the validation of the fields they are made of."""

from __future__ import annotations

from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import KeyMode
from balancer.errors import BadRequestError
from balancer.prefix import (
    SEPARATOR,
    Kind,
    key_text,
    model_of,
    routing_key,
    session_key,
    validate,
)

FIRST_USER = KeyMode.FIRST_USER_MESSAGE
PROMPT_PREFIX = KeyMode.PROMPT_PREFIX
SYSTEM = "You are a careful assistant."
IMAGE = "https://example.com/cat.png"


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "llama", "messages": list(messages), **extra}


def msg(role: Any, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


# -- key text for every body shape ---------------------------------------------------------

KEY_TEXT_CASES = [
    pytest.param(
        Kind.CHAT,
        chat(msg("system", SYSTEM), msg("user", "Hello there")),
        FIRST_USER,
        "Hello there",
        id="chat-string-content",
    ),
    pytest.param(
        Kind.CHAT,
        chat(msg("system", SYSTEM), msg("user", "Hello there")),
        PROMPT_PREFIX,
        f"system:{SYSTEM}\nuser:Hello there\n",
        id="chat-prompt-prefix-includes-the-system-prompt",
    ),
    pytest.param(
        Kind.CHAT,
        chat(
            msg(
                "user",
                [
                    {"type": "text", "text": "What is in "},
                    {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
                    {"type": "text", "text": "?"},
                ],
            )
        ),
        FIRST_USER,
        f"What is in <image_url:{xxhash.xxh3_64_hexdigest(IMAGE.encode())}>?",
        id="chat-content-parts-text-and-image",
    ),
    pytest.param(
        Kind.CHAT,
        chat(msg("user", [{"type": "input_audio", "input_audio": {"data": "AAA"}}])),
        FIRST_USER,
        f"<input_audio:{xxhash.xxh3_64_hexdigest(b'AAA')}>",
        id="chat-content-part-audio-data",
    ),
    pytest.param(
        Kind.CHAT,
        chat(msg("user", [{"type": "image_url", "image_url": {"detail": "low"}}])),
        FIRST_USER,
        "",
        id="chat-content-part-without-text-or-reference",
    ),
    pytest.param(
        Kind.CHAT,
        chat(msg("user", None)),
        FIRST_USER,
        "",
        id="chat-null-content",
    ),
    pytest.param(
        Kind.CHAT,
        chat(msg("assistant", None), msg("user", "Then what?")),
        PROMPT_PREFIX,
        "assistant:\nuser:Then what?\n",
        id="chat-prompt-prefix-null-content",
    ),
    pytest.param(
        Kind.CHAT,
        chat(msg("system", SYSTEM), msg("assistant", "Hi!"), msg("user", "Question")),
        FIRST_USER,
        "Question",
        id="chat-skips-messages-before-the-first-user",
    ),
    pytest.param(
        Kind.CHAT,
        chat(msg("system", SYSTEM)),
        FIRST_USER,
        f"system:{SYSTEM}\n",
        id="chat-without-user-message-falls-back-to-rendered-prompt",
    ),
    pytest.param(
        Kind.CHAT,
        chat(msg("system", SYSTEM), msg("assistant", "Hi!")),
        FIRST_USER,
        f"system:{SYSTEM}\nassistant:Hi!\n",
        id="chat-without-user-message-renders-every-message",
    ),
    pytest.param(
        Kind.COMPLETIONS,
        {"model": "llama", "prompt": "Once upon a time"},
        FIRST_USER,
        "Once upon a time",
        id="completions-string",
    ),
    pytest.param(
        Kind.COMPLETIONS,
        {"model": "llama", "prompt": ["First prompt", "Second prompt"]},
        FIRST_USER,
        "First prompt",
        id="completions-list-of-strings-keys-on-the-first",
    ),
    pytest.param(
        Kind.COMPLETIONS,
        {"model": "llama", "prompt": [101, 2023, 7]},
        FIRST_USER,
        "101,2023,7",
        id="completions-token-ids",
    ),
    pytest.param(
        Kind.COMPLETIONS,
        {"model": "llama", "prompt": [[101, 2023], [7, 8]]},
        FIRST_USER,
        "101,2023",
        id="completions-list-of-token-id-lists-keys-on-the-first",
    ),
    pytest.param(
        Kind.COMPLETIONS,
        {"model": "llama", "prompt": "Once upon a time"},
        PROMPT_PREFIX,
        "Once upon a time",
        id="completions-ignore-the-key-mode",
    ),
    pytest.param(
        Kind.EMBEDDINGS,
        {"model": "bge", "input": "Embed me"},
        FIRST_USER,
        "Embed me",
        id="embeddings-string",
    ),
    pytest.param(
        Kind.EMBEDDINGS,
        {"model": "bge", "input": ["Embed me", "and me"]},
        FIRST_USER,
        "Embed me",
        id="embeddings-list-of-strings",
    ),
    pytest.param(
        Kind.EMBEDDINGS,
        {"model": "bge", "input": [5, 6]},
        FIRST_USER,
        "5,6",
        id="embeddings-token-ids",
    ),
    pytest.param(
        Kind.EMBEDDINGS,
        {"model": "bge", "input": [[5, 6], [7]]},
        FIRST_USER,
        "5,6",
        id="embeddings-list-of-token-id-lists",
    ),
]


@pytest.mark.parametrize(("kind", "body", "mode", "expected"), KEY_TEXT_CASES)
def test_key_text_is_taken_from_the_right_part_of_each_body_shape(
    kind: Kind, body: dict[str, Any], mode: KeyMode, expected: str
) -> None:
    """Every body shape yields the text its key mode promises, and the body validates."""
    validate(kind, body)
    assert key_text(kind, body, mode, 1000) == expected


def test_the_routing_key_is_the_model_then_the_key_text() -> None:
    """A key is the model name, a NUL separator and the key text."""
    body = chat(msg("user", "Hello"))
    assert routing_key(Kind.CHAT, body, FIRST_USER, 100) == f"llama{SEPARATOR}Hello"


def test_the_same_text_for_different_models_gives_different_keys() -> None:
    """One model's prefixes never share a key with another's."""
    a = routing_key(Kind.COMPLETIONS, {"model": "a", "prompt": "x"}, FIRST_USER, 100)
    b = routing_key(Kind.COMPLETIONS, {"model": "b", "prompt": "x"}, FIRST_USER, 100)
    assert a != b


def test_different_images_give_different_keys() -> None:
    """Two requests with the same text but different attached images key differently."""

    def with_image(url: str) -> dict[str, Any]:
        parts = [
            {"type": "text", "text": "Describe"},
            {"type": "image_url", "image_url": {"url": url}},
        ]
        return chat(msg("user", parts))

    a = routing_key(Kind.CHAT, with_image("https://x/a.png"), FIRST_USER, 100)
    b = routing_key(Kind.CHAT, with_image("https://x/b.png"), FIRST_USER, 100)
    assert a != b


# -- truncation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "mode", "prefix_chars", "expected"),
    [
        (Kind.CHAT, chat(msg("user", "Hello there")), FIRST_USER, 5, "Hello"),
        (Kind.CHAT, chat(msg("user", "Hi")), FIRST_USER, 5, "Hi"),
        (
            Kind.CHAT,
            chat(msg("system", "Be terse."), msg("user", "Hello")),
            PROMPT_PREFIX,
            12,
            "system:Be te",
        ),
        (
            Kind.CHAT,
            chat(msg("system", "Be terse."), msg("user", "Hello")),
            PROMPT_PREFIX,
            20,
            "system:Be terse.\nuse",
        ),
        (Kind.COMPLETIONS, {"model": "m", "prompt": "abcdef"}, FIRST_USER, 3, "abc"),
        (Kind.COMPLETIONS, {"model": "m", "prompt": [11, 22, 33]}, FIRST_USER, 4, "11,2"),
        (Kind.EMBEDDINGS, {"model": "m", "input": "abcdef"}, FIRST_USER, 1, "a"),
        (Kind.CHAT, chat(msg("user", "日本語のテキスト🙂")), FIRST_USER, 4, "日本語の"),
    ],
)
def test_key_text_is_cut_to_prefix_chars_characters(
    kind: Kind, body: dict[str, Any], mode: KeyMode, prefix_chars: int, expected: str
) -> None:
    """Only the first prefix_chars characters (not bytes) of the text go into the key."""
    assert key_text(kind, body, mode, prefix_chars) == expected


@settings(max_examples=200)
@given(prompt=st.text(min_size=0, max_size=300), prefix_chars=st.integers(1, 400))
def test_a_completions_key_is_exactly_the_prompts_first_characters(
    prompt: str, prefix_chars: int
) -> None:
    """For any prompt and length, the key text is the prompt cut to prefix_chars."""
    body = {"model": "m", "prompt": prompt}
    assert key_text(Kind.COMPLETIONS, body, FIRST_USER, prefix_chars) == prompt[:prefix_chars]


@settings(max_examples=150)
@given(
    contents=st.lists(st.text(max_size=40), min_size=1, max_size=6),
    prefix_chars=st.integers(1, 200),
)
def test_a_prompt_prefix_key_is_the_start_of_the_rendered_conversation(
    contents: list[str], prefix_chars: int
) -> None:
    """The prompt-prefix key is the role-tagged transcript cut to prefix_chars."""
    roles = ("system", "user", "assistant", "user", "assistant", "user")
    messages = [msg(role, c) for role, c in zip(roles, contents, strict=False)]
    rendered = "".join(f"{m['role']}:{m['content']}\n" for m in messages)
    body = chat(*messages)
    assert key_text(Kind.CHAT, body, PROMPT_PREFIX, prefix_chars) == rendered[:prefix_chars]


# -- conversations -------------------------------------------------------------------------

turn_text = st.text(min_size=1, max_size=60)


@settings(max_examples=100)
@given(
    system=st.none() | turn_text,
    first_user=turn_text,
    turns=st.lists(st.tuples(st.none() | turn_text, turn_text), max_size=6),
    prefix_chars=st.integers(1, 120),
)
def test_every_turn_of_a_conversation_keeps_the_first_user_message_key(
    system: str | None,
    first_user: str,
    turns: list[tuple[str | None, str]],
    prefix_chars: int,
) -> None:
    """A client appending the assistant reply and a new user message never changes the key."""
    messages = ([msg("system", system)] if system is not None else []) + [msg("user", first_user)]
    keys = {routing_key(Kind.CHAT, chat(*messages), FIRST_USER, prefix_chars)}
    for reply, question in turns:
        messages += [msg("assistant", reply), msg("user", question)]
        validate(Kind.CHAT, chat(*messages))
        keys.add(routing_key(Kind.CHAT, chat(*messages), FIRST_USER, prefix_chars))
    assert len(keys) == 1


@settings(max_examples=100)
@given(
    first_user=turn_text,
    turns=st.lists(st.tuples(turn_text, turn_text), min_size=1, max_size=6),
    prefix_chars=st.integers(1, 300),
)
def test_a_growing_conversation_only_extends_its_prompt_prefix_key(
    first_user: str, turns: list[tuple[str, str]], prefix_chars: int
) -> None:
    """In prompt-prefix mode each turn's key starts with the previous turn's key."""
    messages = [msg("system", SYSTEM), msg("user", first_user)]
    previous = key_text(Kind.CHAT, chat(*messages), PROMPT_PREFIX, prefix_chars)
    for reply, question in turns:
        messages += [msg("assistant", reply), msg("user", question)]
        current = key_text(Kind.CHAT, chat(*messages), PROMPT_PREFIX, prefix_chars)
        assert current.startswith(previous)
        if len(previous) == prefix_chars:
            assert current == previous
        previous = current


def test_conversations_sharing_a_system_prompt_get_their_own_first_user_message_keys() -> None:
    """The default key separates conversations that only share the system prompt."""
    a = chat(msg("system", SYSTEM), msg("user", "Plan a trip to Lisbon"))
    b = chat(msg("system", SYSTEM), msg("user", "Fix my Python code"))
    assert routing_key(Kind.CHAT, a, FIRST_USER, 100) != routing_key(Kind.CHAT, b, FIRST_USER, 100)


def test_conversations_sharing_a_long_system_prompt_share_a_prompt_prefix_key() -> None:
    """prompt-prefix groups conversations whose shared system prompt fills the prefix."""
    a = chat(msg("system", SYSTEM), msg("user", "Plan a trip to Lisbon"))
    b = chat(msg("system", SYSTEM), msg("user", "Fix my Python code"))
    prefix_chars = len("system:") + len(SYSTEM)
    key_a = routing_key(Kind.CHAT, a, PROMPT_PREFIX, prefix_chars)
    assert key_a == routing_key(Kind.CHAT, b, PROMPT_PREFIX, prefix_chars)


# -- explicit session keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        ("conv-42", {"user": "alice"}, f"session{SEPARATOR}conv-42"),
        ("conv-42", {}, f"session{SEPARATOR}conv-42"),
        (None, {"user": "alice"}, f"user{SEPARATOR}alice"),
        ("", {"user": "alice"}, f"user{SEPARATOR}alice"),
        (None, {"user": ""}, None),
        (None, {"user": None}, None),
        (None, {"user": 7}, None),
        (None, {}, None),
        ("", {}, None),
    ],
)
def test_the_session_header_wins_over_the_user_field_and_both_over_the_prefix(
    header: str | None, body: dict[str, Any], expected: str | None
) -> None:
    """A non-empty session header is the key, else a non-empty `user`, else there is none."""
    assert session_key(header, body) == expected


def test_a_session_header_and_a_user_field_with_the_same_value_key_differently() -> None:
    """Header and `user` values live in separate namespaces, so they cannot collide."""
    assert session_key("x", {}) != session_key(None, {"user": "x"})


# -- validation ----------------------------------------------------------------------------

VALID_MESSAGES = [msg("user", "hi")]

INVALID_BODIES = [
    pytest.param(Kind.CHAT, {"messages": VALID_MESSAGES}, "model", id="model-missing"),
    pytest.param(Kind.CHAT, {"model": 3, "messages": VALID_MESSAGES}, "model", id="model-number"),
    pytest.param(Kind.CHAT, {"model": "", "messages": VALID_MESSAGES}, "model", id="model-empty"),
    pytest.param(Kind.COMPLETIONS, {"model": None, "prompt": "x"}, "model", id="model-null"),
    pytest.param(Kind.CHAT, {"model": "m"}, "messages", id="messages-missing"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": []}, "messages", id="messages-empty"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": "hi"}, "messages", id="messages-string"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": {"role": "user"}}, "messages",
                 id="messages-object"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": ["hi"]}, "messages[0]",
                 id="message-not-object"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": [{"content": "hi"}]},
                 "messages[0].role", id="role-missing"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": [msg("user", "a"), msg(1, "b")]},
                 "messages[1].role", id="role-number"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": [msg("user", 5)]},
                 "messages[0].content", id="content-number"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": [msg("user", {"text": "x"})]},
                 "messages[0].content", id="content-object"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": [msg("user", [{"text": "a"}, "b"])]},
                 "messages[0].content[1]", id="content-part-not-object"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": [msg("user", "a"), msg("tool", 5)]},
                 "messages[1].content", id="later-content-number"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": VALID_MESSAGES, "stream": "yes"},
                 "stream", id="stream-string"),
    pytest.param(Kind.COMPLETIONS, {"model": "m", "prompt": "x", "stream": 1}, "stream",
                 id="stream-number"),
    pytest.param(Kind.CHAT, {"model": "m", "messages": VALID_MESSAGES, "user": 42}, "user",
                 id="user-number"),
    pytest.param(Kind.EMBEDDINGS, {"model": "m", "input": "x", "user": ["a"]}, "user",
                 id="user-list"),
    pytest.param(Kind.COMPLETIONS, {"model": "m"}, "prompt", id="prompt-missing"),
    pytest.param(Kind.COMPLETIONS, {"model": "m", "prompt": 5}, "prompt", id="prompt-number"),
    pytest.param(Kind.COMPLETIONS, {"model": "m", "prompt": []}, "prompt", id="prompt-empty"),
    pytest.param(Kind.COMPLETIONS, {"model": "m", "prompt": ["a", 1]}, "prompt",
                 id="prompt-mixed-list"),
    pytest.param(Kind.COMPLETIONS, {"model": "m", "prompt": [True, False]}, "prompt",
                 id="prompt-booleans-are-not-token-ids"),
    pytest.param(Kind.COMPLETIONS, {"model": "m", "prompt": [[1], []]}, "prompt",
                 id="prompt-empty-token-list"),
    pytest.param(Kind.COMPLETIONS, {"model": "m", "prompt": [[1], [1.5]]}, "prompt",
                 id="prompt-float-token"),
    pytest.param(Kind.COMPLETIONS, {"model": "m", "prompt": [[1], "a"]}, "prompt",
                 id="prompt-token-lists-mixed-with-strings"),
    pytest.param(Kind.EMBEDDINGS, {"model": "m"}, "input", id="input-missing"),
    pytest.param(Kind.EMBEDDINGS, {"model": "m", "input": {"text": "x"}}, "input",
                 id="input-object"),
]


@pytest.mark.parametrize(("kind", "body", "param"), INVALID_BODIES)
def test_a_malformed_body_is_rejected_naming_the_field(
    kind: Kind, body: dict[str, Any], param: str
) -> None:
    """Validation raises a 400 whose param and message name the offending field."""
    with pytest.raises(BadRequestError) as caught:
        validate(kind, body)
    assert caught.value.param == param
    assert caught.value.status == 400
    assert param in caught.value.message


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.CHAT, {"model": "m", "messages": VALID_MESSAGES, "stream": True}),
        (Kind.CHAT, {"model": "m", "messages": VALID_MESSAGES, "stream": False}),
        (Kind.CHAT, {"model": "m", "messages": VALID_MESSAGES, "stream": None, "user": None}),
        (Kind.CHAT, {"model": "m", "messages": [msg("user", "a"), msg("assistant", None)]}),
        (Kind.CHAT, {"model": "m", "messages": [msg("user", [])]}),
        (Kind.CHAT, {"model": "m", "messages": [{"role": "user"}]}),
        (Kind.COMPLETIONS, {"model": "m", "prompt": ""}),
        (Kind.COMPLETIONS, {"model": "m", "prompt": [0]}),
        (Kind.EMBEDDINGS, {"model": "m", "input": [[1, 2]], "user": "u"}),
    ],
)
def test_well_formed_edge_cases_are_accepted(kind: Kind, body: dict[str, Any]) -> None:
    """Optional fields set to null, empty text and empty part lists are valid."""
    validate(kind, body)
    key_text(kind, body, FIRST_USER, 100)


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        (Kind.CHAT, {"model": "m", "messages": [msg("user", 5)]}, "messages[0].content"),
        (Kind.CHAT, {"model": "m", "messages": []}, "messages"),
        (Kind.COMPLETIONS, {"model": "m", "prompt": {}}, "prompt"),
        (Kind.EMBEDDINGS, {"model": "m", "input": 3}, "input"),
    ],
)
def test_key_extraction_rejects_what_validation_rejects(
    kind: Kind, body: dict[str, Any], param: str
) -> None:
    """Building a key from an unvalidated malformed body raises the same named error."""
    with pytest.raises(BadRequestError) as caught:
        key_text(kind, body, FIRST_USER, 100)
    assert caught.value.param == param


def test_model_of_returns_the_model_name() -> None:
    """The model field is read as is."""
    assert model_of({"model": "meta-llama/Llama-3.1-8B-Instruct"}) == (
        "meta-llama/Llama-3.1-8B-Instruct"
    )


# -- keys on real traffic: templates, greetings, documents, attachments -------------------

long_text = st.text(min_size=0, max_size=400)


@settings(max_examples=200)
@given(
    system=st.none() | turn_text,
    first_user=st.text(min_size=0, max_size=150),
    turns=st.lists(st.tuples(st.none() | turn_text, turn_text), min_size=1, max_size=6),
    prefix_chars=st.integers(1, 400),
    min_key_chars=st.integers(0, 200),
)
def test_a_conversation_keeps_one_key_from_its_second_turn_on(
    system: str | None,
    first_user: str,
    turns: list[tuple[str | None, str]],
    prefix_chars: int,
    min_key_chars: int,
) -> None:
    """Whatever the first message's length and the settings, appending a reply and a new
    message never changes the key after turn 2; turn 1 keeps it too when the first message is
    at least min_key_chars long."""
    messages = ([msg("system", system)] if system is not None else []) + [msg("user", first_user)]
    first = routing_key(Kind.CHAT, chat(*messages), FIRST_USER, prefix_chars, min_key_chars)
    keys = []
    for reply, question in turns:
        messages += [msg("assistant", reply), msg("user", question)]
        keys.append(routing_key(Kind.CHAT, chat(*messages), FIRST_USER, prefix_chars,
                                min_key_chars))
    assert len(set(keys)) == 1
    if len(first_user) >= min(min_key_chars, prefix_chars):
        assert keys[0] == first


@settings(max_examples=100)
@given(template=st.text(min_size=1, max_size=400),
       own=st.lists(st.text(min_size=1, max_size=50), min_size=2, max_size=5, unique=True))
def test_templated_messages_key_apart_when_the_key_reaches_the_users_text(
    template: str, own: list[str]
) -> None:
    """Conversations that open with one app template and differ in the user's own text get
    distinct keys when prefix_chars covers the template and that text."""
    keys = {routing_key(Kind.CHAT, chat(msg("user", template + "\n\n" + text)), FIRST_USER,
                        len(template) + 52, 64) for text in own}
    assert len(keys) == len(own)


def test_greetings_collide_on_turn_one_and_part_from_turn_two() -> None:
    """Every "hi" conversation shares the turn-1 key; their own replies and next questions give
    each a key of its own from turn 2 on (only with min_key_chars above the greeting)."""
    openers = [chat(msg("system", SYSTEM), msg("user", "hi")) for _ in range(3)]
    assert len({routing_key(Kind.CHAT, b, FIRST_USER, 1000, 64) for b in openers}) == 1
    seconds = [chat(msg("system", SYSTEM), msg("user", "hi"), msg("assistant", f"Hello {i}!"),
                    msg("user", question))
               for i, question in enumerate(["Plan a trip", "Fix my code", "Write a poem"])]
    assert len({routing_key(Kind.CHAT, b, FIRST_USER, 1000, 64) for b in seconds}) == 3
    assert len({routing_key(Kind.CHAT, b, FIRST_USER, 1000, 0) for b in seconds}) == 1


def test_even_identical_first_replies_part_on_the_next_message() -> None:
    """Greedy decoding gives every "hi" the same reply; the next user message still parts them."""
    seconds = [chat(msg("user", "hi"), msg("assistant", "Hello! How can I help?"),
                    msg("user", question)) for question in ["Plan a trip", "Fix my code"]]
    assert len({routing_key(Kind.CHAT, b, FIRST_USER, 1000, 64) for b in seconds}) == 2


def test_tool_results_extend_a_short_task_like_a_next_user_message() -> None:
    """An agent's short task keys on its first tool call and result from turn 2 on."""
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "search", "arguments": "{}"}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "3 results"}
    body = chat(msg("user", "go"), call, result, msg("assistant", "Done"), msg("user", "thanks"))
    assert key_text(Kind.CHAT, body, FIRST_USER, 1000, 64) == (
        "go\nassistant:\ntool:3 results")


def test_questions_about_one_long_document_share_a_key() -> None:
    """A document placed first in the message keys on the document, whatever the question."""
    document = "Document 1.\n\n" + "The river runs past the old mill. " * 60
    keys = {routing_key(Kind.CHAT, chat(msg("user", f"{document}\n\nQuestion: {q}")),
                        FIRST_USER, 1000, 64) for q in ["Why?", "When?", "Who built it?"]}
    assert len(keys) == 1


def test_data_url_images_key_on_their_whole_content() -> None:
    """Data URLs that share their first hundreds of characters still give different keys, and
    the same attachment gives the same key."""
    header = "data:image/jpeg;base64," + "/9j/4AAQSkZJRgABAQ" * 20

    def with_image(url: str) -> dict[str, Any]:
        return chat(msg("user", [{"type": "image_url", "image_url": {"url": url}},
                                 {"type": "text", "text": "What is this?"}]))

    keys = [routing_key(Kind.CHAT, with_image(header + tail), FIRST_USER, 100, 0)
            for tail in ["AAAA", "BBBB", "AAAA"]]
    assert keys[0] != keys[1]
    assert keys[0] == keys[2]


def test_audio_and_file_parts_key_on_their_data() -> None:
    """input_audio and file parts give a key per attachment rather than an empty one."""
    def part(kind: str, payload: dict[str, str]) -> dict[str, Any]:
        return chat(msg("user", [{"type": kind, kind: payload}]))

    audio = {routing_key(Kind.CHAT, part("input_audio", {"data": d, "format": "wav"}),
                         FIRST_USER, 100, 0) for d in ["UklGRg1", "UklGRg2"]}
    files = {routing_key(Kind.CHAT, part("file", {"file_id": f}), FIRST_USER, 100, 0)
             for f in ["file-1", "file-2"]}
    assert len(audio) == 2
    assert len(files) == 2
