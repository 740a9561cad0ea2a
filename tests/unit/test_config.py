"""Settings: defaults, the YAML file, environment and flag overrides, and validation messages."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.cli import build_parser, settings_from_args
from balancer.config import (
    ConfigError,
    KeyMode,
    LimitsSettings,
    PoolSettings,
    RoutingSettings,
    ServerSettings,
    Settings,
    Strategy,
    as_dict,
    env_overrides,
    from_mapping,
    load,
    read_file,
    validate,
)

POOL = {"name": "chat", "models": ["llama"], "endpoints": ["http://10.0.0.1:8000"]}
MINIMAL: dict[str, Any] = {"pools": [POOL]}


def write(tmp_path: Path, data: Any, name: str = "balancer.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def merged(patch: dict[str, Any]) -> dict[str, Any]:
    """MINIMAL with each section of the patch laid over it (pools are replaced whole)."""
    result = copy.deepcopy(MINIMAL)
    for section, value in patch.items():
        if isinstance(value, dict) and isinstance(result.get(section), dict):
            result[section].update(value)
        else:
            result[section] = value
    return result


def load_quietly(path: Path | None = None, **kwargs: Any) -> Settings:
    """Load with an empty environment unless one is given, so the host's variables never leak."""
    kwargs.setdefault("environ", {})
    return load(path, **kwargs)


def from_flags(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def lookup(settings: Settings, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(settings, section), key)


# -- defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "expected"),
    [
        ("server.host", "0.0.0.0"),
        ("server.port", 8080),
        ("server.admin_port", 9090),
        ("server.admin_host", ""),
        ("server.debug_from_anywhere", False),
        ("server.route_headers", True),
        ("server.log_level", "info"),
        ("routing.strategy", Strategy.CHWBL),
        ("routing.load_factor", 1.5),
        ("routing.virtual_nodes", 1024),
        ("routing.min_bound", 2),
        ("routing.key", KeyMode.FIRST_USER_MESSAGE),
        ("routing.prefix_chars", 1000),
        ("routing.min_key_chars", 64),
        ("routing.session_header", "x-session-id"),
        ("limits.max_body_bytes", 10 * 1024 * 1024),
        ("limits.max_header_bytes", 16 * 1024),
        ("limits.connect_timeout", 5.0),
        ("limits.first_byte_timeout", 300.0),
        ("limits.idle_timeout", 120.0),
        ("limits.total_timeout", 0.0),
        ("limits.empty_pool_wait", 30.0),
    ],
)
def test_a_file_with_only_a_pool_gets_the_documented_defaults(
    tmp_path: Path, dotted: str, expected: Any
) -> None:
    """Every setting left out of the file takes its documented default."""
    settings = load_quietly(write(tmp_path, MINIMAL))
    assert lookup(settings, dotted) == expected
    assert lookup(Settings(), dotted) == expected


def test_settings_groups_are_frozen() -> None:
    """Settings cannot be changed after they are built."""
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.routing.load_factor = 2.0  # type: ignore[misc]


# -- the YAML file -------------------------------------------------------------------------

FULL_FILE = """
server:
  host: 127.0.0.1
  port: 8000
  admin_port: 8001
  route_headers: false
  log_level: debug
routing:
  strategy: least-request
  load_factor: 1.5
  virtual_nodes: 512
  min_bound: 3
  key: prompt-prefix
  prefix_chars: 256
  min_key_chars: 16
  session_header: x-conversation
limits:
  max_body_bytes: 2048
  max_header_bytes: 4096
  connect_timeout: 1
  first_byte_timeout: 60
  idle_timeout: 30.5
  total_timeout: 600
pools:
  - name: chat
    models: [llama, mistral]
    endpoints:
      - http://vllm-0.vllm.llm.svc:8000
      - https://vllm-1.vllm.llm.svc
  - name: embed
    models: bge
"""


