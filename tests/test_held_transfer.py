"""The held-transfer tracker (imguard/files/tracker.py), driven through every order of events.

Each case plays one file through a HeldTransfer the way a mechanism's framing would (data in pieces, the
sender's and the receiver's close, the verdict early or late) and checks the invariants the gateway
promises whatever the order: no byte of a file reaches the receiver before an allow verdict; a dropped
file gives its receiver nothing; every close reaches the other side; the bytes held return to zero.
"""

from __future__ import annotations

import itertools

import pytest

from imguard.files.tracker import (TRANSITIONS, ConnectionHolds, HeldTransfer, HoldEvent, HoldLedger, HoldState,
                                   Notice, Party, Piece, settle_orphans)
from imguard.model import FROM_CLIENT, FROM_SERVER, ChatContext, Decision, RuleMatch
from imguard.protocols.base import Anomaly, Close, InspectFile, Send

FILE = b"MZ" + bytes(range(256)) * 3 + b"end"
CHUNKS = [FILE[:100], FILE[100:500], FILE[500:]]
ALLOW = Decision(action="allow")
BLOCK = Decision(action="block", matches=[RuleMatch(rule_id="malware", action="block", severity="high", mode="enforce",
                                                          title="Malware")])
CTX = ChatContext(protocol="irc", sender="alice", recipients=("bob",), transfer_mechanism="dcc")


def _events():
    """Every order of three data pieces, the two closes and the verdict (the pieces stay in their order)."""
    names = ["data", "data", "data", "sender_close", "receiver_close", "verdict"]
    return sorted(set(itertools.permutations(names)))


def _play(order, decision: Decision, size_known: bool, owns: bool, sender_is_client: bool = True):
    ledger = HoldLedger(max_bytes=0)
    holds = ConnectionHolds(ledger=ledger)
    told: list[str] = []
    t = HeldTransfer("t1", CTX, sender_is_client=sender_is_client, kind="dcc", max_bytes=1 << 20,
                     size=len(FILE) if size_known else None, name="a.exe", owns_connection=owns, holds=holds,
                     # "being scanned" is built with the InspectFile and told only if the scan is slow (gateway)
                     tell=lambda transfer, notice: (notice.outcome.value != "scanning" and told.append(notice.text))
                     or [])
    log: list = []                  # ("cmd", command) and ("verdict", decision) in order
    chunks = list(CHUNKS)
    inspected = False
    verdict_given = False

    def run(cmds):
        nonlocal inspected
        for c in cmds:
            log.append(("cmd", c))
            if isinstance(c, InspectFile):
                inspected = True
                assert c.data == FILE[:len(c.data)]
                assert c.truncated == (size_known and len(c.data) < len(FILE))   # short of what was announced

    for ev in order:
        log.append(("event", ev))
        if ev == "data":
            if t.sender_gone:       # TCP: nothing from the sender after its FIN
                continue
            run(t.append(chunks.pop(0)))
            if t.complete:
                run(t.inspect())
        elif ev == "sender_close":
            run(t.sender_closed())
        elif ev == "receiver_close":
            run(t.receiver_closed())
        elif ev == "verdict" and inspected and not verdict_given:
            verdict_given = True
            log.append(("verdict", decision))
            run(t.verdict(decision))
    if t.state is HoldState.RECEIVING:  # the sender had not closed and the size was unknown: it closes now
        run(t.sender_closed())
    if t.state is HoldState.ABANDONED and not inspected:
        return t, log, ledger, holds, told      # the sender closed before its first byte: nothing to decide
    if not verdict_given:
        verdict_given = True
        log.append(("verdict", decision))
        run(t.verdict(decision))
    return t, log, ledger, holds, told


def _receiver_sends(t, log):
    return [(i, c) for i, (kind, c) in enumerate(log) if kind == "cmd" and isinstance(c, Send)
            and c.to_client == t.receiver_is_client]


