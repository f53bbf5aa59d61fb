"""Socks5BytestreamSession transcripts: the relay holds an XEP-0065 bytestream until its verdict.

Bytes are the two proxy65 legs of xmpp_plain_ibb_socks5.pcap (tests/data/xmpp/s5b_*.json): bob (target)
and alice (initiator) each connect to Prosody's proxy65 with CONNECT <hash>, then alice's file flows.
"""

import json
from pathlib import Path

from imguard.files.expected import ExpectedBytestream, ExpectedTransfers, StreamHost
from imguard.model import BLOCK, FROM_SERVER, ChatContext, Decision, FileReport
from imguard.files.tracker import HoldState
from imguard.model import RuleMatch
from imguard.protocols.base import Anomaly, Close, ConnectUpstream, InspectFile, Notify, Record, Send
from imguard.protocols.socks5_bytestream import RelayState, Socks5BytestreamSession, Socks5Limits

DATA = Path(__file__).parent / "data" / "xmpp"
HASH = "e34ba3fd2764dd641680a28ecf2e67479ba888fc"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ALICE = ChatContext(protocol="xmpp", sender="alice@localhost", recipients=("bob@localhost/b",),
                    transfer_mechanism="socks5", connection_id="xmpp-1")
RELAY = ChatContext(protocol="socks5", client_address="127.0.0.1:44142", connection_id="relay-1")
GREETING = b"\x05\x01\x00"
CONNECT = b"\x05\x01\x00\x03(" + HASH.encode() + b"\x00\x00"
REPLY = b"\x05\x00\x00\x03(" + HASH.encode() + b"\x00\x00"


def segments(name):
    t = json.loads((DATA / name).read_text())
    return [(d == "c", seg.encode("latin-1")) for d, seg in t["segments"]]


def table(size=None, hosts=(StreamHost("proxy.localhost", "127.0.0.1", 15000),)):
    transfers = ExpectedTransfers()
    transfers.expect_bytestream(HASH, ExpectedBytestream(
        dst_hash=HASH, sid="60ff2b68ec7c487ab803ccfbd16335d0", initiator="alice@localhost/a",
        target="bob@localhost/b", streamhosts=hosts, context=ALICE, name="eicar.txt", size=size))
    return transfers


def kinds(cmds):
    """The kinds of the anomaly events among the commands (a Record here must be one too)."""
    return [(c.event if isinstance(c, Record) else c.event())["imguard"]["anomaly"]["kind"] for c in cmds
            if isinstance(c, (Record, Anomaly))]


def test_capture_legs_speak_the_expected_handshake():
    """The captured legs start with the greeting and the CONNECT this module expects (data sanity)."""
    for name in ("s5b_target_leg.json", "s5b_initiator_leg.json"):
        segs = segments(name)
        assert segs[:4] == [(True, GREETING), (False, b"\x05\x00"), (True, CONNECT), (False, REPLY)]


def carrier_mode_target_leg(transfers, **kw):
    """bob's leg through a carrier that did bob's SOCKS5 handshake (mitmproxy socks5 mode): the session
    replays greeting + CONNECT to proxy65 and consumes its replies."""
    s = Socks5BytestreamSession(transfers, RELAY, stream_hash=HASH, streamhost=("127.0.0.1", 15000), **kw)
    assert s.start() == [Send(False, GREETING)]
    assert s.data_received(False, b"\x05\x00") == [Send(False, CONNECT)]
    assert s.data_received(False, REPLY) == []                 # bob already had his reply from the carrier
    return s


def test_target_leg_is_held_until_proxy_closes_then_released():
    """The file flows proxy -> bob: held, inspected when the proxy closes, released on allow, then Close."""
    s = carrier_mode_target_leg(table())
    data = [d for c, d in segments("s5b_target_leg.json")[4:] if not c]
    for d in data:
        assert s.data_received(False, d) == []                 # nothing reaches bob yet
    (inspect,) = s.connection_closed(from_client=False)
    assert isinstance(inspect, InspectFile) and inspect.data == EICAR * 200
    assert (inspect.name, inspect.context.sender, inspect.context.transfer_mechanism) == \
        ("eicar.txt", "alice@localhost", "socks5")
    assert inspect.context.connection_id == "xmpp-1"          # the XMPP connection that announced it
    assert s.file_verdict(inspect.transfer_id, FileReport("", "", 0), Decision()) == \
        [Send(True, EICAR * 200), Close("socks5 transfer done")]


