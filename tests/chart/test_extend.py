"""What a team can change without forking the chart, rendered by the real helm: the image
reference (registry, tag, digest), extra environment, volumes and init containers, labels on
every object, probe timing, an HTTPRoute or an Ingress, zone spreading, the pod labels a chart
bump leaves alone, and the refusal to bind the namespace's `default` service account."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import (
    CHART,
    KUBERNETES_VERSION,
    NAMESPACE,
    by_kind,
    one,
    render,
    run_helm,
    values_file,
)
from tests.chart.test_sidecar import notes, snippet, with_app

EXTEND = values_file("extend-values.yaml")
SIDECAR = values_file("sidecar-values.yaml")
DIGEST = "sha256:" + "0123456789abcdef" * 4
SELECTOR = {"app.kubernetes.io/name": "balancer", "app.kubernetes.io/instance": "balancer"}


def pod_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_of(docs)["containers"]
    return container


@pytest.mark.parametrize("args,image", [
    ((), "registry.example.com/balancer:0.1.0"),
    (("--set", "image.repository=balancer"), "balancer:0.1.0"),
    (("--set", "image.repository=registry.example.com/balancer", "--set", "image.tag=1.2.3"),
     "registry.example.com/balancer:1.2.3"),
    (("--set", "image.tag=1.2.3", "--set", f"image.digest={DIGEST}"),
     f"registry.example.com/balancer:1.2.3@{DIGEST}"),
    (("--set", f"image.digest={DIGEST}"), f"registry.example.com/balancer@{DIGEST}"),
    (("--set", "image.registry=ghcr.io", "--set", "image.repository=team/balancer"),
     "ghcr.io/team/balancer:0.1.0"),
    (("--set", "image.registry=registry.local:5000/", "--set", "image.repository=balancer",
      "--set", f"image.digest={DIGEST}"), f"registry.local:5000/balancer@{DIGEST}"),
], ids=["placeholder default", "repository only (existing values)", "repository and tag",
        "tag and digest", "digest only", "registry prefix", "registry with port and digest"])
def test_the_image_reference_is_registry_repository_tag_and_digest(args: tuple[str, ...],
                                                                   image: str) -> None:
    """[registry/]repository[:tag][@digest]: the appVersion when neither tag nor digest is
    set; a digest alone drops the tag; with both the digest is what the kubelet pulls. The
    gateway and the sidecar snippet use the same reference."""
    docs = render(*args)
    assert container_of(docs)["image"] == image
    kubernetes_validate.validate(one(docs, "Deployment"), KUBERNETES_VERSION, strict=True)
    (sidecar,) = snippet(notes(*SIDECAR, *args))["initContainers"]
    assert sidecar["image"] == image


def test_the_notes_say_to_set_the_image_while_it_is_the_placeholder() -> None:
    """The default repository is a placeholder that cannot be pulled; NOTES.txt says so until
    the repository is set."""
    assert "WARNING: image registry.example.com/balancer:0.1.0 is the chart's placeholder" \
        in notes()
    assert "set image.repository" in notes()
    assert "WARNING" not in notes("--set", "image.registry=ghcr.io",
                                  "--set", "image.repository=team/balancer")


def test_every_extension_value_reaches_the_gateway_pod() -> None:
    """extraEnv after env, extraEnvFrom, extraVolumes and their mounts beside the chart's
    own, initContainers, podLabels, podAnnotations and probe timing, in a pod the Kubernetes
    schema accepts."""
    docs = render(*EXTEND)
    pod, container = pod_of(docs), container_of(docs)
    assert container["env"] == [{"name": "BALANCER_SERVER_LOG_LEVEL", "value": "debug"},
                                {"name": "SSL_CERT_FILE", "value": "/etc/ssl/extra/ca.crt"}]
    assert container["envFrom"] == [{"secretRef": {"name": "balancer-env"}}]
    assert [v["name"] for v in pod["volumes"]] == ["balancer-config", "balancer-tmp",
                                                   "extra-ca"]
    assert container["volumeMounts"][-1] == {"name": "extra-ca", "mountPath": "/etc/ssl/extra",
                                             "readOnly": True}
    assert [c["name"] for c in pod["initContainers"]] == ["wait-for-models"]
    template = one(docs, "Deployment")["spec"]["template"]["metadata"]
    assert template["labels"]["example.com/tier"] == "gateway"
    assert template["annotations"]["example.com/owner"] == "platform"
    assert "checksum/config" in template["annotations"]
    assert container["startupProbe"] == {
        "httpGet": {"path": "/healthz", "port": "admin"}, "periodSeconds": 1,
        "failureThreshold": 30, "initialDelaySeconds": 2, "timeoutSeconds": 3}
    assert container["readinessProbe"] == {
        "httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 3,
        "failureThreshold": 2, "timeoutSeconds": 2, "successThreshold": 2}
    assert container["livenessProbe"]["timeoutSeconds"] == 5
    assert container["livenessProbe"]["periodSeconds"] == 10
    kubernetes_validate.validate(one(docs, "Deployment"), KUBERNETES_VERSION, strict=True)


def test_the_sidecar_snippet_takes_the_extra_environment_and_volumes() -> None:
    """In sidecar mode extraEnv, extraEnvFrom and extraVolumeMounts reach the sidecar, and
    extraVolumes the snippet's volumes; the sidecar's listen addresses stay first and a user
    variable of the same name still wins."""
    args = (*SIDECAR, *EXTEND, "--set", "mode=sidecar")
    pod = snippet(notes(*args))
    (sidecar,) = pod["initContainers"]
    assert [e["name"] for e in sidecar["env"]] == [
        "BALANCER_SERVER_HOST", "BALANCER_SERVER_ADMIN_HOST", "BALANCER_SERVER_LOG_LEVEL",
        "SSL_CERT_FILE"]
    assert sidecar["envFrom"] == [{"secretRef": {"name": "balancer-env"}}]
    assert sidecar["volumeMounts"][-1]["name"] == "extra-ca"
    assert [v["name"] for v in pod["volumes"]][-1] == "extra-ca"
    kubernetes_validate.validate(with_app(pod), KUBERNETES_VERSION, strict=True)
    pinned = notes(*SIDECAR, "--set-json",
                   'extraEnv=[{"name": "BALANCER_SERVER_HOST", "value": "0.0.0.0"}]')
    (sidecar,) = snippet(pinned)["initContainers"]
    assert [e for e in sidecar["env"] if e["name"] == "BALANCER_SERVER_HOST"] == [
        {"name": "BALANCER_SERVER_HOST", "value": "0.0.0.0"}]


@pytest.mark.parametrize("args", [(), SIDECAR], ids=["gateway", "sidecar"])
def test_common_labels_are_on_every_object(args: tuple[str, ...]) -> None:
    """commonLabels lands on every object, optional ones included, and on the pods."""
    docs = render(*EXTEND, *args, "--set", "metrics.serviceMonitor.enabled=true",
                  "--set", "metrics.prometheusRule.enabled=true",
                  "--set", "networkPolicy.enabled=true", "--set", "autoscaling.enabled=true")
    assert len(docs) >= 3
    for doc in docs:
        assert doc["metadata"]["labels"]["example.com/team"] == "inference", doc["kind"]
    for deployment in by_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["example.com/team"] == "inference"


def test_a_chart_bump_alone_does_not_change_the_pod_template(tmp_path: Path) -> None:
    """helm.sh/chart is on every object but not on the pod template, so the same values
    under a new chart version render the same pod template (no rollout), while the objects'
    own labels follow the chart."""
    bumped = tmp_path / "balancer"
    shutil.copytree(CHART, bumped)
    chart = yaml.safe_load((bumped / "Chart.yaml").read_text())
    chart["version"] = "99.0.0"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(chart))
    before, after = render(), render(chart=bumped)
    template = one(before, "Deployment")["spec"]["template"]
    assert "helm.sh/chart" not in template["metadata"]["labels"]
    assert template == one(after, "Deployment")["spec"]["template"]
    assert one(after, "Deployment")["metadata"]["labels"]["helm.sh/chart"] == "balancer-99.0.0"


def test_the_gateway_spreads_over_zones_and_nodes_by_default() -> None:
    """Two preferences (ScheduleAnyway, maxSkew 1): one per node, one per zone, each selecting
    exactly the gateway's pods."""
    spread = pod_of(render())["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {"kubernetes.io/hostname",
                                                  "topology.kubernetes.io/zone"}
    for constraint in spread:
        assert constraint["maxSkew"] == 1
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"] == {"matchLabels": SELECTOR}


