"""Endpoint health as pure state machines: passive outlier ejection and active checks.

:class:`EndpointHealth` takes observations (a request's outcome, a check's result) with the
time they happened and answers whether the endpoint is out and until when; it lives in the
endpoint's state (``state.EndpointState.health``). The I/O edge (probes, timers, publishing
the out-set to the router) is ``monitor.HealthMonitor``.

Passive ejection (as Envoy's outlier detection): ``consecutive_failures`` failures in a row
(5xx, reset, broken stream, timeout) eject an endpoint for ``ejection_time``, doubled on each
further ejection up to ``max_ejection_time``. A refused connection ejects at once. When the
time is up the endpoint is back on trial (half-open): its next success clears it, its next
failure ejects it again for longer. Active checks are separate: ``unhealthy_threshold`` failed
checks take an endpoint out until ``healthy_threshold`` checks pass.

Passive ejection is capped per pool (Envoy's ``max_ejection_percent``): :func:`ejection_cap`
says whether one more of a pool's serving endpoints may be ejected. A due ejection beyond the
cap is not performed and the endpoint's failure count starts again (:meth:`EndpointHealth.
spare`, as Envoy resets it), so the next try takes a new run of failures. Active checks are
not capped: they ask the pod itself, where passive failures may be shared by every pod (an
overload, the balancer's own network); panic mode bounds the total.

Only the model server's faults reach this module: the forwarder marks an attempt whose client
went away (disconnected, stopped reading) and admission does not report it; requests
balancer rejects (bad JSON, too large, ...) never lease an endpoint; a 4xx answer is the
request's fault, not the server's, and counts as a success.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from balancer.config import HealthSettings


class Failure(enum.StrEnum):
    """What went wrong with one request, as passive detection sees it."""

    CONNECT = "connect"
    """No connection could be opened: ejects at once."""
    RESET = "reset"
    """Connection reset before the response head, or the stream broke partway."""
    STATUS = "status"
    """A 5xx answer."""
    TIMEOUT = "timeout"
    """The model server kept us waiting past the first-byte or idle timeout."""


@dataclass(frozen=True, slots=True)
class Ejection:
    """A decision: the endpoint is out for ``seconds`` because of ``cause``."""

    seconds: float
    cause: Failure
    trial: bool
    """The endpoint was on trial after an earlier ejection."""


@dataclass(slots=True)
class EndpointHealth:
    """One endpoint's health. Pure: time and settings are passed in."""

    failures: int = 0
    """Passive: failures in a row."""
    ejections: int = 0
    """Passive ejections so far (sets the next back-off)."""
    ejected_until: float = 0.0
    """Passive: out until this time (loop clock); 0 when not ejected."""
    trial: bool = False
    """Half-open: back after an ejection, the next outcome decides."""
    returned_at: float = 0.0
    """When the last ejection ended (resets ``ejections`` after a healthy stretch)."""
    check_failures: int = 0
    check_passes: int = 0
    check_down: bool = False
    """Active: taken out by failed checks."""

    @property
    def is_out(self) -> bool:
        """Out now: passively ejected or failing its checks."""
        return bool(self.ejected_until) or self.check_down

    def succeeded(self) -> bool:
        """A request succeeded; returns whether the endpoint's out-state may have changed
        (a trial passed)."""
        self.failures = 0
        if self.trial:
            self.trial = False
            return True
        return False

    def failed(self, kind: Failure, now: float, s: HealthSettings) -> Ejection | None:
        """A request failed; returns the ejection it causes, if any (uncapped: the monitor
        checks the pool's cap between :meth:`due` and :meth:`eject`)."""
        return self.eject(kind, now, s) if self.due(kind, now, s) else None

    def due(self, kind: Failure, now: float, s: HealthSettings) -> bool:
        """Count a failed request; returns whether it calls for an ejection, which the
        caller then performs (:meth:`eject`) or, over the pool's cap, forgoes
        (:meth:`spare`)."""
        if self.ejected_until > now:
            return False  # already out (a request that started before the ejection)
        self.failures += 1
        return kind is Failure.CONNECT or self.trial or self.failures >= s.consecutive_failures

    def eject(self, kind: Failure, now: float, s: HealthSettings) -> Ejection:
        """Eject now, for ``ejection_time`` doubled per earlier ejection."""
        if self.returned_at and now - self.returned_at > s.max_ejection_time:
            self.ejections = 0
        seconds = min(s.ejection_time * 2 ** min(self.ejections, 30), s.max_ejection_time)
        on_trial = self.trial
        self.ejections += 1
        self.ejected_until = now + seconds
        self.failures = 0
        self.trial = False
        return Ejection(seconds, kind, on_trial)

    def spare(self) -> None:
        """A due ejection was not performed (the pool's cap): count failures afresh, as
        Envoy does, so the next try takes a new run of ``consecutive_failures`` (one failure
        for a refused connection or on trial, which stays on)."""
        self.failures = 0

    def expire(self, now: float) -> bool:
        """End the ejection if it is due (the endpoint goes on trial); returns whether it
        ended."""
        if self.ejected_until and self.ejected_until <= now:
            self.ejected_until = 0.0
            self.trial = True
            self.returned_at = now
            return True
        return False

    def checked(self, ok: bool, s: HealthSettings) -> bool:
        """An active check's result; returns whether the endpoint's active state changed."""
        if ok:
            self.check_failures = 0
            self.check_passes += 1
            if self.check_down and self.check_passes >= s.healthy_threshold:
                self.check_down = False
                return True
            return False
        self.check_passes = 0
        self.check_failures += 1
        if not self.check_down and self.check_failures >= s.unhealthy_threshold:
            self.check_down = True
            return True
        return False


# -- the pool's cap on passive ejection ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capped:
    """A due passive ejection that the pool's cap held back."""

    serving: int
    """Serving endpoints in the pool."""
    ejected: int
    """Of them, passively ejected already."""
    limit: int
    """How many of them passive ejection may hold out at once."""
    reason: str = "max_ejection_percent"


def ejection_limit(serving: int, max_percent: float) -> int:
    """Most of ``serving`` endpoints passive ejection may hold out at once: ``max_percent``
    of them rounded down, never fewer than one (at 10% a pool of 2-9 could otherwise eject
    none, and one dead pod is the usual failure)."""
    return max(1, math.floor(serving * max_percent / 100))


def ejection_cap(serving: Iterable[EndpointHealth], candidate: EndpointHealth,
                 max_percent: float) -> Capped | None:
    """Whether ``candidate`` may be passively ejected from a pool whose serving endpoints
    have the health states ``serving``: None if it may, else the numbers that forbid it.

    Only passive ejections count towards the cap (endpoints out on active checks do not,
    as in Envoy); the candidate itself never does. A candidate that is not serving (a
    draining endpoint) takes nothing off the ring, so it may always be ejected.
    """
    count = ejected = 0
    found = False
    for health in serving:
        count += 1
        if health is candidate:
            found = True
        elif health.ejected_until:
            ejected += 1
    if not found:
        return None
    limit = ejection_limit(count, max_percent)
    return None if ejected < limit else Capped(count, ejected, limit)


