"""OSCAR: the login/BOS session (ICBM messages, rendezvous offers), the OFT file session, and the FLAP, SNAC,
TLV, ICBM, rendezvous and OFT parsers alone."""

from __future__ import annotations

from imguard.protocols.oscar import OftSession, OscarLimits, OscarSession, find_oft_offer
from imguard.protocols.oscar.decoder import (FlapDecoder, OscarError, message_texts, parse_fragments, parse_icbm,
                                             parse_oft, parse_rendezvous, parse_snac, parse_tlvs)
from tests.fuzz.common import CTX, Checker, decode, drive, new_transfers, transcript_seeds

LIMITS = OscarLimits(oscar_max_held_bytes=1 << 16)


def oft() -> OftSession:
    from tests.test_oscar import offer_file             # the SendFile proposal a real BOS session announces
    transfers = new_transfers()
    offer_file(transfers)
    return OftSession(Checker(), transfers, CTX, find_oft_offer(transfers, host="192.168.1.20", port=5190), LIMITS)


def parsers(data: bytes) -> None:
    for call in (lambda: parse_tlvs(data), lambda: parse_snac(data), lambda: parse_icbm(data, True),
                 lambda: parse_icbm(data, False), lambda: message_texts(parse_fragments(data)),
                 lambda: parse_rendezvous(data), lambda: parse_oft(data)):
        try:
            call()
        except OscarError:
            pass                        # its declared error: the session turns it into an anomaly
    FlapDecoder().feed(data)


def target(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        drive(lambda: OscarSession(Checker(), new_transfers(), CTX, LIMITS), rest)
    elif mode == 1:
        drive(oft, rest)
    else:
        for _, segment in decode(rest):
            parsers(segment)


def seeds() -> list[bytes]:
    sessions = transcript_seeds("legacy/oscar_login.json", "legacy/oscar_bos.json")
    return ([b"\0" + s for s in sessions] + [b"\1" + s for s in transcript_seeds("legacy/oscar_oft.json")]
            + [b"\2" + s for s in sessions])

