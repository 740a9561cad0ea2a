"""How the load tests' markdown tables write a number: one rule, so every report reads alike.

A figure that was not measured (None) is a dash, never ``0`` or ``nan``: a reader must be able
to tell "nothing happened" from "not measured". Floats get a fixed number of decimals so a
column lines up, whatever type the figure happens to have (a median of whole numbers is an
``int``).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MISSING", "fixed"]

MISSING: Final = "-"
"""Cell of a figure that was not measured."""


def fixed(value: object, digits: int = 3, *, missing: str = MISSING,
          grouped: bool = False) -> str:
    """``value`` with ``digits`` decimals if it is a number, as it is otherwise, ``missing`` if
    None; ``grouped`` writes thousands separators (``12,345.6``) for large rates."""
    if value is None:
        return missing
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,.{digits}f}" if grouped else f"{value:.{digits}f}"
    return str(value)
