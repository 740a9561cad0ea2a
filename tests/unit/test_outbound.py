"""A pool's way to its endpoints: https URLs with a path prefix, TLS settings, injected
headers (their sources, their checks, their rotation, their redaction) and timeouts."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any

import httptools
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from balancer import forward
from balancer.cli import main
from balancer.config import (
    RESERVED_HEADERS,
    ConfigError,
    LimitsSettings,
    PoolHeader,
    Settings,
    as_dict,
    from_mapping,
    header_value_problem,
    validate,
)
from balancer.endpoints import static_endpoint
from balancer.outbound import InjectedHeader, outbounds
from balancer.upstream import ConnectionPool, serialize_head
from tests.tlscerts import Certs, certs_for_session

SECRET = "sk-unit-7e3a91"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return certs_for_session(tmp_path_factory)


def pool(**extra: Any) -> dict[str, Any]:
    return {"name": "hosted", "models": ["gpt"], "endpoints": ["https://api.example.com"],
            **extra}


def settings(*pools: dict[str, Any], **sections: Any) -> Settings:
    return validate(from_mapping({"pools": list(pools), **sections}))


def refused(*pools: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        outbounds(settings(*pools))
    return str(caught.value)


# -- endpoint URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "endpoint_id", "base"), [
    ("https://api.example.com", "api.example.com:443", "https://api.example.com:443"),
    ("https://api.example.com/", "api.example.com:443", "https://api.example.com:443"),
    ("https://gw:8443/openai/", "gw:8443/openai", "https://gw:8443/openai"),
    ("http://10.0.0.1:8000", "10.0.0.1:8000", "http://10.0.0.1:8000"),
])
def test_a_static_endpoint_keeps_its_path_prefix(url: str, endpoint_id: str, base: str) -> None:
    """The prefix is part of the endpoint's URL (and id: two prefixes on one host are two
    endpoints), and the connection pool puts it before every path."""
    endpoint = static_endpoint(url)
    assert (endpoint.id, endpoint.url) == (endpoint_id, base)
    settings(pool(endpoints=[url]))


async def test_the_connection_pool_splits_host_and_prefix() -> None:
    """Host header and SNI come from the host; the prefix is kept apart."""
    pool_ = ConnectionPool("https://gw:8443/openai", 1.0, server_name="model.test")
    assert (pool_.host, pool_.port, pool_.prefix, pool_.host_header, pool_.server_name) == (
        "gw", 8443, "/openai", "gw:8443", "model.test")
    plain = ConnectionPool("http://10.0.0.1:8000", 1.0)
    assert (plain.prefix, plain.ssl_context, plain.server_name) == ("", None, None)


@pytest.mark.parametrize(("url", "fragments"), [
    ("https://api.openai.com/v1", ["ends in /v1", "'https://api.openai.com'"]),
    ("https://gw/openai/v1/", ["ends in /v1", "'https://gw/openai'"]),
    ("https://gw/a//b", ["path segment ''"]),
    ("https://gw/%2e%2e", ["path segment '%2e%2e'"]),
    ("https://user:pw@gw", ["credentials"]),
    ("https://gw#frag", ["fragment"]),
])
def test_endpoint_urls_balancer_cannot_join_are_refused(url: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(pool(endpoints=[url]))
    assert str(caught.value).startswith("pools[0].endpoints[0]: ")
    for fragment in fragments:
        assert fragment in str(caught.value)


# -- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "fragments"), [
    ({"headers": [{"name": "Host", "value": "x"}]}, ["pools[0].headers[0].name", "'Host'"]),
    ({"headers": [{"name": "connection", "value": "x"}]}, ["hop-by-hop"]),
    ({"headers": [{"name": "X-Forwarded-For", "value": "x"}]}, ["set by balancer"]),
    ({"headers": [{"name": "Transfer-Encoding", "value": "x"}]}, ["headers[0].name"]),
    ({"headers": [{"name": "Bad Name", "value": "x"}]}, ["not a header name"]),
    ({"headers": [{"name": "A", "value": "x"}, {"name": "a", "value": "y"}]},
     ["headers[1].name", "injected twice"]),
    ({"headers": [{"name": "A"}]}, ["headers[0]: give exactly one of"]),
    ({"headers": [{"name": "A", "value": "x", "value_from_env": "E"}]},
     ["exactly one", "got value, value_from_env"]),
    ({"headers": [{"value": "x"}]}, ["pools[0].headers[0].name: required"]),
    ({"headers": [{"name": "A", "value": "x", "prefix": "Bearer "}]},
     ["headers[0].prefix", "only with"]),
    ({"headers": [{"name": "A", "value": "a\nB: c"}]},
     ["headers[0].value: the value has a control character (code 10)"]),
    ({"headers": [{"name": "A", "value_from_env": "E", "prefix": "x\r"}]},
     ["headers[0].prefix: the prefix has a control character"]),
    ({"headers": "Authorization: Bearer x"}, ["pools[0].headers: expected a list"]),
    ({"tls": {"key_file": "/dev/null"}}, ["pools[0].tls.key_file", "needs cert_file"]),
    ({"tls": {"server_name": "a b"}}, ["pools[0].tls.server_name"]),
    ({"tls": {"verify": "maybe"}}, ["pools[0].tls.verify", "not a boolean"]),
    ({"tls": {"verifi": False}}, ["pools[0].tls.verifi: unknown setting"]),
    ({"tls": {}, "endpoints": ["http://10.0.0.1:8000"]}, ["pools[0].tls", "no https://"]),
    ({"timeouts": {"connect": 0}}, ["pools[0].timeouts.connect", "> 0"]),
    ({"timeouts": {"first_byte": -1}}, ["pools[0].timeouts.first_byte"]),
    ({"timeouts": {"total": -1}}, ["pools[0].timeouts.total", ">= 0"]),
    ({"timeouts": {"idel": 1}}, ["pools[0].timeouts.idel: unknown setting"]),
    ({"health": {"path": "ping"}}, ["pools[0].health.path", "start with '/'"]),
    ({"load_poll": "sometimes"}, ["pools[0].load_poll", "not a boolean"]),
    ({"tlss": {}}, ["pools[0].tlss: unknown setting", "tls"]),
])
def test_bad_pool_settings_are_refused_naming_the_key(extra: dict[str, Any],
                                                      fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(pool(**extra))
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(("extra", "fragments"), [
    ({"headers": [{"name": "A", "value_from_env": "BALANCER_TEST_UNSET_VAR"}]},
     ["headers[0].value_from_env", "'BALANCER_TEST_UNSET_VAR' is not set"]),
    ({"headers": [{"name": "A", "value_from_file": "/nonexistent/key"}]},
     ["headers[0].value_from_file", "cannot read '/nonexistent/key'", "No such file"]),
    ({"tls": {"ca_file": "/nonexistent/ca.pem"}},
     ["pools[0].tls.ca_file", "cannot read it"]),
    ({"tls": {"cert_file": "/nonexistent/c.pem"}},
     ["pools[0].tls.cert_file", "cannot read it"]),
])
def test_secrets_and_certificates_that_cannot_be_had_stop_the_start(
        extra: dict[str, Any], fragments: list[str]) -> None:
    """Variables and files are read when balancer starts (``outbounds``, called by
    ``build`` and ``check-config``), not by ``validate``: ``balancer route`` and ``tune``
    read a production configuration without its Secrets."""
    settings(pool(**extra))  # valid as a configuration
    message = refused(pool(**extra))
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("content", [f"{SECRET}\ninjected: yes", f"a{chr(0)}b", "", "\n\n"])
def test_a_header_file_whose_value_is_unfit_is_refused_without_quoting_it(
        tmp_path: Path, content: str) -> None:
    """A newline inside the value would start another header line; the error names the
    file and the problem, never the value."""
    key = tmp_path / "key"
    key.write_text(content)
    message = refused(pool(headers=[{"name": "Authorization", "value_from_file": str(key)}]))
    assert message.startswith("pools[0].headers[0].value_from_file: the value ")
    assert SECRET not in message


def test_a_header_that_is_not_a_mapping_is_refused_without_quoting_it() -> None:
    with pytest.raises(ConfigError) as caught:
        settings(pool(headers=[f"Authorization: Bearer {SECRET}"]))
    assert "pools[0].headers[0]: expected a mapping" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_files_that_are_not_certificates_are_refused_at_start(
        tmp_path: Path, certs: Certs) -> None:
    """A CA bundle or client certificate that does not load fails ``outbounds`` (called
    by ``build`` and ``check-config``) with the key, not the first request."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert "pools[0].tls.ca_file" in refused(pool(tls={"ca_file": str(junk)}))
    message = refused(pool(tls={"cert_file": str(junk)}))
    assert "pools[0].tls.cert_file" in message and "not usable PEM" in message
    # A key that does not match the certificate.
    message = refused(pool(tls={"cert_file": str(certs.client_cert),
                                "key_file": str(certs.server_key)}))
    assert "pools[0].tls.cert_file" in message


