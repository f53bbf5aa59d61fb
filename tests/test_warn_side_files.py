"""Warn and continue for a file on a connection of its own (IRC DCC SEND), and a warning's window kept by a timer.
End to end with real parts: `irc` library clients (tests/test_e2e_irc.py's Chat) on a real ngIRCd, through the real
`imguard run` with its DCC relay.

What a user and an auditor would check: a warned DCC file is held (the sender has had every ACK and is done; the
receiver has none of it and waits: a sentinel in the channel arrives meanwhile); its sender is told why and how to
answer, in the chat that carried the offer; `!justify <reason>` there releases the file to the receiver
byte-identical (active and passive DCC) and the reason is in the file's `warn_justified` event; the answer never
reaches the receiver. No answer: at the window's end (a timer: nobody writes anything) the receiver's connection is
closed with none of the file and `warn_expired` says so; a late answer finds nothing held. The sender leaving the
chat gives the file up at once (`warn_abandoned`). An outside sender's file: nobody on this side can answer for it,
refused like a block. A warned *message* on a connection that stays idle: `warn_expired` comes at the window's end,
not at the next traffic. The state machine and the DCC session as transcripts: tests at the end.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from imguard.conversation import (Answer, ConversationSettings, HeldMessage, PendingWarnings, SideWarnings,
                                  WarnState, settle_answer)
from imguard.model import FROM_CLIENT, FROM_SERVER, WARN, ChatContext, Decision, FileReport, RuleMatch
from tests.peers.conversation_rules import file_outcome, rule, rules_extra, rules_yaml, serving, sha, watched
from tests.peers.payloads import random_payload
from tests.test_e2e_irc import Chat, Route
from tests.test_warn_continue import Clock, ircd  # noqa: F401

pytestmark = pytest.mark.timeout(240)

WINDOW = 4.0                        # --warn-window-seconds of the gateway here
SLACK = 2.0                         # what the window's end may take beyond it, end to end
WARN_EXT = "xlsq"                   # files named *.xlsq are matched by the file warn rule
WARN_FILE_RULE = "test-warn-side-file"
WARN_WORD = "pricelist-q4"          # messages naming it are matched by the message warn rule
WARN_MESSAGE_RULE = "test-warn-side-message"
RULES = rules_yaml(
    rule(WARN_FILE_RULE, "Price list file leaving the company", "warn", "file", f"extension: [{WARN_EXT}]"),
    rule(WARN_MESSAGE_RULE, "Price list leaving the company", "warn", "message", f"keywords: [{WARN_WORD}]"))


@pytest.fixture(scope="module")
def side_gateway(peers_dir, ircd):  # noqa: F811
    from tests.peers.ngircd import IrcGateway
    directory = peers_dir / f"imguard-warnside-{uuid.uuid4().hex[:6]}"
    yield from serving(IrcGateway.start(Path(directory), ircd, extra=rules_extra(
        directory, "warn-side-rules", "50-warn-side.yaml", RULES, "--warn-window-seconds", str(WINDOW))))


@pytest.fixture
def route(ircd, side_gateway) -> Route:  # noqa: F811
    """Through imguard, cleartext; the gateway must log no error meanwhile."""
    yield from watched(side_gateway, Route("imguard", False, ircd, side_gateway))


def warned_dcc(chat: Chat, route: Route, alice, bob, passive: bool = False):
    """alice (inside) offers bob a *.xlsq file by DCC: held. Returns (transfer, payload, when alice was told)."""
    data, name = random_payload(30_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
    t = chat.offer_file(alice, bob, name, data, passive=passive)
    assert chat.pump(lambda: any("!justify" in n and name in n for n in alice.imguard_notices()), 20), (
        f"alice was not told how to answer: {alice.notices}\n{route.failure_logs()}")
    told = time.monotonic()
    assert chat.pump(lambda: t.acked >= len(data), 10), f"the sender was not ACKed to the end: {t.acked}"
    assert t.offer is not None and t.offer["port"] in route.gateway.dcc_ports, t.offer
    chat.sentinel(alice, bob, "while the file is held")
    assert bytes(t.received) == b"", f"bob got {len(t.received)} bytes of a file waiting for its sender's answer"
    assert not t.receiver_closed, "the receiver's connection ended before any answer"
    held = route.wait_alert(lambda e: e["event"].get("action") == WARN
                            and e.get("file", {}).get("hash", {}).get("sha256") == sha(data))
    assert held is not None and held["rule"]["id"] == WARN_FILE_RULE, held
    assert held["imguard"]["context"]["transfer_mechanism"] == "dcc"
    return t, data, told


@pytest.mark.parametrize("passive,bob_inside", [(False, False), (True, False), (False, True)],
                         ids=["active", "passive", "active-inside-receiver"])
def test_dcc_warned_file_justified_in_the_chat_is_released(route, passive, bob_inside):
    """Inside sender, outside receiver (or an inside one: the offer crosses the gateway twice, the file once): the
    DCC file waits; alice's `!justify <reason>` to bob, in the chat, releases it to bob byte-identical; the reason
    is in the file's warn_justified event; bob never sees the answer."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob", outside=not bob_inside)
        t, data, _ = warned_dcc(chat, route, alice, bob, passive)
        alice.conn.privmsg(bob.nick, "!justify the distributor asked for it")
        assert chat.pump(lambda: len(t.received) >= len(data), 15), (
            f"the justified file did not arrive: {len(t.received)} of {len(data)} bytes\n{route.failure_logs()}")
        assert sha(bytes(t.received)) == sha(data), "the released file differs from the one sent"
        assert chat.pump(lambda: any("was delivered" in n for n in alice.imguard_notices()), 10), alice.notices
        chat.sentinel(alice, bob, "after the release")
        assert not any("!justify" in text for _, text in bob.private), f"the answer crossed: {bob.private}"
        event = route.wait_alert(lambda e: file_outcome(e, "justified", sha(data)))
        assert event is not None, "no warn_justified file event"
        assert event["imguard"]["warn"]["justification"] == "the distributor asked for it"
        assert event["imguard"]["warn"]["delivered"] is True and event["event"]["type"] == ["allowed"]
        assert event["file"]["name"] == t.name and event["source"]["user"]["name"] == alice.nick


