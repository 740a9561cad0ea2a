"""Routing keys: which part of a request decides where it goes.

Pure functions over the parsed JSON body. A request's key must be the same for every turn of
a conversation (so the turns meet their KV cache) and differ between conversations (so they
spread). The default key, the model plus the first ``prefix_chars`` characters of the first
user message, has both properties for chat: later turns only append messages. The
``prompt-prefix`` mode keys on the start of the whole rendered prompt, system prompt included,
which groups every conversation that shares a system prompt.

The same functions validate the fields they read, so a malformed body is rejected with a
message that names the field before anything is sent upstream.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from balancer.config import KeyMode
from balancer.errors import BadRequestError


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


SEPARATOR = "\x00"


def _content_text(content: Any, where: str) -> str:
    """Text of a message's content: a string, a list of content parts, or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise BadRequestError(f"{where}[{i}] must be an object", param=f"{where}[{i}]")
            text = part.get("text")
            if isinstance(text, str):
                pieces.append(text)
                continue
            # Non-text parts (images, audio) key on their reference so different
            # attachments still give different keys.
            for value in part.values():
                if isinstance(value, Mapping) and isinstance(value.get("url"), str):
                    pieces.append(value["url"])
        return "".join(pieces)
    raise BadRequestError(f"{where} must be a string, a list of content parts or null",
                          param=where)


def _messages(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty array of message objects",
                              param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise BadRequestError(f"messages[{i}].role must be a string",
                                  param=f"messages[{i}].role")
    return messages


def _prompt_text(value: Any, field: str) -> str:
    """Text of a completions ``prompt`` or embeddings ``input``.

    A list of strings or of token-id lists is a batch: the first element keys it. Token ids
    become their decimal text, which is as stable a key as the ids themselves.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        first = value[0]
        if all(isinstance(x, str) for x in value):
            return str(first)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return ",".join(map(str, value))
        if all(isinstance(x, list) and x and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x) for x in value):
            return ",".join(map(str, first))
    raise BadRequestError(
        f"'{field}' must be a string, an array of strings, an array of token ids "
        "or an array of token-id arrays",
        param=field,
    )


def model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' must be a non-empty string", param="model")
    return model


def validate(kind: Kind, body: Mapping[str, Any]) -> None:
    """Check the fields routing and streaming rely on; raise BadRequestError naming one."""
    model_of(body)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequestError("'stream' must be a boolean", param="stream")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequestError("'user' must be a string", param="user")
    if kind is Kind.CHAT:
        for i, message in enumerate(_messages(body)):
            _content_text(message.get("content"), f"messages[{i}].content")
    elif kind is Kind.COMPLETIONS:
        _prompt_text(body.get("prompt"), "prompt")
    else:
        _prompt_text(body.get("input"), "input")


def key_text(kind: Kind, body: Mapping[str, Any], mode: KeyMode, prefix_chars: int) -> str:
    """The text the routing key is made of (before the model name is added)."""
    if kind is Kind.COMPLETIONS:
        return _prompt_text(body.get("prompt"), "prompt")[:prefix_chars]
    if kind is Kind.EMBEDDINGS:
        return _prompt_text(body.get("input"), "input")[:prefix_chars]
    messages = _messages(body)
    if mode is KeyMode.FIRST_USER_MESSAGE:
        for i, message in enumerate(messages):
            if message.get("role") == "user":
                return _content_text(message.get("content"),
                                     f"messages[{i}].content")[:prefix_chars]
        # No user message (a system-only prompt): fall back to the rendered prompt.
    pieces: list[str] = []
    size = 0
    for i, message in enumerate(messages):
        text = _content_text(message.get("content"), f"messages[{i}].content")
        piece = f"{message['role']}:{text}\n"
        pieces.append(piece)
        size += len(piece)
        if size >= prefix_chars:
            break
    return "".join(pieces)[:prefix_chars]


def routing_key(kind: Kind, body: Mapping[str, Any], mode: KeyMode, prefix_chars: int) -> str:
    """Model plus prefix text: one model's prefixes never share a key with another's."""
    return f"{model_of(body)}{SEPARATOR}{key_text(kind, body, mode, prefix_chars)}"


def session_key(header_value: str | None, body: Mapping[str, Any]) -> str | None:
    """An explicit affinity key from the session header or the body's ``user`` field."""
    if header_value:
        return f"session{SEPARATOR}{header_value}"
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user{SEPARATOR}{user}"
    return None
