"""Routing keys: which part of a request decides where it goes.

Pure functions over the parsed JSON body. A request's key must be the same for every turn of
a conversation (so the turns meet their KV cache) and differ between conversations (so they
spread). The default key, the model plus the first ``prefix_chars`` characters of the first
user message, has both properties for chat: later turns only append messages. Two shapes of
real traffic need more:

* Apps open every conversation's first user message with the same instruction template.
  ``prefix_chars`` is long enough (1000 by default) to reach past a template into the user's
  own text, and a document placed first still keys on the document, so questions about one
  document stay together.
* Chat UIs see the same greetings ("hi", "Hello!") over and over. A first user message shorter
  than ``min_key_chars`` cannot tell conversations apart, so the key goes on through the two
  messages after it (the first reply and the user's next message, or a tool result). Those
  exist from the conversation's second turn on and never change after, so the key is stable
  from turn 2: one move, when the history is still short, then affinity as usual.

Nothing else in the request contributes: the system prompt and tool definitions are shared by
many conversations (keying on them would group what should spread), and sampling parameters
do not change the prompt. Non-text content parts (images, audio, files) contribute a hash of
their whole reference, so different attachments give different keys at any ``prefix_chars``.
The ``prompt-prefix`` mode keys on the start of the whole rendered prompt, system prompt
included, which groups every conversation that shares a system prompt.

The same functions validate the fields they read, so a malformed body is rejected with a
message that names the field before anything is sent upstream.

Cost. A request body may be 10 MiB (``limits.max_body_bytes``): a million token ids, a
hundred thousand messages, a 9 MiB data URL. Everything here runs on the event loop that
every stream shares, so nothing walks a whole field: a key reads only what can reach its first
``prefix_chars`` characters, and :func:`validate` inspects the first :data:`CHECKED_ITEMS`
items of a list field (see there for why not all of them). What remains per request is
linear only where the key is defined by it (the scan for the first user message) and in the
hash of an attachment the key contains (xxh3, well under a millisecond per megabyte).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, Final

import xxhash

from balancer.config import KeyMode
from balancer.errors import BadRequestError


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"


SEPARATOR = "\x00"


CHECKED_ITEMS: Final = 1024
"""Items of a request's list fields that :func:`validate` inspects: messages and their content
parts (together), prompts of a batch, token ids (together).

Not all of them, because the model server validates the whole request anyway (it must: it
alone knows the vocabulary, the chat template and the context length), while balancer runs
on the event loop that every stream shares: checking each of a million token ids costs
20-30 ms in Python (``all(type(x) is int for x in ids)``), and C-level tricks are no way out
(``sum`` takes ~4 ms per million ids and still lets ``true`` through as 1; ``array('q', ids)``
~16 ms). The first items are where a client that builds the wrong shape shows it, and the
key's own items are always checked (:func:`key_text` checks what it reads), so a malformed
tail past this point is rejected by the model server with its own 400, relayed as it is.
Checking 1024 items costs ~0.2 ms at most."""


def _is_object(value: Any) -> bool:
    # JSON objects are dicts; the ABC check (several times slower) only for other Mappings.
    return type(value) is dict or isinstance(value, Mapping)


def _content_text(content: Any, where: str, limit: int,
                  attachment: Callable[[Mapping[str, Any]], str] | None = None) -> str:
    """Text of a message's content (a string, a list of content parts, or null), or a prefix
    of it at least ``limit`` characters long: the key never reads further, and a message may
    hold megabytes (or a hundred thousand parts). ``attachment``: what a non-text part
    contributes (the Responses API names its references differently from chat)."""
    reference = _attachment if attachment is None else attachment
    if content is None:
        return ""
    if isinstance(content, str):
        return content[:limit]
    if isinstance(content, list):
        pieces = []
        size = 0
        for i, part in enumerate(content):
            if size >= limit:
                break
            if not _is_object(part):
                raise BadRequestError(f"{where}[{i}] must be an object", param=f"{where}[{i}]")
            text = part.get("text")
            piece = text if isinstance(text, str) else reference(part)
            pieces.append(piece)
            size += len(piece)
        return "".join(pieces)
    raise _content_error(where)


def _content_error(where: str) -> BadRequestError:
    return BadRequestError(f"{where} must be a string, a list of content parts or null",
                           param=where)


def _check_content(content: Any, message: int, budget: int, items: str = "messages") -> int:
    """Raise if ``content`` (of ``items[message]``: a chat message, or a Responses input
    item) is no valid message content, inspecting at most ``budget`` of its parts; returns
    the budget left."""
    if content is None or isinstance(content, str):
        return budget
    where = f"{items}[{message}].content"
    if not isinstance(content, list):
        raise _content_error(where)
    for i, part in enumerate(content[:budget]):
        if not _is_object(part):
            raise BadRequestError(f"{where}[{i}] must be an object", param=f"{where}[{i}]")
    return budget - len(content)


_REFERENCE_FIELDS: Final = ("url", "data", "file_data", "file_id")
"""Fields of a non-text content part's payload that identify the attachment: image and video
URLs (often ``data:`` URLs), audio data, files by content or by id."""


def _attachment(part: Mapping[str, Any]) -> str:
    """A non-text part's contribution to the key: a hash of its whole reference.

    A data URL's first hundred characters are its header (``data:image/jpeg;base64,/9j/...``),
    the same for every JPEG, so the reference is hashed whole rather than cut with the text.
    xxh3 reads a multi-megabyte attachment in well under a millisecond.
    """
    for value in part.values():
        if _is_object(value):
            for field in _REFERENCE_FIELDS:
                reference = value.get(field)
                if isinstance(reference, str) and reference:
                    return f"<{part.get('type', 'part')}:{_digest(reference)}>"
    return ""


def _digest(reference: str) -> str:
    return xxhash.xxh3_64_hexdigest(reference.encode("utf-8", "surrogatepass"))


def _messages(body: Mapping[str, Any]) -> list[Any]:
    """The ``messages`` list; its items are checked as they are read (:func:`_message`)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty array of message objects",
                              param="messages")
    return messages


