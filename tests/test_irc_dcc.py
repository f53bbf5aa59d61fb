"""DccSendSession: the DCC SEND data connection held until the verdict, as transcripts and from real captures."""

from __future__ import annotations

import hashlib
import struct

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.model import ALLOW, BLOCK, FROM_CLIENT, FROM_SERVER, INBOUND, ChatContext, Decision, FileReport, RuleMatch
from imguard.files.tracker import HoldState
from imguard.protocols.base import Close, InspectFile, Send
from imguard.protocols.irc.dcc import DccOffer, DccSendSession, dcc_session, find_offer
from imguard.protocols.irc.decoder import IrcLimits
from imguard.policy.zones import classify_direction
from imguard.protocols.irc.session import IrcSession
from tests.test_irc_support import Checker, anomalies, capture, notifies, sends, tcp_payload, transcript

SSH_TRACE_SHA256 = "566c4819a8130d65d29076930bd46dde5c2595a4a8be4a380857feb5b430ec6e"   # see tests/data/irc/README.md
SSH_TRACE_SIZE = 1320211
DATA_CTX = ChatContext(client_address="10.0.0.22:43614", server_address="10.0.0.7:59130", connection_id="d1")

ALLOWED = Decision(action=ALLOW)
BLOCKED = Decision(action=BLOCK, matches=[RuleMatch("no-pcap", BLOCK, "high", "enforce", title="no captures")])


def report(data: bytes = b"") -> FileReport:
    return FileReport(name="f", path="f", size=len(data))


def offer(size=100, position=0, passive=False, name="f.bin") -> DccOffer:
    return DccOffer(offer_id="c1-1", kind="send", name=name, size=size, sender="alice", receiver="bob",
                    host="10.0.0.7", port=5000, listener_is_sender=not passive, position=position,
                    context=ChatContext(protocol="irc", sender="alice", recipients=("bob",), connection_id="c1",
                                        transfer_mechanism="dcc"))


def session(o=None, limits=IrcLimits()):
    return DccSendSession(Checker(), ExpectedTransfers(), DATA_CTX, o if o is not None else offer(), limits)


def inspects(cmds) -> list[InspectFile]:
    return [c for c in cmds if isinstance(c, InspectFile)]


def acks(data: bytes) -> list[int]:
    return [struct.unpack(">I", data[i:i + 4])[0] for i in range(0, len(data), 4)]


def feed_sender(s, data: bytes, chunk: int, from_client=False) -> list:
    out = []
    for i in range(0, len(data), chunk):
        out += s.data_received(from_client, data[i:i + chunk])
    return out


# --- the Zeek capture: 1,320,211 bytes --------------------------------------------------------------

@pytest.fixture(scope="module")
def ssh_trace():
    path = capture("zeek/irc-dcc-send.pcapng")
    data = tcp_payload(path, ("10.0.0.7", 59130), ("10.0.0.22", 43614))
    receiver_acks = tcp_payload(path, ("10.0.0.22", 43614), ("10.0.0.7", 59130))
    return data, receiver_acks


def test_zeek_capture_end_to_end(ssh_trace):
    """The IRC session registers the capture's offer; the carrier finds it by (10.0.0.7, 59130); the DCC session
    holds all 1,320,211 bytes (SHA-256 as in the capture) while ACKing the sender itself; the receiver gets nothing
    until the verdict, then exactly the file; its own ACKs are swallowed."""
    data, receiver_acks = ssh_trace
    assert len(data) == SSH_TRACE_SIZE and hashlib.sha256(data).hexdigest() == SSH_TRACE_SHA256
    transfers = ExpectedTransfers()
    irc = IrcSession(Checker(), transfers, ChatContext(connection_id="c1"))
    for from_client, chunk in transcript("zeek_irc_dcc_send_control.json"):
        irc.data_received(from_client, chunk)
    o = find_offer(transfers, "10.0.0.7", 59130)
    s = DccSendSession(Checker(), transfers, DATA_CTX, o)
    out = feed_sender(s, data, 1448)
    assert sends(out, to_client=True) == b""                    # the receiver: nothing yet
    sent_acks = acks(sends(out, to_client=False))
    assert sent_acks[-1] == SSH_TRACE_SIZE and sent_acks == sorted(sent_acks)
    [job] = inspects(out)
    assert hashlib.sha256(job.data).hexdigest() == SSH_TRACE_SHA256
    assert (job.name, job.truncated, job.context.transfer_mechanism) == ("ssh.trace", False, "dcc")
    assert (job.context.sender, job.context.recipients) == ("tim2", ("tim1",))
    assert job.context.client_address == DATA_CTX.client_address
    out = s.file_verdict(job.transfer_id, report(job.data), ALLOWED)
    assert hashlib.sha256(sends(out, to_client=True)).hexdigest() == SSH_TRACE_SHA256
    assert s.data_received(True, receiver_acks) == []          # the receiver's ACKs stop here


