"""Which requests go to a model server, and the exact request target they go with.

Two pure steps guard the proxy port, both before any routing:

- :func:`parse_target` reads the request target as the client sent it and refuses what a
  model server could read differently from balancer: dot segments (``/v1/../metrics``, also
  percent-encoded), encoded slashes and backslashes, control bytes, absolute-form
  (``http://host/path``), authority-form (``CONNECT``) and asterisk-form (``OPTIONS *``)
  targets. What passes is re-encoded canonically: the model server gets the path balancer
  matched, never the client's bytes.
- :class:`AllowList` says whether a decoded path and method may be forwarded at all
  (``server.forward_paths``), and whether the request may run twice.

No I/O and no aiohttp: the proxy maps the answers to HTTP errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, NamedTuple

from balancer.config import ForwardPath, parse_forward_path

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 §9.2.2: methods whose effect is the same however often they are sent, so a
request with one of them may be sent again after a failure."""


class TargetError(ValueError):
    """A request target balancer refuses to forward (a 400 for the client)."""


class Target(NamedTuple):
    path: str
    """The path with percent-encoding decoded, as a model server reads it (bytes that are
    not UTF-8 as lone surrogates); what the allow-list matches."""
    forward: str
    """The origin-form target sent upstream: that path, percent-encoded canonically, and the
    query, if any."""


# RFC 3986: the bytes a path segment (pchar) and a query may carry unencoded.
_PCHAR: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                          b"-._~!$&'()*+,;=:@")
_QUERY_CHAR: Final = _PCHAR | frozenset(b"/?")
_HEX: Final = frozenset(b"0123456789ABCDEFabcdef")
# The common case, checked in one regex call: nothing to decode or re-encode.
_PLAIN_PATH: Final = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_PLAIN_QUERY: Final = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


def parse_target(method: str, raw: str) -> Target:
    """The target to match and forward for a request line's ``method`` and target ``raw``
    (as received, e.g. aiohttp's ``request.raw_path``); raises TargetError saying why not."""
    if method == "CONNECT":
        raise TargetError("CONNECT is not supported: balancer is a reverse proxy, not a tunnel")
    if not raw.startswith("/"):
        if raw == "*":
            raise TargetError("the asterisk-form target '*' is not supported")
        raise TargetError("an absolute-form target is not accepted: send the path only, "
                          "with the host in the Host header")
    if "#" in raw:
        raise TargetError("a request target cannot carry a fragment ('#')")
    path, _, query = raw.partition("?")
    if _PLAIN_PATH.fullmatch(path) and "/." not in path:
        decoded = canonical = path
    else:
        decoded, canonical = _path(path)
    if not query:
        return Target(decoded, canonical)
    if not _PLAIN_QUERY.fullmatch(query):
        query = _requote(query.encode("utf-8", "surrogateescape"), _QUERY_CHAR, keep_escapes=True)
    return Target(decoded, f"{canonical}?{query}")


def _path(path: str) -> tuple[str, str]:
    """(decoded, canonically encoded) path, segment by segment; raises TargetError."""
    decoded: list[str] = []
    canonical: list[str] = []
    for segment in path.split("/"):
        data = _unquote(segment)
        if data in (b".", b".."):
            raise TargetError(f"dot segment {segment!r} in the path")
        if b"/" in data or b"\\" in data:
            raise TargetError(f"path segment {segment!r} holds an encoded slash or a backslash")
        if any(byte < 0x20 or byte == 0x7F for byte in data):
            raise TargetError(f"path segment {segment!r} holds a control character")
        decoded.append(data.decode("utf-8", "surrogateescape"))
        canonical.append(_requote(data, _PCHAR, keep_escapes=False))
    return "/".join(decoded), "/".join(canonical)


def _unquote(segment: str) -> bytes:
    """Percent-decode one segment; malformed escapes (``%zz``, a lone ``%``) are refused,
    as servers disagree on what they mean."""
    data = segment.encode("utf-8", "surrogateescape")
    if b"%" not in data:
        return data
    out = bytearray()
    i, end = 0, len(data)
    while i < end:
        byte = data[i]
        if byte == 0x25:  # %
            pair = data[i + 1:i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise TargetError(f"malformed percent-encoding in path segment {segment!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def _requote(data: bytes, safe: frozenset[int], *, keep_escapes: bool) -> str:
    """Percent-encode every byte outside ``safe`` (uppercase hex); with ``keep_escapes``,
    well-formed ``%XX`` escapes stay as they are (a query is passed on, not decoded)."""
    out: list[str] = []
    i, end = 0, len(data)
    while i < end:
        byte = data[i]
        if (keep_escapes and byte == 0x25 and i + 2 < end and data[i + 1] in _HEX
                and data[i + 2] in _HEX):
            out.append(data[i:i + 3].decode("ascii"))
            i += 3
            continue
        out.append(chr(byte) if byte in safe else f"%{byte:02X}")
        i += 1
    return "".join(out)


class Verdict(NamedTuple):
    """What the allow-list says of one request."""

    rule: ForwardPath | None
    """The entry that lets it through; None: refused."""
    allowed: tuple[str, ...] = ()
    """When refused: the methods allowed on its path (empty: the path is not forwarded at
    all, a 404; else a 405)."""

    @property
    def replayable(self) -> bool:
        """May the request run again (a retry on another endpoint, or a re-send on a fresh
        connection)? Yes for an entry marked ``retry`` and for idempotent methods."""
        rule = self.rule
        return rule is not None and (rule.retry or rule.method in IDEMPOTENT)


class AllowList:
    """The ``server.forward_paths`` entries, matched against decoded paths.

    Paths without parameters are looked up in a dict; the few patterns with ``{param}`` are
    compared segment by segment (a parameter matches one non-empty segment, never a ``/``).
    The first entry naming the request's method wins.
    """

    __slots__ = ("_exact", "_patterns")

    def __init__(self, entries: Iterable[str]) -> None:
        self._exact: dict[str, list[ForwardPath]] = {}
        self._patterns: list[ForwardPath] = []
        for entry in entries:
            rule = parse_forward_path(entry)
            if None in rule.segments:
                self._patterns.append(rule)
            else:
                path = "/" + "/".join(s for s in rule.segments if s is not None)
                self._exact.setdefault(path, []).append(rule)

    def match(self, method: str, path: str) -> Verdict:
        exact: Iterable[ForwardPath] = self._exact.get(path, ())
        for rule in exact:
            if rule.method == method:
                return Verdict(rule)
        fitting: list[ForwardPath] = []
        if self._patterns:
            segments = path[1:].split("/")
            fitting = [r for r in self._patterns if _fits(r.segments, segments)]
            for rule in fitting:
                if rule.method == method:
                    return Verdict(rule)
        return Verdict(None, tuple(sorted({rule.method for rule in (*exact, *fitting)})))


def _fits(pattern: tuple[str | None, ...], segments: list[str]) -> bool:
    if len(pattern) != len(segments):
        return False
    for want, got in zip(pattern, segments, strict=True):
        if want is None:
            if not got:
                return False
        elif want != got:
            return False
    return True
