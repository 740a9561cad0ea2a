"""The response id map (bounded, expiring, least recently used first) and the readers of
response ids from answers, streams, 404 bodies and paths."""

from __future__ import annotations

import gc
import json
import uuid
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.affinity import (
    ENTRY_BYTES,
    HEAD_BYTES,
    SNIFF_BYTES,
    WHOLE_PARSE_MAX,
    CreatedSniffer,
    Pin,
    ResponseMap,
    body_response_id,
    path_response_id,
    response_not_found,
)

A, B = Pin("llama", "10.0.0.1:8000"), Pin("llama", "10.0.0.2:8000")


def test_a_learned_id_is_found_until_it_expires():
    """An entry lives ``ttl`` seconds from when it was learned; then it is gone."""
    responses = ResponseMap(10, ttl=60.0)
    responses.learn("resp_1", A, now=100.0)
    assert responses.get("resp_1", 159.9) == A
    assert responses.get("resp_1", 160.0) is None
    assert len(responses) == 0


def test_the_least_recently_used_goes_first_when_full():
    """Beyond capacity the entry used least recently is dropped; a lookup counts as a use."""
    responses = ResponseMap(2, ttl=60.0)
    responses.learn("resp_1", A, 0.0)
    responses.learn("resp_2", B, 0.0)
    assert responses.get("resp_1", 1.0) == A
    responses.learn("resp_3", B, 1.0)
    assert responses.get("resp_2", 1.0) is None
    assert responses.get("resp_1", 1.0) == A
    assert len(responses) == 2


def test_learning_drops_expired_entries_from_the_front():
    """A map that keeps learning sheds what expired without lookups of it."""
    responses = ResponseMap(100, ttl=10.0)
    for i in range(5):
        responses.learn(f"old_{i}", A, 0.0)
    responses.learn("new_0", B, 20.0)
    responses.learn("new_1", B, 20.0)
    assert len(responses) == 5 - 2 * 2 + 2  # two expired ones dropped per learn
    responses.learn("new_2", B, 20.0)
    assert len(responses) == 3


def test_forget_and_a_disabled_map():
    """The known endpoint's 404 forgets the id; capacity 0 remembers nothing."""
    responses = ResponseMap(10, 60.0)
    responses.learn("resp_1", A, 0.0)
    responses.forget("resp_1", B)  # another endpoint's 404 says nothing about A
    assert responses.get("resp_1", 0.0) == A
    responses.forget("resp_1", A)
    responses.forget("resp_unknown", A)
    assert responses.get("resp_1", 0.0) is None
    off = ResponseMap(0, 60.0)
    off.learn("resp_1", A, 0.0)
    assert len(off) == 0 and off.get("resp_1", 0.0) is None


operations = st.lists(st.tuples(
    st.sampled_from(["learn", "get", "forget"]), st.integers(0, 12),
    st.sampled_from([A, B]), st.floats(0, 5)), max_size=80)


@settings(max_examples=200)
@given(ops=operations, capacity=st.integers(1, 6), ttl=st.floats(0.5, 20))
def test_the_map_agrees_with_a_plain_reference_model(ops, capacity, ttl):
    """Against a straightforward model (an ordered dict, expiry checked on every read):
    every lookup agrees, and the size never exceeds capacity."""
    responses = ResponseMap(capacity, ttl)
    model: OrderedDict[str, tuple[Pin, float]] = OrderedDict()
    now = 0.0
    for op, n, pin, step in ops:
        now += step
        key = f"resp_{n}"
        if op == "learn":
            responses.learn(key, pin, now)
            model[key] = (pin, now + ttl)
            model.move_to_end(key)
            while len(model) > capacity:
                model.popitem(last=False)
        elif op == "get":
            entry = model.get(key)
            expected = None
            if entry is not None and entry[1] > now:
                expected = entry[0]
                model.move_to_end(key)
            elif entry is not None:
                del model[key]
            assert responses.get(key, now) == expected
        else:
            responses.forget(key, pin)
            if key in model and model[key][0] == pin:
                del model[key]
        assert len(responses) <= capacity


def test_an_entry_costs_what_the_setting_says():
    """Memory per entry with vLLM-shaped ids stays under ENTRY_BYTES (the figure the
    routing.response_affinity_entries docstring and README give)."""
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    count = 100_000
    hexes = [uuid.uuid4().hex.encode() for _ in range(count)]
    gc.collect()
    before = rss()
    responses = ResponseMap(count, 3600.0)
    for raw in hexes:
        responses.learn((b"resp_" + raw).decode("ascii"), A, 1.0)
    gc.collect()
    per_entry = (rss() - before) / count
    assert len(responses) == count
    assert per_entry < ENTRY_BYTES, per_entry


# -- reading ids -----------------------------------------------------------------------------

