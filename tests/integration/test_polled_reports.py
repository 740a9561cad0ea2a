"""Load reports polled from the pods' /metrics while they report nothing in band.

Real balancers in front of real aiohttp pods on 127.0.0.1, with polls every 0.05 to 0.25 s.
Every wait is for a condition, bounded; absence (no poll) is asserted only after something
else that had to happen meanwhile did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer.config import HealthSettings, LoadSettings, LoadSource, Settings, validate
from balancer.discovery import QueueDiscovery
from balancer.endpoints import static_endpoint
from balancer.loadpoll import IDLE_AFTER
from loadtest.simserver import SimConfig, build_app
from tests.conftest import MODEL, RunningBalancer, Served, chat_body, make_settings

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 6.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
# HELP vllm:kv_cache_usage_perc KV-Cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
"""

INBAND = ("TEXT named_metrics.num_requests_waiting=2.0, "
          "named_metrics.kv_cache_usage_perc=0.5")


@dataclass
class Pod(Served):
    """A model server double with a /metrics page: ``page`` None answers 404, ``status``
    another status; ``inband`` is sent as ``endpoint-load-metrics`` on completions."""

    page: str | None = VLLM_PAGE
    status: int = 200
    inband: str | None = None
    polls: list[float] = field(default_factory=list)
    """Monotonic times of the /metrics requests."""
    checks: int = 0
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        self.polls.append(time.monotonic())
        if self.page is None:
            raise web.HTTPNotFound()
        return web.Response(text=self.page, status=self.status,
                            content_type="text/plain")

    async def health(self, request: web.Request) -> web.Response:
        self.checks += 1
        return web.Response(text="ok")

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        headers = {} if self.inband is None else {"endpoint-load-metrics": self.inband}
        return web.json_response(
            {"id": "c", "object": "chat.completion", "created": 1, "model": body["model"],
             "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "hi"}}]},
            headers=headers)


@pytest.fixture
async def pods() -> AsyncIterator[Callable[..., Awaitable[Pod]]]:
    started: list[TestServer] = []

    async def start(**kwargs: Any) -> Pod:
        pod = Pod(**kwargs)
        pod.server = TestServer(pod.app(), host="127.0.0.1")
        await pod.server.start_server()
        started.append(pod.server)
        return pod

    yield start
    for server in started:
        await server.close()


def polling(urls: list[str], poll_interval: float, **load: Any) -> Settings:
    """Settings for one pool of ``urls`` polled every ``interval`` seconds."""
    settings = make_settings(urls)
    return validate(replace(settings, load=LoadSettings(
        poll_interval=poll_interval,
        **{"poll_timeout": 1.0, "max_age": 2.0, "source": LoadSource.AUTO, **load})))


async def until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` (a value or an awaitable) is true, at most ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.01)


async def entry(run: RunningBalancer, endpoint_id: str) -> dict[str, Any]:
    """The endpoint's /debug/endpoints entry."""
    async with run.http.get(run.admin_url + "/debug/endpoints") as r:
        body = await r.json()
    (found,) = [e for e in body["pools"]["llama"]["endpoints"] if e["id"] == endpoint_id]
    return found


async def source_is(run: RunningBalancer, endpoint_id: str, source: str) -> bool:
    report = (await entry(run, endpoint_id))["report"]
    return report is not None and report["source"] == source


async def test_an_idle_endpoint_is_polled_and_its_report_shows(pods, start_balancer):
    """With no traffic at all, the pod's /metrics becomes a fresh report of source poll
    (engines summed, the fullest KV cache), the pool routes on queues, and polled reports
    keep coming and are counted."""
    pod = await pods()
    run = await start_balancer(polling([pod.url], 0.1))

    await until(lambda: source_is(run, pod.endpoint_id, "poll"))
    found = await entry(run, pod.endpoint_id)
    report = found["report"]
    assert report["fresh"] is True
    assert (report["waiting"], report["running"], report["kv_usage"]) == (4.0, 7.0, 0.75)
    assert found["queue_estimate"] == 4.0
    async with run.http.get(run.admin_url + "/debug/endpoints") as r:
        assert (await r.json())["pools"]["llama"]["load_signal"] == "queue"
    polled = await run.metric("balancer_load_reports_total", pool="llama", source="poll")
    assert polled >= 1
    await until(lambda: _grows(run, "balancer_load_reports_total", polled, source="poll"))
    assert await run.metric("balancer_load_report_errors_total", reason="poll") == 0


async def _grows(run: RunningBalancer, name: str, before: float, **labels: str) -> bool:
    return await run.metric(name, **labels) > before


@pytest.mark.parametrize(("page", "status"), [(None, 404), ("<html>hello</html>", 200)],
                         ids=["404", "no-gauges"])
async def test_a_server_without_metrics_is_asked_less_and_less_often(
        pods, start_balancer, caplog, page, status):
    """No /metrics (404), or a page without the gauges: no report, each poll counted as an
    error, the first one logged at info and the rest at debug, the waits doubling; requests
    are still served, on in-flight counts."""
    pod = await pods(page=page, status=status)
    interval = 0.05
    with caplog.at_level(logging.DEBUG, logger="balancer.loadpoll"):
        run = await start_balancer(polling([pod.url], interval))
        await until(lambda: len(pod.polls) >= 5, timeout=10)
        await until(lambda: run.metric("balancer_load_report_errors_total", pool="llama",
                                       reason="poll"), timeout=5)

    gaps = [b - a for a, b in zip(pod.polls, pod.polls[1:], strict=False)][:4]
    for i, gap in enumerate(gaps):  # a lower bound only: a busy machine only adds to gaps
        assert gap >= 0.9 * interval * 2 ** (i + 1), gaps
    found = await entry(run, pod.endpoint_id)
    assert found["report"] is None
    assert await run.metric("balancer_load_reports_total", source="poll") == 0
    assert await run.metric("balancer_load_report_errors_total", reason="poll") >= 4
    infos = [r for r in caplog.records
             if r.name == "balancer.loadpoll" and r.levelno == logging.INFO]
    debugs = [r for r in caplog.records
              if r.name == "balancer.loadpoll" and r.levelno == logging.DEBUG]
    assert len(infos) == 1 and pod.endpoint_id in infos[0].getMessage()
    assert len(debugs) >= 3
    async with run.http.get(run.admin_url + "/debug/endpoints") as r:
        assert (await r.json())["pools"]["llama"]["load_signal"] == "in-flight"
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.status == 200


async def test_a_failing_metrics_page_is_retried_at_the_interval(pods, start_balancer):
    """A 503 is the server's passing trouble, not a missing page: no back-off (six polls at
    0.05 s take about 0.3 s; with back-off they would take over 3 s)."""
    pod = await pods(status=503)
    run = await start_balancer(polling([pod.url], 0.05))
    await until(lambda: len(pod.polls) >= 6, timeout=2.5)
    assert (await entry(run, pod.endpoint_id))["report"] is None
    assert await run.metric("balancer_load_report_errors_total", reason="poll") >= 5


async def test_an_endpoint_reporting_in_band_is_not_polled_while_its_reports_are_fresh(
        pods, start_balancer):
    """Under traffic, in-band reports keep the endpoint's report younger than the interval:
    no poll for as long as they flow; once traffic stops, polls resume."""
    pod = await pods(inband=INBAND)
    interval = 0.25
    run = await start_balancer(polling([pod.url], interval))
    await until(lambda: source_is(run, pod.endpoint_id, "poll"))
    before = len(pod.polls)

    sent = 0
    end = time.monotonic() + 4 * interval
    while time.monotonic() < end:
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"q{sent}")) as r:
            assert r.status == 200
            await r.read()
        sent += 1
    assert len(pod.polls) == before
    report = (await entry(run, pod.endpoint_id))["report"]
    assert (report["source"], report["waiting"], report["kv_usage"]) == ("inband", 2.0, 0.5)
    assert await run.metric("balancer_load_reports_total", source="inband") == sent

    await until(lambda: source_is(run, pod.endpoint_id, "poll"))
    assert len(pod.polls) > before


async def test_new_endpoints_are_polled_soon_and_departed_ones_no_more(pods, start_balancer):
    """An endpoint that appears is polled within a fraction of the interval after; one that
    leaves is not polled again while the others are."""
    a, b = await pods(), await pods()
    source = QueueDiscovery()
    run = await start_balancer(polling([a.url, b.url], 0.1), source=source)
    source.push({"llama": frozenset({static_endpoint(a.url)})})
    await until(lambda: a.polls)
    assert not b.polls

    added = time.monotonic()
    source.push({"llama": frozenset({static_endpoint(a.url), static_endpoint(b.url)})})
    await until(lambda: b.polls)
    assert b.polls[0] - added < 2.0  # within 0.025 s nominally; the bound allows a busy host

    source.push({"llama": frozenset({static_endpoint(b.url)})})
    await until(lambda: a.endpoint_id not in run.balancer.router.pools["llama"].states)
    seen = len(b.polls)
    await until(lambda: len(b.polls) > seen)  # a poll of a sent just before has arrived too
    left = len(a.polls)
    seen = len(b.polls)
    await until(lambda: len(b.polls) >= seen + 3)
    assert len(a.polls) == left


async def test_a_pool_without_keyed_requests_rests_until_one_comes(pods, start_balancer):
    """A pool that has had no keyed request for IDLE_AFTER seconds (a sidecar of an idle app)
    is not polled; the next keyed request wakes the polls within an interval."""
    pod = await pods()
    interval = 0.05
    run = await start_balancer(polling([pod.url], interval))
    await until(lambda: len(pod.polls) >= 2)
    pool = run.balancer.router.pools["llama"]
    pool.keyed_at -= IDLE_AFTER + 1  # as if the last keyed request were that long ago
    rested = len(pod.polls) + 1  # a poll under way may still land
    await asyncio.sleep(10 * interval)
    assert len(pod.polls) <= rested

    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.status == 200
    await until(lambda: len(pod.polls) >= rested + 2)


@pytest.mark.parametrize("load", [{"poll_interval": 0.0},
                                  {"poll_interval": 0.05, "source": LoadSource.LOCAL}])
async def test_polling_off_means_no_metrics_requests(pods, start_balancer, load):
    """poll_interval 0, or load.source local (reports route nothing there): the pods'
    /metrics are never asked, while their health checks run."""
    pod = await pods()
    settings = polling([pod.url], **load)
    settings = validate(replace(settings, health=HealthSettings(interval=0.05)))
    run = await start_balancer(settings)
    await until(lambda: pod.checks >= 3)
    assert pod.polls == []
    assert (await entry(run, pod.endpoint_id))["report"] is None


async def test_a_simulated_vllm_pod_is_polled(start_balancer):
    """The load-test harness's simulated vLLM pod (vLLM's gauge names; like vLLM, no in-band
    report on a stream) reports through its /metrics; after a stream, polls go on."""
    server = TestServer(build_app(SimConfig(name="sim", models=(MODEL,), time_scale=0.01)),
                        host="127.0.0.1")
    await server.start_server()
    try:
        url = f"http://127.0.0.1:{server.port}"
        run = await start_balancer(polling([url], 0.1))
        endpoint_id = f"127.0.0.1:{server.port}"
        await until(lambda: source_is(run, endpoint_id, "poll"))
        report = (await entry(run, endpoint_id))["report"]
        assert (report["waiting"], report["running"]) == (0.0, 0.0)
        assert report["kv_usage"] is not None and 0.0 <= report["kv_usage"] <= 1.0
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body("hello", stream=True, max_tokens=4)) as r:
            assert r.status == 200
            await r.read()
        before = await run.metric("balancer_load_reports_total", source="poll")
        await until(lambda: _grows(run, "balancer_load_reports_total", before,
                                   source="poll"))
        assert await run.metric("balancer_load_reports_total", source="inband") == 0
    finally:
        await server.close()


async def test_polls_slower_than_the_report_age_limit_are_warned_about(pods, start_balancer,
                                                                        caplog):
    """poll_interval 2 s with max_age 1 s: polled reports would be stale most of the time,
    so balancer says so as polling starts."""
    pod = await pods()
    with caplog.at_level(logging.WARNING, logger="balancer.loadpoll"):
        await start_balancer(polling([pod.url], 2.0, max_age=1.0))
    (warning,) = [r for r in caplog.records if r.name == "balancer.loadpoll"]
    assert "load.max_age" in warning.getMessage()
