"""The Responses API of a simulated pod, stored in the pod's memory as vLLM stores it.

``POST /v1/responses`` (whole or streamed), ``GET /v1/responses/{id}`` and ``POST
/v1/responses/{id}/cancel``. Like vLLM's OpenAI server, each pod keeps the responses it made
in its own process: a request naming ``previous_response_id`` (or a GET of an id) that
reaches another pod gets vLLM's 404, ``{"error": {"message": "Response with id '<id>' not
found.", "type": "invalid_request_error", "param": "response_id", "code": 404}}``. That is
what a balancer in front has to route around (``balancer.affinity``).

A response's prompt is rendered as a chat (instructions as the system message, then the
previous response's conversation, then the new input items), so the engine's prefix cache
sees a follow-up extend its conversation as it would on vLLM. Fault injection is not applied
here; the completion endpoints exercise it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import hdrs, web

from .engine import EngineError
from .engine import Sequence as EngineSequence
from .text import PromptError, render_chat

STORE_LIMIT: Final = 10_000
"""Responses a pod keeps (the oldest go first). vLLM keeps every one, which is a leak in a
long load test; a follow-up arrives long before ten thousand others."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A response a pod made and kept."""

    body: dict[str, Any]
    """The response object as answered."""
    conversation: list[dict[str, Any]]
    """Its messages (without instructions), its answer last: a follow-up's history."""


class ResponseStore:
    """One pod's stored responses, by id."""

    def __init__(self, limit: int = STORE_LIMIT) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> Stored | None:
        return self._items.get(response_id)

    def clear(self) -> int:
        """Forget every response (the process restarted); returns how many there were."""
        count = len(self._items)
        self._items.clear()
        return count

    def put(self, response_id: str, stored: Stored) -> None:
        self._items[response_id] = stored
        while len(self._items) > self.limit:
            self._items.popitem(last=False)


RESPONSES_KEY: Final = web.AppKey("sim_responses", ResponseStore)
"""The app's :class:`ResponseStore`."""


def not_found(response_id: str) -> web.Response:
    """vLLM's answer for a response id its process does not hold."""
    return _error(404, f"Response with id '{response_id}' not found.", "response_id")


def _error(status: int, message: str, param: str | None) -> web.Response:
    # vLLM's ErrorResponse: the status as an integer ``code``.
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": status}}
    return web.json_response(body, status=status)


class _Invalid(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _part_text(content: Any) -> str:
    """A Responses item's content as text (``input_text``/``output_text`` parts; other parts
    add nothing, as the simulator ignores images)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping):
                raise _Invalid("content parts must be objects", "input")
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
        return "".join(texts)
    raise _Invalid("content must be a string or a list of parts", "input")


def input_messages(value: Any) -> list[dict[str, Any]]:
    """The chat messages a Responses ``input`` stands for: a string is one user message;
    message items keep their role; a tool result becomes a ``tool`` message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _Invalid("'input' must be a string or a list of input items", "input")
    messages: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, Mapping):
            raise _Invalid("input items must be objects", "input")
        role = item.get("role")
        if isinstance(role, str):
            messages.append({"role": role, "content": _part_text(item.get("content"))})
        elif item.get("type") == "function_call_output":
            messages.append({"role": "tool", "content": str(item.get("output", ""))})
    return messages


def _usage(seq: EngineSequence) -> dict[str, Any]:
    return {
        "input_tokens": seq.prompt_tokens,
        "input_tokens_details": {"cached_tokens": seq.cached_tokens},
        "output_tokens": len(seq.output),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": seq.prompt_tokens + len(seq.output),
    }