def test_a_whole_answers_id_is_read_from_its_head():
    """vLLM's answer starts with its id; one elsewhere is found by a parse of a small
    answer only; an id with odd characters is not taken."""
    assert body_response_id(b'{"id": "resp_abc", "object": "response"}') == "resp_abc"
    assert body_response_id(b' {\n  "id":"resp_x-1.2"}') == "resp_x-1.2"
    late = json.dumps({"object": "response", "id": "resp_late"}).encode()
    assert body_response_id(late) == "resp_late"
    big = json.dumps({"object": "response", "pad": "x" * WHOLE_PARSE_MAX,
                      "id": "resp_far"}).encode()
    assert body_response_id(big) is None
    assert body_response_id(b'{"id": "resp/../x"}') is None
    assert body_response_id(b'{"id": 5}') is None
    assert body_response_id(b"not json") is None
    assert body_response_id(b"[1, 2]") is None


def _events(response_id: str, instructions: str = "") -> bytes:
    created = {"type": "response.created", "sequence_number": 0,
               "response": {"id": response_id, "object": "response",
                            "instructions": instructions, "status": "in_progress"}}
    delta = {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1",
             "delta": "hi"}
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                    for e in (created, delta))


@settings(max_examples=200)
@given(cuts=st.lists(st.integers(1, 400), max_size=8), instructions=st.text(max_size=200))
def test_a_streams_id_is_found_however_its_start_is_cut(cuts, instructions):
    """Fed the stream in chunks of any size, the sniffer finds the id of response.created
    (instructions and all), then is done."""
    stream = _events("resp_stream", instructions)
    sniffer = CreatedSniffer()
    found = None
    at = 0
    for size in [*cuts, len(stream)]:
        chunk = stream[at:at + size]
        at += size
        if not chunk:
            break
        found = sniffer.feed(chunk)
        if sniffer.done:
            break
    assert sniffer.done and found == "resp_stream"


def test_a_stream_with_its_id_elsewhere_or_none():
    """A response object whose id is not first is parsed from the first complete event; a
    stream with no response object gives up after its first event, and one that never
    completes an event gives up after SNIFF_BYTES."""
    event = {"type": "response.created", "response": {"object": "response", "id": "resp_b"}}
    sniffer = CreatedSniffer()
    assert sniffer.feed(f"data: {json.dumps(event)}".encode()) is None
    assert not sniffer.done
    assert sniffer.feed(b"\n\n") == "resp_b" and sniffer.done
    other = CreatedSniffer()
    assert other.feed(b'data: {"choices": []}\n\n') is None and other.done
    endless = CreatedSniffer()
    assert endless.feed(b": " + b"x" * SNIFF_BYTES) is None and endless.done


@settings(max_examples=100)
@given(cut=st.integers(1, 60))
def test_a_json_answer_relayed_in_chunks_gives_its_head_id(cut):
    """A whole answer too large to read at once is relayed in chunks; its id is read from
    its head however the head is cut, and one without an id there is given up on."""
    answer = json.dumps({"id": "resp_big", "object": "response", "pad": "x" * 2000}).encode()
    sniffer = CreatedSniffer(whole=True)
    found = None
    for at in range(0, len(answer), cut):
        found = sniffer.feed(answer[at:at + cut])
        if sniffer.done:
            break
    assert found == "resp_big"
    late = CreatedSniffer(whole=True)
    assert late.feed(b'{"object": "response", "pad": "' + b"x" * HEAD_BYTES) is None
    assert late.done


VLLM_404 = json.dumps({"error": {"message": "Response with id 'resp_9' not found.",
                                 "type": "invalid_request_error", "param": "response_id",
                                 "code": 404}}).encode()


@pytest.mark.parametrize(("payload", "response_id", "expected"), [
    (VLLM_404, "resp_9", True),
    (json.dumps({"object": "error", "message": "Response with id 'resp_9' not found.",
                 "type": "invalid_request_error", "code": 404}).encode(), "resp_9", True),
    (VLLM_404, "resp_8", False),
    (json.dumps({"error": {"message": "The model `x` does not exist."}}).encode(), "resp_9",
     False),
    (b'{"detail": "Not Found"}', "resp_9", False),
    (b"<html>404</html>", "resp_9", False),
    (VLLM_404, "", False),
    (b'{"error": {"message": "' + b"resp_9 not found " * 5000 + b'"}}', "resp_9", False),
], ids=["vllm", "vllm-old", "other-id", "model", "no-message", "html", "empty-id", "huge"])
def test_a_404_counts_only_when_it_names_the_response(payload, response_id, expected):
    """Only vLLM's response-not-found naming the id sends the request on to another
    endpoint."""
    assert response_not_found(payload, response_id) is expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/v1/responses/resp_1", "resp_1"),
    ("/v1/responses/resp_1/cancel", "resp_1"),
    ("/v1/responses/resp_1/input_items", "resp_1"),
    ("/v1/responses", None),
    ("/v1/responses/", None),
    ("/v1/responses/compact", None),
    ("/v1/responses/input_tokens", None),
    ("/v1/responses/resp_1/other", None),
    ("/v1/responses/a/b/c", None),
    ("/v1/chat/completions", None),
])
def test_the_id_of_a_path(path, expected):
    """Only the paths by response id name one."""
    assert path_response_id(path) == expected
