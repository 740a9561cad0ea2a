"""The command line: check-config and route, their output and their exit codes."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer import __version__
from balancer.cli import EXIT_CONFIG, explain_route, main
from balancer.config import as_dict, load
from balancer.ring import hash_key

ENDPOINT_IDS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
CONFIG = {
    "pools": [
        {
            "name": "chat",
            "models": ["llama"],
            "endpoints": [f"http://{e}" for e in ENDPOINT_IDS],
        }
    ],
    # Explicit, so the bound arithmetic below does not follow the default.
    "routing": {"load_factor": 1.25},
}
CHAT = {
    "model": "llama",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
    ],
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "balancer.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    return write_request(tmp_path, CHAT)


def write_request(tmp_path: Path, body: Any, name: str = "request.json") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def route_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "route", "--json", *argv)
    assert (code, err) == (0, "")
    result: dict[str, Any] = json.loads(out)
    return result


# -- check-config --------------------------------------------------------------------------


def test_check_config_prints_the_effective_configuration_as_yaml(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    """A valid file exits 0 and prints every setting, defaults included, as YAML."""
    code, out, err = run(capsys, "check-config", str(config_file))
    assert (code, err) == (0, "")
    printed = yaml.safe_load(out)
    assert printed == as_dict(load(config_file, environ={}))
    assert printed["routing"]["strategy"] == "chwbl"
    assert list(printed) == ["server", "pools", "routing", "load", "limits", "health", "retries",
                            "drain"]


def test_check_config_shows_flag_overrides(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    """--set and shortcut flags are applied before the configuration is printed."""
    code, out, _ = run(
        capsys, "check-config", str(config_file), "--set", "routing.min_bound=5", "--port", "7000"
    )
    printed = yaml.safe_load(out)
    assert code == 0
    assert (printed["routing"]["min_bound"], printed["server"]["port"]) == (5, 7000)


@pytest.mark.parametrize(
    ("patch", "fragments"),
    [
        ({"routing": {"load_factor": 0.5}}, ["routing.load_factor", "0.5"]),
        ({"routing": {"strategy": "fastest"}}, ["routing.strategy", "'fastest'"]),
        ({"server": {"port": -1}}, ["server.port", "-1"]),
        ({"pools": []}, ["pools"]),
        ({"cache": {}}, ["cache", "unknown section"]),
    ],
)
def test_check_config_rejects_a_bad_file_with_exit_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, patch: dict[str, Any],
    fragments: list[str],
) -> None:
    """A bad configuration prints nothing on stdout and an error naming the key on stderr."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **patch}), encoding="utf-8")
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith("configuration error: ")
    for fragment in fragments:
        assert fragment in err


