"""Load reports out of band: polling the pods' Prometheus metrics while they say nothing in band.

In-band reports (``endpoint-load-metrics`` on proxied responses, see :mod:`balancer.load`)
only flow while an endpoint gets traffic, only from servers that support ORCA, and from vLLM
only on non-streamed answers. An idle endpoint's last report ages out, and a server without
ORCA (SGLang, older vLLM) never reports at all; with ``load.source: auto`` one such endpoint
sends the whole pool back to routing on this balancer's in-flight counts. So every serving endpoint
whose last report is older than ``load.poll_interval`` seconds is asked for
``<url><load.poll_path>`` (``/metrics``), and the vLLM or SGLang gauges there become a
report like an in-band one (source ``poll``). Busy endpoints of ORCA servers keep reporting
in band and are never polled.

Reading the exposition (:func:`parse_exposition`) is pure. It scans for the few gauge lines
it needs instead of parsing the whole text: a vLLM exposition is tens of kilobytes of
histograms, and on a 36 KB page a full parse (``prometheus_client.parser``) takes about 8 ms
of event loop, the scan 0.06 ms. The scan still reads samples as the format defines them:
labels with quoted, escaped values (``}`` and ``"`` inside them), ``NaN``, ``+Inf``,
exponents, timestamps, comments; tests check it against prometheus-client's own writer and
parser on generated expositions.

:class:`LoadPoller` is the I/O edge: one scheduler task for every pool, a heap of endpoints
ordered by when each is next due, one short-lived task per poll, one shared
:class:`aiohttp.ClientSession`. One scheduler rather than a task per endpoint (as the health
probes have): an endpoint's due time moves back whenever an in-band report arrives, and the
heap follows that lazily (an entry popped before its endpoint is due goes back in with the
later time) without a task per endpoint waking to find it has nothing to do; endpoints that
come and go are followed in one place (``_sync``), and the endpoint state needs no task slot.

A failed poll (no connection, timeout, an error status, nothing readable) counts
``balancer_load_report_errors_total{reason="poll"}`` and leaves the endpoint without a fresh
report, so routing falls back to in-flight counts; a server that has no usable metrics (a
4xx such as 404, or no known gauges) is asked again less and less often, up to every
:data:`MAX_BACKOFF` seconds, since that rarely changes without a restart. A failure streak
is logged once at info, the rest at debug.

``load.poll_interval: 0`` turns polling off (no task, no session), and so does
``load.source: local``: then reports would not route anything. A pool that has had no keyed
request for :data:`IDLE_AFTER` seconds is not polled until it has one again, so idle
sidecars put no scrapes on the pods; busy ones do, one per pod each ``poll_interval`` (see
the README on sizing it for a fleet). In-band reports are still read and shown. The app starts
the poller with the proxy and closes it (polls cancelled, session closed) when the proxy stops, and
tells it when endpoints change.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from balancer.config import LoadSource
from balancer.load import EMPTY, LoadReport
from balancer.metrics import Metrics
from balancer.outbound import Outbound
from balancer.router import Pool
from balancer.state import EndpointState

log = logging.getLogger(__name__)

# -- the pure reader ------------------------------------------------------------------------

GAUGES: Final[dict[str, tuple[str, ...]]] = {
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs"),
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs"),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"),
}
"""The gauges each :class:`~balancer.load.LoadReport` field is read from, by preference: the
first name with a readable sample wins (vLLM renamed ``gpu_cache_usage_perc`` to
``kv_cache_usage_perc``; builds in between serve both)."""

_SAMPLE: Final = re.compile(
    r"\n[ \t]*(" + "|".join(re.escape(n) for names in GAUGES.values() for n in names)
    + r")(?=[ \t{\r\n]|$)"
)
"""A sample line of one of the wanted gauges, from the newline before it to the end of its
name. Starting on a literal newline (rather than ``^`` in multi-line mode) lets the regex
engine skip to candidate lines: four times faster on a vLLM page."""
_LABELS: Final = re.compile(r'\{(?:[^"}\n]|"(?:[^"\\\n]|\\.)*")*\}')
"""A label set: ``}`` and escaped quotes inside quoted values do not end it."""


def parse_exposition(text: str) -> tuple[LoadReport, int]:
    """Read a vLLM or SGLang Prometheus text exposition; returns the report and how many
    samples of the wanted gauges were unreadable or impossible (negative, not finite, a KV
    fraction above 1) and left out.

    The report is empty (falsy, :data:`balancer.load.EMPTY`) when the text is unreadable:
    not an exposition, another server's metrics, or no wanted gauge with a usable sample.
    Never raises.

    Series of one gauge (a ``model_name`` each, one per data-parallel engine or rank) add up:
    the pod's queue is all its engines' queues. The KV fraction is the *largest* series, not
    the mean: it says how close the pod is to preempting or refusing work, which happens in
    the fullest engine first, and a mean would hide a saturated engine behind idle ones.
    (SGLang exports its scheduler gauges from one tensor-parallel rank per data-parallel
    group; started with ``--enable-metrics-for-all-schedulers`` every rank repeats them and
    the sums count a queue once per rank.)
    """
    samples: dict[str, list[float]] = {}
    bad = 0
    text = "\n" + text  # so that the first line starts after a newline too
    for match in _SAMPLE.finditer(text):
        name = match.group(1)
        end = text.find("\n", match.end())
        value = _sample_value(text[match.end():end if end >= 0 else len(text)])
        if value is None or not math.isfinite(value) or value < 0 or (
                value > 1.0 and name in GAUGES["kv_usage"]):
            bad += 1
            continue
        samples.setdefault(name, []).append(value)
    fields: dict[str, float] = {}
    for field_name, names in GAUGES.items():
        for name in names:
            values = samples.get(name)
            if values:
                fields[field_name] = max(values) if field_name == "kv_usage" else sum(values)
                break
    return (LoadReport(**fields) if fields else EMPTY), bad


def _sample_value(rest: str) -> float | None:
    """The value of a sample line after its metric name (``{labels} value [timestamp]``);
    None: not a readable sample."""
    if rest.startswith("{"):
        labels = _LABELS.match(rest)
        if labels is None:
            return None
        rest = rest[labels.end():]
    parts = rest.split()
    if not parts:
        return None
    try:
        return float(parts[0])
    except ValueError:
        return None


LORA_GAUGE: Final = "vllm:lora_requests_info"
"""vLLM's LoRA gauge: one series per state it has logged, labelled ``running_lora_adapters``
and ``waiting_lora_adapters`` (comma-separated names) and ``max_lora``, valued with the time
it was set. Series of earlier states stay in the exposition, so the newest one is read."""
_LORA_SAMPLE: Final = re.compile(r"\n[ \t]*" + re.escape(LORA_GAUGE) + r"(?=[ \t{])")
_LABEL: Final = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"')
_ESCAPE: Final = re.compile(r"\\(.)")
LORA_LABELS: Final = ("running_lora_adapters", "waiting_lora_adapters")


def lora_adapters(text: str) -> frozenset[str]:
    """The LoRA adapters a vLLM exposition shows running or waiting (so loaded), from the
    newest series of :data:`LORA_GAUGE`; empty when there is none. Never raises.

    Cheap when the gauge is absent (one substring search) and a scan of its few lines when
    present, like :func:`parse_exposition`. Adapters loaded but idle do not show here: this
    only adds to what ``/v1/models`` says.
    """
    if LORA_GAUGE not in text:
        return frozenset()
    text = "\n" + text
    newest = -math.inf
    adapters: frozenset[str] = frozenset()
    for match in _LORA_SAMPLE.finditer(text):
        end = text.find("\n", match.end())
        rest = text[match.end():end if end >= 0 else len(text)].lstrip(" \t")
        labels = _LABELS.match(rest)
        value = _sample_value(rest)
        if labels is None or value is None or not math.isfinite(value) or value < newest:
            continue
        newest = value
        names: set[str] = set()
        for label in _LABEL.finditer(labels.group()):
            if label.group(1) in LORA_LABELS:
                unescaped = _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1),
                                        label.group(2))
                names.update(a for a in (n.strip() for n in unescaped.split(",")) if a)
        adapters = frozenset(names)
    return adapters


# -- scheduling, pure ------------------------------------------------------------------------

MAX_BACKOFF: Final = 60.0
"""Most seconds between polls of a server that has no usable metrics (404, no known
gauges): it may be restarted with metrics on, but it is never worth a poll a second."""
JITTER: Final = (1.0, 1.2)
"""Each wait is ``poll_interval`` times a factor drawn from this range, so the polls of
endpoints that appeared together drift apart. Never below 1: an endpoint is only polled
once its last report is at least ``poll_interval`` old."""
FIRST_POLL_WITHIN: Final = 0.25
"""A new endpoint is first polled at a random moment within this fraction of
``poll_interval`` (at most :data:`FIRST_POLL_LATEST` seconds), so that a pool that appears at
once is not polled at once."""
FIRST_POLL_LATEST: Final = 1.0
"""Most seconds before a new endpoint's first poll, however long the interval."""
IDLE_AFTER: Final = 30.0
"""Seconds without a keyed request after which a pool's endpoints are no longer polled
(until one comes): a sidecar of an idle app has nothing to route, and a fleet of idle
sidecars would otherwise scrape every pod each ``poll_interval``. The first requests after
a pause route on in-flight counts (``auto``) until the next polls, within an interval."""
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
"""Largest metrics page read: a vLLM page is tens of kilobytes; beyond this something is
wrong, and reading it on the event loop would stall the proxy."""


