"""An incremental, byte-exact framer for one direction of an XMPP stream (RFC 6120 §4, §11).

Sans-io in the style of h11: `feed(bytes)` returns events, nothing else happens. An XMPP stream is
one long XML document per direction; its level-1 children (stanzas and "nonzas" such as <starttls/>,
<auth/>, <stream:features/>) are what the session acts on. For each of them the decoder returns the
exact bytes it came in (so allowed stanzas are relayed without re-serialisation) and a parsed
ElementTree element (namespaced tags, `{ns}local`).

    dec = XmlStreamDecoder()
    dec.feed(b"<stream:stream xmlns='jabber:client' ...><message to='bob@x'><body>hi</bo")
        -> [StreamOpened(raw=b"<stream:stream ...>", attrs={...})]
    dec.feed(b"dy></message>")
        -> [Stanza(raw=b"<message to='bob@x'><body>hi</body></message>", element=<message>)]

Concatenating the `raw` of every event gives back the input, byte for byte.

Parsing is expat's (never our own tokenizer), restricted as RFC 6120 §11.1 requires: a DTD,
an entity declaration, a processing instruction (other than the XML declaration) or a comment is a
fatal `XmlError` (`restricted_xml`); no entity is ever resolved. A stream restart (after STARTTLS
and after SASL <success/>, RFC 6120 §5.4.3.3, §6.4.6) is recognised by its new stream header,
with or without an XML declaration: the parser is reset and the header is reported as a new
`StreamOpened`. Hostile input is bounded by `XmppLimits`; exceeding a limit is a fatal `XmlError`.
After a fatal error the decoder is dead: later feeds return nothing.

An idle stream holds no parser: a feed that ends between stanzas with nothing pending lets go of it (~10 KB
each, two per connection), and the next feed makes a new one, fed the stream header's namespace declarations
first (_release_if_idle, _revive). The events are the same as with one parser throughout.
"""

from __future__ import annotations

import re
import xml.parsers.expat as expat
from dataclasses import dataclass, field
from typing import Any, Iterator
from xml.etree import ElementTree as ET

from imguard.settings import KiB, MiB, setting

STREAMS_NS = "http://etherx.jabber.org/streams"
STREAM_TAG = "{%s}stream" % STREAMS_NS

# XmlError kinds (the anomaly kinds the session records)
MALFORMED = "malformed_xml"             # not well-formed XML, or an unbound namespace prefix
RESTRICTED = "restricted_xml"           # DTD, entity declaration, PI or comment (RFC 6120 §11.1)
STANZA_TOO_LARGE = "stanza_too_large"   # a top-level element over max_stanza_size
HEADER_TOO_LARGE = "header_too_large"   # bytes before the stream header completed over max_header_size
TOO_DEEP = "too_deep"                   # nesting over max_depth
TOO_MANY_ATTRIBUTES = "too_many_attributes"
TEXT_AT_STREAM_LEVEL = "text_at_stream_level"  # non-whitespace character data between stanzas
DATA_AFTER_CLOSE = "data_after_close"   # bytes after </stream:stream>