def test_blocked_bytestream_is_closed_without_a_byte_and_the_sender_is_told():
    """Blocked: Close, bob never got any of the file, and the XMPP connection that offered it is asked
    to tell alice (a Notify: the carrier delivers it with XmppSession.notice)."""
    transfers = table()
    s = carrier_mode_target_leg(transfers)
    s.data_received(False, EICAR)
    (inspect,) = s.connection_closed(from_client=False)
    notify, close = s.file_verdict(inspect.transfer_id, FileReport("", "", 0),
                                   Decision(action=BLOCK, notice="Your file eicar.com was blocked."))
    assert close == Close("socks5 file block")
    assert isinstance(notify, Notify) and not any(isinstance(c, Send) for c in (notify, close))
    offer = transfers.lookup_bytestream(s.dst_hash)
    assert (notify.connection_id, notify.protocol, notify.text) == \
        (offer.context.connection_id, "xmpp", "Your file eicar.com was blocked.")
    assert notify.event()["imguard"]["notify"] == {"connection_id": "xmpp-1", "protocol": "xmpp",
                                                   "text": "Your file eicar.com was blocked."}
    assert notify.event()["imguard"]["file"] == {"name": "eicar.txt"}
    assert notify.context.transfer_mechanism == "socks5" and notify.context.sender == "alice@localhost"
    assert s.transfer.state is HoldState.DROPPED and s.state is RelayState.DONE
    assert s.connection_closed(from_client=True) == []        # closed already


def test_blocked_without_a_notice_tells_the_sender_the_name_and_the_rule():
    """A decision without a notice of its own: the tracker's one text, naming the file, the people and the rule."""
    s = carrier_mode_target_leg(table())
    s.data_received(False, EICAR)
    (inspect,) = s.connection_closed(from_client=False)
    decision = Decision(action=BLOCK, matches=[RuleMatch(rule_id="malware", action=BLOCK, severity="high",
                                                         mode="enforce", title="Malware")])
    notify, close = s.file_verdict(inspect.transfer_id, FileReport("", "", 0), decision)
    assert notify.text == ("imguard: the file 'eicar.txt' from alice@localhost to bob@localhost/b was blocked "
                           "(Malware)")
    assert notify.decision is decision and isinstance(close, Close)


def test_inbound_file_is_held_and_the_inside_receiver_is_told():
    """An outside sender's offer, registered by the inside receiver's XMPP connection (origin FROM_SERVER): bob
    connects to the relay, the file comes from the streamhost (the upstream side is the sender), bob gets none of
    it when it is blocked, and his own connection is told, naming both parties."""
    inbound = ChatContext(protocol="xmpp", sender="carol@example.org", recipients=("bob@localhost",),
                          transfer_mechanism="socks5", connection_id="xmpp-bob", origin=FROM_SERVER)
    transfers = ExpectedTransfers()
    transfers.expect_bytestream(HASH, ExpectedBytestream(
        dst_hash=HASH, sid="in1", initiator="carol@example.org/o", target="bob@localhost/b",
        streamhosts=(StreamHost("proxy.example.org", "203.0.113.7", 7777),), context=inbound, name="eicar.com"))
    s = carrier_mode_target_leg(transfers)
    assert s.data_received(False, EICAR) == [] and s.data_received(True, b"noise") == []
    assert s.transfer.sender_is_client is False
    (inspect,) = s.connection_closed(from_client=False)
    assert (inspect.context.sender, inspect.context.origin) == ("carol@example.org", FROM_SERVER)
    decision = Decision(action=BLOCK, notice="Your file eicar.com was blocked.", matches=[RuleMatch(
        rule_id="malware", action=BLOCK, severity="high", mode="enforce", title="Malware")])
    notify, close = s.file_verdict(inspect.transfer_id, FileReport("", "", 0), decision)
    assert isinstance(close, Close) and notify.connection_id == "xmpp-bob"
    # the policy's notice is for a sender; the receiver is told who sent what
    assert notify.text == "imguard: the file 'eicar.com' from carol@example.org was blocked (Malware)"


