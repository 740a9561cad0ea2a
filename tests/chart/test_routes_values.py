"""Routes through the chart: `config.routes` is checked by the values schema and the rendered
file loads as balancer reads it."""

from __future__ import annotations

import json

import pytest

from balancer.config import load
from tests.chart.helm import CHART, config_of, render, run_helm

POOLS = {"pools": [
    {"name": "v2", "models": ["llama-v2"], "kubernetes": {"service": "vllm-v2", "port": 8000}},
    {"name": "v3", "models": ["llama-v3"], "kubernetes": {"service": "vllm-v3", "port": 8000}},
    {"name": "hosted", "models": ["llama-70b"], "endpoints": ["https://api.provider.example"],
     "headers": [{"name": "Authorization", "value_from_env": "PROVIDER_KEY",
                  "prefix": "Bearer "}],
     "health": {"active": False}, "load_poll": False},
]}


def values(tmp_path, routes: list[dict[str, object]]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(json.dumps({"config": {**POOLS, "routes": routes}}))
    return str(path)


def test_a_canary_with_a_hosted_fallback_renders_and_loads(tmp_path) -> None:
    routes = [{"model": "chat", "backends": [{"pool": "v2", "weight": 95},
                                             {"pool": "v3", "weight": 5}],
               "fallbacks": ["hosted"]}]
    config = config_of(render("-f", values(tmp_path, routes)))
    assert config["routes"] == routes
    path = tmp_path / "balancer.yaml"
    path.write_text(json.dumps(config))
    settings = load(path, environ={"PROVIDER_KEY": "k"})
    route = settings.routes[0]
    assert [(b.pool, b.weight) for b in route.backends] == [("v2", 95.0), ("v3", 5.0)]
    assert [f.pool for f in route.fallbacks] == ["hosted"]


@pytest.mark.parametrize("route", [
    {"model": "chat", "backends": [{"pool": "v2", "wieght": 1}]},
    {"model": "chat", "backends": [{"pool": "v2"}], "fallbacks": [{"pool": "v3", "weight": 1}]},
    {"backends": ["v2"]},
])
def test_the_schema_refuses_a_misspelt_route(tmp_path, route) -> None:
    result = run_helm("template", "t", str(CHART), "-f", values(tmp_path, [route]))
    assert result.returncode != 0 and "routes" in result.stderr