def backoff(previous: float, interval: float) -> float:
    """Seconds until the next poll of a server that just answered without usable metrics,
    after waiting ``previous`` seconds (0: it answered well before): doubling from twice
    the interval up to :data:`MAX_BACKOFF`, never below the interval."""
    return max(interval, min(MAX_BACKOFF, 2 * max(previous, interval)))


class PollFailed(Exception):
    """A poll that yielded no report; ``lasting``: the server has no usable metrics (an
    answer, but not one to read), as opposed to a connection or server failure."""

    def __init__(self, reason: str, *, lasting: bool) -> None:
        super().__init__(reason)
        self.lasting = lasting


# -- the I/O edge ------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Target:
    """One endpoint of one pool that is polled."""

    pool: Pool
    state: EndpointState
    not_before: float
    """Monotonic time before which it is not polled (jitter, back-off)."""
    waited: float = 0.0
    """Seconds of back-off before the current ``not_before`` (0: not backing off)."""
    failing: bool = False
    """A failure streak is under way (and was logged at info)."""
    gone: bool = False
    """No longer polled: it left the pool or stopped serving."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def due(self) -> float:
        """When the next poll is due: not before ``not_before``, nor while the endpoint's
        last report (in band or polled) is younger than the interval."""
        return max(self.not_before, self.state.queue.at + self.pool.load_settings.poll_interval)


def polled(pool: Pool) -> bool:
    """Whether the pool's endpoints are polled: a poll interval is set and reports can route
    (``load.source`` other than local)."""
    settings = pool.load_settings
    return settings.poll_interval > 0 and settings.source is not LoadSource.LOCAL


class LoadPoller:
    """Polls the metrics of the serving endpoints of every pool that has no fresh report."""

    def __init__(self, pools: Mapping[str, Pool], metrics: Metrics | None = None,
                 rng: random.Random | None = None,
                 on_adapters: Callable[[Pool, str, frozenset[str]], None] | None = None,
                 outbound: Mapping[str, Outbound] | None = None) -> None:
        self.pools = pools
        self.outbound = outbound or {}
        """Pools' TLS, injected headers and ``load_poll`` (a pool not here is polled)."""
        self.metrics = metrics
        self.on_adapters = on_adapters
        """Told the LoRA adapters a poll saw loaded on an endpoint (:func:`lora_adapters`),
        when there are any: the model learner adds them to the endpoint's models."""
        self._rng = rng or random.Random()
        self._targets: dict[tuple[str, str], _Target] = {}
        self._heap: list[tuple[float, int, _Target]] = []
        self._order = itertools.count()
        """Breaks ties in the heap (targets do not compare)."""
        self._changed = True
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._polls: set[asyncio.Task[None]] = set()
        """Polls under way, including those of endpoints that left (cancelled)."""

    @property
    def enabled(self) -> bool:
        return any(self._polled(p) for p in self.pools.values())

    def _polled(self, pool: Pool) -> bool:
        """:func:`polled`, unless the pool turned polling off (``pools[].load_poll``)."""
        out = self.outbound.get(pool.name)
        return polled(pool) and (out is None or out.load_poll)

    def endpoints_changed(self) -> None:
        """Endpoints came, went or changed: poll new ones soon, stop polling departed ones."""
        self._changed = True
        self._wake.set()

    async def start(self) -> None:
        """Start polling (nothing happens when every pool's ``poll_interval`` is 0)."""
        if not self.enabled or self._task is not None:
            return
        for s in {p.load_settings for p in self.pools.values() if self._polled(p)}:
            slowest = s.poll_interval * JITTER[1] + s.poll_timeout
            if s.poll_interval > 0 and slowest > s.max_age:
                log.warning("load.poll_interval %g s (up to %g s with jitter) plus "
                            "load.poll_timeout %g s exceeds load.max_age %g s: polled reports "
                            "may go stale between polls", s.poll_interval,
                            s.poll_interval * JITTER[1], s.poll_timeout, s.max_age)
        # Keep-alive connections, closed by this side after 4 s: model servers behind uvicorn
        # close idle ones after 5 s, and closing first avoids reusing one as it closes.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0))
        self._task = asyncio.create_task(self._run(), name="balancer-load-poll")

    async def close(self) -> None:
        tasks = list(self._polls)
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._targets.clear()
        self._heap.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- scheduling ------------------------------------------------------------------------

    async def _run(self) -> None:
        heap = self._heap
        while True:
            self._wake.clear()
            now = time.monotonic()
            if self._changed:
                self._changed = False
                self._sync(now)
            while heap and heap[0][0] <= now:
                _, _, target = heapq.heappop(heap)
                if target.gone:
                    continue
                due = target.due()
                if due > now:  # it reported in band meanwhile
                    heapq.heappush(heap, (due, next(self._order), target))
                elif now - target.pool.keyed_at > IDLE_AFTER:
                    # Nothing asks for this pool's queues: look again in an interval.
                    target.not_before = now + target.pool.load_settings.poll_interval
                    heapq.heappush(heap, (target.due(), next(self._order), target))
                else:
                    task = target.task = asyncio.create_task(
                        self._poll(target), name=f"load-poll-{target.state.id}")
                    self._polls.add(task)
                    task.add_done_callback(self._polls.discard)
            wait = heap[0][0] - time.monotonic() if heap else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if wait is None else max(0.0, wait)):
                    await self._wake.wait()

    def _sync(self, now: float) -> None:
        """Follow the pools' serving endpoints: new ones are first polled within a fraction
        of the interval, departed ones are dropped (a poll under way is cancelled)."""
        targets: dict[tuple[str, str], _Target] = {}
        for pool in self.pools.values():
            if not self._polled(pool):
                continue
            interval = pool.load_settings.poll_interval
            for endpoint_id in pool.serving:
                state = pool.states.get(endpoint_id)
                if state is None or not state.present:
                    continue
                key = (pool.name, endpoint_id)
                target = self._targets.get(key)
                if target is None or target.state is not state:
                    spread = min(FIRST_POLL_WITHIN * interval, FIRST_POLL_LATEST)
                    first = now + self._rng.uniform(0, spread)
                    target = _Target(pool, state, first)
                    heapq.heappush(self._heap, (target.due(), next(self._order), target))
                targets[key] = target
        for key, target in self._targets.items():
            if targets.get(key) is not target:
                target.gone = True
                if target.task is not None:
                    target.task.cancel()
        self._targets = targets

    def _schedule(self, target: _Target, failure: PollFailed | None) -> float:
        """Set when the target is polled next, after a poll; returns the wait in seconds."""
        interval = target.pool.load_settings.poll_interval
        if failure is not None and failure.lasting:
            target.waited = backoff(target.waited, interval)
            wait = target.waited
        else:
            target.waited = 0.0
            wait = interval * self._rng.uniform(*JITTER)
        target.not_before = time.monotonic() + wait
        heapq.heappush(self._heap, (target.due(), next(self._order), target))
        self._wake.set()
        return wait

    # -- one poll --------------------------------------------------------------------------

    async def _poll(self, target: _Target) -> None:
        pool, state = target.pool, target.state
        settings = pool.load_settings
        started = time.monotonic()
        adapters: frozenset[str] = frozenset()
        try:
            report: LoadReport | PollFailed
            out = self.outbound.get(pool.name)
            report, adapters = await self._fetch(
                state.endpoint.url.rstrip("/") + settings.poll_path,
                aiohttp.ClientTimeout(total=settings.poll_timeout), pool.name,
                {} if out is None else out.client_options())
        except PollFailed as exc:
            report = exc
        finally:
            target.task = None
        if target.gone or not state.present:
            return
        if isinstance(report, PollFailed):
            self._failed(target, report, self._schedule(target, report))
            return
        if adapters and self.on_adapters is not None:
            self.on_adapters(pool, state.id, adapters)
        # An in-band report that arrived meanwhile is as recent: keep it.
        if state.queue.at <= started:
            state.queue.report(report, time.monotonic(), "poll")
            if self.metrics is not None:
                self.metrics.load_report(pool.name, "poll")
        if target.failing:
            target.failing = False
            log.info("pool %s: load reports from %s's metrics again", pool.name, state.id)
        self._schedule(target, None)

    def _failed(self, target: _Target, failure: PollFailed, wait: float) -> None:
        pool, state = target.pool, target.state
        if self.metrics is not None:
            self.metrics.load_report_error(pool.name, "poll")
        # The first failure of a streak at info, the rest at debug: a pod without metrics
        # polled every second must not flood the log.
        first = not target.failing
        target.failing = True
        log.log(logging.INFO if first else logging.DEBUG,
                "pool %s: no load report from %s's metrics: %s (next poll in %.3g s%s)",
                pool.name, state.id, failure, wait,
                ", backing off" if failure.lasting else "")

    async def _fetch(self, url: str, limit: aiohttp.ClientTimeout, pool: str,
                     options: Mapping[str, Any]) -> tuple[LoadReport, frozenset[str]]:
        """GET one metrics page and read it (the load report and the LoRA adapters it shows);
        raises :class:`PollFailed`."""
        session = self._session
        assert session is not None
        try:
            headers = {"Accept": "text/plain", **options.get("headers", {})}
            async with session.get(url, timeout=limit, allow_redirects=False,
                                   **{**options, "headers": headers}) as response:
                if response.status != 200:
                    raise PollFailed(f"HTTP {response.status}", lasting=response.status < 500)
                body = await _read_capped(response, MAX_BODY_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PollFailed(str(exc) or type(exc).__name__, lasting=False) from exc
        if body is None:
            raise PollFailed(f"metrics page over {MAX_BODY_BYTES} bytes", lasting=True)
        text = body.decode("utf-8", errors="replace")
        report, bad = parse_exposition(text)
        if bad and self.metrics is not None:
            self.metrics.load_report_error(pool, "malformed")
        if not report:
            raise PollFailed("no vLLM or SGLang load gauges in it", lasting=True)
        return report, lora_adapters(text)


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The response body, or None if it is longer than ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        return None
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
