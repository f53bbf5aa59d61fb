"""An incremental, byte-exact decoder for one direction of an IRC connection, plus CTCP and DCC parsing.

Sans-io in the style of h11: `feed(bytes)` returns events, nothing else happens.

    dec = LineDecoder()
    dec.feed(b"@time=x :nick!u@h PRIVMSG #c :hi\\r\\nPING")   -> [Message(raw=b"@time=x ... :hi\\r\\n", ...)]
    dec.feed(b" :123\\r\\n")                                    -> [Message(raw=b"PING :123\\r\\n", ...)]

Concatenating the `raw` of every event gives back the input, byte for byte, so an allowed line is
forwarded exactly as it came.

Framing (RFC 1459 §2.3.1, RFC 2812 §2.3.1, IRCv3 message-tags):

    [@tags SPACE] [:prefix SPACE] command [params] [SPACE :trailing] CRLF

A line ends at LF; a CR before the LF belongs to the terminator (servers accept bare LF, so the
decoder does too). A CR anywhere else, or a NUL, is a `BadLine`: servers disagree on whether a lone
CR ends a line, and a gateway that reads one message where the server reads two could be walked past
(the session drops such a line). Unparseable lines are `BadLine` too, never an exception.

Length: RFC 2812 allows 512 bytes per message including CRLF; IRCv3 adds up to 8191 bytes of tags
before it (the `@`, the tags and the space). A line longer than both together (`max_line_length`,
8703 by default) can only be hostile: the decoder's last event is `LineTooLong` (fatal; the session
records an anomaly and closes). That includes a line whose CRLF never comes: it is cut as soon as the buffer holds
`max_line_length` bytes without an LF, so memory per connection is bounded whatever the peer sends.
(`LineTooLong` is the decoder's last event, after the complete lines of the same feed.)
A body over 512 bytes (after the tags) is accepted but flagged (`Message.overlong`): several servers
announce a larger LINELEN, and a server truncates rather than rejects.

CTCP (Zeuge/Rollo/Mesander 1994, and the modern ctcp draft): `\\x01VERB args\\x01` inside the text of
a PRIVMSG (request) or NOTICE (reply). DCC (the CTCP `DCC` verb): SEND, RESUME, ACCEPT, CHAT, with
the address as a 32-bit decimal IPv4 number or an IPv6 literal, quoted file names, and passive
(reverse) DCC with port 0 and a token.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from imguard.protocols.framing import is_number
from imguard.settings import GiB, MiB, setting

RFC_MAX_BODY = 512          # RFC 2812 §2.3: a message, CRLF included
IRCV3_MAX_TAGS = 8191       # IRCv3 message-tags: '@', the tags and the trailing space


@dataclass(frozen=True)
class IrcLimits:
    """IRC limits (per connection)."""

    max_line_length: int = setting(
        IRCV3_MAX_TAGS + RFC_MAX_BODY,
        "Longest IRC line in bytes, tags and CRLF included: 8191 bytes of IRCv3 tags plus the 512-byte RFC 2812 "
        "message. A longer line, or that many bytes with no line end, is an anomaly and closes the connection "
        "(bounded memory against a peer that never sends CRLF).")
    max_body_length: int = setting(
        RFC_MAX_BODY,
        "Longest message body (after the tags, CRLF included) before an 'overlong line' anomaly is recorded; "
        "the line is still processed. RFC 2812 says 512; some servers announce a larger LINELEN.")
    max_dcc_size: int = setting(
        1024 * GiB,
        "Largest file size a DCC offer may announce; a larger (or negative, or non-numeric) size is an anomaly "
        "and the offer is dropped. No real transfer reaches 1 TiB.")
    max_held_bytes: int = setting(
        256 * MiB,
        "Largest DCC file held for inspection. An offer announcing more is refused with a notice to the sender, "
        "and a transfer that runs past it is closed and recorded: a file is never passed unscanned.")
    dcc_offer_ttl: float = setting(
        900.0,
        "Seconds a DCC offer waits for its data connection (Zeek's dcc-send.zeek keeps offers 5 minutes; clients "
        "wait for a manual accept, so allow longer).")
    max_anomalies_per_kind: int = setting(
        20, "Anomaly events of one kind recorded per IRC connection; later ones are only counted, so a client "
            "repeating a malformed line cannot flood the alert log (anomalies are fsync'ed alerts).")
    max_tracked_offers: int = setting(
        256, "Most DCC offers remembered per IRC connection for matching RESUME/ACCEPT and passive DCC replies "
             "(oldest forgotten first).")
    max_room_members: int = setting(
        10000, "Most channel members remembered per IRC connection, over all its channels (JOIN/PART/QUIT/KICK/NICK "
               "and NAMES), for the ethical walls' room checks; past it a member is not recorded (an anomaly) and "
               "the walls decide on the members known.")


# --- errors -----------------------------------------------------------------------------------------

class DccError(ValueError):
    """A DCC request that cannot be used: `kind` names the anomaly, the message says why."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