def test_tls_settings_make_one_verifying_context_per_pool(certs: Certs, caplog) -> None:
    """Verification and hostname checks are on unless ``verify`` is off, which is warned
    about; a pool with no https endpoint has no context; the configured server name is
    kept for SNI."""
    with caplog.at_level(logging.WARNING, logger="balancer.outbound"):
        out = outbounds(settings(
            pool(tls={"ca_file": str(certs.ca), "cert_file": str(certs.client_cert),
                      "key_file": str(certs.client_key), "server_name": "model.test"}),
            pool(name="system", models=["b"]),
            pool(name="insecure", models=["c"], tls={"verify": False}),
            pool(name="inside", models=["d"], endpoints=["http://10.0.0.1:8000"])))
    hosted, system, insecure = out["hosted"], out["system"], out["insecure"]
    for o in (hosted, system):
        assert o.ssl_context is not None
        assert o.ssl_context.verify_mode is ssl.CERT_REQUIRED and o.ssl_context.check_hostname
    assert hosted.server_name == "model.test" and system.server_name == ""
    assert insecure.ssl_context is not None
    assert insecure.ssl_context.verify_mode is ssl.CERT_NONE
    assert out["inside"].ssl_context is None
    assert [r.getMessage() for r in caplog.records] == [
        "pools[2].tls.verify is off: pool insecure's endpoints are not authenticated, and "
        "whoever is on the path can read what is sent to them, injected headers included"]
    assert hosted.connector().server_name == "model.test"


