"""The request-target check and the forward allow-list: pure, table-driven and properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.config import (
    DEFAULT_FORWARD_PATHS,
    ConfigError,
    ForwardPath,
    ServerSettings,
    Settings,
    load,
    parse_forward_path,
    validate,
)
from balancer.paths import AllowList, Target, TargetError, Verdict, parse_target

# -- parse_target ----------------------------------------------------------------------------

ACCEPTED = [
    # (method, raw target, decoded path, forwarded target)
    ("POST", "/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions"),
    ("GET", "/v1/responses/resp_1?stream=true&starting_after=3",
     "/v1/responses/resp_1", "/v1/responses/resp_1?stream=true&starting_after=3"),
    ("POST", "/v1/chat/%63ompletions", "/v1/chat/completions", "/v1/chat/completions"),
    ("GET", "/v1/responses/a%20b", "/v1/responses/a b", "/v1/responses/a%20b"),
    ("GET", "/v1/responses/%7e%41", "/v1/responses/~A", "/v1/responses/~A"),
    ("GET", "/v1/responses/%25", "/v1/responses/%", "/v1/responses/%25"),
    ("GET", "/v1/x/%252e%252e", "/v1/x/%2e%2e", "/v1/x/%252e%252e"),
    ("GET", "/v1/.well-known/x", "/v1/.well-known/x", "/v1/.well-known/x"),
    ("GET", "/v1/x..y/...", "/v1/x..y/...", "/v1/x..y/..."),
    ("GET", "/v1/%FF", "/v1/\udcff", "/v1/%FF"),
    ("GET", "/v1/models?", "/v1/models", "/v1/models"),
    ("GET", "/v1/x?q=%zz|", "/v1/x", "/v1/x?q=%25zz%7C"),
    ("GET", "/v1/x?a=%41", "/v1/x", "/v1/x?a=%41"),
    ("OPTIONS", "/v1/models", "/v1/models", "/v1/models"),
]


@pytest.mark.parametrize(("method", "raw", "path", "forward"), ACCEPTED,
                         ids=[c[1] for c in ACCEPTED])
def test_an_accepted_target_is_decoded_for_matching_and_reencoded_for_forwarding(
        method: str, raw: str, path: str, forward: str) -> None:
    """The path is matched as a model server decodes it and forwarded canonically encoded."""
    assert parse_target(method, raw) == Target(path, forward)


REFUSED = [
    # (method, raw target, fragment of the reason)
    ("GET", "/v1/../metrics", "dot segment"),
    ("GET", "/v1/./models", "dot segment"),
    ("GET", "/v1/..", "dot segment"),
    ("GET", "/v1/%2e%2e/metrics", "dot segment"),
    ("GET", "/v1/%2E%2E/x", "dot segment"),
    ("GET", "/v1/.%2e/x", "dot segment"),
    ("GET", "/v1/%2e/models", "dot segment"),
    ("GET", "/v1/a%2fb", "encoded slash"),
    ("GET", "/v1/a%2Fb", "encoded slash"),
    ("GET", "/v1/a%5cb", "backslash"),
    ("GET", "/v1/\\..\\metrics", "backslash"),
    ("GET", "/v1/a%00b", "control character"),
    ("GET", "/v1/a%0d%0aX:%20y", "control character"),
    ("GET", "/v1/a%zzb", "malformed percent-encoding"),
    ("GET", "/v1/a%2", "malformed percent-encoding"),
    ("GET", "/v1/x#frag", "fragment"),
    ("GET", "http://x/v1/models", "absolute-form"),
    ("GET", "HTTP://x/v1/models", "absolute-form"),
    ("GET", "x/v1/models", "absolute-form"),
    ("GET", "", "absolute-form"),
    ("CONNECT", "host:443", "CONNECT"),
    ("CONNECT", "/v1/models", "CONNECT"),
    ("OPTIONS", "*", "asterisk-form"),
]


@pytest.mark.parametrize(("method", "raw", "reason"), REFUSED, ids=[c[1] for c in REFUSED])
def test_a_target_a_server_could_read_differently_is_refused(method: str, raw: str,
                                                              reason: str) -> None:
    """Dot segments (raw or encoded), encoded slashes, control bytes and non-origin forms."""
    with pytest.raises(TargetError, match=reason):
        parse_target(method, raw)


TARGETS = st.text(alphabet=st.sampled_from([*"/.%2eEfF5cC0aAv1?#=&x~ \\", "\udcff"]),
                  max_size=24).map(lambda s: "/" + s)


@given(raw=TARGETS)
def test_a_forwarded_target_is_canonical_and_means_what_was_matched(raw: str) -> None:
    """Whatever passes is forwarded as a fixed point of the check: parsing the forwarded
    target again gives the same path and target, and it has no dot segment or encoded
    slash a model server could resolve differently."""
    try:
        target = parse_target("GET", raw)
    except TargetError:
        return
    assert parse_target("GET", target.forward) == target
    path = target.forward.partition("?")[0]
    segments = path.split("/")
    assert not {".", ".."} & set(segments)
    assert not re.search(r"%2f|%5c|%2e|[\\#]", path, re.IGNORECASE)
    assert target.forward.isascii()


# -- the allow-list --------------------------------------------------------------------------


def test_the_default_list_forwards_the_inference_api_and_nothing_else() -> None:
    """vLLM/SGLang inference paths pass; LoRA and other admin paths do not; retries only
    for the entries that only compute."""
    allowed = AllowList(DEFAULT_FORWARD_PATHS)
    assert allowed.match("POST", "/v1/responses").rule is not None
    assert not allowed.match("POST", "/v1/responses").replayable
    assert allowed.match("GET", "/v1/responses/resp_1").replayable
    assert allowed.match("POST", "/v1/responses/resp_1/cancel").rule is not None
    assert not allowed.match("POST", "/v1/responses/resp_1/cancel").replayable
    for path in ("/v1/tokenize", "/v1/detokenize", "/v1/rerank", "/v1/score",
                 "/v1/audio/transcriptions", "/v1/audio/translations"):
        assert allowed.match("POST", path).replayable, path
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/metrics",
                 "/v1/responses/", "/v1/responses//cancel", "/v1/responses/a/b",
                 "/v1/tokenize/", "/v1//tokenize"):
        assert allowed.match("POST", path) == Verdict(None, ()), path
    assert allowed.match("DELETE", "/v1/responses/resp_1") == Verdict(None, ("GET",))
    assert allowed.match("GET", "/v1/tokenize") == Verdict(None, ("POST",))


def test_an_operator_can_open_the_lora_admin_paths() -> None:
    """Entries add paths exactly as written; the first entry for a method wins."""
    allowed = AllowList((*DEFAULT_FORWARD_PATHS, "POST /v1/load_lora_adapter",
                         "POST /v1/unload_lora_adapter", "GET /v1/responses/{id} retry"))
    verdict = allowed.match("POST", "/v1/load_lora_adapter")
    assert verdict.rule == ForwardPath("POST", ("v1", "load_lora_adapter"), False)
    assert not verdict.replayable
    assert allowed.match("GET", "/v1/responses/x").rule == ForwardPath(
        "GET", ("v1", "responses", None), False)


SEGMENT = st.sampled_from(["v1", "a", "b", "responses", "x-y", "{p}", "{id}"])
PATH_SEGMENT = st.sampled_from(["v1", "a", "b", "responses", "x-y", "", "zz", "{p}"])
METHOD = st.sampled_from(["GET", "POST", "DELETE"])


def _reference(entries: list[str], method: str, path: str) -> tuple[bool, set[str]]:
    """The naive reading of the entries: one regex per entry, tried in order."""
    methods = set()
    for entry in entries:
        rule_method, pattern = entry.split()[:2]
        regex = "/".join("[^/]+" if s.startswith("{") else re.escape(s)
                         for s in pattern.split("/"))
        if re.fullmatch(regex, path):
            if rule_method == method:
                return True, set()
            methods.add(rule_method)
    return False, methods


@given(rules=st.lists(st.tuples(METHOD, st.lists(SEGMENT, min_size=1, max_size=3)),
                      max_size=6),
       method=METHOD, segments=st.lists(PATH_SEGMENT, max_size=4))
def test_matching_agrees_with_one_regex_per_entry(
        rules: list[tuple[str, list[str]]], method: str, segments: list[str]) -> None:
    """Exact lookups and {param} patterns together answer as the naive matcher does."""
    entries = [f"{m} /v1/{'/'.join(s)}" for m, s in rules]
    path = "/v1/" + "/".join(segments) if segments else "/v1"
    verdict = AllowList(entries).match(method, path)
    found, methods = _reference(entries, method, path)
    assert (verdict.rule is not None) == found
    if not found:
        assert set(verdict.allowed) == methods


# -- the setting -----------------------------------------------------------------------------

BAD_ENTRIES = [
    ("/v1/x", "METHOD /v1/path"),
    ("POST /v1/x again", "METHOD /v1/path"),
    ("post /v1/x", "HTTP method"),
    ("CONNECT /v1/x", "CONNECT is refused"),
    ("POST /metrics", "must start with /v1/"),
    ("POST /v1/../metrics", "neither a plain name"),
    ("POST /v1/a//b", "neither a plain name"),
    ("POST /v1/a%2fb", "neither a plain name"),
    ("POST /v1/{id", "neither a plain name"),
    ("POST /v1/x{id}", "neither a plain name"),
]


@pytest.mark.parametrize(("entry", "fragment"), BAD_ENTRIES, ids=[e for e, _ in BAD_ENTRIES])
def test_a_malformed_entry_stops_the_start_naming_it(entry: str, fragment: str) -> None:
    """Validation names the setting, the entry's index and what is wrong."""
    settings = Settings(server=ServerSettings(forward_paths=("POST /v1/ok", entry)))
    with pytest.raises(ConfigError, match=re.escape("server.forward_paths[1]")) as info:
        validate(settings, require_pools=False)
    assert fragment in str(info.value)


def test_the_setting_comes_from_a_list_or_a_comma_separated_override() -> None:
    """YAML lists and --set/environment strings give the same entries."""
    entries = "POST /v1/load_lora_adapter, GET /v1/responses/{id} retry"
    from_env = load(environ={"BALANCER_SERVER_FORWARD_PATHS": entries}, require_pools=False)
    assert from_env.server.forward_paths == ("POST /v1/load_lora_adapter",
                                             "GET /v1/responses/{id} retry")
    from_flag = load(overrides=[("server.forward_paths", ["POST /v1/score retry"])],
                     environ={}, require_pools=False)
    assert from_flag.server.forward_paths == ("POST /v1/score retry",)
    assert parse_forward_path("GET /v1/responses/{id} retry").retry
    with pytest.raises(ConfigError, match=r"server\.forward_paths"):
        load(overrides=[("server.forward_paths", 7)], environ={}, require_pools=False)