def test_check_config_reports_a_missing_file_with_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A path that does not exist is a configuration error naming the path."""
    code, _, err = run(capsys, "check-config", str(tmp_path / "nope.yaml"))
    assert code == EXIT_CONFIG
    assert "nope.yaml" in err


# -- route ---------------------------------------------------------------------------------


def test_route_prints_the_key_the_ring_walk_and_the_chosen_endpoint(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path
) -> None:
    """The text report shows the key, each endpoint of the walk and where the request goes."""
    result = route_json(capsys, "--config", str(config_file), str(request_file))
    code, out, err = run(capsys, "route", "--config", str(config_file), str(request_file))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "key:       'llama\\x00Hello' (first-user-message)" in lines
    assert f"key hash:  {hash_key('llama' + chr(0) + 'Hello'):016x}" in lines
    assert "bound:     2 in-flight requests per endpoint" in lines
    walk = lines[lines.index("ring walk:") + 1 : lines.index("ring walk:") + 4]
    assert [line.split()[1] for line in walk] == [s["endpoint"] for s in result["ring_walk"]]
    assert walk[0].endswith("(in flight 0)  <- chosen")
    assert sum("<- chosen" in line for line in lines) == 1
    assert f"endpoint:  {result['endpoint']} http://{result['endpoint']}" in lines
    assert any(line.startswith("route:     primary: ") for line in lines)


def test_route_json_describes_the_decision(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path
) -> None:
    """--json prints the pool, key, hash, bound, walk, endpoint, outcome and probes."""
    result = route_json(capsys, "--config", str(config_file), str(request_file))
    key = "llama\x00Hello"
    first = result["ring_walk"][0]["endpoint"]
    assert result == {
        "pool": "chat",
        "strategy": "chwbl",
        "key_source": "first-user-message",
        "key_from": result["key_from"],
        "key": key,
        "key_hash": f"{hash_key(key):016x}",
        "signal": "in-flight",
        "bound": 2,
        "ring_walk": result["ring_walk"],
        "endpoint": first,
        "url": f"http://{first}",
        "outcome": "primary",
        "reason": "the key's first endpoint on the ring is within the load bound "
                  "(load: this balancer's in-flight requests)",
        "probes": [{"endpoint": first, "in_flight": 0}],
    }
    assert sorted(s["endpoint"] for s in result["ring_walk"]) == sorted(ENDPOINT_IDS)
    assert {s["in_flight"] for s in result["ring_walk"]} == {0}


def test_route_json_is_the_same_on_every_run(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path
) -> None:
    """Two runs print byte-identical JSON, as two balancer replicas would decide alike."""
    argv = ("route", "--json", "--config", str(config_file), str(request_file))
    first, second = run(capsys, *argv), run(capsys, *argv)
    assert first == second


def test_route_matches_explain_route(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path
) -> None:
    """The command prints what explain_route computes for the same settings and body."""
    result = route_json(capsys, "--config", str(config_file), str(request_file))
    assert result == explain_route(load(config_file, environ={}), CHAT)


def test_a_later_turn_of_the_conversation_routes_to_the_same_endpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config_file: Path, request_file: Path
) -> None:
    """Appending the assistant reply and a new question keeps the key and the endpoint once
    the first user message is long enough to key on (here: with min_key_chars 0)."""
    later = {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "content": "Hi."},
                                  {"role": "user", "content": "How are you?"}]}
    turn_two = write_request(tmp_path, later, "turn2.json")
    flags = ("--config", str(config_file), "--min-key-chars", "0")
    first = route_json(capsys, *flags, str(request_file))
    second = route_json(capsys, *flags, str(turn_two))
    assert (second["key"], second["endpoint"]) == (first["key"], first["endpoint"])


def test_a_greeting_keys_on_the_reply_and_next_message_from_the_second_turn(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config_file: Path, request_file: Path
) -> None:
    """A short first message ("Hello") extends its key through the two messages after it
    from turn 2 on, and the third turn keeps the second's key; the explanation says so."""
    turns = [[*CHAT["messages"], {"role": "assistant", "content": "Hi."},
              {"role": "user", "content": "How are you?"}]]
    turns.append([*turns[0], {"role": "assistant", "content": "Fine."},
                  {"role": "user", "content": "Good."}])
    first = route_json(capsys, "--config", str(config_file), str(request_file))
    assert first["key"] == "llama\x00Hello"
    assert "under min_key_chars 64; from the next turn" in first["key_from"]
    later = [route_json(capsys, "--config", str(config_file),
                        str(write_request(tmp_path, {**CHAT, "messages": m}, f"t{i}.json")))
             for i, m in enumerate(turns)]
    assert later[0]["key"] == "llama\x00Hello\nassistant:Hi.\nuser:How are you?"
    assert later[1]["key"] == later[0]["key"]
    assert "and the 2 message(s) after it" in later[0]["key_from"]


@pytest.mark.parametrize(
    ("first_load", "outcome", "bound"),
    [
        (1, "primary", 2),  # 1 + 1 <= max(2, ceil(1.25 * 2 / 3)): still room
        (2, "overflow", 2),  # at the bound of 2: the next endpoint on the ring takes it
        (5, "overflow", 3),  # ceil(1.25 * 6 / 3) = 3, and 5 is over it
    ],
)
def test_load_on_the_first_endpoint_moves_the_request_along_the_ring(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path,
    first_load: int, outcome: str, bound: int,
) -> None:
    """--load ENDPOINT=N at the bound makes the request overflow to the walk's next endpoint."""
    idle = route_json(capsys, "--config", str(config_file), str(request_file))
    first, second = (s["endpoint"] for s in idle["ring_walk"][:2])
    result = route_json(
        capsys, "--config", str(config_file), str(request_file), "--load", f"{first}={first_load}"
    )
    assert (result["outcome"], result["bound"]) == (outcome, bound)
    assert result["endpoint"] == (first if outcome == "primary" else second)
    assert result["ring_walk"][0] == {"endpoint": first, "in_flight": first_load,
                                      "queue_estimate": 0.0, "report": None}
    assert result["probes"][0] == {"endpoint": first, "in_flight": first_load}


def test_load_on_every_endpoint_raises_the_bound(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path
) -> None:
    """When all endpoints are equally busy the bound grows and the key keeps its endpoint."""
    loads = [arg for e in ENDPOINT_IDS for arg in ("--load", f"{e}=2")]
    result = route_json(capsys, "--config", str(config_file), str(request_file), *loads)
    # total 6: ceil(1.25 * 7 / 3) = 3, so 2 in flight leaves room on the first endpoint.
    assert (result["bound"], result["outcome"]) == (3, "primary")