@pytest.mark.parametrize("owns", [True, False], ids=["own-connection", "multiplexed"])
@pytest.mark.parametrize("size_known", [True, False], ids=["size-announced", "size-unknown"])
@pytest.mark.parametrize("decision", [ALLOW, BLOCK], ids=["allow", "block"])
@pytest.mark.parametrize("sender_is_client", [True, False], ids=["sender-client", "sender-server"])
def test_every_order_keeps_the_invariants(owns, size_known, decision, sender_is_client):
    """Whatever the order of data, closes and verdict: bytes only after allow, none after block, every close
    passed on, memory back to zero."""
    for order in _events():
        t, log, ledger, holds, told = _play(order, decision, size_known, owns, sender_is_client)
        sends = _receiver_sends(t, log)
        if not any(kind == "verdict" for kind, _ in log):
            assert t.state is HoldState.ABANDONED and order.index("sender_close") < order.index("data")
            assert not sends and not told
            assert any(isinstance(c, Anomaly) and c.kind == "dcc_empty"
                       for _, c in log)
            assert holds.held_bytes == 0 and ledger.in_flight == 0
            assert not owns or any(isinstance(c, Close) for _, c in log)
            continue
        verdict_at = next(i for i, (kind, _) in enumerate(log) if kind == "verdict")
        assert all(i > verdict_at for i, _ in sends), order               # nothing before the verdict
        if decision.blocked:
            assert not sends, order                                         # a dropped file: no byte
            assert t.state is HoldState.DROPPED
            assert told and "blocked" in told[0] and "Malware" in told[0]   # the sender is told why
        elif t.receiver_gone and t.state is HoldState.ABANDONED:
            assert not sends and not told
            assert any(isinstance(c, Anomaly) and c.kind == "dcc_receiver_gone"
                       for _, c in log if _ == "cmd")
        else:
            assert t.state is HoldState.RELEASED, order
            delivered = b"".join(c.data for _, c in sends)
            assert FILE.startswith(delivered) and delivered, order
            if "receiver_close" not in order[:order.index("verdict")]:
                # the sender closed before the last piece when it closed early: then the file is what came
                assert delivered == FILE or "sender_close" in order
        closes = [c for kind, c in log if kind == "cmd" and isinstance(c, Close)]
        if owns and t.state is HoldState.RELEASED and (t.sender_gone or t.receiver_gone):
            # every close reaches the other side, at once: by the verdict if a side had closed before it, else
            # by the first close after it
            closed_before = any(kind == "event" and c in ("sender_close", "receiver_close")
                                for kind, c in log[:verdict_at])
            start = verdict_at if closed_before else next(
                i for i, (kind, c) in enumerate(log) if i > verdict_at and kind == "event"
                and c in ("sender_close", "receiver_close"))
            end = next((i for i, (kind, _) in enumerate(log) if i > start and kind in ("event", "verdict")),
                       len(log))
            assert any(isinstance(c, Close) for _, c in log[start:end]), order
        if owns and t.state is not HoldState.RELEASED:
            assert closes, order                                            # a stopped file ends its connection
        if not owns:
            assert not closes, order                                        # multiplexed: the framing ends it
        assert t.state not in (HoldState.RECEIVING, HoldState.INSPECTING)
        assert holds.held_bytes == 0 and ledger.held_bytes == 0, order      # memory returns to zero
        assert holds.in_flight == 0 and ledger.in_flight == 0, order


def test_released_file_passes_the_senders_later_close_on():
    """The irssi case: the file is released while the sender's connection is still open; its close later must
    close the receiver's side, or the receiver waits at 100% forever."""
    t = HeldTransfer("t", CTX, sender_is_client=False, kind="dcc", max_bytes=1 << 20, size=len(FILE),
                     owns_connection=True)
    assert t.append(FILE) == []
    assert isinstance(t.inspect()[0], InspectFile)
    out = t.verdict(ALLOW)
    assert out == [Send(to_client=True, data=FILE)]
    assert t.sender_closed() == [Close("dcc transfer done")]


def test_too_large_file_is_cut_and_nothing_is_delivered():
    told = []
    ledger = HoldLedger(max_bytes=0)
    t = HeldTransfer("t", CTX, sender_is_client=True, kind="dcc", max_bytes=600, name="big.bin",
                     owns_connection=True, holds=ConnectionHolds(ledger=ledger),
                     tell=lambda tr, notice: told.append(notice.text) or [])
    assert t.append(FILE[:500]) == []
    out = t.append(FILE[500:])
    assert t.state is HoldState.TRUNCATED
    assert [type(c) for c in out] == [Anomaly, Close]
    assert out[0].kind == "dcc_too_large"
    assert told == ["imguard: the file 'big.bin' to bob was stopped: it is larger than 600 bytes and could not be "
                    "inspected"]
    assert ledger.held_bytes == 0 and ledger.in_flight == 0
    assert t.append(b"more")[0].kind == "dcc_overrun"
    assert t.append(b"more") == []                      # recorded once


