"""deploy/ and deploy/examples/: every manifest passes the Kubernetes 1.34 schemas (strict),
both kustomizations build with the real kubectl, apart from each other (deploy/ owns no
namespace and no example workload), the configuration they ship is one balancer accepts, and
every grace period covers the drain that configuration asks for.

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
from balancer.config import Settings, load

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = DEPLOY / "examples"
KUBECTL = ROOT / ".cache" / "bin" / "kubectl"
KUBERNETES_VERSION = "1.34.0"
CONFIGS = {"gateway": DEPLOY / "balancer.yaml", "sidecar": EXAMPLES / "balancer.yaml"}
MANIFESTS = sorted(p for folder in (DEPLOY, EXAMPLES) for p in folder.glob("*.yaml")
                   if p.name not in {"kustomization.yaml", "balancer.yaml"})
MARGIN = 10
"""Seconds of grace beyond the preStop sleep and balancer's drain, as the chart adds: SIGKILL
must not race the last stream's end and the process's exit."""


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize <folder>``, parsed."""
    if not KUBECTL.exists():
        pytest.skip("kubectl missing: run `.venv/bin/python scripts/fetch_k8s_tools.py` "
                    "(`make test` does)")
    result = subprocess.run([str(KUBECTL), "kustomize", str(folder)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return documents(result.stdout)


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/``: what ``kubectl apply -k deploy/`` creates."""
    return kustomize(DEPLOY)


@pytest.fixture(scope="module")
def examples() -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/examples/``."""
    return kustomize(EXAMPLES)


@pytest.fixture(scope="module", params=["deploy", "examples"])
def either(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """Each of the two builds in turn."""
    docs: list[dict[str, Any]] = request.getfixturevalue(
        "built" if request.param == "deploy" else "examples")
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict[str, Any]], image: str) -> list[tuple[dict[str, Any], dict]]:
    """(pod spec, container) for every container running ``image``, native sidecars (init
    containers) included."""
    return [(d["spec"]["template"]["spec"], c) for d in docs if d["kind"] == "Deployment"
            for c in [*d["spec"]["template"]["spec"].get("initContainers", ()),
                      *d["spec"]["template"]["spec"]["containers"]]
            if c["image"].split(":")[0] == image]


def mounted_settings(docs: list[dict[str, Any]], pod: dict[str, Any],
                     container: dict[str, Any], tmp_path: Path) -> Settings:
    """The settings ``container`` runs with: the ConfigMap it mounts, as built, with its
    BALANCER_* variables."""
    (name,) = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    path = tmp_path / f"{name}.yaml"
    path.write_text(by_kind(docs, "ConfigMap")[name]["data"]["balancer.yaml"])
    environ = {e["name"]: e["value"] for e in container.get("env", ())}
    return load(path, environ=environ)


def needed_grace(container: dict[str, Any], settings: Settings) -> float:
    """The preStop sleep, then balancer's drain after SIGTERM, then the margin."""
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    return sleep + settings.drain.delay + settings.drain.timeout + MARGIN


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
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


def test_the_kustomization_builds_the_gateway_alone(built: list[dict[str, Any]]) -> None:
    """`kubectl apply -k deploy/` creates balancer's objects and nothing else: no Namespace
    (a `delete -k` would take the model servers with it) and no example workload."""
    kinds = sorted({d["kind"] for d in built})
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Role", "RoleBinding",
                     "Service", "ServiceAccount"]
    assert set(by_kind(built, "Deployment")) == {"balancer"}
    assert set(by_kind(built, "Service")) == {"balancer"}
    for doc in built:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["metadata"]["namespace"] == "llm", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "balancer"


def test_the_examples_build_apart_from_the_gateway(built: list[dict[str, Any]],
                                                  examples: list[dict[str, Any]]) -> None:
    """`kubectl apply -k deploy/examples/` creates the model servers and the sidecar app,
    no Namespace, and no object deploy/ also creates: deleting either never deletes the
    other's."""
    assert "Namespace" not in {d["kind"] for d in examples}
    assert set(by_kind(examples, "Deployment")) == {"chat-app", "vllm"}
    for doc in examples:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["metadata"]["namespace"] == "llm", doc["metadata"]["name"]
    names = {(d["kind"], d["metadata"]["name"]) for d in built}
    assert names.isdisjoint((d["kind"], d["metadata"]["name"]) for d in examples)


def test_the_generated_config_map_is_what_the_pods_mount(
        built: list[dict[str, Any]], examples: list[dict[str, Any]]) -> None:
    """Each build's ConfigMap has a hashed name that its balancer containers mount, and
    holds the balancer.yaml beside its kustomization."""
    for docs, source in ((built, CONFIGS["gateway"]), (examples, CONFIGS["sidecar"])):
        (config_map,) = by_kind(docs, "ConfigMap").values()
        assert config_map["data"]["balancer.yaml"] == source.read_text()
        mounted = {v["configMap"]["name"] for pod, _ in containers(docs, "balancer")
                   for v in pod["volumes"] if "configMap" in v}
        assert mounted == {config_map["metadata"]["name"]}
        assert config_map["metadata"]["name"].rsplit("-", 1)[0] in {
            "balancer-config", "chat-app-balancer-config"}