def test_the_overflow_is_explained_in_the_text_report(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path
) -> None:
    """The text report marks the overflow endpoint and says why the first was passed."""
    idle = route_json(capsys, "--config", str(config_file), str(request_file))
    first, second = (s["endpoint"] for s in idle["ring_walk"][:2])
    code, out, _ = run(capsys, "route", "--config", str(config_file), str(request_file),
                       "--load", f"{first}=2")
    assert code == 0
    assert f"  1. {first} (in flight 2)" in out.splitlines()
    assert f"  2. {second} (in flight 0)  <- chosen" in out.splitlines()
    assert "route:     overflow: earlier endpoints on the ring were at the load bound" in out


@pytest.mark.parametrize(
    ("extra", "body_patch", "key"),
    [
        (["--session", "conv-7"], {}, "session\x00conv-7"),
        ([], {"user": "alice"}, "user\x00alice"),
        (["--session", "conv-7"], {"user": "alice"}, "session\x00conv-7"),
    ],
)
def test_an_explicit_session_key_replaces_the_prefix_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config_file: Path,
    extra: list[str], body_patch: dict[str, Any], key: str,
) -> None:
    """--session, or else the body's user field, is the key and the outcome says session."""
    request = write_request(tmp_path, {**CHAT, **body_patch})
    result = route_json(capsys, "--config", str(config_file), str(request), *extra)
    assert (result["key"], result["key_source"], result["outcome"]) == (key, "session", "session")


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/v1/completions", {"model": "llama", "prompt": "Once"}, "llama\x00Once"),
        ("/v1/embeddings", {"model": "llama", "input": [1, 2]}, "llama\x001,2"),
        (None, {"model": "llama", "prompt": ["A", "B"]}, "llama\x00A"),
        (None, {"model": "llama", "input": "Embed"}, "llama\x00Embed"),
    ],
)
def test_route_handles_completions_and_embeddings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config_file: Path,
    path: str | None, body: dict[str, Any], key: str,
) -> None:
    """The request kind comes from --path or, without it, from the body's fields."""
    request = write_request(tmp_path, body)
    extra = ["--path", path] if path else []
    assert route_json(capsys, "--config", str(config_file), str(request), *extra)["key"] == key


def test_route_shortcut_flags_change_the_key_and_strategy(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path
) -> None:
    """--key, --prefix-chars and --strategy apply to the explanation."""
    result = route_json(capsys, "--config", str(config_file), str(request_file),
                        "--key", "prompt-prefix", "--prefix-chars", "10")
    assert (result["key"], result["key_source"]) == ("llama\x00system:You", "prompt-prefix")
    result = route_json(capsys, "--config", str(config_file), str(request_file),
                        "--strategy", "round-robin")
    assert result["reason"] == "round-robin ignores the key"


@pytest.mark.parametrize(
    ("body", "extra", "fragments"),
    [
        ({**CHAT, "model": "gpt-4"}, [], ["'gpt-4'", "Known models: llama"]),
        ({"model": "llama", "messages": []}, [], ["'messages'"]),
        ({"model": "llama", "messages": [{"role": "user", "content": 5}]}, [],
         ["messages[0].content"]),
        ({**CHAT, "stream": "yes"}, [], ["'stream'"]),
        ({"model": "llama"}, [], ["no messages, prompt or input"]),
        (CHAT, ["--path", "/v1/models"], ["--path", "'/v1/models'"]),
        ("not json", [], ["cannot read request"]),
        ("[1, 2]", [], ["must hold a JSON object"]),
        (CHAT, ["--load", "10.0.0.1:8000"], ["--load", "ENDPOINT=N"]),
        (CHAT, ["--load", "10.0.0.1:8000=many"], ["--load", "'10.0.0.1:8000=many'"]),
        (CHAT, ["--load", "10.0.0.1:8000=-1"], ["--load", "N >= 0"]),
        (CHAT, ["--load", "=3"], ["--load"]),
        (CHAT, ["--load-factor", "0.5"], ["routing.load_factor", "0.5"]),
    ],
)
def test_route_rejects_bad_input_with_exit_2_and_a_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config_file: Path,
    body: Any, extra: list[str], fragments: list[str],
) -> None:
    """Bad requests, paths, loads and settings exit 2 with a message and no traceback."""
    request = write_request(tmp_path, body)
    code, out, err = run(capsys, "route", "--config", str(config_file), str(request), *extra)
    assert (code, out) == (EXIT_CONFIG, "")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_route_reports_a_missing_request_file_with_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config_file: Path
) -> None:
    """A request path that does not exist is named in the error."""
    code, _, err = run(capsys, "route", "--config", str(config_file), str(tmp_path / "no.json"))
    assert code == EXIT_CONFIG
    assert "no.json" in err


