"""Process supervision shared by the load tests: children are logged, waited for, and stopped.

Every child here is a small Python program (or ``python -m http.server``) on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.procs import (
    HOST,
    REPO_ROOT,
    Services,
    StartupError,
    free_port,
    wait_for_lines,
    wait_ready,
)

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
STUBBORN = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ignoring SIGTERM', flush=True); time.sleep(60)"]


def _gone(pid: int) -> bool:
    """The process no longer runs (reaped, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind((HOST, port))


async def test_a_child_logs_to_its_file_and_leaving_the_block_stops_it(tmp_path: Path) -> None:
    """Output lands in NAME.log; ``async with`` stops every child still running."""
    async with Services(tmp_path) as services:
        child = services.start("sleeper", SLEEPER)
        (match,) = await wait_for_lines(child, r"^(up)$", 1)
        assert match.group(1) == "up"
        assert (tmp_path / "sleeper.log").read_text() == "up\n"
    assert child.exit_code() == -signal.SIGTERM


def test_children_stop_newest_first_also_when_the_block_fails(tmp_path: Path) -> None:
    """An error inside ``with`` still stops everything, the last started first (a proxy
    before its upstreams)."""
    stopped: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), Services(tmp_path) as services:
        for name in ("upstream", "proxy"):
            child = services.start(name, SLEEPER)
            original = child.stop

            def stop(original=original, name=name) -> None:  # type: ignore[no-untyped-def]
                stopped.append(name)
                original()

            child.stop = stop  # type: ignore[method-assign]
        raise RuntimeError("boom")
    assert stopped == ["proxy", "upstream"]
    assert services.running == {}


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    services = Services(tmp_path)
    child = services.start("stubborn", STUBBORN)
    await wait_for_lines(child, "ignoring SIGTERM", 1)
    started = time.monotonic()
    child.stop(grace_s=0.3)
    assert child.exit_code() == -signal.SIGKILL
    assert time.monotonic() - started >= 0.3


def test_a_name_is_used_once(tmp_path: Path) -> None:
    with Services(tmp_path) as services:
        services.start("one", SLEEPER)
        with pytest.raises(ValueError, match="already running"):
            services.start("one", SLEEPER)


async def test_a_child_runs_where_and_with_what_it_is_told(tmp_path: Path) -> None:
    """``cwd`` picks the directory (another checkout, for a baseline), this one by default;
    ``env`` adds variables to the inherited environment."""
    where = [sys.executable, "-c",
             "import os; print(os.getcwd(), os.environ.get('BENCH_X'), 'PATH' in os.environ, "
             "flush=True)"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with Services(tmp_path) as services:
        here = services.start("here", where)
        there = services.start("there", where, cwd=elsewhere, env={"BENCH_X": "1"})
        (here_line,) = await wait_for_lines(here, r"^(.+)$", 1)
        (there_line,) = await wait_for_lines(there, r"^(.+)$", 1)
    assert here_line.group(1) == f"{REPO_ROOT} None True"
    assert there_line.group(1) == f"{elsewhere} 1 True"


async def test_wait_ready_returns_once_the_server_answers(tmp_path: Path) -> None:
    """A 404 counts as serving: the server is up, it just has no such page."""
    port = free_port()
    async with Services(tmp_path) as services:
        server = services.start("http", [sys.executable, "-m", "http.server", "--bind", HOST,
                                         str(port), "--directory", str(tmp_path)])
        await wait_ready(server, f"http://{HOST}:{port}/no-such-page", timeout_s=20)
        assert server.exit_code() is None


async def test_a_child_that_exits_at_start_fails_with_its_log(tmp_path: Path) -> None:
    """The error names the child and quotes its last words, without waiting out the timeout."""
    async with Services(tmp_path) as services:
        child = services.start("crasher", [sys.executable, "-c",
                                           "import sys; sys.exit('bad flag --nope')"])
        started = time.monotonic()
        with pytest.raises(StartupError, match=r"crasher exited with status 1(.|\n)*--nope"):
            await wait_ready(child, f"http://{HOST}:{free_port()}/", timeout_s=20)
        assert time.monotonic() - started < 10
        with pytest.raises(StartupError, match="crasher exited"):
            await wait_for_lines(child, "never", 1, timeout_s=20)


async def test_a_child_that_never_serves_times_out(tmp_path: Path) -> None:
    async with Services(tmp_path) as services:
        child = services.start("silent", SLEEPER)
        with pytest.raises(StartupError, match=r"silent not ready at .* after 0.3 s"):
            await wait_ready(child, f"http://{HOST}:{free_port()}/", timeout_s=0.3)
        with pytest.raises(StartupError, match="did not log 2 lines"):
            await wait_for_lines(child, "up", 2, timeout_s=0.3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_children_die_with_a_load_test_killed_by_sigkill(tmp_path: Path) -> None:
    """A load test killed outright (no cleanup runs) still leaves no server behind."""
    program = (
        "import sys, os, signal, time\n"
        "from pathlib import Path\n"
        "from loadtest.procs import Services\n"
        f"child = Services(Path({str(tmp_path)!r})).start('orphan', {SLEEPER!r})\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    parent = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=30, check=False, cwd=Path(__file__).resolve().parents[2],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve()
                                                                  .parents[2])})
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    orphan = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not _gone(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(orphan)
