"""Request targets a model server could read differently from balancer, and admin paths.

Only the normalized path of an allowed ``/v1`` request goes upstream. Dot segments (raw or
percent-encoded), encoded slashes, absolute-form and authority-form targets (``CONNECT``),
and the asterisk form are refused with 400 before routing; paths outside the allow-list
(vLLM's LoRA loading, ``/metrics``, ``/sleep``...) get 404 and reach no pod.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.adversarial.conftest import Target

REFUSED = {
    "dot-dot": b"GET /v1/../metrics HTTP/1.1",
    "encoded-dot-dot": b"GET /v1/%2e%2e/metrics HTTP/1.1",
    "upper-encoded-dot-dot": b"GET /v1/%2E%2E/metrics HTTP/1.1",
    "mixed-dot-dot": b"GET /v1/.%2e/sleep HTTP/1.1",
    "dot": b"GET /v1/./models HTTP/1.1",
    "encoded-slash": b"POST /v1/chat%2fcompletions HTTP/1.1",
    "backslash": b"GET /v1/..\\metrics HTTP/1.1",
    "absolute-form": b"GET http://127.0.0.1:1/v1/models HTTP/1.1",
    "absolute-form-admin": b"POST http://pod:8000/collective_rpc HTTP/1.1",
    "connect": b"CONNECT 127.0.0.1:9090 HTTP/1.1",
    "asterisk": b"OPTIONS * HTTP/1.1",
}
NOT_FORWARDED = {
    "lora-load": b"POST /v1/load_lora_adapter HTTP/1.1",
    "lora-unload": b"POST /v1/unload_lora_adapter HTTP/1.1",
    "unknown-v1": b"POST /v1/some/admin/thing HTTP/1.1",
    "metrics": b"GET /metrics HTTP/1.1",
    "sleep": b"POST /sleep HTTP/1.1",
    "reset-cache": b"POST /reset_prefix_cache HTTP/1.1",
}


def send(line: bytes) -> bytes:
    body = b'{"lora_name": "x", "lora_path": "/tmp/x"}'
    return (line + b"\r\nHost: balancer\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def forwarded(target: Target) -> float:
    async with aiohttp.ClientSession() as session:
        return target.total(await target.metrics(session), "balancer_requests_total")


@pytest.mark.parametrize("name", list(REFUSED))
async def test_a_target_that_could_be_read_two_ways_is_refused(target: Target, name: str):
    before = await forwarded(target)
    response = await target.raw(send(REFUSED[name]), read_timeout=2)
    assert response.status == 400, response.data[:300]
    assert response.error()["type"] == "invalid_request_error"
    assert await forwarded(target) == before
    await target.intact()


@pytest.mark.parametrize("name", list(NOT_FORWARDED))
async def test_admin_and_unknown_paths_reach_no_pod(target: Target, name: str):
    before = await forwarded(target)
    response = await target.raw(send(NOT_FORWARDED[name]), read_timeout=2)
    assert response.status == 404, response.data[:300]
    assert "error" in response.error() or response.error()["message"]
    assert await forwarded(target) == before
    await target.intact()
