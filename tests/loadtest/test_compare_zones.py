"""The comparison runner's zones: names, client zones, replicas per zone, the cross-zone share,
and one short end-to-end run with two zones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from balancer.config import from_mapping, validate
from loadtest.compare import (
    ORACLE,
    ClientZones,
    aggregate,
    balancer_config,
    build_parser,
    cross_zone_share,
    markdown_table,
    parse_zone_weights,
    run_options_from,
    zone_names,
    zone_spread,
)
from loadtest.stats import Sample, Window
from tests.loadtest.test_compare import _outcome, _run_compare

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CONVERSATIONS = [f"conv-{i}" for i in range(2000)]


def test_zones_are_named_in_turn_and_one_zone_is_none() -> None:
    assert zone_names(1) == []
    assert zone_names(3) == ["zone-a", "zone-b", "zone-c"]


def test_zone_weights_default_to_equal_and_are_normalised() -> None:
    assert parse_zone_weights(None, 2) == (0.5, 0.5)
    assert parse_zone_weights("3,1", 2) == (0.75, 0.25)
    assert parse_zone_weights(None, 1) == ()


@pytest.mark.parametrize("text", ["1", "1,2,3", "a,b", "-1,2", "0,0", "inf,1"])
def test_bad_zone_weights_are_refused(text: str) -> None:
    with pytest.raises(SystemExit, match="--zone-weights"):
        parse_zone_weights(text, 2)


def test_client_zones_follow_the_weights_and_depend_only_on_seed_and_conversation() -> None:
    """A 70/30 population comes out about 70/30; the same seed gives the same zone to a
    conversation asked in any order, another seed another draw."""
    zones = ClientZones(["zone-a", "zone-b"], (0.7, 0.3), seed=1)
    counts = Counter(zones(c) for c in CONVERSATIONS)
    assert 0.65 < counts["zone-a"] / len(CONVERSATIONS) < 0.75
    again = ClientZones(["zone-a", "zone-b"], (0.7, 0.3), seed=1)
    assert [again(c) for c in reversed(CONVERSATIONS)] == [zones(c) for c in
                                                           reversed(CONVERSATIONS)]
    other = ClientZones(["zone-a", "zone-b"], (0.7, 0.3), seed=2)
    assert [other(c) for c in CONVERSATIONS] != [zones(c) for c in CONVERSATIONS]
    assert zones.headers("conv-1") == {"x-sim-client-zone": zones("conv-1")}


def test_a_zone_with_no_weight_gets_no_clients() -> None:
    zones = ClientZones(["zone-a", "zone-b"], (0.0, 1.0), seed=3)
    assert {zones(c) for c in CONVERSATIONS} == {"zone-b"}


def test_requests_go_to_a_replica_of_their_clients_zone() -> None:
    zones = ClientZones(["zone-a", "zone-b"], (0.5, 0.5), seed=1)
    replicas = {"zone-a": ["http://a0", "http://a1"], "zone-b": ["http://b0"]}
    route = zone_spread(replicas, zones, seed=1)
    used = {c: route(c) for c in CONVERSATIONS[:200]}
    for conversation, url in used.items():
        assert url in replicas[zones(conversation)]
    assert set(used.values()) == {"http://a0", "http://a1", "http://b0"}


def test_the_cross_zone_share_counts_completed_requests_in_the_window() -> None:
    """Failed requests, requests outside the window and pods of unknown zone are left out."""
    client = {"c1": "zone-a", "c2": "zone-b"}.__getitem__
    pods = {"sim-1": "zone-a", "sim-2": "zone-b"}
    samples = [
        Sample("c1", 0, 1.0, pod="sim-1"),  # local
        Sample("c1", 1, 2.0, pod="sim-2"),  # remote
        Sample("c2", 0, 3.0, pod="sim-2"),  # local
        Sample("c2", 1, 3.5, pod="sim-1"),  # remote
        Sample("c2", 2, 9.0, pod="sim-1"),  # outside the window
        Sample("c1", 2, 4.0, pod="sim-9"),  # pod of unknown zone
        Sample("c1", 3, 4.5),  # no pod header
    ]
    failed = Sample("c2", 3, 5.0, pod="sim-1")
    failed.fail("http", "HTTP 500")
    samples.append(failed)
    assert cross_zone_share(samples, Window(0.0, 8.0), pods, client) == 0.5
    assert cross_zone_share([], Window(0.0, 8.0), pods, client) is None


def test_a_zoned_balancer_config_lists_pod_zones_and_its_own() -> None:
    """The generated config, with --set routing.prefer_zone=true, passes balancer's own
    validation with every pod's zone and the replica's zone."""
    pods = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    text = balancer_config(pods, "chwbl", MODEL, 18080, 19090, {},
                           {"routing.prefer_zone": True}, pod_zones=["zone-a", "zone-b"],
                           zone="zone-b")
    settings = validate(from_mapping(yaml.safe_load(text)))
    assert (settings.routing.zone, settings.routing.prefer_zone) == ("zone-b", True)
    (pool,) = settings.pools
    assert pool.endpoints == tuple(pods)
    assert dict(pool.zones) == {pods[0]: "zone-a", pods[1]: "zone-b"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--zones", "2"], "needs --replicas >= 2"),
    (["--zones", "27", "--replicas", "27"], "--zones must be in"),
    (["--zone-weights", "1,1"], "needs --zones >= 2"),
    (["--zones", "2", "--replicas", "2", "--cross-zone-rtt", "-1"], "--cross-zone-rtt"),
])
def test_zone_options_are_checked_before_anything_starts(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        run_options_from(build_parser().parse_args(argv))


def test_the_table_gets_a_cross_zone_column_only_with_zones() -> None:
    zoned = _outcome("chwbl")
    zoned.cross_zone_share = 0.125
    with_zones = markdown_table([aggregate([zoned.row()])])
    header, separator, line = with_zones.splitlines()
    assert "| cross-zone |" in header
    assert separator.count("---") == 16
    assert "| 0.125 |" in line
    plain = markdown_table([aggregate([_outcome("chwbl").row()])])
    assert "cross-zone" not in plain


def test_a_short_run_in_two_zones_measures_each_contenders_cross_zone_share(
        tmp_path: Path) -> None:
    """Two replicas in two zones with the preference on keep (nearly) every request in its
    client's zone; the sticky oracle, blind to zones, is measured the same way."""
    out = tmp_path / "zones"
    code, output = _run_compare(
        ["--contenders", f"chwbl-zone,{ORACLE}", "--variant",
         "chwbl-zone=chwbl:routing.prefer_zone=true", "--zones", "2", "--replicas", "2",
         "--duration", "3", "--warmup", "0.5", "--cooldown", "0", "--rate", "4",
         "--time-scale", "0.2", "--no-plots", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, output
    report = json.loads((out / "compare.json").read_text())
    assert report["zones"] == ["zone-a", "zone-b"]
    assert report["zone_weights"] == [0.5, 0.5]
    rows = {row["contender"]: row for row in report["rows"]}
    zoned = rows["chwbl-zone x2"]["cross_zone_share"]
    assert zoned is not None and zoned <= 0.2, output
    oracle = rows[ORACLE]["cross_zone_share"]
    assert oracle is not None and 0.0 <= oracle <= 1.0
    assert "| cross-zone |" in (out / "compare.md").read_text()
