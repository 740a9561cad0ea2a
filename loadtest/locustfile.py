"""Locust users that chat with an OpenAI-compatible server and measure TTFT, ITL and E2E.

Each user plays conversations one after another, turn by turn: it streams
``/chat/completions`` (or ``/completions`` for prompt bodies), appends the reply it actually got
to the history, waits the turn's think time and sends the next turn. Conversations come from a
trace file (``--workload trace --trace-file FILE``; format in ``balancer/trace.py``, the file is
replayed in arrival order and from the start again when it runs out) or from one of the seeded
generators in ``loadtest/workloads.py`` (an endless stream). Locust is closed loop: the number
of users (``-u``) is the number of conversations in progress, and trace arrival times are not
used; for open-loop replay use ``loadtest/player.py``. A request is due when it is sent, so
each sample's ``due_s`` equals its ``sent_s`` (seconds from the test start).

Besides the POST row (time to response headers only), requests add rows of type ``SSE``:

* ``TTFT``: time to the first chunk that carries content (``response_length``: the request's
  output tokens);
* ``ITL``: **one row per gap** between consecutive content chunks (``response_length`` 0), so
  Locust's ITL percentiles are over gaps, like the summary's ``itl_p*_s`` and the player's;
* ``E2E``: time to ``data: [DONE]`` (``response_length``: output tokens); failed requests are
  reported here with their error.

TTFT and ITL rows come from completed requests only; requests cut off by the test's stop have
no row (they are *unfinished* in the summary).

Locust's CSV and web UI round percentiles, so the raw samples are kept and, at exit, an exact
summary (``loadtest/stats.py``: offered = completed + failed + unfinished, TTFT, per-gap ITL,
E2E, rates) is printed and written to ``--summary-file``; ``--samples-file`` also writes every
raw sample as JSON Lines (with a ``worker`` key). The summary's window runs from the test start
to the test stop, by due time; ``--warmup S`` leaves out requests due in the first S seconds
(the samples file keeps everything). Requests still in flight when the test stops are
*unfinished* (their age is a lower bound on their latency); give them time to finish with
Locust's ``--stop-timeout`` (users then start no new turn, and finish the one in flight).

Several processes (``--processes N``, or ``--master`` with ``--worker`` processes):

* **Distinct seeds.** Worker ``i`` (Locust's ``runner.worker_index``, 0-based, assigned by the
  master) generates its conversations with seed ``--seed + i`` and prefixes their ids with
  ``w<i>-``, so no two workers play the same conversation. With ``--workload trace``, worker
  ``i`` of ``n`` (the master's ``--expect-workers``, which ``--processes`` sets) plays every
  ``n``-th conversation from the ``i``-th on.
* **One summary.** Workers ship their raw samples to the master with every stats report
  (Locust's ``report_to_master``/``worker_report`` events). When the test stops, the master
  sends the workers a flush message (``runner.send_message``): each stops its users (in-flight
  requests become unfinished) and sends its remaining samples in batches, the last one marked
  final; the master waits (up to ``--stop-timeout`` + 15 s) for every worker's final batch,
  then summarizes all samples once and writes the files. Workers write nothing. Each worker's
  instants count from its own test start (when the master's spawn message reached it).

Usage, from the repository root or anywhere else::

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host http://127.0.0.1:8080/v1 --workload multi-turn --seed 1 \\
        --summary-file results/locust-summary.json --samples-file results/samples.jsonl

``--host`` is the OpenAI base URL, with or without ``/v1``: a balancer, a Kubernetes Service or
a model server. Our flags: ``--workload
{multi-turn,templated,greetings,agent,shared-docs,unique,trace}``,
``--trace-file``, ``--model`` and ``--max-tokens`` (override the bodies' values),
``--temperature`` (e.g. 0) and ``--ignore-eos`` (vLLM's ``ignore_eos: true``) so that every
contender sees the same outputs from real servers, ``--seed``, ``--summary-file``,
``--samples-file``, ``--warmup``, ``--request-timeout`` (seconds a connect or read may stall)
and ``--session-header`` (send the conversation id in this header).
``python loadtest/locustfile.py`` runs one user against ``$LOCUST_HOST`` (default
``http://127.0.0.1:8000``) for debugging.
"""