def test_every_setting_is_read_from_the_file(tmp_path: Path) -> None:
    """A file that sets everything yields exactly those settings, with types converted."""
    settings = load_quietly(write(tmp_path, FULL_FILE))
    assert settings == Settings(
        server=ServerSettings("127.0.0.1", 8000, 8001, False, "debug"),
        pools=(
            PoolSettings(
                "chat",
                ("llama", "mistral"),
                ("http://vllm-0.vllm.llm.svc:8000", "https://vllm-1.vllm.llm.svc"),
            ),
            PoolSettings("embed", ("bge",), ()),
        ),
        routing=RoutingSettings(
            Strategy.LEAST_REQUEST, 1.5, 512, 3, KeyMode.PROMPT_PREFIX, 256, 16, "x-conversation"
        ),
        limits=LimitsSettings(2048, 4096, 1.0, 60.0, 30.5, 600.0),
    )
    assert isinstance(settings.limits.connect_timeout, float)


def test_numbers_and_booleans_may_be_written_as_strings(tmp_path: Path) -> None:
    """Quoted numbers and yes/no words convert, as they do from the environment."""
    data = merged(
        {"server": {"port": "8000", "route_headers": "no"}, "routing": {"load_factor": "2"}}
    )
    settings = load_quietly(write(tmp_path, data))
    assert (settings.server.port, settings.server.route_headers) == (8000, False)
    assert settings.routing.load_factor == 2.0


def test_an_empty_section_means_all_its_defaults(tmp_path: Path) -> None:
    """A section present but empty (`routing:`) is the same as a missing one."""
    settings = load_quietly(write(tmp_path, "routing:\nserver:\n" + yaml.safe_dump(MINIMAL)))
    assert settings.routing == RoutingSettings()
    assert settings.server == ServerSettings()


def test_a_pool_without_a_name_is_named_after_its_position(tmp_path: Path) -> None:
    """An unnamed pool is called pool-<index>."""
    data = {"pools": [POOL, {"models": ["bge"]}]}
    assert load_quietly(write(tmp_path, data)).pools[1].name == "pool-1"


def test_settings_find_the_pool_serving_a_model(tmp_path: Path) -> None:
    """pool_for_model returns the pool listing the model, or None."""
    settings = load_quietly(write(tmp_path, FULL_FILE))
    pool = settings.pool_for_model("bge")
    assert pool is not None and pool.name == "embed"
    assert settings.pool_for_model("gpt-4") is None


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("pools: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("42\n", "top level must be a mapping"),
    ],
)
def test_an_unreadable_file_is_reported_with_its_path(
    tmp_path: Path, content: str, fragment: str
) -> None:
    """Broken YAML or a non-mapping document names the file and the problem."""
    path = write(tmp_path, content)
    with pytest.raises(ConfigError, match=fragment) as caught:
        read_file(path)
    assert str(path) in str(caught.value)