def test_connection_and_gateway_bounds():
    """The bytes of all files of a connection, and of all connections, are bounded too."""
    ledger = HoldLedger(max_bytes=1000)
    a = HeldTransfer("a", CTX, sender_is_client=True, kind="ibb", max_bytes=900, holds=ConnectionHolds(ledger=ledger))
    b = HeldTransfer("b", CTX, sender_is_client=True, kind="ibb", max_bytes=900, holds=ConnectionHolds(ledger=ledger))
    assert a.append(b"x" * 600) == []
    assert ledger.held_bytes == 600 and ledger.in_flight == 2
    out = b.append(b"y" * 600)                          # within its own bound, over the gateway's
    assert b.state is HoldState.TRUNCATED and out[0].kind == "ibb_too_large"
    assert ledger.held_bytes == 600 and ledger.in_flight == 1
    conn = ConnectionHolds(max_bytes=700, ledger=ledger)
    c = HeldTransfer("c", CTX, sender_is_client=True, kind="msrp", max_bytes=900, holds=conn)
    d = HeldTransfer("d", CTX, sender_is_client=True, kind="msrp", max_bytes=900, holds=conn)
    assert c.append(b"z" * 300) == []
    assert d.append(b"z" * 300)[0].kind == "msrp_too_large"   # 600 + 300 > 1000
    a.abandon("ibb_connection_closed", "gone")
    c.abandon("msrp_connection_closed", "gone")
    assert ledger.held_bytes == 0 and ledger.in_flight == 0


def test_pieces_out_of_order_with_wire_bytes():
    """MSRP-style: pieces placed by offset, released as their own wire bytes in order, a repeat replaces."""
    t = HeldTransfer("m", CTX, sender_is_client=True, kind="msrp", max_bytes=100, size=10)
    t.append(b"56789", wire=b"<c2>", offset=5)
    assert not t.complete and t.contiguous == 0
    t.append(b"01234", wire=b"<c1>", offset=0)
    t.append(b"01234", wire=b"<c1'>", offset=0)         # a retransmission
    assert t.complete and t.received == 10
    cmd = t.inspect()[0]
    assert cmd.data == b"0123456789" and not cmd.truncated
    assert [p.wire for p in t.ordered()] == [b"<c1'>", b"<c2>"]
    assert t.verdict(ALLOW) == [Send(to_client=False, data=b"<c1'><c2>")]


def test_a_gap_is_inspected_as_truncated():
    t = HeldTransfer("m", CTX, sender_is_client=True, kind="msrp", max_bytes=100, size=10)
    t.append(b"01", offset=0)
    t.append(b"89", offset=8)
    cmd = t.sender_closed()[0]
    assert cmd.data == b"01" and cmd.truncated


def test_state_table_has_no_exit_from_a_final_state():
    finals = {HoldState.RELEASED, HoldState.DROPPED, HoldState.TRUNCATED, HoldState.ABANDONED}
    assert not [k for k in TRANSITIONS if k[0] in finals]
    assert {v for v in TRANSITIONS.values()} | {HoldState.RECEIVING} == set(HoldState)
    assert {e for _, e in TRANSITIONS} == set(HoldEvent)


def test_piece_size_counts_wire_bytes():
    assert Piece(0, b"abc").size == 3 and Piece(0, b"abc", wire=b"<abc/>").size == 9


def test_a_transfer_dropped_without_a_final_event_gives_its_bytes_back():
    """A session thrown away with its connection (no close ever reported) must not leave its file counted."""
    import gc

    ledger = HoldLedger(max_bytes=0)
    holds = ConnectionHolds(ledger=ledger)
    t = HeldTransfer("t", CTX, sender_is_client=True, kind="dcc", max_bytes=1 << 20, holds=holds)
    t.append(FILE)
    assert ledger.held_bytes == len(FILE) and ledger.in_flight == 1
    del t
    gc.collect()
    settle_orphans()        # what the next reservation does first
    assert ledger.held_bytes == 0 and ledger.in_flight == 0


