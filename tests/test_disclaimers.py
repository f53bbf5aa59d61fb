"""Disclaimers (a rule's `action: disclaim`), end to end with real parts: slixmpp clients on a real Prosody and `irc`
library clients on a real ngIRCd, through the real `imguard run`.

What the parties and an auditor would check: on the first message between two parties both are told, in the
protocol's own terms (XMPP: a chat message; IRC: a NOTICE), before the message itself; the text is the one the policy
gives for that direction (inside -> outside, outside -> inside); it is not repeated within the period and is repeated
after it; each one is an event and an archive record, and a restarted gateway with the archive does not disclaim the
same pair again. The policy's choice by group and direction, and the table's bounds: tests at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from imguard.conversation import ConversationSettings, FirstContacts, conversation_pair
from imguard.model import ChatContext, RuleMatch
from imguard.policy import load_policy
from tests.peers.conversation_rules import bundled_hash_lists, rule, rule_folder, rules_yaml, serving
from tests.test_warn_continue import bare, ircd, sentinel  # noqa: F401

pytestmark = pytest.mark.timeout(180)

OUT_TEXT = "OUTBOUND-NOTICE: this conversation is recorded by Example Corp."
IN_TEXT = "INBOUND-NOTICE: your messages to Example Corp are recorded."
RULES = rules_yaml(rule("test-disclaimer-outbound", "Recorded conversation (inside to outside)", "disclaim", "message",
                        "direction: outbound", severity="info", notify=OUT_TEXT),
                   rule("test-disclaimer-inbound", "Recorded conversation (outside to inside)", "disclaim", "message",
                        "direction: inbound", severity="info", notify=IN_TEXT))
PERIOD = 5.0                            # seconds: --disclaimer-every-days of the short-period gateways


def prepare(directory: Path) -> list[str]:
    """The disclaimer rules in their own folder (added to the bundled ones), and the bundled hash lists beside the
    rule files the fixtures copy."""
    folder = rule_folder(directory, "disclaimer-rules", "05-disclaimers.yaml", RULES)
    bundled_hash_lists(directory)
    return ["--rules", str(folder)]


def disclaimers(events: list[dict], party: str) -> list[dict]:
    return [e for e in events if e.get("event", {}).get("action") == "disclaimer"
            and party in e["imguard"]["disclaimer"]["parties"]]


# --- XMPP ---------------------------------------------------------------------------------------------------

def start_xmpp_gateway(directory: Path, prosody, period_days: float | None):
    from tests.peers.gateway import Gateway
    extra = prepare(directory) + ["--fail-mode", "xmpp:downgrade=open"]
    if period_days is not None:
        extra += ["--disclaimer-every-days", repr(period_days)]
    return Gateway.start(directory, prosody, extra=extra)


@pytest.fixture(scope="module")
def xmpp_gateway(peers_dir, prosody):
    yield from serving(start_xmpp_gateway(peers_dir / f"imguard-disclaimer-{uuid.uuid4().hex[:6]}", prosody,
                                          PERIOD / 86400))


async def xmpp_client(prosody, endpoint, role: str, tag: str):
    from tests.xmpp_clients import Client
    user = f"{role}-{tag}"
    if user not in prosody.accounts:
        prosody.add_account(user)
    client = Client(endpoint, f"{prosody.jid(user)}/{role}", prosody.password(user))
    await client.login()
    return client


def endpoints(prosody, gateway):
    from tests.xmpp_clients import STARTTLS, Endpoint
    return gateway.endpoint(STARTTLS), Endpoint("127.0.0.1", prosody.c2s_port, STARTTLS, ca_file=prosody.ca_file)


async def first_message(sender, receiver, text: str, expected: str) -> None:
    """`sender` writes first: both parties get the disclaimer `expected`, the receiver before the message."""
    body = f"hello {uuid.uuid4().hex[:6]}"
    sender.send_chat(receiver.jid, body)
    assert await receiver.wait_message(body), f"the first message did not arrive: {receiver.bodies()}"
    assert await sender.wait_message(expected), f"the sender got no disclaimer: {sender.bodies()}"
    bodies = receiver.bodies()
    assert expected in bodies and bodies.index(expected) < bodies.index(body), \
        f"the receiver did not get the disclaimer before the message: {bodies}"
    other = OUT_TEXT if expected == IN_TEXT else IN_TEXT
    assert other not in bodies and other not in sender.bodies()


@pytest.mark.parametrize("inside_sender", [True, False], ids=["inside-to-outside", "outside-to-inside"])
def test_xmpp_first_contact_tells_both_parties_once_then_again_after_the_period(prosody, xmpp_gateway, inside_sender):
    """First message between two parties, either way round: both get the direction's disclaimer before it; the next
    messages within the period get none; after the period the next message gets it again (not first contact)."""
    async def scenario():
        tag = uuid.uuid4().hex[:6]
        inside, outside = endpoints(prosody, xmpp_gateway)
        since = xmpp_gateway.mark()
        alice = await xmpp_client(prosody, inside, "alice", tag)
        bob = await xmpp_client(prosody, outside, "bob", tag)
        sender, receiver = (alice, bob) if inside_sender else (bob, alice)
        expected = OUT_TEXT if inside_sender else IN_TEXT
        try:
            await first_message(sender, receiver, "hello", expected)
            receiver.send_chat(sender.jid, "a reply")            # the other way round, within the period: none
            assert await sender.wait_message("a reply")
            await sentinel(sender, receiver)
            for client in (alice, bob):
                assert client.bodies().count(expected) == 1, client.bodies()
                assert OUT_TEXT not in client.bodies() or IN_TEXT not in client.bodies()
            await xmpp_gateway.wait_alert(lambda e: bool(disclaimers([e], bare(alice.jid).lower())), since)
            events = disclaimers(xmpp_gateway.alerts()[since:], bare(alice.jid).lower())
            assert len(events) == 1 and events[0]["imguard"]["disclaimer"]["first_contact"] is True
            assert events[0]["imguard"]["disclaimer"]["text"] == expected
            assert events[0]["network"]["direction"] == ("outbound" if inside_sender else "inbound")
            await asyncio.sleep(PERIOD + 0.5)
            await sentinel(receiver, sender)      # after the period: told again (in this message's direction's words)
            def told_twice(r) -> bool:
                return sum(m["body"] in (OUT_TEXT, IN_TEXT) for m in r.messages) == 2
            for client in (alice, bob):
                assert await client.wait_for(told_twice), f"no disclaimer again after the period: {client.bodies()}"
            await asyncio.sleep(0.5)      # (plain events reach the log within 0.2 s)
            events = disclaimers(xmpp_gateway.alerts()[since:], bare(alice.jid).lower())
            assert [e["imguard"]["disclaimer"]["first_contact"] for e in events] == [True, False]
        finally:
            await alice.close()
            await bob.close()
    asyncio.run(scenario())


def test_xmpp_restart_with_the_archive_does_not_disclaim_again(peers_dir, prosody):
    """A disclaimer given is an archive record; a gateway restarted on the same data folder reads them and does not
    disclaim the same pair again within the period (30 days by default)."""
    directory = peers_dir / f"imguard-disclaimer-restart-{uuid.uuid4().hex[:6]}"

    async def talk(gw, tag: str, expect_disclaimer: bool) -> None:
        inside, outside = endpoints(prosody, gw)
        alice = await xmpp_client(prosody, inside, "alice", tag)
        bob = await xmpp_client(prosody, outside, "bob", tag)
        try:
            if expect_disclaimer:
                await first_message(alice, bob, "hello", OUT_TEXT)
            else:
                await sentinel(alice, bob)
                await sentinel(bob, alice)
                assert OUT_TEXT not in bob.bodies() and OUT_TEXT not in alice.bodies()
                assert IN_TEXT not in bob.bodies() and IN_TEXT not in alice.bodies()
        finally:
            await alice.close()
            await bob.close()

    tag = uuid.uuid4().hex[:6]
    gw = start_xmpp_gateway(directory, prosody, None)
    try:
        asyncio.run(talk(gw, tag, True))
    finally:
        gw.stop()
    import sqlite3
    with sqlite3.connect(gw.data_dir / "archive.sqlite3") as db:       # the record an auditor reads
        rows = db.execute("SELECT sender, recipients, text, rules FROM records WHERE action = 'disclaim'").fetchall()
    assert ("imguard", " ".join(sorted([f"alice-{tag}@{prosody.domain}", f"bob-{tag}@{prosody.domain}"])),
            OUT_TEXT, "test-disclaimer-outbound") in rows
    gw = start_xmpp_gateway(directory, prosody, None)
    since = gw.mark()
    try:
        asyncio.run(talk(gw, tag, False))
        time.sleep(0.5)               # (plain events reach the log within 0.2 s)
        assert not disclaimers(gw.alerts()[since:], f"alice-{tag}@{prosody.domain}")
    finally:
        gw.stop()


# --- IRC ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def irc_gateway(peers_dir, ircd):  # noqa: F811
    from tests.peers.ngircd import IrcGateway
    directory = peers_dir / f"imguard-irc-disclaimer-{uuid.uuid4().hex[:6]}"
    yield from serving(IrcGateway.start(directory, ircd, extra=prepare(directory)))


class IrcPeer:
    """One `irc` library client; what it was sent, in order: ("privmsg" | "notice", from, text)."""

    def __init__(self, port: int, nick: str):
        import irc.client as irc_client
        self.nick = nick
        self.reactor = irc_client.Reactor()
        self.got: list[tuple[str, str, str]] = []
        self.welcomed = False
        self.reactor.add_global_handler("welcome", lambda c, e: setattr(self, "welcomed", True))
        self.reactor.add_global_handler("privmsg", lambda c, e: self.got.append(
            ("privmsg", str(e.source).split("!")[0], e.arguments[0])))
        self.reactor.add_global_handler("privnotice", lambda c, e: self.got.append(
            ("notice", str(e.source).split("!")[0], e.arguments[0])))
        self.conn = self.reactor.server().connect("127.0.0.1", port, nick)

    def texts(self) -> list[str]:
        return [t for _, _, t in self.got]


def pump(peers, until, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in peers:
            p.reactor.process_once(0.05)
        if until():
            return True
    return False


@pytest.mark.parametrize("inside_sender", [True, False], ids=["inside-to-outside", "outside-to-inside"])
def test_irc_first_contact_tells_both_parties_by_notice(ircd, irc_gateway, inside_sender):  # noqa: F811
    """First PRIVMSG between two nicks, either way round: our user gets a NOTICE from imguard, the other party a NOTICE
    (from our user), both before the message; not again within the period."""
    tag = uuid.uuid4().hex[:5]
    inside = IrcPeer(irc_gateway.port, f"in{tag}")
    outside = IrcPeer(ircd.port, f"out{tag}")
    peers = [inside, outside]
    since = irc_gateway.mark()
    try:
        assert pump(peers, lambda: inside.welcomed and outside.welcomed)
        sender, receiver = (inside, outside) if inside_sender else (outside, inside)
        expected = OUT_TEXT if inside_sender else IN_TEXT
        body = f"hello {uuid.uuid4().hex[:6]}"
        sender.conn.privmsg(receiver.nick, body)
        assert pump(peers, lambda: body in receiver.texts()), receiver.got
        assert pump(peers, lambda: expected in sender.texts() and expected in receiver.texts()), (sender.got,
                                                                                                    receiver.got)
        assert receiver.texts().index(expected) < receiver.texts().index(body)
        assert ("notice", "imguard", expected) in inside.got
        assert ("notice", inside.nick, expected) in outside.got
        for i in range(2):
            more = f"more {i} {uuid.uuid4().hex[:6]}"
            receiver.conn.privmsg(sender.nick, more)
            assert pump(peers, lambda more=more: more in sender.texts())
        assert inside.texts().count(expected) == 1 and outside.texts().count(expected) == 1
        assert OUT_TEXT not in receiver.texts() + sender.texts() or IN_TEXT not in receiver.texts() + sender.texts()
        irc_gateway.wait_alert(lambda e: bool(disclaimers([e], inside.nick.lower())), since)
        events = disclaimers(irc_gateway.alerts()[since:], inside.nick.lower())
        assert len(events) == 1 and events[0]["imguard"]["disclaimer"]["parties"] == sorted(
            [inside.nick.lower(), outside.nick.lower()])
    finally:
        inside.conn.disconnect()
        outside.conn.disconnect()


# --- the policy's choice and the table alone ---------------------------------------------------------------------

def test_disclaimers_are_chosen_by_group_and_direction(tmp_path):
    """Per group and direction: a traders' disclaimer for their outbound chats, none for others; a disclaimer never
    makes a message an alert (it is not among the decision's matches)."""
    (tmp_path / "groups.yaml").write_text("zones:\n  internal:\n    domains: [corp.example]\n"
                                          "groups:\n  traders: ['*@desk.corp.example']\n")
    (tmp_path / "05-d.yaml").write_text("""
rules:
  - id: traders-recorded
    title: Traders are recorded
    severity: info
    action: disclaim
    applies_to: message
    notify: "Recorded under FINRA 3110, {recipients}."
    match:
      sender: group:traders
      direction: outbound
""")
    policy = load_policy(tmp_path)
    trader = ChatContext(protocol="xmpp", sender="t@desk.corp.example", recipients=("client@bank.example",))
    decision = policy.decide_message("hi", trader)
    assert [m.rule_id for m in decision.disclaimers] == ["traders-recorded"] and decision.action == "allow"
    assert decision.matches == []
    assert decision.disclaimers[0].notice == "Recorded under FINRA 3110, client@bank.example."
    assert policy.decide_message("hi", trader.with_(sender="x@corp.example")).disclaimers == []
    inbound = ChatContext(protocol="xmpp", sender="client@bank.example", recipients=("t@desk.corp.example",))
    assert policy.decide_message("hi", inbound).disclaimers == []
    (tmp_path / "06-bad.yaml").write_text("rules:\n  - {id: f, title: f, severity: info, action: disclaim, "
                                          "applies_to: file, match: {extension: exe}}\n")
    with pytest.raises(Exception, match="only works on message rules"):
        load_policy(tmp_path)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_first_contacts_period_pairs_and_bound():
    clock = Clock()
    table = FirstContacts(ConversationSettings(disclaimer_every_days=1, disclaimer_max_pairs=2), clock)
    d = [RuleMatch("r", "disclaim", "info", "enforce", notice="n")]
    a_to_b = ChatContext(protocol="irc", sender="Alice!u@h", recipients=("bob",))
    b_to_a = ChatContext(protocol="irc", sender="bob!x@y", recipients=("alice",))
    assert table.due(a_to_b, d)[1:] == (("alice", "bob"), True)
    assert table.due(b_to_a, d) is None                       # one pair, whoever writes
    clock.now += 86400
    assert table.due(b_to_a, d)[2] is False                   # the period passed: again, not first contact
    assert table.due(a_to_b.with_(conversation="#room", recipients=("#room",)), d) is None    # rooms: none
    assert table.due(a_to_b.with_(protocol="msnp"), d) is None                              # no session injects
    assert conversation_pair(ChatContext(sender="a@x/1", recipients=("A@x/2",))) is None     # oneself
    table.due(ChatContext(protocol="xmpp", sender="c@x", recipients=("d@x",)), d)
    table.due(ChatContext(protocol="xmpp", sender="e@x", recipients=("f@x",)), d)
    assert len(table) == 2 and table.due(b_to_a, d) is not None     # the oldest pair was forgotten: told again
