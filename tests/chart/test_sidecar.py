"""Sidecar mode: the chart renders only RBAC and the ConfigMap, and the sidecar snippet (from
NOTES.txt, or the named templates in a parent chart) makes a valid pod with the app."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from balancer.config import DrainSettings, load
from tests.chart.helm import (
    CHART,
    KUBERNETES_VERSION,
    NAMESPACE,
    by_kind,
    config_of,
    one,
    render,
    run_helm,
    values_file,
)

SIDECAR = values_file("sidecar-values.yaml")
APP = {"name": "app", "image": "registry.example.com/chat-app:1.0",
       "env": [{"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8080/v1"}]}

PARENT_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: chat-app
spec:
  selector:
    matchLabels: {app: chat-app}
  template:
    metadata:
      labels: {app: chat-app}
    spec:
      serviceAccountName: chat-app
      enableServiceLinks: false
      terminationGracePeriodSeconds: 45
      initContainers:
        {{- include "balancer.sidecar.container" .Subcharts.balancer | nindent 8 }}
      containers:
        - name: app
          image: registry.example.com/chat-app:1.0
      volumes:
        {{- include "balancer.sidecar.volumes" .Subcharts.balancer | nindent 8 }}
"""


def notes(*args: str) -> str:
    """NOTES.txt as `helm install --dry-run=client` prints it (no cluster involved)."""
    result = run_helm("install", "balancer", str(CHART), "--namespace", NAMESPACE,
                      "--dry-run=client",
                      "--output", "json", *args)
    assert result.returncode == 0, result.stderr
    text: str = json.loads(result.stdout)["info"]["notes"]
    return text


def snippet(text: str) -> dict[str, Any]:
    """The pod-spec snippet in the sidecar NOTES, parsed."""
    lines = text.splitlines()
    start = lines.index("spec:")
    end = lines.index("", start)
    parsed: dict[str, Any] = yaml.safe_load("\n".join(lines[start:end]))["spec"]
    return parsed


def with_app(pod: dict[str, Any]) -> dict[str, Any]:
    """A Deployment of the app whose pod spec has the snippet merged in."""
    spec = {**pod, "containers": [*pod.get("containers", []), APP]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat-app"},
            "spec": {"selector": {"matchLabels": {"app": "chat-app"}},
                     "template": {"metadata": {"labels": {"app": "chat-app"}}, "spec": spec}}}


def test_sidecar_mode_renders_only_rbac_and_the_config_map() -> None:
    """No Deployment, Service or ServiceAccount: a ConfigMap, and a Role bound to the
    workload's service account."""
    docs = render(*SIDECAR)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Role", "RoleBinding"]
    binding = one(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-app",
                                    "namespace": NAMESPACE}]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_sidecar_mode_requires_the_workloads_service_account() -> None:
    """Without serviceAccount.name the render fails and says what to set."""
    result = run_helm("template", "balancer", str(CHART), "--set", "mode=sidecar")
    assert result.returncode != 0
    assert "set serviceAccount.name" in result.stderr


def test_the_notes_snippet_makes_a_valid_pod_with_a_native_sidecar() -> None:
    """The NOTES snippet, pasted into the app's Deployment, passes the Kubernetes schema and
    runs balancer as a native sidecar on the chart's ConfigMap, with the app's account."""
    pod = snippet(notes(*SIDECAR))
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "balancer-admin"}
    # The app starts once the startup probe passes, i.e. once balancer listens.
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "balancer-admin"}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert "lifecycle" not in sidecar  # a native sidecar stops after the app; no sleep needed
    assert pod["serviceAccountName"] == "chat-app"
    assert pod["enableServiceLinks"] is False
    drain = DrainSettings()
    assert pod["terminationGracePeriodSeconds"] >= drain.delay + drain.timeout
    config_map = one(render(*SIDECAR), "ConfigMap")["metadata"]["name"]
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {config_map}
    kubernetes_validate.validate(with_app(pod), KUBERNETES_VERSION, strict=True)


def test_the_notes_snippet_can_be_a_plain_container() -> None:
    """sidecar.native=false puts balancer under `containers`, beside the app."""
    pod = snippet(notes(*SIDECAR, "--set", "sidecar.native=false"))
    assert "initContainers" not in pod
    (sidecar,) = pod["containers"]
    assert "restartPolicy" not in sidecar
    kubernetes_validate.validate(with_app(pod), KUBERNETES_VERSION, strict=True)


def test_gateway_notes_say_how_to_reach_and_check_the_service() -> None:
    """The gateway NOTES give the in-cluster URL and the commands that check it."""
    text = notes()
    assert "http://balancer.llm.svc:80/v1" in text
    assert "rollout status deployment/balancer" in text
    assert "/readyz" in text