def _message(messages: list[Any], i: int) -> Mapping[str, Any]:
    """``messages[i]``, which must be an object with a string role."""
    message: Mapping[str, Any] = messages[i]
    if not _is_object(message):
        raise BadRequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
    if not isinstance(message.get("role"), str):
        raise BadRequestError(f"messages[{i}].role must be a string",
                              param=f"messages[{i}].role")
    return message


def _prompt_error(field: str) -> BadRequestError:
    return BadRequestError(
        f"'{field}' must be a string, an array of strings, an array of token ids "
        "or an array of token-id arrays",
        param=field,
    )


def _token_ids(ids: list[Any]) -> bool:
    """Whether every item is a token id: an int, never a bool (``type`` rather than
    ``isinstance``, since bool is an int)."""
    return all(type(x) is int for x in ids)


def _prompt_text(value: Any, field: str, limit: int) -> str:
    """Text of a completions ``prompt`` or embeddings ``input``, or a prefix of it at least
    ``limit`` characters long; checks the items it reads.

    A list of strings or of token-id lists is a batch: the first element keys it. Token ids
    become their decimal text joined by commas, which is as stable a key as the ids themselves.
    Each id gives at least one character, so the first ``limit`` ids are all a key of
    ``limit`` characters can read, however long the prompt.
    """
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, str):
            return first[:limit]
        ids = first if isinstance(first, list) else value
        ids = ids[:limit]
        if ids and _token_ids(ids):
            return ",".join(map(str, ids))
    raise _prompt_error(field)


def _check_prompt(value: Any, field: str) -> None:
    """Raise unless ``value`` is a string, an array of strings, of token ids or of token-id
    arrays, inspecting at most :data:`CHECKED_ITEMS` items."""
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise _prompt_error(field)
    head = value[:CHECKED_ITEMS]
    first = head[0]
    if isinstance(first, str):
        valid = all(isinstance(x, str) for x in head)
    elif isinstance(first, list):
        valid = True
        budget = CHECKED_ITEMS
        for prompt in head:
            if budget <= 0:
                break
            if not isinstance(prompt, list) or not prompt or not _token_ids(prompt[:budget]):
                valid = False
                break
            budget -= len(prompt)
    else:
        valid = _token_ids(head)
    if not valid:
        raise _prompt_error(field)


def model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' must be a non-empty string", param="model")
    return model