def test_a_missing_file_is_reported_with_its_path(tmp_path: Path) -> None:
    """A path that cannot be read names itself."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read configuration file") as caught:
        load_quietly(path)
    assert str(path) in str(caught.value)


def test_an_empty_file_is_an_empty_configuration_which_lacks_pools(tmp_path: Path) -> None:
    """An empty file reads as no settings; validation then asks for a pool."""
    path = write(tmp_path, "")
    assert read_file(path) == {}
    with pytest.raises(ConfigError, match="pools: at least one pool is required"):
        load_quietly(path)


def test_the_effective_configuration_round_trips_through_yaml(tmp_path: Path) -> None:
    """as_dict gives plain YAML data that loads back into the same settings."""
    settings = load_quietly(write(tmp_path, FULL_FILE))
    plain = as_dict(settings)
    assert plain["routing"]["strategy"] == "least-request"
    assert plain["pools"][0]["models"] == ["llama", "mistral"]
    text = yaml.safe_dump(plain)
    assert load_quietly(write(tmp_path, text, "again.yaml")) == settings


# -- validation ----------------------------------------------------------------------------

BAD_VALUES = [
    # (id, patch over MINIMAL, fragments the message must contain)
    ("strategy", {"routing": {"strategy": "fastest"}},
     ["routing.strategy", "'fastest'", "chwbl, least-request, round-robin, random"]),
    ("key", {"routing": {"key": "whole-body"}},
     ["routing.key", "'whole-body'", "first-user-message, prompt-prefix"]),
    ("load-factor-below-one", {"routing": {"load_factor": 0.9}},
     ["routing.load_factor", "0.9", ">= 1.0"]),
    ("load-factor-zero", {"routing": {"load_factor": 0}}, ["routing.load_factor", "0.0"]),
    ("load-factor-nan", {"routing": {"load_factor": math.nan}}, ["routing.load_factor", "nan"]),
    ("load-factor-inf", {"routing": {"load_factor": math.inf}}, ["routing.load_factor", "inf"]),
    ("load-factor-word", {"routing": {"load_factor": "high"}},
     ["routing.load_factor", "'high'", "not a number"]),
    ("load-factor-boolean", {"routing": {"load_factor": True}},
     ["routing.load_factor", "True", "not a number"]),
    ("load-factor-list", {"routing": {"load_factor": [1.5]}},
     ["routing.load_factor", "[1.5]", "not a number"]),
    ("virtual-nodes-zero", {"routing": {"virtual_nodes": 0}},
     ["routing.virtual_nodes", "0", "1..4096"]),
    ("virtual-nodes-huge", {"routing": {"virtual_nodes": 5000}},
     ["routing.virtual_nodes", "5000"]),
    ("virtual-nodes-float", {"routing": {"virtual_nodes": 2.5}},
     ["routing.virtual_nodes", "2.5", "not an integer"]),
    ("min-bound-zero", {"routing": {"min_bound": 0}}, ["routing.min_bound", "0", ">= 1"]),
    ("prefix-chars-negative", {"routing": {"prefix_chars": -5}},
     ["routing.prefix_chars", "-5", ">= 1"]),
    ("session-header-number", {"routing": {"session_header": 7}},
     ["routing.session_header", "7", "not a string"]),
    ("port-negative", {"server": {"port": -1}}, ["server.port", "-1", "0-65535"]),
    ("port-too-large", {"server": {"port": 70000}}, ["server.port", "70000"]),
    ("admin-port-negative", {"server": {"admin_port": -80}}, ["server.admin_port", "-80"]),
    ("port-word", {"server": {"port": "http"}}, ["server.port", "'http'", "not an integer"]),
    ("port-boolean", {"server": {"port": True}}, ["server.port", "True", "not an integer"]),
    ("ports-equal", {"server": {"port": 9000, "admin_port": 9000}},
     ["server.admin_port", "9000", "server.port"]),
    ("log-level", {"server": {"log_level": "verbose"}}, ["server.log_level", "'verbose'"]),
    ("host-number", {"server": {"host": 123}}, ["server.host", "123", "not a string"]),
    ("host-with-port", {"server": {"host": "0.0.0.0:8080"}},
     ["server.host", "'0.0.0.0:8080'", "no port"]),
    ("admin-host-url", {"server": {"admin_host": "http://0.0.0.0"}},
     ["server.admin_host", "'http://0.0.0.0'", "no scheme"]),
    ("debug-from-anywhere-word", {"server": {"debug_from_anywhere": "yes please"}},
     ["server.debug_from_anywhere", "boolean"]),
    ("route-headers-word", {"server": {"route_headers": "maybe"}},
     ["server.route_headers", "'maybe'", "boolean"]),
    ("max-body-small", {"limits": {"max_body_bytes": 100}}, ["limits.max_body_bytes", "100"]),
    ("max-header-small", {"limits": {"max_header_bytes": 10}}, ["limits.max_header_bytes", "10"]),
    ("connect-timeout-zero", {"limits": {"connect_timeout": 0}},
     ["limits.connect_timeout", "0", "> 0"]),
    ("first-byte-timeout-negative", {"limits": {"first_byte_timeout": -1}},
     ["limits.first_byte_timeout", "-1"]),
    ("idle-timeout-inf", {"limits": {"idle_timeout": math.inf}}, ["limits.idle_timeout", "inf"]),
    ("total-timeout-negative", {"limits": {"total_timeout": -1}},
     ["limits.total_timeout", "-1", ">= 0"]),
    ("empty-pool-wait-negative", {"limits": {"empty_pool_wait": -1}},
     ["limits.empty_pool_wait", "-1", ">= 0"]),
    ("empty-pool-wait-inf", {"limits": {"empty_pool_wait": math.inf}},
     ["limits.empty_pool_wait", "inf"]),
    ("section-scalar", {"routing": 5}, ["routing", "5", "mapping"]),
    ("section-list", {"limits": ["a"]}, ["limits", "['a']", "mapping"]),
    ("unknown-section", {"proxy": {"port": 1}}, ["proxy", "unknown section"]),
    ("unknown-key", {"routing": {"replicas": 100}},
     ["routing.replicas", "unknown setting", "virtual_nodes"]),
    ("pools-mapping", {"pools": {"name": "chat"}}, ["pools", "expected a list"]),
    ("pools-empty", {"pools": []}, ["pools", "at least one pool"]),
    ("pool-scalar", {"pools": ["chat"]}, ["pools[0]", "mapping"]),
    ("pool-unknown-key", {"pools": [{**POOL, "weight": 2}]}, ["pools[0].weight", "unknown"]),
    ("pool-name-empty", {"pools": [{**POOL, "name": ""}]}, ["pools[0].name", "''"]),
    ("pool-name-number", {"pools": [{**POOL, "name": 5}]}, ["pools[0].name", "5"]),
    ("pool-models-missing", {"pools": [{"name": "chat"}]},
     ["pools[0].models", "at least one model"]),
    ("pool-models-numbers", {"pools": [{**POOL, "models": [1]}]}, ["pools[0].models", "[1]"]),
    ("pool-models-empty-name", {"pools": [{**POOL, "models": ["llama", ""]}]},
     ["pools[0].models", "''"]),
    ("pool-endpoints-numbers", {"pools": [{**POOL, "endpoints": [8000]}]},
     ["pools[0].endpoints[0]", "8000"]),
    ("duplicate-pool-names", {"pools": [POOL, {**POOL, "models": ["bge"]}]},
     ["pools[1].name", "'chat'", "another pool"]),
    ("duplicate-models", {"pools": [POOL, {"name": "other", "models": ["llama"]}]},
     ["pools[1].models", "'llama'", "'chat'"]),
    ("duplicate-model-in-one-pool", {"pools": [{**POOL, "models": ["llama", "llama"]}]},
     ["pools[0].models", "'llama'"]),
    ("endpoint-ftp", {"pools": [{**POOL, "endpoints": ["ftp://10.0.0.1:8000"]}]},
     ["pools[0].endpoints[0]", "'ftp://10.0.0.1:8000'", "http(s)"]),
    ("endpoint-no-scheme", {"pools": [{**POOL, "endpoints": ["10.0.0.1:8000"]}]},
     ["pools[0].endpoints[0]", "'10.0.0.1:8000'"]),
    ("endpoint-no-host", {"pools": [{**POOL, "endpoints": ["http://"]}]},
     ["pools[0].endpoints[0]", "'http://'"]),
    ("endpoint-port-word", {"pools": [{**POOL, "endpoints": ["http://h:port"]}]},
     ["pools[0].endpoints[0]", "'http://h:port'", "invalid port"]),
    ("endpoint-port-too-large", {"pools": [{**POOL, "endpoints": ["http://h:99999"]}]},
     ["pools[0].endpoints[0]", "'http://h:99999'", "invalid port"]),
    ("endpoint-ending-in-v1", {"pools": [{**POOL, "endpoints": ["http://h:8000/v1"]}]},
     ["pools[0].endpoints[0]", "'http://h:8000/v1'", "ends in /v1", "'http://h:8000'"]),
    ("endpoint-with-dot-segment", {"pools": [{**POOL, "endpoints": ["http://h/a/../b"]}]},
     ["pools[0].endpoints[0]", "'..'", "plain name"]),
    ("endpoint-with-query", {"pools": [{**POOL, "endpoints": ["http://h:8000?a=1"]}]},
     ["pools[0].endpoints[0]", "'http://h:8000?a=1'"]),
    ("second-endpoint-bad", {"pools": [{**POOL, "endpoints": ["http://h:1", "h:2"]}]},
     ["pools[0].endpoints[1]", "'h:2'"]),
]


@pytest.mark.parametrize(
    ("patch", "fragments"), [pytest.param(p, f, id=i) for i, p, f in BAD_VALUES]
)
def test_an_invalid_file_is_rejected_naming_the_key_and_the_value(
    tmp_path: Path, patch: dict[str, Any], fragments: list[str]
) -> None:
    """Each bad value fails to load with a message that names its key and its value."""
    with pytest.raises(ConfigError) as caught:
        load_quietly(write(tmp_path, merged(patch)))
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("patch", "fragments"), [pytest.param(p, f, id=i) for i, p, f in BAD_VALUES]
)
def test_building_settings_in_code_is_validated_the_same_way(
    patch: dict[str, Any], fragments: list[str]
) -> None:
    """from_mapping and validate raise the same messages as loading a file."""
    with pytest.raises(ConfigError) as caught:
        validate(from_mapping(merged(patch)))
    assert fragments[0] in str(caught.value)


@pytest.mark.parametrize(
    "patch",
    [
        {"server": {"port": 0, "admin_port": 0}},
        {"server": {"port": 65535, "admin_port": 1}},
        {"routing": {"load_factor": 1.0, "virtual_nodes": 1, "min_bound": 1, "prefix_chars": 1}},
        {"routing": {"virtual_nodes": 4096}},
        {"limits": {"max_body_bytes": 1024, "total_timeout": 0}},
        {"pools": [{**POOL, "endpoints": ["http://[::1]:8000", "https://h", "http://h:1/"]}]},
        {"pools": [{**POOL, "endpoints": []}]},
    ],
)
def test_values_at_the_edges_of_their_range_are_accepted(
    tmp_path: Path, patch: dict[str, Any]
) -> None:
    """Limits are inclusive, ports may be 0 (any free port), endpoints may be discovered later."""
    load_quietly(write(tmp_path, merged(patch)))


# -- the environment -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"BALANCER_ROUTING_LOAD_FACTOR": "1.5"}, [("routing.load_factor", "1.5")]),
        ({"BALANCER_SERVER_ADMIN_PORT": "9999"}, [("server.admin_port", "9999")]),
        ({"BALANCER_LIMITS_IDLE_TIMEOUT": "5"}, [("limits.idle_timeout", "5")]),
        ({"BALANCER_POOLS": "x", "BALANCER_VERSION": "1", "HOME": "/root"}, []),
        ({"OTHER_ROUTING_LOAD_FACTOR": "2"}, []),
        (
            {"BALANCER_SERVER_PORT": "1", "BALANCER_ROUTING_KEY": "prompt-prefix"},
            [("routing.key", "prompt-prefix"), ("server.port", "1")],
        ),
    ],
)
def test_balancer_variables_become_dotted_overrides(
    environ: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    """BALANCER_<SECTION>_<KEY> maps to section.key; other variables are ignored."""
    assert env_overrides(environ) == expected


@pytest.mark.parametrize(
    ("environ", "dotted", "expected"),
    [
        ({"BALANCER_ROUTING_LOAD_FACTOR": "1.5"}, "routing.load_factor", 1.5),
        ({"BALANCER_ROUTING_STRATEGY": "round-robin"}, "routing.strategy", Strategy.ROUND_ROBIN),
        ({"BALANCER_SERVER_ROUTE_HEADERS": "false"}, "server.route_headers", False),
        ({"BALANCER_SERVER_ROUTE_HEADERS": "ON"}, "server.route_headers", True),
        ({"BALANCER_SERVER_PORT": "8000"}, "server.port", 8000),
        ({"BALANCER_SERVER_HOST": "127.0.0.1"}, "server.host", "127.0.0.1"),
        ({"BALANCER_SERVER_ADMIN_HOST": "0.0.0.0"}, "server.admin_host", "0.0.0.0"),
        ({"BALANCER_SERVER_DEBUG_FROM_ANYWHERE": "true"}, "server.debug_from_anywhere", True),
        ({"BALANCER_LIMITS_TOTAL_TIMEOUT": "90"}, "limits.total_timeout", 90.0),
    ],
)
def test_an_environment_variable_overrides_the_file(
    tmp_path: Path, environ: dict[str, str], dotted: str, expected: Any
) -> None:
    """A BALANCER_* value is converted to the setting's type and replaces the file's."""
    settings = load_quietly(write(tmp_path, MINIMAL), environ=environ)
    assert lookup(settings, dotted) == expected


@pytest.mark.parametrize(
    ("environ", "fragments"),
    [
        ({"BALANCER_ROUTING_LOAD_FACTOR": "lots"}, ["routing.load_factor", "'lots'"]),
        ({"BALANCER_ROUTING_LOAD_FACTOR": "0.5"}, ["routing.load_factor", "0.5"]),
        ({"BALANCER_ROUTING_REPLICAS": "8"}, ["routing.replicas", "unknown setting"]),
        ({"BALANCER_SERVER_ROUTE_HEADERS": "sometimes"}, ["server.route_headers"]),
    ],
)
def test_a_bad_environment_value_is_rejected_naming_the_key(
    tmp_path: Path, environ: dict[str, str], fragments: list[str]
) -> None:
    """A wrong BALANCER_* value fails like a wrong file value."""
    with pytest.raises(ConfigError) as caught:
        load_quietly(write(tmp_path, MINIMAL), environ=environ)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_an_environment_override_fills_an_empty_section(tmp_path: Path) -> None:
    """BALANCER_ROUTING_* applies even when the file has a bare `routing:` line."""
    path = write(tmp_path, "routing:\n" + yaml.safe_dump(MINIMAL))
    settings = load_quietly(path, environ={"BALANCER_ROUTING_LOAD_FACTOR": "1.5"})
    assert settings.routing.load_factor == 1.5


def test_an_override_into_a_scalar_section_names_the_section(tmp_path: Path) -> None:
    """An override cannot add a key to a section the file set to a scalar."""
    path = write(tmp_path, merged({"routing": 5}))
    with pytest.raises(ConfigError, match=r"^routing: expected a mapping"):
        load_quietly(path, environ={"BALANCER_ROUTING_LOAD_FACTOR": "1.5"})


def test_the_file_is_optional_when_overrides_supply_everything() -> None:
    """Settings can come from overrides and extra pools alone."""
    settings = load_quietly(
        None,
        environ={"BALANCER_SERVER_PORT": "7000"},
        extra_pools=(PoolSettings("default", ("llama",), ("http://h:1",)),),
    )
    assert settings.server.port == 7000
    assert settings.pools[0].name == "default"


# -- precedence ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_flags", "expected"),
    [
        (None, None, None, 1.5),
        (1.5, None, None, 1.5),
        (1.5, "2.0", None, 2.0),
        (None, "2.0", None, 2.0),
        (1.5, "2.0", 3.0, 3.0),
        (1.5, None, 3.0, 3.0),
        (None, "2.0", 3.0, 3.0),
    ],
)
def test_flags_win_over_the_environment_which_wins_over_the_file(
    tmp_path: Path, in_file: float | None, in_env: str | None, in_flags: float | None,
    expected: float,
) -> None:
    """Each layer, when present, replaces the one below: file < environment < flags."""
    data = merged({"routing": {"load_factor": in_file}} if in_file is not None else {})
    environ = {"BALANCER_ROUTING_LOAD_FACTOR": in_env} if in_env is not None else {}
    overrides = [("routing.load_factor", in_flags)] if in_flags is not None else []
    settings = load_quietly(write(tmp_path, data), environ=environ, overrides=overrides)
    assert settings.routing.load_factor == expected


# -- command-line flags --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "dotted", "expected"),
    [
        (["--set", "routing.load_factor=1.75"], "routing.load_factor", 1.75),
        (["--set", "routing.strategy=random"], "routing.strategy", Strategy.RANDOM),
        (["--set", "server.route_headers=false"], "server.route_headers", False),
        (["--set", "routing.session_header=x-user"], "routing.session_header", "x-user"),
        (["--set", "server.port = 7000"], "server.port", 7000),
        (["--host", "127.0.0.1"], "server.host", "127.0.0.1"),
        (["--port", "7000"], "server.port", 7000),
        (["--admin-port", "7001"], "server.admin_port", 7001),
        (["--log-level", "warning"], "server.log_level", "warning"),
        (["--strategy", "least-request"], "routing.strategy", Strategy.LEAST_REQUEST),
        (["--load-factor", "2"], "routing.load_factor", 2.0),
        (["--virtual-nodes", "64"], "routing.virtual_nodes", 64),
        (["--key", "prompt-prefix"], "routing.key", KeyMode.PROMPT_PREFIX),
        (["--prefix-chars", "50"], "routing.prefix_chars", 50),
    ],
)
def test_set_and_shortcut_flags_override_the_file(
    tmp_path: Path, flags: list[str], dotted: str, expected: Any
) -> None:
    """--set SECTION.KEY=VALUE and each shortcut flag replace the file's value."""
    data = merged(
        {"server": {"port": 8000, "host": "10.1.1.1"}, "routing": {"load_factor": 1.5}}
    )
    settings = from_flags("--config", str(write(tmp_path, data)), *flags)
    assert lookup(settings, dotted) == expected


