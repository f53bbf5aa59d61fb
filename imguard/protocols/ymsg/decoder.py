"""YMSG (Yahoo! Messenger) packets: pure, standard library only.

    dec = PacketDecoder()
    dec.feed(b"YMSG\\x00\\x10\\x00\\x00\\x00\\x0f\\x00\\x06...")
        -> [Packet(raw=..., service=6, fields=(("1", b"alice"), ("5", b"bob"), ("14", b"hi"), ...))]

Header (20 bytes, big-endian): "YMSG" | version (2; 0x000F YMSG15, 0x0010 YMSG16) | vendor id (2) |
payload length (2, unsigned, the header excluded) | service (2) | status (4) | session id (4).
Payload: `key 0xC0 0x80 value 0xC0 0x80` repeated, keys ASCII decimal, values bytes (UTF-8 when
key 97 is "1", else the sender's code page). Concatenating the `raw` of every event gives back the input.

Hostile input: a header without the "YMSG" magic, or a length above `ymsg_max_packet` (a length with
the top bit set is what a signed reader sees as negative: always above the limit) is a
`FramingError` (fatal, the session closes). A payload that never comes stays pending (truncated at
close). A payload that is not whole key/value pairs is flagged (`Packet.malformed`), not fatal.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from imguard.protocols.framing import FrameDecoder, FramingError, is_number  # noqa: F401 (FramingError: part of this module's API)
from imguard.settings import setting

MAGIC = b"YMSG"
HEADER_SIZE = 20
SEP = b"\xc0\x80"

# services (Wireshark packet-ymsg.c enum and libpurple's yahoo_service)
LOGON, LOGOFF, MESSAGE = 0x01, 0x02, 0x06
CONFMSG = 0x1D                # conference message
COMMENT = 0xA8                # chat-room message
FILETRANSFER = 0x46           # YMSG <= 11: file uploaded by HTTP POST /notifyft, URL in key 20
NOTIFY = 0x4B                 # typing, games
P2PFILEXFER = 0x4D            # peer-to-peer file offer with an URL
AUTHRESP, LIST, AUTH = 0x54, 0x55, 0x57
FILETRANS_15, FILETRANS_INFO_15, FILETRANS_ACC_15 = 0xDC, 0xDD, 0xDE

_HEADER = struct.Struct(">4sHHHHII")


@dataclass(frozen=True)
class YmsgLimits:
    """YMSG limits (per connection)."""

    ymsg_max_packet: int = setting(
        32 * 1024, "Largest YMSG payload length accepted. The field is an unsigned 16-bit count; Yahoo servers "
                   "split buddy lists into several packets, and messages are under 2 KiB. A larger length (and any "
                   "a signed reader would see as negative) is an anomaly and closes the connection.")
    ymsg_max_file_size: int = setting(
        2 * 1024 * 1024 * 1024, "Largest file size a file-transfer offer may announce; a larger one (or a "
                                "non-numeric size) is refused with a notice, since it could not be held for "
                                "inspection by the HTTP side.")
    ymsg_transfer_ttl: float = setting(
        900.0, "Seconds an announced Yahoo file upload or peer-to-peer transfer waits for its HTTP connection.")
    ymsg_max_anomalies_per_kind: int = setting(
        20, "Anomaly events of one kind recorded per YMSG connection; later ones are only counted.")


@dataclass(frozen=True, eq=False)
class Packet:
    raw: bytes
    version: int
    vendor: int
    service: int
    status: int
    session_id: int
    fields: tuple[tuple[str, bytes], ...] = ()
    malformed: str = ""                 # why the payload is not whole key/value pairs ("" = fine)

    def get(self, key: str, default: bytes | None = None) -> bytes | None:
        for k, v in self.fields:
            if k == key:
                return v
        return default

    def text(self, key: str, default: str = "") -> str:
        v = self.get(key)
        return default if v is None else v.decode("utf-8", "replace")

    def all(self, key: str) -> list[bytes]:
        return [v for k, v in self.fields if k == key]


def parse_fields(payload: bytes) -> tuple[tuple[tuple[str, bytes], ...], str]:
    """(fields, problem): pairs in order; problem is "" or what is wrong with the payload."""
    if not payload:
        return (), ""
    parts = payload.split(SEP)
    problem = ""
    if parts[-1] == b"":
        parts.pop()
    else:
        problem = "the payload does not end with the 0xC0 0x80 separator"
    if len(parts) % 2:
        problem = problem or "an odd number of items (a key without its value)"
        parts.append(b"")
    fields = []
    for i in range(0, len(parts), 2):
        key = parts[i].decode("latin-1")
        if not is_number(key):
            problem = problem or f"a non-numeric key {key[:12]!r}"
        fields.append((key, parts[i + 1]))
    return tuple(fields), problem


class PacketDecoder(FrameDecoder):
    """One direction of a YMSG connection: bytes in, Packets out (see the module docstring)."""

    def __init__(self, limits: YmsgLimits = YmsgLimits()):
        super().__init__(limits)

    def next_frame(self, buf: bytearray, pos: int) -> tuple[Packet, int] | None:
        if len(buf) - pos < 4:
            return None
        if buf[pos:pos + 4] != MAGIC:
            raise self.failure("bad_magic", f"{bytes(buf[pos:pos + 4])!r} where a YMSG header should start")
        if len(buf) - pos < HEADER_SIZE:
            return None
        _, version, vendor, length, service, status, session = _HEADER.unpack_from(buf, pos)
        if length > self.limits.ymsg_max_packet:
            signed = length - 0x10000 if length & 0x8000 else length
            detail = (f"a YMSG length of {length}" + (f" ({signed} read as signed)" if signed < 0 else "") +
                      f", limit {self.limits.ymsg_max_packet}")
            raise self.failure("bad_length", detail, length)
        if len(buf) - pos < HEADER_SIZE + length:
            return None
        raw = bytes(buf[pos:pos + HEADER_SIZE + length])
        fields, problem = parse_fields(raw[HEADER_SIZE:])
        return Packet(raw, version, vendor, service, status, session, fields, problem), pos + HEADER_SIZE + length


def build_payload(fields) -> bytes:
    return b"".join(str(k).encode() + SEP + (v if isinstance(v, bytes) else str(v).encode("utf-8")) + SEP
                    for k, v in fields)


def build_packet(service: int, fields, status: int = 0, session_id: int = 0, version: int = 0x0010,
                 vendor: int = 0) -> bytes:
    payload = build_payload(fields)
    return _HEADER.pack(MAGIC, version, vendor, len(payload), service, status, session_id) + payload


def rebuild(packet: Packet, fields) -> bytes:
    """The packet with new fields: same header, length fixed."""
    return build_packet(packet.service, fields, packet.status, packet.session_id, packet.version, packet.vendor)


_ESCAPE = re.compile(r"\x1b\[[^m\x1b]{0,16}m")
_TAGS = re.compile(r"(?i)</?(font|fade|alt|b|i|u|s|snd|l)\b[^<>]*>")


def strip_markup(text: str) -> str:
    """The words a person reads: Yahoo escape codes (ESC [ ... m: colours, bold, ...) and <font>/<fade>/<alt>
    tags removed."""
    return _TAGS.sub("", _ESCAPE.sub("", text))


def decode_text(raw: bytes, utf8: bool) -> str:
    if utf8:
        return raw.decode("utf-8", "replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


def parse_notifyft(body: bytes) -> tuple[dict[str, bytes], int]:
    """For the HTTP side: the body of a YMSG <= 11 `POST /notifyft` upload is a YMSG header and fields
    (service 0x46: keys 0 sender, 5 recipient, 27 name, 28 size), then `29 0xC0 0x80`, then the raw
    file (whether the header's length counts the file differs between clients, so it is not trusted).
    Returns ({key: value}, offset of the first file byte), or ({}, 0) when the body is not that."""
    if len(body) < HEADER_SIZE or body[:4] != MAGIC:
        return {}, 0
    fields: dict[str, bytes] = {}
    pos = HEADER_SIZE
    for _ in range(64):
        end = body.find(SEP, pos, pos + 16)
        if end < 0:
            return {}, 0
        key = body[pos:end]
        if key == b"29":
            return fields, end + 2
        vend = body.find(SEP, end + 2, end + 2 + 4096)
        if vend < 0 or not is_number(key):
            return {}, 0
        fields[key.decode()] = body[end + 2:vend]
        pos = vend + 2
    return {}, 0
