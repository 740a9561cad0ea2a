"""EndpointSliceWatch on scripted API answers, back-off, error handling and configuration
loading, without any server.

Streams are module constants, kopf-style: each is the list of lines one watch request
returns. The fake API hands out the scripted responses in order, then blocks like a quiet
watch, so a test runs the real loop and inspects it once the script is used up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer import discovery
from balancer.config import KubernetesPoolSettings, KubernetesSettings
from balancer.discovery import (
    ApiError,
    Backoff,
    EndpointSliceWatch,
    SilentWatchError,
    failure_reason,
    parse_retry_after,
    retry_delay,
)
from balancer.endpoints import Endpoint
from tests.apiserver import endpoint, endpoint_slice


def event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def with_rv(obj: dict[str, Any], rv: int) -> dict[str, Any]:
    obj["metadata"]["resourceVersion"] = str(rv)
    return obj


SLICE_A = with_rv(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1")]), 10)
SLICE_A2 = with_rv(endpoint_slice("vllm-a", [endpoint("vllm-0", "10.0.0.1"),
                                             endpoint("vllm-1", "10.0.0.2")]), 11)
GONE = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
        "message": "too old resource version: 10 (15)", "code": 410}
BOOKMARK = {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": "20"}}

LIST_A = {"kind": "EndpointSliceList", "metadata": {"resourceVersion": "10"},
          "items": [SLICE_A]}
LIST_A2 = {"kind": "EndpointSliceList", "metadata": {"resourceVersion": "16"},
           "items": [SLICE_A2]}
STREAM_WITH_MODIFIED_AND_BOOKMARK = [event("MODIFIED", SLICE_A2), event("BOOKMARK", BOOKMARK)]
STREAM_WITH_410GONE = [event("ERROR", GONE)]
STREAM_WITH_UNKNOWN_TYPE = [event("SURPRISE", SLICE_A2), event("BOOKMARK", BOOKMARK)]
STREAM_WITH_GARBAGE = [b"<html>proxy error</html>\n"]
STREAM_WITH_500 = [event("ERROR", {**GONE, "code": 500, "reason": "InternalError",
                                   "message": "etcd is sad"})]

V0 = Endpoint("vllm-0", "http://10.0.0.1:8000", "zone-a", True, "node-1")
V1 = Endpoint("vllm-1", "http://10.0.0.2:8000", "zone-a", True, "node-1")


THROTTLED = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
             "reason": "TooManyRequests", "message": "too many requests", "code": 429}


class Response:
    """One scripted answer; ``hang`` keeps the stream open without a further byte after its
    lines, as a dead connection does."""

    def __init__(self, status: int = 200, body: Any = None, lines: Iterable[bytes] = (),
                 headers: dict[str, str] | None = None, hang: bool = False) -> None:
        self.status = status
        self.headers = headers or {}
        self._body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self._lines = list(lines)
        self._hang = hang

    async def read(self) -> bytes:
        return self._body

    @property
    def content(self) -> AsyncIterator[bytes]:
        async def lines() -> AsyncIterator[bytes]:
            for line in self._lines:
                yield line
            if self._hang:
                await asyncio.Event().wait()

        return lines()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakeApi:
    """Scripted answers (a Response or an exception), then a watch that never ends."""

    def __init__(self, *script: Response | BaseException) -> None:
        self.script = list(script)
        self.calls: list[dict[str, Any]] = []
        self.exhausted = asyncio.Event()

    async def list_namespaced_endpoint_slice_without_preload_content(
            self, namespace: str, **kwargs: Any) -> Response:
        self.calls.append({"namespace": namespace, **kwargs})
        if not self.script:
            self.exhausted.set()
            await asyncio.Event().wait()
        answer = self.script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Run:
    def __init__(self, api: FakeApi, **settings: Any) -> None:
        options = {"backoff_initial": 0.01, "backoff_max": 0.02, **settings}
        self.published: list[frozenset[Endpoint]] = []
        self.watch = EndpointSliceWatch(
            "llama", KubernetesPoolSettings("vllm", "http", "llm"), "llm", api,
            KubernetesSettings(**options), lambda _, e: self.published.append(e),
            rng=random.Random(1),
        )
        self.api = api

    async def until_script_used(self) -> None:
        task = asyncio.create_task(self.watch.run())
        try:
            await asyncio.wait_for(self.api.exhausted.wait(), 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def lists(self) -> list[dict[str, Any]]:
        return [c for c in self.api.calls if not c.get("watch")]

    @property
    def watches(self) -> list[dict[str, Any]]:
        return [c for c in self.api.calls if c.get("watch")]


async def test_list_then_watch_from_its_resource_version_with_bookmarks():
    """The LIST's endpoints are published, the watch starts from its resourceVersion, asks
    for bookmarks, and a bookmark moves the resourceVersion without publishing."""
    run = Run(FakeApi(Response(body=LIST_A), Response(lines=STREAM_WITH_MODIFIED_AND_BOOKMARK)))
    await run.until_script_used()
    assert run.published == [frozenset({V0}), frozenset({V0, V1})]
    first, second = run.watches
    assert first["resource_version"] == "10" and first["allow_watch_bookmarks"] is True
    assert first["label_selector"] == "kubernetes.io/service-name=vllm"
    assert first["timeout_seconds"] == 240 and first["_request_timeout"] == 270.0
    assert second["resource_version"] == "20"
    assert len(run.lists) == 1


async def test_error_410gone_relists_at_once():
    """A 410 is the normal end of a watch after compaction: LIST again without waiting."""
    run = Run(FakeApi(Response(body=LIST_A), Response(lines=STREAM_WITH_410GONE),
                      Response(body=LIST_A2)), backoff_initial=30, backoff_max=30)
    await run.until_script_used()  # a back-off of 15-30 s would time this out
    assert run.published == [frozenset({V0}), frozenset({V0, V1})]
    assert run.watches[-1]["resource_version"] == "16"


async def test_a_repeated_410_backs_off():
    """Two 410s in a row without a healthy watch in between wait before the next LIST."""
    api = FakeApi(Response(body=LIST_A), Response(lines=STREAM_WITH_410GONE),
                  Response(body=LIST_A), Response(lines=STREAM_WITH_410GONE),
                  Response(body=LIST_A2))
    run = Run(api, backoff_initial=0.2, backoff_max=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run.until_script_used()
    assert loop.time() - started >= 0.1  # one back-off of 0.1-0.2 s


async def test_a_watch_closed_at_once_is_resumed_without_a_tight_loop():
    """A server that ends every watch at once without an event is asked again after a
    back-off, from the same resourceVersion, without a new LIST."""
    api = FakeApi(Response(body=LIST_A), *(Response() for _ in range(4)))
    run = Run(api, backoff_initial=0.2, backoff_max=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run.until_script_used()
    assert loop.time() - started >= 0.4  # four back-offs of 0.1-0.2 s
    assert len(run.lists) == 1
    assert {w["resource_version"] for w in run.watches} == {"10"}


async def test_an_unknown_event_type_is_skipped_with_a_warning(caplog):
    run = Run(FakeApi(Response(body=LIST_A), Response(lines=STREAM_WITH_UNKNOWN_TYPE)))
    with caplog.at_level(logging.WARNING, "balancer.discovery"):
        await run.until_script_used()
    assert run.published == [frozenset({V0})]
    assert "'SURPRISE'" in caplog.text
    assert run.watch.resource_version == "20"


@pytest.mark.parametrize(
    ("stream", "reason"),
    [(STREAM_WITH_GARBAGE, "invalid"), (STREAM_WITH_500, "http")],
    ids=["garbage", "error-500"],
)
async def test_a_broken_watch_relists_and_keeps_the_endpoints(stream, reason, caplog):
    """Whatever breaks the watch, the endpoints stay and a new LIST follows."""
    run = Run(FakeApi(Response(body=LIST_A), Response(lines=stream), Response(body=LIST_A)))
    with caplog.at_level(logging.WARNING, "balancer.discovery"):
        await run.until_script_used()
    assert run.published == [frozenset({V0})]
    assert len(run.lists) == 2
    assert f"({reason}:" in caplog.text
    assert "keeping 1 known endpoints" in caplog.text


@pytest.mark.parametrize(
    "failure",
    [
        Response(403, {"kind": "Status", "code": 403, "message": "endpointslices is forbidden"}),
        Response(503, b"upstream connect error"),
        aiohttp.ClientConnectionError("connection refused"),
        TimeoutError(),
    ],
    ids=["forbidden", "proxy-503", "refused", "timeout"],
)
async def test_a_failed_relist_never_empties_the_pool(failure):
    """After a failed LIST nothing is published: the pool keeps what it had."""
    run = Run(FakeApi(Response(body=LIST_A), Response(lines=STREAM_WITH_500), failure,
                      failure, Response(body=LIST_A2)))
    await run.until_script_used()
    assert run.published == [frozenset({V0}), frozenset({V0, V1})]


async def test_a_list_that_shows_no_slices_empties_the_pool():
    """An empty LIST is the truth (the Service scaled to zero), not an error."""
    empty = {"kind": "EndpointSliceList", "metadata": {"resourceVersion": "12"}, "items": []}
    run = Run(FakeApi(Response(body=LIST_A), Response(lines=STREAM_WITH_500),
                      Response(body=empty)))
    await run.until_script_used()
    assert run.published == [frozenset({V0}), frozenset()]


async def test_staleness_counts_from_the_last_sign_of_life():
    """A LIST resets staleness; a watch that brings nothing does not, even while open."""
    run = Run(FakeApi(Response(body=LIST_A)))
    assert run.watch.staleness() >= 0
    task = asyncio.create_task(run.watch.run())
    await asyncio.wait_for(run.api.exhausted.wait(), 5)
    assert run.watch.staleness() < 0.5  # the LIST just succeeded
    # The fake's endless watch never answers.
    await asyncio.sleep(0.05)
    assert run.watch.staleness() >= 0.04
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_silent_watch_is_resumed_from_its_resource_version():
    """A watch that goes quiet without closing (no event, no bookmark) is given up after
    watch_idle_timeout and resumed from the last resourceVersion seen, without a LIST;
    staleness kept rising meanwhile."""
    api = FakeApi(Response(body=LIST_A), Response(lines=[event("BOOKMARK", BOOKMARK)], hang=True))
    run = Run(api, watch_idle_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run.until_script_used()
    assert loop.time() - started >= 0.2
    assert run.watch.staleness() >= 0.15
    assert len(run.lists) == 1
    assert [w["resource_version"] for w in run.watches] == ["10", "20"]


async def test_a_watch_request_that_never_answers_counts_as_silent(caplog):
    """The idle bound covers the request itself: a server that takes the connection but never
    answers the watch is given up on as soon as a silent stream would be."""
    api = FakeApi(Response(body=LIST_A))
    run = Run(api, watch_idle_timeout=0.1)
    task = asyncio.create_task(run.watch.run())
    with caplog.at_level(logging.WARNING, "balancer.discovery"):
        async with asyncio.timeout(5):
            while len(run.watches) < 3:
                await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(run.lists) == 1
    assert "(silent: no event or bookmark for 0.1 s" in caplog.text


@pytest.mark.parametrize(
    ("status", "headers"),
    [(429, {"Retry-After": "1"}), (503, {"Retry-After": "1"})],
    ids=["429", "503-retry-after"],
)
async def test_a_throttled_watch_waits_as_asked_and_resumes_without_a_list(status, headers):
    """Retry-After on a watch is honoured (here capped by backoff_max = 0.3 s) and the watch
    resumes from its resourceVersion: a LIST would cost a throttling server far more."""
    api = FakeApi(Response(body=LIST_A), Response(status, THROTTLED, headers=headers),
                  Response(lines=STREAM_WITH_MODIFIED_AND_BOOKMARK))
    run = Run(api, backoff_max=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run.until_script_used()
    assert loop.time() - started >= 0.3
    assert run.published == [frozenset({V0}), frozenset({V0, V1})]
    assert len(run.lists) == 1
    assert [w["resource_version"] for w in run.watches] == ["10", "10", "20"]


async def test_a_throttled_list_is_retried_no_sooner_than_asked():
    """A 429 with Retry-After on the LIST waits at least that long (within backoff_max)
    before the next LIST."""
    api = FakeApi(Response(429, THROTTLED, headers={"Retry-After": "1"}), Response(body=LIST_A))
    run = Run(api, backoff_max=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run.until_script_used()
    assert 1.0 <= loop.time() - started < 3  # 1-1.2 s; the upper bound is generous
    assert run.published == [frozenset({V0})]


async def test_a_5xx_without_retry_after_still_relists():
    """Only a server that asked to be asked later gets its watch resumed; a plain 500 on the
    watch request leads to a LIST as before."""
    api = FakeApi(Response(body=LIST_A), Response(500, b"oops"), Response(body=LIST_A))
    run = Run(api)
    await run.until_script_used()
    assert len(run.lists) == 2


# -- pieces ---------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets():
    backoff = Backoff(0.5, 4.0, random.Random(7))
    delays = [backoff.next() for _ in range(6)]
    for delay, base in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert base / 2 <= delay <= base
    assert len(set(delays)) == 6  # jittered
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


def test_backoff_survives_very_many_failures():
    backoff = Backoff(0.5, 30.0)
    backoff.attempts = 10_000
    assert 15 <= backoff.next() <= 30


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ApiError(410, "gone"), "expired"),
        (ApiError(403, "forbidden"), "http"),
        (ApiError(429, "slow down"), "throttled"),
        (ApiError(429, "slow down", retry_after=1), "throttled"),
        (ApiError(503, "shutting down", retry_after=1), "throttled"),
        (ApiError(503, "unavailable"), "http"),
        (ApiError(400, "bad", retry_after=1), "http"),
        (SilentWatchError("quiet"), "silent"),
        (TimeoutError(), "timeout"),
        (aiohttp.ServerDisconnectedError(), "connection"),
        (ConnectionRefusedError(), "connection"),
        (json.JSONDecodeError("x", "", 0), "invalid"),
        (KeyError("metadata"), "invalid"),
        (RuntimeError("bug"), "unexpected"),
    ],
)
def test_failures_are_classified_for_metrics(exc, reason):
    assert failure_reason(exc) == reason


def test_api_errors_read_a_status_body_or_cut_a_raw_one():
    status = ApiError.from_body(500, json.dumps(GONE).encode())
    assert status.status == 410 and "too old resource version" in str(status)
    raw = ApiError.from_body(502, b"x" * 10_000)
    assert raw.status == 502 and len(str(raw)) < 400
    assert raw.retry_after is None
    throttled = ApiError.from_body(429, json.dumps(THROTTLED).encode(), {"Retry-After": "3"})
    assert throttled.status == 429 and throttled.retry_after == 3.0


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("1", 1.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Thu, 01 Jan 2026 12:00:30 GMT", 30.0),
        ("Thu, 01 Jan 2026 11:59:00 GMT", 0.0),  # in the past: at once
        ("Thu, 01 Jan 2026 12:00:30", None),  # no zone: not an HTTP date
        ("-1", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(value, seconds):
    assert parse_retry_after(value, NOW) == seconds


@given(
    backoff=st.floats(0, 30),
    retry_after=st.none() | st.floats(0, 1e6),
    maximum=st.floats(0.01, 300),
    seed=st.integers(0, 2**32),
)
def test_retry_delay_honours_retry_after_within_the_cap(backoff, retry_after, maximum, seed):
    """Never sooner than the back-off nor than Retry-After (up to the cap); never more than
    the back-off or 1.2 times the cap."""
    backoff = min(backoff, maximum)
    delay = retry_delay(backoff, retry_after, maximum, random.Random(seed))
    assert delay >= backoff
    if retry_after is None:
        assert delay == backoff
    else:
        assert delay >= min(retry_after, maximum)
        assert delay <= max(backoff, 1.2 * maximum) + 1e-9


def test_retry_delay_is_jittered():
    rng = random.Random(3)
    delays = {retry_delay(0.1, 1.0, 30, rng) for _ in range(20)}
    assert len(delays) > 1 and all(1.0 <= d <= 1.2 for d in delays)


async def test_no_kubeconfig_outside_a_cluster_is_a_clear_error(monkeypatch):
    """In-cluster loading fails without the service account, and says what to do."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(discovery.DiscoveryError, match=r"kubernetes\.kubeconfig"):
        await discovery.connect(KubernetesSettings())


async def test_a_missing_kubeconfig_file_is_a_clear_error(tmp_path):
    with pytest.raises(discovery.DiscoveryError, match=r"missing\.yaml"):
        await discovery.connect(KubernetesSettings(kubeconfig=str(tmp_path / "missing.yaml")))


def test_the_service_account_namespace_is_read_from_its_file(tmp_path: Path):
    path = tmp_path / "namespace"
    assert discovery._service_account_namespace(path) is None
    path.write_text("llm\n")
    assert discovery._service_account_namespace(path) == "llm"
