"""Hostile input for the SIP and MSRP sessions: random mutations of real transcripts never raise, never grow
buffers past their limits, and never let a checked message's text cross unchecked."""

from __future__ import annotations

import random

from imguard.files.expected import ExpectedTransfers
from imguard.model import ChatContext
from imguard.protocols.base import Anomaly, Close, InspectFile, Notify, ProtocolEvent, Record, Send
from imguard.protocols.msrp.framing import MsrpLimits
from imguard.protocols.msrp.session import MsrpSession
from imguard.protocols.sip.message import SipLimits, SipMessage, SipStreamDecoder
from imguard.protocols.sip.session import SipDatagramHandler, SipSession
from tests.test_sip_support import ALLOWED, Checker, chunk, file_chunks, load, message, report

SIP_STREAM = (load("rfc3428_message.sip") + message("pw hunter2") + load("rfc5547_invite.sip")
              + load("rfc5547_200ok.sip"))
MSRP_STREAM = (load("rfc4975_send.msrp") + chunk("tx01", b"pw hunter2")
               + b"".join(raw for _, raw in file_chunks(bytes(range(256)) * 12, 700)))


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = rng.choice([b"\r\n", b"-------", b"Content-Length: 99999\r\n", b"Byte-Range: 9-1/2\r\n",
                                     bytes([rng.randrange(256)]) * rng.randint(1, 50)])
        elif op == 2:
            del b[pos:pos + rng.randint(1, 40)]
        else:
            b[pos:pos] = b[max(0, pos - 30):pos]
    return bytes(b)


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 600)
        out.append(data[i:i + n])
        i += n
    return out


def run_session(session, rng, data, limit_check):
    def carry(cmds):
        for cmd in cmds:
            assert isinstance(cmd, (Send, InspectFile, Close, Record, Notify, Anomaly, ProtocolEvent))
            if isinstance(cmd, InspectFile):
                carry(session.file_verdict(cmd.transfer_id, report(cmd), ALLOWED))

    for piece in pieces(rng, data):
        carry(session.data_received(rng.random() < 0.8, piece))
        limit_check(session)
    carry(session.connection_closed(True))
    carry(session.connection_closed(False))


def test_sip_mutations_never_raise_and_never_leak_the_password():
    limits = SipLimits(sip_max_message_size=4096, sip_max_header_size=2048)
    for seed in range(300):
        rng = random.Random(seed)
        checker = Checker(mask={"hunter2": "*******"})
        s = SipSession(checker, ExpectedTransfers(), ChatContext(connection_id="f"), limits)
        data = mutate(rng, SIP_STREAM)

        def bounded(sess):
            for d in sess._decoders.values():
                assert d.pending <= limits.sip_max_message_size + 4

        sent = bytearray()
        for piece in pieces(rng, data):
            for cmd in s.data_received(True, piece):
                if isinstance(cmd, Send) and not cmd.to_client:
                    sent += cmd.data
            bounded(s)
        s.connection_closed(True)
        for msg in SipStreamDecoder().feed(bytes(sent)):     # no text body crossed with the password in it
            if isinstance(msg, SipMessage) and msg.content_type[0] in ("text/plain", "text/html", "message/cpim"):
                assert b"hunter2" not in msg.body, seed
        h = SipDatagramHandler(checker, None, ChatContext(), limits)
        for piece in pieces(rng, data):
            h.datagram_received(rng.random() < 0.5, piece)


def test_msrp_mutations_never_raise_and_stay_bounded():
    limits = MsrpLimits(msrp_max_chunk_size=8192, msrp_max_held_bytes=16384, msrp_max_messages_in_reassembly=4,
                        msrp_max_tracked_transactions=64)
    for seed in range(300):
        rng = random.Random(seed)
        s = MsrpSession(Checker(mask={"hunter2": "*******"}), ExpectedTransfers(), ChatContext(), None, limits)

        def bounded(sess):
            assert sess.holds.held_bytes <= limits.msrp_max_held_bytes
            assert len(sess._messages) <= limits.msrp_max_messages_in_reassembly
            assert len(sess._swallow) <= limits.msrp_max_tracked_transactions
            for d in sess._decoders.values():
                assert d.pending <= limits.msrp_max_chunk_size + 65536

        run_session(s, rng, mutate(rng, MSRP_STREAM), bounded)
        # Both sides gone and every file decided: every held message has ended, its bytes freed.
        assert s.holds.held_bytes == 0 and s.holds.in_flight == 0, seed


def test_msrp_text_never_crosses_unchecked():
    """Whatever the mutation, a forwarded SEND body containing the password means the checker saw it."""
    for seed in range(200):
        rng = random.Random(seed)
        checker = Checker(block=("hunter2",))
        s = MsrpSession(checker, ExpectedTransfers(), ChatContext(), None)
        sent = bytearray()
        for piece in pieces(rng, mutate(rng, chunk("tx01", b"pw hunter2 " * 3))):
            for cmd in s.data_received(True, piece):
                if isinstance(cmd, Send) and not cmd.to_client:
                    sent += cmd.data
        assert b"hunter2" not in sent, seed