# Locust's event hooks are untyped, so its listener decorators are too.
# mypy: disable-error-code="untyped-decorator"

from __future__ import annotations

import contextlib
import dataclasses
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
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from loadtest.player import (  # noqa: E402
    ENDPOINT_HEADER,
    POD_HEADER,
    StreamRecorder,
    http_error,
    normalize_base_url,
    request_body,
)
from loadtest.stats import (  # noqa: E402
    UNFINISHED,
    Sample,
    Window,
    summarize_samples,
    write_samples,
)
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

FLUSH_MESSAGE = "balancer_loadtest_flush"
"""Master to workers: stop your users and send your remaining samples."""

SAMPLES_MESSAGE = "balancer_loadtest_samples"
"""Worker to master: a batch of samples (the reply to a flush)."""

REPORT_KEY = "balancer_loadtest_samples"
"""Key of the samples batch in a worker's stats report."""

BATCH_SIZE = 2000
"""Samples per flush message (a sample is a few hundred bytes)."""

FLUSH_SLACK_S = 15.0
"""The master waits for the workers' last samples for ``--stop-timeout`` plus this long."""


@dataclasses.dataclass
class _Settings:
    """What the command line asks for; read at test start, when a worker has the master's."""

    workload: str = "multi-turn"
    trace_file: str = ""
    seed: int = 1
    model: str | None = None
    max_tokens: int | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    session_header: str | None = None
    request_timeout_s: float = 120.0
    warmup_s: float = 0.0
    summary_file: str = DEFAULT_SUMMARY_FILE
    samples_file: str = ""


class _Run:
    """Per-process state: where conversations come from and the samples collected.

    In a single process (or a worker), ``samples`` are this process's samples (a worker's are
    the ones not shipped yet); on a master, ``merged`` holds every worker's, by worker index.
    """

    def __init__(self) -> None:
        self.settings = _Settings()
        self.conversations: Iterator[Conversation] = iter(())
        self.worker = 0
        self.seed = 1
        self.origin = time.perf_counter()
        """``perf_counter`` at the test start: samples' instants count from here."""
        self.started_at: float | None = None
        """Unix time of the test start."""
        self.stopped: float | None = None
        """``perf_counter`` at the test stop."""
        self.stopping = False
        self.samples: list[Sample] = []
        self.merged: dict[int, list[Sample]] = {}
        self.seeds: dict[int, int] = {}
        self.finals: set[int] = set()
        self.flushed = False

    def start(self) -> None:
        self.origin = time.perf_counter()
        self.started_at = time.time()
        self.stopped = None
        self.stopping = False
        self.samples = []
        self.merged = {}
        self.seeds = {}
        self.finals = set()
        self.flushed = False

    def take(self) -> list[Sample]:
        """The samples not shipped yet; they are forgotten here."""
        samples, self.samples = self.samples, []
        return samples


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
    group.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="temperature to send, e.g. 0 for identical outputs (default: the body's)",
    )
    group.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos: true (vLLM), so every reply runs to max_tokens",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the built-in generators; worker i uses seed + i (default: 1)",
    )
    group.add_argument(
        "--summary-file",
        default=DEFAULT_SUMMARY_FILE,
        help="where to write the exact summary as JSON (default: %(default)s)",
    )
    group.add_argument(
        "--samples-file",
        default="",
        help="where to write every raw sample as JSON Lines (default: nowhere)",
    )
    group.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds from the test start whose requests the summary leaves out (default: 0)",
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


def _optional_float(value: object, name: str) -> float | None:
    """A float option that may be unset (None, or "" from the web UI)."""
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SystemExit(f"{name} must be a number, got {value!r}") from None