# --- events -----------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Message:
    """One parsed IRC line. `raw` is exactly what came on the wire, line terminator included."""

    raw: bytes
    command: str                                    # upper case: "PRIVMSG", "001", ...
    params: tuple[str, ...] = ()
    prefix: str = ""                                # "nick!user@host" or a server name, without ':'
    tags: dict[str, str] = field(default_factory=dict)
    encoding: str = "utf-8"                         # how the line was decoded: utf-8, else latin-1
    last_param_offset: int = -1                     # byte offset in raw where the last param starts (its ':' too)
    has_trailing: bool = False                      # the last param was written ':trailing'
    overlong: bool = False                          # body over max_body_length

    @property
    def nick(self) -> str:
        """The nick of the prefix (the server name for a server prefix)."""
        return self.prefix.split("!", 1)[0].split("@", 1)[0]

    @property
    def user(self) -> str:
        if "!" not in self.prefix:
            return ""
        return self.prefix.split("!", 1)[1].split("@", 1)[0]

    @property
    def host(self) -> str:
        return self.prefix.split("@", 1)[1] if "@" in self.prefix else ""

    def param(self, index: int, default: str = "") -> str:
        return self.params[index] if -len(self.params) <= index < len(self.params) else default

    def with_last_param(self, text: str) -> bytes:
        """The raw line with its last param replaced by `text` (as a trailing param); tags and prefix are kept."""
        if self.last_param_offset < 0:
            raise ValueError("message has no params")
        return (self.raw[:self.last_param_offset] + b":" + encode_text(text, self.encoding) + b"\r\n")


@dataclass(frozen=True)
class LineTooLong:
    """The last event of a dead decoder: a line, or bytes with no line end yet, reached max_line_length.
    The lines before it in the same feed are still returned, so the outcome does not depend on chunking."""

    size: int           # bytes buffered without a line end
    limit: int
    kind: str = "line_too_long"

    @property
    def detail(self) -> str:
        return f"{self.size} bytes without a line end (max_line_length {self.limit})"


@dataclass(frozen=True, eq=False)
class BadLine:
    """A complete line that is not a usable IRC message: `kind` is the anomaly kind, `raw` the exact bytes."""

    raw: bytes
    kind: str           # "bare_cr", "nul_byte", "empty_command", "bad_tags", ...
    detail: str


# --- the line decoder -------------------------------------------------------------------------------

