"""Gateway mode rendered by the real helm: the objects, their RBAC scope, probes, security,
drain timing, labels and names, and a configuration balancer accepts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from balancer.cli import main
from balancer.config import DrainSettings
from tests.chart.helm import (
    CHART,
    CI_VALUES,
    KUBERNETES_VERSION,
    NAMESPACE,
    by_kind,
    config_of,
    one,
    render,
    run_helm,
    values_file,
)

CHART_VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
ENDPOINTSLICE_RULES = [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                        "verbs": ["get", "list", "watch"]}]
# Prometheus Operator and Gateway API objects have no schema in kubernetes-validate.
CRDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
        "HTTPRoute": "gateway.networking.k8s.io/v1"}
VALUE_SETS = {"defaults": (), **{p.stem: values_file(p.name) for p in CI_VALUES}}


def pod_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def balancer_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_of(docs)["containers"]
    return container


@pytest.mark.parametrize("args", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_passes_the_kubernetes_schema(args: tuple[str, ...]) -> None:
    """Every object of every values set passes the Kubernetes 1.34 schemas (strict)."""
    docs = render(*args)
    assert docs
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == CRDS[doc["kind"]]
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("args", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_the_rendered_configuration_passes_check_config(args: tuple[str, ...],
                                                       tmp_path: Path, capsys) -> None:
    """The ConfigMap's balancer.yaml is accepted by `balancer check-config`, which reads back
    the same settings."""
    config = config_of(render(*args))
    path = tmp_path / "balancer.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check-config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for section, values in config.items():
        if section == "pools":
            assert [p["name"] for p in printed["pools"]] == [p["name"] for p in values]
            continue
        assert {k: printed[section][k] for k in values} == values


def test_the_default_config_map_holds_the_config_value() -> None:
    """With default values the configuration file is values.yaml's `config`, key for key."""
    assert config_of(render()) == CHART_VALUES["config"]


def test_the_defaults_render_the_gateway_objects() -> None:
    """Gateway mode renders a Deployment, its Service, ServiceAccount, RBAC, ConfigMap and
    PodDisruptionBudget, and nothing optional."""
    kinds = sorted(d["kind"] for d in render())
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Role", "RoleBinding",
                     "Service", "ServiceAccount"]


def test_balancer_may_only_read_endpointslices_in_the_watched_namespace() -> None:
    """One Role in the release namespace (pools without a namespace watch balancer's own),
    get/list/watch on endpointslices only, bound to the pod's service account."""
    docs = render()
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["rules"] == ENDPOINTSLICE_RULES
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": NAMESPACE,
                                    "name": pod_of(docs)["serviceAccountName"]}]
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")


def test_pools_in_two_namespaces_get_a_role_in_each() -> None:
    """A pool in namespace `models` and one in the release namespace: a Role and RoleBinding
    in each, and still no ClusterRole."""
    docs = render(*values_file("everything-values.yaml"))
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    assert sorted(roles) == ["llm", "models"]
    assert all(r["rules"] == ENDPOINTSLICE_RULES for r in roles.values())
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["llm", "models"]
    assert all(b["subjects"][0]["namespace"] == NAMESPACE for b in bindings)
    assert not by_kind(docs, "ClusterRole")