def test_zeek_capture_blocked(ssh_trace):
    """Blocked: the receiver gets none of the bytes, the connection closes, and a Notify carries the notice for the
    sender's IRC connection (c1), which the carrier delivers with IrcSession.notice()."""
    data, _ = ssh_trace
    s = session(offer(size=len(data), name="ssh.trace"))
    out = feed_sender(s, data, 65536)
    [job] = inspects(out)
    out = s.file_verdict(job.transfer_id, report(), BLOCKED)
    assert sends(out, to_client=True) == b"" and isinstance(out[-1], Close)
    [notice] = notifies(out)
    assert (notice.connection_id, notice.protocol) == ("c1", "irc")
    assert "ssh.trace" in notice.text and "no captures" in notice.text
    ev = notice.event()
    assert ev["imguard"]["notify"]["text"] == notice.text and ev["imguard"]["decision"]["action"] == BLOCK
    assert ev["imguard"]["dcc"]["id"] == "c1-1" and ev["imguard"]["dcc"]["bytes_held"] == len(data)
    irc = IrcSession(Checker(), ExpectedTransfers(), ChatContext(connection_id="c1"))
    irc.data_received(False, b":srv 001 alice :Welcome\r\n")
    line = sends(irc.notice(notice.text), True)
    assert line.startswith(b":imguard NOTICE alice :imguard: the file 'ssh.trace'")
    assert s.data_received(False, b"more") == []


def test_ngircd_eicar_capture():
    """The loopback capture: 6,800 bytes of EICAR offered by alice; held whole, then released."""
    path = capture("generated/irc_dcc_send.pcap")
    data = tcp_payload(path, ("127.0.0.1", 16800), ("127.0.0.1", 58490))
    transfers = ExpectedTransfers()
    irc = IrcSession(Checker(), transfers, ChatContext(connection_id="c2"))
    for from_client, chunk in transcript("ngircd_dcc_alice.json"):
        irc.data_received(from_client, chunk)
    o = find_offer(transfers, "127.0.0.1", 16800)
    assert (o.name, o.size) == ("eicar.com", 6800) and len(data) == 6800
    s = DccSendSession(Checker(), transfers, DATA_CTX, o)
    [job] = inspects(feed_sender(s, data, 1000))
    assert job.data == data and job.data.startswith(b"X5O!P%@AP")


def test_zeek_first_command_capture():
    """irc-dcc-first-command: a DCC SEND as the very first line; 12 bytes 'hello world\\n'."""
    path = capture("zeek/irc-dcc-first-command.pcap")
    transfers = ExpectedTransfers()
    irc = IrcSession(Checker(), transfers, ChatContext(connection_id="c3"))
    for from_client, chunk in transcript("zeek_irc_dcc_first_command.json"):
        irc.data_received(from_client, chunk)
    o = find_offer(transfers, "10.0.0.1", 5555)
    data = tcp_payload(path, ("10.0.0.1", 5555), ("10.0.0.2", 23456))
    [job] = inspects(DccSendSession(Checker(), transfers, DATA_CTX, o).data_received(False, data))
    assert job.data == b"hello world\n"


# --- behaviour --------------------------------------------------------------------------------------

def test_chunk_boundaries_give_the_same_file():
    data = bytes(range(256)) * 4
    for chunk in (1, 3, 255, 1024):
        s = session(offer(size=len(data)))
        out = feed_sender(s, data, chunk)
        [job] = inspects(out)
        assert job.data == data
        assert acks(sends(out, False))[-1] == len(data)


