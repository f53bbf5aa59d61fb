"""Warn and continue (a rule's `action: warn`), end to end with real parts: slixmpp clients on a real Prosody and `irc`
library clients on a real ngIRCd, through the real `imguard run`.

What a user and an auditor would check: a warned message is held (the receiver does not get it, a sentinel sent after
it arrives first); the sender is told in the chat how to answer; `!justify <reason>` delivers it and the reason is in
the alert; `!falsepositive` is recorded; no answer within the window: never delivered, and an event says so. The
answer itself never reaches the other party. Both sides of the perimeter: the sender inside (outbound) and outside
(inbound: no one to coach on this side, refused like a block), and two inside parties (the justified message's copy
to the inside receiver is delivered, not held again). The state machine alone: tests at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import pytest

from imguard.conversation import (Answer, ConversationSettings, PendingWarnings, ReleasedMessages, WarnState,
                                  parse_answer)
from imguard.model import WARN, ChatContext, Decision, RuleMatch
from tests.peers.conversation_rules import ngircd, rule, rules_extra, rules_yaml, serving

pytestmark = pytest.mark.timeout(180)

WARN_WORD = "pricelist-q4"          # matched by the warn rule below
WARN_RULE = "test-warn-pricelist"
WINDOW = 4.0                        # --warn-window-seconds of the gateways here
RULES = rules_yaml(rule(WARN_RULE, "Price list leaving the company", "warn", "message", f"keywords: [{WARN_WORD}]"))


def warn_rules_extra(directory: Path, *extra: str) -> list[str]:
    return rules_extra(directory, "warn-rules", "50-warn.yaml", RULES, "--warn-window-seconds", str(WINDOW), *extra)


def outcome(event: dict, state: str, text_part: str) -> bool:
    return (event.get("event", {}).get("action") == f"warn_{state}"
            and text_part in event.get("imguard", {}).get("message", {}).get("text", ""))


# --- XMPP ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def warn_gateway(peers_dir, prosody):
    from tests.peers.gateway import Gateway
    directory = peers_dir / f"imguard-warn-{uuid.uuid4().hex[:6]}"
    yield from serving(Gateway.start(directory, prosody,
                                     extra=warn_rules_extra(directory, "--fail-mode", "xmpp:downgrade=open")))


class Xmpp:
    """This test's accounts: inside ones log in through the gateway, outside ones straight to Prosody."""

    def __init__(self, prosody, gateway):
        from tests.xmpp_clients import STARTTLS, Endpoint
        self.prosody, self.gateway = prosody, gateway
        self.tag = uuid.uuid4().hex[:6]
        self.inside = gateway.endpoint(STARTTLS)
        self.outside = Endpoint("127.0.0.1", prosody.c2s_port, STARTTLS, ca_file=prosody.ca_file)

    async def client(self, role: str, inside: bool):
        from tests.xmpp_clients import Client
        user = f"{role}-{self.tag}"
        if user not in self.prosody.accounts:
            self.prosody.add_account(user)
        jid = f"{self.prosody.jid(user)}/{role}"
        client = Client(self.inside if inside else self.outside, jid, self.prosody.password(user))
        await client.login()
        return client

    @contextlib.asynccontextmanager
    async def clients(self, *people: tuple[str, bool]):
        """(role, inside) each logged in, in order; all closed after, in the same order."""
        logged = [await self.client(role, inside) for role, inside in people]
        try:
            yield logged
        finally:
            for client in logged:
                await client.close()


async def sentinel(sender, receiver) -> None:
    """One more plain message, waited for: what the receiver would get before it has arrived by then."""
    body = f"sentinel {uuid.uuid4().hex[:8]}"
    sender.send_chat(receiver.jid, body)
    assert await receiver.wait_message(body), f"the sentinel {body!r} did not arrive"


def bare(jid: str) -> str:
    return jid.split("/", 1)[0]


async def warned(sender, receiver, text: str):
    """Send `text` and return the error the sender gets back (the warning); the receiver has not got it."""
    from tests.xmpp_clients import error_condition, error_text
    message_id = sender.send_chat(receiver.jid, text)
    error = await sender.wait_message(id=message_id, type="error")
    assert error is not None, f"no warning came back; the sender got {sender.bodies()}"
    assert error_condition(error) == "policy-violation"
    assert "!justify" in error_text(error) and "Price list leaving the company" in error_text(error)
    await sentinel(sender, receiver)
    assert text not in receiver.bodies(), "a warned message reached its receiver before any answer"
    return error


