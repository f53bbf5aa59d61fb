"""Zones, identity patterns and direction derived from them (classify_direction)."""

from __future__ import annotations

import ipaddress

import pytest

from imguard.model import ChatContext
from imguard.policy import Zones, classify_direction
from imguard.policy.zones import PartyPattern, parse_identity

ZONES = Zones(domains=("example.com",), networks=(ipaddress.ip_network("10.0.0.0/8"),
                                                   ipaddress.ip_network("fd00::/8")))


def test_parse_identity():
    assert parse_identity("Alice@Example.com/Phone") == parse_identity("alice@example.com/phone")
    i = parse_identity("Alice@Example.com/Phone")
    assert (i.bare, i.domain) == ("alice@example.com", "example.com")
    assert parse_identity("nick!user@10.1.2.3").domain == "10.1.2.3"
    assert parse_identity("example.com").domain == "example.com"
    assert parse_identity("alice").domain == ""
    assert parse_identity("#general").domain == ""
    assert parse_identity("").domain == ""


@pytest.mark.parametrize("identity,zone", [
    ("alice@example.com", "internal"),
    ("room@conference.example.com", "internal"),      # subdomain
    ("bob@gmail.com", "external"),
    ("mallory@notexample.com", "external"),          # suffix but not a subdomain
    ("nick!u@10.9.8.7", "internal"),                 # IRC host in an internal network
    ("nick!u@203.0.113.5", "external"),
    ("alice", ""),                                   # nothing to judge by
])
def test_party_zone(identity, zone):
    assert ZONES.party_zone(identity) == zone


@pytest.mark.parametrize("ctx,direction", [
    (ChatContext(sender="alice@example.com", recipients=("bob@gmail.com",)), "outbound"),
    (ChatContext(sender="alice@example.com", recipients=("carol@example.com", "bob@gmail.com")), "outbound"),
    (ChatContext(sender="alice@example.com", recipients=("carol@chat.example.com",)), "internal"),
    (ChatContext(sender="bob@gmail.com", recipients=("alice@example.com",)), "inbound"),
    (ChatContext(sender="bob@gmail.com/x", recipients=()), "inbound"),
    # IRC: a bare nick from a client in an internal network, to a channel on an external server
    (ChatContext(sender="alice", recipients=("#chat",), client_address="10.0.0.5:50000",
                 server_address="198.51.100.7:6697"), "outbound"),
    (ChatContext(sender="alice", recipients=("#chat",), client_address="[fd00::5]:50000",
                 server_address="10.1.1.1:6667"), "internal"),
    # unknown: nobody to judge by
    (ChatContext(sender="alice", recipients=("#chat",)), ""),
    (ChatContext(sender="alice@example.com", recipients=("#chat",)), ""),
    (ChatContext(), ""),
])
def test_classify_direction(ctx, direction):
    assert classify_direction(ctx, ZONES) == direction


def test_classify_direction_keeps_a_known_direction():
    ctx = ChatContext(direction="internal", sender="bob@gmail.com", recipients=("alice@example.com",))
    assert classify_direction(ctx, ZONES) == "internal"


def test_without_zones_everyone_with_a_domain_is_external():
    assert classify_direction(ChatContext(sender="alice@example.com", recipients=("b@x.org",))) == "inbound"


@pytest.mark.parametrize("pattern,identity,expected", [
    ("alice@example.com", "Alice@Example.com/phone", True),
    ("alice@example.com", "alice@example.co", False),
    ("*@example.com", "bob@example.com", True),
    ("*@example.com", "bob@sub.example.com", False),
    ("domain:example.com", "bob@sub.example.com", True),
    ("domain:example.com", "bob@badexample.com", False),
    ("zone:external", "bob@gmail.com", True),
    ("zone:internal", "bob@gmail.com", False),
])
def test_party_patterns(pattern, identity, expected):
    assert PartyPattern.parse(pattern).matches(identity, ZONES) is expected


def test_direction_from_topology_needs_no_zones():
    """The party on the client side of the intercepted connection is inside; the other one is outside unless the
    zones say it is internal. A fresh install (no zones at all) decides sensibly; the zones refine it."""
    from imguard.model import FROM_CLIENT, FROM_SERVER, INBOUND, INTERNAL, OUTBOUND
    none = Zones()
    corp = Zones(domains=("corp.example",), networks=(ipaddress.ip_network("10.0.0.0/8"),))
    out = ChatContext(protocol="xmpp", sender="alice@lab.test", recipients=("bob@other.test",), origin=FROM_CLIENT)
    inn = ChatContext(protocol="xmpp", sender="bob@other.test", recipients=("alice@lab.test",), origin=FROM_SERVER)
    assert classify_direction(out, none) == OUTBOUND and classify_direction(inn, none) == INBOUND
    colleague = out.with_(recipients=("carol@corp.example",))
    assert classify_direction(colleague, corp) == INTERNAL and classify_direction(colleague, none) == OUTBOUND
    assert classify_direction(inn.with_(sender="carol@corp.example"), corp) == INTERNAL
    # an IRC channel lives on its server: the server's address decides
    channel = ChatContext(protocol="irc", sender="alice", recipients=("#ops",), server_address="10.1.2.3:6667",
                          origin=FROM_CLIENT)
    assert classify_direction(channel, corp) == INTERNAL and classify_direction(channel, none) == OUTBOUND
    # an IRC sender without a host in the zones is outside
    assert classify_direction(ChatContext(protocol="irc", sender="mallory", recipients=("alice",),
                                          origin=FROM_SERVER), corp) == INBOUND
    # what a session says stands
    assert classify_direction(out.with_(direction=INTERNAL), none) == INTERNAL
