"""The Sametime Community protocol ("VP", TCP 1533): framing and message structures. Sans-io, standard library only.

What is read follows the structures of libmeanwhile (the library libpurple's Sametime plugin uses; its
mw_message.c, mw_common.c, srvc_im.c, srvc_conf.c) and tshark's `sametime` dissector, checked against the bytes
of a real client (Finch, tests/data/sametime/). All integers are big-endian.

    frame      = length:uint32 message           (length of the message; a single byte with the top bit set is a
                                                  keepalive, sent between frames)
    message    = type:uint16 options:uint16 channel:uint32 [attribs:opaque if options & HAS_ATTRIBS] body
    string     = length:uint16 utf-8 bytes;   opaque = length:uint32 bytes;   boolean = one byte
    login info = login_id:string type:uint16 user_id:string user_name:string community:string full:boolean
                 [desc:string ip:uint32 server_id:string if full]
    HANDSHAKE 0x0000    major:uint16 minor:uint16 ...
    LOGIN 0x0001        login_type:uint16 name:string ...              (who logs in: the client's word)
    LOGIN_ACK 0x8001    login info                                     (who the server says it is)
    CHANNEL_CREATE 0x0002  reserved:uint32 channel:uint32 target:(user:string community:string) service:uint32
                        proto_type:uint32 proto_ver:uint32 options:uint32 addtl:opaque creator_flag:boolean
                        [creator: login info] encrypt offer (mode:uint16 size:uint32 count:uint32
                        (cipher:uint16 info:opaque)* extra:uint16 flag:boolean)
    CHANNEL_ACCEPT 0x0006  service:uint32 proto_type:uint32 proto_ver:uint32 addtl:opaque acceptor_flag:boolean
                        [acceptor: login info] encrypt accept (mode:uint16 size:uint32 cipher:uint16 info:opaque
                        extra:uint16 flag:boolean)
    CHANNEL_SEND 0x0004 send_type:uint16 data:opaque                   (data encrypted when options & ENCRYPT:
                                                                        cipher.py)
    CHANNEL_DESTROY 0x0003  reason:uint32 data:opaque
IM service (0x00001000), send type 0x0064:
    im_type:uint32 1 (text) text:string | 2 (data) data_type:uint32 subtype:uint32 data:opaque
                                         (data_type 1 typing, 4 an HTML message: the text Finch sends)
Conference service (0x80000010): the create's addtl is name:string title:string; send types
    0x00 WELCOME name:string title:string our_id:uint32 count:uint32 (member_id:uint32 login info)*
    0x02 JOIN member_id:uint32 login info;  0x03 PART member_id:uint32
    0x04 MESSAGE the client's: text:string; the server's: member_id:uint32 text:string
File transfer service (0x00000038, libmeanwhile's srvc_ft.c): the create's addtl is
    unknown:uint32 file_name:string message:string size:uint32 unknown:uint32 unknown:uint16; the creator sends the
    file on that channel, send type 0x0001 TRANSFER (data: a chunk of the file), one chunk at a time: the receiver
    answers each with 0x0002 RECEIVED (empty data, never encrypted), and the sender sends its next chunk only then.
    After the RECEIVED of the last chunk the sender destroys the channel (reason 0, success); a receiver that
    declines destroys it with reason 0x08000606 (rejected).
"""

from __future__ import annotations

import html
import re
import struct
from dataclasses import dataclass

from imguard.settings import KiB, MiB, setting

# message types
HANDSHAKE = 0x0000
HANDSHAKE_ACK = 0x8000
LOGIN = 0x0001
LOGIN_ACK = 0x8001
CHANNEL_CREATE = 0x0002
CHANNEL_DESTROY = 0x0003
CHANNEL_SEND = 0x0004
CHANNEL_ACCEPT = 0x0006
# options
ENCRYPT = 0x4000
HAS_ATTRIBS = 0x8000
# services
SERVICE_IM = 0x00001000
SERVICE_CONFERENCE = 0x80000010
SERVICE_FILE_TRANSFER = 0x00000038
# IM
IM_MESSAGE = 0x0064
IM_TEXT = 1
IM_DATA = 2
IM_DATA_TYPING = 1
IM_DATA_HTML = 4
# conference send types
CONF_WELCOME, CONF_INVITE, CONF_JOIN, CONF_PART, CONF_MESSAGE = 0x00, 0x01, 0x02, 0x03, 0x04

