"""OSCAR (AIM/ICQ) wire formats: FLAP framing, SNACs, TLVs, ICBM messages and rendezvous, the OFT
header. Pure, standard library only; every integer is big-endian unless said otherwise.

    dec = FlapDecoder()
    dec.feed(b"*\\x02\\x00\\x07\\x00\\x0a\\x00\\x04\\x00\\x06...")    -> [Flap(raw=..., channel=2, seq=7, data=...)]

FLAP (6-byte header): 0x2A | channel (1) | sequence (2) | data length (2). Channels: 1 sign-on
(version 0x00000001 + TLVs), 2 SNAC, 3 error, 4 sign-off (TLVs), 5 keep-alive. A frame whose first byte
is not 0x2A, or whose length is above `oscar_max_frame_size`, is a `FramingError` (fatal). A frame
whose data never comes stays pending (reported as truncated at close).

SNAC (channel 2 data): family (2) | subtype (2) | flags (2) | request id (4); with flag 0x8000 a
2-byte length and that many bytes of extra TLVs come before the data. TLV: type (2) | length (2) | value.

ICBM (family 0x0004): subtype 0x0006 client -> server (cookie (8) | channel (2) | screen name
(1-byte length + name) | TLVs) and 0x0007 server -> client (the same, then warning level (2), a count
of user-info TLVs and those TLVs before the message TLVs). Channel 1: TLV 0x0002 holds fragments
`id (1) | version (1) | length (2) | data`; 0x05 capabilities, 0x01 text = charset (2: 0 ASCII,
2 UCS-2BE, 3 ISO-8859-1) | subcharset (2) | text, usually HTML. Channel 2: TLV 0x0005 rendezvous =
type (2: 0 propose, 1 cancel, 2 accept) | cookie (8) | capability UUID (16) | TLVs (0x000A request
number, 0x0002 proxy IP, 0x0003 client IP, 0x0004 verified IP, 0x0005 port, 0x0010 use proxy,
0x2711 SendFile data = multiple (2) | file count (2) | total size (4) | name NUL-terminated, 0x2712
name charset). Channel 4 (ICQ): TLV 0x0005 = UIN (4, little-endian) | type (1) | flags (1) |
length (2, little-endian) | text NUL-terminated.

OFT (the file connection, direct or through the AOL proxy): a header `OFT2` | length (2, normally 256) |
type (2: 0x0101 prompt, 0x0202 ack, 0x0204 done, 0x0205/0x0106/0x0207 resume) | cookie (8) | ... |
total size (4) at 28 | size (4) at 32 | checksum (4) at 40 | bytes received (4) at 60 | received
checksum (4) at 64 | "Cool FileXfer" id string at 68 | name encoding (2) at 188 | name (64+) at 192;
then exactly `size` bytes of file data from the sender.
"""

from __future__ import annotations

import html
import re
import struct
from dataclasses import dataclass

from imguard.protocols.framing import FrameDecoder, FramingError  # noqa: F401 (FramingError: part of this module's API)
from imguard.settings import MiB, setting

FLAP_START = 0x2A
CH_SIGNON, CH_SNAC, CH_ERROR, CH_SIGNOFF, CH_KEEPALIVE = 1, 2, 3, 4, 5
ICBM = 0x0004
ICBM_SEND, ICBM_INCOMING = 0x0006, 0x0007
CHARSET_ASCII, CHARSET_UCS2BE, CHARSET_LATIN1 = 0x0000, 0x0002, 0x0003
RV_PROPOSE, RV_CANCEL, RV_ACCEPT = 0, 1, 2
CAP_SENDFILE = bytes.fromhex("094613434C7F11D18222444553540000")
CAP_DIRECTIM = bytes.fromhex("094613454C7F11D18222444553540000")
CAP_GETFILE = bytes.fromhex("094613484C7F11D18222444553540000")
OFT_PROMPT, OFT_ACK, OFT_DONE = 0x0101, 0x0202, 0x0204
OFT_RESUME, OFT_RESUME_SEND, OFT_RESUME_ACK = 0x0205, 0x0106, 0x0207
OFT_HEADER_SIZE = 256
PROXY_VERSION = 0x044A