def test_a_cluster_role_only_when_asked_for() -> None:
    """rbac.clusterWide: one ClusterRole with the same single rule and its binding, no
    Role."""
    docs = render(*values_file("cluster-wide-values.yaml"))
    assert one(docs, "ClusterRole")["rules"] == ENDPOINTSLICE_RULES
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(docs, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod_of(docs)["serviceAccountName"]
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")


def test_static_endpoints_need_no_rbac_and_no_token() -> None:
    """A pool with fixed URLs: no Role, and no service-account token in the pod."""
    docs = render(*values_file("static-endpoints-values.yaml"))
    assert not by_kind(docs, "Role") and not by_kind(docs, "ClusterRole")
    assert pod_of(docs)["automountServiceAccountToken"] is False


def test_the_token_is_mounted_only_by_the_pod_that_needs_it() -> None:
    """The ServiceAccount never automounts its token; the pod does, for discovery."""
    docs = render()
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod_of(docs)["automountServiceAccountToken"] is True


@pytest.mark.parametrize("args,admin", [((), 9090),
                                        (values_file("everything-values.yaml"), 9091)],
                         ids=["defaults", "other ports"])
def test_probes_hit_healthz_and_readyz_on_the_configured_admin_port(args: tuple[str, ...],
                                                                    admin: int) -> None:
    """Startup and liveness on /healthz, readiness on /readyz, through the named port
    `admin`, which is config.server.admin_port; `http` is config.server.port."""
    docs = render(*args)
    container = balancer_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = config_of(docs)["server"]
    assert ports == {"http": config["port"], "admin": config["admin_port"]}
    assert ports["admin"] == admin
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["startupProbe"]["periodSeconds"] == 1
    assert "env" not in container or not any(
        e["name"].startswith("BALANCER_SERVER_") and e["name"].endswith("HOST")
        for e in container["env"])  # the gateway listens where config.server.host says
    assert container["args"] == ["serve", "--config", "/etc/balancer/balancer.yaml"]


def test_the_pod_and_container_are_locked_down() -> None:
    """Non-root, read-only root filesystem, no privilege escalation, every capability dropped,
    seccomp RuntimeDefault, and no service links."""
    docs = render()
    pod = pod_of(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False
    security = balancer_container(docs)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"] for m in balancer_container(docs)["volumeMounts"]}
    assert mounts == {"/etc/balancer", "/tmp"}


DRAIN = DrainSettings()


@pytest.mark.parametrize("args,grace", [
    ((), 5 + math.ceil(DRAIN.delay + DRAIN.timeout) + 10),
    (("--set", "config.drain.delay=0", "--set", "config.drain.timeout=30",
      "--set", "preStopSleepSeconds=2"), 2 + 30 + 10),
    (("--set", "preStopSleepSeconds=0"), math.ceil(DRAIN.delay + DRAIN.timeout) + 10),
    (values_file("everything-values.yaml"), 150),
], ids=["balancer's drain defaults", "drain values", "no preStop hook", "explicit"])
def test_the_grace_period_covers_the_prestop_sleep_and_the_drain(args: tuple[str, ...],
                                                                 grace: int) -> None:
    """terminationGracePeriodSeconds is the preStop sleep + config.drain.delay +
    config.drain.timeout (balancer's defaults when not set) + 10 s, unless given."""
    docs = render(*args)
    container = balancer_container(docs)
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    config = config_of(docs).get("drain", {})
    drain = config.get("delay", DRAIN.delay) + config.get("timeout", DRAIN.timeout)
    assert pod_of(docs)["terminationGracePeriodSeconds"] == grace >= sleep + drain


def test_a_grace_period_shorter_than_the_drain_is_refused() -> None:
    """A grace period that would SIGKILL balancer mid-drain fails the render with the sum it
    needs."""
    result = run_helm("template", "balancer", str(CHART),
                      "--set", "terminationGracePeriodSeconds=60")
    assert result.returncode != 0
    needed = 5 + math.ceil(DRAIN.delay + DRAIN.timeout)
    assert "must be at least preStopSleepSeconds + config.drain.delay" in result.stderr
    assert f"({needed})" in result.stderr


def test_a_config_change_rolls_the_pods_and_nothing_else_does() -> None:
    """The pod template's checksum follows the configuration and ignores other values."""
    def checksum(*args: str) -> str:
        template = one(render(*args), "Deployment")["spec"]["template"]
        annotation: str = template["metadata"]["annotations"]["checksum/config"]
        return annotation

    base = checksum()
    assert checksum("--set", "config.routing.load_factor=2") != base
    assert checksum("--set", "replicaCount=5") == base


def test_selector_labels_are_a_stable_subset_of_the_labels() -> None:
    """Selectors carry only name and instance (they are immutable); the Service, the
    disruption budget and the spread constraints select exactly the pods. The pod template
    has no helm.sh/chart label (the Deployment has), so a chart bump alone rolls no pod."""
    docs = render()
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "balancer",
                        "app.kubernetes.io/instance": "balancer"}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert "app.kubernetes.io/version" in labels
    assert "helm.sh/chart" not in labels
    assert "helm.sh/chart" in deployment["metadata"]["labels"]
    assert one(docs, "Service")["spec"]["selector"] == selector
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"] == {"matchLabels": selector}
    for spread in pod_of(docs)["topologySpreadConstraints"]:
        assert spread["labelSelector"] == {"matchLabels": selector}


def test_the_service_exposes_only_the_proxy() -> None:
    """The Service's one port is the proxy's; /metrics and /debug stay off it."""
    (port,) = one(render(), "Service")["spec"]["ports"]
    assert port == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}