@pytest.mark.parametrize("value,expected", [
    ("[]", None),
    ('[{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone",'
     ' "whenUnsatisfiable": "DoNotSchedule"}]',
     [{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone",
       "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": SELECTOR}}]),
], ids=["off", "replaced"])
def test_spreading_can_be_turned_off_or_replaced(value: str, expected: Any) -> None:
    """`[]` renders no constraint; a list replaces the defaults and still gets the selector."""
    pod = pod_of(render("--set-json", f"topologySpreadConstraints={value}"))
    assert pod.get("topologySpreadConstraints") == expected


def test_the_sidecar_has_no_spreading_no_route_and_no_ingress() -> None:
    """Sidecar mode renders no pod of its own, so no spread constraint (the snippet has none
    either), and no HTTPRoute or Ingress even when enabled: the workload owns its traffic."""
    args = (*SIDECAR, "--set", "ingress.enabled=true", "--set", "httpRoute.enabled=true",
            "--set", "httpRoute.parentRefs[0].name=public")
    docs = render(*args)
    assert not by_kind(docs, "Deployment")
    assert not by_kind(docs, "HTTPRoute") and not by_kind(docs, "Ingress")
    assert "topologySpreadConstraints" not in snippet(notes(*args))


def test_no_route_and_no_ingress_by_default() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"HTTPRoute", "Ingress"}


