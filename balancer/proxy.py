"""The request path: check, parse, decide, admit, forward (with retries), report.

Reading top to bottom, a request goes through:

0. :meth:`Proxy._check_target`, first in every handler: a request target a model server
   could read differently (dot segments, encoded slashes, absolute-form, CONNECT, ``*``)
   gets 400 before any routing, and what passes is forwarded re-encoded
   (``paths.parse_target``); a /v1 path outside the keyed ones and ``server.forward_paths``
   gets 404, another method on a listed path 405 (``paths.AllowList``);
1. a handler here: the body is read once (within the size limit) and parsed;
2. ``route.decide`` (through ``Admission.decide``, which waits up to
   ``limits.empty_pool_wait`` for a pool with no routable endpoint): pool, routing key and
   the strategy's choice of endpoint;
3. ``admission``: ``admission.acquire(decision)`` takes the endpoint (around 429 pauses,
   within the per-endpoint limit, or after a wait in the pool's queue) and
   ``admission.release`` always gives it back, telling passive health how the attempt went;
4. ``forward.Forwarder.attempt``: sends the request over the endpoint's keep-alive
   connections and relays the answer as it comes;
5. ``record.Reporter.emit``: the request's metrics and access-log line, once, at its end.

A failed attempt that reached nothing of the client (connect error, reset before the head,
429/502/503/504, a 404 saying the endpoint does not serve the model or does not hold the
stored response the request names) is retried on the next distinct endpoint of the ring
walk (of the endpoints serving the model), within ``retries.max_attempts`` (for a request
naming a stored response, up to every endpoint of the pool) and the retry budget
(:meth:`Proxy._forward`) -- if the request is replayable: a keyed request, a ``retry``
entry of ``server.forward_paths`` or an idempotent method. Any other request runs at most
once: only a connect error (nothing was sent) is retried, and the upstream pool does not
re-send it on a fresh connection either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from typing import Final

from aiohttp import hdrs, web

from balancer.admission import Admission
from balancer.affinity import Pin, path_response_id
from balancer.config import Settings
from balancer.errors import (
    BadTargetError,
    BalancerError,
    BodyTooLargeError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NoEndpointsError,
    NotFoundError,
    OverloadedError,
    PathNotAllowedError,
    RateLimitedError,
    ShuttingDownError,
    UnsupportedMediaTypeError,
)
from balancer.forward import HEADER_REQUEST_ID, Forwarder, Retryable, error_response
from balancer.httpserver import SERVER_NAME
from balancer.memory import Reclaimer, glibc
from balancer.metrics import Metrics
from balancer.offload import ParsePool
from balancer.paths import AllowList, Target, TargetError, parse_target
from balancer.prefix import Kind
from balancer.record import Reporter, RequestRecord
from balancer.retry import RetryBudget
from balancer.route import (
    KEYED_PATHS,
    Decision,
    RequestView,
    decide,
    next_hop,
    passthrough_view,
    redecide,
    summarized_view,
)
from balancer.router import Pool, Router
from balancer.routes import ModelRename, rename_model
from balancer.summary import KeyRule, passthrough_model, read_keyed

log = logging.getLogger(__name__)


LARGE_BODY_BYTES: Final = 1 << 20
"""A body of this many bytes or more (or of unknown length) is read as its chunks and joined
in a thread (:func:`_read_large`)."""


async def _read_large(request: web.Request, limit: int) -> bytes:
    """The body, gathered chunk by chunk as it arrives and joined in a thread.

    ``request.read()`` costs a 10 MiB body three whole copies on the event loop (the chunks
    buffered so far joined, added to a bytearray, copied to bytes), each a stall of a few ms
    with the page faults of fresh memory. Here the loop keeps references to the chunks only,
    and ``bytes.join`` copies them in a thread: it releases the GIL for joins of 1 MiB and
    more, so the copy runs beside the loop."""
    if not request.can_read_body:
        return b""
    stream = request.content
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk, _ = await stream.readchunk()
        if not chunk:
            if stream.at_eof():
                break
            continue  # chunked transfer encoding: the end of one of its chunks
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    if size < LARGE_BODY_BYTES:
        return b"".join(chunks)
    return await asyncio.to_thread(b"".join, chunks)


class Proxy:
    """The aiohttp handlers of the proxy port, and the retry loop."""

    def __init__(self, settings: Settings, router: Router, metrics: Metrics,
                 admission: Admission, forwarder: Forwarder, reporter: Reporter,
                 parsers: ParsePool) -> None:
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.admission = admission
        self.forwarder = forwarder
        self.reporter = reporter
        self.parsers = parsers
        """Reads large bodies in worker processes (``limits.offload_parse_bytes``)."""
        self.reclaimer = Reclaimer(allocator=glibc())
        """Gives the memory of large bodies back to the system after a burst."""
        self._key_rule = KeyRule.of(settings.routing)
        # Whether a body must be told a conversation's first turn: a walk over its messages,
        # needed only when some pool routes first turns apart (fixed at start).
        self._first_turns = any(pool.first_turn_strategy is not None
                                for pool in router.pools.values())
        self.draining = False
        self.in_flight = 0
        """Requests being forwarded right now, over all pools."""
        self.idle = asyncio.Event()
        """Set whenever nothing is in flight (what a drain waits for)."""
        self.idle.set()
        self._session_header = settings.routing.session_header
        self.allowed = AllowList(settings.server.forward_paths)
        retries = settings.retries
        self._max_attempts = retries.max_attempts
        self._max_fallbacks = retries.max_fallbacks
        self.budget = RetryBudget(retries.budget_ratio, retries.budget_window,
                                  retries.budget_min_retries)
        # POST /v1/responses is keyed, yet may run twice only when its forward_paths entry
        # says ``retry``: with ``store`` the pod keeps each run, with ``background`` it starts
        # a job per run.
        self._responses_replayable = self.allowed.match("POST", "/v1/responses").replayable
        self.responses = forwarder.responses
        """Response id -> the endpoint that stored it (learned by the forwarder)."""
        metrics.track_response_affinity(lambda: len(self.responses))

    def stop_waiting(self) -> None:
        """At shutdown: answer the requests waiting for an empty pool (503, Retry-After)."""
        self.admission.close(self.router)

    # -- public handlers -------------------------------------------------------------------

    def screen_target(self, request: web.BaseRequest) -> web.Response | None:
        """For the front door: the 400 for a target that is not a path (absolute-form,
        ``CONNECT``, ``*``) or an HTTP/0.9 request, which match no route."""
        checked = self._check_target(request)
        return checked if isinstance(checked, web.Response) else None

    def _check_target(self, request: web.BaseRequest) -> Target | web.Response:
        """The request's target, checked (a model server must read it as balancer does), or
        the 400 that refuses it. Every handler starts here, keyed ones included: aiohttp
        matches routes on the decoded path, so ``/v1/chat%2Fcompletions`` reaches them."""
        try:
            if request.version < (1, 0):
                # HTTP/0.9 has no headers to frame a body or name a host: nothing to proxy.
                raise TargetError("HTTP/0.9 requests are not served; use HTTP/1.0 or later")
            return parse_target(request.method, request.raw_path)
        except TargetError as exc:
            raw = request.raw_path
            shown = raw if len(raw) <= 200 else raw[:200] + "..."
            response = self._reject(request, BadTargetError(f"request target {shown!r}: {exc}"),
                                    request.headers.get(HEADER_REQUEST_ID))
            response.force_close()  # after CONNECT or a garbled target, the stream is suspect
            return response

    async def handle_keyed(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions, /v1/completions, /v1/embeddings: routed by key."""
        raw = request.raw_path
        if raw in KEYED_PATHS and request.version >= (1, 0):
            forward = raw  # exactly a keyed path: nothing to decode, nothing to refuse
        else:
            target = self._check_target(request)
            if isinstance(target, web.Response):
                return target
            forward = target.forward
        request_id = request.headers.get(HEADER_REQUEST_ID) or os.urandom(12).hex()
        if request.method != hdrs.METH_POST:
            return self._method_not_allowed(request, (hdrs.METH_POST,), request_id)
        try:
            kind = KEYED_PATHS[request.path]
            responses = kind is Kind.RESPONSES
            self._check_content_type(request)
            body = await self._read_body(request)
            started = asyncio.get_running_loop().time()
            session = request.headers.get(self._session_header)
            # Parsed, validated and keyed on the loop when small, else in a worker process
            # (the same function either way).
            if self.parsers.on_loop(len(body)):
                summary = read_keyed(kind, body, session, self._key_rule, self._first_turns)
            else:
                summary = await self.parsers.run(read_keyed, kind, body, session,
                                                 self._key_rule, self._first_turns)
            ref = summary.response_ref
            pinned = None if ref is None else self._pin(ref)
            view = summarized_view(kind, summary, session, pinned)
            decision = (self._decide_now(view)
                        or await self.admission.decide(view, self.router))
        except BalancerError as exc:
            return self._reject(request, exc, request_id)
        if ref is not None:
            self._count_lookup(pinned, decision)
        return await self._forward(request, decision, body, request_id, forward,
                                   model=summary.model, stream=summary.stream, started=started,
                                   response_ref=ref, learns=responses and summary.store,
                                   replayable=not responses or self._responses_replayable)

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/models, answered from the configured pools."""
        target = self._check_target(request)
        if isinstance(target, web.Response):
            return target
        if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            return self._method_not_allowed(request, (hdrs.METH_GET, hdrs.METH_HEAD), None)
        data = [
            {"id": route, "object": "model", "created": 0, "owned_by": "balancer/route"}
            for route in self.router.routes
        ] + [
            {"id": model, "object": "model", "created": 0, "owned_by": f"balancer/{pool.name}"}
            for pool in self.router.pools.values()
            for model in pool.models if model not in self.router.routes
        ]
        return web.json_response({"object": "list", "data": data},
                                 headers={hdrs.SERVER: SERVER_NAME})

    async def handle_passthrough(self, request: web.Request) -> web.StreamResponse:
        """Any other /v1/* request that ``server.forward_paths`` lists: to the model's pool
        (or the only pool), least-request; 404 or 405 for the rest."""
        target = self._check_target(request)
        if isinstance(target, web.Response):
            return target
        request_id = request.headers.get(HEADER_REQUEST_ID) or os.urandom(12).hex()
        verdict = self.allowed.match(request.method, target.path)
        if verdict.rule is None:
            if verdict.allowed:
                return self._method_not_allowed(request, verdict.allowed, request_id)
            return self._reject(request, PathNotAllowedError(
                f"{request.path} is not an API path that balancer forwards"), request_id)
        # GET /v1/responses/{id} and .../cancel go where the response is stored.
        ref = path_response_id(target.path)
        try:
            body = await self._read_body(request)
            started = asyncio.get_running_loop().time()
            model = await self._passthrough_model(request, body)
            pinned = None if ref is None else self._pin(ref)
            view = passthrough_view(model, request.path, pinned)
            decision = (self._decide_now(view)
                        or await self.admission.decide(view, self.router))
        except BalancerError as exc:
            return self._reject(request, exc, request_id)
        if ref is not None:
            self._count_lookup(pinned, decision)
        return await self._forward(request, decision, body, request_id, target.forward,
                                   model=decision.model or "", replayable=verdict.replayable,
                                   started=started, response_ref=ref)

    async def handle_not_found(self, request: web.Request) -> web.StreamResponse:
        target = self._check_target(request)
        if isinstance(target, web.Response):
            return target
        return self._reject(
            request, NotFoundError(f"{request.path} is not an OpenAI API path (try /v1/...)"),
            None,
        )

    # -- request parsing -------------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.limits.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLargeError(f"request body of {length} bytes exceeds the limit of "
                                    f"{limit} bytes")
        if length is not None and length < LARGE_BODY_BYTES:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise BodyTooLargeError(f"request body exceeds the limit of {limit} "
                                        "bytes") from None
        body = await _read_large(request, limit)
        if len(body) >= LARGE_BODY_BYTES:
            self.reclaimer.large_body()
        return body

    def _pin(self, response_id: str) -> Pin | None:
        """Where the stored response ``response_id`` lives, if this replica learned it."""
        return self.responses.get(response_id, asyncio.get_running_loop().time())

    def _count_lookup(self, pinned: Pin | None, decision: Decision) -> None:
        """Count what the response map did for a request naming a stored response."""
        if pinned is None:
            outcome = "miss"
        elif decision.choice.outcome == "affinity":
            outcome = "hit"
        else:
            outcome = "stale"
        self.metrics.response_affinity_outcome(outcome)

    def _decide_now(self, view: RequestView) -> Decision | None:
        """``route.decide`` without a coroutine, the common case; None when the pool has no
        endpoint or the model is unknown, where ``admission.decide`` may wait for one."""
        try:
            return decide(view, self.router)
        except (NoEndpointsError, ModelNotFoundError):
            return None

    def _check_content_type(self, request: web.Request) -> None:
        raw = request.headers.get(hdrs.CONTENT_TYPE)
        if raw is None:
            return
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {ctype!r}"
            )

    async def _passthrough_model(self, request: web.Request, body: bytes) -> str | None:
        """The model a pass-through request names: its JSON body's (a large body is read in
        a worker process), else ``?model=``."""
        if body and request.content_type == "application/json":
            if self.parsers.on_loop(len(body)):
                model = passthrough_model(body)
            else:
                model = await self.parsers.run(passthrough_model, body)
            if model is not None:
                return model
        return request.query.get("model") or None

    def _reject(
        self, request: web.BaseRequest, exc: BalancerError, request_id: str | None
    ) -> web.Response:
        self.metrics.reject(exc.reason)
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(level, "rejected %s %s: %d %s (request %s)", request.method, request.path,
                exc.status, exc.message, request_id)
        response = error_response(exc, request_id)
        if request.body_exists and not request.content.is_eof():
            # Refused before its body was read (413 on the declared length, a path or method
            # refused): close rather than read up to max_body_bytes of it to keep the
            # connection, which would hand a client's unwanted upload our time.
            response.force_close()
        return response

    def _method_not_allowed(self, request: web.Request, allowed: tuple[str, ...],
                            request_id: str | None) -> web.Response:
        """405 naming the methods the path takes, in the message and in ``Allow``."""
        exc = MethodNotAllowedError(f"{request.method} is not allowed on {request.path}; "
                                    f"use {' or '.join(allowed)}")
        response = self._reject(request, exc, request_id)
        response.headers[hdrs.ALLOW] = ", ".join(allowed)
        return response

    # -- forwarding ------------------------------------------------------------------------

    async def _forward(self, request: web.Request, decision: Decision, body: bytes,
                       request_id: str, target: str, *, model: str = "",
                       stream: bool = False, replayable: bool = True,
                       started: float, response_ref: str | None = None,
                       learns: bool = False) -> web.StreamResponse:
        """Forward to ``target`` (the checked origin-form target) with retries: an attempt
        that fails before anything reached the client (connect error, reset before the head,
        429/502/503/504, a model-not-found 404) goes to the next distinct endpoint on the
        ring walk, within ``retries.max_attempts`` and the retry budget. A request that is
        not ``replayable`` is retried only after a connect error, which sent nothing, or a
        model-not-found 404, which the endpoint refused. ``started``: when its body had
        arrived (a wait for a worker process to read it counts against the total timeout).
        ``response_ref``: the stored response the request names (a 404 for it is tried on
        every endpoint of the pool, one each); ``learns``: remember the id of the response
        the answer carries."""
        if self.forwarder.connectors is None:
            return self._reject(request, ShuttingDownError("balancer is shutting down"),
                                request_id)
        total = self.forwarder.outbound[decision.pool.name].total_timeout  # 0: none
        record = RequestRecord(request_id, request.method, request.path, model,
                               decision.key_hash if decision.keyed else None, started,
                               started + total if total > 0 else math.inf, response_ref, learns)
        self.budget.request(started)
        route = decision.route
        if route is not None:
            self.metrics.route_request(route.model, decision.pool.name)
            if decision.hop and decision.choice.outcome != "affinity":
                # The chain's first pools could not take it when it was decided (not a
                # request sent to the pool holding its stored response).
                self.metrics.fallback(route.model, decision.chain[0].pool, decision.pool.name,
                                      decision.reason)
                record.fallback_reason = decision.reason
        self.in_flight += 1
        self.idle.clear()
        try:
            return await self._attempts(request, decision, body, record, stream, target,
                                        replayable)
        except BalancerError as exc:
            return self._reject(request, exc, request_id)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
                self.reclaimer.quiet()

    async def _attempts(self, request: web.Request, decision: Decision, body: bytes,
                        record: RequestRecord, stream: bool, target: str,
                        replayable: bool) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        tried: frozenset[str] = frozenset()
        in_pool = 0
        sent = body
        entered: Pool | None = None  # the pool `sent` was made for (routed requests)
        probes = 0
        while True:
            record.attempts += 1
            in_pool += 1
            if decision.route is not None and decision.pool is not entered:
                sent = await self._enter_hop(decision, body, record)
                entered = decision.pool
            # acquire/release, which ``async with admission.lease(...)`` wraps, without the
            # two coroutines of an async context manager on every attempt.
            try:
                lease = await self.admission.acquire(decision, tried)
            except (OverloadedError, RateLimitedError) as exc:
                decision = self._fall_back_or_raise(decision, exc, record, loop.time())
                tried, in_pool = frozenset(), 0
                continue
            try:
                record.pool = lease.pool.name
                record.state = lease.state
                record.outcome = (lease.choice.outcome
                                  if not decision.hop or lease.choice.outcome == "affinity"
                                  else f"fallback:{lease.pool.name}")
                record.status = -1
                result = await self.forwarder.attempt(
                    request, lease, sent, record, stream=stream,
                    retry_possible=(in_pool < self._attempt_limit(decision, record)
                                    or self._may_fall_back(decision, record)),
                    target=target, replayable=replayable)
            finally:
                # While the lease holds the endpoint's state (it may be retired after).
                if record.status >= 0:
                    self.reporter.emit(record, loop.time())
                self.admission.release(lease)
            if not isinstance(result, Retryable):
                if probes:
                    self.metrics.response_affinity_outcome(
                        "found" if 200 <= record.status < 300 else "lost")
                return result
            if result.response_missing:
                probes += 1
                self.metrics.response_affinity_outcome("probe")
            endpoint = lease.state.id
            tried = tried | {endpoint}
            following = self._retry(request, decision, result, endpoint, tried, record,
                                    replayable, in_pool)
            if not isinstance(following, Decision):
                if probes:
                    self.metrics.response_affinity_outcome("lost")
                return following
            if following.hop != decision.hop:
                tried, in_pool = frozenset(), 0
            decision = following

    async def _enter_hop(self, decision: Decision, body: bytes,
                         record: RequestRecord) -> bytes:
        """A routed request's body for the decision's pool, with ``model`` set to the name
        that pool serves it under, and the record told how to rename the model back in the
        answer."""
        requested = decision.requested or record.model
        served = decision.model or requested
        record.served_model = served
        route = decision.route
        if served == requested or not body:
            record.rename = None
            return body
        assert route is not None
        record.rename = None if route.expose_backend_model else ModelRename(served, requested)
        try:
            if self.parsers.on_loop(len(body)):
                return rename_model(body, served)
            return await self.parsers.run(rename_model, body, served)
        except (ValueError, TypeError):  # not a JSON object: sent as it is
            return body

    def _attempt_limit(self, decision: Decision, record: RequestRecord) -> int:
        """Tries in the decision's pool: ``retries.max_attempts``, or for a request naming
        a stored response, which only one endpoint holds, up to one per endpoint."""
        if record.response_ref is None:
            return self._max_attempts
        return max(self._max_attempts, len(decision.pool.routable))

    def _may_fall_back(self, decision: Decision, record: RequestRecord) -> bool:
        """Whether a failed attempt may still go on to a later pool of the route."""
        return (decision.route is not None and record.fallbacks < self._max_fallbacks
                and decision.hop + 1 < len(decision.chain))

    def _fall_back(self, decision: Decision, reason: str, record: RequestRecord,
                   now: float) -> Decision | None:
        """The request's decision in the next pool of its route that can take it, or None
        (no route, no pool left, the per-request cap or the retry budget spent)."""
        if not self._may_fall_back(decision, record):
            return None
        try:
            following = next_hop(self.router, decision, reason)
        except NoEndpointsError:
            return None
        if not self.budget.spend(now):
            self.metrics.retry(decision.pool.name, reason, "budget")
            return None
        record.fallbacks += 1
        record.fallback_reason = reason
        route = decision.route
        assert route is not None
        self.metrics.fallback(route.model, decision.pool.name, following.pool.name, reason)
        log.info("request %s for %s falls back from pool %s to %s: %s", record.request_id,
                 route.model, decision.pool.name, following.pool.name, reason)
        return following

    def _fall_back_or_raise(self, decision: Decision, exc: OverloadedError | RateLimitedError,
                            record: RequestRecord, now: float) -> Decision:
        """After the pool refused the request (full, or every endpoint paused): the next
        pool of its route, else that refusal."""
        reason = "overloaded" if isinstance(exc, OverloadedError) else "rate_limited"
        following = self._fall_back(decision, reason, record, now)
        if following is None:
            raise exc
        return following

    def _retry(self, request: web.Request, decision: Decision, result: Retryable,
               endpoint: str, tried: frozenset[str], record: RequestRecord,
               replayable: bool, in_pool: int) -> Decision | web.Response:
        """The next attempt's decision, or the answer when there is none (a request that
        must not run twice, no endpoint left, or the retry budget is spent). Raises
        RateLimitedError when every endpoint left asked for a pause. A 404 saying the
        endpoint does not serve the model first takes the model off that endpoint and has
        its models asked again; the endpoint did nothing with the request, so even one that
        must not run twice may go to another endpoint serving the model. So may one a 404
        said the endpoint does not hold the stored response it names. A routed request
        whose pool has no try left (``max_attempts``) or no endpoint left goes on to the
        route's next pool (:meth:`_fall_back`)."""
        pool = decision.pool
        now = asyncio.get_running_loop().time()
        if result.retry_after:
            pool.pause(endpoint, now + result.retry_after)
        if result.model_missing and decision.model is not None:
            self.router.model_missing(pool, endpoint, decision.model)
        if not replayable and not (result.reason == "connect" or result.model_missing
                                   or result.response_missing):
            # The endpoint may have acted on it (an answer, or a reset after it was sent).
            return self._give_up(result, "not_replayable", record, now)
        excluded = tried | pool.paused(now)
        following: Decision | None = None
        if in_pool < self._attempt_limit(decision, record):
            with contextlib.suppress(NoEndpointsError):
                following = redecide(decision, excluded)
        if following is None:
            following = self._fall_back(decision, "failed", record, now)
            if following is not None:
                return following
            if result.retry_after or excluded != tried:
                raise self.admission.rate_limited(pool) from None
            return self._give_up(result, "no_endpoint", record, now)
        # A stored-response probe is exempt: the pod refused before doing anything, and in a
        # fleet most follow-ups reach a replica that did not relay their response, so the
        # budget would turn probes into 404s for responses that exist.
        if not result.response_missing and not self.budget.spend(now):
            return self._give_up(result, "budget", record, now)
        self.metrics.retry(pool.name, result.reason, "retried")
        log.info("retrying %s %s on %s after %s (request %s, attempt %d)", request.method,
                 request.path, following.choice.endpoint, result.reason, record.request_id,
                 record.attempts + 1)
        return following

    def _give_up(self, result: Retryable, why: str, record: RequestRecord,
                 now: float) -> web.Response:
        """No retry: the failed attempt's answer is the request's."""
        self.metrics.retry(record.pool, result.reason, why)
        record.status = result.fallback.status
        self.reporter.emit(record, now)
        return result.fallback
