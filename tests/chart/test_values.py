"""The chart's values: `helm lint --strict` passes with the defaults and every ci/ file, the
schema rejects wrong types and unknown keys, every value is documented, and the `config`
schema and the chart's version follow the package."""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer import __version__
from balancer import config as settings
from tests.chart.helm import CHART, CI_VALUES, KUBERNETES_VERSION, ROOT, run_helm

sys.path.insert(0, str(ROOT / "scripts"))
import chart_readme
import chart_schema

SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def lint(*args: str) -> tuple[int, str]:
    result = run_helm("lint", "--strict", str(CHART), "--kube-version", KUBERNETES_VERSION,
                      *args)
    return result.returncode, result.stdout + result.stderr


def test_the_chart_lints_strictly_with_its_default_values() -> None:
    """`helm lint --strict` with values.yaml alone finds nothing."""
    code, output = lint()
    assert code == 0, output


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.name)
def test_the_chart_lints_strictly_with_every_ci_values_file(path: Path) -> None:
    """`helm lint --strict -f ci/<file>` finds nothing for each file CI renders."""
    code, output = lint("--values", str(path))
    assert code == 0, output


POOL = {"name": "llama", "kubernetes": {"service": "vllm", "port": "http"}}
BAD_VALUES = {
    "a string where a count goes": ({"replicaCount": "two"}, "/replicaCount"),
    "an unknown top-level key": ({"replicas": 3}, "replicas"),
    "an unknown key in image": ({"image": {"sha": "sha256:0"}}, "/image"),
    "a digest that is not one": ({"image": {"digest": "latest"}}, "/image/digest"),
    "an HTTPRoute parent without a name": (
        {"httpRoute": {"enabled": True, "parentRefs": [{"namespace": "gw"}]}},
        "/httpRoute/parentRefs/0"),
    "an unknown key in a probe": ({"probes": {"liveness": {"period": 3}}}, "/probes/liveness"),
    "a volume mount without its path": ({"extraVolumeMounts": [{"name": "ca"}]},
                                        "/extraVolumeMounts/0"),
    "a pull policy that does not exist": ({"image": {"pullPolicy": "Sometimes"}},
                                          "/image/pullPolicy"),
    "an unknown mode": ({"mode": "daemonset"}, "/mode"),
    "a misspelt config key": ({"config": {"routing": {"load_facto": 2}}}, "/config/routing"),
    "an unknown config section": ({"config": {"router": {"strategy": "chwbl"}}}, "/config"),
    "a config port given as a string": ({"config": {"server": {"port": "80"}}},
                                        "/config/server/port"),
    "a strategy that does not exist": ({"config": {"routing": {"strategy": "fastest"}}},
                                       "/config/routing/strategy"),
    "a load factor that is not a number": ({"config": {"routing": {"load_factor": "high"}}},
                                           "/config/routing/load_factor"),
    "an unknown key in a pool": ({"config": {"pools": [{**POOL, "weight": 2}]}},
                                 "/config/pools/0"),
    "an unknown key in a pool's kubernetes": (
        {"config": {"pools": [{"name": "a", "kubernetes": {"service": "vllm", "port": 80,
                                                           "svc": "vllm"}}]}},
        "/config/pools/0/kubernetes"),
    "a pool's kubernetes without its service": (
        {"config": {"pools": [{"name": "a", "kubernetes": {"port": 80}}]}},
        "/config/pools/0/kubernetes"),
}


@pytest.mark.parametrize("values,where", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_make_helm_lint_fail_naming_the_key(values: dict[str, Any], where: str,
                                                       tmp_path: Path) -> None:
    """Each wrong type or unknown key fails `helm lint` with the offending path in the
    message."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    code, output = lint("--values", str(path))
    assert code != 0
    assert where in output, output


def test_the_config_schema_is_the_one_generated_from_balancer_config() -> None:
    """values.schema.json's `config` is what scripts/chart_schema.py derives from
    balancer.config; after a change there, run that script."""
    committed = (CHART / "values.schema.json").read_text()
    assert committed == chart_schema.render(json.loads(committed)), (
        "helm/balancer/values.schema.json is out of date: run "
        "`.venv/bin/python scripts/chart_schema.py`")


def test_the_config_schema_knows_every_section_and_key_of_balancer_config() -> None:
    """Every section and key of balancer.config is in the schema, typed, and nothing else is
    allowed beside them."""
    config = SCHEMA["properties"]["config"]
    assert config["additionalProperties"] is False
    assert set(config["properties"]) == {
        f.name for f in dataclasses.fields(settings.Settings)}
    routing = config["properties"]["routing"]
    assert routing["additionalProperties"] is False
    assert routing["properties"]["load_factor"]["type"] == "number"
    assert routing["properties"]["strategy"]["enum"] == [s.value for s in settings.Strategy]
    pool = config["properties"]["pools"]["items"]
    assert pool["additionalProperties"] is False
    kubernetes = pool["properties"]["kubernetes"]["anyOf"][0]
    assert kubernetes["required"] == ["service", "port"]


def _key_lines(text: str) -> dict[str, int]:
    """Dotted path of every mapping key in values.yaml → its line number (list items and the
    free-form contents of `config` and object defaults are left out by the caller)."""
    return {path: number for number, path in chart_readme.key_paths(text)}


def _leaf_paths(schema: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, sub in schema["properties"].items():
        path = f"{prefix}{name}"
        if name in {"config", "global"}:
            continue
        if "properties" in sub:
            out.extend(_leaf_paths(sub, f"{path}."))
        else:
            out.append(path)
    return out


def _comment_above(lines: list[str], number: int) -> list[str]:
    """The comment lines right above line ``number``."""
    above = []
    for line in reversed(lines[:number]):
        if not line.lstrip().startswith("#"):
            break
        above.insert(0, line.strip())
    return above


def test_every_value_is_documented_with_a_helm_docs_comment() -> None:
    """Every value in the schema sits in values.yaml under a comment block opening with
    `# --`."""
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    keys = _key_lines(text)
    undocumented = []
    for path in [*_leaf_paths(SCHEMA), "config"]:
        assert path in keys, f"{path} is in the schema but not in values.yaml"
        comment = _comment_above(lines, keys[path])
        if not comment or not comment[0].startswith("# --"):
            undocumented.append(path)
    assert undocumented == []


def test_the_chart_version_follows_the_package_version() -> None:
    """Chart.yaml's version and appVersion are pyproject.toml's version."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == chart["appVersion"] == package == __version__