def test_pool_timeouts_and_checks_default_to_the_sections() -> None:
    """Each timeout left out is the ``limits`` one; ``health`` and ``load_poll`` likewise."""
    out = outbounds(settings(
        pool(timeouts={"connect": 10, "total": 0}, health={"active": False},
             load_poll=False),
        pool(name="other", models=["b"], health={"path": "/v1/models"}),
        limits={"first_byte_timeout": 60, "total_timeout": 600}))
    a, b = out["hosted"], out["other"]
    limits = LimitsSettings()
    assert (a.connect_timeout, a.first_byte_timeout, a.idle_timeout, a.total_timeout) == (
        10.0, 60.0, limits.idle_timeout, 0.0)
    assert (b.connect_timeout, b.total_timeout) == (limits.connect_timeout, 600.0)
    assert (a.health_active, a.health_path, a.load_poll) == (False, "/health", False)
    assert (b.health_active, b.health_path, b.load_poll) == (True, "/v1/models", True)


# -- injected headers ------------------------------------------------------------------------


def test_header_values_come_from_their_source_with_the_prefix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEY", f" {SECRET} \n")
    key = tmp_path / "key"
    key.write_text(f"{SECRET}-file\n")
    out = outbounds(settings(pool(headers=[
        {"name": "Authorization", "value_from_env": "TEST_KEY", "prefix": "Bearer "},
        {"name": "X-File", "value_from_file": str(key)},
        {"name": "X-Plain", "value": "a\tb"}])))["hosted"]
    assert out.header_items() == [("Authorization", f"Bearer {SECRET}"),
                                  ("X-File", f"{SECRET}-file"), ("X-Plain", "a\tb")]
    assert out.header_names == {"authorization", "x-file", "x-plain"}
    assert out.client_options()["headers"] == dict(out.header_items())


