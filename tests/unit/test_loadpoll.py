"""Reading vLLM's and SGLang's Prometheus metrics into a load report, and the poll back-off."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancer.load import EMPTY, LoadReport
from balancer.loadpoll import GAUGES, MAX_BACKOFF, backoff, parse_exposition

# A vLLM V1 page, cut down: two data-parallel engines, counters, a histogram, an info gauge
# whose labels hold the names balancer looks for, and an older gauge name.
VLLM = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 8231.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="1",running_lora_adapters="vllm:num_requests_running 99",\
waiting_lora_adapters=""} 1.7346e+09
# HELP vllm:kv_cache_usage_perc KV-Cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.41
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.125
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.9
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 123456.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 42.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 42.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 3.14
"""

# vLLM before the rename: only gpu_cache_usage_perc, no labels beyond model_name.
VLLM_OLD = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.75
"""

# SGLang: the scheduler's gauges, one series per data-parallel rank.
SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",\
dp_rank="0"} 12.0
sglang:num_running_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",\
dp_rank="1"} 10.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",\
dp_rank="0"} 4.0
sglang:num_queue_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",\
dp_rank="1"} 1.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",\
dp_rank="0"} 0.3
sglang:token_usage{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0",\
dp_rank="1"} 0.6
# HELP sglang:num_queue_reqs_by_priority Not a gauge balancer reads.
# TYPE sglang:num_queue_reqs_by_priority gauge
sglang:num_queue_reqs_by_priority{priority="0"} 100.0
"""


def test_a_vllm_page_sums_the_engines_and_takes_the_fullest_kv_cache():
    """Queues of the engines add up, the KV fraction is the fullest engine's; the newer KV
    name wins over the older one, and label values that look like samples are not read."""
    assert parse_exposition(VLLM) == (LoadReport(waiting=3.0, running=12.0, kv_usage=0.41), 0)


def test_an_older_vllm_page_gives_its_kv_cache_under_the_older_name():
    """Without kv_cache_usage_perc, gpu_cache_usage_perc is the KV fraction."""
    assert parse_exposition(VLLM_OLD) == (LoadReport(waiting=1.0, running=2.0, kv_usage=0.75),
                                          0)


def test_an_sglang_page_gives_queue_running_and_token_usage():
    """SGLang's names fill the same fields; a longer name sharing the prefix is not read."""
    assert parse_exposition(SGLANG) == (LoadReport(waiting=5.0, running=22.0, kv_usage=0.6), 0)


def test_a_page_with_only_some_gauges_reports_those():
    """A missing gauge is None in the report, not zero."""
    text = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 4\n"
    assert parse_exposition(text) == (LoadReport(waiting=4.0), 0)


@pytest.mark.parametrize("text", [
    "",
    "\n\n",
    "<html><body>404 Not Found</body></html>",
    '{"detail": "Not Found"}',
    "# HELP process_cpu_seconds_total Total CPU.\n# TYPE process_cpu_seconds_total counter\n"
    "process_cpu_seconds_total 12.5\n",
    "\x00\xff{}}{{\"\\",
], ids=["empty", "blank", "html", "json", "other-metrics", "binary"])
def test_text_without_the_gauges_is_unreadable(text):
    """Anything that is not a page with the gauges reads as the empty report, never an
    error."""
    report, _ = parse_exposition(text)
    assert report == EMPTY and not report


@pytest.mark.parametrize(("line", "value"), [
    ("vllm:num_requests_waiting 3", 3.0),
    ("vllm:num_requests_waiting{} 3", 3.0),
    ("vllm:num_requests_waiting 3 1712345678000", 3.0),  # with a timestamp
    ("vllm:num_requests_waiting\t2.5e1", 25.0),
    ("vllm:num_requests_waiting{a=\"x y\"} 1.0E+2", 100.0),
    ("vllm:num_requests_waiting{a=\"}\",b=\"\\\"}\"} 7", 7.0),  # braces and quotes in values
    ("vllm:num_requests_waiting{a=\"\\\\\"} 8", 8.0),  # an escaped backslash ends a value
    ("  vllm:num_requests_waiting 9\r", 9.0),  # indentation, CRLF line ends
    ("vllm:num_requests_waiting 0 # {trace_id=\"1\"} 0.5", 0.0),  # OpenMetrics exemplar
])
def test_sample_lines_in_every_form_the_format_allows_are_read(line, value):
    """Labels, escapes, exponents, timestamps and exemplars all parse to the value."""
    assert parse_exposition(line + "\n") == (LoadReport(waiting=value), 0)


@pytest.mark.parametrize("line", [
    "vllm:num_requests_waiting NaN",
    "vllm:num_requests_waiting +Inf",
    "vllm:num_requests_waiting -1",
    "vllm:num_requests_waiting three",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting ",
    "vllm:num_requests_waiting{a=\"unterminated} 3",
    "vllm:num_requests_waiting{a=\"x\" 3",
])
def test_impossible_or_malformed_samples_are_counted_and_left_out(line):
    """A bad sample is counted; the others of the same gauge still count."""
    text = f"{line}\nvllm:num_requests_waiting{{engine=\"1\"}} 2\n"
    assert parse_exposition(text) == (LoadReport(waiting=2.0), 1)