class LineDecoder:
    """Bytes in, `Message` / `BadLine` events out; a final `LineTooLong` event kills it (later feeds return [])."""

    def __init__(self, limits: IrcLimits = IrcLimits()):
        self.limits = limits
        self._buf = bytearray()
        self.dead = False

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet a complete line."""
        return bytes(self._buf)

    def clear(self) -> bytes:
        """Drop and return the incomplete tail (used when the stream switches to TLS)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def feed(self, data: bytes) -> list[Message | BadLine | LineTooLong]:
        if self.dead:
            return []
        self._buf += data
        events: list[Message | BadLine | LineTooLong] = []
        limit = self.limits.max_line_length
        start = 0
        while True:
            end = self._buf.find(b"\n", start, start + limit)
            if end < 0:
                if len(self._buf) - start >= limit:
                    self.dead = True
                    events.append(LineTooLong(size=len(self._buf) - start, limit=limit))
                    self._buf.clear()
                    return events
                break
            raw = bytes(self._buf[start:end + 1])
            start = end + 1
            events.append(parse_line(raw, self.limits))
        del self._buf[:start]
        return events


def decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding): UTF-8 when the bytes are valid UTF-8, else Latin-1 (every byte is one character,
    so nothing on the wire is hidden from policy)."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def encode_text(text: str, encoding: str = "utf-8") -> bytes:
    """Text for the wire, with CR, LF and NUL (which would end or corrupt the line) replaced by spaces."""
    text = text.replace("\r", " ").replace("\n", " ").replace("\x00", " ")
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode("utf-8")


_TAG_UNESCAPES = {":": ";", "s": " ", "\\": "\\", "r": "\r", "n": "\n"}


def _unescape_tag(value: str) -> str:
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            out.append(_TAG_UNESCAPES.get(value[i + 1], value[i + 1]))
            i += 2
            continue
        if c != "\\":       # a trailing lone backslash is dropped (IRCv3 message-tags)
            out.append(c)
        i += 1
    return "".join(out)


# True: every line parsed by parse_line_reference, the pure path (tests/test_irc_fastpath.py holds the two paths to
# the same events).
REFERENCE = False
_DEFAULT_LIMITS = IrcLimits()
_new_message = object.__new__


def parse_line(raw: bytes, limits: IrcLimits = _DEFAULT_LIMITS) -> Message | BadLine:
    """Parse one complete line (ending in LF). Never raises for bad input: returns a BadLine.

    A line in ASCII without tags (nearly every chat line) is parsed as text, decoded once (the offsets of str and
    bytes are the same in ASCII): the same Message parse_line_reference makes, at about half its cost. Every other
    line, and every line the fast path would not turn into a Message (a BadLine, whose reasons the reference
    words), goes to parse_line_reference."""
    if REFERENCE or not raw.isascii() or raw[:1] == b"@":
        return parse_line_reference(raw, limits)
    body = raw.decode("ascii")
    if body[-1:] == "\n":
        body = body[:-1]
    if body[-1:] == "\r":
        body = body[:-1]
    if "\r" in body or "\x00" in body:
        return parse_line_reference(raw, limits)
    pos = 0
    prefix = ""
    if body[:1] == ":":
        pos = body.find(" ")
        if pos < 0:
            return parse_line_reference(raw, limits)
        prefix = body[1:pos]
        while body[pos:pos + 1] == " ":
            pos += 1
    end = body.find(" ", pos)
    if end < 0:
        end = len(body)
    command = body[pos:end].upper()
    if not command.isalnum():           # "" too: the reference words the BadLine
        return parse_line_reference(raw, limits)
    params: list[str] = []
    last_offset = -1
    has_trailing = False
    size = len(body)
    pos = end
    while pos < size:
        while body[pos:pos + 1] == " ":
            pos += 1
        if pos >= size:
            break
        last_offset = pos
        if body[pos] == ":":
            params.append(body[pos + 1:])
            has_trailing = True
            break
        end = body.find(" ", pos)
        if end < 0:
            end = size
        params.append(body[pos:end])
        pos = end
    # Message(...) as the reference makes it, its fields set at once (a frozen dataclass's __init__ sets them
    # one object.__setattr__ at a time: a third of this function's cost).
    message = _new_message(Message)
    message.__dict__.update(raw=raw, command=command, params=tuple(params), prefix=prefix, tags={}, encoding="utf-8",
                            last_param_offset=last_offset, has_trailing=has_trailing,
                            overlong=len(raw) > limits.max_body_length)
    return message