def _settings(options: Any) -> _Settings:
    """The settings from parsed options (None: the defaults, for ``run_single_user``)."""
    if options is None:
        return _Settings()
    temperature = _optional_float(options.temperature, "--temperature")
    if temperature is not None and temperature < 0:
        raise SystemExit(f"--temperature must be >= 0, got {temperature}")
    overrides: dict[str, Any] = {}
    if temperature is not None:
        overrides["temperature"] = temperature
    if options.ignore_eos:
        overrides["ignore_eos"] = True
    warmup = _optional_float(options.warmup, "--warmup") or 0.0
    timeout = _optional_float(options.request_timeout, "--request-timeout") or 120.0
    if warmup < 0 or timeout <= 0:
        raise SystemExit("--warmup must be >= 0 and --request-timeout > 0")
    if options.workload == "trace" and not options.trace_file:
        raise SystemExit("--workload trace needs --trace-file FILE")
    return _Settings(
        workload=options.workload,
        trace_file=options.trace_file,
        seed=int(options.seed),
        model=options.model or None,
        max_tokens=int(options.max_tokens or 0) or None,
        overrides=overrides,
        session_header=options.session_header or None,
        request_timeout_s=timeout,
        warmup_s=warmup,
        summary_file=options.summary_file or DEFAULT_SUMMARY_FILE,
        samples_file=options.samples_file or "",
    )


def _load_trace(path: str) -> list[Conversation]:
    try:
        conversations = group_conversations(load_trace(path))
    except (TraceError, OSError) as e:
        raise SystemExit(f"cannot use the trace file:\n{e}") from e
    if not conversations:
        raise SystemExit(f"{path}: no requests")
    return conversations


def _worker_index(environment: Environment) -> int | None:
    """This worker's index (0-based) if the process is a Locust worker, else None."""
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):
        return None
    if runner.worker_index < 0:  # a master older than Locust 2.11 does not hand out indexes
        logger.warning("the master gave no worker index: this worker counts as worker 0")
        return 0
    return runner.worker_index


def _tagged(conversation: Conversation, worker: int) -> Conversation:
    """The conversation with its id prefixed by ``w<worker>-``, so ids differ between workers."""
    conversation_id = f"w{worker}-{conversation.conversation_id}"
    turns = tuple(
        dataclasses.replace(turn, conversation_id=conversation_id) for turn in conversation.turns
    )
    return dataclasses.replace(conversation, conversation_id=conversation_id, turns=turns)


def _conversations(settings: _Settings, worker: int | None, workers: int) -> Iterator[Conversation]:
    """This process's endless stream of conversations."""
    index = worker or 0
    if settings.workload == "trace":
        conversations = _load_trace(settings.trace_file)
        if worker is not None and workers > 1:
            # Worker i of n plays every n-th conversation from the i-th on (all of them if its
            # share is empty: more workers than conversations).
            conversations = conversations[index % workers :: workers] or conversations
        stream: Iterator[Conversation] = itertools.cycle(conversations)
    else:
        stream = conversation_stream(settings.workload, settings.seed + index)
    if worker is None:
        return stream
    return (_tagged(conversation, index) for conversation in stream)


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message(SAMPLES_MESSAGE, _on_samples_message)
    elif isinstance(runner, WorkerRunner):
        runner.register_message(FLUSH_MESSAGE, _on_flush_message)
        return  # a worker gets the master's options with its first spawn message
    # Check the command line now, so a mistake stops Locust before the test starts.
    RUN.settings = _settings(environment.parsed_options)
    if RUN.settings.workload == "trace":
        _load_trace(RUN.settings.trace_file)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kwargs: Any) -> None:
    RUN.start()
    RUN.settings = settings = _settings(environment.parsed_options)
    if isinstance(environment.runner, MasterRunner):
        return  # the workers play the conversations
    worker = _worker_index(environment)
    options = environment.parsed_options
    workers = int(getattr(options, "expect_workers", 1) or 1) if worker is not None else 1
    RUN.worker = worker or 0
    RUN.seed = settings.seed + RUN.worker
    RUN.conversations = _conversations(settings, worker, workers)
    ChatUser.network_timeout = settings.request_timeout_s
    ChatUser.connection_timeout = min(settings.request_timeout_s, 10.0)
    if worker is not None:
        logger.info("worker %d plays seed %d", RUN.worker, RUN.seed)


