"""WebSocket messages in a capture (RFC 6455), for the chat sockets the replay decodes (replay/http.py).

Pure and sans-io, one reader per direction: bytes in, whole messages out. A client's frames are masked (5.3), a
server's are not; a message is its first frame (opcode text or binary) and its continuations (5.4); control frames
(close, ping, pong) may come between and are passed on as they are. permessage-deflate (RFC 7692), when the
server's 101 agreed to it: a message whose first frame has RSV1 set is inflated as raw DEFLATE with 00 00 ff ff
appended (7.2.2), through one inflater per direction unless that direction has no context takeover. This is what
mitmproxy's WebSocket layer (wsproto) gives the gateway's chat carrier: whole messages, unmasked and inflated.
A message larger than `max_message` is kept only up to that bound (the carrier then refuses it as too large).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


@dataclass(frozen=True)
class Deflate:
    """What permessage-deflate the server accepted (Sec-WebSocket-Extensions of its 101)."""
    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15

    @classmethod
    def negotiated(cls, header: str) -> "Deflate | None":
        for offer in header.split(","):
            params = [p.strip().lower() for p in offer.split(";")]
            if params[0] != "permessage-deflate":
                continue
            found: dict = {}
            for param in params[1:]:
                name, _, value = param.partition("=")
                value = value.strip('"')
                if name in ("server_no_context_takeover", "client_no_context_takeover"):
                    found[name] = True
                elif name in ("server_max_window_bits", "client_max_window_bits") and value.isdigit():
                    found[name] = int(value)
            return cls(**found)
        return None


@dataclass(frozen=True)
class WsMessage:
    opcode: int             # TEXT or BINARY
    payload: bytes          # unmasked, inflated
    wire: bytes             # the frames as they crossed
    cut: bool = False       # over max_message: payload holds its first bytes only


@dataclass(frozen=True)
class WsControl:
    opcode: int
    wire: bytes


@dataclass(frozen=True)
class WsError:
    detail: str
    wire: bytes


class WsReader:
    """One direction of a WebSocket: frames in, WsMessage / WsControl / WsError out."""

    def __init__(self, from_client: bool, deflate: Deflate | None = None, max_message: int = 64 * 1024 * 1024):
        self.from_client = from_client
        self.max_message = max_message
        self.deflate = deflate
        bits = 15
        self.reset_inflater = False
        if deflate is not None:
            bits = deflate.client_max_window_bits if from_client else deflate.server_max_window_bits
            self.reset_inflater = deflate.client_no_context_takeover if from_client else \
                deflate.server_no_context_takeover
        self.window_bits = max(9, min(15, bits))
        self.inflater = zlib.decompressobj(-self.window_bits)
        self.buf = bytearray()
        self.parts: list[bytes] = []
        self.size = 0
        self.wire = bytearray()
        self.opcode = 0
        self.compressed = False
        self.broken = False

    def feed(self, data: bytes) -> list:
        if self.broken:
            return [WsError("the stream could not be followed", bytes(data))]
        self.buf += data
        out = []
        while True:
            frame = self._frame()
            if frame is None:
                return out
            out += frame

    def _frame(self) -> list | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        fin, rsv1, opcode = buf[0] & 0x80, buf[0] & 0x40, buf[0] & 0x0F
        masked, length, at = buf[1] & 0x80, buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, at = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, at = int.from_bytes(buf[2:10], "big"), 10
        key = b""
        if masked:
            if len(buf) < at + 4:
                return None
            key, at = bytes(buf[at:at + 4]), at + 4
        if len(buf) < at + length:
            return None
        wire = bytes(buf[:at + length])
        payload = bytes(buf[at:at + length])
        del buf[:at + length]
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if len(payload) < 256 else \
                _unmask(payload, key)
        if opcode >= 0x8:
            return [WsControl(opcode, wire)]
        if opcode in (TEXT, BINARY):
            self.parts, self.size, self.wire = [], 0, bytearray()
            self.opcode, self.compressed = opcode, bool(rsv1) and self.deflate is not None
        elif opcode != 0 or not self.opcode:
            self.broken = True
            return [WsError(f"an unexpected frame (opcode {opcode:#x})", wire + bytes(buf))]
        self.wire += wire
        if self.size <= self.max_message:
            self.parts.append(payload)
            self.size += len(payload)
        if not fin:
            return []
        return [self._message()]

    def _message(self) -> WsMessage | WsError:
        data, opcode, wire = b"".join(self.parts), self.opcode, bytes(self.wire)
        self.parts, self.size, self.opcode, self.wire = [], 0, 0, bytearray()
        cut = len(data) > self.max_message
        if self.compressed:
            if self.reset_inflater:
                self.inflater = zlib.decompressobj(-self.window_bits)
            try:
                data = self.inflater.decompress(data + b"\x00\x00\xff\xff", self.max_message + 1)
            except zlib.error as e:
                self.broken = True
                return WsError(f"a compressed message could not be inflated ({e})", wire)
            cut = cut or bool(self.inflater.unconsumed_tail)
            try:
                while self.inflater.unconsumed_tail:    # over the bound: the rest is inflated and thrown away
                    self.inflater.decompress(self.inflater.unconsumed_tail, 1 << 20)
            except zlib.error as e:
                self.broken = True
                return WsError(f"a compressed message could not be inflated ({e})", wire)
        return WsMessage(opcode, data, wire, cut)


def _unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (what imguard sends towards a client)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    return head + payload
