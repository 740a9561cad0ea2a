"""Learned models: parsing /v1/models answers and how the router maps learned models."""

from __future__ import annotations

import pytest

from balancer.config import PoolSettings, Settings
from balancer.endpoints import Endpoint
from balancer.errors import ModelNotFoundError
from balancer.models import model_names
from balancer.router import Router


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"object": "list", "data": [{"id": "llama"}, {"id": "sql-lora", "parent": "llama"}]},
         {"llama", "sql-lora"}),
        ({"object": "list", "data": []}, set()),
        ({"data": [{"id": ""}, {"id": 5}, "x", {"name": "n"}, {"id": "ok"}]}, {"ok"}),
        ({"models": ["llama"]}, None),
        (["llama"], None),
        ({"data": "llama"}, None),
    ],
)
def test_model_names_read_an_openai_model_list(body: object, expected: set[str] | None) -> None:
    assert model_names(body) == expected


def router() -> Router:
    return Router(Settings(pools=(
        PoolSettings("listed", ("llama",)),
        PoolSettings("learner-a", (), ("http://10.0.0.1:8000",)),
        PoolSettings("learner-b", (), ("http://10.0.0.2:8000",)),
    )))


def test_learned_models_route_to_their_pool() -> None:
    r = router()
    assert r.models == ("llama",)
    assert r.set_models("learner-a", ["mistral", "sql-lora"])
    assert r.pool_for_model("sql-lora").name == "learner-a"
    assert r.models == ("llama", "mistral", "sql-lora")
    assert not r.set_models("learner-a", ["sql-lora", "mistral"])  # same set: no change


def test_a_model_that_is_no_longer_served_is_a_404() -> None:
    r = router()
    r.set_models("learner-a", ["mistral", "sql-lora"])
    r.set_models("learner-a", ["mistral"])
    with pytest.raises(ModelNotFoundError, match="Known models: llama, mistral"):
        r.pool_for_model("sql-lora")


def test_configured_models_win_and_the_first_pool_keeps_a_shared_model() -> None:
    """A learned model that another pool lists stays there; one learned by two pools goes to
    the first in configuration order, whatever order they learned it in."""
    r = router()
    r.set_models("learner-b", ["llama", "qwen"])
    r.set_models("learner-a", ["qwen"])
    assert r.pool_for_model("llama").name == "listed"
    assert r.pool_for_model("qwen").name == "learner-a"


def test_a_listing_pool_ignores_learned_models() -> None:
    r = router()
    assert not r.set_models("listed", ["other"])
    assert r.pools["listed"].models == ("llama",)


def test_a_learning_pool_is_ready_once_it_has_endpoints_and_models() -> None:
    r = router()
    r.apply({"listed": [Endpoint("a", "http://10.0.0.9:8000")],
             "learner-a": [Endpoint("b", "http://10.0.0.1:8000")],
             "learner-b": [Endpoint("c", "http://10.0.0.2:8000")]})
    assert r.unready_pools() == {"learner-a": "models not learned yet",
                                 "learner-b": "models not learned yet"}
    r.set_models("learner-a", ["m1"])
    r.set_models("learner-b", ["m2"])
    assert r.ready()
    r.apply({"learner-b": []})
    assert r.unready_pools() == {"learner-b": "no routable endpoints"}
