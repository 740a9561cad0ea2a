"""deploy/: every manifest passes the Kubernetes 1.34 schemas (strict), the kustomization
builds with the real kubectl, and the configuration it ships is one balancer accepts.

kubectl comes from ``scripts/fetch_k8s_tools.py`` (``make test`` runs it first); without it the
kustomize tests are skipped with a message saying so.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from balancer.cli import main
from balancer.config import load

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
KUBECTL = ROOT / ".cache" / "bin" / "kubectl"
KUBERNETES_VERSION = "1.34.0"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml")
                   if p.name not in {"kustomization.yaml", "balancer.yaml"})


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/``, parsed."""
    if not KUBECTL.exists():
        pytest.skip("kubectl missing: run `.venv/bin/python scripts/fetch_k8s_tools.py` "
                    "(`make test` does)")
    result = subprocess.run([str(KUBECTL), "kustomize", str(DEPLOY)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return documents(result.stdout)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict[str, Any]], image: str) -> list[tuple[dict[str, Any], dict]]:
    """(pod spec, container) for every container running ``image``."""
    return [(d["spec"]["template"]["spec"], c) for d in docs if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]
            if c["image"].split(":")[0] == image]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_passes_the_kubernetes_schema(path: Path) -> None:
    docs = documents(path.read_text())
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_has_teeth() -> None:
    """A misspelt field (the classic ``enableServiceLink``) fails strict validation."""
    (deployment,) = [d for d in documents((DEPLOY / "gateway.yaml").read_text())
                     if d["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    spec = broken["spec"]["template"]["spec"]
    spec["enableServiceLink"] = spec.pop("enableServiceLinks")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_builds_into_valid_objects(built: list[dict[str, Any]]) -> None:
    kinds = sorted({d["kind"] for d in built})
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget", "Role",
                     "RoleBinding", "Service", "ServiceAccount"]
    for doc in built:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "llm", doc["metadata"]["name"]


def test_the_generated_config_map_is_what_the_pods_mount(built: list[dict[str, Any]]) -> None:
    """The ConfigMap's hashed name is the one both balancer Deployments mount, and it holds
    deploy/balancer.yaml."""
    (config_map,) = by_kind(built, "ConfigMap").values()
    assert config_map["metadata"]["name"].startswith("balancer-config-")
    assert config_map["data"]["balancer.yaml"] == (DEPLOY / "balancer.yaml").read_text()
    mounted = {v["configMap"]["name"] for pod, _ in containers(built, "balancer")
               for v in pod["volumes"] if "configMap" in v}
    assert mounted == {config_map["metadata"]["name"]}


def test_balancer_may_only_read_endpointslices(built: list[dict[str, Any]]) -> None:
    (role,) = by_kind(built, "Role").values()
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    bound = {(s["name"], s["namespace"]) for b in by_kind(built, "RoleBinding").values()
             for s in b["subjects"]}
    accounts = {pod["serviceAccountName"] for pod, _ in containers(built, "balancer")}
    assert {(a, "llm") for a in accounts} <= bound


def test_every_pod_turns_off_service_links(built: list[dict[str, Any]]) -> None:
    """Service links would put <SERVICE>_* variables in every container; BALANCER_* ones are
    configuration overrides (and VLLM_* ones vLLM settings)."""
    for deployment in by_kind(built, "Deployment").values():
        assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_balancer_containers_are_locked_down_and_probed(built: list[dict[str, Any]]) -> None:
    found = containers(built, "balancer")
    assert len(found) == 2  # the gateway and the sidecar
    for pod, container in found:
        assert pod["securityContext"]["runAsNonRoot"] is True
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_the_gateway_has_two_replicas_a_service_and_a_disruption_budget(
        built: list[dict[str, Any]]) -> None:
    gateway = by_kind(built, "Deployment")["balancer"]
    assert gateway["spec"]["replicas"] == 2
    selector = gateway["spec"]["selector"]["matchLabels"]
    assert by_kind(built, "Service")["balancer"]["spec"]["selector"] == selector
    assert by_kind(built, "PodDisruptionBudget")["balancer"]["spec"]["selector"] == {
        "matchLabels": selector}


def test_the_sidecar_app_talks_to_balancer_on_localhost(built: list[dict[str, Any]]) -> None:
    pod = by_kind(built, "Deployment")["chat-app"]["spec"]["template"]["spec"]
    app = next(c for c in pod["containers"] if c["name"] == "app")
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1"


def test_the_shipped_configuration_passes_check_config(capsys) -> None:
    """`balancer check-config deploy/balancer.yaml`, and the same with each container's
    BALANCER_* overrides, as the pods will load it."""
    path = DEPLOY / "balancer.yaml"
    assert main(["check-config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pools"][0]["kubernetes"] == {"service": "vllm", "port": "http",
                                                 "namespace": ""}
    example = documents((DEPLOY / "example-sidecar.yaml").read_text())
    for _, container in containers(example, "balancer"):
        environ = {e["name"]: e["value"] for e in container.get("env", ())}
        settings = load(path, environ=environ)
        assert settings.server.log_level == "warning"


def test_the_example_vllm_service_matches_the_configured_pool() -> None:
    """The pool's Service and port name exist in the example model servers."""
    config = yaml.safe_load((DEPLOY / "balancer.yaml").read_text())
    target = config["pools"][0]["kubernetes"]
    services = by_kind(documents((DEPLOY / "example-vllm.yaml").read_text()), "Service")
    ports = {p["name"] for p in services[target["service"]]["spec"]["ports"]}
    assert target["port"] in ports
