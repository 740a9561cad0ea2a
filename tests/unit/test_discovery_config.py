"""Configuration of Kubernetes discovery and model learning: pools that name a Service, the
``kubernetes`` and ``model_discovery`` sections, and how they are checked and printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.cli import main
from balancer.config import (
    ConfigError,
    KubernetesPoolSettings,
    KubernetesSettings,
    ModelDiscoverySettings,
    as_dict,
    from_mapping,
    load,
    validate,
)

K8S_POOL = {"name": "llama", "models": ["llama"],
            "kubernetes": {"namespace": "llm", "service": "vllm", "port": "http"}}


def settings(*pools: dict[str, Any], **sections: Any):
    return validate(from_mapping({"pools": list(pools) or [K8S_POOL], **sections}))


def test_a_pool_can_name_a_service_instead_of_endpoints():
    pool = settings().pools[0]
    assert pool.kubernetes == KubernetesPoolSettings("vllm", "http", "llm")
    assert pool.endpoints == ()


@pytest.mark.parametrize(("port", "expected"), [(8000, 8000), ("8000", 8000), ("http", "http")])
def test_the_port_is_a_name_or_a_number(port: Any, expected: int | str):
    pool = settings({**K8S_POOL, "kubernetes": {"service": "vllm", "port": port}}).pools[0]
    assert pool.kubernetes is not None
    assert pool.kubernetes.port == expected
    assert pool.kubernetes.namespace == ""


def test_models_may_be_left_out_to_learn_them():
    """A pool with a Service or endpoints and no models learns them from /v1/models."""
    pool = settings({"name": "llama", "kubernetes": {"service": "vllm", "port": 8000}}).pools[0]
    assert pool.models == ()
    static = settings({"name": "s", "endpoints": ["http://10.0.0.1:8000"]}).pools[0]
    assert static.models == ()


def test_the_kubernetes_section_has_safe_defaults():
    k8s = settings().kubernetes
    assert k8s == KubernetesSettings()
    assert (k8s.kubeconfig, k8s.watch_timeout, k8s.relist_interval) == ("", 240, 300.0)
    assert settings().model_discovery == ModelDiscoverySettings()


def test_environment_variables_reach_the_new_sections(tmp_path: Path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"pools": [K8S_POOL]}))
    loaded = load(path, environ={"BALANCER_KUBERNETES_KUBECONFIG": "/etc/kube/config",
                                 "BALANCER_KUBERNETES_RELIST_INTERVAL": "60",
                                 "BALANCER_MODEL_DISCOVERY_REFRESH_INTERVAL": "10"})
    assert loaded.kubernetes.kubeconfig == "/etc/kube/config"
    assert loaded.kubernetes.relist_interval == 60.0
    assert loaded.model_discovery.refresh_interval == 10.0


BAD = [
    ("no-service", {"port": "http"}, ["pools[0].kubernetes.service", "required"]),
    ("no-port", {"service": "vllm"}, ["pools[0].kubernetes.port", "required"]),
    ("bad-service", {"service": "vLLM_1", "port": "http"},
     ["pools[0].kubernetes.service", "'vLLM_1'"]),
    ("bad-namespace", {"service": "vllm", "port": "http", "namespace": "LLM"},
     ["pools[0].kubernetes.namespace", "'LLM'"]),
    ("port-zero", {"service": "vllm", "port": 0}, ["pools[0].kubernetes.port", "0"]),
    ("port-large", {"service": "vllm", "port": 70000}, ["pools[0].kubernetes.port", "70000"]),
    ("port-name-long", {"service": "vllm", "port": "a-very-long-port-name"},
     ["pools[0].kubernetes.port", "'a-very-long-port-name'"]),
    ("port-bool", {"service": "vllm", "port": True}, ["pools[0].kubernetes.port", "True"]),
    ("port-list", {"service": "vllm", "port": [80]}, ["pools[0].kubernetes.port", "[80]"]),
    ("unknown-key", {"service": "vllm", "port": "http", "selector": "app=vllm"},
     ["pools[0].kubernetes.selector", "unknown"]),
]


@pytest.mark.parametrize(("kubernetes", "fragments"),
                         [pytest.param(k, f, id=i) for i, k, f in BAD])
def test_a_bad_service_reference_is_rejected_naming_the_key(kubernetes: Any,
                                                            fragments: list[str]):
    with pytest.raises(ConfigError) as caught:
        settings({**K8S_POOL, "kubernetes": kubernetes})
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("patch", "fragments"),
    [
        ({"kubernetes": {"watch_timeout": 0}}, ["kubernetes.watch_timeout", "0"]),
        ({"kubernetes": {"relist_interval": -1}}, ["kubernetes.relist_interval", "-1"]),
        ({"kubernetes": {"watch_idle_timeout": 0}}, ["kubernetes.watch_idle_timeout", "0"]),
        ({"kubernetes": {"backoff_initial": 5, "backoff_max": 1}},
         ["kubernetes.backoff_max", "1"]),
        ({"kubernetes": {"request_timeout": "soon"}}, ["kubernetes.request_timeout", "'soon'"]),
        ({"model_discovery": {"timeout": 0}}, ["model_discovery.timeout", "0"]),
        ({"kubernetes": {"token": "x"}}, ["kubernetes.token", "unknown setting"]),
    ],
)
def test_bad_section_values_are_rejected_naming_the_key(patch: dict[str, Any],
                                                         fragments: list[str]):
    with pytest.raises(ConfigError) as caught:
        settings(**patch)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_a_pool_names_a_service_or_lists_endpoints_not_both():
    with pytest.raises(ConfigError, match=r"pools\[0\]\.endpoints: .*not both"):
        settings({**K8S_POOL, "endpoints": ["http://10.0.0.1:8000"]})


def test_a_pool_with_nothing_to_learn_models_from_must_list_them():
    with pytest.raises(ConfigError, match="at least one model, or have endpoints or kub"):
        settings({"name": "empty"})


def test_the_printout_shows_kubernetes_settings_only_when_used():
    """check-config shows what matters and loads back to the same settings."""
    used = settings()
    plain = as_dict(used)
    assert plain["pools"][0]["kubernetes"] == {"service": "vllm", "port": "http",
                                               "namespace": "llm"}
    assert "kubernetes" in plain and "model_discovery" not in plain
    assert validate(from_mapping(plain)) == used
    static = settings({"name": "s", "models": ["m"], "endpoints": ["http://10.0.0.1:8000"]})
    assert "kubernetes" not in as_dict(static) and "kubernetes" not in as_dict(static)["pools"][0]


def test_check_config_accepts_a_kubernetes_configuration(tmp_path: Path, capsys):
    path = tmp_path / "balancer.yaml"
    path.write_text(yaml.safe_dump({
        "pools": [{"name": "llama", "kubernetes": {"service": "vllm", "port": "http"}}],
        "kubernetes": {"relist_interval": 120},
    }))
    assert main(["check-config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kubernetes"]["relist_interval"] == 120
    assert printed["model_discovery"]["refresh_interval"] == 30
