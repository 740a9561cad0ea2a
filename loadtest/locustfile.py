"""Locust users that chat with an OpenAI-compatible server and measure TTFT, ITL and E2E.

Each user plays conversations one after another, turn by turn: it streams
``/chat/completions`` (or ``/completions`` for prompt bodies), appends the reply it actually got
to the history, waits the turn's think time and sends the next turn. Conversations come from a
trace file (``--workload trace --trace-file FILE``; format in ``loadtest/trace.py``, the file is
replayed in arrival order and from the start again when it runs out) or from one of the seeded
generators in ``loadtest/workloads.py`` (an endless stream). Locust is closed loop: the number
of users (``-u``) is the number of conversations in progress, and trace arrival times are not
used; for open-loop replay use ``loadtest/player.py``.

Besides the POST row (time to response headers only), every request adds three rows of type
``SSE`` whose ``response_length`` is the request's output tokens:

* ``TTFT``: time to the first chunk that carries content;
* ``ITL``: the mean gap between content chunks of that request;
* ``E2E``: time to ``data: [DONE]``; failed requests are reported here with their error.

Locust's CSV and web UI round percentiles, so the raw samples are kept and at exit an exact
summary (``loadtest/stats.py``) is printed and written to ``--summary-file`` (per Locust process:
with ``--processes`` or workers, each writes its own file).

Usage, from the repository root or anywhere else::

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host http://127.0.0.1:8080/v1 --workload multi-turn --seed 1 \\
        --summary-file results/locust-summary.json

``--host`` is the OpenAI base URL, with or without ``/v1``: a balancer, a Kubernetes Service or
a model server. Our flags: ``--workload {multi-turn,shared-docs,unique,trace}``,
``--trace-file``, ``--model`` and ``--max-tokens`` (override the bodies' values), ``--seed``,
``--summary-file``, ``--request-timeout`` (seconds a read may stall) and ``--session-header``
(send the conversation id in this header). ``python loadtest/locustfile.py`` runs one user
against ``$LOCUST_HOST`` (default ``http://127.0.0.1:8000``) for debugging.
"""

# Locust's event hooks are untyped, so its listener decorators are too.
# mypy: disable-error-code="untyped-decorator"

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)  # make `loadtest` importable however Locust was started

from locust import FastHttpUser, constant, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.runners import MasterRunner  # noqa: E402

from loadtest.player import (  # noqa: E402
    ENDPOINT_HEADER,
    POD_HEADER,
    StreamRecorder,
    http_error,
    normalize_base_url,
    request_body,
)
from loadtest.stats import Sample, summarize_samples  # noqa: E402
from loadtest.trace import (  # noqa: E402
    Conversation,
    TraceError,
    TraceRecord,
    group_conversations,
    load_trace,
)
from loadtest.workloads import WORKLOADS, conversation_stream  # noqa: E402

logger = logging.getLogger("loadtest.locustfile")

SSE = "SSE"
"""``request_type`` of the TTFT, ITL and E2E rows."""

DEFAULT_SUMMARY_FILE = "locust-summary.json"

ERROR_PAUSE_S = 0.5
"""A user whose request failed waits this long before its next conversation; without it, users
facing a refused connection spin through thousands of failures a second."""


class _Run:
    """Per-process state: where conversations come from and the samples collected."""

    def __init__(self) -> None:
        self.conversations: Iterator[Conversation] = iter(())
        self.samples: list[Sample] = []
        self.origin = time.perf_counter()
        self.started: float | None = None
        self.stopped: float | None = None
        self.model: str | None = None
        self.max_tokens: int | None = None
        self.summary_file = DEFAULT_SUMMARY_FILE
        self.session_header: str | None = None