def test_announced_too_large_and_framing_truncated():
    told = []
    t = HeldTransfer("t", CTX, sender_is_client=True, kind="oft", max_bytes=100, name="big.iso",
                     owns_connection=True, tell=lambda tr, notice: told.append(notice.text) or [])
    out = t.too_large(10_000)                       # the prompt announced more than may be held
    assert t.state is HoldState.TRUNCATED and isinstance(out[-1], Close)
    assert out[0].data["bytes_seen"] == 10_000
    assert told == ["imguard: the file 'big.iso' to bob was stopped: it is larger than 100 bytes and could not be "
                    "inspected"]
    resumed = HeldTransfer("r", CTX, sender_is_client=True, kind="dcc", max_bytes=100)   # no size: only framing knows
    resumed.append(b"tail of a resumed file")
    assert resumed.sender_closed(truncated=True)[0].truncated


def test_framing_is_held_once_and_released_in_place():
    """An MSNFTP block's header goes with its bytes (held once, not a second copy of the block); framing without
    file bytes (a request head, an IBB close) keeps its place; the inspected file is the payload alone."""
    ledger = HoldLedger(max_bytes=0)
    t = HeldTransfer("f", CTX, sender_is_client=True, kind="msnftp", max_bytes=100, size=6,
                     holds=ConnectionHolds(ledger=ledger))
    t.append(b"", wire=b"PUT / HTTP/1.1\r\n\r\n")           # before any file byte
    t.append(b"abc", head=b"\x00\x03\x00")
    t.append(b"", wire=b"<between>")
    t.append(b"def", head=b"\x00\x03\x00")
    t.append(b"", wire=b"<close/>")
    assert ledger.held_bytes == 18 + 6 + 6 + 9 + 8 and t.complete
    assert t.inspect()[0].data == b"abcdef"
    out = t.verdict(ALLOW)
    assert out == [Send(False, b"PUT / HTTP/1.1\r\n\r\n\x00\x03\x00abc<between>\x00\x03\x00def<close/>")]
    assert ledger.held_bytes == 0


def test_a_long_plain_stream_is_one_buffer():
    """Many small reads: one growing buffer (not a piece per read), in order, so `complete` needs no rescan."""
    t = HeldTransfer("s", CTX, sender_is_client=True, kind="dcc", max_bytes=1 << 30, size=200_000 * 16,
                     holds=ConnectionHolds(ledger=HoldLedger(max_bytes=0)))
    for _ in range(200_000):
        t.append(b"0123456789abcdef")
        assert not t.complete or t.received == t.size
    assert len(t.pieces) == 1 and t._in_order and t.complete


def test_overlapping_pieces_are_not_a_gap_and_a_nameless_file_reads_well():
    """Chunks that overlap (an MSRP sender re-chunking) cover the file: not truncated. A file without a name is
    'a file' in its notice."""
    told = []
    t = HeldTransfer("o", CTX, sender_is_client=True, kind="msrp", max_bytes=100, size=10,
                     tell=lambda tr, notice: told.append(notice.text) or [])
    t.append(b"012345", offset=0, head=b"<h1>", after=b"<end1>")
    t.append(b"456789", offset=4, head=b"<h2>", after=b"<end2>")
    cmd = t.inspect()[0]
    assert cmd.data == b"0123456789" and not cmd.truncated
    t.verdict(BLOCK)
    assert told == ["imguard: a file from alice to bob was blocked (Malware)"]


# --- the tell rule: who is told, over (origin x verdict x mechanism) ---------------------------------------------
#
# Each mechanism's real session holds a small file from its own framing, outbound (our user sends: origin client)
# or inbound (an outside party sends to our user: origin server), and it ends blocked (a rule with a notice written
# for a sender), allowed with a notice, or cut by the gateway's hold bound. The tracker's rule says who is told;
# the mechanism's `tell` hook delivers it or, where its protocol cannot reach that party, returns nothing.

_I, _R, _O = Party.INSIDE_SENDER, Party.INSIDE_RECEIVER, Party.OUTSIDE_SENDER
RULE_BLOCK = Decision(action="block", matches=BLOCK.matches, notice="Your file was blocked.")
RULE_NOTICE = Decision(action="allow", notice="Your file was scanned.")

