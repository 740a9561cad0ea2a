"""The front door's pure parts: who the client is (X-Forwarded-For under trusted proxies),
the log throttle, the request headers never forwarded, and the front-door settings."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.config import ConfigError, load
from balancer.forward import filter_request_headers
from balancer.httpserver import (
    client_address,
    hop_address,
    parse_networks,
    peer_trusted,
)
from balancer.logs import Throttle

PROXIES = parse_networks(["10.0.0.0/8", "fd00::/8"])

# -- X-Forwarded-For ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("203.0.113.7", "203.0.113.7"),
    ("  203.0.113.7 ", "203.0.113.7"),
    ("203.0.113.7:4711", "203.0.113.7"),
    ("2001:db8::1", "2001:db8::1"),
    ("[2001:db8::1]:4711", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("unknown", None),
    ("", None),
    ("_hidden", None),
    ("203.0.113.300", None),
])
def test_a_hop_is_read_in_the_forms_proxies_write(text, expected):
    """Addresses with and without ports and brackets; anything else is not an address."""
    address = hop_address(text)
    assert (None if address is None else str(address)) == expected


@pytest.mark.parametrize(("peer", "chain", "expected"), [
    # an untrusted peer: its chain is never read
    ("203.0.113.7", "198.51.100.1", "203.0.113.7"),
    # a trusted peer: the first untrusted hop from the right
    ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
    ("10.0.0.2", "192.0.2.66, 198.51.100.1, 10.0.0.9", "198.51.100.1"),
    ("10.0.0.2", "192.0.2.66,198.51.100.1,10.0.0.9", "198.51.100.1"),
    ("fd00::2", "2001:db8::5", "2001:db8::5"),
    # a trusted peer that sent no chain: the peer is the client
    ("10.0.0.2", None, "10.0.0.2"),
    ("10.0.0.2", "", "10.0.0.2"),
    # every hop trusted: the leftmost
    ("10.0.0.2", "10.0.0.7, 10.0.0.8", "10.0.0.7"),
    # garbage ends the walk at the proxy that wrote it
    ("10.0.0.2", "198.51.100.1, unknown", "10.0.0.2"),
    ("10.0.0.2", "198.51.100.1, nonsense, 10.0.0.9", "10.0.0.9"),
    # with ports, as some proxies write them
    ("10.0.0.2", "198.51.100.1:5555, 10.0.0.9:80", "198.51.100.1"),
    # a peer that is not an address (a Unix socket) is what it is
    ("", "198.51.100.1", ""),
])
def test_the_client_is_the_first_untrusted_hop_from_the_right(peer, chain, expected):
    """The table of cases a reverse proxy chain produces."""
    assert client_address(peer, chain, PROXIES) == expected


def test_with_no_trusted_proxies_the_client_is_always_the_peer():
    """The default: nothing a client writes is believed."""
    assert client_address("10.0.0.2", "198.51.100.1", ()) == "10.0.0.2"
    assert not peer_trusted("10.0.0.2", ())


ipv4 = st.ip_addresses(v=4)
untrusted = ipv4.filter(lambda a: a not in PROXIES[0]).map(str)
trusted = st.ip_addresses(network="10.0.0.0/8").map(str)
junk = st.text(alphabet=st.characters(blacklist_characters=","), max_size=20)


@given(peer=untrusted, chain=st.lists(st.one_of(untrusted, trusted, junk), max_size=6))
def test_an_untrusted_peer_cannot_name_another_client(peer, chain):
    """Whatever a client sends in X-Forwarded-For, an untrusted peer is the client."""
    assert client_address(peer, ", ".join(chain), PROXIES) == peer


@given(spoofed=st.lists(st.one_of(untrusted, trusted, junk), max_size=5), client=untrusted,
       proxies=st.lists(trusted, max_size=4), peer=trusted)
def test_what_a_client_prepends_never_changes_the_answer(spoofed, client, proxies, peer):
    """A client may put anything left of its own address; the trusted proxies to its right
    report it, and it is the answer."""
    chain = ", ".join([*spoofed, client, *proxies])
    assert client_address(peer, chain, PROXIES) == client


@given(peer=st.one_of(untrusted, trusted),
       chain=st.one_of(st.none(), st.lists(st.one_of(untrusted, trusted, junk),
                                           max_size=6).map(", ".join)))
def test_the_answer_is_the_peer_or_an_address_from_the_chain(peer, chain):
    """The client address is never invented: it is the peer or one of the chain's hops,
    and always an address."""
    hops = {str(hop_address(h)) for h in (chain or "").split(",") if hop_address(h)}
    answer = client_address(peer, chain, PROXIES)
    assert answer == peer or answer in hops
    ipaddress.ip_address(answer)


# -- the log throttle ------------------------------------------------------------------------


def test_the_throttle_logs_once_per_interval_and_counts_the_rest():
    """A flood is one line per interval, which says how many were not logged."""
    throttle = Throttle(10.0)
    assert throttle.allow(100.0) == 0
    assert [throttle.allow(100.0 + i) for i in range(1, 10)] == [None] * 9
    assert throttle.allow(110.0) == 9
    assert throttle.allow(115.0) is None
    assert throttle.allow(200.0) == 1


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=200))
def test_the_throttle_accounts_for_every_event(times):
    """Logged lines plus the unlogged counts they report (and those still pending) are all
    the events, and no two lines are closer than the interval."""
    throttle = Throttle(10.0)
    logged: list[float] = []
    reported = 0
    for now in sorted(times):
        unlogged = throttle.allow(now)
        if unlogged is not None:
            logged.append(now)
            reported += unlogged
    pending = len(times) - len(logged) - reported
    assert pending >= 0
    assert all(b - a >= 10.0 for a, b in itertools.pairwise(logged))


# -- headers never forwarded ---------------------------------------------------------------------


def test_expect_is_never_forwarded_upstream():
    """Expect: 100-continue belongs to the client's hop (aiohttp answered it)."""
    sent = filter_request_headers({"Expect": "100-continue", "Content-Type": "application/json",
                                   "X-Forwarded-Proto": "https"})
    assert sent == [("Content-Type", "application/json")]