def test_session_speaks_socks5_to_the_client_itself():
    """Plain TCP carrier: the session answers the greeting, finds the hash, asks for the upstream, replays the
    handshake and hands the streamhost's CONNECT reply to the client."""
    s = Socks5BytestreamSession(table(), RELAY)
    segs = segments("s5b_initiator_leg.json")
    assert s.data_received(True, GREETING) == [Send(True, b"\x05\x00")]
    assert s.data_received(True, CONNECT) == [ConnectUpstream("127.0.0.1", 15000, "proxy.localhost")]
    assert s.upstream_connected() == [Send(False, GREETING)]
    assert s.data_received(False, b"\x05\x00") == [Send(False, CONNECT)]
    assert s.data_received(False, REPLY) == [Send(True, REPLY)]
    # alice (initiator) sends the file: held until she closes
    sent = b"".join(d for c, d in segs[4:] if c)
    assert s.data_received(True, sent) == []
    (inspect,) = s.connection_closed(from_client=True)
    assert inspect.data == EICAR * 200
    assert s.file_verdict(inspect.transfer_id, FileReport("", "", 0), Decision()) == \
        [Send(False, EICAR * 200), Close("socks5 transfer done")]


def test_handshake_split_at_every_byte():
    """Greeting and CONNECT fed one byte at a time give the same commands."""
    s = Socks5BytestreamSession(table(), RELAY)
    out = []
    for b in GREETING + CONNECT:
        out += s.data_received(True, bytes([b]))
    assert out == [Send(True, b"\x05\x00"), ConnectUpstream("127.0.0.1", 15000, "proxy.localhost")]