RUN = _Run()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("balancer load test")
    group.add_argument(
        "--workload",
        choices=[*WORKLOADS, "trace"],
        default="multi-turn",
        help="built-in generator, or 'trace' to play --trace-file (default: multi-turn)",
    )
    group.add_argument("--trace-file", default="", help="JSONL trace for --workload trace")
    group.add_argument("--model", default="", help="model name to send (default: the body's)")
    group.add_argument(
        "--max-tokens", type=int, default=0, help="max_tokens to send (default: the body's)"
    )
    group.add_argument("--seed", type=int, default=1, help="seed of the built-in generators")
    group.add_argument(
        "--summary-file",
        default=DEFAULT_SUMMARY_FILE,
        help="where to write the exact summary as JSON (default: %(default)s)",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds a connect or read may stall before the request fails (default: 120)",
    )
    group.add_argument(
        "--session-header",
        default="",
        help="send each conversation's id in this header (e.g. x-session-id)",
    )


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    if options is None:  # run_single_user without a command line
        RUN.conversations = conversation_stream("multi-turn", 1)
        return
    if options.workload == "trace":
        if not options.trace_file:
            raise SystemExit("--workload trace needs --trace-file FILE")
        try:
            conversations = group_conversations(load_trace(options.trace_file))
        except (TraceError, OSError) as e:
            raise SystemExit(f"cannot use the trace file:\n{e}") from e
        if not conversations:
            raise SystemExit(f"{options.trace_file}: no requests")
        RUN.conversations = itertools.cycle(conversations)
    else:
        RUN.conversations = conversation_stream(options.workload, options.seed)
    RUN.model = options.model or None
    RUN.max_tokens = options.max_tokens or None
    RUN.summary_file = options.summary_file
    RUN.session_header = options.session_header or None
    ChatUser.network_timeout = options.request_timeout
    ChatUser.connection_timeout = min(options.request_timeout, 10.0)


@events.request.add_listener
def _keep_sample(request_type: str, name: str, context: dict[str, Any], **_kwargs: Any) -> None:
    """Keep the raw sample behind every E2E row, for exact percentiles at exit."""
    if request_type == SSE and name == "E2E" and isinstance(context.get("sample"), Sample):
        RUN.samples.append(context["sample"])


@events.test_start.add_listener
def _on_test_start(**_kwargs: Any) -> None:
    RUN.started = time.perf_counter()
    RUN.stopped = None


@events.test_stop.add_listener
def _on_test_stop(**_kwargs: Any) -> None:
    RUN.stopped = time.perf_counter()


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # the workers hold the samples
    started = RUN.started if RUN.started is not None else RUN.origin
    stopped = RUN.stopped if RUN.stopped is not None else time.perf_counter()
    summary = summarize_samples(RUN.samples, stopped - started)
    summary["host"] = environment.host
    summary["stopped_by"] = "locust"
    print(_format(summary), flush=True)
    path = Path(RUN.summary_file)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("summary written to %s", path)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _format(summary: dict[str, Any]) -> str:
    rate = summary["requests_per_s"] or 0.0
    tokens = summary["output_tokens_per_s"] or 0.0
    return "\n".join(
        [
            "Exact summary (raw samples)",
            f"  requests {summary['requests']}, errors {summary['errors']}, "
            f"{rate:.2f} req/s, {tokens:.1f} output tok/s over {summary['wall_s']:.1f} s",
            f"  TTFT p50 {_ms(summary['ttft_p50_s'])}, p90 {_ms(summary['ttft_p90_s'])}, "
            f"p99 {_ms(summary['ttft_p99_s'])}",
            f"  ITL p50 {_ms(summary['itl_p50_s'])}; E2E p50 {_ms(summary['e2e_p50_s'])}, "
            f"p99 {_ms(summary['e2e_p99_s'])}",
        ]
    )


