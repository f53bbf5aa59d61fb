"""MSNP (MSN Messenger) framing, MIME payloads, MSNSLP/P2P and MSNFTP: pure, standard library only.

    dec = CommandDecoder()
    dec.feed(b"MSG 95 N 5\\r\\nhel")      -> []
    dec.feed(b"lo")                       -> [Command(raw=b"MSG 95 N 5\\r\\nhello", verb="MSG", args=("95", "N", "5"),
                                                      payload=b"hello")]

Framing (MSNP2..MSNP15, one grammar for the notification server and the switchboard): a command is
one CRLF-terminated line of space-separated words, the verb first (three letters or a three-digit
error code), then usually a transaction id. A *payload command* (MSG, UUX, UBX, ADL, ... see
PAYLOAD_VERBS) ends its line with a decimal byte count and that many payload bytes follow, binary-safe.
Concatenating the `raw` of every event gives back the input byte for byte.

Hostile lengths are bounded: a line longer than `msnp_max_line`, a payload length above
`msnp_max_payload` or one that is not a number is a `FramingError` (fatal: the decoder stops, the
session closes). A payload that never arrives stays pending: on close it is reported as truncated.

Also here, because the session and the MSNFTP side connection share them: the MIME payload of MSG
(`parse_mime`), the 48-byte little-endian P2P header (`P2PHeader`), MSNSLP messages (`parse_slp`),
the file-transfer Context (`parse_file_context`: size at offset 8, UTF-16LE name at offset 20) and
MSNFTP invitations (`text/x-msmsgsinvite`, `parse_invitation`).
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

from imguard.protocols.framing import FrameDecoder, FramingError, is_number, text_encoding  # noqa: F401 (FramingError: part of this module's API)
from imguard.settings import MiB, setting

# Commands whose line ends with a payload length (MSNP2..15; UUN/UBN/GCF/... from MSNP13+).
PAYLOAD_VERBS = frozenset({"MSG", "UUX", "UBX", "ADL", "RML", "FQY", "NOT", "GCF", "UUM", "UBM", "IPG", "QRY",
                           "PAG", "SDG", "NFY", "PUT", "DEL", "UUN", "UBN", "SDC"})

FT_GUID = "{5D3E02AB-6190-11D3-BBBB-00C04F795683}"    # MSNFTP Application-GUID and MSNSLP EUF-GUID (file transfer)
P2P_HEADER_SIZE = 48
P2P_FLAG_ACK = 0x02
P2P_FLAG_DATA = 0x20
P2P_FLAG_FILE_DATA = 0x01000030


@dataclass(frozen=True)
class MsnpLimits:
    """MSNP limits (per connection)."""

    msnp_max_line: int = setting(
        8192, "Longest MSNP command line in bytes (CRLF included). Real lines are well under 2 KiB (presence lines "
              "with an MSN object are the longest); more, or that many bytes without CRLF, is an anomaly and closes.")
    msnp_max_payload: int = setting(
        64 * 1024, "Largest payload length a command (MSG, UBX, ADL, ...) may announce. Switchboard MSGs are at most "
                   "1664 bytes and NS payloads a few KiB; a larger length is an anomaly and closes the connection "
                   "(the gateway will not wait for a payload it cannot bound).")
    msnp_max_held_bytes: int = setting(
        256 * MiB, "Largest file held for inspection (MSNSLP in-band or MSNFTP). An offer announcing more is "
                   "refused with a notice; a transfer that runs past it is stopped: a file is never passed unscanned.")
    msnp_max_transfers: int = setting(
        8, "Most MSNSLP file transfers held at once per switchboard connection; more are refused.")
    msnp_transfer_ttl: float = setting(
        900.0, "Seconds an accepted MSNFTP invitation waits for its data connection (the receiver connects "
               "right after ACCEPT; a person may take minutes to accept).")
    msnp_max_anomalies_per_kind: int = setting(
        20, "Anomaly events of one kind recorded per MSNP connection; later ones are only counted.")


# --- events -----------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Command:
    """One MSNP command. `raw` is exactly what came on the wire (line, CRLF and payload)."""
    raw: bytes
    verb: str
    args: tuple[str, ...] = ()
    payload: bytes | None = None        # None: not a payload command

    @property
    def trid(self) -> str:
        return self.args[0] if self.args else ""

    @property
    def line(self) -> bytes:
        """The command line without its payload (CRLF included)."""
        return self.raw[:len(self.raw) - len(self.payload or b"")]


class CommandDecoder(FrameDecoder):
    """One direction of an MSNP connection: bytes in, Commands out (see the module docstring)."""

    def __init__(self, limits: MsnpLimits = MsnpLimits()):
        super().__init__(limits)

    def next_frame(self, buf: bytearray, pos: int) -> tuple[Command, int] | None:
        end = buf.find(b"\n", pos, pos + self.limits.msnp_max_line)
        if end < 0:
            if len(buf) - pos >= self.limits.msnp_max_line:
                raise self.failure("line_too_long", f"an MSNP line over {self.limits.msnp_max_line} bytes",
                                   len(buf) - pos)
            return None
        line = bytes(buf[pos:end + 1])
        words = line.rstrip(b"\r\n").decode("utf-8", "replace").split(" ")
        verb = words[0].upper() if words else ""
        args = tuple(w for w in words[1:] if w != "")
        if verb not in PAYLOAD_VERBS or not args:
            return Command(line, verb, args), end + 1
        if not is_number(args[-1]):
            if verb == "MSG":
                raise self.failure("bad_payload_length", f"MSG with payload length {args[-1][:20]!r}", len(line))
            return Command(line, verb, args), end + 1        # a reply without payload ("ADL 12 OK")
        length = int(args[-1])
        if length > self.limits.msnp_max_payload:
            raise self.failure("payload_too_large", f"{verb} announces a {length}-byte payload "
                               f"(limit {self.limits.msnp_max_payload})", length)
        if len(buf) - (end + 1) < length:
            return None                                         # wait for the payload
        payload = bytes(buf[end + 1:end + 1 + length])
        return Command(line + payload, verb, args, payload), end + 1 + length


def format_command(verb: str, *args: str, payload: bytes | None = None) -> bytes:
    """A command line (with its payload and length when `payload` is given)."""
    words = [verb, *args]
    if payload is not None:
        words.append(str(len(payload)))
    return " ".join(words).encode("utf-8") + b"\r\n" + (payload or b"")


# --- MIME payloads ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mime:
    headers: tuple[tuple[str, str], ...]
    body: bytes
    head: bytes                 # the header block, CRLFCRLF included, as it came

    def get(self, name: str, default: str = "") -> str:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    @property
    def content_type(self) -> str:
        return self.get("Content-Type").split(";", 1)[0].strip().lower()

    @property
    def charset(self) -> str:
        for part in self.get("Content-Type").split(";")[1:]:
            k, _, v = part.strip().partition("=")
            if k.strip().lower() == "charset":
                return v.strip().strip('"') or "utf-8"
        return "utf-8"


def parse_headers(block: str) -> tuple[tuple[str, str], ...]:
    out = []
    for line in block.split("\r\n"):
        if ":" in line:
            k, _, v = line.partition(":")
            out.append((k.strip(), v.strip()))
    return tuple(out)


def parse_mime(payload: bytes) -> Mime:
    """MIME headers + blank line + body (a payload without the blank line is all headers)."""
    sep = payload.find(b"\r\n\r\n")
    if sep < 0:
        head, body = payload, b""
    else:
        head, body = payload[:sep + 4], payload[sep + 4:]
    return Mime(parse_headers(head.decode("utf-8", "replace")), body, head)


def decode_body(body: bytes, charset: str) -> tuple[str, str]:
    """(text, encoding used): the announced charset, else latin-1 (never fails)."""
    encoding = text_encoding(charset)
    if encoding is not None:
        try:
            return body.decode(encoding), charset
        except ValueError:              # UnicodeDecodeError, and what odd codecs raise
            pass
    return body.decode("latin-1"), "latin-1"


# --- MSNFTP invitations (text/x-msmsgsinvite) -------------------------------------------------------

@dataclass(frozen=True)
class Invitation:
    command: str            # INVITE, ACCEPT, CANCEL
    cookie: str             # Invitation-Cookie
    guid: str = ""
    name: str = ""
    size: int | None = None
    addresses: tuple[tuple[str, int], ...] = ()     # IP-Address/Port and the -Internal/PortX variants
    auth_cookie: str = ""
    sender_connect: bool = False                    # Sender-Connect: TRUE (the receiver listens)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def is_file_transfer(self) -> bool:
        return self.guid.upper() == FT_GUID


def parse_invitation(body: bytes) -> Invitation:
    h = dict((k.lower(), v) for k, v in parse_headers(body.decode("utf-8", "replace")))
    size = h.get("application-filesize", "")
    addresses = []
    for ip_key, port_keys in (("ip-address", ("port", "portx")),
                              ("ip-address-internal", ("port", "portx-internal", "portx"))):
        ip = h.get(ip_key, "")
        if not ip:
            continue
        for pk in port_keys:
            if is_number(h.get(pk, "")) and 0 < int(h[pk]) < 65536 and (ip, int(h[pk])) not in addresses:
                addresses.append((ip, int(h[pk])))
    return Invitation(command=h.get("invitation-command", "").upper(), cookie=h.get("invitation-cookie", ""),
                      guid=h.get("application-guid", ""), name=h.get("application-file", ""),
                      size=int(size) if is_number(size) else None, addresses=tuple(addresses),
                      auth_cookie=h.get("authcookie", ""),
                      sender_connect=h.get("sender-connect", "").upper() == "TRUE",
                      headers=parse_headers(body.decode("utf-8", "replace")))


# --- MSNSLP / P2P ---------------------------------------------------------------------------------

_P2P = struct.Struct("<IIQQIIIIQ")


@dataclass(frozen=True)
class P2PHeader:
    """The 48-byte binary header of an application/x-msnmsgrp2p payload (little-endian)."""
    session_id: int
    identifier: int
    offset: int
    total_size: int
    length: int
    flags: int
    ack_id: int = 0
    ack_unique_id: int = 0
    ack_size: int = 0

    def pack(self) -> bytes:
        return _P2P.pack(self.session_id, self.identifier, self.offset, self.total_size, self.length,
                         self.flags, self.ack_id, self.ack_unique_id, self.ack_size)

    @classmethod
    def unpack(cls, data: bytes) -> "P2PHeader":
        return cls(*_P2P.unpack_from(data))


@dataclass(frozen=True)
class P2PMessage:
    header: P2PHeader
    data: bytes             # the chunk (header.length bytes)
    footer: int             # the big-endian AppID after the chunk (0 signalling, 1 MSN object, 2 file)


class P2PError(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def parse_p2p(body: bytes) -> P2PMessage:
    """The binary part of an application/x-msnmsgrp2p MSG: header, chunk, footer."""
    if len(body) < P2P_HEADER_SIZE:
        raise P2PError("p2p_truncated", f"a {len(body)}-byte P2P body (the header alone is 48)")
    header = P2PHeader.unpack(body)
    data = body[P2P_HEADER_SIZE:]
    if header.length > len(data):
        raise P2PError("p2p_truncated", f"a P2P chunk announcing {header.length} bytes carries {len(data)}")
    if header.offset + header.length > header.total_size:
        raise P2PError("p2p_bad_offset", f"a P2P chunk at {header.offset}+{header.length} past the total "
                                         f"size {header.total_size}")
    chunk = data[:header.length]
    rest = data[header.length:]
    footer = struct.unpack(">I", rest[:4])[0] if len(rest) >= 4 else 0
    return P2PMessage(header, chunk, footer)


def build_p2p(header: P2PHeader, chunk: bytes, footer: int = 0) -> bytes:
    return header.pack() + chunk + struct.pack(">I", footer)


@dataclass(frozen=True)
class SlpMessage:
    start_line: str                               # "INVITE MSNMSGR:bob@x MSNSLP/1.0" or "MSNSLP/1.0 200 OK"
    headers: tuple[tuple[str, str], ...]
    body_headers: tuple[tuple[str, str], ...]     # the key: value lines of the body

    def get(self, name: str, default: str = "") -> str:
        for k, v in self.headers + self.body_headers:
            if k.lower() == name.lower():
                return v
        return default

    @property
    def method(self) -> str:
        return self.start_line.split(" ", 1)[0].upper()


def parse_slp(chunk: bytes) -> SlpMessage | None:
    """An MSNSLP message (SIP-like text, NUL-terminated) or None when the chunk is not one."""
    text = chunk.rstrip(b"\x00").decode("utf-8", "replace")
    if "MSNSLP/1.0" not in text.split("\r\n", 1)[0]:
        return None
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    return SlpMessage(lines[0], parse_headers("\r\n".join(lines[1:])), parse_headers(body))


def parse_file_context(context_b64: str) -> tuple[str, int]:
    """(file name, size) from the base64 Context of a file-transfer INVITE (MsnFileContext: length (4),
    version (4), file size (8, LE) at offset 8, type (4), UTF-16LE name at offset 20, 520 bytes, NUL-padded).
    Raises P2PError on bad base64 or a short context; a name that is not UTF-16 is decoded with replacement."""
    try:
        raw = base64.b64decode(context_b64.strip(), validate=False)
    except (binascii.Error, ValueError) as e:
        raise P2PError("bad_context", f"the file-transfer Context is not base64: {e}") from None
    if len(raw) < 20:
        raise P2PError("bad_context", f"a {len(raw)}-byte file-transfer Context (at least 20 expected)")
    size = struct.unpack_from("<Q", raw, 8)[0]
    name_raw = raw[20:20 + 520]
    end = 0
    while end + 1 < len(name_raw) and name_raw[end:end + 2] != b"\x00\x00":
        end += 2
    name_raw = name_raw[:end]
    try:
        name = name_raw.decode("utf-16-le")
    except UnicodeDecodeError:
        raise P2PError("bad_utf16", "the file name in the Context is not valid UTF-16") from None
    return name, size


def build_file_context(name: str, size: int) -> bytes:
    """A Context as a client writes it (for tests and for notices); no preview."""
    name_raw = name.encode("utf-16-le")[:518]
    name_raw += b"\x00" * (520 - len(name_raw))
    return struct.pack("<IIQI", 574, 2, size, 0) + name_raw + b"\xff" * 30 + struct.pack("<I", 0)