def test_route_requires_a_configuration_file(
    capsys: pytest.CaptureFixture[str], request_file: Path
) -> None:
    """route without --config is a usage error."""
    with pytest.raises(SystemExit) as caught:
        main(["route", str(request_file)])
    assert caught.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_explain_route_shows_at_most_walk_limit_endpoints(config_file: Path) -> None:
    """The printed walk is cut to walk_limit endpoints."""
    result = explain_route(load(config_file, environ={}), CHAT, walk_limit=2)
    assert len(result["ring_walk"]) == 2


# -- the program -----------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"balancer {__version__}"


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    """Running without a command is a usage error."""
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2


def test_python_dash_m_balancer_runs_the_command_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    """`python -m balancer check-config FILE` exits with main's status."""
    monkeypatch.setattr(sys, "argv", ["balancer", "check-config", str(config_file)])
    with pytest.raises(SystemExit) as caught:
        runpy.run_module("balancer", run_name="__main__")
    assert caught.value.code == 0
    assert "chwbl" in capsys.readouterr().out


def test_reported_queues_route_on_the_pods_queues(
    capsys: pytest.CaptureFixture[str], config_file: Path, request_file: Path
) -> None:
    """--report ENDPOINT=WAITING[,KV] on every endpoint bounds queues: a long queue on the
    key's endpoint moves the request along the ring, and the walk shows each report."""
    idle = route_json(capsys, "--config", str(config_file), str(request_file))
    first, second = (s["endpoint"] for s in idle["ring_walk"][:2])
    reports = ["--set", "load.source=auto"] + [
        arg for e in ENDPOINT_IDS for arg in ("--report", f"{e}={6 if e == first else 0},0.5")]
    result = route_json(capsys, "--config", str(config_file), str(request_file), *reports)
    assert (result["signal"], result["outcome"], result["endpoint"]) == (
        "queue", "overflow", second)
    assert result["bound"] == 4
    step = result["ring_walk"][0]
    assert (step["queue_estimate"], step["report"]["waiting"], step["report"]["kv_usage"],
            step["report"]["source"]) == (6.0, 6.0, 0.5, "assumed")
    assert result["probes"][0] == {"endpoint": first, "queued": 6.0}
    code, out, _ = run(capsys, "route", "--config", str(config_file), str(request_file),
                       *reports)
    assert code == 0
    assert "bound:     4 queued requests per endpoint" in out
    assert f"1. {first} (in flight 0, queue 6 (reported 6, KV 50%, " in out


@pytest.mark.parametrize("item", ["x=-1", "x=lots", "=3", "x=1,2.5", "x=1,kv"])
def test_a_malformed_report_is_refused(capsys: pytest.CaptureFixture[str], config_file: Path,
                                       request_file: Path, item: str) -> None:
    code = main(["route", "--config", str(config_file), str(request_file), "--report", item])
    assert code == EXIT_CONFIG
    assert "--report" in capsys.readouterr().err


# -- tune ----------------------------------------------------------------------------------

TEMPLATE = "Answer the customer politely and briefly. Customer question follows: ".ljust(150, ".")