# file-transfer send types, and channel-destroy reasons
FT_TRANSFER = 0x0001
FT_RECEIVED = 0x0002
FT_SUCCESS = 0x00000000
FT_REJECTED = 0x08000606

KEEPALIVE = 0x80


@dataclass(frozen=True)
class SametimeLimits:
    """Sametime (Community protocol) limits (per connection)"""

    sametime_max_message_size: int = setting(
        256 * KiB, "Largest Sametime message (one frame); a larger length closes the connection with an anomaly "
                   "(a client's messages are far smaller; a file's bytes come in chunks of a few KiB)")
    sametime_max_channels: int = setting(
        1_000, "Channels remembered per connection (each IM conversation, conference and file transfer is one); "
               "past it a new channel is refused and an anomaly recorded")
    sametime_max_held_bytes: int = setting(
        256 * MiB, "Largest Sametime file transfer held for inspection; one announcing more, or running past it, is "
                   "stopped before its receiver gets a byte (fail closed), its sender told")
    sametime_max_transfers: int = setting(
        8, "Sametime file transfers held at once per connection; the bytes they hold together are bounded by this "
           "times sametime_max_held_bytes (and by max_total_held_bytes)")
    sametime_intercept_rc2_128: bool = setting(
        True, "Read Sametime channels encrypted with RC2/128 by giving each leg the gateway's own Diffie-Hellman key "
              "(the public keys in a channel's create and accept are swapped, as TLS interception swaps "
              "certificates); off (--no-sametime-intercept-rc2-128), the create and accept cross unchanged and such "
              "a channel is an encrypted_channel anomaly, decided on empty text. RC2/40 channels are read either way "
              "(their keys are the login ids on the wire)")
    sametime_max_anomalies_per_kind: int = setting(
        20, "Anomalies recorded per kind per connection; more are counted, not logged")


class DecodeError(ValueError):
    """A structure does not fit its bytes (the peer's fault)."""


class Reader:
    """Reads meanwhile's types from a message body."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError(f"{n} bytes wanted at offset {self.pos}, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def boolean(self) -> bool:
        return self.take(1) != b"\x00"

    def string(self) -> str:
        return self.take(self.u16()).decode("utf-8", "replace")

    def opaque(self) -> bytes:
        return self.take(self.u32())

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def put_string(text: str) -> bytes:
    data = text.encode("utf-8")[:0xFFFF]
    return struct.pack(">H", len(data)) + data


def put_opaque(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass(frozen=True)
class Message:
    """One Sametime message: its header, its body (after the attributes) and its exact bytes (frame included)."""
    type: int
    options: int
    channel: int
    body: bytes
    raw: bytes
    attribs: bytes = b""

    @property
    def encrypted(self) -> bool:
        return bool(self.options & ENCRYPT)


@dataclass(frozen=True)
class FramingError:
    kind: str
    detail: str
    size: int = 0


def build_message(type_: int, channel: int, body: bytes, options: int = 0) -> bytes:
    """A frame: the length, the header (no attributes), the body."""
    data = struct.pack(">HHI", type_, options & ~HAS_ATTRIBS, channel) + body
    return struct.pack(">I", len(data)) + data


def rebuild(msg: Message, body: bytes) -> bytes:
    """`msg` with a new body: its header and attributes kept, the length recomputed."""
    head = struct.pack(">HHI", msg.type, msg.options, msg.channel)
    if msg.options & HAS_ATTRIBS:
        head += put_opaque(msg.attribs)
    data = head + body
    return struct.pack(">I", len(data)) + data


class FrameDecoder:
    """Bytes in, Message / FramingError out, byte-exact (keepalive bytes are handed on as Keepalive raw bytes)."""

    def __init__(self, limits: SametimeLimits = SametimeLimits()):
        self.limits = limits
        self._buf = bytearray()
        self.failed = False

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> list:
        if self.failed:
            return []
        self._buf += data
        out: list = []
        while self._buf:
            if self._buf[0] & KEEPALIVE:
                out.append(bytes(self._buf[:1]))
                del self._buf[:1]
                continue
            if len(self._buf) < 4:
                break
            length = struct.unpack(">I", self._buf[:4])[0]
            if length > self.limits.sametime_max_message_size:
                self.failed = True
                out.append(FramingError("message_too_large", f"a Sametime message of {length} bytes (more than "
                                        f"sametime_max_message_size {self.limits.sametime_max_message_size})",
                                        length))
                break
            if length < 8:
                self.failed = True
                out.append(FramingError("bad_header", f"a Sametime message of {length} bytes has no header", length))
                break
            if len(self._buf) < 4 + length:
                break
            raw = bytes(self._buf[:4 + length])
            del self._buf[:4 + length]
            type_, options, channel = struct.unpack(">HHI", raw[4:12])
            attribs, start = b"", 12
            if options & HAS_ATTRIBS:
                r = Reader(raw, 12)
                try:
                    attribs = r.opaque()
                except DecodeError:
                    self.failed = True
                    out.append(FramingError("bad_header", "the attributes run past the message", length))
                    break
                start = r.pos
            out.append(Message(type_, options, channel, raw[start:], raw, attribs))
        return out


# --- structures ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoginInfo:
    login_id: str
    user_id: str
    user_name: str
    community: str


def read_login_info(r: Reader) -> LoginInfo:
    login_id = r.string()
    r.u16()
    user_id, user_name, community = r.string(), r.string(), r.string()
    if r.boolean():
        r.string()
        r.u32()
        r.string()
    return LoginInfo(login_id, user_id, user_name, community)


def login_name(body: bytes) -> str:
    """LOGIN: the name the client logs in with."""
    r = Reader(body)
    r.u16()
    return r.string()


def login_ack_user(body: bytes) -> LoginInfo:
    return read_login_info(Reader(body))


@dataclass(frozen=True)
class EncryptItem:
    """One cipher of an encrypt offer or accept: its id (cipher.RC2_40, RC2_128) and info (RC2/128: the party's
    Diffie-Hellman public key); `at` is where the info's length field is in the message body."""
    cipher: int
    info: bytes
    at: int


