"""A fast stand-in for an OpenAI-compatible model server, for proxy benchmarks.

``python -m loadtest.bench_upstream --port 8000`` answers ``POST /v1/chat/completions`` at once:
a small JSON completion (about 200 bytes) when the body does not ask for a stream, or an SSE
stream of ``--chunks`` ``chat.completion.chunk`` events and ``data: [DONE]`` when it does,
written one event per write with no delay in between (``--whole-streams``: all of it in one
write, with a Content-Length). ``GET /health`` answers ``ok``.

Why it exists: a proxy benchmark measures what the proxy adds, so the server behind it must cost
as little CPU as possible and never be the bottleneck. It therefore uses aiohttp's low-level
server (no router, no middlewares, no access log) on uvloop, keeps every response body
precomputed, and decides streaming with a byte search instead of a JSON parse. Each stream event
is its own write so a proxy relays a real token-by-token stream, not one coalesced buffer.

Load generators close connections mid-response when their time is up; that is normal here and
is never logged as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
from collections.abc import Sequence
from typing import Final

from aiohttp import web

DEFAULT_MODEL: Final = "bench-model"
CHAT_PATH: Final = "/v1/chat/completions"
CREATED: Final = 1_700_000_000

# `"stream": true` anywhere in the body, with any JSON whitespace around the colon. A byte
# search: parsing JSON per request would make the double cost nearly as much as the proxy.
_STREAM_TRUE: Final = re.compile(rb'"stream"\s*:\s*true')

_STREAM_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

log = logging.getLogger("bench_upstream")


def completion_body(model: str) -> bytes:
    """A non-streamed chat completion of about 200 bytes."""
    body = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there."},
                     "finish_reason": "stop"}],
        "usage": {"total_tokens": 12},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def stream_events(model: str, chunks: int) -> list[bytes]:
    """The SSE events of one streamed completion: ``chunks`` deltas, then ``[DONE]``."""
    events = []
    for i in range(chunks):
        last = i == chunks - 1
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "delta": {} if last else {"content": f"tok{i} "},
                         "finish_reason": "stop" if last else None}],
        }
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


class Upstream:
    """The request handler; holds the precomputed bodies."""

    def __init__(self, model: str, chunks: int, whole_streams: bool = False) -> None:
        self.completion = completion_body(model)
        self.events = stream_events(model, chunks)
        self.whole_stream = b"".join(self.events) if whole_streams else None
        """Every event in one body: a proxy then reads each stream in one piece, however
        the processes are scheduled (for :mod:`loadtest.bench_instructions`)."""
        # Each event as an HTTP/1.1 chunk, written straight to the transport: one send per
        # event like a real server, without the response writer's per-call Python overhead.
        self.frames = [b"%x\r\n%s\r\n" % (len(e), e) for e in self.events]

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="ok\n")
        if request.path != CHAT_PATH:
            return web.json_response({"error": {"message": f"no route {request.path}"}},
                                     status=404)
        if request.method != "POST":
            return web.json_response({"error": {"message": "use POST"}}, status=405)
        body = await request.read()
        if _STREAM_TRUE.search(body) is None:
            return web.Response(body=self.completion, content_type="application/json")
        if self.whole_stream is not None:
            return web.Response(body=self.whole_stream, headers=_STREAM_HEADERS)
        response = web.StreamResponse(headers=_STREAM_HEADERS)
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            # The first event goes through the response writer, which sends the headers
            # with it whatever version of aiohttp buffers them; the rest go straight out.
            await response.write(self.events[0])
            transport = request.transport
            for frame in self.frames[1:]:
                if transport is None or transport.is_closing():
                    return response
                transport.write(frame)
            await response.write_eof()
        except ConnectionError:
            # The client went away mid-stream (a load generator stopping): nothing to report.
            pass
        return response


async def serve(host: str, port: int, model: str, chunks: int, backlog: int,
                whole_streams: bool = False) -> None:
    """Serve until SIGINT or SIGTERM."""
    server = web.Server(Upstream(model, chunks, whole_streams), access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=True)
    await site.start()
    log.info("bench upstream listening on http://%s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_upstream",
        description="Fast OpenAI-compatible upstream double for proxy benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name in the responses")
    parser.add_argument("--chunks", type=int, default=20,
                        help="chat.completion.chunk events per streamed response")
    parser.add_argument("--whole-streams", action="store_true",
                        help="send each stream in one write, with a Content-Length, instead "
                             "of one write per event")
    parser.add_argument("--backlog", type=int, default=1024, help="listen backlog")
    parser.add_argument("--log-level", default="warning", help="Python logging level")
    args = parser.parse_args(argv)
    if args.chunks < 1:
        parser.error("--chunks must be >= 1")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    uvloop.run(serve(args.host, args.port, args.model, args.chunks, args.backlog,
                     args.whole_streams))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