def test_endpoint_and_model_flags_add_a_default_pool(tmp_path: Path) -> None:
    """--endpoint URL --model NAME make a pool named 'default' beside the file's pools."""
    settings = from_flags(
        "--config", str(write(tmp_path, MINIMAL)),
        "--endpoint", "http://a:1", "--endpoint", "http://b:2", "--model", "bge",
    )
    assert settings.pools[-1] == PoolSettings("default", ("bge",), ("http://a:1", "http://b:2"))


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--set", "routing.load_factor"], ["--set", "'routing.load_factor'", "SECTION.KEY=VALUE"]),
        (["--set", "pools.name=x"], ["--set", "'pools.name'", "SECTION.KEY"]),
        (["--set", "routing=1"], ["--set", "'routing'"]),
        (["--set", "routing.bogus=1"], ["routing.bogus", "unknown setting"]),
        (["--load-factor", "0.5"], ["routing.load_factor", "0.5"]),
        (["--strategy", "fastest"], ["routing.strategy", "'fastest'"]),
        (["--port", "-3"], ["server.port", "-3"]),
        (["--endpoint", "http://a:1"], ["--endpoint", "--model"]),
        (["--endpoint", "ftp://a:1", "--model", "bge"], ["pools[1].endpoints[0]", "ftp://a:1"]),
        (["--model", "llama", "--endpoint", "http://a:1"], ["pools[1].models", "'llama'"]),
    ],
)
def test_a_bad_flag_is_rejected_naming_the_flag_or_key(
    tmp_path: Path, flags: list[str], fragments: list[str]
) -> None:
    """Wrong flag values fail with a message that names what is wrong."""
    with pytest.raises(ConfigError) as caught:
        from_flags("--config", str(write(tmp_path, MINIMAL)), *flags)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize("host", ["", "0.0.0.0", "127.0.0.1", "::", "::1", "fd00::1",
                                  "localhost", "balancer.llm.svc.cluster.local"])
def test_listen_addresses_and_host_names_are_accepted(host: str) -> None:
    """Both listen addresses take an IP address (v4 or v6) or a host name; an empty
    admin_host means the proxy's."""
    settings = from_mapping({"server": {"host": host or "0.0.0.0", "admin_host": host},
                             "pools": [POOL]})
    assert settings.server.admin_host == host