def validate(kind: Kind, body: Mapping[str, Any]) -> None:
    """Check the fields routing and streaming rely on; raise BadRequestError naming one.

    List fields are checked up to :data:`CHECKED_ITEMS` items, so a 10 MiB body costs no
    more than a small one here."""
    model_of(body)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequestError("'stream' must be a boolean", param="stream")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequestError("'user' must be a string", param="user")
    if kind is Kind.CHAT:
        messages = _messages(body)
        checked = range(min(len(messages), CHECKED_ITEMS))
        # The checks of _message and _check_content inline for what JSON gives (a dict with
        # a str role, str or null content): a call each per message cost more than the test.
        for i in checked:
            message = messages[i]
            if type(message) is not dict or type(message.get("role")) is not str:
                _message(messages, i)  # raises, or passes another Mapping or a str subclass
        budget = CHECKED_ITEMS
        for i in checked:
            if budget <= 0:
                break
            content = messages[i].get("content")
            if content is None or type(content) is str:
                budget -= 1
            else:
                budget = _check_content(content, i, budget - 1)
    elif kind is Kind.COMPLETIONS:
        _check_prompt(body.get("prompt"), "prompt")
    elif kind is Kind.RESPONSES:
        _check_responses(body)
    else:
        _check_prompt(body.get("input"), "input")


def key_text(kind: Kind, body: Mapping[str, Any], mode: KeyMode, prefix_chars: int,
             min_key_chars: int = 0) -> str:
    """The text the routing key is made of (before the model name is added).

    ``min_key_chars``: in first-user-message mode, a first user message shorter than this is
    followed into the two messages after it (see the module docstring); 0 never extends.
    Reads only what can reach the first ``prefix_chars`` characters (and checks it).
    """
    if kind is Kind.COMPLETIONS:
        return _prompt_text(body.get("prompt"), "prompt", prefix_chars)[:prefix_chars]
    if kind is Kind.EMBEDDINGS:
        return _prompt_text(body.get("input"), "input", prefix_chars)[:prefix_chars]
    if kind is Kind.RESPONSES:
        return _responses_key_text(body, mode, prefix_chars, min_key_chars)[:prefix_chars]
    messages = _messages(body)
    if mode is KeyMode.FIRST_USER_MESSAGE:
        found = _first_user(messages, prefix_chars)
        if found is not None:
            i, text = found
            # A first turn has no message after the first user message to extend through.
            if i + 1 == len(messages) or _keys_alone(len(text), prefix_chars, min_key_chars):
                return text[:prefix_chars]
            return _extended(messages, i, text, prefix_chars)[:prefix_chars]
        # No user message (a system-only prompt): fall back to the rendered prompt.
    pieces: list[str] = []
    size = 0
    for i in range(len(messages)):
        message = _message(messages, i)
        text = _content_text(message.get("content"), f"messages[{i}].content",
                             prefix_chars - size)
        piece = f"{message['role']}:{text}\n"
        pieces.append(piece)
        size += len(piece)
        if size >= prefix_chars:
            break
    return "".join(pieces)[:prefix_chars]


EXTENDED_MESSAGES: Final = 2
"""Messages after a short first user message that its key goes on through: the first reply
and the next user message (or tool result). Both exist from the second turn on."""


def _first_user(messages: list[Any], limit: int) -> tuple[int, str] | None:
    """Index and text (at least its first ``limit`` characters) of the first user message, if
    any."""
    for i in range(len(messages)):
        message = messages[i]
        if type(message) is not dict or type(message.get("role")) is not str:
            message = _message(messages, i)  # the checks, and the error, outside JSON's types
        if message["role"] == "user":
            content = message.get("content")
            if type(content) is str:
                return i, content[:limit]  # what _content_text gives a string, without a call
            return i, _content_text(content, f"messages[{i}].content", limit)
    return None


def _keys_alone(size: int, prefix_chars: int, min_key_chars: int) -> bool:
    """Whether a first user message of ``size`` characters is the whole key text (long enough
    to tell conversations apart, or filling the key), rather than extended."""
    return size >= min_key_chars or size >= prefix_chars


def _extended(messages: list[Any], first_user: int, text: str, limit: int) -> str:
    pieces = [text]
    for i in range(first_user + 1, min(first_user + 1 + EXTENDED_MESSAGES, len(messages))):
        message = _message(messages, i)
        content = _content_text(message.get("content"), f"messages[{i}].content", limit)
        pieces.append(f"\n{message['role']}:{content}")
    return "".join(pieces)