@pytest.fixture(scope="module")
def parent_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A client app's chart with balancer as a subchart, using the named templates."""
    root = tmp_path_factory.mktemp("chat-app")
    (root / "Chart.yaml").write_text("apiVersion: v2\nname: chat-app\nversion: 1.0.0\n")
    (root / "values.yaml").write_text(yaml.safe_dump(
        {"balancer": {"mode": "sidecar", "serviceAccount": {"name": "chat-app"}}}))
    (root / "templates").mkdir()
    (root / "templates" / "deployment.yaml").write_text(PARENT_DEPLOYMENT)
    shutil.copytree(CHART, root / "charts" / "balancer")
    return root


def test_a_parent_chart_adds_the_sidecar_with_the_named_templates(parent_chart: Path) -> None:
    """`include "balancer.sidecar.container" .Subcharts.balancer` renders the same container
    as the NOTES snippet, and the parent's Deployment passes the schema next to the
    subchart's RBAC and ConfigMap."""
    docs = render(chart=parent_chart)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Role",
                                               "RoleBinding"]
    deployment = one(docs, "Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["initContainers"] == snippet(notes(*SIDECAR))["initContainers"]
    config_map = one(docs, "ConfigMap")["metadata"]["name"]
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {config_map}
    assert by_kind(docs, "RoleBinding")[0]["subjects"][0]["name"] == pod["serviceAccountName"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    names = [e["name"] for e in container.get("env", ())]
    assert len(names) == len(set(names)), names  # no variable set twice
    return {e["name"]: e["value"] for e in container.get("env", ())}


def test_the_sidecar_proxy_listens_on_loopback_and_the_admin_port_on_the_pod(
        tmp_path: Path) -> None:
    """With the chart's ConfigMap and the snippet's variables, balancer's proxy listens on
    127.0.0.1 (no other pod can use it), the admin port on 0.0.0.0 (the kubelet probes it,
    Prometheus scrapes it) and /debug answers loopback peers only."""
    (sidecar,) = snippet(notes(*SIDECAR))["initContainers"]
    path = tmp_path / "balancer.yaml"
    path.write_text(one(render(*SIDECAR), "ConfigMap")["data"]["balancer.yaml"])
    server = load(path, environ=_env(sidecar)).server
    assert (server.host, server.admin_host) == ("127.0.0.1", "0.0.0.0")
    assert server.debug_from_anywhere is False
    assert server.log_level == "warning"  # the rest of the file still applies


def test_the_sidecar_host_can_be_opened_and_the_users_env_wins() -> None:
    """sidecar.host empty keeps config.server.host; a BALANCER_SERVER_HOST or
    BALANCER_SERVER_ADMIN_HOST in `env` replaces the chart's, never doubles it."""
    (opened,) = snippet(notes(*SIDECAR, "--set", "sidecar.host="))["initContainers"]
    assert "BALANCER_SERVER_HOST" not in _env(opened)
    (own,) = snippet(notes(*SIDECAR, "--set", "env[0].name=BALANCER_SERVER_HOST",
                           "--set", "env[0].value=::1",
                           "--set", "env[1].name=BALANCER_SERVER_ADMIN_HOST",
                           "--set", "env[1].value=::"))["initContainers"]
    assert _env(own) == {"BALANCER_SERVER_HOST": "::1", "BALANCER_SERVER_ADMIN_HOST": "::"}
    (admin,) = snippet(notes(*SIDECAR, "--set", "config.server.admin_host=10.0.0.1"))[
        "initContainers"]
    assert _env(admin)["BALANCER_SERVER_ADMIN_HOST"] == "10.0.0.1"


def test_an_app_service_with_target_port_http_reaches_the_app_not_balancer() -> None:
    """Kubernetes resolves a Service's named targetPort over every container of the pod,
    sidecars included; balancer's ports are named so that `http` and `admin` stay the
    app's."""
    deployment = with_app(snippet(notes(*SIDECAR)))
    pod = deployment["spec"]["template"]["spec"]
    pod["containers"][-1] = {**APP, "ports": [{"name": "http", "containerPort": 3000}]}
    named = [(c["name"], p["name"]) for c in [*pod["initContainers"], *pod["containers"]]
             for p in c.get("ports", ())]
    assert [c for c, port in named if port == "http"] == ["app"]
    assert {port for c, port in named if c == "balancer"} == {"balancer-http",
                                                              "balancer-admin"}
    assert all(len(port) <= 15 for _, port in named)  # IANA_SVC_NAME
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_configuration_map_is_the_config_value_in_sidecar_mode() -> None:
    """The listen addresses come from the container's variables; the ConfigMap stays the
    `config` value as written."""
    assert config_of(render(*SIDECAR))["server"]["host"] == "0.0.0.0"