@dataclass(frozen=True)
class Encrypt:
    """The encryption block of a CHANNEL_CREATE (the creator's offer: its ciphers) or CHANNEL_ACCEPT (the
    acceptor's choice: one cipher); `length_at` is where its opaque's length is in the body (-1: no opaque)."""
    mode: int = 0
    items: tuple[EncryptItem, ...] = ()
    length_at: int = -1

    def item(self, cipher: int) -> EncryptItem | None:
        return next((i for i in self.items if i.cipher == cipher), None)


def _encrypt_item(r: Reader) -> EncryptItem:
    cipher = r.u16()
    at = r.pos
    return EncryptItem(cipher, r.opaque(), at)


def read_encrypt(r: Reader, offer: bool) -> Encrypt:
    """meanwhile's encrypt offer (mode, then an opaque of count:uint32 items extra:uint16 flag:boolean) or accept
    (mode, then an opaque of one item extra flag); the opaque's contents are read in place, as libmeanwhile does
    (an offer's opaque under 7 bytes, an accept's under 6, carries no item). A block that does not fit gives its
    mode and no cipher: the channel is still followed, and what it encrypts is not read."""
    if r.left < 2:
        return Encrypt()
    mode = r.u16()
    if r.left < 4:
        return Encrypt(mode)
    length_at = r.pos
    try:
        size = r.u32()
        if size > r.left:
            raise DecodeError(f"an encrypt block of {size} bytes, {r.left} left")
        items: list[EncryptItem] = []
        if offer and size >= 7:
            count = r.u32()
            if count > r.left // 6:
                raise DecodeError(f"an encrypt offer of {count} ciphers in {r.left} bytes")
            items = [_encrypt_item(r) for _ in range(count)]
        elif not offer and size >= 6:
            items = [_encrypt_item(r)]
    except DecodeError:
        return Encrypt(mode)
    return Encrypt(mode, tuple(items), length_at)


def replace_encrypt_info(body: bytes, encrypt: Encrypt, item: EncryptItem, info: bytes) -> bytes:
    """`body` with `item`'s info replaced by `info`, the encrypt block's length fixed."""
    end = item.at + 4 + len(item.info)
    out = bytearray(body[:item.at] + put_opaque(info) + body[end:])
    delta = len(info) - len(item.info)
    if encrypt.length_at >= 0:
        size = struct.unpack_from(">I", body, encrypt.length_at)[0]
        struct.pack_into(">I", out, encrypt.length_at, size + delta)
    return bytes(out)


@dataclass(frozen=True)
class ChannelCreate:
    channel: int
    target: str                 # the user the channel is opened to (its id block's user)
    service: int
    addtl: bytes
    creator: LoginInfo | None
    encrypt: Encrypt

    @property
    def encrypt_mode(self) -> int:
        return self.encrypt.mode