def test_a_rotated_file_is_read_again_and_a_broken_one_keeps_the_last_value(
        tmp_path: Path, caplog) -> None:
    """A changed file (a Secret swapped by the kubelet) is read at the next look; a file
    that went missing or holds an unfit value leaves the last good value in use, with a
    warning naming the file, never the value."""
    key = tmp_path / "key"
    key.write_text("one")
    header = InjectedHeader("pools[0].headers[0]",
                            PoolHeader("Authorization", value_from_file=str(key),
                                       prefix="Bearer "), check_interval=0.0)
    assert header.value() == "Bearer one"
    (tmp_path / "new").write_text("two\n")
    os.replace(tmp_path / "new", key)
    assert header.value() == "Bearer two"
    with caplog.at_level(logging.INFO, logger="balancer.outbound"):
        key.unlink()
        assert header.value() == "Bearer two"
        key.write_text(f"{SECRET}\nX-Injected: 1")
        assert header.value() == "Bearer two"
        key.write_text("three")
        assert header.value() == "Bearer three"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "cannot read" in messages[0]
    assert "control character" in messages[1] and "read again" in messages[2]
    assert not [m for m in messages if SECRET in m or "three" in m or "two" in m]
    assert SECRET not in repr(header) and "two" not in repr(header)


def test_a_file_is_looked_at_no_more_than_once_per_interval(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("one")
    header = InjectedHeader("k", PoolHeader("A", value_from_file=str(key)),
                            check_interval=60.0)
    key.write_text("two!")
    assert header.value() == "one"
    assert header.value(now=1e12) == "two!"


def test_values_are_never_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``as_dict`` (``/debug/config``, ``check-config``) prints ``<redacted>`` for literal
    values and the settings' repr leaves them out; variable names and paths show."""
    raw = {"pools": [pool(headers=[{"name": "OpenAI-Organization", "value": SECRET},
                                   {"name": "X-File", "value_from_file": "/dev/null"}])]}
    s = from_mapping(raw)
    assert SECRET not in repr(s)
    printed = as_dict(s)["pools"][0]["headers"]
    assert printed[0]["value"] == "<redacted>" and printed[1]["value_from_file"] == "/dev/null"
    config = tmp_path / "balancer.yaml"
    raw["pools"][0]["headers"].pop()
    config.write_text(yaml.safe_dump(raw))
    assert main(["check-config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "<redacted>" in out


def test_check_config_loads_the_tls_files(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    config = tmp_path / "balancer.yaml"
    config.write_text(yaml.safe_dump({"pools": [pool(tls={"ca_file": str(junk)})]}))
    assert main(["check-config", str(config)]) != 0
    assert "pools[0].tls.ca_file" in capsys.readouterr().err


def test_reserved_names_cover_what_the_forwarder_sets_or_drops() -> None:
    """A pool cannot inject a header the forwarder sets itself or treats as hop-by-hop."""
    assert forward._NOT_FORWARDED_REQUEST <= RESERVED_HEADERS


_HEADER_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@given(_HEADER_TEXT)
def test_a_value_judged_fit_makes_exactly_one_header_line(value: str) -> None:
    """Whatever a file holds, a value :func:`header_value_problem` accepts becomes one
    header line with that value (no header or request can be smuggled in), and every value
    it refuses has a control character or is empty."""
    problem = header_value_problem(value)
    if problem is None:
        head = serialize_head("GET", "/v1/models", "h", [("X-Key", value)], 0)
        seen: list[tuple[bytes, bytes]] = []

        class Sink:
            def on_header(self, name: bytes, v: bytes) -> None:
                seen.append((name, v))

        httptools.HttpRequestParser(Sink()).feed_data(head)
        # One line for X-Key, holding the value (a parser may trim the whitespace around
        # it, which is not part of a field value: RFC 9110 section 5.5).
        assert [name for name, _ in seen] == [b"Host", b"X-Key"]
        assert seen[1][1].strip(b" \t") == value.strip(" \t").encode()
    else:
        assert not value or any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value)
