"""Observability: usage-token accounting, stream counters, access log, /debug/route and the
monitoring files, checked with scripted traffic through a real balancer."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from balancer.config import ConfigError, validate
from balancer.forward import body_usage, stream_usage
from balancer.logs import JsonFormatter, TextFormatter
from tests.conftest import MODEL, chat_body, make_settings

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


async def _traffic(run, *, plain: int, usage_streams: int, bare_streams: int) -> int:
    """Send the requests; returns the streamed body bytes the client received."""
    streamed = 0
    for i in range(plain):
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"plain {i}")) as r:
            assert r.status == 200
            await r.read()
    for i in range(usage_streams + bare_streams):
        extra = {"stream_options": {"include_usage": True}} if i < usage_streams else {}
        async with run.http.post(run.url + "/v1/chat/completions",
                                 json=chat_body(f"stream {i}", stream=True, **extra)) as r:
            assert r.status == 200
            streamed += len(await r.read())
    await run.wait_idle()
    return streamed


async def test_usage_tokens_are_counted_per_endpoint_from_bodies_and_stream_ends(
        upstreams, start_balancer):
    """Prompt and cached tokens from JSON bodies and final usage events add up exactly."""
    ups = await upstreams(2)
    run = await start_balancer(make_settings([u.url for u in ups]))
    await _traffic(run, plain=4, usage_streams=3, bare_streams=2)
    # Each usage the double reports: 5 prompt tokens, 3 of them cached.
    assert await run.metric("balancer_usage_responses_total") == 7
    assert await run.metric("balancer_prompt_tokens_total") == 35
    assert await run.metric("balancer_cached_prompt_tokens_total") == 21
    per_endpoint = [await run.metric("balancer_usage_responses_total", endpoint=u.endpoint_id)
                    for u in ups]
    assert sum(per_endpoint) == 7


async def test_streams_count_chunks_and_bytes_as_relayed(upstreams, start_balancer):
    """Streamed bytes equal what the client received; every stream relays a chunk or more."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    received = await _traffic(run, plain=2, usage_streams=2, bare_streams=2)
    assert await run.metric("balancer_stream_bytes_total") == received
    assert await run.metric("balancer_stream_chunks_total") >= 4


async def test_requests_carry_outcome_and_status_class(upstreams, start_balancer):
    """balancer_requests_total is labelled by route outcome and status class."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    await _traffic(run, plain=3, usage_streams=0, bare_streams=1)
    up.status = 500
    async with run.http.post(run.url + "/v1/chat/completions", json=chat_body("x")) as r:
        assert r.status == 500
    assert await run.metric("balancer_requests_total", outcome="primary", **{"class": "2xx"}) == 4
    assert await run.metric("balancer_requests_total", code="500", **{"class": "5xx"}) == 1


async def test_ring_walk_and_bound_are_exported(upstreams, start_balancer):
    """Every keyed decision observes its ring-walk length, and the pool's bound is a gauge."""
    ups = await upstreams(3)
    run = await start_balancer(make_settings([u.url for u in ups]))
    await _traffic(run, plain=5, usage_streams=0, bare_streams=0)
    assert await run.metric("balancer_ring_walk_length_count") == 5
    assert await run.metric("balancer_ring_walk_length_sum") == 5  # idle pool: all primary
    assert await run.metric("balancer_pool_load_bound", pool="llama") == 2