def test_dcc_warned_file_unanswered_is_dropped_at_the_windows_end(route):
    """No answer and no traffic at all: at the window's end (a timer) the receiver's DCC connection is closed with
    none of the file, warn_expired says so; a late `!justify` finds nothing held."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob", outside=True)
        t, data, told = warned_dcc(chat, route, alice, bob)
        assert chat.pump(lambda: t.receiver_closed, WINDOW + SLACK + 2), (
            f"the receiver's connection was still open {WINDOW + SLACK + 2} s after the warning\n"
            f"{route.failure_logs()}")
        waited = time.monotonic() - told
        assert WINDOW - 1.0 <= waited <= WINDOW + SLACK, f"the file was dropped {waited:.2f} s after the warning"
        assert bytes(t.received) == b"", f"bob got {len(t.received)} bytes of an unanswered file"
        event = route.wait_alert(lambda e: file_outcome(e, "expired", sha(data)))
        assert event is not None, "no warn_expired file event"
        assert event["imguard"]["warn"]["delivered"] is False and event["imguard"]["warn"]["held_seconds"] >= WINDOW
        alice.conn.privmsg(bob.nick, "!justify too late")
        assert chat.pump(lambda: any("no held message" in n for n in alice.imguard_notices()), 10), alice.notices
        chat.sentinel(alice, bob, "after the window")
        assert not any("too late" in text for _, text in bob.private)


def test_dcc_warned_file_is_given_up_when_its_sender_leaves(route):
    """The sender quits the chat before answering: nobody can answer any more, the file is dropped at once (the
    receiver's connection closed long before the window's end), warn_abandoned."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob", outside=True)
        carol = chat.person("carol")
        t, data, told = warned_dcc(chat, route, alice, bob)
        alice.conn.quit("bye")
        assert chat.pump(lambda: t.receiver_closed, WINDOW - 1.5), (
            f"the receiver still waited after its sender left\n{route.failure_logs()}")
        assert time.monotonic() - told < WINDOW
        assert bytes(t.received) == b""
        assert route.wait_alert(lambda e: file_outcome(e, "abandoned", sha(data))) is not None
        chat.sentinel(carol, bob, "after the sender left")


