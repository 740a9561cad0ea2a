"""The Responses API through real balancers in front of three simulated pods, each storing
its responses in its own memory as vLLM does: a follow-up naming ``previous_response_id``
must reach the pod that stored the response, from any replica."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer.config import (
    BackendSettings,
    PoolSettings,
    RouteSettings,
    RoutingSettings,
    Settings,
    validate,
)
from balancer.prefix import Kind
from balancer.route import decide, keyed_view
from loadtest.simserver import DEFAULT_MODEL, SimConfig, pod_configs, run_pods
from loadtest.simserver.responses import RESPONSES_KEY
from tests.conftest import make_settings

POD = SimConfig(time_scale=0.01, models=(DEFAULT_MODEL,))


@pytest.fixture
async def pods():
    async with run_pods(pod_configs(POD, 3)) as running:
        yield running


def body(text: str, previous: str | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"model": DEFAULT_MODEL, "input": text, "max_output_tokens": 4,
                            **extra}
    if previous is not None:
        data["previous_response_id"] = previous
    return data


async def create(run, data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A whole response through ``run``, and the pod that answered."""
    async with run.http.post(run.url + "/v1/responses", json=data) as r:
        assert r.status == 200, await r.text()
        return await r.json(), r.headers["x-sim-pod"]


def holder(pods, response_id: str) -> str:
    """The pod whose store holds ``response_id``."""
    return next(p.name for p in pods if p.app[RESPONSES_KEY].get(response_id) is not None)


def elsewhere(run, pods, stored_on: str, previous: str) -> dict[str, Any]:
    """A follow-up whose own key routes it to a pod other than ``stored_on`` (so only the
    response id can bring it back there)."""
    endpoint_of = {f"127.0.0.1:{p.port}": p.name for p in pods}
    for i in range(100):
        data = body(f"follow-up question number {i}", previous)
        choice = decide(keyed_view(Kind.RESPONSES, data, None), run.balancer.router).choice
        if endpoint_of[choice.endpoint] != stored_on:
            return data
    raise AssertionError("every follow-up keyed to the same pod")


async def test_a_chain_of_five_responses_stays_on_the_pod_that_stores_them(
        pods, start_balancer):
    """Each turn names the previous response; every one succeeds on the first pod, the
    follow-ups by the id map (route ``affinity``) whatever their own key says."""
    run = await start_balancer(make_settings([p.url for p in pods], models=(DEFAULT_MODEL,)))
    answer, first_pod = await create(run, body("Plan a trip to Lisbon, please."))
    seen, routes = {first_pod}, []
    for turn in range(4):
        data = elsewhere(run, pods, first_pod, answer["id"]) if turn == 0 else body(
            f"and then step {turn}?", answer["id"])
        async with run.http.post(run.url + "/v1/responses", json=data) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
            seen.add(r.headers["x-sim-pod"])
            routes.append(r.headers["x-balancer-route"])
        assert answer["previous_response_id"] == data["previous_response_id"]
    assert seen == {first_pod}
    assert routes == ["affinity"] * 4
    assert holder(pods, answer["id"]) == first_pod
    assert await run.metric("balancer_response_affinity_total", outcome="hit") == 4
    assert await run.metric("balancer_response_affinity_total", outcome="learned") == 5
    assert await run.metric("balancer_response_affinity_entries") == 5
    async with run.http.get(run.admin_url + "/debug/endpoints") as r:
        assert (await r.json())["response_affinity"]["entries"] == 5


async def test_a_replica_that_never_saw_the_response_finds_it_by_probing(
        pods, start_balancer):
    """Replica B never relayed the response A stored: B routes the follow-up by its key to
    another pod, which answers vLLM's 404, and B tries the next pod until the one holding it
    answers. B then knows the id, and its next follow-up goes straight there."""
    settings = make_settings([p.url for p in pods], models=(DEFAULT_MODEL,))
    a, b = await start_balancer(settings), await start_balancer(settings)
    answer, stored_on = await create(a, body("Summarise the history of Rome."))
    follow_up = elsewhere(b, pods, stored_on, answer["id"])
    _, pod = await create(b, follow_up)
    assert pod == stored_on
    assert await b.metric("balancer_response_affinity_total", outcome="miss") == 1
    assert await b.metric("balancer_response_affinity_total", outcome="probe") >= 1
    assert await b.metric("balancer_response_affinity_total", outcome="found") == 1
    assert await b.metric("balancer_retries_total", reason="response_not_found",
                          result="retried") >= 1
    _, pod = await create(b, body("more, please", answer["id"]))
    assert pod == stored_on
    assert await b.metric("balancer_response_affinity_total", outcome="hit") == 1
    # GET by id through A, which knows it, and through a fresh replica, which probes.
    c = await start_balancer(settings)
    for run in (a, c):
        async with run.http.get(run.url + f"/v1/responses/{answer['id']}") as r:
            assert r.status == 200
            assert (await r.json())["id"] == answer["id"]
            assert r.headers["x-sim-pod"] == stored_on


