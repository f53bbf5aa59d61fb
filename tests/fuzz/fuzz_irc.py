"""IRC: the client session (both sides, STARTTLS, DCC offers), DCC SEND and CHAT sessions, and the line, CTCP and
DCC parsers alone."""

from __future__ import annotations

from imguard.model import ChatContext
from imguard.protocols.irc import IrcLimits, IrcSession
from imguard.protocols.irc.dcc import DccOffer, dcc_session
from imguard.protocols.irc.decoder import DccError, LineDecoder, decode_text, parse_dcc, parse_line, split_ctcp
from tests.fuzz.common import CTX, Checker, decode, drive, encode, new_transfers, transcript_seeds

LIMITS = IrcLimits(max_line_length=2048, max_held_bytes=1 << 16)


def offer(kind: str) -> DccOffer:
    return DccOffer(offer_id="fuzz-1", kind=kind, name="f.bin" if kind == "send" else "", size=300 if kind == "send"
                    else None, sender="alice", receiver="bob", host="10.0.0.7", port=5000, listener_is_sender=True,
                    context=ChatContext(protocol="irc", sender="alice", recipients=("bob",), connection_id="c1",
                                        transfer_mechanism="dcc"))


def parsers(data: bytes) -> None:
    for line in LineDecoder(LIMITS).feed(data):
        parse_line(getattr(line, "raw", b""), LIMITS)
    text = decode_text(data)[0]
    split_ctcp(text)
    try:
        parse_dcc(text, LIMITS)
    except DccError:
        pass                            # its declared error: the session turns it into an anomaly


def target(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        drive(lambda: IrcSession(Checker(), new_transfers(), CTX, LIMITS), rest)
    elif mode == 1:
        drive(lambda: dcc_session(Checker(), new_transfers(), CTX, offer("send"), LIMITS), rest)
    elif mode == 2:
        drive(lambda: dcc_session(Checker(), new_transfers(), CTX, offer("chat"), LIMITS), rest)
    else:
        for _, segment in decode(rest):
            parsers(segment)


def seeds() -> list[bytes]:
    sessions = transcript_seeds("irc/*.json")
    dcc = [encode([(True, b"x" * 120), (False, (120).to_bytes(4, "big")), (True, b"y" * 180)], close_at_end=True)]
    chat = transcript_seeds("irc/zeek_irc_dcc_chat.json")
    lines = [encode([(True, b"SEND \"a b.txt\" 3232235777 5000 1320211 T0K\x01")]),
             encode([(True, b"\x01DCC RESUME f 5000 100\x01 \x01ACTION hi\x01")])]
    return ([b"\0" + s for s in sessions] + [b"\1" + s for s in dcc] + [b"\2" + s for s in chat]
            + [b"\3" + s for s in lines + sessions])