@dataclass(slots=True)
class _Turn:
    """One response being made: its ids and the parts of its body."""

    id: str
    item_id: str
    model: str
    created_at: int
    instructions: str | None
    previous: str | None
    max_output_tokens: int

    def body(self, status: str, text: str | None, seq: EngineSequence | None) -> dict[str, Any]:
        # ``id`` first, as vLLM and OpenAI order it (a balancer reads it from the head).
        output = [] if text is None else [self.message(text, "completed")]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": self.previous,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": None if seq is None else _usage(seq),
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [
            {"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status,
                "content": content}


def _event(kind: str, number: int, **fields: Any) -> bytes:
    data = {"type": kind, "sequence_number": number, **fields}
    return (f"event: {kind}\ndata: ".encode()
            + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")


async def create_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``."""
    from .server import POD_KEY, ApiError, _model, _read_json  # server imports this module

    pod = request.app[POD_KEY]
    store = request.app[RESPONSES_KEY]
    pod.counters.requests_received += 1
    if pod.faults.starting(pod.clock()):  # starting, or down after a restart
        pod.counters.slow_start_rejections += 1
        return _error(503, "the model server is starting", None)
    try:
        body = await _read_json(request)
        model = _model(pod, body)
    except ApiError as exc:
        pod.counters.requests_rejected += 1
        return exc.response()
    previous = body.get("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous is not None:
        stored = store.get(previous) if isinstance(previous, str) else None
        if stored is None:
            pod.counters.requests_rejected += 1
            return not_found(str(previous))
        history = list(stored.conversation)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        return _error(400, "'instructions' must be a string", "instructions")
    limit = body.get("max_output_tokens")
    if limit is None:
        limit = pod.config.engine.default_max_tokens
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return _error(400, "'max_output_tokens' must be an integer >= 1", "max_output_tokens")
    try:
        if "input" not in body:
            raise _Invalid("'input' is required", "input")
        conversation = history + input_messages(body["input"])
        system = [{"role": "system", "content": instructions}] if instructions else []
        prompt = render_chat(system + conversation)
    except _Invalid as exc:
        pod.counters.requests_rejected += 1
        return _error(400, exc.message, exc.param)
    except PromptError as exc:
        pod.counters.requests_rejected += 1
        return _error(400, str(exc), "input")
    try:
        submission = pod.driver.submit([prompt], limit)
    except EngineError as exc:
        pod.counters.requests_rejected += 1
        return _error(400, str(exc), "input")
    turn = _Turn("resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex, model,
                 int(time.time()), instructions, previous, limit)
    keep = body.get("store") is not False
    try:
        if body.get("stream") is True:
            response = await _stream(request, turn, submission.queue, submission.seqs)
        else:
            await _finished(submission.queue)
            response = web.json_response(
                turn.body("completed", submission.seqs[0].text, submission.seqs[0]),
                headers=pod.load_report_headers(request, stream=False))
    except (ConnectionResetError, asyncio.CancelledError):
        pod.counters.requests_disconnected += 1
        raise
    finally:
        pod.driver.abort(submission)
    seq = submission.seqs[0]
    if keep:
        answer = {"role": "assistant", "content": seq.text}
        store.put(turn.id, Stored(turn.body("completed", seq.text, seq), [*conversation, answer]))
    pod.counters.requests_served += 1
    return response


async def _finished(queue: asyncio.Queue[Any]) -> None:
    while True:
        _, token = await queue.get()
        if token.finished:
            return


async def _stream(request: web.Request, turn: _Turn, queue: asyncio.Queue[Any],
                  seqs: Sequence[EngineSequence]) -> web.StreamResponse:
    """vLLM's event stream: created, in_progress, the message item and its part, a delta per
    token, the done events, completed (no ``[DONE]``)."""
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/event-stream",
                                           hdrs.CACHE_CONTROL: "no-cache"})
    await response.prepare(request)
    n = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal n
        n += 1
        return _event(kind, n - 1, **fields)

    item = {"item_id": turn.item_id, "output_index": 0}
    await response.write(
        event("response.created", response=turn.body("in_progress", None, None))
        + event("response.in_progress", response=turn.body("in_progress", None, None))
        + event("response.output_item.added", output_index=0,
                item=turn.message("", "in_progress"))
        + event("response.content_part.added", **item, content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
    pieces: list[str] = []
    finished = False
    while not finished:
        tokens = [await queue.get()]
        while not queue.empty():
            tokens.append(queue.get_nowait())
        chunk = []
        for _, token in tokens:
            pieces.append(token.token)
            chunk.append(event("response.output_text.delta", **item, content_index=0,
                               delta=token.token, logprobs=[]))
            finished = finished or token.finished
        await response.write(b"".join(chunk))
    text = "".join(pieces)
    done = turn.message(text, "completed")
    await response.write(
        event("response.output_text.done", **item, content_index=0, text=text, logprobs=[])
        + event("response.content_part.done", **item, content_index=0,
                part=done["content"][0])
        + event("response.output_item.done", output_index=0, item=done)
        + event("response.completed", response=turn.body("completed", text, seqs[0])))
    await response.write_eof()
    return response


async def get_response(request: web.Request) -> web.Response:
    """``GET /v1/responses/{response_id}``."""
    response_id = request.match_info["response_id"]
    if not response_id.startswith("resp"):
        return _error(400, f"Invalid 'response_id': '{response_id}'. Expected an ID that "
                      "begins with 'resp'.", "response_id")
    stored = request.app[RESPONSES_KEY].get(response_id)
    if stored is None:
        return not_found(response_id)
    return web.json_response(stored.body)


async def cancel_response(request: web.Request) -> web.Response:
    """``POST /v1/responses/{response_id}/cancel``: only background responses can be
    cancelled, and the simulator makes none, so a stored one gets vLLM's 400."""
    response_id = request.match_info["response_id"]
    if request.app[RESPONSES_KEY].get(response_id) is None:
        return not_found(response_id)
    return _error(400, "Cannot cancel a synchronous response.", "response_id")


def add_routes(app: web.Application) -> None:
    """Give a pod's app the Responses API and its store."""
    app[RESPONSES_KEY] = ResponseStore()
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