async def test_probes_for_a_stored_response_spend_no_retry_budget(pods, start_balancer):
    """With the retry budget spent (none allowed), a replica that never saw the response
    still probes every pod for it: the probes are not retries of work."""
    settings = make_settings([p.url for p in pods], models=(DEFAULT_MODEL,))
    a = await start_balancer(settings)
    b = await start_balancer(replace(settings, retries=replace(
        settings.retries, budget_ratio=0.0, budget_min_retries=0)))
    answer, stored_on = await create(a, body("Summarise the history of Carthage."))
    _, pod = await create(b, elsewhere(b, pods, stored_on, answer["id"]))
    assert pod == stored_on
    assert await b.metric("balancer_retries_total", reason="response_not_found",
                          result="budget") == 0


async def test_a_response_no_pod_holds_is_a_404_after_one_try_per_pod(pods, start_balancer):
    """An id no pod stores (a restarted pod lost it) is asked of each pod once, then vLLM's
    404 reaches the client as the pod sent it."""
    run = await start_balancer(make_settings([p.url for p in pods], models=(DEFAULT_MODEL,)))
    before = sum(p.pod.counters.requests_rejected for p in pods)
    async with run.http.post(run.url + "/v1/responses", json=body("hi", "resp_gone")) as r:
        assert r.status == 404
        error = (await r.json())["error"]
    assert error["message"] == "Response with id 'resp_gone' not found."
    assert error["param"] == "response_id"
    assert sum(p.pod.counters.requests_rejected for p in pods) - before == 3
    assert await run.metric("balancer_response_affinity_total", outcome="probe") == 2
    assert await run.metric("balancer_response_affinity_total", outcome="lost") == 1


async def test_a_pod_that_lost_its_responses_is_forgotten(pods, start_balancer):
    """When the pod the map names answers 404 for the id (it restarted), the entry goes and
    the other pods are asked; the client gets the 404."""
    run = await start_balancer(make_settings([p.url for p in pods], models=(DEFAULT_MODEL,)))
    answer, stored_on = await create(run, body("Remember this."))
    next(p for p in pods if p.name == stored_on).app[RESPONSES_KEY]._items.clear()
    async with run.http.post(run.url + "/v1/responses",
                             json=body("and?", answer["id"])) as r:
        assert r.status == 404
    assert run.balancer.proxy.responses.get(answer["id"], 0.0) is None
    assert await run.metric("balancer_response_affinity_total", outcome="hit") == 1
    assert await run.metric("balancer_response_affinity_total", outcome="lost") == 1


async def test_a_streamed_response_teaches_its_id(pods, start_balancer):
    """The id of a streamed response is read from its response.created event as it passes;
    the stream reaches the client whole, and the follow-up goes to the pod that stored it."""
    run = await start_balancer(make_settings([p.url for p in pods], models=(DEFAULT_MODEL,)))
    async with run.http.post(run.url + "/v1/responses",
                             json=body("Stream me a haiku.", stream=True)) as r:
        assert r.status == 200
        stored_on = r.headers["x-sim-pod"]
        raw = await r.read()
    events = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: ")]
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    response_id = events[0]["response"]["id"]
    assert await run.metric("balancer_response_affinity_total", outcome="learned") == 1
    follow_up = elsewhere(run, pods, stored_on, response_id)
    follow_up["stream"] = True
    async with run.http.post(run.url + "/v1/responses", json=follow_up) as r:
        assert r.status == 200
        assert r.headers["x-sim-pod"] == stored_on
        assert r.headers["x-balancer-route"] == "affinity"
        await r.read()


async def test_store_false_is_not_remembered(pods, start_balancer):
    """An answer the pod does not keep is not worth an entry."""
    run = await start_balancer(make_settings([p.url for p in pods], models=(DEFAULT_MODEL,)))
    await create(run, body("Do not keep this.", store=False))
    assert len(run.balancer.proxy.responses) == 0


