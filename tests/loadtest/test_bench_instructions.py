"""The instruction-count benchmark's own logic: reading callgrind's total, the table, what it
says without valgrind, and the upstream double's whole streams it measures with. (Running it
takes minutes under valgrind: ``make bench-instructions``.)"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import RawTestServer

from loadtest import bench_instructions
from loadtest.bench_instructions import callgrind_total, chat_body, render
from loadtest.bench_upstream import CHAT_PATH, DEFAULT_MODEL, Upstream, stream_events

# The head of a callgrind output file, as valgrind 3.19 writes it.
CALLGRIND_HEAD = b"""# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  python -m balancer serve
part: 1

positions: line
events: Ir
summary: 1736996810

fl=(1) ???
"""


def test_the_total_is_the_summary_line(tmp_path: Path) -> None:
    path = tmp_path / "callgrind.out"
    path.write_bytes(CALLGRIND_HEAD)
    assert callgrind_total(path) == 1736996810


def test_a_file_without_a_total_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "callgrind.out"
    path.write_bytes(b"# callgrind format\nevents: Ir\n")
    with pytest.raises(RuntimeError, match="no instruction total"):
        callgrind_total(path)


def test_the_table_gives_the_ratio_to_the_baseline() -> None:
    """This checkout's cost over the baseline's, per mode."""
    results = {"plain": {"checkout": 570_000.0, "f55d238": 560_000.0},
               "stream": {"checkout": 640_000.0, "f55d238": 640_000.0}}
    lines = render(results, ["checkout", "f55d238"], 2000).splitlines()
    assert lines[1].split() == ["mode", "checkout", "f55d238", "ratio"]
    assert lines[2].split() == ["plain", "570,000", "560,000", "1.018"]
    assert lines[3].split() == ["stream", "640,000", "640,000", "1.000"]


def test_without_a_baseline_there_is_no_ratio() -> None:
    lines = render({"plain": {"checkout": 570_000.4}}, ["checkout"], 10).splitlines()
    assert lines[1].split() == ["mode", "checkout"]
    assert lines[2].split() == ["plain", "570,000"]


def test_the_streamed_body_asks_for_a_stream() -> None:
    assert b'"stream": true' in chat_body(True)
    assert b'"stream": false' in chat_body(False)


def test_without_valgrind_it_says_so_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_instructions, "find_executable", lambda name: None)
    assert bench_instructions.main(["--requests", "1"]) == 2
    assert "valgrind not found" in capsys.readouterr().err


async def test_a_whole_stream_is_one_body_with_its_length() -> None:
    """``--whole-streams``: the same events, sent in one piece with a Content-Length, so a
    proxy reads each stream in one go however the processes are scheduled."""
    server = RawTestServer(Upstream(DEFAULT_MODEL, 3, whole_streams=True), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session, \
                session.post(server.make_url(CHAT_PATH), data=chat_body(True)) as response:
            body = await response.read()
            assert response.headers["Content-Type"] == "text/event-stream"
            assert response.content_length == len(body)
    finally:
        await server.close()
    assert body == b"".join(stream_events(DEFAULT_MODEL, 3))
    assert body.endswith(b"data: [DONE]\n\n")
