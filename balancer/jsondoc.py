"""JSON documents from outside (a model server's answer, a client's body) read as objects.

Several places read one field of a document they did not write and must never fail on it:
the ``id`` of a stored response, the ``message`` of an error answer, ``usage``, a
pass-through body's ``model``. They share one reading: anything that is not a JSON object,
including what ``json`` refuses or cannot nest that deep, is no document.
"""

from __future__ import annotations

import json
from typing import Any


def json_object(data: bytes | str) -> dict[str, Any] | None:
    """``data`` parsed, if it is a JSON object; None for anything else (not JSON, nested
    too deep for the parser, another JSON value)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