def read_channel_create(body: bytes) -> ChannelCreate:
    r = Reader(body)
    r.u32()
    channel = r.u32()
    target = r.string()
    r.string()                  # community
    service = r.u32()
    r.u32()
    r.u32()
    r.u32()
    addtl = r.opaque()
    creator = read_login_info(r) if r.boolean() else None
    return ChannelCreate(channel, target, service, addtl, creator, read_encrypt(r, offer=True))


def read_channel_accept(body: bytes) -> tuple[int, LoginInfo | None, Encrypt]:
    """(service, acceptor, its encryption: the mode and the cipher chosen)."""
    r = Reader(body)
    service = r.u32()
    r.u32()
    r.u32()
    r.opaque()
    acceptor = read_login_info(r) if r.boolean() else None
    return service, acceptor, read_encrypt(r, offer=False)


def read_send(body: bytes) -> tuple[int, bytes]:
    """CHANNEL_SEND: (send type, data)."""
    r = Reader(body)
    return r.u16(), r.opaque()


_TAG = re.compile(r"<[^>]*>")


def html_text(markup: str) -> str:
    """An HTML IM as policy reads it: tags dropped (a <br> is a line break), entities resolved."""
    return html.unescape(_TAG.sub("", re.sub(r"(?i)<br\s*/?>", "\n", markup)))


@dataclass(frozen=True)
class ImText:
    """An IM channel's message: its text for policy, and how to rebuild the data with other text."""
    text: str
    kind: str                   # "text" or "html"


def read_im(data: bytes) -> ImText | None:
    """The data of an IM channel's send type 0x0064: the text (None: typing and other data)."""
    r = Reader(data)
    im_type = r.u32()
    if im_type == IM_TEXT:
        return ImText(r.string(), "text")
    if im_type == IM_DATA:
        data_type = r.u32()
        r.u32()
        if data_type == IM_DATA_HTML:
            return ImText(html_text(r.opaque().decode("utf-8", "replace")), "html")
    return None


def write_im(kind: str, text: str) -> bytes:
    """The data of an IM message carrying `text` (an HTML one escaped)."""
    if kind == "html":
        return struct.pack(">III", IM_DATA, IM_DATA_HTML, 0) + put_opaque(html.escape(text, quote=False).encode())
    return struct.pack(">I", IM_TEXT) + put_string(text)


def conference_name(addtl: bytes) -> str:
    try:
        return Reader(addtl).string()
    except DecodeError:
        return ""


def file_offer(addtl: bytes) -> tuple[str, int]:
    """A file-transfer channel's (file name, size)."""
    r = Reader(addtl)
    r.u32()
    name = r.string()
    r.string()
    return name, r.u32()


def put_login_info(user_id: str, user_name: str, community: str = "") -> bytes:
    """A short login info (not `full`): as a server names a channel's creator."""
    return put_string(user_id) + struct.pack(">H", 0x1003) + put_string(user_id) + put_string(user_name) \
        + put_string(community) + b"\x00"


def channel_destroy(channel: int, reason: int) -> bytes:
    """CHANNEL_DESTROY of `channel` with `reason` and no data."""
    return build_message(CHANNEL_DESTROY, channel, struct.pack(">I", reason) + put_opaque(b""))


def ft_received(channel: int) -> bytes:
    """The file receiver's RECEIVED for one chunk (what libmeanwhile's mwFileTransfer_ack sends)."""
    return build_message(CHANNEL_SEND, channel, struct.pack(">H", FT_RECEIVED) + put_opaque(b""))


def im_channel_create(channel: int, target: str, creator: LoginInfo) -> bytes:
    """A server's CHANNEL_CREATE of an IM channel from `creator` to `target`, unencrypted (as a Sametime server
    relays one: service, protocol type 0x1000 and version 3, the IM addtl of a plain client)."""
    body = struct.pack(">II", 0, channel) + put_string(target) + put_string("") \
        + struct.pack(">IIII", SERVICE_IM, SERVICE_IM, 3, 0) + put_opaque(struct.pack(">II", 1, 1)) \
        + b"\x01" + put_login_info(creator.user_id, creator.user_name, creator.community) + struct.pack(">HI", 0, 0)
    return build_message(CHANNEL_CREATE, 0, body)