def test_sender_closes_early_is_truncated():
    s = session(offer(size=100))
    s.data_received(False, b"x" * 60)
    [job] = inspects(s.connection_closed(False))
    assert job.truncated and len(job.data) == 60
    out = s.file_verdict(job.transfer_id, report(), ALLOWED)
    assert sends(out, True) == b"x" * 60 and isinstance(out[-1], Close)


def test_unknown_size_waits_for_close():
    s = session(offer(size=None))
    assert not inspects(s.data_received(False, b"abc"))
    [job] = inspects(s.connection_closed(False))
    assert not job.truncated and job.data == b"abc"


def test_sender_sends_nothing():
    s = session()
    out = s.connection_closed(False)
    assert anomalies(out) == ["dcc_empty"] and isinstance(out[-1], Close)


def test_overrun_is_dropped_and_recorded():
    s = session(offer(size=10))
    out = s.data_received(False, b"0123456789EXTRA")
    [job] = inspects(out)
    assert job.data == b"0123456789" and anomalies(out) == ["dcc_overrun"]
    assert s.data_received(False, b"more") == [] and s.transfer.overrun == 9   # recorded once, dropped quietly
    out = s.file_verdict(job.transfer_id, report(), ALLOWED)
    assert sends(out, True) == b"0123456789"                                    # the overrun never crosses


def test_larger_than_max_held_bytes_is_closed_not_passed():
    """A transfer past max_held_bytes (size not announced) is closed and recorded; nothing reaches the receiver."""
    s = session(offer(size=None), IrcLimits(max_held_bytes=100))
    s.data_received(False, b"x" * 100)
    out = s.data_received(False, b"y")
    assert anomalies(out) == ["dcc_too_large"] and isinstance(out[-1], Close)
    assert sends(out, True) == b""
    [notice] = notifies(out)
    assert "f.bin" in notice.text and "larger than 100 bytes" in notice.text and notice.decision is None
    assert s.data_received(False, b"z") == [] and s.connection_closed(False) == []      # stopped: the rest is moot


def test_announced_larger_than_max_held_bytes_is_stopped_at_the_first_byte():
    s = session(offer(size=1000), IrcLimits(max_held_bytes=100))
    out = s.data_received(False, b"x")
    assert anomalies(out) == ["dcc_too_large"] and isinstance(out[-1], Close) and notifies(out)
    assert sends(out, True) == b"" and sends(out, False) == b""                    # not even an ACK


def test_resume_position():
    """After RESUME at 60 of 100: 40 bytes expected, ACKs count from 60, the file is partial (truncated)."""
    s = session(offer(size=100, position=60))
    out = s.data_received(False, b"z" * 40)
    assert acks(sends(out, False)) == [100]
    [job] = inspects(out)
    assert job.truncated and len(job.data) == 40


def test_passive_dcc_sender_is_the_client():
    """Reverse DCC: the file's sender connected (client side): its data comes from the client, ACKs go to it."""
    s = session(offer(size=4, passive=True))
    out = s.data_received(True, b"abcd")
    assert acks(sends(out, True)) == [4]
    [job] = inspects(out)
    out = s.file_verdict(job.transfer_id, report(), ALLOWED)
    assert sends(out, False) == b"abcd"


def test_unannounced_connection_is_an_anomaly():
    s = DccSendSession(Checker(), ExpectedTransfers(), DATA_CTX, None)
    out = s.data_received(True, b"hello")
    assert anomalies(out) == ["dcc_unannounced"] and isinstance(out[-1], Close)
    assert s.data_received(True, b"more") == []


def test_receiver_gone_before_verdict():
    s = session(offer(size=3))
    [job] = inspects(s.data_received(False, b"abc"))
    s.connection_closed(True)
    out = s.file_verdict(job.transfer_id, report(), ALLOWED)
    assert sends(out, True) == b"" and anomalies(out) == ["dcc_receiver_gone"]