# -- settings ----------------------------------------------------------------------------------


def test_trusted_proxies_come_from_a_list_or_a_comma_separated_string():
    """A YAML list in the file; comma-separated from the environment or --set."""
    from_flag = load(overrides=[("server.trusted_proxies", "10.0.0.0/8, 192.168.1.1")],
                     environ={}, require_pools=False)
    assert from_flag.server.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")
    from_list = load(overrides=[("server.trusted_proxies", ["fd00::/8"])], environ={},
                     require_pools=False)
    assert from_list.server.trusted_proxies == ("fd00::/8",)
    from_env = load(environ={"BALANCER_SERVER_TRUSTED_PROXIES": "10.1.0.0/16"},
                    require_pools=False)
    assert from_env.server.trusted_proxies == ("10.1.0.0/16",)
    assert load(environ={}, require_pools=False).server.trusted_proxies == ()


@pytest.mark.parametrize(("dotted", "value", "fragments"), [
    ("server.trusted_proxies", ["10.0.0.1/8"], ["server.trusted_proxies[0]", "host bits"]),
    ("server.trusted_proxies", ["proxy.local"], ["server.trusted_proxies[0]",
                                                 "'proxy.local'"]),
    ("server.trusted_proxies", [3], ["server.trusted_proxies", "list of non-empty strings"]),
    ("limits.max_concurrent_requests", -1, ["limits.max_concurrent_requests", ">= 0"]),
    ("limits.client_header_timeout", 0, ["limits.client_header_timeout", "> 0"]),
    ("limits.client_body_timeout", -1, ["limits.client_body_timeout", "> 0"]),
    ("limits.client_keepalive_timeout", "soon", ["limits.client_keepalive_timeout",
                                                 "not a number"]),
])
def test_bad_front_door_settings_are_refused_naming_the_key(dotted, value, fragments):
    """Each new setting is validated with a message naming the key and the value."""
    with pytest.raises(ConfigError) as caught:
        load(overrides=[(dotted, value)], environ={}, require_pools=False)
    for fragment in fragments:
        assert fragment in str(caught.value)
