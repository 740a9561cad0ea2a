"""Routes: a model name clients ask for, served by weighted pools with fallbacks after them.

A route (``routes`` in the configuration) maps one requested model name to pools:

* **Weighted backends, split by key.** Each request's routing key (the same key CHWBL hashes:
  the conversation's first user message, or the session header) ranks the backends by
  weighted rendezvous hashing (Schindelhauer and Schomaker's weighted HRW): backend *i*
  scores ``w_i / -ln(u_i)``, with ``u_i`` a uniform hash of the key and the backend's pool,
  and the highest score takes the request. A key's share follows the weights, every turn of
  a conversation (one key) lands on the same side for its whole life, every replica agrees
  without talking, and changing one backend's weight moves only conversations into or out
  of that backend, never between the others (cumulative weight intervals would shift every
  boundary after the changed one). Weight 0 takes no new conversation; the backend still
  serves as a fallback.
* **A chain.** After its first choice, a request may go on down the ranking (the other
  backends, best score first) and then to the route's ``fallbacks`` in order: when a pool
  has no routable endpoint or is in panic mode, when its admission queue is full or every
  endpoint asked for a pause, or when every attempt in it failed before the first byte. The
  proxy walks the chain (``balancer.route.decide``, ``balancer.proxy``); this module only
  orders it.
* **Aliases.** A backend may serve the route under another model name: the request's
  ``model`` field is rewritten on the way up (:func:`rename_model`) and, unless the route
  says otherwise, the response's back on the way down (:class:`ModelRename`), so a client
  asking for ``chat`` sees ``chat`` whichever deployment answered.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

_MASK: Final = (1 << 64) - 1


def _mix(value: int) -> int:
    """SplitMix64's finaliser: a 64-bit value to a well-spread 64-bit value."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def _seed(name: str) -> int:
    """A backend's fixed 64-bit seed, from its pool's name (stable across processes, unlike
    ``hash``)."""
    seed = 0xCBF29CE484222325  # FNV-1a
    for byte in name.encode():
        seed = ((seed ^ byte) * 0x100000001B3) & _MASK
    return seed


@dataclass(frozen=True)
class Hop:
    """One place a routed request may go: a pool, and the model name it is asked for."""

    pool: str
    model: str
    """The name sent upstream in the request's ``model`` field."""
    weight: float = 0.0
    """The backend's share weight (fallbacks: 0, they take no first choices)."""


class Route:
    """One route's backends and fallbacks, ordered for each key."""

    __slots__ = ("_seeds", "backends", "expose_backend_model", "fallbacks", "model")

    def __init__(self, model: str, backends: Sequence[Hop], fallbacks: Sequence[Hop] = (),
                 expose_backend_model: bool = False) -> None:
        self.model = model
        """The name clients ask for."""
        self.backends = tuple(backends)
        self.fallbacks = tuple(fallbacks)
        self.expose_backend_model = expose_backend_model
        """False: responses carry :attr:`model`, whichever backend served them."""
        self._seeds = tuple(_seed(b.pool) for b in self.backends)

    def scores(self, key_hash: int) -> list[float]:
        """Each backend's weighted rendezvous score for the key (higher wins)."""
        out = []
        for backend, seed in zip(self.backends, self._seeds, strict=True):
            if backend.weight <= 0:
                out.append(-math.inf)
                continue
            # u in (0, 1): 53 bits of the mixed hash, never 0 nor 1.
            u = ((_mix(key_hash ^ seed) >> 11) + 0.5) / (1 << 53)
            out.append(backend.weight / -math.log(u))
        return out

    def chain(self, key_hash: int) -> tuple[Hop, ...]:
        """Every hop a request with this key may take, in order: the backends by score
        (weight-0 ones last, in the order listed), then the fallbacks not already among
        them."""
        scores = self.scores(key_hash)
        order = sorted(range(len(self.backends)), key=lambda i: -scores[i])
        hops = [self.backends[i] for i in order]
        seen = {h.pool for h in hops}
        for hop in self.fallbacks:
            if hop.pool not in seen:
                seen.add(hop.pool)
                hops.append(hop)
        return tuple(hops)

    def first(self, key_hash: int) -> Hop:
        """The backend a key's conversations go to while it can serve them."""
        scores = self.scores(key_hash)
        return self.backends[max(range(len(scores)), key=scores.__getitem__)]

    def pools(self) -> tuple[str, ...]:
        """Every pool the route may use, backends first."""
        return tuple(dict.fromkeys([h.pool for h in (*self.backends, *self.fallbacks)]))


def rename_model(body: bytes, model: str) -> bytes:
    """The request body with its top-level ``model`` set to ``model``.

    The body is parsed and encoded again (compact separators, non-ASCII kept as it is): the
    only way to change one field of a JSON document without misreading a look-alike inside a
    string or a nested object. Key order, values and duplicate-free documents survive as
    they are; numbers keep their value. Large bodies run this in a parse worker."""
    data: Any = json.loads(body)
    data["model"] = model
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


class ModelRename:
    """Rewrites the served model name to the requested one in a response, chunk by chunk.

    Model servers write ``"model":"<name>"`` in every JSON answer and every streamed event
    (compact, as pydantic and orjson encode; the spaced form is rewritten too). Inside a
    JSON string every quote is escaped, so that byte pattern only ever is the ``model``
    member itself. A pattern may straddle two chunks: bytes that could begin one are held
    back until the next chunk (an SSE event ends with a blank line, so a stream's chunks
    rarely hold anything back)."""

    __slots__ = ("_carry", "_keep", "_pairs")

    def __init__(self, served: str, requested: str) -> None:
        old, new = json.dumps(served), json.dumps(requested)
        self._pairs = tuple((f'"model":{sep}{old}'.encode(), f'"model":{sep}{new}'.encode())
                            for sep in ("", " "))
        self._keep = max(len(old_) for old_, _ in self._pairs) - 1
        self._carry = b""

    def whole(self, payload: bytes) -> bytes:
        """A whole answer, rewritten."""
        for old, new in self._pairs:
            payload = payload.replace(old, new)
        return payload

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk`` (after those held back) that can be written now."""
        data = self.whole(self._carry + chunk) if self._carry else self.whole(chunk)
        self._carry = b""
        if data.endswith(b"\n"):
            return data
        hold = self._held(data)
        if hold:
            self._carry = data[-hold:]
            return data[:-hold]
        return data

    def _held(self, data: bytes) -> int:
        """How many trailing bytes of ``data`` could be the start of a pattern."""
        # The longest such tail: from the earliest quote in reach.
        start = data.find(b'"', max(0, len(data) - self._keep))
        while start != -1:
            tail = data[start:]
            if any(old.startswith(tail) for old, _ in self._pairs):
                return len(tail)
            start = data.find(b'"', start + 1)
        return 0

    def end(self) -> bytes:
        """What is still held back, at the end of the answer."""
        carry, self._carry = self._carry, b""
        return carry