# The spec, written out (not read from TELL_RULE): (origin, outcome) -> the parties told, in order.
EXPECTED_TOLD = {
    (FROM_CLIENT, "block"): [_I], (FROM_CLIENT, "cut"): [_I], (FROM_CLIENT, "notice"): [_I],
    (FROM_SERVER, "block"): [_O, _R], (FROM_SERVER, "cut"): [_O, _R], (FROM_SERVER, "notice"): [],
}
# What each mechanism's protocol cannot deliver: (party, outcome) pairs told by the rule that reach nobody.
_ALL = ("block", "cut", "notice")
UNREACHABLE = {
    "dcc": {(_O, o) for o in _ALL},         # a DCC SEND carries only ACKs back; the sender's IRC is outside
    "oft": {(_O, o) for o in _ALL},         # OFT headers have no cancel; the done header went before the verdict
    "socks5": {(_O, o) for o in _ALL},      # a bytestream carries no text; the sender's XMPP is outside
    "msnslp": {(_O, o) for o in _ALL},      # not injected towards the switchboard (docs/architecture.md)
    "msnftp": {(_O, "block")},              # cut: CCL; blocked: the sender had our BYE with its last byte
    "ibb": {(_I, "cut"), (_O, "cut")},      # a sender's cut is answered by the refused stanza, not the tell
    "msrp": set(),
    "sip": set(),
}


def _dcc(origin):
    from imguard.files.expected import ExpectedTransfers
    from imguard.protocols.irc.dcc import DccOffer, DccSendSession
    inbound = origin == FROM_SERVER
    sender, receiver = ("mallory!m@h", "alice") if inbound else ("alice", "bob")
    offer = DccOffer(offer_id="c1-1", kind="send", name="a.exe", size=len(FILE), sender=sender, receiver=receiver,
                     host="10.0.0.7", port=5000, listener_is_sender=True, outbound=not inbound,
                     context=ChatContext(protocol="irc", sender=sender, recipients=(receiver,), connection_id="c1",
                                         transfer_mechanism="dcc", origin=origin))
    s = DccSendSession(None, ExpectedTransfers(), ChatContext(connection_id="d1"), offer)
    return s, [(False, FILE)], "a.exe", "mallory"


def _msnftp(origin):
    from imguard.files.expected import ExpectedTransfers
    from imguard.protocols.msnp import DirectMsnftpSession
    from imguard.protocols.msnp.msnftp import find_msnftp_offer
    from tests import test_msnp as m
    transfers = ExpectedTransfers()
    if origin == FROM_SERVER:
        m.run(m.switchboard(None, transfers), m.msnftp_inbound_invitation("setup.exe", len(m.FILE), "10.1.2.3", 6892))
        offer, items, name = find_msnftp_offer(transfers, "10.1.2.3", 6892), m.inbound_msnftp_items(), "setup.exe"
    else:
        m.msnftp_setup(transfers)
        offer, items, name = find_msnftp_offer(transfers, "192.168.1.14", 6891), m.MSNFTP_ITEMS[:-1], "report.exe"
    return DirectMsnftpSession(None, transfers, ChatContext(connection_id="d1"), offer), items, name, m.PEER


def _msnslp(origin):
    from tests import test_msnp as m
    if origin == FROM_SERVER:
        s, _ = m.inbound_slp_session()
        items = [(False, m.p2p_msg(0, h, c, 2, m.ME, inbound=True)) for h, c in m.data_chunks(m.FILE)]
        return s, items, "pic.exe", m.PEER
    s, _, _ = m.outbound_slp_session()
    return s, [(True, m.p2p_msg(300 + i, h, c, 2)) for i, (h, c) in enumerate(m.data_chunks(m.FILE))], \
        "report.exe", m.PEER


def _oft(origin):
    from imguard.files.expected import ExpectedTransfers
    from imguard.protocols.oscar import OftSession, find_oft_offer
    from tests import test_oscar as o
    transfers = ExpectedTransfers()
    if origin == FROM_SERVER:
        s = o.inbound_oft(transfers)[3]
    else:
        o.offer_file(transfers)
        s = OftSession(None, transfers, ChatContext(connection_id="oft1"),
                       find_oft_offer(transfers, host="192.168.1.20", port=5190))
    return s, o.oft_dialogue(sender_is_client=False)[2], "setup.exe", o.PEER


