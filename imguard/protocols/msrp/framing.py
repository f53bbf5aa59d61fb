"""MSRP framing (RFC 4975 §5.1, §7, ABNF §9): chunks in, chunks out. Sans-io, standard library only.

    decoder = MsrpDecoder(MsrpLimits())
    decoder.feed(b"MSRP a786hjs2 SEND\\r\\nTo-Path: ...\\r\\n\\r\\nHey Bob\\r\\n-------a786hjs2$\\r\\n")
        -> [MsrpChunk(tid="a786hjs2", method="SEND", body=b"Hey Bob", flag="$", ...)]

A chunk is `MSRP <tid> <METHOD>` (or `MSRP <tid> <code> [comment]` for a response), header lines, optionally an
empty line and a body, and the end line `-------<tid>` + flag (`$` complete, `+` more chunks follow, `#`
aborted). There is no length: the body ends where the end line starts, so the decoder scans for
`\\r\\n-------<tid>` (resuming where it stopped, not from the start, as bytes trickle in). A chunk longer than
`msrp_max_chunk_size` without its end line, or a start line that is not MSRP, is an `MsrpFramingError`:
the stream cannot be framed any more and the session closes it.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from imguard.settings import KiB, MiB, setting

FLAGS = b"$+#"
COMPLETE, CONTINUED, ABORTED = "$", "+", "#"

STATUS_TEXT = {200: "OK", 400: "Unintelligible", 403: "Action-not-allowed", 408: "Timeout",
               413: "Stop-sending-message", 415: "MIME-not-understood", 423: "Parameter-out-of-bounds",
               481: "Session-does-not-exist", 501: "Request-method-not-understood", 506: "Session-already-in-use"}

# RFC 4975 §9: ident = ALPHANUM 3*31ident-char. Shorter ids are accepted (seen in the wild, harmless); the
# characters are not relaxed, since the id is part of the end line the body is scanned for.
_TID = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9.\-+%=]{0,63}$")
_METHOD = re.compile(rb"^[A-Z]+$")
_STATUS = re.compile(rb"^([0-9]{3})(?: (.*))?$")
_RANGE = re.compile(r"^\s*([0-9]+)-([0-9]+|\*)/([0-9]+|\*)\s*$")


@dataclass(frozen=True)
class MsrpLimits:
    """MSRP limits (per connection)."""

    msrp_max_chunk_size: int = setting(
        4 * MiB, "Largest MSRP chunk (start line, headers and body) buffered while its end line is awaited. "
                 "Past it the connection is closed with an anomaly: an MSRP body has no length, so the stream "
                 "cannot be framed without the end line. Clients chunk files at 2 kB to a few hundred kB.")
    msrp_max_header_size: int = setting(
        16 * KiB, "Longest MSRP start line plus headers before the body or end line; past it the connection is "
                  "closed with an anomaly.")
    msrp_max_held_bytes: int = setting(
        64 * MiB, "Bytes of MSRP chunks held per connection while messages are reassembled and inspected. A "
                  "message that would go past it is refused (413 to the sender, a notice, an anomaly): it "
                  "could not be inspected, so it is not passed on.")
    msrp_max_messages_in_reassembly: int = setting(
        32, "MSRP messages (Message-IDs) reassembled at once per connection; a sender interleaving more is "
            "refused with 413 for the new ones and an anomaly.")
    msrp_max_tracked_transactions: int = setting(
        4096, "Transaction ids remembered per MSRP connection to swallow the receiver's responses to chunks "
              "the gateway already answered (the oldest is forgotten first).")
    msrp_max_anomalies_per_kind: int = setting(
        20, "Anomaly events of one kind recorded per MSRP connection; later ones are only counted.")


class MsrpFramingError(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int | None         # None: '*'
    total: int | None       # None: '*'


def parse_byte_range(value: str) -> ByteRange | None:
    m = _RANGE.match(value)
    if not m:
        return None
    start = int(m.group(1))
    end = None if m.group(2) == "*" else int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if start < 1 or (end is not None and end < start - 1):
        return None
    return ByteRange(start, end, total)


@dataclass
class MsrpChunk:
    """One MSRP request or response chunk, with its raw bytes."""
    tid: str
    method: str                             # "SEND", "REPORT", ... ("" for a response)
    status: int                             # responses
    comment: str
    headers: list[tuple[str, str]]          # (lower-case name, value) in order
    body: bytes | None                      # None: no body section at all
    flag: str                               # "$", "+", "#"
    raw: bytes

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str, default: str = "") -> str:
        name = name.lower()
        for n, v in self.headers:
            if n == name:
                return v
        return default

    @property
    def to_path(self) -> list[str]:
        return self.get("to-path").split()

    @property
    def from_path(self) -> list[str]:
        return self.get("from-path").split()

    @property
    def message_id(self) -> str:
        return self.get("message-id").strip()

    @property
    def content_type(self) -> str:
        return self.get("content-type").split(";", 1)[0].strip().lower()

    @property
    def failure_report(self) -> str:
        """'yes' (the default), 'no' or 'partial' (RFC 4975 §7.1.2)."""
        return self.get("failure-report", "yes").strip().lower() or "yes"

    def head(self) -> bytes:
        """Start line and header lines as received (everything before the blank line or the end line)."""
        marker = b"\r\n\r\n" if self.body is not None else b"\r\n-------" + self.tid.encode()
        return self.raw[:self.raw.find(marker) + 2]


class MsrpDecoder:
    """Frames MSRP chunks on a byte stream. feed() returns chunks in order; when framing is lost the last item
    is an MsrpFramingError (the caller closes the connection) and later feeds return nothing."""

    def __init__(self, limits: MsrpLimits = MsrpLimits()):
        self.limits = limits
        self._buf = bytearray()
        self._state: dict | None = None      # the chunk being read
        self.failed = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        if self.failed:
            return []
        self._buf += data
        out: list[MsrpChunk] = []
        try:
            while self._buf:
                chunk = self._next()
                if chunk is None:
                    break
                out.append(chunk)
        except MsrpFramingError as e:
            self.failed = True
            out.append(e)           # what was framed before it still counts; nothing after it does
        return out

    def _next(self) -> MsrpChunk | None:
        buf = self._buf
        st = self._state
        if st is None:
            eol = buf.find(b"\r\n", 0, self.limits.msrp_max_header_size)
            if eol < 0:
                if len(buf) >= self.limits.msrp_max_header_size or (len(buf) >= 5 and not buf.startswith(b"MSRP ")):
                    raise MsrpFramingError("msrp_bad_start_line", "not an MSRP start line")
                return None
            parts = bytes(buf[:eol]).split(b" ", 2)
            if len(parts) < 3 or parts[0] != b"MSRP" or not _TID.match(parts[1]):
                raise MsrpFramingError("msrp_bad_start_line", f"not an MSRP start line: {bytes(buf[:80])!r}")
            tid = parts[1].decode()
            if _METHOD.match(parts[2]):
                method, status, comment = parts[2].decode(), 0, ""
            else:
                m = _STATUS.match(parts[2])
                if not m:
                    raise MsrpFramingError("msrp_bad_start_line", f"bad MSRP method or status {parts[2][:40]!r}")
                method, status, comment = "", int(m.group(1)), (m.group(2) or b"").decode("utf-8", "replace")
            st = self._state = {"tid": tid, "method": method, "status": status, "comment": comment,
                                "pos": eol + 2, "headers": [], "body_start": None, "scan": 0,
                                "end": b"-------" + parts[1]}
        end = st["end"]
        if st["body_start"] is None:
            while True:
                eol = buf.find(b"\r\n", st["pos"])
                if eol < 0:
                    if len(buf) > self.limits.msrp_max_header_size:
                        raise MsrpFramingError("msrp_header_too_long",
                                               f"no end of headers within {self.limits.msrp_max_header_size} bytes")
                    return None
                line = bytes(buf[st["pos"]:eol])
                if line == b"":
                    st["body_start"] = st["scan"] = eol + 2
                    break
                if line.startswith(end) and len(line) == len(end) + 1 and line[-1:] in (b"$", b"+", b"#"):
                    return self._emit(eol + 2, None, line[-1:].decode())
                if eol > self.limits.msrp_max_header_size:
                    raise MsrpFramingError("msrp_header_too_long",
                                           f"headers over {self.limits.msrp_max_header_size} bytes")
                name, sep, value = line.partition(b":")
                if not sep or not name.strip():
                    raise MsrpFramingError("msrp_bad_header", f"bad MSRP header line {line[:80]!r}")
                st["headers"].append((name.strip().decode("latin-1").lower(),
                                      value.strip().decode("utf-8", "replace")))
                st["pos"] = eol + 2
        marker = b"\r\n" + end
        while True:
            at = buf.find(marker, st["scan"])
            if at < 0:
                st["scan"] = max(st["body_start"], len(buf) - len(marker) - 1)
                if len(buf) > self.limits.msrp_max_chunk_size:
                    raise MsrpFramingError("msrp_chunk_too_large",
                                           f"no end line within msrp_max_chunk_size "
                                           f"({self.limits.msrp_max_chunk_size} bytes)")
                return None
            after = at + len(marker)
            if len(buf) < after + 3:
                st["scan"] = at
                return None
            if buf[after:after + 1] in (b"$", b"+", b"#") and buf[after + 1:after + 3] == b"\r\n":
                body_end = at
                if body_end < st["body_start"]:     # "\r\n\r\n-------tid$": the empty line then the end line
                    body_end = st["body_start"]
                return self._emit(after + 3, bytes(buf[st["body_start"]:body_end]), chr(buf[after]))
            st["scan"] = at + 1

    def _emit(self, length: int, body: bytes | None, flag: str) -> MsrpChunk:
        st = self._state
        raw = bytes(self._buf[:length])
        del self._buf[:length]
        self._state = None
        return MsrpChunk(st["tid"], st["method"], st["status"], st["comment"], st["headers"], body, flag, raw)


# --- building ---------------------------------------------------------------------------------------

def new_tid() -> str:
    return secrets.token_hex(8)


def build_response(request: MsrpChunk, status: int, comment: str = "") -> bytes:
    """A transaction response (§7.2): To-Path = the first From-Path URI, From-Path = the first To-Path URI
    (the gateway answers as the next hop)."""
    to = request.from_path[:1] or ["msrp://invalid:1/x;tcp"]
    frm = request.to_path[:1] or ["msrp://invalid:1/x;tcp"]
    text = comment or STATUS_TEXT.get(status, "")
    start = f"MSRP {request.tid} {status}" + (f" {text}" if text else "")
    return (f"{start}\r\nTo-Path: {to[0]}\r\nFrom-Path: {frm[0]}\r\n-------{request.tid}$\r\n").encode("utf-8")


def build_report(request: MsrpChunk, status: int, byte_range: tuple[int, int | None, int | None],
                 comment: str = "") -> bytes:
    """A REPORT (§7.1.2) about the message of `request` back to its sender."""
    tid = new_tid()
    start, end, total = byte_range
    text = comment or STATUS_TEXT.get(status, "")
    rng = f"{start}-{'*' if end is None else end}/{'*' if total is None else total}"
    return (f"MSRP {tid} REPORT\r\nTo-Path: {' '.join(request.from_path)}\r\n"
            f"From-Path: {' '.join(request.to_path)}\r\nMessage-ID: {request.message_id}\r\n"
            f"Byte-Range: {rng}\r\nStatus: 000 {status} {text}\r\n-------{tid}$\r\n").encode("utf-8")


def build_send(to_path: list[str], from_path: list[str], body: bytes, content_type: str = "text/plain",
               tid: str = "", message_id: str = "") -> tuple[str, bytes]:
    """(tid, a complete single-chunk SEND) — the gateway's own notices. No reports are asked for."""
    tid = tid or new_tid()
    message_id = message_id or secrets.token_hex(8)
    n = len(body)
    head = (f"MSRP {tid} SEND\r\nTo-Path: {' '.join(to_path)}\r\nFrom-Path: {' '.join(from_path)}\r\n"
            f"Message-ID: {message_id}\r\nSuccess-Report: no\r\nFailure-Report: no\r\n"
            f"Byte-Range: 1-{n}/{n}\r\nContent-Type: {content_type}\r\n\r\n").encode("utf-8")
    return tid, head + body + f"\r\n-------{tid}$\r\n".encode()


def with_body(chunk: MsrpChunk, body: bytes, content_type: str | None = None) -> bytes:
    """`chunk` as the single, complete chunk of a message with this body: Byte-Range 1-N/N, end flag '$'
    (and Content-Type replaced when given)."""
    n = len(body)
    rng = f"Byte-Range: 1-{n}/{n}".encode()
    has_range = chunk.get("byte-range") != ""
    lines = []
    for line in chunk.head().split(b"\r\n")[:-1]:
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"byte-range":
            line = rng
        elif name == b"content-type":
            if not has_range:
                lines.append(rng)       # MIME headers come last (§9 content-stuff)
                has_range = True
            if content_type is not None:
                line = b"Content-Type: " + content_type.encode()
        lines.append(line)
    if not has_range:
        lines.append(rng)
    head = b"\r\n".join(lines) + b"\r\n"
    return head + b"\r\n" + body + f"\r\n-------{chunk.tid}$\r\n".encode()