def key_source(kind: Kind, body: Mapping[str, Any], mode: KeyMode, prefix_chars: int,
               min_key_chars: int = 0) -> str:
    """Which part of the request :func:`key_text` took, in words, for explanations."""
    if kind is Kind.COMPLETIONS:
        return f"the prompt's first {prefix_chars} characters"
    if kind is Kind.EMBEDDINGS:
        return f"the input's first {prefix_chars} characters"
    if kind is Kind.RESPONSES:
        return _responses_key_source(body, mode, prefix_chars, min_key_chars)
    messages = _messages(body)
    if mode is KeyMode.FIRST_USER_MESSAGE:
        found = _first_user(messages, prefix_chars)
        if found is None:
            return f"no user message: the rendered prompt's first {prefix_chars} characters"
        i, text = found
        size = len(text)
        if size >= prefix_chars:
            return f"the first user message (messages[{i}]), cut to {prefix_chars} characters"
        if _keys_alone(size, prefix_chars, min_key_chars):
            return f"the whole first user message (messages[{i}], {size} characters)"
        after = min(EXTENDED_MESSAGES, len(messages) - i - 1)
        if after == 0:
            return (f"the whole first user message (messages[{i}], {size} characters, "
                    f"under min_key_chars {min_key_chars}; from the next turn the key "
                    f"goes on through the reply and the next message)")
        return (f"the first user message (messages[{i}], {size} characters, under "
                f"min_key_chars {min_key_chars}) and the {after} message(s) after it, "
                f"cut to {prefix_chars} characters")
    return f"the rendered prompt's first {prefix_chars} characters (system prompt included)"


def routing_key(kind: Kind, body: Mapping[str, Any], mode: KeyMode, prefix_chars: int,
                min_key_chars: int = 0) -> str:
    """Model plus prefix text: one model's prefixes never share a key with another's."""
    text = key_text(kind, body, mode, prefix_chars, min_key_chars)
    return f"{model_of(body)}{SEPARATOR}{text}"


def session_key(header_value: str | None, body: Mapping[str, Any]) -> str | None:
    """An explicit affinity key from the session header or the body's ``user`` field."""
    if header_value:
        return f"session{SEPARATOR}{header_value}"
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user{SEPARATOR}{user}"
    return None


# -- the Responses API -----------------------------------------------------------------------
#
# ``POST /v1/responses`` carries ``input`` (a string: one user message; or a list of input
# items: messages with a role and content, function calls and their outputs, ...) and
# ``instructions`` (a system prompt, shared by many conversations like chat's). Its key
# follows chat's rules: the first user message's text (``min_key_chars`` extended through the
# two items after it), or in ``prompt-prefix`` mode the rendered start of the whole prompt,
# instructions first. A follow-up that names ``previous_response_id`` sends only its new
# items: its key is not its conversation's, which is why such requests are routed by the
# response id first (``balancer.affinity``).

_RESPONSE_REFERENCES: Final = ("image_url", "file_data", "file_url", "file_id")
"""Top-level fields of a Responses content part that identify an attachment
(``input_image``: ``image_url`` or ``file_id``; ``input_file``: ``file_data``, ``file_url``
or ``file_id``); nested ones (``input_audio.data``) are read as for chat."""


def _response_attachment(part: Mapping[str, Any]) -> str:
    """A non-text Responses content part's contribution to the key: a hash of its whole
    reference (see :func:`_attachment`)."""
    for field in _RESPONSE_REFERENCES:
        reference = part.get(field)
        if isinstance(reference, str) and reference:
            return f"<{part.get('type', 'part')}:{_digest(reference)}>"
    return _attachment(part)


def _input_error() -> BadRequestError:
    return BadRequestError("'input' must be a string or an array of input items",
                           param="input")


def _input_item(items: list[Any], i: int) -> Mapping[str, Any]:
    """``input[i]``, which must be an object whose ``role``, if any, is a string."""
    item: Mapping[str, Any] = items[i]
    if not _is_object(item):
        raise BadRequestError(f"input[{i}] must be an object", param=f"input[{i}]")
    role = item.get("role")
    if role is not None and not isinstance(role, str):
        raise BadRequestError(f"input[{i}].role must be a string", param=f"input[{i}].role")
    return item


