"""Load reports from the pods: the ORCA header parser and the queue estimate's arithmetic."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.load import EMPTY, LoadReport, QueueEstimate, parse_orca, report_from

# -- the header parser ---------------------------------------------------------------------------


def test_vllm_text_form() -> None:
    report, bad = parse_orca("TEXT named_metrics.kv_cache_usage_perc=0.41, "
                             "named_metrics.num_requests_waiting=3.0")
    assert (report, bad) == (LoadReport(waiting=3.0, kv_usage=0.41), 0)


def test_vllm_json_form() -> None:
    value = "JSON " + json.dumps({"named_metrics": {"kv_cache_usage_perc": 0.5,
                                                    "num_requests_waiting": 7.0}})
    assert parse_orca(value) == (LoadReport(waiting=7.0, kv_usage=0.5), 0)


def test_the_form_is_case_insensitive_and_running_is_read() -> None:
    report, bad = parse_orca("text named_metrics.num_requests_running=12")
    assert (report, bad) == (LoadReport(running=12.0), 0)


def test_proto_style_json_names_are_read() -> None:
    value = 'JSON {"cpu_utilization": 0.3, "namedMetrics": {"num_requests_waiting": 2}}'
    assert parse_orca(value) == (LoadReport(waiting=2.0), 0)


def test_unknown_and_standard_fields_are_ignored_without_complaint() -> None:
    report, bad = parse_orca("TEXT cpu_utilization=0.3, rps_fractional=10.0, "
                             "named_metrics.custom_util=0.4, named_metrics.num_requests_waiting=1")
    assert (report, bad) == (LoadReport(waiting=1.0), 0)


def test_older_kv_name_is_read() -> None:
    assert parse_orca("TEXT named_metrics.kv_cache_utilization=0.9")[0].kv_usage == 0.9


@pytest.mark.parametrize("value, report, bad", [
    ("TEXT named_metrics.num_requests_waiting=lots", EMPTY, 1),
    ("TEXT named_metrics.num_requests_waiting", EMPTY, 1),
    ("TEXT =3", EMPTY, 1),
    ("TEXT named_metrics.num_requests_waiting=-1", EMPTY, 1),
    ("TEXT named_metrics.num_requests_waiting=nan", EMPTY, 1),
    ("TEXT named_metrics.num_requests_waiting=inf", EMPTY, 1),
    ("TEXT named_metrics.kv_cache_usage_perc=41", EMPTY, 1),  # a percentage, not a fraction
    ("TEXT named_metrics.num_requests_waiting=2, named_metrics.kv_cache_usage_perc=x",
     LoadReport(waiting=2.0), 1),
    ("JSON {not json", EMPTY, 1),
    ("JSON [1, 2]", EMPTY, 1),
    ('JSON {"named_metrics": 3}', EMPTY, 1),
    ('JSON {"named_metrics": {"num_requests_waiting": "3"}}', EMPTY, 1),
    ('JSON {"named_metrics": {"num_requests_waiting": true}}', EMPTY, 1),
    ('JSON {"named_metrics": {"something_else": "x"}}', EMPTY, 0),
    ("BIN CZqZmZmZmbk/MQAAAAAAAABA", EMPTY, 1),
    ("", EMPTY, 1),
    ("TEXT", EMPTY, 0),
    ("TEXT ,, ,", EMPTY, 0),
])
def test_malformed_parts_are_counted_and_left_out(value: str, report: LoadReport,
                                                  bad: int) -> None:
    assert parse_orca(value) == (report, bad)


@given(st.text())
def test_any_header_value_parses_without_raising(value: str) -> None:
    report, bad = parse_orca(value)
    assert bad >= 0
    for figure in (report.waiting, report.running, report.kv_usage):
        assert figure is None or (math.isfinite(figure) and figure >= 0)


@given(st.floats(0, 1e6), st.floats(0, 1))
def test_text_values_round_trip(waiting: float, kv: float) -> None:
    report, bad = parse_orca(f"TEXT named_metrics.num_requests_waiting={waiting!r}, "
                             f"named_metrics.kv_cache_usage_perc={kv!r}")
    assert (report, bad) == (LoadReport(waiting=waiting, kv_usage=kv), 0)


def test_an_empty_report_is_false() -> None:
    assert not EMPTY and LoadReport(kv_usage=0.0)
    assert report_from({"num_requests_waiting": 0.0}) == (LoadReport(waiting=0.0), 0)


# -- the estimate ----------------------------------------------------------------------------


def test_sent_requests_add_to_the_reported_queue_until_they_start() -> None:
    queue = QueueEstimate()
    queue.report(LoadReport(waiting=3.0), now=10.0, source="inband")
    a, b = queue.sent(), queue.sent()
    assert queue.queued == 5
    queue.started(a)
    assert queue.queued == 4
    queue.started(b)
    assert queue.queued == 3


def test_requests_sent_before_a_report_take_from_the_reported_figure() -> None:
    queue = QueueEstimate()
    old = [queue.sent() for _ in range(4)]
    queue.report(LoadReport(waiting=2.0), now=1.0, source="inband")
    assert queue.queued == 2  # the report counts them (or they run already)
    for generation in old:
        queue.started(generation)
    assert queue.queued == 0  # never below zero, whatever the report missed


def test_a_report_without_a_queue_figure_keeps_the_estimate() -> None:
    queue = QueueEstimate()
    queue.report(LoadReport(waiting=2.0), now=1.0, source="inband")
    queue.sent()
    queue.report(LoadReport(kv_usage=0.7), now=2.0, source="inband")
    assert (queue.queued, queue.kv_usage, queue.at) == (3, 0.7, 2.0)


def test_the_running_count_is_kept_across_reports_that_leave_it_out() -> None:
    """vLLM's in-band report carries no running count unless asked; the polled one does."""
    queue = QueueEstimate()
    assert queue.running == 0.0
    queue.report(LoadReport(waiting=1.0, running=12.0), 1.0, "poll")
    queue.report(LoadReport(waiting=2.0), 2.0, "inband")
    assert (queue.running, queue.queued) == (12.0, 2.0)
    queue.report(LoadReport(running=3.0), 3.0, "poll")
    assert queue.running == 3.0


