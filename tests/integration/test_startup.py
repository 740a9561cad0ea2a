"""Failing at start: one line on stderr naming the problem, exit status 2, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from balancer import cli
from loadtest.procs import free_port

POOL = "pools:\n  - name: a\n    models: [m]\n    endpoints: ['http://127.0.0.1:1']\n"


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balancer", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("taken", ["port", "admin_port"])
def test_a_port_in_use_stops_serve_with_one_line(tmp_path: Path, taken: str):
    """Another process on either port: exit 2 and a line naming the address and setting."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        ports = {"port": free_port(), "admin_port": free_port(), taken: busy}
        config = tmp_path / "balancer.yaml"
        config.write_text(f"server: {{host: 127.0.0.1, port: {ports['port']}, "
                          f"admin_port: {ports['admin_port']}}}\n" + POOL)
        result = serve(config)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert f"127.0.0.1:{busy}" in line
    assert f"server.{taken}" in line
    assert "address already in use" in line


def test_a_kubeconfig_that_cannot_be_loaded_stops_serve_with_one_line(tmp_path: Path):
    """A pool on a Service with an unusable kubeconfig fails before listening."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("not: [a, kubeconfig")
    config = tmp_path / "balancer.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {free_port()}, admin_port: {free_port()}}}\n"
        f"kubernetes: {{kubeconfig: {kubeconfig}}}\n"
        "pools:\n  - name: a\n    models: [m]\n    kubernetes: {service: vllm, port: http}\n")
    result = serve(config)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert str(kubeconfig) in line
    assert "Kubernetes configuration" in line


def test_an_invalid_config_stops_serve_with_one_line(tmp_path: Path):
    """A YAML syntax error (whose message spans lines) is still one line."""
    config = tmp_path / "balancer.yaml"
    config.write_text(POOL + "routing: {strategy: [chwbl\n")
    result = serve(config)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert str(config) in line and "not valid YAML" in line


@pytest.mark.parametrize(("content", "extra", "fragment"), [
    (None, [], "cannot read configuration file"),
    (b"\xff\xfe" + POOL.encode(), [], "not UTF-8"),
    (POOL.encode() + b"routing: {load_factor: 0.5}\n", [], "routing.load_factor"),
    (POOL.encode(), ["--set", "routing.load_factor=[1"], "not valid YAML"),
    (POOL.encode(), ["--set", "server.trusted_proxies=10.0.0.1/8"],
     "server.trusted_proxies[0]"),
])
def test_check_config_reports_each_problem_in_one_line(tmp_path: Path, capsys, content,
                                                        extra, fragment):
    """Missing, non-UTF-8, invalid files and bad --set values: exit 2, one line."""
    config = tmp_path / "balancer.yaml"
    if content is not None:
        config.write_bytes(content)
    assert cli.main(["check-config", str(config), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert fragment in one_line(captured.err)