# Families of the OSCAR protocol as deployed (AIM 5/6, ICQ 5/6): anything else is recorded once.
KNOWN_FAMILIES = frozenset({0x0001, 0x0002, 0x0003, 0x0004, 0x0005, 0x0006, 0x0007, 0x0008, 0x0009, 0x000A,
                            0x000B, 0x000C, 0x000D, 0x000E, 0x000F, 0x0010, 0x0013, 0x0015, 0x0017, 0x0018,
                            0x0022, 0x0025, 0x0085})


@dataclass(frozen=True)
class OscarLimits:
    """OSCAR limits (per connection)."""

    oscar_max_frame_size: int = setting(
        16 * 1024, "Largest FLAP data length accepted. AIM/ICQ servers and clients keep frames under 8 KiB (an "
                   "ICBM is at most ~8000 bytes); a longer announced length is an anomaly and closes the connection "
                   "(the gateway does not wait for data it cannot bound).")
    oscar_max_held_bytes: int = setting(
        256 * MiB, "Largest file held for inspection on an OFT connection. A rendezvous announcing more is refused "
                   "with a notice; a transfer running past it is stopped: a file is never passed unscanned.")
    oscar_transfer_ttl: float = setting(
        900.0, "Seconds a SendFile rendezvous waits for its OFT connection (the receiver must accept by hand).")
    oscar_max_anomalies_per_kind: int = setting(
        20, "Anomaly events of one kind recorded per OSCAR connection; later ones are only counted.")


# --- FLAP -------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Flap:
    raw: bytes          # the whole frame as it came
    channel: int
    seq: int
    data: bytes


class FlapDecoder(FrameDecoder):
    """One direction of an OSCAR connection: bytes in, Flap frames out; raw concatenates to the input."""

    def __init__(self, limits: OscarLimits = OscarLimits()):
        super().__init__(limits)

    def next_frame(self, buf: bytearray, pos: int) -> tuple[Flap, int] | None:
        if buf[pos] != FLAP_START:
            raise self.failure("bad_flap_start", f"a FLAP frame starting with 0x{buf[pos]:02x}, not 0x2a")
        if len(buf) - pos < 6:
            return None
        channel, seq, length = struct.unpack_from(">BHH", buf, pos + 1)
        if length > self.limits.oscar_max_frame_size:
            raise self.failure("frame_too_large", f"a FLAP frame announcing {length} bytes (limit "
                               f"{self.limits.oscar_max_frame_size})", length)
        if len(buf) - pos < 6 + length:
            return None
        raw = bytes(buf[pos:pos + 6 + length])
        return Flap(raw, channel, seq, raw[6:]), pos + 6 + length


def build_flap(channel: int, seq: int, data: bytes) -> bytes:
    return struct.pack(">BBHH", FLAP_START, channel, seq & 0xFFFF, len(data)) + data


# --- TLV and SNAC -----------------------------------------------------------------------------------

class OscarError(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def parse_tlvs(data: bytes, count: int | None = None) -> tuple[list[tuple[int, bytes]], int]:
    """([(type, value)], bytes consumed); `count` stops after that many TLVs. Raises OscarError if one is cut."""
    tlvs: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data) and (count is None or len(tlvs) < count):
        if len(data) - pos < 4:
            raise OscarError("truncated_tlv", f"{len(data) - pos} stray bytes where a TLV header should be")
        t, n = struct.unpack_from(">HH", data, pos)
        if pos + 4 + n > len(data):
            raise OscarError("truncated_tlv", f"TLV 0x{t:04x} announces {n} bytes, {len(data) - pos - 4} remain")
        tlvs.append((t, data[pos + 4:pos + 4 + n]))
        pos += 4 + n
    if count is not None and len(tlvs) < count:
        raise OscarError("truncated_tlv", f"{len(tlvs)} TLVs where {count} were announced")
    return tlvs, pos


def tlv(tlvs: list[tuple[int, bytes]], t: int) -> bytes | None:
    for k, v in tlvs:
        if k == t:
            return v
    return None