def test_unexpected_bytestream_is_refused():
    """A CONNECT whose hash no XMPP offer announced: unexpected_bytestream, a SOCKS5 refusal, Close."""
    s = Socks5BytestreamSession(ExpectedTransfers(), RELAY)
    s.data_received(True, GREETING)
    cmds = s.data_received(True, CONNECT)
    assert kinds(cmds) == ["unexpected_bytestream"]
    assert cmds[1] == Send(True, b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00") and isinstance(cmds[2], Close)


def test_unexpected_bytestream_in_carrier_mode():
    """Carrier mode with an unknown hash: anomaly and Close at start."""
    s = Socks5BytestreamSession(ExpectedTransfers(), RELAY, stream_hash=HASH)
    cmds = s.start()
    assert kinds(cmds) == ["unexpected_bytestream"] and isinstance(cmds[-1], Close)


def test_no_auth_method_is_required():
    """A client that offers only username/password: 05 FF and Close."""
    s = Socks5BytestreamSession(table(), RELAY)
    cmds = s.data_received(True, b"\x05\x01\x02")
    assert kinds(cmds) == ["socks5_bad_handshake"] and cmds[1] == Send(True, b"\x05\xff")


def test_next_streamhost_when_the_first_is_unreachable():
    """upstream_failed tries the next offered streamhost, then gives up."""
    s = Socks5BytestreamSession(table(hosts=(StreamHost("a@x/r", "192.168.1.5", 8010),
                                             StreamHost("proxy.localhost", "127.0.0.1", 15000))), RELAY)
    s.data_received(True, GREETING)
    assert s.data_received(True, CONNECT) == [ConnectUpstream("192.168.1.5", 8010, "a@x/r")]
    assert s.upstream_failed() == [ConnectUpstream("127.0.0.1", 15000, "proxy.localhost")]
    cmds = s.upstream_failed()
    assert kinds(cmds) == ["bytestream_upstream_failed"] and isinstance(cmds[-1], Close)


def test_announced_size_triggers_inspection_before_close():
    """With the size from the offer, inspection starts when that many bytes arrived; more bytes are refused."""
    s = carrier_mode_target_leg(table(size=len(EICAR) * 2))
    assert s.data_received(False, EICAR) == []
    (inspect,) = s.data_received(False, EICAR)
    assert inspect.data == EICAR * 2 and not inspect.truncated
    assert s.file_verdict(inspect.transfer_id, FileReport("", "", 0), Decision()) == [Send(True, EICAR * 2)]
    cmds = s.data_received(False, b"extra")
    assert kinds(cmds) == ["socks5_more_than_announced"] and isinstance(cmds[-1], Close)


def test_short_transfer_is_marked_truncated():
    """The sender closed before the announced size: InspectFile says truncated."""
    s = carrier_mode_target_leg(table(size=1000))
    s.data_received(False, EICAR)
    (inspect,) = s.connection_closed(from_client=False)
    assert inspect.truncated


def test_held_size_limit_edge():
    """max_held_bytes are held; one more byte closes the stream (fail closed)."""
    s = carrier_mode_target_leg(table(), limits=Socks5Limits(max_held_bytes=len(EICAR)))
    assert s.data_received(False, EICAR) == []
    cmds = s.data_received(False, b"!")
    assert kinds(cmds) == ["socks5_too_large"] and isinstance(cmds[-1], Close)
    assert not any(isinstance(c, Send) for c in cmds)          # nothing of the file reaches bob
    [notify] = [c for c in cmds if isinstance(c, Notify)]      # alice is told why, in her chat
    assert notify.connection_id == "xmpp-1" and "eicar.txt" in notify.text and "larger than" in notify.text
    assert s.data_received(False, b"more") == [] and s.connection_closed(from_client=False) == []


def test_receiver_closing_early_closes():
    """bob leaves before any data: Close, nothing to inspect."""
    s = carrier_mode_target_leg(table())
    assert s.connection_closed(from_client=True) == [Close("peer closed")]


def test_more_than_announced_while_inspecting_ends_the_file():
    """Bytes from the sender while the complete file is out for inspection: closed, and the verdict that comes
    later releases nothing."""
    s = carrier_mode_target_leg(table(size=len(EICAR)))
    (inspect,) = s.data_received(False, EICAR)
    cmds = s.data_received(False, b"extra")
    assert kinds(cmds) == ["socks5_more_than_announced"] and isinstance(cmds[-1], Close)
    assert s.transfer.state is HoldState.ABANDONED
    assert s.file_verdict(inspect.transfer_id, FileReport("", "", 0), Decision()) == []


def test_receiver_bytes_are_dropped_and_never_become_the_file():
    """The first side to send is the sender; the receiver's bytes in the data phase are not relayed."""
    s = carrier_mode_target_leg(table(size=len(EICAR)))
    assert s.data_received(False, EICAR[:10]) == []
    assert s.data_received(True, b"noise") == []
    (inspect,) = s.data_received(False, EICAR[10:])
    assert inspect.data == EICAR and not s.transfer.sender_is_client


def test_receiver_leaving_before_the_verdict_gets_nothing():
    """bob leaves mid-file: the file is still inspected when alice's side ends; allowed, nothing is sent to the
    closed side, an anomaly says why, and the connection is closed."""
    s = carrier_mode_target_leg(table())
    s.data_received(False, EICAR)
    assert s.connection_closed(from_client=True) == []
    (inspect,) = s.connection_closed(from_client=False)
    cmds = s.file_verdict(inspect.transfer_id, FileReport("", "", 0), Decision())
    assert kinds(cmds) == ["socks5_receiver_gone"] and isinstance(cmds[-1], Close)
    assert not any(isinstance(c, Send) for c in cmds)


def test_a_close_after_the_release_is_passed_on():
    """Released while both sides are open: the next close from either side closes the connection."""
    for closing_side in (True, False):
        s = carrier_mode_target_leg(table(size=len(EICAR)))
        (inspect,) = s.data_received(False, EICAR)
        assert s.file_verdict(inspect.transfer_id, FileReport("", "", 0), Decision()) == [Send(True, EICAR)]
        [close] = s.connection_closed(from_client=closing_side)
        assert isinstance(close, Close) and s.state is RelayState.DONE


def test_data_that_follows_the_handshake_in_one_read_is_held():
    """The streamhost's CONNECT reply and the first file bytes in one segment: the bytes are the file's."""
    s = Socks5BytestreamSession(table(size=len(EICAR)), RELAY, stream_hash=HASH)
    s.start()
    s.data_received(False, b"\x05\x00")
    (inspect,) = s.data_received(False, REPLY + EICAR)
    assert inspect.data == EICAR