def test_a_kv_fraction_above_one_is_impossible():
    """KV use is a fraction: 1.5 is left out (and the older name is not used instead, since
    the newer one was present)."""
    text = ("vllm:kv_cache_usage_perc 1.5\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.2\n"
            "vllm:gpu_cache_usage_perc 0.9\n")
    assert parse_exposition(text) == (LoadReport(kv_usage=0.2), 1)


def test_names_are_matched_whole_and_only_at_the_start_of_a_line():
    """Longer names, comments and help text that mention a gauge are not samples of it."""
    text = ("vllm:num_requests_waiting_total 5\n"
            "# vllm:num_requests_waiting 6\n"
            "# HELP vllm:num_requests_waiting 7 waiting\n"
            "xvllm:num_requests_waiting 8\n")
    assert parse_exposition(text) == (EMPTY, 0)


# -- properties --------------------------------------------------------------------------------

FRAGMENTS = st.sampled_from([
    *[name for names in GAUGES.values() for name in names],
    "{", "}", '"', "\\", "=", ",", " ", "\t", "\n", "\r\n", "#", "0", "1.5", "-2", "NaN",
    "+Inf", "e", "le=", "model_name", "_total", "# TYPE ", " gauge\n",
])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(FRAGMENTS).map("".join)))
def test_no_text_makes_the_reader_raise(text):
    """Arbitrary text, or text made of the format's own pieces, always gives a report
    (possibly empty) and a non-negative count of bad samples."""
    report, bad = parse_exposition(text)
    assert isinstance(report, LoadReport) and bad >= 0
    for value in (report.waiting, report.running, report.kv_usage):
        assert value is None or (math.isfinite(value) and value >= 0)
    assert report.kv_usage is None or report.kv_usage <= 1.0


LABEL_VALUES = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                       max_size=12)
COUNTS = st.floats(min_value=0, max_value=1e6, allow_nan=False)
FRACTIONS = st.floats(min_value=0, max_value=1, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(
    server=st.sampled_from(["vllm", "vllm-old", "sglang"]),
    waiting=st.dictionaries(LABEL_VALUES, COUNTS, max_size=4),
    running=st.dictionaries(LABEL_VALUES, COUNTS, max_size=4),
    kv=st.dictionaries(LABEL_VALUES, FRACTIONS, max_size=4),
)
def test_pages_written_by_prometheus_client_read_back(server, waiting, running, kv):
    """A page prometheus-client writes (label values with quotes, braces, backslashes,
    newlines; other families around, some with names extending the gauges') reads back to
    the sums and the largest KV fraction, as prometheus-client's own parser reads it."""
    names = {"vllm": ("vllm:num_requests_waiting", "vllm:num_requests_running",
                      "vllm:kv_cache_usage_perc"),
             "vllm-old": ("vllm:num_requests_waiting", "vllm:num_requests_running",
                          "vllm:gpu_cache_usage_perc"),
             "sglang": ("sglang:num_queue_reqs", "sglang:num_running_reqs",
                        "sglang:token_usage")}[server]
    registry = CollectorRegistry()
    Counter(names[0] + "_by_reason", "noise", ["reason"], registry=registry).labels("x").inc(9)
    Histogram(names[1] + "_seconds", "noise", ["model_name"],
              registry=registry).labels("m").observe(0.3)
    for name, series in zip(names, (waiting, running, kv), strict=True):
        if series:
            gauge = Gauge(name, "a gauge", ["model_name", "engine"], registry=registry)
            for i, (label, value) in enumerate(series.items()):
                gauge.labels(label, str(i)).set(value)
    text = generate_latest(registry).decode()

    report, bad = parse_exposition(text)

    assert bad == 0
    expected = LoadReport(
        waiting=sum(waiting.values()) if waiting else None,
        running=sum(running.values()) if running else None,
        kv_usage=max(kv.values()) if kv else None,
    )
    assert _close(report, expected)
    theirs = {name: [s.value for f in text_string_to_metric_families(text)
                     for s in f.samples if s.name == name] for name in names}
    assert _close(report, LoadReport(
        waiting=sum(theirs[names[0]]) if theirs[names[0]] else None,
        running=sum(theirs[names[1]]) if theirs[names[1]] else None,
        kv_usage=max(theirs[names[2]]) if theirs[names[2]] else None,
    ))


def _close(a: LoadReport, b: LoadReport) -> bool:
    pairs = ((a.waiting, b.waiting), (a.running, b.running), (a.kv_usage, b.kv_usage))
    return all((x is None and y is None) or (x is not None and y is not None
                                             and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9))
               for x, y in pairs)


# -- back-off ----------------------------------------------------------------------------------

def test_back_off_doubles_from_twice_the_interval_up_to_its_ceiling():
    """A server without metrics is asked after 2, 4, 8... intervals, at most every
    MAX_BACKOFF seconds."""
    waits, wait = [], 0.0
    for _ in range(10):
        wait = backoff(wait, 1.0)
        waits.append(wait)
    assert waits[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert waits[5:] == [MAX_BACKOFF] * 5


def test_back_off_is_never_shorter_than_the_interval():
    """An interval above the ceiling is kept: back-off never polls more often."""
    assert backoff(0.0, 300.0) == 300.0
    assert backoff(300.0, 300.0) == 300.0
