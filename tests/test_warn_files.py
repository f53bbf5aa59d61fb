"""Warn and continue for files (a `warn` rule on a file), end to end with real parts: slixmpp clients sending by
XEP-0047 in-band bytestreams on a real Prosody, through the real `imguard run`.

What a user and an auditor would check: a warned file is held whole (the receiver gets none of it: a sentinel sent
after it arrives first); its sender is told why and how to answer, in the chat; `!justify <reason>` delivers the
file byte-identical and the reason is in the file's alert (`warn_justified`); no answer within the window: the
receiver never gets it (its stream is closed) and `warn_expired` says so. Both sides of the perimeter: the sender
inside (held for the answer) and outside (nobody on this side can answer for it: refused like a block), and two
inside parties (the justified file's copy to the inside receiver is delivered, `warn_delivered`, not held again).
The session as a transcript and the tracker's table: tests at the end.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from imguard.model import WARN
from tests.peers.conversation_rules import file_outcome, rule, rules_extra, rules_yaml, serving, sha
from tests.peers.payloads import random_payload
from tests.test_warn_continue import Xmpp, sentinel

pytestmark = pytest.mark.timeout(240)

WARN_RULE = "test-warn-file-pricelist"
WARN_EXT = "xlsq"                   # files named *.xlsq are matched by the warn rule below
WINDOW = 4.0                        # --warn-window-seconds of the gateway here
RULES = rules_yaml(rule(WARN_RULE, "Price list file leaving the company", "warn", "file", f"extension: [{WARN_EXT}]"))


@pytest.fixture(scope="module")
def warn_file_gateway(peers_dir, prosody):
    from tests.peers.gateway import Gateway
    directory = peers_dir / f"imguard-warnfile-{uuid.uuid4().hex[:6]}"
    yield from serving(Gateway.start(directory, prosody, extra=rules_extra(
        directory, "warn-file-rules", "50-warn-file.yaml", RULES, "--warn-window-seconds", str(WINDOW),
        "--fail-mode", "xmpp:downgrade=open")))


def notices(client, word: str) -> list[str]:
    return [m["body"] for m in client.received.messages if word in (m["body"] or "")]


async def warned_file(sender, receiver, name: str, data: bytes) -> str:
    """Send `data` as `name` by IBB; the sender is told how to answer, the receiver has none of it. The sid."""
    result = await sender.ibb_send(receiver.jid, data, name=name)
    assert result.completed and not result.error, f"the sender's IBB send failed: {result}"
    assert await sender.wait_for(lambda r: notices(sender, "!justify")), \
        f"no warning reached the sender: {[m['body'] for m in sender.received.messages]}"
    assert any(name in n and "Price list file" in n for n in notices(sender, "!justify")), notices(sender, "!justify")
    await sentinel(sender, receiver)
    assert not receiver.received.ibb.get(result.sid), "a warned file's bytes reached its receiver before any answer"
    return result.sid


def test_xmpp_warned_file_justified_is_delivered(prosody, warn_file_gateway):
    """Inside sender, outside receiver: the file is held; `!justify <reason>` releases it byte-identical; the reason
    is in the file's warn_justified alert; the answer never reaches the receiver."""
    gw = warn_file_gateway

    async def scenario():
        x = Xmpp(prosody, gw)
        since = gw.mark()
        async with x.clients(("alice", True), ("bob", False)) as (alice, bob):
            data, name = random_payload(20_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
            sid = await warned_file(alice, bob, name, data)
            held = await gw.wait_alert(lambda e: e["event"].get("action") == WARN
                                       and e.get("file", {}).get("hash", {}).get("sha256") == sha(data), since)
            assert held is not None and held["rule"]["id"] == WARN_RULE and held["event"]["dataset"] == "imguard.file"
            alice.send_chat(bob.jid, "!justify the distributor asked for it")
            assert await bob.wait_for(lambda r: sid in r.ibb_closed and bytes(r.ibb.get(sid, b"")) == data), \
                f"the justified file did not arrive whole: {len(bob.received.ibb.get(sid, b''))} bytes"
            assert await alice.wait_for(lambda r: notices(alice, "was delivered"))
            await sentinel(alice, bob)
            assert not any("!justify" in b for b in bob.bodies()), "the answer crossed to the receiver"
            event = await gw.wait_alert(lambda e: file_outcome(e, "justified", sha(data)), since)
            assert event is not None, "no warn_justified file event"
            assert event["imguard"]["warn"]["justification"] == "the distributor asked for it"
            assert event["imguard"]["warn"]["delivered"] is True and event["event"]["type"] == ["allowed"]
            assert event["file"]["name"] == name and event["source"]["user"]["name"] == alice.jid.split("/")[0]
    asyncio.run(scenario())


def test_xmpp_warned_file_unanswered_is_never_delivered(prosody, warn_file_gateway):
    """No answer within the window: the receiver's stream is closed with none of the file, a late `!justify` delivers
    nothing, and warn_expired records it."""
    gw = warn_file_gateway

    async def scenario():
        x = Xmpp(prosody, gw)
        since = gw.mark()
        async with x.clients(("alice", True), ("bob", False)) as (alice, bob):
            data, name = random_payload(9_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
            sid = await warned_file(alice, bob, name, data)
            await asyncio.sleep(WINDOW + 0.5)
            await sentinel(alice, bob)          # the next traffic on alice's connection ends the window
            assert await bob.wait_for(lambda r: sid in r.ibb_closed), "the receiver's stream was never closed"
            alice.send_chat(bob.jid, "!justify too late")
            assert await alice.wait_for(lambda r: notices(alice, "no held message"))
            await sentinel(alice, bob)
            assert not bob.received.ibb.get(sid), "an unanswered warned file reached its receiver"
            assert not any("too late" in b for b in bob.bodies())
            event = await gw.wait_alert(lambda e: file_outcome(e, "expired", sha(data)), since)
            assert event is not None, "no warn_expired file event"
            assert event["imguard"]["warn"]["delivered"] is False and event["event"]["type"] == ["denied"]
            assert event["imguard"]["warn"]["held_seconds"] >= WINDOW
    asyncio.run(scenario())


def test_xmpp_inbound_warned_file_is_refused(prosody, warn_file_gateway):
    """Outside sender, inside receiver: nobody on this side can answer for the sender: refused like a block (the
    receiver is told and gets none of it); an outsider's `!justify` is just a message."""
    gw = warn_file_gateway

    async def scenario():
        x = Xmpp(prosody, gw)
        since = gw.mark()
        async with x.clients(("alice", True), ("mallory", False)) as (alice, mallory):
            data, name = random_payload(9_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
            result = await mallory.ibb_send(alice.jid, data, name=name)
            assert await alice.wait_for(lambda r: notices(alice, "was blocked")), \
                [m["body"] for m in alice.received.messages]
            await sentinel(mallory, alice)
            assert not alice.received.ibb.get(result.sid), "an inbound warned file reached the inside receiver"
            mallory.send_chat(alice.jid, "!justify from outside")
            assert await alice.wait_message("!justify from outside")
            await sentinel(mallory, alice)
            assert not alice.received.ibb.get(result.sid)
            event = await gw.wait_alert(lambda e: e["event"].get("action") == WARN
                                        and e.get("file", {}).get("hash", {}).get("sha256") == sha(data), since)
            assert event is not None and event["network"]["direction"] == "inbound"
    asyncio.run(scenario())


def test_xmpp_internal_justified_file_copy_is_delivered(prosody, warn_file_gateway):
    """Both parties inside: the justified file crosses the gateway twice (the sender's connection, then the
    receiver's); the receiver's copy is delivered (warn_delivered), not refused again."""
    gw = warn_file_gateway

    async def scenario():
        x = Xmpp(prosody, gw)
        since = gw.mark()
        async with x.clients(("alice", True), ("carol", True)) as (alice, carol):
            data, name = random_payload(12_000), f"prices-{uuid.uuid4().hex[:6]}.{WARN_EXT}"
            sid = await warned_file(alice, carol, name, data)
            alice.send_chat(carol.jid, "!justify finance needs it")
            assert await carol.wait_for(lambda r: sid in r.ibb_closed and bytes(r.ibb.get(sid, b"")) == data), \
                f"the justified file did not reach the inside receiver: {len(carol.received.ibb.get(sid, b''))} bytes"
            assert await gw.wait_alert(lambda e: file_outcome(e, "justified", sha(data)), since) is not None
            assert await gw.wait_alert(lambda e: file_outcome(e, "delivered", sha(data)), since) is not None
    asyncio.run(scenario())


# --- the session as a transcript, and the tracker's table -------------------------------------------------------

def _warn_decision():
    from imguard.model import Decision, RuleMatch
    return Decision(action=WARN, matches=[RuleMatch(WARN_RULE, WARN, "medium", "enforce", title="Price list file")],
                    notice="Your file x.xlsq was held.")


def test_xmpp_session_holds_a_warned_ibb_file_and_releases_it_byte_exact():
    """The held IBB stanzas do not reach the server at the warn; the sender gets the notice with how to answer;
    `!justify` releases exactly the stanzas the client sent (once), and its event is the file's."""
    from imguard.conversation import WarnOutcome, WarnState
    from imguard.files.tracker import HoldState
    from imguard.model import FileReport
    from imguard.protocols.base import Send
    from tests.test_xmpp_session import IBB_SID, ibb_transfer, message, sent
    s, segs, _ = ibb_transfer()
    s.data_received(False, b"<presence from='bob@localhost/b'/>")
    held = b"".join(d for c, d in segs if c and (b"<data " in d or b"<close " in d))
    report = FileReport("x.xlsq", "x.xlsq", 13600, sha256="ab" * 32)
    out = s.file_verdict(f"ibb:{IBB_SID}", report, _warn_decision())
    assert sent(out, False) == b"" and b"!justify" in sent(out, True) and b"was held" in sent(out, True)
    assert s.ibb.files[f"ibb:{IBB_SID}"].transfer.state is HoldState.WARNED
    out = s.data_received(True, message("!justify audit asked", to="bob@localhost/b", mid="j1"))
    assert Send(False, held) in out and b"!justify" not in sent(out, False)
    [fact] = [c for c in out if isinstance(c, WarnOutcome)]
    assert fact.state is WarnState.JUSTIFIED and fact.report is report
    event = fact.event()
    assert event["event"]["dataset"] == "imguard.file" and event["event"]["action"] == "warn_justified"
    assert event["imguard"]["warn"]["justification"] == "audit asked"
    assert s.file_verdict(f"ibb:{IBB_SID}", report, _warn_decision()) == []      # ended once only


def test_xmpp_session_drops_a_warned_ibb_file_at_the_window():
    """Unanswered: at the next traffic after the window the receiver gets the IBB <close>, nothing of the file."""
    from imguard.conversation import ConversationSettings, WarnOutcome, WarnState
    from imguard.model import FileReport
    from tests.test_warn_continue import Clock
    from tests.test_xmpp_session import IBB_SID, ibb_transfer, sent
    clock = Clock()
    s, segs, _ = ibb_transfer()
    s.warnings.clock = clock
    s.file_verdict(f"ibb:{IBB_SID}", FileReport("x.xlsq", "x.xlsq", 13600, sha256="cd" * 32), _warn_decision())
    clock.now += ConversationSettings().warn_window_seconds
    out = s.data_received(False, b"<presence from='bob@localhost/b'/>")
    assert [c.state for c in out if isinstance(c, WarnOutcome)] == [WarnState.EXPIRED]
    to_server = sent(out, False)
    assert b"<close xmlns='http://jabber.org/protocol/ibb'" in to_server and b"<data " not in to_server


def test_tracker_warned_state_is_in_the_table():
    """WARNED holds bytes and ends only by the table's moves; an inbound file under warn gets the verdict."""
    from imguard.files.tracker import TRANSITIONS, HeldTransfer, HoldEvent, HoldState
    from imguard.model import FROM_SERVER, ChatContext
    assert {e for (st, e) in TRANSITIONS if st is HoldState.WARNED} == {
        HoldEvent.ALLOW, HoldEvent.BLOCK, HoldEvent.RECEIVER_GONE, HoldEvent.ABANDON}
    inbound = HeldTransfer("t", ChatContext(protocol="xmpp", sender="m@x", recipients=("a@y",), origin=FROM_SERVER),
                           sender_is_client=False, kind="ibb", max_bytes=100)
    inbound.append(b"data")
    inbound.inspect()
    inbound.warn_verdict(_warn_decision(), " answer")
    assert inbound.state is HoldState.DROPPED and inbound.held_bytes == 0