def test_the_httproute_sends_every_path_to_the_gateway_service() -> None:
    """Attached to the given Gateway, for the given host names, to the Service's port."""
    docs = render(*EXTEND)
    route, service = one(docs, "HTTPRoute"), one(docs, "Service")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["metadata"]["namespace"] == NAMESPACE
    assert route["metadata"]["annotations"] == {"example.com/route": "public"}
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system",
                                            "sectionName": "https"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"],
                                    "port": service["spec"]["ports"][0]["port"]}]


def test_an_httproute_without_a_parent_is_refused() -> None:
    result = run_helm("template", "balancer", str(CHART), "--set", "httpRoute.enabled=true")
    assert result.returncode != 0
    assert "set httpRoute.parentRefs" in result.stderr


def test_the_ingress_routes_its_hosts_to_the_proxy_port() -> None:
    """Class, annotations, hosts with their paths and TLS, to the Service's `http` port; the
    Kubernetes schema accepts it."""
    docs = render(*EXTEND)
    ingress, service = one(docs, "Ingress"), one(docs, "Service")
    kubernetes_validate.validate(ingress, KUBERNETES_VERSION, strict=True)
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    (rule,) = spec["rules"]
    assert rule["host"] == "llm.example.com"
    assert rule["http"]["paths"] == [{"path": "/v1", "pathType": "Prefix", "backend": {
        "service": {"name": service["metadata"]["name"], "port": {"name": "http"}}}}]
    assert service["spec"]["ports"][0]["name"] == "http"
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "600"}


def test_the_default_ingress_host_list_renders_when_enabled() -> None:
    ingress = one(render("--set", "ingress.enabled=true"), "Ingress")
    kubernetes_validate.validate(ingress, KUBERNETES_VERSION, strict=True)
    assert "ingressClassName" not in ingress["spec"]


def test_without_a_service_account_to_create_or_name_the_render_fails() -> None:
    """serviceAccount.create=false and no name: a clear failure instead of running as (and
    granting EndpointSlice access to) the namespace's shared `default` account."""
    result = run_helm("template", "balancer", str(CHART), "--set", "serviceAccount.create=false")
    assert result.returncode != 0
    assert "serviceAccount.create is false: set serviceAccount.name" in result.stderr
    docs = render("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=llm-gw")
    assert not by_kind(docs, "ServiceAccount")
    assert pod_of(docs)["serviceAccountName"] == "llm-gw"
    assert one(docs, "RoleBinding")["subjects"][0]["name"] == "llm-gw"