def test_freshness_and_age() -> None:
    queue = QueueEstimate()
    assert queue.age(5.0) is None and not queue.fresh(5.0, 3.0)
    queue.report(LoadReport(waiting=1.0), now=5.0, source="poll")
    assert queue.fresh(8.0, 3.0) and not queue.fresh(8.5, 3.0)
    assert queue.age(6.5) == 1.5
    queue.report(LoadReport(kv_usage=0.2), now=7.0, source="poll")
    assert queue.age(7.0) == 0.0
    assert not queue.fresh(8.5, 3.0)  # a report without a queue figure does not refresh it
    only_kv = QueueEstimate()
    only_kv.report(LoadReport(kv_usage=0.2), now=9.0, source="poll")
    assert not only_kv.fresh(9.0, 3.0)  # nothing to bound a queue on


events = st.lists(st.one_of(
    st.tuples(st.just("send")),
    st.tuples(st.just("start"), st.integers(0, 50)),
    st.tuples(st.just("report"), st.integers(0, 20)),
), max_size=80)


@given(events)
def test_estimate_is_reported_queue_plus_mine_and_never_negative(script) -> None:
    """Against a model: the estimate is max(0, reported - older requests started) plus this
    replica's requests sent since the report that have not started."""
    queue = QueueEstimate()
    pending: list[int] = []  # generations of requests not started yet
    reported, older_started = 0.0, 0
    for event in script:
        if event[0] == "send":
            pending.append(queue.sent())
        elif event[0] == "start" and pending:
            generation = pending.pop(event[1] % len(pending))
            if generation != queue.generation:
                older_started += 1
            queue.started(generation)
        elif event[0] == "report":
            queue.report(LoadReport(waiting=float(event[1])), now=0.0, source="inband")
            reported, older_started = float(event[1]), 0
        mine = sum(1 for g in pending if g == queue.generation)
        assert queue.queued >= 0
        assert queue.mine == mine
        if reported >= older_started:
            assert queue.queued == reported - older_started + mine
        else:
            assert queue.queued == mine