def test_xmpp_warn_justify_delivers_with_the_reason(prosody, warn_gateway):
    """Inside sender, outside receiver: warned, held, then `!justify <reason>` delivers the message as it was sent;
    the reason is in the alert; the answer never reaches the receiver."""
    async def scenario():
        x = Xmpp(prosody, warn_gateway)
        since = warn_gateway.mark()
        async with x.clients(("alice", True), ("bob", False)) as (alice, bob):
            text = f"here is the {WARN_WORD} for you {uuid.uuid4().hex[:6]}"
            await warned(alice, bob, text)
            held = await warn_gateway.wait_alert(lambda e: e["event"].get("action") == WARN
                                                 and e["imguard"].get("message", {}).get("text") == text, since)
            assert held is not None and held["event"]["kind"] == "alert" and held["rule"]["id"] == WARN_RULE
            assert held["network"]["direction"] == "outbound"
            alice.send_chat(bob.jid, "!justify the customer asked for it")
            assert await bob.wait_message(text), f"the justified message did not arrive: {bob.bodies()}"
            assert await alice.wait_for(lambda r: any("delivered" in (m["body"] or "") for m in r.messages))
            await sentinel(alice, bob)
            assert not any("!justify" in b for b in bob.bodies()), "the answer crossed to the receiver"
            event = await warn_gateway.wait_alert(lambda e: outcome(e, "justified", text), since)
            assert event is not None, "no warn_justified event"
            assert event["imguard"]["warn"]["justification"] == "the customer asked for it"
            assert event["imguard"]["warn"]["delivered"] is True and event["event"]["type"] == ["allowed"]
            assert event["rule"]["id"] == WARN_RULE and event["user"]["name"] == bare(alice.jid)
    asyncio.run(scenario())


def test_xmpp_warn_without_answer_is_never_delivered(prosody, warn_gateway):
    """No answer within the window: the held message is dropped (an event), a late `!justify` delivers nothing,
    and the sentinel after it arrives while the warned text never does."""
    async def scenario():
        x = Xmpp(prosody, warn_gateway)
        since = warn_gateway.mark()
        async with x.clients(("alice", True), ("bob", False)) as (alice, bob):
            text = f"the {WARN_WORD} again {uuid.uuid4().hex[:6]}"
            await warned(alice, bob, text)
            await asyncio.sleep(WINDOW + 0.5)
            alice.send_chat(bob.jid, "!justify too late")
            assert await alice.wait_for(lambda r: any("no held message" in (m["body"] or "") for m in r.messages))
            await sentinel(alice, bob)
            assert text not in bob.bodies() and not any("too late" in b for b in bob.bodies())
            event = await warn_gateway.wait_alert(lambda e: outcome(e, "expired", text), since)
            assert event is not None, "no warn_expired event"
            assert event["imguard"]["warn"]["delivered"] is False and event["event"]["type"] == ["denied"]
            assert event["imguard"]["warn"]["held_seconds"] >= WINDOW
    asyncio.run(scenario())


def test_xmpp_false_positive_is_recorded(prosody, warn_gateway):
    """`!falsepositive <comment>`: the report and its comment are in the alert (and, by default, the message goes)."""
    async def scenario():
        x = Xmpp(prosody, warn_gateway)
        since = warn_gateway.mark()
        async with x.clients(("alice", True), ("bob", False)) as (alice, bob):
            text = f"public {WARN_WORD} from the website {uuid.uuid4().hex[:6]}"
            await warned(alice, bob, text)
            alice.send_chat(bob.jid, "!FalsePositive   this list is on our public website")
            assert await bob.wait_message(text)
            event = await warn_gateway.wait_alert(lambda e: outcome(e, "false_positive", text), since)
            assert event is not None, "no warn_false_positive event"
            assert event["imguard"]["warn"]["false_positive"] is True
            assert event["imguard"]["warn"]["comment"] == "this list is on our public website"
    asyncio.run(scenario())


def test_xmpp_inbound_warn_is_refused(prosody, warn_gateway):
    """Outside sender, inside receiver: nobody on this side can answer for the sender, so the message is refused like a
    block: the receiver is told, never gets the text; the sentinel arrives."""
    async def scenario():
        x = Xmpp(prosody, warn_gateway)
        async with x.clients(("alice", True), ("bob", False)) as (alice, bob):
            text = f"inbound {WARN_WORD} {uuid.uuid4().hex[:6]}"
            bob.send_chat(alice.jid, text)
            assert await alice.wait_for(lambda r: any("was blocked" in (m["body"] or "") for m in r.messages))
            await sentinel(bob, alice)
            assert text not in alice.bodies()
            bob.send_chat(alice.jid, "!justify from outside")   # an outsider's answer is just a message
            assert await alice.wait_message("!justify from outside")
    asyncio.run(scenario())


