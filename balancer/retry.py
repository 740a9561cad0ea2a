"""Retry decisions: which answers may be retried, the retry budget, ``Retry-After``.

Pure: no I/O, time passed in. The proxy asks :meth:`RetryBudget.spend` before each retry and
records every request with :meth:`RetryBudget.request`.
"""

from __future__ import annotations

import math
from email.utils import parsedate_to_datetime
from typing import Final

RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
"""Answers that mean "not this endpoint, not now": the request was not processed."""


class RetryBudget:
    """Retries at most ``ratio`` of requests over a sliding ``window`` (seconds), with a floor
    of ``min_retries`` per window, so retries never multiply the load of an outage.

    Counts live in one-second buckets: recording a request is an increment (plus a bucket
    roll once a second), and a decision sums ``window`` buckets.
    """

    __slots__ = ("_requests", "_retries", "_second", "min_retries", "ratio", "window")

    def __init__(self, ratio: float, window: float, min_retries: int) -> None:
        self.ratio = ratio
        self.window = max(1, math.ceil(window))
        self.min_retries = min_retries
        self._requests = [0] * self.window
        self._retries = [0] * self.window
        self._second = 0

    def _roll(self, now: float) -> int:
        second = int(now)
        if second != self._second:
            steps = min(second - self._second, self.window)
            for i in range(1, steps + 1):
                slot = (self._second + i) % self.window
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._second = second
        return second % self.window

    def request(self, now: float) -> None:
        """Count one request."""
        self._requests[self._roll(now)] += 1

    def spend(self, now: float) -> bool:
        """Take one retry from the budget if there is one left; returns whether it did."""
        slot = self._roll(now)
        allowed = max(self.min_retries, self.ratio * sum(self._requests))
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True


def parse_retry_after(value: bytes | str | None, now_epoch: float, default: float,
                      cap: float) -> float:
    """Seconds from a ``Retry-After`` value (delta-seconds or an HTTP date), within
    [0, cap]; ``default`` when missing or unreadable."""
    if value is None:
        return default
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now_epoch
        except (TypeError, ValueError, IndexError, OverflowError):
            return default
    if not math.isfinite(seconds):
        return default
    return min(max(seconds, 0.0), cap)
