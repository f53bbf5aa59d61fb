"""SIP messages (RFC 3261 §7, §18.3, §20): framing, header access, bodies and response building. Sans-io.

    decoder = SipStreamDecoder(SipLimits())
    decoder.feed(b"MESSAGE sip:bob@b.example SIP/2.0\\r\\n...Content-Length: 5\\r\\n\\r\\nhello")
        -> [SipMessage(method="MESSAGE", ...)]

A stream message is the start line, header lines up to the empty line, and exactly Content-Length body
bytes (§18.3: mandatory on TCP). Leading CRLFs are RFC 5626 keep-alives and come out as `KeepAlive`.
Hostile input is bounded: a head longer than `sip_max_header_size`, more than `sip_max_headers` header
lines or a Content-Length above `sip_max_message_size` is a `SipFramingError`: the stream cannot be framed
with confidence any more, so the session records an anomaly and closes rather than forward bytes it
could not check. A datagram is one message (`parse_datagram`); there Content-Length may be missing
(the body is the rest of the datagram) and a longer datagram is cut to it (§18.3).

Everything keeps its raw bytes, so an allowed message is forwarded exactly as it arrived.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from imguard.protocols.framing import is_number, text_encoding
from imguard.settings import KiB, setting

# RFC 3261 §7.3.3 and the IANA registry: compact header forms.
COMPACT = {"i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length", "c": "content-type",
           "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via", "r": "refer-to",
           "b": "referred-by", "o": "event", "u": "allow-events", "x": "session-expires", "a": "accept-contact",
           "j": "reject-contact", "d": "request-disposition", "y": "identity", "n": "identity-info"}

REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 403: "Forbidden", 413: "Request Entity Too Large",
           415: "Unsupported Media Type", 488: "Not Acceptable Here", 500: "Server Internal Error"}

_REQUEST_LINE = re.compile(r"^([A-Za-z0-9.!%*_+`'~-]+) (\S+) SIP/2\.0$")
_STATUS_LINE = re.compile(r"^SIP/2\.0 ([1-6][0-9][0-9])(?: (.*))?$")


@dataclass(frozen=True)
class SipLimits:
    """SIP limits (per connection)."""

    sip_max_message_size: int = setting(
        64 * KiB, "Largest SIP message (head and body) framed on a stream or taken from a datagram. A "
                  "Content-Length above it is treated as a lie: the connection is closed with an anomaly, since "
                  "the stream can no longer be framed. RFC 3428 keeps MESSAGE bodies near 1300 bytes; INVITEs "
                  "with SDP are a few kB.")
    sip_max_header_size: int = setting(
        16 * KiB, "Longest SIP head (start line and headers) waited for before the empty line; past it the "
                  "connection is closed with an anomaly.")
    sip_max_headers: int = setting(
        256, "Most header lines in one SIP message; more is an anomaly and closes the connection.")
    sip_max_anomalies_per_kind: int = setting(
        20, "Anomaly events of one kind recorded per SIP connection; later ones are only counted, so a peer "
            "repeating a malformed message cannot flood the alert log.")
    sip_msrp_offer_ttl: float = setting(
        4 * 3600.0, "Seconds an MSRP session announced in an INVITE/SDP stays in the expected-transfers table "
                    "(the MSRP connection opens after the answer and may reconnect during the call).")
    sip_max_pending_invites: int = setting(
        256, "INVITEs with MSRP offers remembered per SIP connection while their answer is awaited "
             "(the oldest is forgotten first).")
    sip_check_inbound_messages: bool = setting(
        True, "Send MESSAGE requests (and text bodies of other requests) arriving from the server side, to the "
              "gateway's user, through policy too (inbound), as every protocol does; off: they cross unchecked.")


class SipFramingError(Exception):
    """The peer sent something that cannot be framed as SIP (kind names the anomaly)."""

    def __init__(self, kind: str, detail: str, raw: bytes = b""):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.raw = raw


@dataclass(frozen=True)
class KeepAlive:
    """RFC 5626 §3.5.1 CRLF keep-alive (ping "\\r\\n\\r\\n", pong "\\r\\n")."""
    raw: bytes


@dataclass
class SipMessage:
    """One SIP request or response, with its raw bytes."""

    start_line: str
    header_lines: list[bytes]                   # raw logical header lines (folded continuations included), no CRLF
    headers: list[tuple[str, str]]              # (canonical lower-case name, unfolded value) in order
    body: bytes
    raw: bytes                                  # exactly as received
    method: str = ""                            # requests
    request_uri: str = ""
    status: int = 0                             # responses
    reason: str = ""
    content_length_given: bool = True

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str, default: str = "") -> str:
        name = COMPACT.get(name.lower(), name.lower())
        for n, v in self.headers:
            if n == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, comma-separated values split (for Via, P-Asserted-Identity, ...)."""
        name = COMPACT.get(name.lower(), name.lower())
        values: list[str] = []
        for n, v in self.headers:
            if n == name:
                values += split_commas(v)
        return values

    def raw_values(self, name: str) -> list[bytes]:
        """The raw header lines of `name` (as received: compact or long name, folding kept)."""
        name = COMPACT.get(name.lower(), name.lower())
        return [line for line, (n, _) in zip(self.header_lines, self.headers, strict=True) if n == name]

    @property
    def call_id(self) -> str:
        return self.get("call-id")

    @property
    def cseq(self) -> tuple[int, str]:
        number, _, method = self.get("cseq").partition(" ")
        return (int(number) if is_number(number) else -1), method.strip().upper()

    @property
    def content_type(self) -> tuple[str, dict[str, str]]:
        return parse_content_type(self.get("content-type"))