def test_ack_wraps_at_4_gib():
    """The 32-bit ACK wraps (DCC's own limit): position 2**32 - 2 plus 4 bytes acks 2."""
    s = session(offer(size=2 ** 32 + 10, position=2 ** 32 - 2), IrcLimits(max_held_bytes=2 ** 40))
    assert acks(sends(s.data_received(False, b"abcd"), False)) == [2]


def test_wrong_transfer_id_is_ignored():
    s = session(offer(size=1))
    inspects(s.data_received(False, b"a"))
    assert s.file_verdict("other", report(), ALLOWED) == []


def test_sends_are_typed():
    s = session(offer(size=1))
    out = s.data_received(False, b"a")
    assert isinstance(out[0], Send) and out[0].to_client is False


# --- DCC CHAT ---------------------------------------------------------------------------------------

def chat_offer():
    return DccOffer(offer_id="c1-2", kind="chat", name="", size=None, sender="tim2", receiver="tim1",
                    host="10.0.0.7", port=59214, context=ChatContext(protocol="irc", connection_id="c1"))


def test_dcc_chat_capture_lines_are_checked():
    """zeek irc-dcc-send's DCC CHAT: tim1 connected and wrote 'hello, are you there?' in two segments (text, LF);
    tim2 answered. Each line reaches the checker with its writer; allowed lines cross byte for byte."""
    checker = Checker()
    s = dcc_session(checker, ExpectedTransfers(), DATA_CTX, chat_offer())
    out = []
    for from_client, data in transcript("zeek_irc_dcc_chat.json"):
        out += s.data_received(from_client, data)
    assert [(t, c.sender, c.recipients) for t, c in checker.calls] == [
        ("hello, are you there?", "tim1", ("tim2",)), ("yes i am!", "tim2", ("tim1",))]
    assert sends(out, False) == b"hello, are you there?\n" and sends(out, True) == b"yes i am!\n"


def test_dcc_chat_block_and_mask():
    s = dcc_session(Checker(block=("secret",), mask={"1234": "****"}), ExpectedTransfers(), DATA_CTX, chat_offer())
    out = s.data_received(True, b"the secret\r\npin 1234\r\n")
    assert sends(out, False) == b"pin ****\r\n"
    assert sends(out, True).startswith(b"[imguard] ") and sends(out, True).endswith(b"\r\n")


def test_dcc_chat_endless_line():
    s = dcc_session(Checker(), ExpectedTransfers(), DATA_CTX, chat_offer(), IrcLimits(max_line_length=100))
    out = s.data_received(True, b"x" * 100)
    assert anomalies(out) == ["line_too_long"] and isinstance(out[-1], Close)


def test_dcc_session_factory_unannounced():
    out = dcc_session(Checker(), ExpectedTransfers(), DATA_CTX, None).data_received(True, b"x")
    assert anomalies(out) == ["dcc_unannounced"]


def test_start_refuses_an_unannounced_connection_at_once():
    for s in (DccSendSession(Checker(), ExpectedTransfers(), DATA_CTX, None),
              dcc_session(Checker(), ExpectedTransfers(), DATA_CTX, None)):
        out = s.start()
        assert anomalies(out) == ["dcc_unannounced"] and isinstance(out[-1], Close)
    assert session().start() == []


# --- the held file and the connection ---------------------------------------------------------------

def test_ack_goes_out_before_the_inspect_file():
    """The carrier pauses the connection at an InspectFile: the sender's last ACK must come before it, or a
    sender waiting for it would wait for the scan."""
    s = session(offer(size=4))
    out = s.data_received(False, b"abcd")
    assert [type(c) for c in out] == [Send, InspectFile] and acks(out[0].data) == [4]


def test_released_file_then_the_senders_close_closes_the_receiver():
    """The irssi case: the file is released while the sender still has its connection open; its close later
    must close the receiver's side too, or an irssi receiver waits at 100% forever."""
    s = session(offer(size=4))
    [job] = inspects(s.data_received(False, b"abcd"))
    out = s.file_verdict(job.transfer_id, report(), ALLOWED)
    assert out == [Send(to_client=True, data=b"abcd")]                  # the sender is still there: no close yet
    assert s.data_received(True, struct.pack(">I", 4)) == []           # the receiver's ACK is swallowed
    out = s.connection_closed(False)
    assert [type(c) for c in out] == [Close] and s.transfer.state is HoldState.RELEASED