@dataclass(frozen=True)
class XmppLimits:
    """XMPP stream limits (per connection)."""

    max_stanza_size: int = setting(256 * KiB, "Largest top-level element (stanza) in bytes; larger ends the "
                                   "stream. Prosody's default c2s stanza size limit is 256 KiB too.")
    max_server_stanza_size: int = setting(16 * MiB, "Largest stanza accepted from the server: servers send "
                                          "big rosters, MAM pages and disco results the client limit would cut.")
    max_header_size: int = setting(8 * KiB, "Largest stream header (with XML declaration and leading "
                                   "whitespace) in bytes; real headers are a few hundred bytes.")
    max_depth: int = setting(32, "Deepest element nesting inside the stream; real stanzas nest under 10.")
    max_stanza_elements: int = setting(30000, "Most elements in one stanza (from either side): each costs a few "
                                       "hundred bytes parsed, so a 16 MiB server stanza of empty elements would "
                                       "take gigabytes; larger ends the stream (stanza_too_large) before it is "
                                       "held whole. A roster of 10,000 contacts with a group each is 20,000.")
    max_attributes: int = setting(64, "Most attributes (namespace declarations included) on one element.")
    max_held_bytes: int = setting(16 * MiB, "Largest in-band (IBB) file held for scanning, decoded bytes; "
                                  "a larger transfer is refused (closed both ways) and recorded as too large.")
    max_transfers: int = setting(16, "Most in-band transfers held at once on one connection; more are refused.")
    max_tracked_ids: int = setting(4096, "Most stanza ids, file offers and upload requests remembered per "
                                   "connection (oldest forgotten first).")
    tracked_id_ttl: float = setting(600.0, "Seconds a remembered stanza id, offer or upload request is kept.")
    max_room_members: int = setting(10000, "Most room occupants remembered per connection, over all the rooms its "
                                    "user is in (from the room's presences), for the ethical walls' room checks; "
                                    "past it an occupant is not recorded (an anomaly) and the walls decide on "
                                    "the occupants known.")
    parse_slice: int = setting(64 * KiB, "Bytes handed to expat at a time, so a limit is checked before a "
                               "huge chunk is parsed whole.")
    upload_relay: list = setting([], "PUBLIC=UPSTREAM, two origins (scheme://host:port): the PUT URL of an "
                                 "XEP-0363 upload slot on UPSTREAM (the upload service) is rewritten to PUBLIC, a "
                                 "reverse listener of this gateway in front of it (--mode reverse:UPSTREAM@PORT), so "
                                 "a client that reaches the gateway directly (reverse deployments) or sends its HTTP "
                                 "around the proxy still uploads through it and the file is scanned; a link on "
                                 "UPSTREAM delivered to such a client is rewritten to PUBLIC too "
                                 "(--xmpp-upload-relay-links), so its download is scanned")
    upload_refuse_unrelayed: str = setting("auto", "When an XEP-0363 upload slot whose PUT URL no "
                                           "--xmpp-upload-relay covers is refused, with a notice to the client, so "
                                           "no upload goes around the scan: 'auto' on a connection that came "
                                           "through a reverse listener (its client's HTTP goes straight to the "
                                           "upload service; transparent and explicit-proxy connections keep their "
                                           "slots, their HTTP crosses the gateway), 'always', or 'never' (a "
                                           "reverse deployment whose clients send their HTTP through this "
                                           "gateway's proxy listener)")
    upload_relay_links: str = setting("auto", "When links on an upload service an --xmpp-upload-relay covers, in "
                                      "a message delivered to the client, are rewritten to the relay (and their "
                                      "download held and scanned there): 'auto' on a connection that came "
                                      "through a reverse listener (its client fetches straight from the upload "
                                      "service, unseen), 'always', or 'never' (the clients' HTTP crosses this "
                                      "gateway anyway; the link stays as its sender wrote it)")


# --- events -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamOpened:
    """A stream header `<stream:stream ...>` (with any XML declaration before it): a new stream or a restart."""
    raw: bytes
    attrs: dict[str, str] = field(default_factory=dict)   # namespaced keys as in ElementTree ('{ns}lang')


class Stanza:
    """One complete level-1 element: a stanza (message, presence, iq) or a nonza (starttls, auth, features...).
    Not changed once made. (A slotted class, not a frozen dataclass: one per stanza, and a frozen dataclass's
    __init__ costs several times more.)"""
    __slots__ = ("raw", "element")

    def __init__(self, raw: bytes, element: ET.Element):
        self.raw = raw
        self.element = element

    def __eq__(self, other: object) -> bool:      # for tests: same bytes is the same stanza
        return isinstance(other, Stanza) and other.raw == self.raw

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Stanza(raw={self.raw!r})"


@dataclass(frozen=True)
class Whitespace:
    """Whitespace between stanzas (a keepalive): forwarded as it is."""
    raw: bytes


@dataclass(frozen=True)
class StreamClosed:
    """`</stream:stream>`."""
    raw: bytes


@dataclass(frozen=True)
class XmlError:
    """The peer sent something the stream cannot continue after. Always fatal."""
    kind: str
    detail: str


Event = StreamOpened | Stanza | Whitespace | StreamClosed | XmlError


class _Restart(Exception):
    def __init__(self, position: int):
        self.position = position


class _Fatal(Exception):
    def __init__(self, kind: str, detail: str):
        self.kind, self.detail = kind, detail


def _tag(name: str) -> str:
    """expat's 'ns}local' as ElementTree's '{ns}local'. Remembered: the same few hundred names recur on
    every connection (bounded like _SHARED_NAMES, since a client can invent names)."""
    tag = _TAGS.get(name)
    if tag is None:
        uri, sep, local = name.rpartition("}")
        tag = "{" + name if sep and uri else local
        if len(_TAGS) > _SHARED_NAMES_MAX:
            _TAGS.clear()
        _TAGS[name] = tag
    return tag


