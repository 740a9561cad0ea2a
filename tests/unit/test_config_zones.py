"""Zone settings: routing.zone, routing.prefer_zone and static endpoints listed with a zone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.cli import main
from balancer.config import ConfigError, as_dict, from_mapping, load, validate
from balancer.discovery import StaticDiscovery


def settings_of(endpoints: list[Any], **routing: Any) -> Any:
    raw = {"pools": [{"name": "chat", "models": ["llama"], "endpoints": endpoints}],
           "routing": routing}
    return validate(from_mapping(raw))


def test_zone_preference_is_off_and_the_zone_unknown_by_default() -> None:
    """Without settings no zone is known and nothing is preferred."""
    routing = settings_of(["http://10.0.0.1:8000"]).routing
    assert (routing.zone, routing.prefer_zone) == ("", False)


def test_endpoints_take_urls_and_url_zone_mappings_side_by_side() -> None:
    """Mappings give their URL to ``endpoints`` and their zone to ``zones``; a plain URL or
    a mapping without a zone has none."""
    settings = settings_of([
        "http://10.0.0.1:8000",
        {"url": "http://10.0.0.2:8000", "zone": "us-east-1a"},
        {"url": "http://10.0.0.3:8000", "zone": "us-east-1b"},
        {"url": "http://10.0.0.4:8000"},
    ])
    (pool,) = settings.pools
    assert pool.endpoints == ("http://10.0.0.1:8000", "http://10.0.0.2:8000",
                              "http://10.0.0.3:8000", "http://10.0.0.4:8000")
    assert pool.zones == (("http://10.0.0.2:8000", "us-east-1a"),
                          ("http://10.0.0.3:8000", "us-east-1b"))
    assert pool.zone_of("http://10.0.0.3:8000") == "us-east-1b"
    assert pool.zone_of("http://10.0.0.1:8000") is None


def test_static_discovery_gives_each_endpoint_its_listed_zone() -> None:
    """The static snapshot carries the zones, so the router can tell local endpoints."""
    settings = settings_of(["http://10.0.0.1:8000",
                            {"url": "http://10.0.0.2:8000", "zone": "zone-b"}])
    snapshot = StaticDiscovery(settings.pools).snapshot()
    zones = {e.id: e.zone for e in snapshot["chat"]}
    assert zones == {"10.0.0.1:8000": None, "10.0.0.2:8000": "zone-b"}


@pytest.mark.parametrize(("entry", "message"), [
    ({"url": "http://10.0.0.2:8000", "zone": "a", "weight": 2}, r"endpoints\[0\]\.weight: "
                                                                 "unknown setting"),
    ({"zone": "a"}, r"endpoints\[0\]\.url: required"),
    ({"url": "http://10.0.0.2:8000", "zone": "has space"}, r"endpoints\[0\]\.zone: "),
    ({"url": "http://10.0.0.2:8000", "zone": 3}, r"endpoints\[0\]\.zone: 3"),
    ({"url": "ftp://10.0.0.2"}, r"endpoints\[0\]: 'ftp://10.0.0.2' is not an http"),
    (7, r"endpoints\[0\]: 7 is neither a URL nor"),
])
def test_bad_endpoint_entries_are_refused_naming_the_key(entry: Any, message: str) -> None:
    """Unknown keys, a missing URL, a bad zone or URL: a ConfigError naming the entry."""
    with pytest.raises(ConfigError, match=message):
        settings_of([entry])


def test_prefer_zone_without_a_zone_is_refused() -> None:
    """Preferring an unknown zone would silently do nothing: refused at start."""
    with pytest.raises(ConfigError, match=r"routing\.prefer_zone: true needs routing\.zone"):
        settings_of(["http://10.0.0.1:8000"], prefer_zone=True)


@pytest.mark.parametrize("factor", [0.5, -1, float("nan"), float("inf")])
def test_a_zone_factor_below_one_or_not_finite_is_refused(factor: float) -> None:
    """Below 1 no zone could hold its share of the pool's work; 0 turns the bound off."""
    with pytest.raises(ConfigError, match=r"routing\.zone_factor: .* must be 0 \(off\)"):
        settings_of(["http://10.0.0.1:8000"], zone_factor=factor)
    assert settings_of(["http://10.0.0.1:8000"], zone_factor=0).routing.zone_factor == 0


def test_a_zone_that_is_no_label_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"routing\.zone: 'us east' is not a zone name"):
        settings_of(["http://10.0.0.1:8000"], zone="us east")


def test_zone_and_preference_come_from_the_environment_as_the_chart_sets_them() -> None:
    """``BALANCER_ROUTING_ZONE`` and ``BALANCER_ROUTING_PREFER_ZONE`` (the downward API)."""
    settings = load(None, environ={"BALANCER_ROUTING_ZONE": "europe-west4-b",
                                   "BALANCER_ROUTING_PREFER_ZONE": "true"},
                    overrides=[("routing.strategy", "chwbl")],
                    extra_pools=settings_of(["http://10.0.0.1:8000"]).pools)
    assert (settings.routing.zone, settings.routing.prefer_zone) == ("europe-west4-b", True)


def test_the_printed_configuration_keeps_the_zones_and_loads_back_the_same() -> None:
    """``check-config`` prints zoned endpoints as ``{url, zone}`` entries and no ``zones``
    key, and the printout loads into the same settings."""
    settings = settings_of(["http://10.0.0.1:8000",
                            {"url": "http://10.0.0.2:8000", "zone": "zone-b"}],
                           zone="zone-b", prefer_zone=True)
    plain = as_dict(settings)
    (pool,) = plain["pools"]
    assert "zones" not in pool
    assert pool["endpoints"] == ["http://10.0.0.1:8000",
                                 {"url": "http://10.0.0.2:8000", "zone": "zone-b"}]
    assert validate(from_mapping(yaml.safe_load(yaml.safe_dump(plain)))) == settings


def test_balancer_route_says_whether_the_request_stays_in_the_zone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`balancer route` against a zoned configuration: the chosen endpoint is in the zone,
    and the text report has a zone line saying so (the JSON the preferred endpoints)."""
    config = {"pools": [{"name": "chat", "models": ["llama"], "endpoints": [
        {"url": f"http://10.0.0.{i}:8000", "zone": "zone-a" if i % 2 else "zone-b"}
        for i in range(1, 5)]}], "routing": {"zone": "zone-a", "prefer_zone": True}}
    config_path = tmp_path / "balancer.yaml"
    config_path.write_text(yaml.safe_dump(config))
    request = tmp_path / "request.json"
    request.write_text('{"model": "llama", "messages": [{"role": "user", "content": "Hi"}]}')
    assert main(["route", "--json", "--config", str(config_path), str(request)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["zone"]["preferred"] == ["10.0.0.1:8000", "10.0.0.3:8000"]
    assert result["endpoint"] in result["zone"]["preferred"]
    assert main(["route", "--config", str(config_path), str(request)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "zone:      zone-a (local): stayed in the zone: the first zone endpoint on the " \
           "walk within the bound" in lines
    assert ("           zone spill: 0% of the zone's keys leave it (zone's share of the work 0%)"
            in lines)