def _check_responses(body: Mapping[str, Any]) -> None:
    """Validate what routing reads of a Responses request (the first
    :data:`CHECKED_ITEMS` items and content parts of a list ``input``)."""
    value = body.get("input")
    if isinstance(value, list):
        checked = range(min(len(value), CHECKED_ITEMS))
        for i in checked:
            _input_item(value, i)
        budget = CHECKED_ITEMS
        for i in checked:
            if budget <= 0:
                break
            budget = _check_content(value[i].get("content"), i, budget, "input") - 1
    elif not isinstance(value, str):
        raise _input_error()
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequestError("'instructions' must be a string", param="instructions")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise BadRequestError("'previous_response_id' must be a non-empty string",
                              param="previous_response_id")
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise BadRequestError("'store' must be a boolean", param="store")


def _item_text(item: Mapping[str, Any], i: int, limit: int) -> str:
    """An input item's text (at least its first ``limit`` characters): a message's content,
    a function call's arguments, a tool result's output."""
    if "content" in item:
        return _content_text(item.get("content"), f"input[{i}].content", limit,
                             _response_attachment)
    for field in ("output", "arguments"):
        value = item.get(field)
        if isinstance(value, str):
            return value[:limit]
    return ""


def _item_label(item: Mapping[str, Any]) -> str:
    """A rendered item's label: its role, else its type (``function_call_output``)."""
    role = item.get("role")
    if isinstance(role, str):
        return role
    kind = item.get("type")
    return kind if isinstance(kind, str) else "item"


def _first_user_item(items: list[Any], limit: int) -> tuple[int, str] | None:
    """Index and text (at least its first ``limit`` characters) of the first user message
    among Responses input items, if any."""
    for i in range(len(items)):
        item = _input_item(items, i)
        if item.get("role") == "user":
            return i, _item_text(item, i, limit)
    return None


def _responses_key_text(body: Mapping[str, Any], mode: KeyMode, prefix_chars: int,
                        min_key_chars: int) -> str:
    value = body.get("input")
    if mode is KeyMode.FIRST_USER_MESSAGE:
        if isinstance(value, str):
            return value[:prefix_chars]
        if not isinstance(value, list):
            raise _input_error()
        found = _first_user_item(value, prefix_chars)
        if found is not None:
            i, text = found
            if _keys_alone(len(text), prefix_chars, min_key_chars):
                return text
            pieces = [text]
            for j in range(i + 1, min(i + 1 + EXTENDED_MESSAGES, len(value))):
                item = _input_item(value, j)
                pieces.append(f"\n{_item_label(item)}:{_item_text(item, j, prefix_chars)}")
            return "".join(pieces)
        # No user message (tool results after a previous response): the rendered prompt.
    return _rendered_responses(body, prefix_chars)


def _rendered_responses(body: Mapping[str, Any], limit: int) -> str:
    """The start of a Responses request's prompt as chat's rendered key has it: the
    instructions as the system message, then each input item as ``label:text``."""
    pieces: list[str] = []
    size = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        piece = f"system:{instructions[:limit]}\n"
        pieces.append(piece)
        size += len(piece)
    value = body.get("input")
    if isinstance(value, str):
        pieces.append(f"user:{value[:max(0, limit - size)]}\n")
    elif isinstance(value, list):
        for i in range(len(value)):
            if size >= limit:
                break
            item = _input_item(value, i)
            piece = f"{_item_label(item)}:{_item_text(item, i, limit - size)}\n"
            pieces.append(piece)
            size += len(piece)
    else:
        raise _input_error()
    return "".join(pieces)


def _responses_key_source(body: Mapping[str, Any], mode: KeyMode, prefix_chars: int,
                          min_key_chars: int) -> str:
    value = body.get("input")
    rendered = (f"the rendered prompt's first {prefix_chars} characters (instructions "
                "included)")
    if mode is not KeyMode.FIRST_USER_MESSAGE:
        return rendered
    if isinstance(value, str):
        return f"the input string's first {prefix_chars} characters"
    if not isinstance(value, list):
        raise _input_error()
    found = _first_user_item(value, prefix_chars)
    if found is None:
        return f"no user message in the input: {rendered}"
    i, text = found
    if _keys_alone(len(text), prefix_chars, min_key_chars):
        return f"the first user message (input[{i}]), up to {prefix_chars} characters"
    return (f"the first user message (input[{i}], {len(text)} characters, under "
            f"min_key_chars {min_key_chars}) and up to {EXTENDED_MESSAGES} items after it")
