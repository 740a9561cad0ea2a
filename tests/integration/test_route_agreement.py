"""One routing decision: the proxy, /debug/route and `balancer route` agree on every request.

Each request of the table is explained by the running balancer (``/debug/route``) and by
the command line's ``explain_route`` (against the configuration), then sent for real; the
endpoint the proxy used (``x-balancer-endpoint``), its route outcome and the key hash in
its access-log line must be what both explanations said.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from balancer.cli import explain_route
from tests.conftest import MODEL, chat_body, make_settings

CHAT = "/v1/chat/completions"
TABLE: list[tuple[str, dict[str, Any], str | None]] = [
    *((CHAT, chat_body(f"conversation {i}: hello"), None) for i in range(8)),
    (CHAT, {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "a question"}]}, None),
    (CHAT, chat_body("any text at all"), "session-7"),
    (CHAT, chat_body("any text", user="user-42"), None),
    (CHAT, chat_body("streamed", stream=True), None),
    ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time"}, None),
    ("/v1/completions", {"model": MODEL, "prompt": ["first of a batch", "second"]}, None),
    ("/v1/embeddings", {"model": MODEL, "input": "embed this sentence"}, None),
]


async def test_the_proxy_debug_route_and_the_cli_make_the_same_decision(
        upstreams, start_balancer, caplog: pytest.LogCaptureFixture):
    """On a table of requests, all three name the same endpoint, outcome and key hash."""
    ups = await upstreams(4)
    settings = make_settings([u.url for u in ups])
    run = await start_balancer(settings)
    used = set()
    for path, body, session in TABLE:
        headers = {"x-session-id": session} if session else {}
        async with run.http.post(run.admin_url + "/debug/route", params={"path": path},
                                 json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            live = await r.json()
        offline = explain_route(settings, body, path=path, session=session)
        assert live == offline, (path, body)
        with caplog.at_level(logging.INFO, logger="balancer.access"):
            caplog.clear()
            async with run.http.post(run.url + path, json=body, headers=headers) as r:
                assert r.status == 200
                await r.read()
                proxied = (r.headers["x-balancer-endpoint"], r.headers["x-balancer-route"])
            await run.wait_idle()
        (access,) = [rec.access for rec in caplog.records  # type: ignore[attr-defined]
                     if rec.name == "balancer.access"]
        assert proxied == (live["endpoint"], live["outcome"]), (path, body)
        assert access["key_hash"] == live["key_hash"]
        used.add(live["endpoint"])
    assert len(used) >= 3, "the table should spread over the pool"
