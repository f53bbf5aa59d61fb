"""What the framers of the legacy binary and line protocols share (OSCAR FLAP, YMSG, MSNP): bytes in,
frames out, byte-exact, a fatal `FramingError` when the stream cannot be framed any more.

    class FlapDecoder(FrameDecoder):
        def next_frame(self, buf, pos):          # one frame at buf[pos:], or None while it is incomplete
            ...
            if bad: raise self.failure("bad_flap_start", "...")
            return Flap(raw, ...), pos + 6 + length

`feed(data)` returns every complete frame and keeps the rest for the next call (`pending`, which a session
reports as truncated when the connection closes). After a FramingError the decoder is dead: later feeds
return nothing, and what it was holding is dropped. Sans-io, standard library only.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any


def text_encoding(name: str) -> str | None:
    """The codec for a charset a peer names, when it is a text encoding Python has; None for anything else (an
    unknown name, one with a NUL, a bytes-to-bytes codec such as base64 or zlib)."""
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None
    return info.name if getattr(info, "_is_text_encoding", True) else None


def is_number(text: str) -> bool:
    """ASCII decimal digits only. (str.isdigit() is also true for '²', which int() rejects, and for '٣', which
    int() reads as 3: a peer's length or port must be the digits it looks like.)"""
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class FramingError:
    """The stream cannot be framed any more (fatal): `kind` names the anomaly, `size` the offending length."""
    kind: str
    detail: str
    size: int = 0


class Unframeable(Exception):
    """Raised by next_frame: the stream ends here (carries the FramingError that feed returns)."""

    def __init__(self, error: FramingError):
        super().__init__(error.detail)
        self.error = error


class FrameDecoder:
    """One direction of a framed connection. Subclasses implement next_frame()."""

    def __init__(self, limits: Any):
        self.limits = limits
        self._buf = bytearray()
        self.dead = False

    @property
    def pending(self) -> bytes:
        """Bytes received that do not make a complete frame yet."""
        return bytes(self._buf)

    def next_frame(self, buf: bytearray, pos: int) -> tuple[Any, int] | None:
        """The frame that starts at buf[pos] and the position after it; None while it is incomplete.
        Raises Unframeable (see failure()) when the bytes there cannot start a frame."""
        raise NotImplementedError

    @staticmethod
    def failure(kind: str, detail: str, size: int = 0) -> Unframeable:
        return Unframeable(FramingError(kind, detail, size))

    def feed(self, data: bytes) -> list:
        if self.dead:
            return []
        self._buf += data
        buf, pos = self._buf, 0
        frames: list = []
        try:
            while pos < len(buf):
                found = self.next_frame(buf, pos)
                if found is None:
                    break
                frame, pos = found
                frames.append(frame)
        except Unframeable as e:
            self.dead = True
            frames.append(e.error)
        if self.dead:
            self._buf.clear()
        else:
            del buf[:pos]
        return frames