def split_commas(value: str) -> list[str]:
    """Split a header value at commas outside quotes and angle brackets."""
    parts, depth, quoted, start = [], 0, False, 0
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """'text/plain;charset=UTF-8' -> ('text/plain', {'charset': 'UTF-8'})."""
    kind, *params = value.split(";")
    out: dict[str, str] = {}
    for p in params:
        k, _, v = p.partition("=")
        if k.strip():
            out[k.strip().lower()] = v.strip().strip('"')
    return kind.strip().lower(), out


def uri_of(name_addr: str) -> str:
    """The URI of a From/To/Contact/P-Asserted-Identity value, without URI or header parameters.
    '"Alice" <sip:alice@a.example;transport=tcp>;tag=1' -> 'sip:alice@a.example'."""
    value = name_addr.strip()
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        uri = value[lt + 1:gt if gt > 0 else None]
    else:
        uri = value.split(";", 1)[0]
    return uri.split(";", 1)[0].split("?", 1)[0].strip()


def tag_of(name_addr: str) -> str:
    value = name_addr
    gt = value.rfind(">")
    params = value[gt + 1:] if gt >= 0 else value
    for p in params.split(";")[1:]:
        k, _, v = p.partition("=")
        if k.strip().lower() == "tag":
            return v.strip()
    return ""


def _parse_head(head: bytes, limits: SipLimits) -> tuple[str, list[bytes], list[tuple[str, str]]]:
    """Start line and headers of a head (without the final empty line)."""
    lines = head.split(b"\r\n")
    if len(lines) == 1 and b"\n" in head:
        lines = head.split(b"\n")
    start = lines[0].decode("utf-8", "replace").strip()
    header_lines: list[bytes] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and header_lines:
            header_lines[-1] += b"\r\n" + line        # §7.3.1 folding: kept raw, unfolded for values
        elif line:
            header_lines.append(line)
    if len(header_lines) > limits.sip_max_headers:
        raise SipFramingError("sip_too_many_headers", f"more than {limits.sip_max_headers} header lines")
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep or not name.strip() or b" " in name.strip():
            raise SipFramingError("sip_bad_header", "a header line without a name and colon",
                                  raw=line[:200])
        key = name.strip().decode("latin-1").lower()
        key = COMPACT.get(key, key)
        text = re.sub(r"\s*\r\n[ \t]+", " ", value.decode("utf-8", "replace")).strip()
        headers.append((key, text))
    return start, header_lines, headers


def _start(start: str) -> dict:
    m = _REQUEST_LINE.match(start)
    if m:
        return {"method": m.group(1).upper(), "request_uri": m.group(2)}
    m = _STATUS_LINE.match(start)
    if m:
        return {"status": int(m.group(1)), "reason": m.group(2) or ""}
    raise SipFramingError("sip_bad_start_line", "not a SIP request or status line", raw=start[:200].encode())


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    values = [v for n, v in headers if n == "content-length"]
    if not values:
        return None
    if len(set(values)) > 1 or not is_number(values[0]):
        raise SipFramingError("sip_bad_content_length", f"Content-Length {values!r}")
    return int(values[0])