def build_tlvs(tlvs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack(">HH", t, len(v)) + v for t, v in tlvs)


@dataclass(frozen=True)
class Snac:
    family: int
    subtype: int
    flags: int
    request_id: int
    extra: bytes            # the flag-0x8000 block, its length prefix included ("" when absent)
    data: bytes

    def header(self) -> bytes:
        return struct.pack(">HHHI", self.family, self.subtype, self.flags, self.request_id) + self.extra


def parse_snac(data: bytes) -> Snac:
    if len(data) < 10:
        raise OscarError("short_snac", f"a {len(data)}-byte SNAC (the header alone is 10)")
    family, subtype, flags, reqid = struct.unpack_from(">HHHI", data)
    pos = 10
    extra = b""
    if flags & 0x8000:
        if len(data) < 12:
            raise OscarError("short_snac", "a SNAC with flag 0x8000 and no extra-data length")
        n = struct.unpack_from(">H", data, 10)[0]
        if 12 + n > len(data):
            raise OscarError("short_snac", f"SNAC extra data of {n} bytes, {len(data) - 12} remain")
        extra = data[10:12 + n]
        pos = 12 + n
    return Snac(family, subtype, flags, reqid, extra, data[pos:])


def build_snac(family: int, subtype: int, flags: int, request_id: int, data: bytes, extra: bytes = b"") -> bytes:
    return struct.pack(">HHHI", family, subtype, flags, request_id) + extra + data


# --- ICBM -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Icbm:
    cookie: bytes
    channel: int
    screen_name: str
    warning: int                                # incoming only
    user_info: bytes                            # incoming only: count (2) + the user-info TLVs, as they came
    tlvs: list[tuple[int, bytes]]
    prefix: bytes                               # cookie .. end of user info: kept when rebuilding


def parse_icbm(data: bytes, incoming: bool) -> Icbm:
    if len(data) < 11:
        raise OscarError("short_icbm", f"a {len(data)}-byte ICBM")
    cookie = data[:8]
    channel = struct.unpack_from(">H", data, 8)[0]
    n = data[10]
    if 11 + n > len(data):
        raise OscarError("short_icbm", "the screen name runs past the ICBM")
    name = data[11:11 + n].decode("utf-8", "replace")
    pos = 11 + n
    warning, user_info = 0, b""
    if incoming:
        if pos + 4 > len(data):
            raise OscarError("short_icbm", "an incoming ICBM without warning level and user info")
        warning, count = struct.unpack_from(">HH", data, pos)
        _, used = parse_tlvs(data[pos + 4:], count)
        user_info = data[pos + 2:pos + 4 + used]
        pos += 4 + used
    tlvs, _ = parse_tlvs(data[pos:])
    return Icbm(cookie, channel, name, warning, user_info, tlvs, data[:pos])


@dataclass(frozen=True)
class MessageText:
    text: str               # as decoded (HTML kept)
    charset: int
    subcharset: int