def parse_line_reference(raw: bytes, limits: IrcLimits = _DEFAULT_LIMITS) -> Message | BadLine:
    """parse_line on its pure reference path: bytes scanned, each piece decoded as the whole line decodes."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    if body.endswith(b"\r"):
        body = body[:-1]
    if b"\r" in body:
        return BadLine(raw, "bare_cr", "a CR inside a line (servers disagree on whether it ends the line)")
    if b"\x00" in body:
        return BadLine(raw, "nul_byte", "a NUL byte inside a line (RFC 2812 §2.3.1 forbids it)")
    pos = 0
    tags: dict[str, str] = {}
    if body.startswith(b"@"):
        space = body.find(b" ")
        if space < 0:
            return BadLine(raw, "bad_tags", "a tags section with nothing after it")
        tag_text, _ = decode_text(body[1:space])
        for item in tag_text.split(";"):
            if not item:
                continue
            key, _, value = item.partition("=")
            if not key:
                return BadLine(raw, "bad_tags", f"a tag without a name: {item[:40]!r}")
            tags[key] = _unescape_tag(value)
        pos = space
        while pos < len(body) and body[pos] == 0x20:
            pos += 1
    body_start = pos
    overlong = len(raw) - body_start > limits.max_body_length
    encoding = decode_text(body)[1]
    # Offsets below are byte offsets in `body`; decode per piece so they stay exact for Latin-1 and UTF-8.
    prefix = ""
    if body[pos:pos + 1] == b":":
        space = body.find(b" ", pos)
        if space < 0:
            return BadLine(raw, "empty_command", "a prefix with no command")
        prefix = body[pos + 1:space].decode(encoding, "replace")
        pos = space
        while pos < len(body) and body[pos] == 0x20:
            pos += 1
    end = body.find(b" ", pos)
    end = len(body) if end < 0 else end
    command = body[pos:end].decode(encoding, "replace").upper()
    if not command:
        if not body.strip(b" "):
            return BadLine(raw, "empty_line", "an empty line")
        return BadLine(raw, "empty_command", "a line with no command")
    if not command.isalnum():
        return BadLine(raw, "bad_command", f"command {command[:40]!r} is not a word or a number")
    pos = end
    params: list[str] = []
    last_offset = -1
    has_trailing = False
    while pos < len(body):
        while pos < len(body) and body[pos] == 0x20:
            pos += 1
        if pos >= len(body):
            break
        if body[pos] == 0x3A:   # ':' trailing
            last_offset = pos
            params.append(body[pos + 1:].decode(encoding, "replace"))
            has_trailing = True
            break
        end = body.find(b" ", pos)
        end = len(body) if end < 0 else end
        last_offset = pos
        params.append(body[pos:end].decode(encoding, "replace"))
        pos = end
    return Message(raw=raw, command=command, params=tuple(params), prefix=prefix, tags=tags, encoding=encoding,
                   last_param_offset=last_offset, has_trailing=has_trailing, overlong=overlong)


def format_message(command: str, *params: str, prefix: str = "") -> bytes:
    """One line for the wire; the last param is always written as trailing. CR/LF/NUL become spaces."""
    parts = []
    if prefix:
        parts.append(":" + prefix)
    parts.append(command)
    for p in params[:-1]:
        p = p.replace(" ", "_") or "*"
        parts.append(p.lstrip(":") or "*")
    if params:
        parts.append(":" + params[-1])
    return encode_text(" ".join(parts)) + b"\r\n"


# --- CTCP -------------------------------------------------------------------------------------------

CTCP_DELIM = "\x01"


@dataclass(frozen=True)
class Ctcp:
    verb: str           # upper case: "ACTION", "DCC", "VERSION", ...
    args: str = ""


def split_ctcp(text: str) -> tuple[str, list[Ctcp]]:
    """(plain text, CTCP requests) of a PRIVMSG/NOTICE text. Text between pairs of \\x01 is CTCP (the 1994
    spec lets them sit anywhere in a message; a missing closing \\x01 at the end is tolerated, as clients do)."""
    if CTCP_DELIM not in text:
        return text, []
    pieces = text.split(CTCP_DELIM)
    plain = []
    ctcps = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            plain.append(piece)
        elif piece:
            verb, _, args = piece.partition(" ")
            ctcps.append(Ctcp(verb.upper(), args))
    return "".join(plain), ctcps


def format_ctcp(verb: str, args: str = "") -> str:
    return CTCP_DELIM + verb + (" " + args if args else "") + CTCP_DELIM


# --- DCC --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DccSend:
    """`DCC SEND name address port [size [token]]`. port 0 with a token: passive (reverse) DCC."""
    name: str
    host: str           # normalized IP text ("10.0.0.7", "2001:db8::1")
    port: int
    size: int | None    # None when the offer gave no size
    token: str = ""
    address_text: str = ""      # the address as written ("167772167")

    @property
    def passive(self) -> bool:
        return self.port == 0


@dataclass(frozen=True)
class DccResume:
    """`DCC RESUME name port position [token]` (receiver -> sender) or `DCC ACCEPT ...` (sender -> receiver)."""
    verb: str           # "RESUME" or "ACCEPT"
    name: str
    port: int
    position: int
    token: str = ""


@dataclass(frozen=True)
class DccChat:
    """`DCC CHAT chat address port [token]`."""
    protocol: str
    host: str
    port: int
    token: str = ""
    address_text: str = ""

    @property
    def passive(self) -> bool:
        return self.port == 0


DccRequest = DccSend | DccResume | DccChat


def _split_name(args: str) -> tuple[str, list[str]]:
    """The (possibly quoted) first argument and the remaining words."""
    args = args.strip(" ")
    if args.startswith('"'):
        close = args.find('"', 1)
        if close < 0:
            raise DccError("dcc_bad_name", "a quoted file name without its closing quote")
        return args[1:close], args[close + 1:].split()
    words = args.split()
    if not words:
        raise DccError("dcc_malformed", "no arguments")
    return words[0], words[1:]


def _looks_like_address(word: str) -> bool:
    return is_number(word) or ":" in word or word.count(".") == 3


def parse_address(text: str) -> str:
    """A DCC address: a 32-bit unsigned decimal IPv4 number, an IPv6 literal, or (some clients) a dotted quad."""
    if is_number(text):
        value = int(text)
        if not 0 < value < 2 ** 32:
            raise DccError("dcc_bad_address", f"IPv4 number {text[:24]} out of range")
        return str(ipaddress.IPv4Address(value))
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise DccError("dcc_bad_address", f"address {text[:64]!r} is neither a 32-bit number nor an IP literal") \
            from None


def format_address(host: str) -> str:
    """How an address is written in a DCC request: IPv4 as its 32-bit number, IPv6 as text."""
    ip = ipaddress.ip_address(host)
    return str(int(ip)) if ip.version == 4 else str(ip)


def _parse_port(text: str, allow_zero: bool) -> int:
    if not is_number(text):
        raise DccError("dcc_bad_port", f"port {text[:24]!r} is not a number")
    port = int(text)
    if port > 65535 or (port == 0 and not allow_zero):
        raise DccError("dcc_bad_port", f"port {text[:24]} out of range")
    return port


def _parse_size(text: str, limits: IrcLimits, what: str = "size") -> int:
    if not is_number(text):
        raise DccError("dcc_bad_size", f"{what} {text[:24]!r} is not a non-negative number")
    if len(text) > 20 or int(text) > limits.max_dcc_size:
        raise DccError("dcc_bad_size", f"{what} {text[:24]} is absurd (max_dcc_size {limits.max_dcc_size})")
    return int(text)


def parse_dcc(args: str, limits: IrcLimits = IrcLimits()) -> DccRequest:
    """Parse the arguments of a CTCP DCC request (what follows `DCC `). Raises DccError."""
    kind, _, rest = args.strip(" ").partition(" ")
    kind = kind.upper()
    if kind in ("SEND", "TSEND"):       # TSEND: "turbo" SEND, the receiver sends no ACKs
        name, words = _split_name(rest)
        if not rest.lstrip(" ").startswith('"'):
            # An unquoted name may hold spaces: read the numbers from the right.
            if (len(words) >= 4 and _looks_like_address(words[-4]) and is_number(words[-3])
                    and is_number(words[-2].lstrip("-"))):
                tail = 4
            elif len(words) >= 3 and _looks_like_address(words[-3]):
                tail = 3
            else:
                tail = len(words)
            name = " ".join([name] + words[:-tail])
            words = words[-tail:]
        if len(words) < 2:
            raise DccError("dcc_malformed", "DCC SEND without an address and port")
        if len(words) > 4:
            raise DccError("dcc_malformed", "DCC SEND with too many arguments")
        host = parse_address(words[0])
        port = _parse_port(words[1], allow_zero=True)
        size = _parse_size(words[2], limits) if len(words) >= 3 else None
        token = words[3] if len(words) >= 4 else ""
        if port == 0 and not token:
            raise DccError("dcc_bad_port", "port 0 without a passive DCC token")
        return DccSend(name=name, host=host, port=port, size=size, token=token, address_text=words[0])
    if kind in ("RESUME", "ACCEPT"):
        name, words = _split_name(rest)
        if not rest.lstrip(" ").startswith('"') and len(words) > 2:
            tail = 3 if (len(words) >= 3 and words[-3] == "0" and is_number(words[-2])) else 2
            name = " ".join([name] + words[:-tail])
            words = words[-tail:]
        if len(words) < 2 or len(words) > 3:
            raise DccError("dcc_malformed", f"DCC {kind} needs a port and a position")
        port = _parse_port(words[0], allow_zero=True)
        position = _parse_size(words[1], limits, "position")
        return DccResume(verb=kind, name=name, port=port, position=position,
                         token=words[2] if len(words) == 3 else "")
    if kind == "CHAT":
        words = rest.split()
        if len(words) < 3 or len(words) > 4:
            raise DccError("dcc_malformed", "DCC CHAT needs a protocol, an address and a port")
        host = parse_address(words[1])
        port = _parse_port(words[2], allow_zero=True)
        token = words[3] if len(words) == 4 else ""
        if port == 0 and not token:
            raise DccError("dcc_bad_port", "port 0 without a passive DCC token")
        return DccChat(protocol=words[0], host=host, port=port, token=token, address_text=words[1])
    raise DccError("dcc_unsupported", f"DCC {kind[:16] or '(empty)'} is not supported")


def format_dcc_send(name: str, host: str, port: int, size: int | None, token: str = "") -> str:
    """The args of a CTCP DCC SEND (after `DCC `), quoting a name with spaces."""
    quoted = f'"{name}"' if (" " in name or not name) else name
    words = ["SEND", quoted, format_address(host), str(port)]
    if size is not None:
        words.append(str(size))
    if token:
        words.append(token)
    return " ".join(words)


def format_dcc_resume(verb: str, name: str, port: int, position: int, token: str = "") -> str:
    quoted = f'"{name}"' if (" " in name or not name) else name
    return " ".join([verb, quoted, str(port), str(position)] + ([token] if token else []))


def format_dcc_chat(protocol: str, host: str, port: int, token: str = "") -> str:
    return " ".join(["CHAT", protocol, format_address(host), str(port)] + ([token] if token else []))
