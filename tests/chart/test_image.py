"""The container image, as far as it can be checked without a container engine: the
Dockerfile's shape, a build context with what it copies, and its entrypoint command run from
the wheel installed into a clean virtualenv, the way the build stage installs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from balancer import __version__
from loadtest.procs import free_port
from tests.chart.helm import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [line.split(None, 1) for line in DOCKERFILE.splitlines()
                if line and not line.startswith((" ", "#"))]
GLOBAL_ARGS = dict(args.split("=", 1) for op, args in
                   INSTRUCTIONS[:[op for op, _ in INSTRUCTIONS].index("FROM")] if op == "ARG")
STAGES = [args for op, args in INSTRUCTIONS if op == "FROM"]
CONFIG_PATH = "/etc/balancer/balancer.yaml"


def final_stage() -> list[tuple[str, str]]:
    start = max(i for i, (op, _) in enumerate(INSTRUCTIONS) if op == "FROM")
    return [(op, args) for op, args in INSTRUCTIONS[start:]]


def exec_form(op: str) -> list[str]:
    (args,) = [args for name, args in final_stage() if name == op]
    parsed: list[str] = json.loads(args)
    return parsed


def copied_sources() -> list[str]:
    """The build-context paths the Dockerfile copies (not those copied from a stage)."""
    sources = []
    for op, args in INSTRUCTIONS:
        if op == "COPY" and not args.startswith("--from"):
            sources.extend(args.split()[:-1])
    return sources


def test_the_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    """A build stage and a final stage on a slim Python base; the final stage copies only the
    virtualenv, runs as a numeric non-root user and has no compiler or package installs."""
    assert len(STAGES) == 2
    assert all(stage.split()[0] == "${BASE_IMAGE}" for stage in STAGES)
    assert GLOBAL_ARGS["BASE_IMAGE"].startswith("python:3.11-slim")
    final = final_stage()
    assert [args for op, args in final if op == "COPY"] == [
        "--from=build /opt/balancer /opt/balancer"]
    (user,) = [args for op, args in final if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert not [args for op, args in final if op == "RUN"]
    for tool in ("apt-get", "gcc", "build-essential"):
        assert tool not in DOCKERFILE


def test_the_base_image_is_a_build_argument_with_digest_pinning_documented() -> None:
    """Both stages use ``BASE_IMAGE``, pinned by tag by default (a digest cannot be looked up
    offline, and an invented one would not pull); the comments say how to pin the digest.
    A digest, when one is written in, must look like one."""
    base = GLOBAL_ARGS["BASE_IMAGE"]
    if "@" in base:
        assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base)
    assert "BASE_IMAGE=python:3.11-slim@sha256:" in DOCKERFILE
    assert "imagetools inspect" in DOCKERFILE


def test_the_image_carries_oci_labels_with_the_package_version() -> None:
    """title, description, source, licenses and version (a build argument defaulting to the
    package's version, so an image built without arguments is still labelled right)."""
    final = final_stage()
    args = dict(a.split("=", 1) for op, a in final if op == "ARG")
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+)="([^"]*)"', DOCKERFILE))
    assert set(labels) == {f"org.opencontainers.image.{k}" for k in
                           ("title", "description", "source", "licenses", "version")}
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == __version__
    assert labels["org.opencontainers.image.source"] == "${SOURCE_URL}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.description"] == project["description"]


def test_the_entrypoint_serves_a_mounted_config_file() -> None:
    """`python -m balancer serve` is the entrypoint, reading the file the chart mounts."""
    assert exec_form("ENTRYPOINT") == ["python", "-m", "balancer"]
    assert exec_form("CMD") == ["serve", "--config", CONFIG_PATH]


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore is an allow-list that lets in exactly the copied sources."""
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert set(copied_sources()) == allowed
    assert all((ROOT / source).exists() for source in allowed)


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the sources the Dockerfile copies, installed with its
    dependencies (from pip's cache or the index) into a virtualenv without the repository."""
    scratch = tmp_path_factory.mktemp("image")
    context = scratch / "src"
    context.mkdir()
    for source in copied_sources():
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, context / source,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, context / source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", str(scratch / "wheels"),
                    str(context)], check=True, timeout=120, capture_output=True)
    venv = scratch / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    (wheel,) = (scratch / "wheels").glob("balancer-*.whl")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", str(wheel)],
                   check=True, timeout=180, capture_output=True)
    return venv


def test_the_entrypoint_command_runs_from_the_installed_wheel(clean_venv: Path,
                                                              tmp_path: Path) -> None:
    """ENTRYPOINT + CMD, with the config file at a temporary path, serve /healthz from the
    clean virtualenv, and SIGTERM ends the process with status 0."""
    port, admin = free_port(), free_port()
    config = tmp_path / "balancer.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "admin_port": admin},
        "pools": [{"name": "llama", "models": ["m"], "endpoints": ["http://127.0.0.1:9"]}],
    }))
    command = [*exec_form("ENTRYPOINT"), *exec_form("CMD")]
    command = [str(config) if arg == CONFIG_PATH else arg for arg in command]
    env = {"PATH": f"{clean_venv / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    located = shutil.which(command[0], path=env["PATH"])
    assert located == str(clean_venv / "bin" / "python")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = get(f"http://127.0.0.1:{admin}/healthz")
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200, process.stdout.read() if process.poll() is not None else ""
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