class SipStreamDecoder:
    """Frames SIP messages on a byte stream (TCP, TLS). feed() returns messages and keep-alives in order; when
    the stream cannot be framed any more the last item is a SipFramingError (the caller closes the connection)
    and later feeds return nothing."""

    def __init__(self, limits: SipLimits = SipLimits()):
        self.limits = limits
        self._buf = bytearray()
        self._head: tuple | None = None          # (raw head incl. blank line, start, lines, headers, length)
        self.failed = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def clear(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        self._head = None
        return data

    def feed(self, data: bytes) -> list:
        if self.failed:
            return []
        self._buf += data
        out: list = []
        try:
            while self._buf:
                if self._head is None:
                    if self._buf[:1] in (b"\r", b"\n"):
                        n = 0
                        while n < len(self._buf) and self._buf[n:n + 1] in (b"\r", b"\n"):
                            n += 1
                        if n == len(self._buf) and n < 4 and self._buf[:n] in (b"\r", b"\r\n\r"):
                            break           # may be the start of a \r\n\r\n ping
                        out.append(KeepAlive(bytes(self._buf[:n])))
                        del self._buf[:n]
                        continue
                    end = self._buf.find(b"\r\n\r\n", 0, self.limits.sip_max_header_size + 4)
                    if end < 0:
                        if len(self._buf) > self.limits.sip_max_header_size:
                            raise SipFramingError("sip_header_too_long",
                                                  f"no end of headers within {self.limits.sip_max_header_size} bytes")
                        first = self._buf.split(b"\r\n", 1)
                        if len(first) == 2 or len(self._buf) > 1024:
                            _start(bytes(first[0][:1024]).decode("utf-8", "replace").strip())  # fail early
                        break
                    head = bytes(self._buf[:end + 4])
                    start, lines, headers = _parse_head(head[:-4], self.limits)
                    info = _start(start)
                    length = _content_length(headers)
                    given = length is not None
                    if length is None:
                        length = 0
                    if len(head) + length > self.limits.sip_max_message_size:
                        raise SipFramingError("sip_content_length_too_large",
                                              f"Content-Length {length} over sip_max_message_size "
                                              f"{self.limits.sip_max_message_size}")
                    self._head = (head, start, lines, headers, length, info, given)
                head, start, lines, headers, length, info, given = self._head
                if len(self._buf) < len(head) + length:
                    break
                raw = bytes(self._buf[:len(head) + length])
                del self._buf[:len(head) + length]
                self._head = None
                out.append(SipMessage(start, lines, headers, raw[len(head):], raw, content_length_given=given,
                                      **info))
        except SipFramingError as e:
            self.failed = True
            out.append(e)           # what was framed before it still counts; nothing after it does
        return out


def parse_datagram(data: bytes, limits: SipLimits = SipLimits()) -> SipMessage:
    """One SIP message from one UDP datagram (§18.3). Raises SipFramingError."""
    if len(data) > limits.sip_max_message_size:
        raise SipFramingError("sip_message_too_large", f"datagram of {len(data)} bytes")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise SipFramingError("sip_incomplete_datagram", "no end of headers in the datagram")
    head = data[:end + 4]
    start, lines, headers = _parse_head(head[:-4], limits)
    info = _start(start)
    length = _content_length(headers)
    body = data[end + 4:]
    given = length is not None
    if length is not None:
        if length > len(body):
            raise SipFramingError("sip_content_length_mismatch",
                                  f"Content-Length {length} but the datagram carries {len(body)} body bytes")
        body = body[:length]        # §18.3: extra bytes are discarded
    return SipMessage(start, lines, headers, body, head + body, content_length_given=given, **info)


# --- rewriting and building -------------------------------------------------------------------------

def _head_bytes(start_line: bytes, header_lines: list[bytes]) -> bytes:
    return start_line + b"\r\n" + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n"


def with_body(msg: SipMessage, body: bytes, content_type: str | None = None) -> bytes:
    """The message with a new body: Content-Length (and Content-Type if given) rewritten, every other
    header line kept byte for byte."""
    start = msg.raw.split(b"\r\n", 1)[0]
    lines: list[bytes] = []
    had_length = False
    for line, (name, _) in zip(msg.header_lines, msg.headers, strict=True):
        if name == "content-length":
            if not had_length:
                lines.append(line.split(b":", 1)[0] + b": " + str(len(body)).encode())
                had_length = True
            continue
        if name == "content-type" and content_type is not None:
            lines.append(line.split(b":", 1)[0] + b": " + content_type.encode())
            continue
        lines.append(line)
    if not had_length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return _head_bytes(start, lines) + body


def with_header(msg: SipMessage, name: str, value: str) -> bytes:
    """The message with every `name` header (long or compact form) set to `value`; all else byte for byte."""
    name = COMPACT.get(name.lower(), name.lower())
    start = msg.raw.split(b"\r\n", 1)[0]
    lines = [line.split(b":", 1)[0] + b": " + value.encode("utf-8") if n == name else line
             for line, (n, _) in zip(msg.header_lines, msg.headers, strict=True)]
    return _head_bytes(start, lines) + msg.body


def quote(text: str) -> str:
    """A SIP quoted-string (§25.1) of one line of text."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_response(request: SipMessage, status: int, reason: str = "", *, to_tag: str = "",
                   extra_headers: list[tuple[str, str]] = (), body: bytes = b"", content_type: str = "") -> bytes:
    """A response to `request` built per RFC 3261 §8.2.6.2: every Via in order, From, Call-ID and CSeq copied,
    To copied with a tag added when it had none (`to_tag`), then the extra headers, Content-Length."""
    lines: list[bytes] = []
    for line, (name, _) in zip(request.header_lines, request.headers, strict=True):
        if name == "via":
            lines.append(b"Via:" + line.split(b":", 1)[1])
    for name in ("from", "to", "call-id", "cseq"):
        for line in request.raw_values(name):
            value = line.split(b":", 1)[1].strip()
            if name == "to" and not tag_of(value.decode("utf-8", "replace")) and to_tag:
                value += b";tag=" + to_tag.encode()
            canonical = {"from": b"From", "to": b"To", "call-id": b"Call-ID", "cseq": b"CSeq"}[name]
            lines.append(canonical + b": " + value)
            break
    for name, value in extra_headers:
        lines.append(f"{name}: {value}".encode("utf-8"))
    if body:
        lines.append(f"Content-Type: {content_type or 'text/plain;charset=UTF-8'}".encode())
    lines.append(b"Content-Length: " + str(len(body)).encode())
    start = f"SIP/2.0 {status} {reason or REASONS.get(status, 'Unknown')}".encode()
    return _head_bytes(start, lines) + body


# --- bodies -----------------------------------------------------------------------------------------

@dataclass
class Cpim:
    """RFC 3862 message/cpim: CPIM headers, a blank line, MIME headers, a blank line, the content."""
    cpim_head: bytes                            # the CPIM header block, with its blank line
    mime_head: bytes                            # the MIME header block, with its blank line
    mime_headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""
    cpim_headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_type(self) -> tuple[str, dict[str, str]]:
        return parse_content_type(self.mime_headers.get("content-type", "text/plain"))

    def with_content(self, content: bytes, content_type: str | None = None) -> bytes:
        lines = []
        for line in self.mime_head.split(b"\r\n"):
            name = line.split(b":", 1)[0].strip().lower()
            if name == b"content-length":
                line = line.split(b":", 1)[0] + b": " + str(len(content)).encode()
            elif name == b"content-type" and content_type is not None:
                line = line.split(b":", 1)[0] + b": " + content_type.encode()
            lines.append(line)
        return self.cpim_head + b"\r\n".join(lines) + content


def _header_block(data: bytes, pos: int) -> tuple[int, dict[str, str]] | None:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        if data[pos:pos + 2] == b"\r\n":
            return pos + 2, {}
        return None
    if data[pos:pos + 2] == b"\r\n":
        return pos + 2, {}
    headers = {}
    for line in data[pos:end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().decode("latin-1").lower(), value.strip().decode("utf-8", "replace"))
    return end + 4, headers


def parse_cpim(body: bytes) -> Cpim | None:
    """The parts of a message/cpim body, or None when it is not one."""
    first = _header_block(body, 0)
    if first is None:
        return None
    mid, cpim_headers = first
    second = _header_block(body, mid)
    if second is None:
        return None
    end, mime_headers = second
    return Cpim(body[:mid], body[mid:end], mime_headers, body[end:], cpim_headers)


_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)


def html_to_text(markup: str) -> str:
    """The text a person sees in an HTML message: tags dropped, entities decoded."""
    text = _TAGS.sub(" ", markup)
    return re.sub(r"[ \t]+", " ", html.unescape(text)).strip()


def decode_text(data: bytes, charset: str = "") -> str:
    """The text of a body in its announced charset (when it is one), else UTF-8, else Latin-1: never fails."""
    for enc in ([text_encoding(charset)] if charset else []) + ["utf-8"]:
        if enc is None:
            continue
        try:
            return data.decode(enc)
        except ValueError:              # UnicodeDecodeError, and what odd codecs raise
            continue
    return data.decode("latin-1")