async def test_one_access_log_line_per_request_with_its_fields(upstreams, start_balancer,
                                                               caplog):
    """Each request logs one access line after it ends, with ids, route, timings and tokens."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    with caplog.at_level(logging.INFO, logger="balancer.access"):
        await _traffic(run, plain=1, usage_streams=1, bare_streams=0)
    records = [r for r in caplog.records if r.name == "balancer.access"]
    assert len(records) == 2
    fields = [r.access for r in records]  # type: ignore[attr-defined]
    for f in fields:
        assert f["model"] == MODEL
        assert (f["pool"], f["endpoint"], f["route"], f["status"]) == (
            "llama", up.endpoint_id, "primary", 200)
        assert re.fullmatch(r"[0-9a-f]{16}", f["key_hash"])
        assert f["request_id"] and f["ttfb_ms"] >= 0 and f["duration_ms"] >= f["ttfb_ms"]
        assert (f["prompt_tokens"], f["cached_tokens"]) == (5, 3)


def test_json_log_lines_merge_the_access_fields():
    """The JSON formatter writes one object with the message and the access fields."""
    record = logging.LogRecord("balancer.access", logging.INFO, __file__, 1, "GET / %d",
                               (200,), None)
    record.access = {"status": 200, "endpoint": "a:1"}
    out = json.loads(JsonFormatter().format(record))
    assert (out["message"], out["status"], out["endpoint"], out["level"]) == (
        "GET / 200", 200, "a:1", "info")
    assert TextFormatter().format(record).endswith("status=200 endpoint=a:1")


def test_log_format_must_be_auto_json_or_text():
    """An unknown server.log_format stops the configuration with a message naming it."""
    with pytest.raises(ConfigError, match=r"server\.log_format"):
        validate(make_settings(["http://127.0.0.1:1"], log_format="xml"))


def test_usage_is_read_from_bodies_and_the_last_usage_event():
    """Bodies without usage cost no parse; in a stream tail the last usage event wins."""
    assert body_usage(b'{"id": 1}') is None
    assert body_usage(b'{"usage": {"prompt_tokens": 7}}') == (7, 0)
    tail = (b'data: {"usage": {"prompt_tokens": 1}}\n\n'
            b'data: {"choices": [], "usage": {"prompt_tokens": 9, '
            b'"prompt_tokens_details": {"cached_tokens": 8}}}\n\ndata: [DONE]\n\n')
    assert stream_usage(tail) == (9, 8)
    assert stream_usage(b'data: {"usage": null}\n\ndata: [DONE]\n\n') is None
    assert stream_usage(b"data: [DONE]\n\n") is None


async def test_debug_route_explains_without_sending_or_loading(upstreams, start_balancer):
    """/debug/route names the endpoint a real request then reaches, and sends nothing."""
    ups = await upstreams(3)
    run = await start_balancer(make_settings([u.url for u in ups]))
    body = chat_body("where would this go?")
    async with run.http.post(run.admin_url + "/debug/route", json=body) as r:
        assert r.status == 200
        explained = await r.json()
    assert sum(len(u.requests) for u in ups) == 0
    assert run.load() == {}
    assert explained["outcome"] == "primary"
    assert explained["ring_walk"][0]["endpoint"] == explained["endpoint"]
    async with run.http.post(run.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["x-balancer-endpoint"] == explained["endpoint"]
    async with run.http.post(run.admin_url + "/debug/route", data=b"{") as r:
        assert r.status == 400
    async with run.http.post(run.admin_url + "/debug/route", json={"model": "nope",
                                                                     "prompt": "x"}) as r:
        assert r.status == 404


def _used_metrics() -> set[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in re.findall(r"\bbalancer_[a-z_]+", e)}


def test_alert_rules_parse_and_name_every_alert():
    """The rules file is valid YAML in Prometheus's groups/rules shape."""
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"BalancerNoRoutableEndpoints", "BalancerHighUpstream5xxRate",
            "BalancerEjectionStorm", "BalancerCacheHitRateCollapsed",
            "BalancerDiscoveryStale"} <= names
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["expr"].strip() and rule["labels"]["severity"]


async def test_every_metric_the_dashboard_and_alerts_use_is_exported(upstreams,
                                                                     start_balancer):
    """After traffic, each metric named in the dashboard or rules is a family in /metrics."""
    (up,) = await upstreams(1)
    run = await start_balancer(make_settings([up.url]))
    await _traffic(run, plain=2, usage_streams=1, bare_streams=1)
    async with run.http.get(run.admin_url + "/metrics") as r:
        text = await r.text()
    exported: set[str] = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")
    assert "process_resident_memory_bytes" in exported
    used = _used_metrics()
    assert len(used) >= 15
    assert used <= exported, sorted(used - exported)


def test_auto_log_format_is_json_off_a_terminal_and_text_on_one():
    """``auto`` picks JSON for a pipe or file and text for a terminal; explicit values win."""
    import io

    from balancer.logs import use_json

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_json("auto", io.StringIO()) and not use_json("auto", Terminal())
    assert use_json("json", Terminal()) and not use_json("text", io.StringIO())
