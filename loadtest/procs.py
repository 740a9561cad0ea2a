"""The local servers a load test starts: free ports, child processes, waiting until they serve.

Every load test here (:mod:`loadtest.bench_proxy`, :mod:`loadtest.compare` and
:mod:`loadtest.sweep`, :mod:`loadtest.memory_soak`) runs its servers as child processes on
127.0.0.1, so one set of rules applies to all of them, and lives here once:

* **Ports are free ports**, never fixed ones: the machine may run other servers; and the
  open-files limit is raised first, since many connections need many descriptors.
* **No child outlives the run.** :class:`Services` stops what it started (SIGTERM, then SIGKILL,
  newest first) however the run ends; on Linux a child also gets SIGTERM when the load test
  itself dies, even by SIGKILL, so an interrupted benchmark leaves nothing listening.
* **Each child's output goes to its own log file**, whose tail is quoted when the child fails
  to start, so a failure says why.
* **Waiting is bounded** and stops early when the child has already exited.

Supervision is synchronous (:class:`subprocess.Popen`): starting a process never blocks, and a
benchmark that runs several event loops one after the other (one per measurement) needs its
servers to outlive each of them. Async code uses the same class as an ``async with`` context;
readiness checks are coroutines (they poll over HTTP) that sync code runs with
:func:`asyncio.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import aiohttp

__all__ = [
    "HOST",
    "REPO_ROOT",
    "STARTUP_TIMEOUT_S",
    "Service",
    "Services",
    "StartupError",
    "find_executable",
    "free_port",
    "raise_fd_limit",
    "wait_for_lines",
    "wait_ready",
]

HOST: Final = "127.0.0.1"
"""Where every server of a load test listens: nothing of it is reachable from outside."""
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
"""Children run here, so ``python -m balancer`` and ``python -m loadtest...`` import this
checkout whatever the caller's working directory."""
STARTUP_TIMEOUT_S: Final = 30.0
"""How long a server may take to serve after it was started: generous, for a busy 2-core
machine that is starting several Python processes at once."""
STOP_GRACE_S: Final = 5.0
"""How long a child may take to exit after SIGTERM before it is killed (balancer drains with
no delay in these runs, so it needs well under a second)."""
SBIN_DIRS: Final = ("/usr/local/sbin", "/usr/sbin", "/sbin")
"""Servers such as HAProxy install into sbin, which is often not on a normal user's PATH."""


def free_port(host: str = HOST) -> int:
    """An unused port: the machine may run other servers, so fixed ports are never assumed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> None:
    """Many concurrent connections need many descriptors; use what the hard limit allows.

    Called before any server starts: children inherit the limit, so the servers under test
    get it too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def find_executable(name: str) -> str | None:
    """``name`` on PATH, next to this interpreter (where pip puts a venv's scripts) or in the
    sbin directories; a path is checked as it is. None when it is nowhere."""
    search = os.pathsep.join([os.environ.get("PATH", ""), os.path.dirname(sys.executable),
                              *SBIN_DIRS])
    return shutil.which(name, path=search)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when its parent dies.

    libc is loaded here, in the parent: between fork and exec the child may only call what is
    already loaded (an import there can deadlock on a lock another thread held at the fork).
    None elsewhere, where the cleanup in :class:`Services` is all there is.

    Linux counts the *thread* that started the child as its parent, so children are started
    from the main thread (never from a worker thread that may end first).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def die_with_parent() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return die_with_parent


_DIE_WITH_PARENT: Final = _parent_death_signal()


class StartupError(RuntimeError):
    """A server exited or did not serve in time; the message quotes the end of its log."""


@dataclass
class Service:
    """One child process and the file its output (stdout and stderr) goes to."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.popen.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> list[str]:
        return self.log_text().splitlines()[-lines:]

    def log_lines(self) -> int:
        return len(self.log_text().splitlines())

    def failure(self, what: str) -> StartupError:
        """``what`` went wrong, with the end of the log, as the error to raise."""
        return StartupError(f"{self.name} {what}:\n  " + "\n  ".join(self.log_tail()))

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns once the process is reaped."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(grace_s)


class Services:
    """The processes one load test started; leaving the ``with`` (or ``async with``) block, or
    :meth:`stop_all`, stops every one still running, newest first, whatever happened, so a
    failed or interrupted run leaves nothing listening. Servers therefore stop before what
    they depend on (a proxy before its upstreams)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, Service] = {}

    def start(self, name: str, argv: Sequence[str], *, cwd: Path = REPO_ROOT,
              env: Mapping[str, str] | None = None) -> Service:
        """Start ``argv`` in its own session (a Ctrl-C in the terminal reaches only the load
        test, which then stops its children in order), output to ``LOG_DIR/NAME.log``.

        ``cwd`` is where it runs, so ``python -m`` imports from there: this checkout unless
        another one is measured (:mod:`loadtest.bench_instructions` runs a baseline's).
        ``env`` adds to (or overrides) the environment it inherits."""
        if name in self.running:
            raise ValueError(f"a service named {name!r} is already running")
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env={**os.environ, **env} if env else None, start_new_session=True,
                preexec_fn=_DIE_WITH_PARENT,
            )
        service = Service(name, list(argv), popen, log_path)
        self.running[name] = service
        return service

    def stop(self, name: str) -> None:
        service = self.running.pop(name, None)
        if service is not None:
            service.stop()

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)

    def __enter__(self) -> Services:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()

    async def __aenter__(self) -> Services:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        # In a thread: waiting for exits must not stall the event loop. Even if this task is
        # cancelled meanwhile, the thread runs on and the loop's shutdown waits for it.
        await asyncio.to_thread(self.stop_all)


async def wait_ready(service: Service, url: str, *,
                     timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers with a status below 500.

    Below 500, not just 200: a server that answers at all is up (a proxy's ``/`` may be a 404),
    while a readiness endpoint says "not yet" with a 503, as does a proxy whose upstreams do
    not answer yet. Raises :class:`StartupError` when the service exits or time runs out.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            code = service.exit_code()
            if code is not None:
                raise service.failure(f"exited with status {code} at start")
            try:
                async with session.get(url) as response:
                    await response.read()
                    if response.status < 500:
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            await asyncio.sleep(0.05)
    raise service.failure(f"not ready at {url} after {timeout_s:g} s ({last})")


async def wait_for_lines(service: Service, pattern: str, count: int, *,
                         timeout_s: float = STARTUP_TIMEOUT_S) -> list[re.Match[str]]:
    """Wait until ``count`` lines of the service's log match ``pattern``; the matches.

    For servers that choose their own ports and say so in their log (the simulated pods).
    """
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = service.exit_code()
        matches = [m for m in map(regex.search, service.log_text().splitlines()) if m]
        if len(matches) >= count:
            return matches
        if code is not None:
            raise service.failure(f"exited with status {code} at start")
        await asyncio.sleep(0.1)
    raise service.failure(f"did not log {count} lines like {pattern!r} in {timeout_s:g} s")
