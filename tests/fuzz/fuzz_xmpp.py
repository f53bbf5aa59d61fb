"""XMPP: the c2s session (STARTTLS and direct TLS, both sides), and the XML stream decoder alone."""

from __future__ import annotations

from imguard.protocols.xmpp import XmppLimits, XmppSession
from imguard.protocols.xmpp.decoder import XmlStreamDecoder
from tests.fuzz.common import CTX, Checker, decode, drive, new_transfers, transcript_seeds

LIMITS = XmppLimits(max_stanza_size=16 << 10, max_server_stanza_size=64 << 10, max_depth=20)


def target(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 3:                       # the decoder alone: every event, its raw bytes add up to the input
        for _, segment in decode(rest):
            XmlStreamDecoder(LIMITS).feed(segment)
        return
    drive(lambda: XmppSession(Checker(), new_transfers(), CTX, LIMITS, tls_on_connect=mode == 1,
                              stripped_auth_open=mode == 2), rest)


def seeds() -> list[bytes]:
    return [bytes([mode]) + s for s in transcript_seeds("xmpp/httpupload_*.json", "xmpp/ibb_*.json", "xmpp/ndpi_*.json")
            for mode in (0, 2, 3)]

