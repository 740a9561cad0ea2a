"""The simulated pod's Responses API: stored in the pod's memory, vLLM's answers and errors."""

from __future__ import annotations

import json

import aiohttp
import pytest

from loadtest.simserver import DEFAULT_MODEL, SimConfig, run_pods
from loadtest.simserver.responses import ResponseStore, Stored

POD = SimConfig(time_scale=0.01, models=(DEFAULT_MODEL,))


@pytest.fixture
async def pod():
    async with run_pods([POD]) as pods, aiohttp.ClientSession() as http:
        yield pods[0].url, http


async def test_a_response_is_stored_and_continued(pod):
    """The answer starts with its id; GET returns it; a follow-up extends the stored
    conversation, so its prompt finds the first turn in the prefix cache."""
    url, http = pod
    first = {"model": DEFAULT_MODEL, "input": "Tell me about the sea. " * 20,
             "instructions": "Be brief.", "max_output_tokens": 4}
    async with http.post(url + "/v1/responses", json=first) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw.startswith(b'{"id": "resp_')
    answer = json.loads(raw)
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert answer["output"][0]["content"][0]["type"] == "output_text"
    async with http.get(url + f"/v1/responses/{answer['id']}") as r:
        assert (await r.json())["id"] == answer["id"]
    follow = {"model": DEFAULT_MODEL, "input": [{"role": "user", "content": "And rivers?"}],
              "instructions": "Be brief.", "previous_response_id": answer["id"],
              "max_output_tokens": 4}
    async with http.post(url + "/v1/responses", json=follow) as r:
        second = await r.json()
    assert second["previous_response_id"] == answer["id"]
    assert second["usage"]["input_tokens_details"]["cached_tokens"] > 0
    assert second["usage"]["input_tokens"] > answer["usage"]["input_tokens"]


async def test_unknown_ids_get_vllms_errors(pod):
    """An id the pod does not hold is vLLM's 404 wherever it appears; a malformed id, and
    cancelling a response that was not made in the background, are its 400s."""
    url, http = pod
    expected = {"error": {"message": "Response with id 'resp_x' not found.",
                          "type": "invalid_request_error", "param": "response_id",
                          "code": 404}}
    for method, path, body in [
            ("POST", "/v1/responses", {"model": DEFAULT_MODEL, "input": "hi",
                                       "previous_response_id": "resp_x"}),
            ("GET", "/v1/responses/resp_x", None),
            ("POST", "/v1/responses/resp_x/cancel", None)]:
        async with http.request(method, url + path, json=body) as r:
            assert r.status == 404
            assert await r.json() == expected
    async with http.get(url + "/v1/responses/nope") as r:
        assert r.status == 400
    async with http.post(url + "/v1/responses",
                         json={"model": DEFAULT_MODEL, "input": "hi",
                               "max_output_tokens": 2}) as r:
        stored = (await r.json())["id"]
    async with http.post(url + f"/v1/responses/{stored}/cancel") as r:
        assert r.status == 400
    async with http.post(url + "/v1/responses", json={"model": DEFAULT_MODEL}) as r:
        assert r.status == 400
    async with http.post(url + "/v1/responses", json={"model": "other", "input": "x"}) as r:
        assert r.status == 404


async def test_a_streamed_response_sends_vllms_events_and_is_stored(pod):
    """created first (with the id), a delta per token, completed last; no ``[DONE]``; the
    response is stored when it completes, unless ``store`` is false."""
    url, http = pod
    async with http.post(url + "/v1/responses",
                         json={"model": DEFAULT_MODEL, "input": "Stream.", "stream": True,
                               "max_output_tokens": 5}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = (await r.read()).decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == events[-1]["response"]["output"][0]["content"][0]["text"]
    assert "[DONE]" not in text
    response_id = events[0]["response"]["id"]
    async with http.get(url + f"/v1/responses/{response_id}") as r:
        assert r.status == 200
    async with http.post(url + "/v1/responses",
                         json={"model": DEFAULT_MODEL, "input": "Forget.", "store": False,
                               "max_output_tokens": 2}) as r:
        gone = (await r.json())["id"]
    async with http.get(url + f"/v1/responses/{gone}") as r:
        assert r.status == 404


def test_the_store_keeps_the_newest():
    """A pod keeps at most its limit of responses, dropping the oldest."""
    store = ResponseStore(limit=2)
    for i in range(3):
        store.put(f"resp_{i}", Stored({"id": f"resp_{i}"}, []))
    assert len(store) == 2
    assert store.get("resp_0") is None and store.get("resp_2") is not None
