"""zonePreference: the balancer container learns its zone (downward API or a given value) and
prefers it, in the gateway and in the sidecar snippet."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate

from balancer.config import load
from tests.chart.helm import (
    CHART,
    KUBERNETES_VERSION,
    NAMESPACE,
    config_of,
    one,
    render,
    run_helm,
    values_file,
)

ZONE_LABEL = {"fieldRef": {"fieldPath": "metadata.labels['topology.kubernetes.io/zone']"}}


def gateway_env(*args: str) -> list[dict[str, Any]]:
    docs = render(*args)
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env: list[dict[str, Any]] = container.get("env", [])
    return env


def test_no_zone_variables_by_default() -> None:
    assert not [e for e in gateway_env() if e["name"].startswith("BALANCER_ROUTING_")]


def test_enabled_the_zone_comes_from_the_pods_topology_label() -> None:
    """BALANCER_ROUTING_PREFER_ZONE=true and BALANCER_ROUTING_ZONE from the pod's label; the
    Deployment still passes the Kubernetes schema."""
    env = gateway_env("--set", "zonePreference.enabled=true")
    assert env == [{"name": "BALANCER_ROUTING_PREFER_ZONE", "value": "true"},
                   {"name": "BALANCER_ROUTING_ZONE", "valueFrom": ZONE_LABEL}]
    docs = render("--set", "zonePreference.enabled=true")
    kubernetes_validate.validate(one(docs, "Deployment"), KUBERNETES_VERSION, strict=True)


def test_a_given_zone_is_set_as_is_and_balancer_accepts_it(tmp_path) -> None:
    """A release pinned to one zone names it; balancer loads the rendered file with the
    variables the container gets."""
    args = ("--set", "zonePreference.enabled=true", "--set", "zonePreference.zone=us-east-1a")
    env = {e["name"]: e["value"] for e in gateway_env(*args)}
    assert env == {"BALANCER_ROUTING_PREFER_ZONE": "true", "BALANCER_ROUTING_ZONE": "us-east-1a"}
    path = tmp_path / "balancer.yaml"
    path.write_text(json.dumps(config_of(render(*args))))
    routing = load(path, environ=env).routing
    assert (routing.zone, routing.prefer_zone) == ("us-east-1a", True)


def test_the_users_own_zone_variable_wins() -> None:
    """A BALANCER_ROUTING_ZONE in `env` replaces the chart's, never doubles it."""
    env = gateway_env("--set", "zonePreference.enabled=true",
                      "--set", "env[0].name=BALANCER_ROUTING_ZONE",
                      "--set", "env[0].value=eu-west-1b")
    assert [e for e in env if e["name"] == "BALANCER_ROUTING_ZONE"] == [
        {"name": "BALANCER_ROUTING_ZONE", "value": "eu-west-1b"}]


def test_the_sidecar_snippet_carries_the_zone_variables() -> None:
    result = run_helm("install", "balancer", str(CHART), "--namespace", NAMESPACE,
                      "--dry-run=client", "--output", "json",
                      *values_file("sidecar-values.yaml"),
                      "--set", "zonePreference.enabled=true")
    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["info"]["notes"]
    assert "BALANCER_ROUTING_PREFER_ZONE" in notes
    assert "topology.kubernetes.io/zone" in notes


def test_a_zone_that_is_no_label_value_is_refused_by_the_schema() -> None:
    result = run_helm("template", "balancer", str(CHART), "--set", "zonePreference.zone=a b")
    assert result.returncode != 0
    assert "zonePreference" in result.stderr