def test_dcc_inbound_warned_file_is_refused(route):
    """Outside sender, inside receiver: nobody on this side can answer for the sender: refused like a block (the
    inside receiver gets none of it and is told), no warning is held."""
    with Chat(route) as chat:
        bob, mallory = chat.person("bob"), chat.person("mallory", outside=True)
        data, name = random_payload(20_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
        t = chat.offer_file(mallory, bob, name, data)
        assert chat.pump(lambda: t.done, 20), f"the transfer did not end: {t.offer}\n{route.failure_logs()}"
        assert t.offer is not None and t.offer["port"] in route.gateway.dcc_ports, t.offer
        assert bytes(t.received) == b"", "an outside sender's warned file reached the inside receiver"
        assert chat.pump(lambda: any(name in n and "was blocked" in n for n in bob.imguard_notices()), 10), bob.notices
        chat.sentinel(mallory, bob, "after the refused file")
        event = route.wait_alert(lambda e: e["event"].get("action") == WARN
                                 and e.get("file", {}).get("hash", {}).get("sha256") == sha(data))
        assert event is not None and event["network"]["direction"] == "inbound"
        assert not route.wait_alert(lambda e: e["event"].get("action", "").startswith("warn_")
                                    and e.get("file", {}).get("hash", {}).get("sha256") == sha(data), timeout=0.5)


def test_warned_message_on_an_idle_connection_expires_on_time(route):
    """A warned PRIVMSG, then nobody writes: warn_expired is recorded at the window's end (a timer), not at the
    connection's next traffic; then a sentinel, and the message never arrived."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob", outside=True)
        text = f"the {WARN_WORD} for {uuid.uuid4().hex[:6]}"
        since = route.gateway.mark()
        alice.conn.privmsg(bob.nick, text)
        assert chat.pump(lambda: any("!justify" in n for n in alice.imguard_notices()), 10), alice.notices
        told = time.monotonic()
        event = None
        while event is None and time.monotonic() - told < WINDOW + SLACK + 2:
            chat.pump(lambda: False, 0.2)           # reading only: alice's connection carries nothing
            event = next((e for e in route.gateway.alerts()[since:] if e.get("event", {}).get("action")
                          == "warn_expired" and text in str(e.get("imguard", {}).get("message"))), None)
        assert event is not None, f"no warn_expired within {WINDOW + SLACK + 2} s on an idle connection"
        waited = time.monotonic() - told
        assert waited <= WINDOW + SLACK, f"warn_expired came {waited:.2f} s after the warning"
        assert event["imguard"]["warn"]["held_seconds"] >= WINDOW
        chat.sentinel(alice, bob, "after the window")
        assert text not in [t for _, t in bob.private]


# --- XMPP: the window's end on an idle connection ------------------------------------------------------------

@pytest.fixture(scope="module")
def xmpp_gateway(peers_dir, prosody):
    from tests.peers.gateway import Gateway
    directory = peers_dir / f"imguard-warnidle-{uuid.uuid4().hex[:6]}"
    yield from serving(Gateway.start(directory, prosody, extra=rules_extra(
        directory, "warn-idle-rules", "50-warn-idle.yaml", RULES, "--warn-window-seconds", str(WINDOW),
        "--fail-mode", "xmpp:downgrade=open")))


def test_xmpp_warned_message_and_file_expire_on_an_idle_connection(prosody, xmpp_gateway):
    """XMPP, nobody writes after the warnings: the message's warn_expired and the file's (its receiver's in-band
    stream closed with none of it) come at the window's end, not at the next traffic; then a sentinel."""
    import asyncio

    from tests.test_warn_continue import Xmpp, sentinel, warned
    from tests.test_warn_files import warned_file
    gw = xmpp_gateway

    async def scenario():
        x = Xmpp(prosody, gw)
        since = gw.mark()
        async with x.clients(("alice", True), ("bob", False)) as (alice, bob):
            text = f"the {WARN_WORD} for {uuid.uuid4().hex[:6]}"
            await warned(alice, bob, text)
            data, name = random_payload(9_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
            sid = await warned_file(alice, bob, name, data)
            told = time.monotonic()
            message = await gw.wait_alert(lambda e: e["event"].get("action") == "warn_expired"
                                          and e["imguard"].get("message", {}).get("text") == text, since,
                                          timeout=WINDOW + SLACK + 2)
            assert message is not None, "no warn_expired for the message on an idle connection"
            assert await bob.wait_for(lambda r: sid in r.ibb_closed, timeout=WINDOW + SLACK + 2), \
                "the receiver's in-band stream was not closed at the window's end"
            waited = time.monotonic() - told
            assert waited <= WINDOW + SLACK, f"the file was refused {waited:.2f} s after its warning"
            assert await gw.wait_alert(lambda e: file_outcome(e, "expired", sha(data)), since) is not None
            await sentinel(alice, bob)
            assert text not in bob.bodies() and not bob.received.ibb.get(sid)
    asyncio.run(scenario())


def test_xmpp_socks5_warned_file_justified_in_the_chat_is_released(prosody, xmpp_gateway):
    """XEP-0065 SOCKS5 bytestream through the gateway's relay, inside sender, outside receiver: the file waits on its
    own connection; alice's `!justify <reason>` in the chat releases it to bob byte-identical (warn_justified);
    a second file left unanswered is dropped at the window's end (bob's stream closed with none of it)."""
    import asyncio

    from tests.test_warn_continue import Xmpp, sentinel
    gw = xmpp_gateway

    def told(client, name: str) -> bool:
        return any("!justify" in (m["body"] or "") and name in (m["body"] or "") for m in client.received.messages)

    async def warned_socks5(alice, bob, data: bytes, name: str) -> int:
        start, closed = len(bob.received.socks5), bob.received.socks5_closed
        result = await alice.socks5_send(bob.jid, data, name=name)
        assert not result.error, f"the sender's SOCKS5 send failed: {result}"
        assert set(bob.received.streamhosts) == {("127.0.0.1", gw.socks5_port)}, bob.received.streamhosts
        assert await alice.wait_for(lambda r: told(alice, name)), [m["body"] for m in alice.received.messages]
        await sentinel(alice, bob)
        assert len(bob.received.socks5) == start and bob.received.socks5_closed == closed, \
            "a warned bytestream file reached (or was closed to) its receiver before any answer"
        return start

    async def scenario():
        x = Xmpp(prosody, gw)
        since = gw.mark()
        async with x.clients(("alice", True), ("bob", False)) as (alice, bob):
            data, name = random_payload(20_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
            start = await warned_socks5(alice, bob, data, name)
            alice.send_chat(bob.jid, "!justify the distributor asked for it")
            assert await bob.wait_for(lambda r: len(r.socks5) - start >= len(data)), \
                f"the justified file did not arrive: {len(bob.received.socks5) - start} bytes"
            assert sha(bytes(bob.received.socks5[start:start + len(data)])) == sha(data)
            event = await gw.wait_alert(lambda e: file_outcome(e, "justified", sha(data)), since)
            assert event is not None and event["imguard"]["warn"]["justification"] == "the distributor asked for it"
            assert event["imguard"]["context"]["transfer_mechanism"] == "socks5"
            assert not any("!justify" in b for b in bob.bodies()), "the answer crossed to the receiver"
            assert await bob.wait_for(lambda r: r.socks5_closed > 0), "the released stream was never closed"
            other, other_name = random_payload(9_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
            closed = bob.received.socks5_closed
            start = await warned_socks5(alice, bob, other, other_name)
            began = time.monotonic()
            assert await bob.wait_for(lambda r: r.socks5_closed > closed, timeout=WINDOW + SLACK + 2), \
                "the unanswered bytestream was not closed at the window's end"
            assert time.monotonic() - began <= WINDOW + SLACK
            assert len(bob.received.socks5) == start, "an unanswered warned file reached its receiver"
            assert await gw.wait_alert(lambda e: file_outcome(e, "expired", sha(other)), since) is not None
            await sentinel(alice, bob)
    asyncio.run(scenario())


# --- the state machine and the DCC session, sans-io ----------------------------------------------------------

def _decision() -> Decision:
    return Decision(action=WARN, matches=[RuleMatch(WARN_FILE_RULE, WARN, "medium", "enforce",
                                                    title="Price list file")])


def _held(sender: str, key: str, tag: str, at: float) -> HeldMessage:
    ctx = ChatContext(protocol="irc", sender=sender, recipients=(key,), origin=FROM_CLIENT)
    return HeldMessage(sender, key, ctx, f"{tag}.xlsq", _decision(), b"", at, tag=tag,
                       report=FileReport(name=f"{tag}.xlsq", path=f"{tag}.xlsq", size=3, sha256=tag * 4))


def test_side_warnings_table():
    """Held per sender and chat; an answer in that chat finds its file (to the peer named, else the oldest), an answer
    in another chat finds nothing; the window's end is met by collect; a newer file displaces the oldest; the chat
    ending abandons what is held."""
    clock, settings = Clock(), ConversationSettings(warn_window_seconds=10, warn_max_pending=2)
    sides = SideWarnings(clock)
    assert sides.hold(_held("alice", "bob", "t1", clock.now), "irc-1", "dcc-1", settings) == []
    assert sides.hold(_held("alice", "carol", "t2", clock.now), "irc-1", "dcc-2", settings) == []
    found, side = sides.settle("alice", "irc-9", "bob", Answer(WarnState.JUSTIFIED, "x"), settings)
    assert side == "" and found.fact is None, "an answer in another chat released a file"
    found, side = sides.settle("alice", "irc-1", "carol", Answer(WarnState.JUSTIFIED, "ok"), settings)
    assert side == "dcc-2" and found.deliver is None and found.fact.state is WarnState.JUSTIFIED
    assert sides.collect("t1", settings) is None, "a file still in its window was collected"
    assert sides.collect("t2", settings).state is WarnState.JUSTIFIED and sides.collect("t2", settings) is None
    clock.now += 10
    assert sides.collect("t1", settings).state is WarnState.EXPIRED
    for tag in ("t3", "t4"):
        sides.hold(_held("alice", "bob", tag, clock.now), "irc-1", f"dcc-{tag}", settings)
    displaced = sides.hold(_held("alice", "bob", "t5", clock.now), "irc-1", "dcc-t5", settings)
    assert [d.side for d in displaced] == ["dcc-t3"] and displaced[0].held.state is WarnState.DISPLACED
    assert [e.side for e in sides.abandon("irc-1")] == ["dcc-t4", "dcc-t5"]
    assert sides.collect("t4", settings).state is WarnState.ABANDONED


def test_settle_answer_prefers_the_conversation_named():
    """An answer to bob releases the file to bob even though a message to carol is held on the chat connection;
    with nothing held for the peer named, the connection's own message comes first."""
    clock, settings = Clock(), ConversationSettings(warn_window_seconds=10)
    sides, local = SideWarnings(clock), PendingWarnings(settings, clock)
    ctx = ChatContext(protocol="irc", sender="alice", recipients=("carol",), origin=FROM_CLIENT)
    local.hold("alice", "carol", ctx, "the pricelist", _decision(), b"PRIVMSG carol :the pricelist\r\n")
    sides.hold(_held("alice", "bob", "f1", clock.now), "irc-1", "dcc-1", settings)
    found, side = settle_answer(local, "irc-1", "alice", "bob", Answer(WarnState.JUSTIFIED, "ok"), sides)
    assert side == "dcc-1" and found.held.tag == "f1"
    sides.hold(_held("alice", "bob", "f2", clock.now), "irc-1", "dcc-2", settings)
    found, side = settle_answer(local, "irc-1", "alice", "imguard", Answer(WarnState.JUSTIFIED, "ok"), sides)
    assert side == "" and found.deliver is not None and found.deliver.text == "the pricelist"
    found, side = settle_answer(local, "irc-1", "alice", "", Answer(WarnState.JUSTIFIED, ""), sides)
    assert side == "" and found.fact is None and "needs a reason" in found.notice


def _dcc_pair(outbound: bool = True):
    from imguard.protocols.irc.dcc import DccOffer, DccSendSession
    tag = uuid.uuid4().hex[:6]
    origin = FROM_CLIENT if outbound else FROM_SERVER
    offer = DccOffer(f"dcc-{tag}", "send", "p.xlsq", 4, "alice" if outbound else "mallory!m@h", "bob", "127.0.0.1",
                     5000, relay_host="127.0.0.1", relay_port=6000, outbound=outbound,
                     context=ChatContext(protocol="irc", sender="alice" if outbound else "mallory!m@h",
                                         recipients=("bob",), origin=origin, connection_id=f"irc-{tag}"))
    session = DccSendSession(None, None, ChatContext(connection_id=f"side-{tag}"), offer,
                             conversation=ConversationSettings(warn_window_seconds=60))
    return offer, session


def _inspected(session) -> list:
    from imguard.protocols.base import InspectFile
    return [c for c in session.data_received(False, b"abcd") if isinstance(c, InspectFile)]


def test_dcc_session_holds_a_warned_file_until_the_answer_wakes_it():
    """Transcript: the verdict warn holds the file (the sender told how to answer on the IRC connection, a Wake at
    the window's end, nothing to the receiver); a wake before any answer changes nothing; the answer on the IRC
    connection wakes the DCC connection, which releases the held bytes to the receiver."""
    from imguard.protocols.base import Notify, Send, Wake
    offer, session = _dcc_pair()
    (inspect,) = _inspected(session)
    report = FileReport(name="p.xlsq", path="p.xlsq", size=4, sha256=sha(b"abcd"))
    held = session.file_verdict(inspect.transfer_id, report, _decision())
    assert not [c for c in held if isinstance(c, Send) and c.to_client], "bytes reached the receiver on a warn"
    (notify,) = [c for c in held if isinstance(c, Notify)]
    assert notify.connection_id == offer.context.connection_id and "!justify" in notify.text
    assert [c.after for c in held if isinstance(c, Wake)] == [60.05]
    assert session.wake() == []
    local = PendingWarnings(ConversationSettings(warn_window_seconds=60))
    found, side = settle_answer(local, offer.context.connection_id, "alice", "bob", Answer(WarnState.JUSTIFIED, "ok"))
    assert side == session.context.connection_id and found.fact.state is WarnState.JUSTIFIED
    released = session.wake()
    assert Send(to_client=True, data=b"abcd") in released, released


def test_dcc_session_refuses_an_outside_senders_warned_file():
    """An inbound file under a warn rule: refused at once like a block (nothing held, no Wake, nothing delivered)."""
    from imguard.protocols.base import Close, Send, Wake
    _, session = _dcc_pair(outbound=False)
    (inspect,) = _inspected(session)
    out = session.file_verdict(inspect.transfer_id, FileReport(name="p.xlsq", path="p.xlsq", size=4), _decision())
    assert any(isinstance(c, Close) for c in out) and not any(isinstance(c, Wake) for c in out)
    assert not [c for c in out if isinstance(c, Send) and c.to_client and c.data == b"abcd"]


def test_socks5_session_holds_a_warned_file_until_the_answer_wakes_it():
    """Transcript (the relay's target leg): the warn verdict holds the bytestream file (a Notify for the XMPP
    connection that offered it, a Wake at the window's end, nothing to the receiver, the sender's close not passed
    on); the answer on that XMPP connection wakes the relay, which releases the file and then closes."""
    from imguard.protocols.base import Close, Notify, Send, Wake
    from tests.test_socks5_bytestream import carrier_mode_target_leg, table
    s = carrier_mode_target_leg(table(), conversation=ConversationSettings(warn_window_seconds=60))
    assert s.data_received(False, b"price list") == []
    (inspect,) = s.connection_closed(from_client=False)            # the sender (proxy65) closed: whole
    held = s.file_verdict(inspect.transfer_id, FileReport("p.xlsq", "p.xlsq", 10, sha256=sha(b"price list")),
                          _decision())
    assert not [c for c in held if isinstance(c, (Send, Close))], held
    assert [c.connection_id for c in held if isinstance(c, Notify)] == ["xmpp-1"]
    assert [c.after for c in held if isinstance(c, Wake)] == [60.05]
    assert not s.passes_close_on(False), "the sender's close reached the receiver before the file"
    local = PendingWarnings(ConversationSettings(warn_window_seconds=60))
    _, side = settle_answer(local, "xmpp-1", "alice@localhost", "bob@localhost", Answer(WarnState.JUSTIFIED, "ok"))
    assert side == "relay-1"
    assert s.wake() == [Send(True, b"price list"), Close("socks5 transfer done")]


def test_irc_session_every_hold_has_its_own_wake():
    """IRC transcript, the session's clock in hand: each warned line asks for a Wake at its own window's end; a wake
    expires what is due (warn_expired), and only that, with no traffic in between."""
    from imguard.conversation import WarnOutcome
    from imguard.protocols.base import Wake
    from tests.test_irc_session import registered
    from tests.test_irc_support import Checker
    from tests.test_warn_continue import _warn_checker
    from tests.test_warn_continue import WARN_WORD as MESSAGE_WORD
    clock = Clock()
    s, _ = registered(_warn_checker(Checker))
    s.warnings.clock = clock
    window = s.warnings.settings.warn_window_seconds
    first = s.data_received(True, f"PRIVMSG bob :the {MESSAGE_WORD} one\r\n".encode())
    clock.now += 2
    second = s.data_received(True, f"PRIVMSG bob :the {MESSAGE_WORD} two\r\n".encode())
    assert [c.after for c in first + second if isinstance(c, Wake)] == [window + 0.05] * 2
    clock.now += window - 2 + 0.05
    assert [f.text for f in s.wake() if isinstance(f, WarnOutcome) and f.state is WarnState.EXPIRED] == \
        [f"the {MESSAGE_WORD} one"]
    assert s.wake() == []
    clock.now += 2
    assert [f.text for f in s.wake() if isinstance(f, WarnOutcome)] == [f"the {MESSAGE_WORD} two"]