@events.test_stopping.add_listener
def _on_test_stopping(**_kwargs: Any) -> None:
    RUN.stopping = True  # users start no new turn


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    if RUN.stopped is None:
        RUN.stopped = time.perf_counter()
    if isinstance(environment.runner, MasterRunner):
        _collect(environment.runner)


# --- moving samples from the workers to the master ----------------------------------------------


def _payload(samples: list[Sample], *, final: bool) -> dict[str, Any]:
    return {
        "worker": RUN.worker,
        "seed": RUN.seed,
        "final": final,
        "samples": [sample.to_json() for sample in samples],
    }


@events.report_to_master.add_listener
def _on_report_to_master(data: dict[str, Any], **_kwargs: Any) -> None:
    """Worker: ship the samples collected since the last report with the stats report."""
    if RUN.samples:
        data[REPORT_KEY] = _payload(RUN.take(), final=False)


@events.worker_report.add_listener
def _on_worker_report(data: dict[str, Any], **_kwargs: Any) -> None:
    """Master: keep the samples a worker's stats report carries."""
    if REPORT_KEY in data:
        _merge(data[REPORT_KEY])


def _on_flush_message(environment: Environment, **_kwargs: Any) -> None:
    """Worker: stop the users (requests in flight become unfinished samples) and send the
    remaining samples, the last batch marked final."""
    runner = environment.runner
    if runner is None:
        return
    runner.stop()
    samples = RUN.take()
    batches = [samples[i : i + BATCH_SIZE] for i in range(0, len(samples), BATCH_SIZE)] or [[]]
    for number, batch in enumerate(batches, start=1):
        runner.send_message(SAMPLES_MESSAGE, _payload(batch, final=number == len(batches)))


def _on_samples_message(msg: Any, **_kwargs: Any) -> None:
    """Master: keep a batch of samples a worker sent in reply to the flush."""
    if isinstance(msg.data, dict):
        _merge(msg.data)


def _merge(payload: dict[str, Any]) -> None:
    worker = int(payload["worker"])
    RUN.seeds[worker] = int(payload["seed"])
    RUN.merged.setdefault(worker, []).extend(
        Sample.from_json(sample) for sample in payload["samples"]
    )
    if payload.get("final"):
        RUN.finals.add(worker)


def _collect(runner: MasterRunner) -> None:
    """Master: ask every worker for its last samples and wait for them (bounded)."""
    if RUN.flushed:
        return
    RUN.flushed = True
    expected = runner.worker_count
    if expected <= 0:
        return
    runner.send_message(FLUSH_MESSAGE)
    timeout = float(runner.environment.stop_timeout or 0.0) + FLUSH_SLACK_S
    deadline = time.monotonic() + timeout
    # time.sleep yields to the runner's greenlets (Locust has monkey-patched it), so the
    # workers' replies are received meanwhile.
    while len(RUN.finals) < min(expected, runner.worker_count) and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(RUN.finals) < expected:
        logger.warning(
            "%d of %d workers sent their last samples within %.0f s; the summary lacks the rest",
            len(RUN.finals),
            expected,
            timeout,
        )


# --- the summary ----------------------------------------------------------------------------------


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return  # the master summarizes
    if RUN.started_at is not None and RUN.stopped is None:
        # Quitting without a stop (SIGTERM, Ctrl-C): stop now, so requests in flight are
        # recorded as unfinished and the workers send their samples.
        if isinstance(runner, MasterRunner):
            RUN.stopped = time.perf_counter()
            _collect(runner)
        elif runner is not None:
            runner.stop()
    if isinstance(runner, MasterRunner):
        by_worker = dict(sorted(RUN.merged.items()))
        seeds = [RUN.seeds[worker] for worker in by_worker]
    else:
        by_worker = {RUN.worker: RUN.samples}
        seeds = [RUN.seed]
    settings = RUN.settings
    stopped = RUN.stopped if RUN.stopped is not None else time.perf_counter()
    wall = stopped - RUN.origin if RUN.started_at is not None else 0.0
    window = Window(settings.warmup_s, max(settings.warmup_s, wall))
    samples = [sample for group in by_worker.values() for sample in group]
    summary = summarize_samples(samples, window, wall_s=wall)
    summary["host"] = environment.host
    summary["stopped_by"] = "locust"
    summary["started_at"] = RUN.started_at
    summary["workers"] = len(by_worker)
    summary["seeds"] = seeds
    summary["body_overrides"] = settings.overrides
    print(_format(summary), flush=True)
    _write_text(settings.summary_file, json.dumps(summary, indent=2) + "\n")
    logger.info("summary written to %s", settings.summary_file)
    if settings.samples_file:
        path = _prepare(settings.samples_file)
        with path.open("w", encoding="utf-8") as out:
            count = sum(write_samples(group, out, worker=w) for w, group in by_worker.items())
        logger.info("%d samples written to %s", count, path)


