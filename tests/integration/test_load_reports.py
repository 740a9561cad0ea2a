"""In-band load reports through a real balancer: asked for, read, kept, hidden, shown."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from balancer.config import LoadSettings, LoadSource, validate
from tests.conftest import chat_body, make_settings

TEXT = "TEXT named_metrics.kv_cache_usage_perc=0.41, named_metrics.num_requests_waiting=3.0"


async def _endpoint(run, endpoint_id: str) -> dict:
    async with run.http.get(run.admin_url + "/debug/endpoints") as r:
        pools = (await r.json())["pools"]
    return next(e for e in pools["llama"]["endpoints"] if e["id"] == endpoint_id), pools["llama"]


async def test_reports_are_asked_for_kept_and_hidden_from_clients(upstreams, start_balancer):
    (up,) = await upstreams(1)
    up.load_report = TEXT
    settings = make_settings([up.url])
    run = await start_balancer(validate(replace(settings,
                                                load=LoadSettings(source=LoadSource.AUTO))))
    for stream in (False, True):
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body("hello", stream=stream),
                                 headers={"endpoint-load-metrics-format": "json"}) as r:
            assert r.status == 200
            await r.read()
            assert "endpoint-load-metrics" not in r.headers
    # balancer asks in its own form, whatever the client sent
    assert [q["headers"]["endpoint-load-metrics-format"] for q in up.requests] == ["text"] * 2
    await run.wait_idle()
    endpoint, pool = await _endpoint(run, up.endpoint_id)
    report = endpoint["report"]
    assert (report["source"], report["waiting"], report["kv_usage"], report["fresh"]) == (
        "inband", 3.0, 0.41, True)
    # The stream's report came with its head, counting the stream itself as waiting; its first
    # chunk took it off the queue.
    assert endpoint["queue_estimate"] == 2.0
    assert pool["load_signal"] == "queue"
    assert await run.metric("balancer_load_reports_total", source="inband") == 2
    assert await run.metric("balancer_endpoint_queue_estimate", endpoint=up.endpoint_id) == 2.0
    assert await run.metric("balancer_endpoint_kv_cache_usage", endpoint=up.endpoint_id) == 0.41
    assert await run.metric("balancer_route_decisions_total") == 2
    assert await run.metric("balancer_route_queue_decisions_total") == 1


async def test_reports_pass_on_to_clients_when_configured(upstreams, start_balancer):
    (up,) = await upstreams(1)
    up.load_report = TEXT
    settings = make_settings([up.url])
    run = await start_balancer(validate(replace(settings, load=LoadSettings(pass_reports=True))))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.headers["endpoint-load-metrics"] == TEXT


async def test_a_malformed_report_is_counted_and_the_client_served(upstreams, start_balancer):
    (up,) = await upstreams(1)
    up.load_report = "TEXT named_metrics.num_requests_waiting=many"
    run = await start_balancer(make_settings([up.url]))
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("hi")) as r:
        assert r.status == 200
        assert (await r.json())["choices"][0]["message"]["content"] == "from up0"
    assert await run.metric("balancer_load_report_errors_total", reason="malformed") == 1
    endpoint, pool = await _endpoint(run, up.endpoint_id)
    assert endpoint["report"] is None and pool["load_signal"] == "in-flight"


async def test_a_pod_that_stops_reporting_falls_back_to_in_flight_counts(upstreams,
                                                                         start_balancer):
    ups = await upstreams(2)
    for up in ups:
        up.load_report = "TEXT named_metrics.num_requests_waiting=0.0"
    settings = make_settings([u.url for u in ups])
    run = await start_balancer(validate(replace(
        settings, load=LoadSettings(source=LoadSource.AUTO, max_age=0.5, poll_interval=0))))

    async def signal() -> str:
        return (await _endpoint(run, ups[0].endpoint_id))[1]["load_signal"]

    i = 0
    async with asyncio.timeout(10):
        while await signal() != "queue":  # until both pods answered once
            async with run.http.post(run.url + "/v1/chat/completions",
                                     json=chat_body(f"conversation {i}")) as r:
                assert r.status == 200
            i += 1
    ups[1].load_report = None
    async with asyncio.timeout(10):
        while await signal() != "in-flight":
            async with run.http.post(run.url + "/v1/chat/completions",
                                     json=chat_body(f"conversation {i}")) as r:
                assert r.status == 200
            i += 1
            await asyncio.sleep(0.05)