def _attrs(attrs: dict[str, str]) -> dict[str, str]:
    if not attrs:
        return {}
    return {_tag(k): v for k, v in attrs.items()}


def _attrs_fast(attrs: dict[str, str]) -> dict[str, str]:
    """_attrs, giving back expat's own (fresh) dict when no name has a namespace: the usual case."""
    for name in attrs:
        if "}" in name:
            return {_tag(k): v for k, v in attrs.items()}
    return attrs


_WS = b" \t\r\n"


def _restricted(what: str):
    def handler(*args: Any) -> None:
        raise _Fatal(RESTRICTED, f"{what} in the stream (RFC 6120 §11.1 forbids it)")
    return handler


_NO_DTD = _restricted("a DTD")
_NO_ENTITY = _restricted("an entity declaration")
_NO_PI = _restricted("a processing instruction")
_NO_COMMENT = _restricted("a comment")


# Decoders made without saying which path build their trees in Python (the reference path) when true.
REFERENCE = False

_SHARED_NAMES: dict[str, str] = {}
_SHARED_NAMES_MAX = 20000
_TAGS: dict[str, str] = {}


class XmlStreamDecoder:
    """Frames one direction of an XMPP stream. See the module docstring."""

    def __init__(self, limits: XmppLimits = XmppLimits(), shallow: frozenset[str] = frozenset(),
                 reference: bool | None = None):
        self.limits = limits
        # The element tree is built by ElementTree's C TreeBuilder (the fast path, see "The message hot path"
        # in docs/architecture.md); with `reference` (default: REFERENCE), by Python code in each expat
        # callback, as it was first written. Both give the same events (tests/test_xmpp_fastpath.py feeds
        # them the same corpora, alone and under XmppSession).
        self.reference = REFERENCE if reference is None else reference
        # Level-1 tags ('{ns}local') whose Stanza.element is the element alone, without children or text:
        # framed and checked against every limit like the rest, but no tree is built (for stanzas the
        # consumer only forwards, such as the server's presences to its client).
        self.shallow = shallow
        self._skipping = False        # inside a shallow stanza
        self._buf = bytearray()       # bytes not yet emitted; _buf[0] is document position _base
        self._base = 0
        self._events: list[Event] = []
        self.dead = False
        self.closed = False           # </stream:stream> seen
        # An idle stream's expat parser is let go (see _release_if_idle); its header is kept to make it again.
        self._header = b""            # the current stream's header as _revive re-feeds it (_replayable)
        self._new_parser()

    # -- public -----------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for some in self.feed_pieces(data, self.limits.parse_slice):
            events += some
        return events

    def feed_pieces(self, data: bytes, piece_size: int) -> Iterator[list[Event]]:
        """feed(), handing expat `piece_size` bytes at a time (at most parse_slice) and yielding the events of
        each piece: the first stanzas of a large read can be acted on before the rest is parsed."""
        if self.dead or not data:
            return
        step = max(1, min(piece_size, self.limits.parse_slice))
        self._events = []
        try:
            if self.closed and data.strip(_WS):
                raise _Fatal(DATA_AFTER_CLOSE, "bytes after </stream:stream>")
            if self._parser is None:
                self._revive()
            for i in range(0, len(data), step):
                piece = data[i:i + step]
                self._buf += piece
                self._parse(piece)
                self._check_limits()
                if i + step >= len(data):
                    self._flush_whitespace()
                if self._events:
                    events, self._events = self._events, []
                    yield events
            self._release_if_idle()
        except _Fatal as e:
            self.dead = True
            self._events.append(XmlError(e.kind, e.detail))
        if self._events:
            events, self._events = self._events, []
            yield events

    def reset(self) -> None:
        """Forget everything: the next bytes start a new stream (used after a TLS handshake)."""
        self._buf = bytearray()
        self._base = 0
        self.closed = False
        self.dead = False
        self._header = b""
        self._new_parser()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in an event."""
        return len(self._buf)

    # -- parsing ----------------------------------------------------------------------------------

    def _release_if_idle(self) -> None:
        """At the end of a feed that leaves the stream between stanzas with nothing pending (every byte returned
        in an event), let go of the expat parser: after a stream header it holds ~10 KB (its pools, the
        namespace bindings), and two decoders per connection sit like that on every idle connection. The next
        feed makes a new one and re-feeds it the stream header (_revive): ~27,000 instructions, once per read
        (not per stanza), so a read of many stanzas hardly pays it and a chat read of one pays it whole."""
        if self._depth == 1 and not self._buf and not self.closed and self._header:
            self._parser = None

    def _revive(self) -> None:
        """A new parser, in the state the released one was in: inside the stream element (with the namespaces
        and encoding its header declared), its byte positions counted from the header's end, where _base is.
        The header is parsed before the handlers are set (it parsed once already): nothing is reported."""
        p = self._configured_parser()
        header = self._header
        try:
            p.Parse(header, False)
        except expat.ExpatError:                   # it parsed before: a bug
            raise _Fatal(MALFORMED, "the stream header did not parse again") from None
        self._wire(p)
        self._depth = 1
        self._base = len(header)

    def _new_parser(self) -> None:
        self._wire(self._configured_parser())
        self._depth = 0

    @staticmethod
    def _configured_parser() -> Any:
        # Element and attribute names are interned in one dict shared by every parser: they are the same
        # few hundred names on every connection (a dict per parser cost ~15 KB per idle connection). A
        # client inventing names could grow it, so it is bounded: past the bound it starts again.
        if len(_SHARED_NAMES) > _SHARED_NAMES_MAX:
            _SHARED_NAMES.clear()
        p = expat.ParserCreate(namespace_separator="}", intern=_SHARED_NAMES)
        p.buffer_size = 512              # the text buffer (default 8 KiB): two per connection, most idle
        p.buffer_text = True             # (after the size: the default one is not allocated first)
        if hasattr(p, "SetReparseDeferralEnabled"):
            p.SetReparseDeferralEnabled(False)      # report complete tokens now, not after more data
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        return p

    def _wire(self, p: Any) -> None:
        """The handlers, and the per-stanza state they keep."""
        if self.reference:
            p.StartElementHandler = self._start
            p.EndElementHandler = self._end
            p.CharacterDataHandler = self._text
            self._stack: list[ET.Element] = []
            self._has_content: list[bool] = []
        else:
            p.StartElementHandler = self._start_fast
            p.EndElementHandler = self._end_fast
            p.CharacterDataHandler = self._text_fast
            # The current stanza's tree is built in C, by a TreeBuilder of its own (one per stanza: a builder
            # keeps its last element, which must not outlive the stanza on an idle connection).
            self._tb: Any = None
            self._element: ET.Element | None = None     # the current level-1 element
            self._l1_content = False                    # it has a child or text (not an empty-element tag)
        p.StartDoctypeDeclHandler = _NO_DTD
        p.EntityDeclHandler = _NO_ENTITY
        p.ProcessingInstructionHandler = _NO_PI
        p.CommentHandler = _NO_COMMENT
        p.DefaultHandler = None
        self._parser = p
        self._start_pos = 0           # document position of the current level-1 element's start tag
        self._elements = 0            # elements of the current stanza so far

    def _parse(self, piece: bytes) -> None:
        while True:
            try:
                self._parser.Parse(piece, False)
                return
            except _Restart as r:
                self._restart_at(r.position)
            except expat.ExpatError as e:
                pos = self._declaration_restart_position()
                if pos is None:
                    raise _Fatal(MALFORMED, f"not well-formed XML: {expat.errors.messages[e.code]}") from None
                self._restart_at(pos)
            piece = bytes(self._buf)          # re-parse what follows the restart point with a new parser

    def _declaration_restart_position(self) -> int | None:
        """An `<?xml ...?>` after a complete stanza at stream level is a restart, not an error."""
        if self._depth != 1:
            return None
        rest = bytes(self._buf).lstrip(_WS)
        if rest.startswith(b"<?xml") or (len(rest) < 5 and b"<?xml".startswith(rest) and rest):
            return self._base + (len(self._buf) - len(rest))
        return None

    def _restart_at(self, position: int) -> None:
        keep = bytes(self._buf[position - self._base:])
        leading = bytes(self._buf[:position - self._base])
        if leading.strip(_WS):
            raise _Fatal(MALFORMED, "stream restart inside an element")
        if leading:
            self._events.append(Whitespace(leading))
        self._buf = bytearray(keep)
        self._base = 0
        self._new_parser()

    def _pos(self) -> int:
        return self._parser.CurrentByteIndex

    def _too_many_attributes(self, attrs: dict[str, str]) -> _Fatal:
        return _Fatal(TOO_MANY_ATTRIBUTES, f"an element with {len(attrs)} attributes "
                                           f"(max_attributes={self.limits.max_attributes})")

    def _nested(self) -> None:
        """One more element below level 1: the depth and element-count limits."""
        if self._depth >= self.limits.max_depth:
            raise _Fatal(TOO_DEEP, f"elements nested deeper than max_depth={self.limits.max_depth}")
        self._elements += 1
        if self._elements > self.limits.max_stanza_elements:
            raise _Fatal(STANZA_TOO_LARGE, f"a stanza of more than {self.limits.max_stanza_elements} elements "
                                           "(max_stanza_elements)")

    def _stream_header(self, tag: str, attrs: dict[str, str]) -> None:
        if tag != STREAM_TAG:
            raise _Fatal(MALFORMED, f"the stream must start with <stream:stream>, not {tag}")
        end = self._pos() - self._base
        end = _tag_end(self._buf, end)
        if end > self.limits.max_header_size:
            raise _Fatal(HEADER_TOO_LARGE, f"a stream header of {end} bytes (max_header_size="
                                           f"{self.limits.max_header_size})")
        raw = bytes(self._buf[:end])
        del self._buf[:end]
        self._base += end
        self._depth = 1
        self._header = _replayable(raw)
        self._events.append(StreamOpened(raw, _attrs(attrs)))

    def _level1_start(self, tag: str) -> None:
        if tag == STREAM_TAG:
            raise _Restart(self._pos())
        self._start_pos = self._pos()
        self._elements = 1
        self._skipping = tag in self.shallow

    def _level1_end(self, had_content: bool) -> int:
        """Where the level-1 element that just ended ends in _buf (its limit checked)."""
        pos = self._pos() - self._base
        if not had_content and self._buf[pos - 2:pos] == b"/>":
            end = pos                         # empty-element tag: expat reports its end
        else:
            end = self._buf.find(b">", pos) + 1     # an end tag: no attributes, so no quoted '>'
            if end == 0:
                raise _Fatal(MALFORMED, "an end tag without its closing '>'")   # expat said otherwise: a bug
        if end > self.limits.max_stanza_size:
            raise _Fatal(STANZA_TOO_LARGE, f"a stanza of {end} bytes (max_stanza_size="
                                           f"{self.limits.max_stanza_size})")
        return end

    def _stream_end(self) -> None:
        pos = self._pos() - self._base
        end = _tag_end(self._buf, pos)
        self._emit_raw(end, StreamClosed)
        self._depth = 0
        self.closed = True

    # The reference path: the tree built in Python, in every callback.

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if len(attrs) > self.limits.max_attributes:
            raise self._too_many_attributes(attrs)
        tag = _tag(name)
        if self._depth == 0:
            self._stream_header(tag, attrs)
            return
        if self._depth == 1:
            self._level1_start(tag)
            el = ET.Element(tag, _attrs(attrs))
        else:
            self._nested()
            el = None if self._skipping else ET.SubElement(self._stack[-1], tag, _attrs(attrs))
            self._has_content[-1] = True
        self._stack.append(el)
        self._has_content.append(False)
        self._depth += 1

    def _end(self, name: str) -> None:
        if self._depth == 1:                      # </stream:stream>
            self._stream_end()
            return
        el = self._stack.pop()
        had_content = self._has_content.pop()
        self._depth -= 1
        if self._depth == 1:
            self._emit_raw(self._level1_end(had_content), Stanza, el)

    def _text(self, data: str) -> None:
        if self._depth <= 1:
            if data.strip(" \t\r\n"):
                raise _Fatal(TEXT_AT_STREAM_LEVEL, "character data between stanzas")
            return
        self._has_content[-1] = True
        if self._skipping:
            return
        el = self._stack[-1]
        if len(el):
            last = el[-1]
            last.tail = (last.tail or "") + data
        else:
            el.text = (el.text or "") + data

    # The fast path: the same framing and limits, with the tree built by the C TreeBuilder. Below level 1 a
    # callback only counts, checks and hands expat's name and attributes on (names as ElementTree spells them).

    def _start_fast(self, name: str, attrs: dict[str, str]) -> None:
        if len(attrs) > self.limits.max_attributes:
            raise self._too_many_attributes(attrs)
        depth = self._depth
        if depth >= 2:
            if depth >= self.limits.max_depth or self._elements >= self.limits.max_stanza_elements:
                self._nested()                  # raises the limit's error
            self._elements += 1
            self._l1_content = True
            self._depth = depth + 1
            if not self._skipping:
                self._tb.start(_TAGS.get(name) or _tag(name), _attrs_fast(attrs) if attrs else attrs)
            return
        tag = _TAGS.get(name) or _tag(name)
        if depth == 0:
            self._stream_header(tag, attrs)
            return
        if tag == STREAM_TAG:
            raise _Restart(self._parser.CurrentByteIndex)
        self._start_pos = self._parser.CurrentByteIndex
        self._elements = 1
        self._l1_content = False
        self._depth = 2
        # A shallow stanza is its element alone, outside the builder.
        if tag in self.shallow:
            self._skipping = True
            self._element = ET.Element(tag, _attrs_fast(attrs))
        else:
            self._skipping = False
            self._tb = ET.TreeBuilder()
            self._element = self._tb.start(tag, _attrs_fast(attrs))

    def _end_fast(self, name: str) -> None:
        depth = self._depth - 1
        if depth == 0:                            # </stream:stream>
            self._stream_end()
            return
        self._depth = depth
        if depth > 1:
            if not self._skipping:
                self._tb.end(name)
            return
        el = self._element
        if not self._skipping:
            self._tb.end(name)
            self._tb = None
        self._element = None
        end = self._level1_end(self._l1_content)
        buf = self._buf                         # _emit_raw, inline: once per stanza
        raw = bytes(buf[:end])
        del buf[:end]
        self._base += end
        self._events.append(Stanza(raw, el))

    def _text_fast(self, data: str) -> None:
        if self._depth <= 1:
            if data.strip(" \t\r\n"):
                raise _Fatal(TEXT_AT_STREAM_LEVEL, "character data between stanzas")
            return
        self._l1_content = True
        if not self._skipping:
            self._tb.data(data)

    def _emit_raw(self, end: int, make, *args) -> None:
        raw = bytes(self._buf[:end])
        del self._buf[:end]
        self._base += end
        self._events.append(make(raw, *args))

    def _flush_whitespace(self) -> None:
        if self._depth == 1 and self._buf and not bytes(self._buf).strip(_WS):
            self._emit_raw(len(self._buf), Whitespace)

    def _check_limits(self) -> None:
        pending = len(self._buf)
        if self._depth == 0 and not self.closed and pending > self.limits.max_header_size:
            raise _Fatal(HEADER_TOO_LARGE, f"{pending} bytes without a complete stream header "
                                           f"(max_header_size={self.limits.max_header_size})")
        if self._depth >= 1 and pending > self.limits.max_stanza_size:
            raise _Fatal(STANZA_TOO_LARGE, f"a stanza of more than {self.limits.max_stanza_size} bytes "
                                           f"(max_stanza_size)")


_START = re.compile(rb"<([^\s/>]+)")
_ATTRIBUTE = re.compile(rb"\s+([^\s=>]+)\s*=\s*('[^']*'|\"[^\"]*\")")
_CLOSE = re.compile(rb"\s*>")


def _replayable(header: bytes) -> bytes:
    """The stream header as _revive re-feeds it: its XML declaration only if it names an encoding (the stanzas
    after it are in that encoding), and of its attributes only the namespace declarations (the prefixes and the
    default namespace the stanzas after it are read in). It is a third of the bytes, and of the work. A header
    this does not read (one in UTF-16, say) is re-fed as it came."""
    decl = b""
    if header.startswith(b"<?xml"):
        end = header.find(b"?>") + 2
        if end > 1 and b"encoding" in header[:end]:
            decl = header[:end]
        tag = header[end:].lstrip(_WS)
    else:
        tag = header
    start = _START.match(tag)
    if start is None:
        return header
    out = [decl, b"<", start.group(1)]
    at = start.end()
    while (attribute := _ATTRIBUTE.match(tag, at)) is not None:
        name = attribute.group(1)
        if name == b"xmlns" or name.startswith(b"xmlns:"):
            out += [b" ", name, b"=", attribute.group(2)]
        at = attribute.end()
    close = _CLOSE.match(tag, at)
    if close is None or close.end() != len(tag):
        return header
    out.append(b">")
    return b"".join(out)


def _tag_end(buf: bytearray, pos: int) -> int:
    """The index just after the '>' closing the tag that starts at `pos` ('>' inside quotes skipped)."""
    quote = 0
    for i in range(pos, len(buf)):
        c = buf[i]
        if quote:
            if c == quote:
                quote = 0
        elif c in (0x22, 0x27):
            quote = c
        elif c == 0x3E:
            return i + 1
    raise _Fatal(MALFORMED, "a tag without its closing '>'")   # expat reported a tag we do not hold: a bug