def _prepare(name: str) -> Path:
    path = Path(name)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_text(name: str, text: str) -> None:
    _prepare(name).write_text(text, encoding="utf-8")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _percentiles(summary: dict[str, Any], key: str) -> str:
    return ", ".join(f"p{q} {_ms(summary[f'{key}_p{q}_s'])}" for q in (50, 90, 99))


def _format(summary: dict[str, Any]) -> str:
    rate = summary["requests_per_s"] or 0.0
    tokens = summary["output_tokens_per_s"] or 0.0
    causes = ", ".join(f"{cause} {n}" for cause, n in summary["failed_by"].items())
    failed = f"failed {summary['failed']}" + (f" ({causes})" if causes else "")
    workers = summary.get("workers", 1)
    source = f"{workers} workers" if workers != 1 else "1 process"
    return "\n".join(
        [
            f"Exact summary (raw samples of {source}, window {summary['window_s']:.1f} s"
            f" after {summary['warmup_s']:g} s warm-up)",
            f"  offered {summary['offered']}: completed {summary['completed']}, {failed}, "
            f"unfinished {summary['unfinished']}",
            f"  {rate:.2f} req/s, {tokens:.1f} output tok/s",
            f"  TTFT {_percentiles(summary, 'ttft')}",
            f"  ITL (per gap) {_percentiles(summary, 'itl')}",
            f"  E2E {_percentiles(summary, 'e2e')}",
        ]
    )


# --- the user -------------------------------------------------------------------------------------


def _stopping() -> bool:
    """The test is stopping: start no new turn."""
    return RUN.stopping


def _is_timeout(error: BaseException | None) -> bool:
    # socket.timeout is TimeoutError; gevent's Timeout is not, but says so in its name.
    return isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower()