def parse_fragments(data: bytes) -> list[tuple[int, int, bytes]]:
    """The fragments of a channel-1 TLV 0x0002: [(id, version, data)]."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise OscarError("truncated_fragment", "a message fragment header cut short")
        fid, ver, n = struct.unpack_from(">BBH", data, pos)
        if pos + 4 + n > len(data):
            raise OscarError("truncated_fragment", f"a message fragment announcing {n} bytes, "
                                                   f"{len(data) - pos - 4} remain")
        out.append((fid, ver, data[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return out


def decode_text(charset: int, raw: bytes) -> tuple[str, bool]:
    """(text, ok): UCS-2BE for charset 2 (ok False when it is not valid UTF-16), else ISO-8859-1."""
    if charset == CHARSET_UCS2BE:
        try:
            if len(raw) % 2:
                raise UnicodeDecodeError("utf-16-be", raw, len(raw) - 1, len(raw), "odd length")
            return raw.decode("utf-16-be"), True
        except UnicodeDecodeError:
            return raw[:len(raw) - len(raw) % 2].decode("utf-16-be", "replace"), False
    if charset == CHARSET_ASCII:
        try:
            return raw.decode("ascii"), True
        except UnicodeDecodeError:
            return raw.decode("cp1252", "replace"), True     # clients said ASCII and sent Windows code page
    return raw.decode("latin-1"), True


def encode_text(text: str, charset: int) -> tuple[int, bytes]:
    """(charset, bytes) for a rewritten text: the original charset when it can carry the text, else UCS-2BE."""
    if charset in (CHARSET_ASCII, CHARSET_LATIN1):
        try:
            return charset, text.encode("ascii" if charset == CHARSET_ASCII else "latin-1")
        except UnicodeEncodeError:
            pass
    return CHARSET_UCS2BE, text.encode("utf-16-be")


_HTML_TAG = re.compile(r"(?is)<\s*/?\s*(html|body|font|b|i|u|s|a|br|p|span|div|em|strong|sub|sup|big|small|img|hr)"
                       r"\b[^>]*>")
_ANY_TAG = re.compile(r"(?s)<[^<>]*>")


def is_html(text: str) -> bool:
    return bool(_HTML_TAG.search(text))


def strip_html(text: str) -> str:
    """The words a person reads: tags removed (<br> as a line break), entities unescaped."""
    if not is_html(text):
        return text
    text = re.sub(r"(?i)<\s*br\s*/?\s*>", "\n", text)
    return html.unescape(_ANY_TAG.sub("", text))


def message_texts(fragments: list[tuple[int, int, bytes]]) -> list[MessageText]:
    out = []
    for fid, _ver, data in fragments:
        if fid == 0x01 and len(data) >= 4:
            charset, sub = struct.unpack_from(">HH", data)
            text, _ = decode_text(charset, data[4:])
            out.append(MessageText(text, charset, sub))
    return out


def build_text_fragments(text: str, charset: int = CHARSET_ASCII, caps: bytes = b"\x01",
                         subcharset: int = 0) -> bytes:
    charset, raw = encode_text(text, charset)
    return (struct.pack(">BBH", 0x05, 0x01, len(caps)) + caps +
            struct.pack(">BBHHH", 0x01, 0x01, len(raw) + 4, charset, subcharset) + raw)


# --- rendezvous (channel 2) -------------------------------------------------------------------------

@dataclass(frozen=True)
class Rendezvous:
    type: int
    cookie: bytes
    capability: bytes
    tlvs: list[tuple[int, bytes]]

    def _ip(self, t: int) -> str:
        v = tlv(self.tlvs, t)
        return ".".join(str(b) for b in v) if v is not None and len(v) == 4 else ""

    @property
    def proxy_ip(self) -> str:
        return self._ip(0x0002)

    @property
    def client_ip(self) -> str:
        return self._ip(0x0003)

    @property
    def verified_ip(self) -> str:
        return self._ip(0x0004)

    @property
    def port(self) -> int:
        v = tlv(self.tlvs, 0x0005)
        return struct.unpack(">H", v)[0] if v is not None and len(v) == 2 else 0

    @property
    def use_proxy(self) -> bool:
        return tlv(self.tlvs, 0x0010) is not None

    @property
    def request_number(self) -> int:
        v = tlv(self.tlvs, 0x000A)
        return struct.unpack(">H", v)[0] if v is not None and len(v) == 2 else 1

    def file_info(self) -> tuple[str, int, int] | None:
        """(name, total size, file count) from TLV 0x2711, or None."""
        v = tlv(self.tlvs, 0x2711)
        if v is None or len(v) < 8:
            return None
        _multiple, count, size = struct.unpack_from(">HHI", v)
        raw = v[8:].split(b"\x00", 1)[0]
        charset = (tlv(self.tlvs, 0x2712) or b"").decode("ascii", "replace").lower()
        if charset.startswith("utf-16") or charset == "unicode-2-0":
            name = raw.decode("utf-16-be", "replace")
        else:
            name = raw.decode("utf-8" if charset in ("", "utf-8") else "latin-1", "replace")
        return name, size, count


def parse_rendezvous(data: bytes) -> Rendezvous:
    if len(data) < 26:
        raise OscarError("short_rendezvous", f"a {len(data)}-byte rendezvous block (26 at least)")
    rtype = struct.unpack_from(">H", data)[0]
    tlvs, _ = parse_tlvs(data[26:])
    return Rendezvous(rtype, data[2:10], data[10:26], tlvs)


def build_rendezvous(rtype: int, cookie: bytes, capability: bytes, tlvs: list[tuple[int, bytes]]) -> bytes:
    return struct.pack(">H", rtype) + cookie + capability + build_tlvs(tlvs)


# --- OFT --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OftHeader:
    raw: bytes
    type: int
    cookie: bytes
    total_files: int
    files_left: int
    total_size: int
    size: int
    checksum: int
    bytes_received: int
    name: str

    def with_type(self, new_type: int, bytes_received: int | None = None,
                  received_checksum: int | None = None) -> bytes:
        raw = bytearray(self.raw)
        struct.pack_into(">H", raw, 6, new_type)
        if bytes_received is not None:
            struct.pack_into(">I", raw, 60, bytes_received)
        if received_checksum is not None:
            struct.pack_into(">I", raw, 64, received_checksum)
        return bytes(raw)


def parse_oft(raw: bytes) -> OftHeader:
    """An OFT header of `len(raw)` bytes (the length field's value). Raises OscarError when short."""
    if len(raw) < 192 or raw[:3] != b"OFT":
        raise OscarError("bad_oft_header", f"an OFT header of {len(raw)} bytes or without the OFT magic")
    rtype = struct.unpack_from(">H", raw, 6)[0]
    total_files, files_left = struct.unpack_from(">HH", raw, 20)
    total_size, size = struct.unpack_from(">II", raw, 28)
    checksum = struct.unpack_from(">I", raw, 40)[0]
    received = struct.unpack_from(">I", raw, 60)[0]
    encoding = struct.unpack_from(">H", raw, 188)[0]
    name_raw = raw[192:]
    if encoding == CHARSET_UCS2BE:
        end = 0
        while end + 1 < len(name_raw) and name_raw[end:end + 2] != b"\x00\x00":
            end += 2
        name = name_raw[:end].decode("utf-16-be", "replace")
    else:
        name = name_raw.split(b"\x00", 1)[0].decode("latin-1")
    return OftHeader(raw, rtype, raw[8:16], total_files, files_left, total_size, size, checksum, received, name)


def build_oft(rtype: int, cookie: bytes, name: str, size: int, checksum: int = 0xFFFF0000,
              total_files: int = 1, files_left: int = 1, modtime: int = 0) -> bytes:
    """A 256-byte OFT2 header as AIM clients write it (for tests and for the gateway's own answers)."""
    try:
        encoding, raw_name = 0, name.encode("ascii")
    except UnicodeEncodeError:
        encoding, raw_name = CHARSET_UCS2BE, name.encode("utf-16-be")
    raw_name = (raw_name + b"\x00" * 64)[:64]
    head = struct.pack(">4sHH8sHHHHHHIIIIIIIIII", b"OFT2", OFT_HEADER_SIZE, rtype, cookie, 0, 0, total_files,
                       files_left, 1, 1, size, size, modtime, checksum, 0xFFFF0000, 0, 0, 0xFFFF0000, 0,
                       0xFFFF0000)
    head += b"Cool FileXfer".ljust(32, b"\x00") + bytes([0x20, 0x1C, 0x11]) + b"\x00" * 69 + b"\x00" * 16
    head += struct.pack(">HH", encoding, 0) + raw_name
    assert len(head) == OFT_HEADER_SIZE
    return head


def oft_checksum(data: bytes, start: int = 0xFFFF0000) -> int:
    """AIM's OFT running checksum (a 16-bit ones'-complement style sum seeded 0xFFFF0000), for the done header."""
    check = (start >> 16) & 0xFFFF
    for i, b in enumerate(data):
        old = check
        val = b << 8 if i % 2 == 0 else b
        check = (check - val) & 0xFFFFFFFF
        if check > old:
            check = (check - 1) & 0xFFFFFFFF
    check = (check & 0xFFFF) + (check >> 16)
    check = (check & 0xFFFF) + (check >> 16)
    return (check << 16) & 0xFFFFFFFF