def _socks5(origin):
    from imguard.files.expected import ExpectedBytestream, ExpectedTransfers, StreamHost
    from tests.test_socks5_bytestream import HASH, carrier_mode_target_leg
    sender = "carol@example.org" if origin == FROM_SERVER else "alice@localhost"
    ctx = ChatContext(protocol="xmpp", sender=sender, recipients=("bob@localhost",), transfer_mechanism="socks5",
                      connection_id="xmpp-1", origin=origin)
    transfers = ExpectedTransfers()
    transfers.expect_bytestream(HASH, ExpectedBytestream(
        dst_hash=HASH, sid="s1", initiator=sender + "/o", target="bob@localhost/b",
        streamhosts=(StreamHost("proxy.localhost", "127.0.0.1", 15000),), context=ctx, name="a.exe", size=len(FILE)))
    return carrier_mode_target_leg(transfers), [(False, FILE)], "a.exe", "carol@example.org"


def _ibb(origin):
    from tests import test_xmpp_session as x
    s = x.logged_in()
    if origin == FROM_SERVER:
        op, close = x.incoming_ibb()
        return s, [(False, op), (False, x.incoming_block(0, "QUJDREVG")), (False, close)], "", "carol@example.org"
    return s, [(True, x.IBB_OPEN), (True, x.ibb_data(0, "QUJDREVG")), (True, x.IBB_CLOSE)], "", ""


def _msrp(origin):
    from tests import test_msrp_session as r
    from tests.test_sip_support import file_chunks
    s, _ = r.make()
    if origin == FROM_SERVER:
        return s, [(False, c) for c in r.inbound_file_chunks(r.FILE, "in1")], "My cool picture.jpg", \
            "sip:bob@example.com"
    return s, [(True, raw) for _, raw in file_chunks(r.FILE, 4000, message_id="out1")], "My cool picture.jpg", ""


def _sip(origin):
    from tests import test_sip_session as p
    from tests.test_sip_support import message
    s, _ = p.make()
    s.data_received(True, p.REGISTER)
    body = b"MZ" + bytes(100)
    if origin == FROM_SERVER:
        raw = message(body, content_type="application/octet-stream", frm="<sip:bob@b.example>",
                      to="<sip:alice@b.example>", ruri="sip:alice@b.example")
        return s, [(False, raw)], "", "sip:bob@b.example"
    return s, [(True, message(body, content_type="application/octet-stream"))], "", ""


MECHANISMS = {"dcc": _dcc, "msnftp": _msnftp, "msnslp": _msnslp, "oft": _oft, "socks5": _socks5, "ibb": _ibb,
              "msrp": _msrp, "sip": _sip}


@pytest.fixture
def tells(monkeypatch):
    """Every notice the tracker hands a mechanism's `tell` hook, with what the hook made of it."""
    log: list[tuple[HeldTransfer, Notice, list]] = []
    init = HeldTransfer.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        hook = self._tell

        def recorded(transfer, notice):
            cmds = hook(transfer, notice)
            if notice.outcome.value != "scanning":      # built with the InspectFile: tests/test_scan_notices.py
                log.append((transfer, notice, list(cmds)))
            return cmds
        self._tell = recorded
    monkeypatch.setattr(HeldTransfer, "__init__", spy)
    return log