def _body_reader(response: Any) -> Any:
    """The connection-level response under Locust's, to read the event stream line by line.

    WORKAROUND: FastResponse offers no public way to read a body a line at a time as it
    arrives: ``iter_content()`` and ``read(n)`` wait for ``n`` bytes (1 KiB by default: tens of
    ms added to every TTFT, and whole chunks merged, so no ITL), and ``readline()`` splits at
    ``\\r\\n`` only, which event streams need not use. geventhttpclient's response (which
    FastResponse keeps in ``_response`` and uses in its own ``iter_content``) has
    ``readline(sep)``. This is the only private attribute used.
    """
    return getattr(response, "_response", None)


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
        """Play the next conversation to its end (or its first failure, or the test's stop)."""
        if _stopping():
            time.sleep(ERROR_PAUSE_S)  # the runner is stopping this user
            return
        conversation = next(RUN.conversations)
        history: list[dict[str, Any]] = []
        for index, record in enumerate(conversation.turns):
            if index > 0 and record.think_s > 0:
                time.sleep(record.think_s)
            if _stopping():
                return
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
        settings = RUN.settings
        body = request_body(
            record, messages, settings.model, settings.max_tokens, settings.overrides
        )
        path = "/chat/completions" if messages is not None else "/completions"
        headers = dict(self.headers)
        if settings.session_header:
            headers[settings.session_header] = conversation_id
        sent = time.perf_counter()
        # Closed loop: the request is due the moment it is sent.
        at = sent - RUN.origin
        sample = Sample(conversation_id, record.turn, due_s=at, sent_s=at, target=self.base_url)
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
                if sample.ok:
                    response.success()
                else:
                    response.failure(sample.error)
        except Exception as e:  # the connection failed in a way Locust did not catch
            if _is_timeout(e):
                cause = "timeout"
            else:
                cause = "connect" if sample.status is None else "stream"
            sample.fail(cause, f"{type(e).__name__}: {e}")
        except BaseException:  # GreenletExit: the runner stopped this user mid-request
            if sample.ok and recorder.done:
                self._record(sample, sent)  # killed after [DONE]: the reply was complete
            else:
                sample.fail(UNFINISHED, "unfinished: the test stopped")
                sample.e2e_s = time.perf_counter() - sent  # its age: a lower bound
                RUN.samples.append(sample)  # no Locust row: Locust has no such outcome
            raise
        self._record(sample, sent)
        return recorder.reply if sample.ok else None

    def _record(self, sample: Sample, sent: float) -> None:
        if sample.e2e_s is None:
            sample.e2e_s = time.perf_counter() - sent
        RUN.samples.append(sample)
        self._report(sample)

    def _read(self, response: Any, sample: Sample, recorder: StreamRecorder) -> None:
        """Read the event stream into the sample, line by line as it arrives."""
        sample.status = response.status_code or None
        headers = response.headers or {}
        sample.endpoint = headers.get(ENDPOINT_HEADER)
        sample.pod = headers.get(POD_HEADER)
        if sample.status is None:
            error = getattr(response, "error", None)  # ErrorResponse.error: why no response
            cause = "timeout" if _is_timeout(error) else "connect"
            sample.fail(cause, f"{type(error).__name__}: {error}" if error else "no response")
            return
        if sample.status != 200:
            try:
                text = response.content or b""
            except Exception:  # the body could not be read; the status says enough
                text = b""
            sample.fail("http", http_error(sample.status, text))
            return
        reader = _body_reader(response)
        if reader is None:
            sample.fail("stream", "no response body to read")
            return
        try:
            # readline() hands back each line as soon as it is complete.
            while not recorder.done and sample.ok:
                line = reader.readline(b"\n")
                if not line:
                    break
                recorder.feed(line, time.perf_counter())
        except Exception as e:  # socket timeouts, resets, parse errors mid-stream
            cause = "timeout" if _is_timeout(e) else "stream"
            sample.fail(cause, f"stream broken: {type(e).__name__}: {e}")
        if sample.ok:
            recorder.finish()
        if recorder.done and sample.ok:
            sample.e2e_s = time.perf_counter() - recorder.due  # to [DONE]
            # Read the end of the body (the last chunk after [DONE]): a response left unfinished
            # closes its connection, so the next request would pay a new connect and the
            # server would log a client disconnect (balancer: code 499) for a complete reply.
            # The reply is complete either way, so a failure here only loses the connection.
            with contextlib.suppress(Exception):
                response.read()

    def _report(self, sample: Sample) -> None:
        """The TTFT row, one ITL row per gap, and the E2E row."""
        fire = self.environment.events.request.fire
        tokens = sample.output_tokens
        if sample.ok:
            if sample.ttft_s is not None:
                fire(
                    request_type=SSE,
                    name="TTFT",
                    response_time=sample.ttft_s * 1000,
                    response_length=tokens,
                    exception=None,
                    context={},
                )
            for gap in sample.itl_s:
                fire(
                    request_type=SSE,
                    name="ITL",
                    response_time=gap * 1000,
                    response_length=0,
                    exception=None,
                    context={},
                )
        fire(
            request_type=SSE,
            name="E2E",
            response_time=(sample.e2e_s or 0.0) * 1000,
            response_length=tokens,
            exception=None if sample.ok else RuntimeError(sample.error),
            context={},
        )


if __name__ == "__main__":
    from locust import run_single_user

    ChatUser.host = os.environ.get("LOCUST_HOST", "http://127.0.0.1:8000")
    run_single_user(ChatUser)