@pytest.mark.parametrize("name", ["x" * 70, "a-" * 40])
def test_every_name_and_label_fits_in_63_characters(name: str) -> None:
    """With a 70+ character fullnameOverride, every object name and label value is cut to 63
    characters without a trailing dash, and the names stay distinct."""
    for args in (values_file("everything-values.yaml"), values_file("cluster-wide-values.yaml")):
        docs = render(*args, "--set", f"fullnameOverride={name}", "--set",
                      f"nameOverride={name}")
        names = set()
        for doc in docs:
            metadata = doc["metadata"]
            assert len(metadata["name"]) <= 63 and not metadata["name"].endswith("-")
            assert all(len(v) <= 63 for v in metadata.get("labels", {}).values())
            names.add((doc["kind"], metadata.get("namespace"), metadata["name"]))
        assert len(names) == len(docs)


def test_the_empty_pool_alert_watches_pool_readiness_and_can_be_left_out() -> None:
    """Readiness does not fail for an empty pool, so the alert is where it shows: on
    ``balancer_pool_ready`` (a series for every pool, 0 when empty) after
    ``emptyPoolMinutes``; 0 leaves it out (pools that scale to zero on purpose)."""
    enabled = ("--set", "metrics.prometheusRule.enabled=true")
    rules = one(render(*enabled), "PrometheusRule")["spec"]["groups"][0]["rules"]
    (alert,) = [r for r in rules if r["alert"] == "BalancerNoRoutableEndpoints"]
    assert alert["expr"].startswith("max by (pool) (balancer_pool_ready{")
    assert alert["expr"].endswith("== 0") and alert["for"] == "5m"
    rules = one(render(*enabled, "--set", "metrics.prometheusRule.emptyPoolMinutes=0"),
                "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert "BalancerNoRoutableEndpoints" not in {r["alert"] for r in rules}


def test_everything_enabled_renders_every_optional_object() -> None:
    """Autoscaler, ServiceMonitor with its metrics Service, PrometheusRule and NetworkPolicy,
    each pointing at the gateway."""
    docs = render(*values_file("everything-values.yaml"))
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "replicas" not in deployment["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (metrics_service,) = [s for s in by_kind(docs, "Service")
                          if s["metadata"]["labels"].items()
                          >= monitor["spec"]["selector"]["matchLabels"].items()]
    assert metrics_service["spec"]["ports"][0]["port"] == 9091
    assert monitor["spec"]["endpoints"][0]["port"] == metrics_service["spec"]["ports"][0]["name"]
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"BalancerNoRoutableEndpoints", "BalancerDiscoveryStale",
                                          "BalancerUpstreamErrors", "BalancerFallbackRoutes"}
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": selector}
    assert [r["ports"][0]["port"] for r in policy["spec"]["ingress"]] == ["http", "admin"]
    pod = pod_of(docs)
    assert pod["priorityClassName"] == "high"
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    assert len(pod["topologySpreadConstraints"]) == 2
    assert balancer_container(docs)["env"] == [{"name": "BALANCER_SERVER_LOG_LEVEL",
                                                "value": "debug"}]


@pytest.mark.parametrize("policy", [None, "IfHealthyBudget"])
def test_the_disruption_budget_lets_unready_pods_be_evicted(policy: str | None) -> None:
    """`unhealthyPodEvictionPolicy: AlwaysAllow` by default: a replica that is not ready
    serves nothing, and must not hold up a node drain while the budget is used up."""
    args = () if policy is None else ("--set",
                                      f"podDisruptionBudget.unhealthyPodEvictionPolicy={policy}")
    budget = one(render(*args), "PodDisruptionBudget")
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == (policy or "AlwaysAllow")
    kubernetes_validate.validate(budget, KUBERNETES_VERSION, strict=True)
