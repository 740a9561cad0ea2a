"""Responses API affinity: which endpoint holds a stored response.

vLLM keeps the responses of ``POST /v1/responses`` in the serving process's memory. A
follow-up naming ``previous_response_id``, and ``GET /v1/responses/{id}`` or ``POST
/v1/responses/{id}/cancel``, must reach that process or get a 404 ("Response with id '...'
not found."). Two mechanisms together, no shared state between replicas:

1. :class:`ResponseMap`, a bounded map response id -> (pool, endpoint) learned from the answers
   this replica relayed (:func:`body_response_id` for whole JSON answers,
   :class:`CreatedSniffer` for the first events of a stream). A request naming a known id
   goes to its endpoint, bypassing the load bound: the state is there or nowhere.
2. When the id is unknown (another replica relayed it, this one restarted, the entry was
   evicted or expired), the request is routed as any other, and an answer that is a 404 for
   that response id (:func:`response_not_found`) is retried on the next endpoint, one per
   endpoint at most. vLLM answers such a 404 at once, so a miss costs one short request per
   wrong endpoint; the endpoint that has it answers and its id is learned.

Pure and synchronous: no I/O, time passed in, no metrics (the proxy counts outcomes).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Final, NamedTuple

from balancer.errors import upstream_error_message
from balancer.jsondoc import json_object


class Pin(NamedTuple):
    """Where a stored response lives."""

    pool: str
    endpoint: str


ENTRY_BYTES: Final = 330
"""Measured memory of one :class:`ResponseMap` entry with a vLLM id (``resp_`` and 32 hex
digits) on CPython 3.11, the dictionary's share included (tests/unit/test_affinity.py checks
it stays under this): 100,000 entries take about 33 MB."""


class ResponseMap:
    """Response id -> :class:`Pin`, least recently used first, each entry dropped ``ttl``
    seconds after it was learned and the oldest dropped beyond ``capacity`` entries.

    An OrderedDict keeps both orders cheap: a lookup that hits moves the entry to the end
    (O(1)), a new entry evicts from the front. Expired entries are dropped when looked up
    and, two at a time, from the front whenever one is learned, so a quiet map shrinks as
    traffic moves on without a sweep over it.
    """

    __slots__ = ("_entries", "capacity", "ttl")

    def __init__(self, capacity: int, ttl: float) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[Pin, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, response_id: str, pin: Pin, now: float) -> bool:
        """Remember that ``pin`` holds ``response_id`` (from ``now`` for ``ttl`` seconds);
        returns whether it did (not when the map is off)."""
        if self.capacity <= 0:
            return False
        entries = self._entries
        entries[response_id] = (pin, now + self.ttl)
        entries.move_to_end(response_id)
        for _ in range(2):
            oldest = next(iter(entries.values()))
            if oldest[1] > now:
                break
            entries.popitem(last=False)
        while len(entries) > self.capacity:
            entries.popitem(last=False)
        return True

    def get(self, response_id: str, now: float) -> Pin | None:
        """Where ``response_id`` lives, if known and not expired."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[response_id]
            return None
        self._entries.move_to_end(response_id)
        return entry[0]

    def forget(self, response_id: str, pin: Pin) -> None:
        """``pin`` said it does not have ``response_id`` (restarted, or the entry was
        wrong): drop the entry if it names ``pin`` (a probe's 404 from another endpoint
        says nothing about the one the map knows)."""
        entry = self._entries.get(response_id)
        if entry is not None and entry[0] == pin:
            del self._entries[response_id]


_ID: Final = rb'"id"\s*:\s*"([A-Za-z0-9_.:-]{1,256})"'
# vLLM and OpenAI put ``id`` first in a response object, so a whole answer's id is at its
# head and a stream's in its first ``"response": {"id": ...`` (response.created).
_HEAD_ID: Final = re.compile(rb"\s*\{\s*" + _ID)
_CREATED_ID: Final = re.compile(rb'"response"\s*:\s*\{\s*' + _ID)
_VALID_ID: Final = re.compile(r"[A-Za-z0-9_.:-]{1,256}")

WHOLE_PARSE_MAX: Final = 16 << 10
"""A whole answer whose id is not at its head is parsed for it up to this size (~0.3 ms);
larger ones are not (their id is not learned): json.loads of a 1 MiB answer would hold the
event loop for ~18 ms."""