def test_xmpp_internal_justified_copy_is_not_held_again(prosody, warn_gateway):
    """Both parties inside: the justified message crosses the gateway twice (sender's and receiver's connections);
    the receiver's copy is delivered (warn_delivered), not refused again."""
    async def scenario():
        x = Xmpp(prosody, warn_gateway)
        since = warn_gateway.mark()
        async with x.clients(("alice", True), ("carol", True)) as (alice, carol):
            text = f"internal {WARN_WORD} {uuid.uuid4().hex[:6]}"
            await warned(alice, carol, text)
            alice.send_chat(carol.jid, "!justify finance needs it")
            assert await carol.wait_message(text), f"the justified message did not arrive: {carol.bodies()}"
            assert await warn_gateway.wait_alert(lambda e: outcome(e, "delivered", text), since) is not None
            assert await warn_gateway.wait_alert(lambda e: outcome(e, "justified", text), since) is not None
    asyncio.run(scenario())


# --- IRC ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ircd(peers_dir):
    yield from ngircd(peers_dir / f"ngircd-warn-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def irc_warn_gateway(peers_dir, ircd):
    from tests.peers.ngircd import IrcGateway
    directory = peers_dir / f"imguard-irc-warn-{uuid.uuid4().hex[:6]}"
    yield from serving(IrcGateway.start(directory, ircd, extra=warn_rules_extra(directory)))


class IrcPeer:
    """One `irc` library client, its own reactor; what it was sent is kept in order."""

    def __init__(self, port: int, nick: str):
        import irc.client as irc_client
        self.nick = nick
        self.reactor = irc_client.Reactor()
        self.privmsgs: list[tuple[str, str]] = []      # (from nick, text)
        self.notices: list[tuple[str, str]] = []
        self.welcomed = False
        self.reactor.add_global_handler("welcome", lambda c, e: setattr(self, "welcomed", True))
        self.reactor.add_global_handler("privmsg", lambda c, e: self.privmsgs.append((e.source.nick, e.arguments[0])))
        self.reactor.add_global_handler("privnotice", lambda c, e: self.notices.append(
            (str(e.source), e.arguments[0])))
        self.conn = self.reactor.server().connect("127.0.0.1", port, nick)

    def texts(self) -> list[str]:
        return [t for _, t in self.privmsgs]


def pump(peers: list[IrcPeer], until, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in peers:
            p.reactor.process_once(0.05)
        if until():
            return True
    return False


def irc_pair(ircd, gateway, inside_sender: bool) -> tuple[IrcPeer, IrcPeer]:
    tag = uuid.uuid4().hex[:5]
    sender = IrcPeer(gateway.port if inside_sender else ircd.port, f"al{tag}")
    receiver = IrcPeer(ircd.port if inside_sender else gateway.port, f"bo{tag}")
    assert pump([sender, receiver], lambda: sender.welcomed and receiver.welcomed), "IRC clients not welcomed"
    return sender, receiver


def irc_sentinel(sender: IrcPeer, receiver: IrcPeer) -> None:
    body = f"sentinel {uuid.uuid4().hex[:8]}"
    sender.conn.privmsg(receiver.nick, body)
    assert pump([sender, receiver], lambda: body in receiver.texts()), f"the sentinel {body!r} did not arrive"


def irc_warned(sender: IrcPeer, receiver: IrcPeer, text: str) -> None:
    sender.conn.privmsg(receiver.nick, text)
    assert pump([sender, receiver], lambda: any("!justify" in n for _, n in sender.notices)), \
        f"no warning NOTICE; the sender got {sender.notices}"
    assert any(src.startswith("imguard") and "Price list leaving the company" in n for src, n in sender.notices)
    irc_sentinel(sender, receiver)
    assert text not in receiver.texts(), "a warned message reached its receiver before any answer"


def test_irc_warn_justify_delivers_with_the_reason(ircd, irc_warn_gateway):
    """Inside sender: warned by a NOTICE, held; `!justify <reason>` (a PRIVMSG to the same peer) delivers the line; the
    reason is in the alert; the answer never crosses."""
    gw = irc_warn_gateway
    since = gw.mark()
    alice, bob = irc_pair(ircd, gw, inside_sender=True)
    try:
        text = f"the {WARN_WORD} for you {uuid.uuid4().hex[:6]}"
        irc_warned(alice, bob, text)
        alice.conn.privmsg(bob.nick, "!justify signed NDA on file")
        assert pump([alice, bob], lambda: text in bob.texts()), f"not delivered: {bob.texts()}"
        assert pump([alice, bob], lambda: any("delivered" in n for _, n in alice.notices))
        irc_sentinel(alice, bob)
        assert not any("!justify" in t for t in bob.texts())
        event = gw.wait_alert(lambda e: outcome(e, "justified", text), since)
        assert event is not None, "no warn_justified event"
        assert event["imguard"]["warn"]["justification"] == "signed NDA on file"
        assert event["rule"]["id"] == WARN_RULE and event["imguard"]["decision"]["action"] == WARN
    finally:
        alice.conn.disconnect()
        bob.conn.disconnect()


def test_irc_warn_without_answer_is_never_delivered(ircd, irc_warn_gateway):
    """No answer within the window: dropped, with a warn_expired event; the sentinel arrives, the text never does."""
    gw = irc_warn_gateway
    since = gw.mark()
    alice, bob = irc_pair(ircd, gw, inside_sender=True)
    try:
        text = f"the {WARN_WORD} unanswered {uuid.uuid4().hex[:6]}"
        irc_warned(alice, bob, text)
        pump([alice, bob], lambda: False, timeout=WINDOW + 0.5)
        alice.conn.privmsg(bob.nick, "!justify too late")
        assert pump([alice, bob], lambda: any("no held message" in n for _, n in alice.notices))
        irc_sentinel(alice, bob)
        assert text not in bob.texts() and not any("too late" in t for t in bob.texts())
        event = gw.wait_alert(lambda e: outcome(e, "expired", text), since)
        assert event is not None and event["imguard"]["warn"]["delivered"] is False
    finally:
        alice.conn.disconnect()
        bob.conn.disconnect()


def test_irc_false_positive_is_recorded(ircd, irc_warn_gateway):
    """`!falsepositive <comment>` is recorded with the alert."""
    gw = irc_warn_gateway
    since = gw.mark()
    alice, bob = irc_pair(ircd, gw, inside_sender=True)
    try:
        text = f"public {WARN_WORD} {uuid.uuid4().hex[:6]}"
        irc_warned(alice, bob, text)
        alice.conn.privmsg(bob.nick, "!falsepositive it is published")
        assert pump([alice, bob], lambda: text in bob.texts())
        event = gw.wait_alert(lambda e: outcome(e, "false_positive", text), since)
        assert event is not None and event["imguard"]["warn"]["comment"] == "it is published"
    finally:
        alice.conn.disconnect()
        bob.conn.disconnect()


def test_irc_inbound_warn_is_refused(ircd, irc_warn_gateway):
    """Outside sender, inside receiver: refused like a block (the receiver gets a NOTICE, never the text)."""
    gw = irc_warn_gateway
    mallory, alice = irc_pair(ircd, gw, inside_sender=False)
    try:
        text = f"inbound {WARN_WORD} {uuid.uuid4().hex[:6]}"
        mallory.conn.privmsg(alice.nick, text)
        assert pump([mallory, alice], lambda: any("was blocked" in n for _, n in alice.notices)), alice.notices
        irc_sentinel(mallory, alice)
        assert text not in alice.texts()
    finally:
        mallory.conn.disconnect()
        alice.conn.disconnect()


# --- the state machine alone ------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _decision() -> Decision:
    return Decision(action=WARN, matches=[RuleMatch(WARN_RULE, WARN, "medium", "enforce", title="t")])


def test_answers_are_read_by_keyword_only():
    """A keyword at the start, any case, followed by a space or nothing; anything else is a plain message."""
    s = ConversationSettings()
    assert parse_answer("!justify  the customer   asked", s) == Answer(WarnState.JUSTIFIED, "the customer asked")
    assert parse_answer("!FALSEPOSITIVE", s) == Answer(WarnState.FALSE_POSITIVE, "")
    assert parse_answer("!justifyme", s) is None and parse_answer("please !justify x", s) is None
    assert parse_answer(None, s) is None
    assert len(parse_answer("!justify " + "x" * 5000, s).text) == s.warn_max_answer_chars


def test_table_is_bounded_expires_and_refuses_an_empty_justification():
    clock = Clock()
    table = PendingWarnings(ConversationSettings(warn_window_seconds=10, warn_max_pending=2), clock)
    ctx = ChatContext(protocol="xmpp", sender="a@x", recipients=("b@y",))
    assert table.hold("a@x", "b@y", ctx, "one", _decision(), b"1") == []
    table.hold("a@x", "b@y", ctx, "two", _decision(), b"2")
    displaced = table.hold("a@x", "c@y", ctx, "three", _decision(), b"3")
    assert [(h.text, h.state) for h in displaced] == [("one", WarnState.DISPLACED)] and len(table) == 2
    empty = table.settle("a@x", "b@y", Answer(WarnState.JUSTIFIED, ""))
    assert empty.deliver is None and empty.fact is None and len(table) == 2
    released = ReleasedMessages(clock)
    settled = table.settle("a@x", "C@Y/phone", Answer(WarnState.JUSTIFIED, "ok"), released)
    assert settled.deliver.payload == b"3" and settled.fact.state is WarnState.JUSTIFIED
    assert released.take("a@x/laptop", "three") and not released.take("a@x", "three")
    clock.now += 10
    expired = table.expire()
    assert [(h.text, h.state) for h in expired] == [("two", WarnState.EXPIRED)] and len(table) == 0
    assert table.settle("a@x", "b@y", Answer(WarnState.JUSTIFIED, "late")).deliver is None
    with pytest.raises(ValueError):
        expired[0].move(WarnState.JUSTIFIED)        # a final state stays final


def test_false_positive_can_be_kept_from_delivering():
    table = PendingWarnings(ConversationSettings(warn_false_positive_delivers=False), Clock())
    table.hold("a", "b", ChatContext(sender="a", recipients=("b",)), "t", _decision(), b"t")
    settled = table.settle("a", "b", Answer(WarnState.FALSE_POSITIVE, "no"), ReleasedMessages())
    assert settled.deliver is None and settled.fact.delivered is False and "not delivered" in settled.notice


# --- the sessions as transcripts (sans-io: bytes in, commands out) -------------------------------------------

def _warn_checker(base):
    """The test suites' policy stand-ins, with a WARN for WARN_WORD."""
    class WarnChecker(base):
        def check_message(self, text, ctx):
            if WARN_WORD in text:
                self.calls.append((text, ctx))
                return _decision()
            return super().check_message(text, ctx)
    return WarnChecker()


def test_irc_session_holds_releases_byte_exact_and_abandons_on_close():
    """IRC: the warned line does not reach the server; `!justify`, split at every byte, releases exactly the bytes the
    client sent and itself never crosses; a line held when the connection closes is dropped with an event."""
    from imguard.conversation import WarnOutcome
    from tests.test_irc_session import registered
    from tests.test_irc_support import Checker, sends
    held_line = f"PRIVMSG bob :the {WARN_WORD}\r\n".encode()
    answer = b"PRIVMSG bob :!justify board approved it\r\n"
    for cut in range(1, len(answer)):
        s, _ = registered(_warn_checker(Checker))
        out = s.data_received(True, held_line)
        assert sends(out, to_client=False) == b"" and b"!justify" in sends(out, to_client=True)
        out = s.data_received(True, answer[:cut]) + s.data_received(True, answer[cut:])
        assert sends(out, to_client=False) == held_line, cut
        [fact] = [c for c in out if isinstance(c, WarnOutcome)]
        assert fact.state is WarnState.JUSTIFIED and fact.answer == "board approved it"
    s, _ = registered(_warn_checker(Checker))
    s.data_received(True, held_line)
    out = s.connection_closed(True)
    assert [c.state for c in out if isinstance(c, WarnOutcome)] == [WarnState.ABANDONED]
    assert s.data_received(True, b"PRIVMSG bob :!justify late\r\n")[-1].data.startswith(b":imguard NOTICE alice")


def test_xmpp_session_holds_releases_byte_exact_and_expires():
    """XMPP: the warned stanza does not reach the server (the client gets the policy-violation error with how to
    answer); `!justify` releases the stanza as the client sent it; an unanswered one expires at the next traffic."""
    from imguard.conversation import WarnOutcome
    from tests.test_xmpp_session import Checker, logged_in, message, sent
    s = logged_in(_warn_checker(Checker))
    clock = Clock()
    s.warnings.clock = clock
    held = message(f"the {WARN_WORD}", mid="w1")
    out = s.data_received(True, held)
    assert sent(out, False) == b"" and b"policy-violation" in sent(out, True) and b"!justify" in sent(out, True)
    out = s.data_received(True, message("!justify audit asked", mid="w2"))
    assert sent(out, False) == held and b"!justify" not in sent(out, False)
    assert [c.state for c in out if isinstance(c, WarnOutcome)] == [WarnState.JUSTIFIED]
    s.data_received(True, message(f"another {WARN_WORD}", mid="w3"))
    clock.now += ConversationSettings().warn_window_seconds
    out = s.data_received(False, b"<presence from='bob@localhost/x'/>")
    assert [c.state for c in out if isinstance(c, WarnOutcome)] == [WarnState.EXPIRED]
    assert b"another" not in sent(out, False)