def write_trace(tmp_path: Path, lines: list[Any], name: str = "trace.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


@pytest.fixture
def templated_trace(tmp_path: Path) -> Path:
    """Bare recorded bodies: four two-turn conversations behind one 150-character template."""
    lines = []
    for i in range(4):
        first = {"role": "user", "content": f"{TEMPLATE}{'WXYZ'[i]}: where is my order {i}?"}
        lines.append({"conversation_id": f"c{i}", "model": "llama", "messages": [first]})
        lines.append({"conversation_id": f"c{i}", "model": "llama", "messages": [
            first, {"role": "assistant", "content": "Soon."},
            {"role": "user", "content": "When exactly?"}]})
    return write_trace(tmp_path, lines)


def test_tune_prints_a_row_per_candidate_and_the_recommendation(
    capsys: pytest.CaptureFixture[str], templated_trace: Path
) -> None:
    """The table marks the current setting (from the flags) and the recommended one."""
    code, out, err = run(capsys, "tune", "--trace", str(templated_trace), "--prefix-chars", "100")
    assert (code, err) == (0, "")
    assert out.startswith("trace: 8 requests in 4 conversations")
    rows = [line for line in out.splitlines() if line.startswith("first-user-message")]
    assert len(rows) == 18
    assert [r.split()[:3] for r in rows if "<- current" in r] == [
        ["first-user-message", "100", "64"]]
    assert [r.split()[:3] for r in rows if "<- recommended" in r] == [
        ["first-user-message", "250", "64"]]
    assert "recommended: prefix_chars 250, min_key_chars 64\n" in out
    assert "why: prefix_chars 100, min_key_chars 64 gives 4 of 4 conversations a key" in out


def test_tune_reads_the_current_setting_from_the_configuration(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, templated_trace: Path
) -> None:
    """--config and --set give the current setting; the default one is kept when it is best."""
    config = tmp_path / "b.yaml"
    config.write_text(yaml.safe_dump({"routing": {"prefix_chars": 250}}), encoding="utf-8")
    result = tune_json(capsys, "--trace", str(templated_trace), "--config", str(config),
                       "--set", "routing.min_key_chars=0")
    current = [c for c in result["candidates"] if c["current"]]
    assert [(c["prefix_chars"], c["min_key_chars"]) for c in current] == [(250, 0)]
    assert result["recommendation"]["is_current"] is True
    assert result["recommendation"]["reason"].startswith("keep the current setting")


def tune_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "tune", "--json", *argv)
    assert (code, err) == (0, "")
    result: dict[str, Any] = json.loads(out)
    return result


def test_tune_json_describes_every_candidate(
    capsys: pytest.CaptureFixture[str], templated_trace: Path
) -> None:
    """--json: the trace, the pods' fair share, one object per candidate, the recommendation."""
    result = tune_json(capsys, "--trace", str(templated_trace), "--pods", "8",
                       "--shared-chars", "100")
    assert result["trace"]["requests"] == 8 and result["trace"]["conversations"] == 4
    assert result["trace"]["placeholder_replies"] is False
    assert (result["pods"], result["fair_share"], result["shared_chars"]) == (8, 0.125, 100)
    # With --shared-chars 100 the template itself counts as a shared opening.
    assert result["trace"]["shared_openings"] == {"groups": 1, "conversations": 4}
    assert len(result["candidates"]) == 19
    at_100 = next(c for c in result["candidates"]
                  if (c["key"], c["prefix_chars"], c["min_key_chars"])
                  == ("first-user-message", 100, 64))
    assert at_100["keys"] == 1 and at_100["hottest_key"] == {"requests": 8, "share": 1.0}
    assert at_100["split_shared"] == {"groups": 0, "requests": 0}
    at_1000 = next(c for c in result["candidates"] if c["current"])
    assert at_1000["split_shared"] == {"groups": 1, "requests": 6}
    assert result["recommendation"]["prefix_chars"] == 100


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (['{"model": "llama", "messages": [{"role": "user", "content": "hi"}]}', "{not json"],
         "trace.jsonl:2: not valid JSON"),
        ([{"model": "llama", "messages": []}], "trace.jsonl:1: 'messages' must be a non-empty"),
        ([{"body": {"model": "llama", "prompt": "x"}, "turns": 1}],
         "trace.jsonl:1: unknown field(s) 'turns'"),
    ],
)
def test_tune_reports_a_malformed_trace_with_its_line_number(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, lines: list[Any], fragment: str
) -> None:
    """The parser's error, with the line number, exits 2 and prints nothing on stdout."""
    code, out, err = run(capsys, "tune", "--trace", str(write_trace(tmp_path, lines)))
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith("error: ") and fragment in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--pods", "0"], "--pods"),
        (["--shared-chars", "0"], "--shared-chars"),
        (["--set", "routing.prefix_chars=0"], "routing.prefix_chars"),
    ],
)
def test_tune_refuses_bad_settings_with_exit_2(
    capsys: pytest.CaptureFixture[str], templated_trace: Path, argv: list[str], fragment: str
) -> None:
    code, out, err = run(capsys, "tune", "--trace", str(templated_trace), *argv)
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith("configuration error: ") and fragment in err


def test_tune_reports_a_missing_or_empty_trace_with_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "tune", "--trace", str(tmp_path / "none.jsonl"))
    assert code == EXIT_CONFIG and "none.jsonl" in err
    code, _, err = run(capsys, "tune", "--trace", str(write_trace(tmp_path, [""])))
    assert code == EXIT_CONFIG and "holds no requests" in err