class ChatUser(FastHttpUser):
    """Plays conversations turn by turn, streaming each reply."""

    wait_time = constant(0)  # think time comes from the conversations
    # time.sleep() yields to other users: Locust has monkey-patched it with gevent.
    network_timeout = 120.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        if not self.host:
            raise SystemExit("give the OpenAI base URL with --host, e.g. http://127.0.0.1:8080/v1")
        self.base_url = normalize_base_url(self.host)
        self.headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            # A compressed event stream may be buffered by the server's compressor.
            "Accept-Encoding": "identity",
        }

    @task
    def conversation(self) -> None:
        """Play the next conversation to its end (or its first failure)."""
        conversation = next(RUN.conversations)
        history: list[dict[str, Any]] = []
        for index, record in enumerate(conversation.turns):
            if index > 0 and record.think_s > 0:
                time.sleep(record.think_s)
            messages: list[dict[str, Any]] | None = None
            if "messages" in record.body:
                new = list(record.body["messages"])
                messages = history + new if record.append else new
            reply = self._turn(conversation.conversation_id, record, messages)
            if reply is None:
                time.sleep(ERROR_PAUSE_S)
                return
            if messages is not None:
                history = [*messages, {"role": "assistant", "content": reply}]

    def _turn(
        self, conversation_id: str, record: TraceRecord, messages: list[dict[str, Any]] | None
    ) -> str | None:
        body = request_body(record, messages, RUN.model, RUN.max_tokens)
        path = "/chat/completions" if messages is not None else "/completions"
        headers = dict(self.headers)
        if RUN.session_header:
            headers[RUN.session_header] = conversation_id
        sent = time.perf_counter()
        sample = Sample(conversation_id, record.turn, start_s=sent - RUN.origin)
        recorder = StreamRecorder(sample, sent)
        try:
            with self.client.post(
                self.base_url + path,
                json=body,
                headers=headers,
                name=path,
                stream=True,
                catch_response=True,
            ) as response:
                self._read(response, sample, recorder)
                if sample.error is None:
                    response.success()
                else:
                    response.failure(sample.error)
        except Exception as e:  # the connection failed in a way Locust did not catch
            if sample.error is None:
                sample.error = f"{type(e).__name__}: {e}"
        sample.e2e_s = time.perf_counter() - sent
        self._report(sample)
        return recorder.reply if sample.error is None else None

    def _read(self, response: Any, sample: Sample, recorder: StreamRecorder) -> None:
        """Read the event stream line by line from the raw socket response."""
        sample.status = response.status_code or None
        headers = response.headers or {}
        sample.endpoint = headers.get(ENDPOINT_HEADER)
        sample.pod = headers.get(POD_HEADER)
        raw = getattr(response, "_response", None)
        if response.status_code != 200 or raw is None:
            error = getattr(response, "error", None)
            if sample.status is None:
                sample.error = f"{type(error).__name__}: {error}" if error else "no response"
            else:
                try:
                    text = response.content or b""
                except Exception:  # the body could not be read; the status says enough
                    text = b""
                sample.error = http_error(response.status_code, text)
            return
        try:
            # readline() hands back each line as soon as it is complete; iter_content() would
            # wait for 1 KiB blocks and add tens of ms to TTFT.
            while not recorder.done and sample.error is None:
                line = raw.readline(b"\n")
                if not line:
                    break
                recorder.feed(line, time.perf_counter())
        except Exception as e:  # socket timeouts, resets, parse errors mid-stream
            sample.error = f"stream broken: {type(e).__name__}: {e}"
        recorder.finish()
        if recorder.done and sample.error is None:
            # Read the end of the body (the last chunk after [DONE]): a response left unfinished
            # closes its connection, so the next request would pay a new connect and the
            # server would log a client disconnect (balancer: code 499) for a complete reply.
            # The reply is complete either way, so a failure here only loses the connection.
            with contextlib.suppress(Exception):
                raw.read()

    def _report(self, sample: Sample) -> None:
        fire = self.environment.events.request.fire
        tokens = sample.output_tokens
        if sample.error is None:
            if sample.ttft_s is not None:
                fire(
                    request_type=SSE,
                    name="TTFT",
                    response_time=sample.ttft_s * 1000,
                    response_length=tokens,
                    exception=None,
                    context={},
                )
            if sample.itl_s:
                fire(
                    request_type=SSE,
                    name="ITL",
                    response_time=sum(sample.itl_s) / len(sample.itl_s) * 1000,
                    response_length=tokens,
                    exception=None,
                    context={},
                )
        fire(
            request_type=SSE,
            name="E2E",
            response_time=(sample.e2e_s or 0.0) * 1000,
            response_length=tokens,
            exception=None if sample.error is None else RuntimeError(sample.error),
            context={"sample": sample},
        )


if __name__ == "__main__":
    from locust import run_single_user

    ChatUser.host = os.environ.get("LOCUST_HOST", "http://127.0.0.1:8000")
    run_single_user(ChatUser)
