"""MSRP: the session on a negotiated media connection (chunked text and files, both directions, reports) and the
chunk decoder, Byte-Range and URI parsers alone."""

from __future__ import annotations

from imguard.protocols.msrp.framing import MsrpDecoder, MsrpLimits, parse_byte_range
from imguard.protocols.msrp.offer import parse_msrp_uri
from imguard.protocols.msrp.session import MsrpSession
from tests.fuzz.common import CTX, DATA, Checker, decode, drive, encode

LIMITS = MsrpLimits(msrp_max_held_bytes=1 << 16)


def session() -> MsrpSession:
    from tests.test_msrp_session import negotiated     # the RFC 5547 offer/answer through a real SipSession
    checker = Checker()
    transfers, offer = negotiated(checker)
    return MsrpSession(checker, transfers, CTX, offer, LIMITS)


def parsers(data: bytes) -> None:
    MsrpDecoder(LIMITS).feed(data)
    text = data.decode("latin-1")
    parse_byte_range(text)
    parse_msrp_uri(text)


def target(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 2, data[1:]
    if mode == 0:
        drive(session, rest)
    else:
        for _, segment in decode(rest):
            parsers(segment)


def seeds() -> list[bytes]:
    from tests.test_sip_support import chunk, file_chunks
    send = (DATA / "sip" / "rfc4975_send.msrp").read_bytes()
    data = bytes(range(256)) * 4
    files = [raw for _, raw in file_chunks(data, 300)]
    text = [chunk("a1", b"hello ", flag="+", total=11, message_id="m"), chunk("a2", b"world", start=7, total=11,
                                                                              message_id="m")]
    items = [(True, send)] + [(True, f) for f in files] + [(False, t) for t in text]
    return [b"\0" + encode(items, close_at_end=True), b"\1" + encode(items)]