def test_balancer_may_only_read_endpointslices(either: list[dict[str, Any]]) -> None:
    (role,) = by_kind(either, "Role").values()
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    bound = {(s["name"], s["namespace"]) for b in by_kind(either, "RoleBinding").values()
             for s in b["subjects"] if b["roleRef"]["name"] == role["metadata"]["name"]}
    accounts = {pod["serviceAccountName"] for pod, _ in containers(either, "balancer")}
    assert accounts
    assert {(a, "llm") for a in accounts} <= bound


def test_every_pod_turns_off_service_links(either: list[dict[str, Any]]) -> None:
    """Service links would put <SERVICE>_* variables in every container; BALANCER_* ones are
    configuration overrides (and VLLM_* ones vLLM settings)."""
    for deployment in by_kind(either, "Deployment").values():
        assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_balancer_containers_are_locked_down_and_probed(built: list[dict[str, Any]],
                                                       examples: list[dict[str, Any]]) -> None:
    """Non-root, read-only, no capabilities; a startup probe (liveness, readiness and a
    native sidecar's app wait for it) and liveness on /healthz, readiness on /readyz."""
    found = containers(built, "balancer") + containers(examples, "balancer")
    assert len(found) == 2  # the gateway and the sidecar
    for pod, container in found:
        assert pod["securityContext"]["runAsNonRoot"] is True
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        admin = next(p["name"] for p in container["ports"] if p["containerPort"] == 9090)
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": admin}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": admin}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": admin}
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_every_grace_period_covers_the_prestop_sleep_and_the_shipped_drain(
        built: list[dict[str, Any]], examples: list[dict[str, Any]], tmp_path: Path) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + drain.delay + drain.timeout + margin,
    with the drain read from the configuration each pod mounts: SIGKILL must not cut the
    streams balancer is finishing."""
    checked = 0
    for docs in (built, examples):
        for pod, container in containers(docs, "balancer"):
            settings = mounted_settings(docs, pod, container, tmp_path)
            assert pod["terminationGracePeriodSeconds"] >= needed_grace(container, settings), (
                container["name"], pod["terminationGracePeriodSeconds"])
            checked += 1
    assert checked == 2
    # The check has teeth: the 45 s these manifests once had is too short.
    pod, container = containers(built, "balancer")[0]
    assert needed_grace(container, mounted_settings(built, pod, container, tmp_path)) > 45


def test_the_gateway_has_two_replicas_a_service_and_a_disruption_budget(
        built: list[dict[str, Any]]) -> None:
    """The budget selects the gateway's pods and lets unready ones be evicted: they serve
    nothing, and protecting them only blocks node drains."""
    gateway = by_kind(built, "Deployment")["balancer"]
    assert gateway["spec"]["replicas"] == 2
    selector = gateway["spec"]["selector"]["matchLabels"]
    assert by_kind(built, "Service")["balancer"]["spec"]["selector"] == selector
    budget = by_kind(built, "PodDisruptionBudget")["balancer"]
    assert budget["spec"]["selector"] == {"matchLabels": selector}
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_sidecar_is_native_and_the_app_talks_to_it_on_localhost(
        examples: list[dict[str, Any]]) -> None:
    """balancer runs as a native sidecar (started before the app, once its startup probe
    passes), and its port names leave `http` to the app."""
    pod = by_kind(examples, "Deployment")["chat-app"]["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert {p["name"] for p in sidecar["ports"]} == {"balancer-http", "balancer-admin"}
    app = next(c for c in pod["containers"] if c["name"] == "app")
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1"


def test_the_shipped_configurations_pass_check_config(capsys, examples, tmp_path) -> None:
    """`balancer check-config` accepts both files; the gateway listens on every interface,
    the sidecar's proxy on loopback only, its admin port on the pod's address (probes,
    scrapes) with /debug for loopback peers."""
    for path in CONFIGS.values():
        assert main(["check-config", str(path)]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["pools"][0]["kubernetes"] == {"service": "vllm", "port": "http",
                                                     "namespace": ""}
    gateway = load(CONFIGS["gateway"], environ={}).server
    assert gateway.host == "0.0.0.0"
    (pod, sidecar), = containers(examples, "balancer")
    server = mounted_settings(examples, pod, sidecar, tmp_path).server
    assert (server.host, server.admin_host) == ("127.0.0.1", "0.0.0.0")
    assert server.debug_from_anywhere is False
    assert server.log_level == "warning"


def test_the_example_vllm_service_matches_the_configured_pools() -> None:
    """The pools' Service and port name exist in the example model servers."""
    services = by_kind(documents((EXAMPLES / "vllm.yaml").read_text()), "Service")
    for path in CONFIGS.values():
        target = yaml.safe_load(path.read_text())["pools"][0]["kubernetes"]
        ports = {p["name"] for p in services[target["service"]]["spec"]["ports"]}
        assert target["port"] in ports
