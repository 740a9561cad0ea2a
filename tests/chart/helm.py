"""Shared helpers for the chart tests: the real helm binary, and renders cached per session.

helm comes from ``scripts/fetch_k8s_tools.py`` (``make test`` runs it first); without it the
chart tests are skipped with a message saying so. helm's own state stays under ``.cache/helm``.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "helm" / "balancer"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
HELM = ROOT / ".cache" / "bin" / "helm"
KUBERNETES_VERSION = "1.34.0"
RELEASE = "balancer"
NAMESPACE = "llm"
# Monitoring CRDs are optional in a cluster; the chart renders them only when asked.
API_VERSIONS = ("--api-versions", "monitoring.coreos.com/v1")


def helm_env() -> dict[str, str]:
    state = ROOT / ".cache" / "helm"
    return {**os.environ, "HELM_CONFIG_HOME": str(state / "config"),
            "HELM_CACHE_HOME": str(state / "cache"), "HELM_DATA_HOME": str(state / "data")}


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.skip("helm missing: run `.venv/bin/python scripts/fetch_k8s_tools.py` "
                    "(`make test` does)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60,
                          check=False, env=helm_env())


@functools.cache
def _template(args: tuple[str, ...], chart: Path) -> str:
    result = run_helm("template", RELEASE, str(chart), "--namespace", NAMESPACE,
                      "--kube-version", KUBERNETES_VERSION, *API_VERSIONS, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(*args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    """``helm template`` with these extra arguments, parsed (cached: callers must not mutate)."""
    return [d for d in yaml.safe_load_all(_template(args, chart)) if d]


def values_file(name: str) -> tuple[str, str]:
    return ("--values", str(CHART / "ci" / name))


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = by_kind(docs, kind)
    return found


def config_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The balancer configuration file the ConfigMap holds, parsed."""
    parsed: dict[str, Any] = yaml.safe_load(one(docs, "ConfigMap")["data"]["balancer.yaml"])
    return parsed