def _valid(value: object) -> str | None:
    return value if isinstance(value, str) and _VALID_ID.fullmatch(value) else None


def body_response_id(payload: bytes) -> str | None:
    """The ``id`` of a Responses answer (a JSON object), read from its head; a small answer
    with its id elsewhere is parsed whole."""
    found = _HEAD_ID.match(payload)
    if found is not None:
        return found.group(1).decode("ascii")
    if len(payload) > WHOLE_PARSE_MAX or b'"id"' not in payload:
        return None
    data = json_object(payload)
    return None if data is None else _valid(data.get("id"))


SNIFF_BYTES: Final = 64 << 10
"""How much of a stream's start :class:`CreatedSniffer` holds at most while looking for the
response id: the ``response.created`` event comes first, its id within its first hundred
bytes (the echoed instructions and tools follow it)."""


HEAD_BYTES: Final = 512
"""How much of a JSON answer's head :class:`CreatedSniffer` reads for its ``id`` (an id is at
most 256 characters)."""


class CreatedSniffer:
    """Finds the response id at the start of a Responses event stream, then stops.

    Fed chunk by chunk as they are relayed until :attr:`done`; holds only the stream's
    start (at most :data:`SNIFF_BYTES`), in case the first event arrives in pieces. The id
    is the first ``"response": {"id": "..."`` (every event that carries the response object
    carries the same id); failing that, the first complete ``data:`` line is parsed for
    ``response.id`` (a server that orders fields differently). With ``whole``, the stream is
    a JSON answer relayed in chunks, whose ``id`` is read from its head only."""

    __slots__ = ("_buffer", "_whole", "done")

    def __init__(self, *, whole: bool = False) -> None:
        self._buffer = b""
        self._whole = whole
        """A JSON answer relayed in chunks (too large, or no length), not an event stream:
        its id is at its head or not read."""
        self.done = False

    def feed(self, chunk: bytes) -> str | None:
        """The id if this chunk completes it; sets :attr:`done` when found or given up."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if self._whole:
            found = _HEAD_ID.match(buffer)
            if found is not None or len(buffer) >= HEAD_BYTES:
                self.done = True
                self._buffer = b""
                return None if found is None else found.group(1).decode("ascii")
            self._buffer = buffer
            return None
        found = _CREATED_ID.search(buffer)
        if found is not None:
            self.done = True
            self._buffer = b""
            return found.group(1).decode("ascii")
        start = buffer.find(b"data:")
        end = buffer.find(b"\n", start) if start >= 0 else -1
        if end >= 0 or len(buffer) >= SNIFF_BYTES:
            self.done = True
            self._buffer = b""
            return None if end < 0 else _event_id(buffer[start + 5:end])
        self._buffer = buffer
        return None


def _event_id(data: bytes) -> str | None:
    event = json_object(data)
    if event is None:
        return None
    response = event.get("response")
    return _valid(response.get("id")) if isinstance(response, dict) else None


NOT_FOUND_MAX_BYTES: Final = 64 * 1024
"""Largest 404 body read for a response-not-found error: vLLM's is about 200 bytes."""


def response_not_found(payload: bytes, response_id: str) -> bool:
    """Whether a 404 body says the endpoint does not hold ``response_id``.

    vLLM answers ``{"error": {"message": "Response with id '<id>' not found.", "type":
    "invalid_request_error", "param": "response_id", "code": 404}}`` (older versions put the
    fields at the top level). Only an answer naming the id counts: any other 404 would be
    the same on every endpoint.
    """
    if not response_id:
        return False
    message = upstream_error_message(payload, NOT_FOUND_MAX_BYTES)
    return message is not None and response_id in message and "not found" in message.lower()


_NOT_IDS: Final = frozenset({"compact", "input_tokens"})
"""``/v1/responses/<name>`` paths that name an operation, not a response."""
_BY_ID_SUFFIXES: Final = frozenset({"cancel", "input_items"})


def path_response_id(path: str) -> str | None:
    """The response id of ``/v1/responses/{id}``, ``/v1/responses/{id}/cancel`` and
    ``/v1/responses/{id}/input_items`` (a decoded path), else None."""
    if not path.startswith("/v1/responses/"):
        return None
    parts = path[len("/v1/responses/"):].split("/")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] not in _BY_ID_SUFFIXES):
        return None
    first = parts[0]
    if not first or first in _NOT_IDS:
        return None
    return first