async def test_the_map_can_be_turned_off(pods, start_balancer):
    """With no map, every follow-up still finds its pod by probing."""
    settings = make_settings([p.url for p in pods], models=(DEFAULT_MODEL,),
                             routing=RoutingSettings(response_affinity_entries=0))
    run = await start_balancer(settings)
    answer, stored_on = await create(run, body("Probe for me."))
    _, pod = await create(run, elsewhere(run, pods, stored_on, answer["id"]))
    assert pod == stored_on
    assert await run.metric("balancer_response_affinity_total", outcome="learned") == 0


async def test_a_malformed_responses_body_is_a_400(pods, start_balancer):
    """Validation happens before routing, with an OpenAI-style error naming the field."""
    run = await start_balancer(make_settings([p.url for p in pods], models=(DEFAULT_MODEL,)))
    async with run.http.post(run.url + "/v1/responses",
                             json={"model": DEFAULT_MODEL, "input": 5}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "input"
    async with run.http.post(run.url + "/v1/responses",
                             json=body("x", previous_response_id=7)) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "previous_response_id"
    assert await run.metric("balancer_rejected_requests_total") >= 2


async def test_the_openai_client_chains_responses_through_the_proxy(pods, start_balancer):
    """The official client's ``responses.create`` (whole and streamed) and ``retrieve`` work
    through balancer, and a chain stays on one pod."""
    run = await start_balancer(make_settings([p.url for p in pods], models=(DEFAULT_MODEL,)))
    client = openai.AsyncOpenAI(base_url=run.url + "/v1", api_key="unused", max_retries=0)
    try:
        first = await client.responses.create(model=DEFAULT_MODEL, input="Hello there!",
                                              instructions="Be brief.", max_output_tokens=4)
        assert first.id.startswith("resp_") and first.output_text
        second = await client.responses.create(model=DEFAULT_MODEL, input="Go on.",
                                               previous_response_id=first.id,
                                               max_output_tokens=4)
        stream = await client.responses.create(model=DEFAULT_MODEL, input="Once more.",
                                               previous_response_id=second.id,
                                               max_output_tokens=4, stream=True)
        kinds = [event.type async for event in stream]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        again = await client.responses.retrieve(second.id)
        assert again.id == second.id
    finally:
        await client.close()
    assert holder(pods, first.id) == holder(pods, second.id)
    assert await run.metric("balancer_response_affinity_total", outcome="hit") == 3


async def test_a_json_answer_of_unknown_length_teaches_its_id(start_balancer):
    """A whole answer sent chunked (no Content-Length; so is one over 1 MiB) is relayed as it
    comes, and its id is read from its head on the way."""
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"id": "resp_')
        await response.write(b'chunked", "object": "response", "output": []}')
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/responses", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        run = await start_balancer(make_settings([f"http://127.0.0.1:{server.port}"],
                                                 models=(DEFAULT_MODEL,)))
        async with run.http.post(run.url + "/v1/responses", json=body("hi")) as r:
            assert (await r.json())["id"] == "resp_chunked"
        pin = run.balancer.proxy.responses.get("resp_chunked", 0.0)
        assert pin is not None and pin.endpoint == f"127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_a_conversation_on_a_route_stays_in_its_pool(start_balancer):
    """A route splits conversations over two pools by key; each follow-up, whatever its own
    key ranks first, goes to the pod of the pool holding its previous response, and its
    answer names the route's model."""
    configs = [replace(POD, models=(model,)) for model in ("llama-a",) * 2 + ("llama-b",) * 2]
    async with run_pods(configs) as four:
        urls = [p.url for p in four]
        run = await start_balancer(validate(Settings(
            pools=(PoolSettings("a", ("llama-a",), tuple(urls[:2])),
                   PoolSettings("b", ("llama-b",), tuple(urls[2:]))),
            routes=(RouteSettings("chat", (BackendSettings("a"), BackendSettings("b"))),))))
        answer, stored_on = await create(run, body("Start a story.", model="chat"))
        assert answer["model"] == "chat"
        for turn in range(4):
            async with run.http.post(run.url + "/v1/responses", json=body(
                    f"continue with twist {turn}", answer["id"], model="chat")) as r:
                assert r.status == 200
                assert r.headers["x-sim-pod"] == stored_on
                assert r.headers["x-balancer-route"] == "affinity"
                answer = await r.json()