def test_released_file_then_the_receivers_close_closes_the_sender():
    s = session(offer(size=4, passive=True))
    [job] = inspects(s.data_received(True, b"abcd"))
    assert sends(s.file_verdict(job.transfer_id, report(), ALLOWED), False) == b"abcd"
    assert [type(c) for c in s.connection_closed(False)] == [Close]


def test_sender_closed_before_the_verdict_closes_with_the_release():
    s = session(offer(size=4))
    [job] = inspects(s.data_received(False, b"abcd"))
    assert s.connection_closed(False) == []                             # held: nothing to pass on yet
    out = s.file_verdict(job.transfer_id, report(), ALLOWED)
    assert sends(out, True) == b"abcd" and isinstance(out[-1], Close)


def test_allowed_notice_is_delivered_to_the_sender():
    s = session(offer(size=1))
    [job] = inspects(s.data_received(False, b"a"))
    out = s.file_verdict(job.transfer_id, report(), Decision(action=ALLOW, notice="scanned, fine"))
    assert sends(out, True) == b"a" and [n.text for n in notifies(out)] == ["scanned, fine"]
    assert not any(isinstance(c, Close) for c in out)


def test_resumed_file_closed_early_is_truncated():
    s = session(offer(size=100, position=60))
    s.data_received(False, b"z" * 10)
    [job] = inspects(s.connection_closed(False))
    assert job.truncated and job.data == b"z" * 10


def test_a_second_verdict_changes_nothing():
    s = session(offer(size=1))
    [job] = inspects(s.data_received(False, b"a"))
    s.file_verdict(job.transfer_id, report(), BLOCKED)
    assert s.file_verdict(job.transfer_id, report(), ALLOWED) == []


# --- inbound: offered to the user behind the gateway ------------------------------------------------

IRC_CTX = ChatContext(client_address="10.0.0.7:59069", server_address="198.51.100.1:6667", connection_id="c1")
IRC_WELCOME = b":irc.test 001 alice :Welcome alice!~alice@10.0.0.7\r\n"


def inside_alice(relay_port: int):
    """alice's IrcSession (inside, behind the gateway) with a DCC relay on 192.0.2.1."""
    transfers = ExpectedTransfers()
    irc = IrcSession(Checker(), transfers, IRC_CTX, dcc_relay=("192.0.2.1", lambda o: relay_port))
    irc.data_received(True, b"NICK alice\r\nUSER alice 0 * :A\r\n")
    irc.data_received(False, IRC_WELCOME)
    return irc, transfers


@pytest.mark.parametrize("verdict", ["allow", "block"])
def test_inbound_active_offer_is_held_until_its_verdict(verdict):
    """mallory (outside, on the server's side) offers alice (inside) a file by active DCC: the offer alice gets
    points at the relay, her connection there is carried on to mallory, and the file is held until the verdict
    (origin server: inbound, sender mallory's mask, recipient alice). Blocked: alice gets none of it and her
    IRC connection a notice naming the file; allowed: the bytes as sent."""
    irc, transfers = inside_alice(40020)
    out = irc.data_received(False, b":mallory!m@203.0.113.5 PRIVMSG alice "
                                   b":\x01DCC SEND x.exe 3405803781 7000 6\x01\r\n")
    assert b"3221225985 40020" in sends(out, True)
    o = find_offer(transfers, "192.0.2.1", 40020)
    data_ctx = ChatContext(client_address="10.0.0.7:50000", server_address="192.0.2.1:40020", connection_id="d9")
    s = dcc_session(Checker(), transfers, data_ctx, o)
    assert s.sender_is_client is False                   # alice connected: the file comes from the server leg
    out = s.data_received(False, b"MZ\x90\x00ab")
    assert sends(out, True) == b"" and acks(sends(out, False)) == [6]
    [job] = inspects(out)
    ctx = job.context
    assert (ctx.origin, ctx.sender, ctx.recipients, ctx.transfer_mechanism) == (
        FROM_SERVER, "mallory!m@203.0.113.5", ("alice",), "dcc")
    assert classify_direction(ctx) == INBOUND and ctx.connection_id == "d9"
    out = s.file_verdict(job.transfer_id, report(), ALLOWED if verdict == "allow" else BLOCKED)
    if verdict == "allow":
        assert sends(out, True) == b"MZ\x90\x00ab"
        return
    assert sends(out, True) == b"" and isinstance(out[-1], Close)
    [notify] = notifies(out)
    assert notify.connection_id == "c1" and "x.exe" in notify.text and "mallory" in notify.text
    assert sends(irc.notice(notify.text), True).startswith(b":imguard NOTICE alice :imguard: the file 'x.exe'")


