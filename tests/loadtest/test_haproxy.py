"""HAProxy's configuration in both modes (the benchmark's and the comparison's), its binary."""

from __future__ import annotations

import resource
import stat
import subprocess
from pathlib import Path

import pytest

from loadtest import haproxy, procs


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_session_header_mode_hashes_the_header_over_every_pod() -> None:
    """The comparison's HAProxy binds to 127.0.0.1, hashes x-session-id consistently with
    the load bound in percent, and lists every pod by address, without the scheme."""
    text = haproxy.config(["http://127.0.0.1:8001", "http://127.0.0.1:8002"], port=18081,
                          balance=haproxy.balance_header("x-session-id"), load_factor=1.25)
    lines = _lines(text)
    assert "bind 127.0.0.1:18081" in lines
    assert "balance hdr(x-session-id)" in lines
    assert "hash-type consistent" in lines
    assert "hash-balance-factor 125" in lines
    assert "server upstream0 127.0.0.1:8001 maxconn 4000" in lines
    assert "server upstream1 127.0.0.1:8002 maxconn 4000" in lines
    assert "http://" not in text


def test_uri_mode_differs_only_in_the_balance_line() -> None:
    """The benchmark's HAProxy hashes the URI; everything else is the same configuration."""
    servers = ["127.0.0.1:9000"]
    by_uri = haproxy.config(servers, port=1, balance=haproxy.BALANCE_URI, load_factor=1.5)
    by_header = haproxy.config(servers, port=1, balance=haproxy.balance_header("x"),
                               load_factor=1.5)
    assert "balance uri" in _lines(by_uri)
    assert "hash-balance-factor 150" in _lines(by_uri)
    changed = set(_lines(by_uri)) ^ set(_lines(by_header))
    assert changed == {"balance uri", "balance hdr(x)"}


def test_maxconn_is_one_thread_and_the_same_everywhere() -> None:
    """One thread (balancer is one event loop); the connection cap at every level, so
    HAProxy never queues where balancer would forward."""
    lines = _lines(haproxy.config(["127.0.0.1:1"], port=2, balance="uri", load_factor=1.25,
                                  maxconn=321))
    assert "nbthread 1" in lines
    assert lines.count("maxconn 321") == 2  # global and frontend
    assert "server upstream0 127.0.0.1:1 maxconn 321" in lines
    assert "option http-no-delay" in lines


@pytest.mark.parametrize(("soft", "expected"), [
    (resource.RLIM_INFINITY, 4000),
    (1_048_576, 4000),
    (1024, (1024 - 64) // 2),
    (100, 64),
])
def test_maxconn_fits_the_open_files_limit(monkeypatch: pytest.MonkeyPatch, soft: int,
                                          expected: int) -> None:
    """Two descriptors per proxied connection, some spare, never below 64."""
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, resource.RLIM_INFINITY))
    assert haproxy.maxconn_within_fd_limit() == expected


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_looks_in_sbin_which_is_often_not_on_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HAProxy installs into sbin; it is found there with an ordinary PATH."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    binary = _executable(sbin / "haproxy")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(procs, "SBIN_DIRS", (str(sbin),))
    assert haproxy.find() == str(binary)
    assert haproxy.find(str(binary)) == str(binary)
    assert haproxy.find(str(tmp_path / "missing")) is None


def test_argv_runs_in_the_foreground_with_the_file() -> None:
    assert haproxy.argv("haproxy", Path("/tmp/h.cfg")) == ["haproxy", "-db", "-f", "/tmp/h.cfg"]


@pytest.mark.skipif(haproxy.find() is None, reason="haproxy is not installed")
@pytest.mark.parametrize("balance", [haproxy.BALANCE_URI, haproxy.balance_header("x-session-id")])
def test_haproxy_itself_accepts_the_configuration(tmp_path: Path, balance: str) -> None:
    """``haproxy -c`` checks both modes' configuration as HAProxy will read it."""
    binary = haproxy.find()
    assert binary is not None
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy.config(["127.0.0.1:8001", "127.0.0.1:8002"], port=18081,
                                     balance=balance, load_factor=1.25,
                                     maxconn=haproxy.maxconn_within_fd_limit()))
    done = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
