"""YMSG: the session (messages, file-transfer announcements) and the packet, pair and NOTIFYFT parsers alone."""

from __future__ import annotations

from imguard.protocols.ymsg import YmsgLimits, YmsgSession
from imguard.protocols.ymsg.decoder import (Packet, PacketDecoder, decode_text, parse_fields, parse_notifyft,
                                            strip_markup)
from tests.fuzz.common import CTX, Checker, decode, drive, new_transfers, transcript_seeds


def parsers(data: bytes) -> None:
    for packet in PacketDecoder().feed(data):
        if isinstance(packet, Packet):
            parse_fields(packet.raw[20:])
    parse_fields(data)
    parse_notifyft(data)
    strip_markup(decode_text(data, False))
    strip_markup(decode_text(data, True))


def target(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 2, data[1:]
    if mode == 0:
        drive(lambda: YmsgSession(Checker(), new_transfers(), CTX, YmsgLimits()), rest)
    else:
        for _, segment in decode(rest):
            parsers(segment)


def seeds() -> list[bytes]:
    sessions = transcript_seeds("legacy/ymsg_*.json")
    return [b"\0" + s for s in sessions] + [b"\1" + s for s in sessions]