def test_inbound_passive_offer_goes_through_the_relay():
    """mallory offers by reverse DCC (port 0 + token); alice's answer names her own listener, and is rewritten to
    the relay: mallory connects to the gateway, which connects on to alice. The file comes from the client leg
    of that data connection, is held, and is inbound."""
    irc, transfers = inside_alice(40021)
    irc.data_received(False, b":mallory!m@203.0.113.5 PRIVMSG alice :\x01DCC SEND y.bin 3405803781 0 4 t1\x01\r\n")
    out = irc.data_received(True, b"PRIVMSG mallory :\x01DCC SEND y.bin 167772167 6001 4 t1\x01\r\n")
    assert sends(out, False) == b"PRIVMSG mallory :\x01DCC SEND y.bin 3221225985 40021 4 t1\x01\r\n"
    o = find_offer(transfers, "192.0.2.1", 40021)
    assert o.real_address == ("10.0.0.7", 6001)
    s = dcc_session(Checker(), transfers, ChatContext(connection_id="d10"), o)
    out = s.data_received(True, b"abcd")
    assert sends(out, False) == b""
    [job] = inspects(out)
    assert job.context.origin == FROM_SERVER and classify_direction(job.context) == INBOUND
    assert sends(s.file_verdict(job.transfer_id, report(), ALLOWED), False) == b"abcd"


def test_dcc_chat_lines_have_the_origin_of_their_writer():
    """A DCC CHAT offered to our user by someone outside: the offerer's lines come from the server side, our
    user's from the client side (and the reverse for an offer our user made)."""
    for outbound, offerer_origin in ((False, FROM_SERVER), (True, FROM_CLIENT)):
        o = DccOffer(offer_id="c1-3", kind="chat", name="", size=None, sender="mallory!m@h", receiver="alice",
                     host="203.0.113.5", port=7001, outbound=outbound, context=ChatContext(connection_id="c1"))
        checker = Checker()
        s = dcc_session(checker, ExpectedTransfers(), DATA_CTX, o)
        s.data_received(False, b"from the offerer\n")     # active: the offerer listens (server leg)
        s.data_received(True, b"from the receiver\n")
        assert [(t, c.sender, c.origin) for t, c in checker.calls] == [
            ("from the offerer", "mallory!m@h", offerer_origin),
            ("from the receiver", "alice", FROM_CLIENT if offerer_origin == FROM_SERVER else FROM_SERVER)]


def test_inbound_file_notice_is_in_the_receivers_words():
    """A rule's notice is written for the sender ("Your file ..."): the inside receiver of a blocked inbound file
    is told who sent what and why instead; an allowed inbound file's notice (for its sender) is not delivered."""
    irc, transfers = inside_alice(40022)
    irc.data_received(False, b":mallory!m@h PRIVMSG alice :\x01DCC SEND z.com 3405803781 7000 1\x01\r\n")
    for decision, told in ((Decision(action=BLOCK, matches=BLOCKED.matches, notice="Your file was blocked."),
                            ["imguard: the file 'z.com' from mallory was blocked (no captures)"]),
                           (Decision(action=ALLOW, notice="Your file was scanned."), [])):
        o = find_offer(transfers, "192.0.2.1", 40022, take=False)
        s = dcc_session(Checker(), transfers, ChatContext(connection_id="d11"), o)
        [job] = inspects(s.data_received(False, b"z"))
        assert [n.text for n in notifies(s.file_verdict(job.transfer_id, report(), decision))] == told
