"""SIP: the session over TCP/TLS (MESSAGE policy, SDP offers and answers, bodies held as files), the UDP datagram
handler, and the framing, SDP, CPIM and text-body parsers alone."""

from __future__ import annotations

from imguard.protocols.sip.message import (SipFramingError, SipLimits, SipStreamDecoder, decode_text,
                                           parse_content_type, parse_cpim, parse_datagram, tag_of, uri_of)
from imguard.protocols.sip.sdp import SdpError, msrp_media, parse_file_selector
from imguard.protocols.sip.session import SipDatagramHandler, SipSession
from imguard.protocols.sip.text import message_text
from tests.fuzz.common import CTX, DATA, Checker, decode, drive, encode, new_transfers

LIMITS = SipLimits()


def parsers(data: bytes) -> None:
    for item in SipStreamDecoder(LIMITS).feed(data):
        if hasattr(item, "get"):
            uri_of(item.get("from"))
            tag_of(item.get("to"))
            ctype, params = item.content_type
            message_text(ctype, params, item.body)
    try:
        parse_datagram(data, LIMITS)
    except SipFramingError:
        pass                            # its declared error: the handler turns it into an anomaly
    text = data.decode("latin-1")
    parse_content_type(text)
    decode_text(data, text[:40])
    parse_cpim(data)
    for call in (lambda: msrp_media(text), lambda: parse_file_selector(text)):
        try:
            call()
        except SdpError:
            pass


def target(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        drive(lambda: SipSession(Checker(), new_transfers(), CTX, LIMITS), rest)
    elif mode == 1:
        drive(lambda: SipDatagramHandler(Checker(), new_transfers(), CTX, LIMITS), rest, datagrams=True)
    else:
        for _, segment in decode(rest):
            parsers(segment)


def seeds() -> list[bytes]:
    sip = DATA / "sip"
    invite, ok = (sip / "rfc5547_invite.sip").read_bytes(), (sip / "rfc5547_200ok.sip").read_bytes()
    message = (sip / "rfc3428_message.sip").read_bytes()
    dialog = encode([(True, invite), (False, ok), (True, message), (False, message)], close_at_end=True)
    return [b"\0" + dialog, b"\1" + dialog, b"\2" + dialog]