@pytest.mark.parametrize("outcome", ["block", "notice", "cut"])
@pytest.mark.parametrize("origin", [FROM_CLIENT, FROM_SERVER], ids=["outbound", "inbound"])
@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_tell_rule_over_origin_verdict_and_mechanism(mechanism, origin, outcome, tells, monkeypatch):
    """Who is told about a held file is the tracker's one rule: the inside party always (the sender outbound, the
    receiver inbound, each in their own words), the outside sender of an inbound file where its protocol reaches
    it, nobody about an allowed inbound file. Each mechanism delivers in its own terms: a Notify for its chat
    connection or a Send on the leg of the party told, never a notice to the wrong leg."""
    from imguard.files import tracker
    from imguard.model import FileReport
    from imguard.protocols.base import Notify, ProtocolEvent
    session, items, name, inbound_sender = MECHANISMS[mechanism](origin)
    if outcome == "cut":
        monkeypatch.setattr(tracker.LEDGER, "max_bytes", 1)       # the gateway's hold bound: the first byte cuts
    out: list = []
    for from_client, data in items:
        out += session.data_received(from_client, data)
    if outcome != "cut":
        [job] = [c for c in out if isinstance(c, InspectFile)]
        assert job.context.origin == origin
        session.file_verdict(job.transfer_id, FileReport(job.name, job.name, len(job.data)),
                             RULE_BLOCK if outcome == "block" else RULE_NOTICE)
    assert [n.party for _, n, _ in tells] == EXPECTED_TOLD[(origin, outcome)]
    for transfer, notice, cmds in tells:
        delivered = [c for c in cmds if not isinstance(c, ProtocolEvent)]     # a record of the notice is no delivery
        assert bool(delivered) == ((notice.party, outcome) not in UNREACHABLE[mechanism]), (notice, cmds)
        for c in delivered:
            if isinstance(c, Notify):
                assert notice.party.inside and c.text == notice.text
            else:
                assert isinstance(c, Send), c
                to_sender = notice.party is not Party.INSIDE_RECEIVER
                assert c.to_client == (transfer.sender_is_client if to_sender else transfer.receiver_is_client)
        if notice.party is Party.INSIDE_RECEIVER and outcome == "block":
            the_file = f"the file {name!r}" if name else "a file"
            assert notice.text == f"imguard: {the_file} from {inbound_sender} was blocked (Malware)"
        elif outcome == "block":
            assert notice.text == "Your file was blocked."     # the rule's notice is for a sender
        elif outcome == "notice":
            assert notice.text == "Your file was scanned."
        else:           # too large for the hold: the receiver hears whom it was from, a sender whom it was for
            assert "could not be inspected" in notice.text
            if notice.party is Party.INSIDE_RECEIVER:
                assert f"from {inbound_sender} was stopped" in notice.text


def test_overlapping_pieces_with_different_bytes_are_cut_and_equal_ones_kept():
    """The bytes inspected must be the bytes released: a piece overlapping a held one with other content cuts the
    file (<kind>_overlap, nothing to the receiver, the holds given back); the same bytes over an overlap do not."""
    holds = ConnectionHolds()
    t = HeldTransfer("t1", CTX, sender_is_client=True, kind="msrp", max_bytes=1 << 20, size=12, holds=holds)
    assert t.append(b"abcdefgh", offset=0) == []
    assert t.append(b"efgh", offset=4) == []                # the same bytes again
    out = t.append(b"XYZW", offset=6)                       # 6-7 differ from "gh"
    assert [c.kind for c in out if isinstance(c, Anomaly)] == ["msrp_overlap"]
    assert not [c for c in out if isinstance(c, (Send, InspectFile))]
    assert t.state is HoldState.TRUNCATED and holds.held_bytes == 0


def test_a_piece_held_as_its_wire_alone_is_decoded_again_for_inspection():
    """With `payload_of`, a piece appended with rederive=True keeps only its wire (an IBB stanza), counted with
    PIECE_OVERHEAD: one copy of the file, not two; inspection gets the decoded bytes, the receiver the wire."""
    import base64 as b64
    from imguard.files.tracker import PIECE_OVERHEAD

    def stanza(data: bytes) -> bytes:
        return b"<d>" + b64.b64encode(data) + b"</d>"

    ledger = HoldLedger(max_bytes=0)
    t = HeldTransfer("w", CTX, sender_is_client=True, kind="ibb", max_bytes=100, holds=ConnectionHolds(ledger=ledger),
                     payload_of=lambda wire: b64.b64decode(wire[3:-4]))
    t.append(b"hello ", stanza(b"hello "), rederive=True)
    t.append(b"world", stanza(b"world"), rederive=False)        # not checked by its mechanism: both kept
    t.append(b"", b"<close/>")
    assert [p.payload for p in t.ordered()] == [b"", b"world"]
    assert ledger.held_bytes == (len(stanza(b"hello ")) + PIECE_OVERHEAD) + (len(stanza(b"world")) + 5) + 8
    assert t.received == 11 and t.contiguous == 11
    assert t.inspect()[0].data == b"hello world"
    assert t.verdict(ALLOW) == [Send(False, stanza(b"hello ") + stanza(b"world") + b"<close/>")]
    assert ledger.held_bytes == 0
