"""XmlStreamDecoder: bytes in, events out; byte-exact, split anywhere, hostile input bounded."""

import json
from pathlib import Path

import pytest

from imguard.protocols.xmpp.decoder import (HEADER_TOO_LARGE, MALFORMED, RESTRICTED, STANZA_TOO_LARGE,
                                            TEXT_AT_STREAM_LEVEL, TOO_DEEP, TOO_MANY_ATTRIBUTES, Stanza,
                                            StreamClosed, StreamOpened, Whitespace, XmlError, XmlStreamDecoder,
                                            XmppLimits)

DATA = Path(__file__).parent / "data" / "xmpp"

HEADER = (b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")


def side(name, direction):
    """All bytes one side sent in a capture transcript (see tests/data/xmpp/*.json 'source')."""
    t = json.loads((DATA / name).read_text())
    return b"".join(seg.encode("latin-1") for d, seg in t["segments"] if d == direction)


def feed_all(data, limits=XmppLimits(), pieces=None):
    dec = XmlStreamDecoder(limits)
    if pieces is None:
        return dec.feed(data)
    out = []
    for p in pieces:
        out += dec.feed(p)
    return out


def kinds(events):
    return [type(e).__name__ for e in events]


TRANSCRIPTS = [(n, d) for n in ("httpupload_alice.json", "ibb_socks5_alice.json", "ndpi_jabber_pidgin.json")
               for d in "cs"]


@pytest.mark.parametrize("name,direction", TRANSCRIPTS)
def test_real_streams_frame_byte_exact(name, direction):
    """Every byte of a real stream comes back in exactly one event, in order, with no error."""
    data = side(name, direction)
    events = feed_all(data)
    assert b"".join(e.raw for e in events) == data
    assert not [e for e in events if isinstance(e, XmlError)]
    assert isinstance(events[0], StreamOpened)
    assert isinstance(events[-1], StreamClosed) or name.startswith("ndpi")   # that capture stops mid-stream


def test_client_stream_events_read_like_the_capture():
    """alice's stream: header, auth, response, restart (no XML declaration), bind, presence, message..."""
    events = feed_all(side("httpupload_alice.json", "c"))
    tags = [e.element.tag.split("}")[1] if isinstance(e, Stanza) else type(e).__name__ for e in events]
    assert tags == ["StreamOpened", "auth", "response", "StreamOpened", "iq", "presence", "message", "iq", "iq",
                    "iq", "message", "StreamClosed"]
    message = events[6]
    assert message.element.get("to") == "bob@localhost"
    assert message.element.find("{jabber:client}body").text == "hello bob (plain chat)"


def test_server_restart_with_xml_declaration_is_a_new_stream():
    """After SASL <success/> Prosody sends '<?xml ...?><stream:stream>' again: a restart, not an error."""
    events = feed_all(side("httpupload_alice.json", "s"))
    opened = [e for e in events if isinstance(e, StreamOpened)]
    assert len(opened) == 2
    assert opened[1].raw.startswith(b"<?xml version='1.0'?><stream:stream")
    assert opened[1].attrs["from"] == "localhost"


@pytest.mark.parametrize("name,direction", [("httpupload_alice.json", "c"), ("httpupload_alice.json", "s")])
def test_chunk_boundaries(name, direction):
    """The stream split at every byte offset gives the same events (h11's test_chunk_boundaries)."""
    data = side(name, direction)
    expected = feed_all(data)
    for i in range(1, len(data)):
        assert feed_all(data, pieces=[data[:i], data[i:]]) == expected, f"split at {i}"


def test_byte_by_byte():
    """One byte at a time, the IBB transcript (with restarts and large base64 stanzas) frames the same."""
    data = side("ibb_socks5_alice.json", "c")
    assert feed_all(data, pieces=[data[i:i + 1] for i in range(len(data))]) == feed_all(data)


def test_partial_stanza_is_held_until_complete():
    """A stanza cut in the middle is not reported; its bytes wait in the buffer."""
    dec = XmlStreamDecoder()
    assert kinds(dec.feed(HEADER + b"<message><body>hel")) == ["StreamOpened"]
    assert dec.buffered == len(b"<message><body>hel")
    (st,) = dec.feed(b"lo</body></message>")
    assert st.raw == b"<message><body>hello</body></message>" and dec.buffered == 0


def test_greater_than_inside_attribute_and_empty_elements():
    """'>' in a quoted attribute value does not end the tag; <x/> at top level is one element."""
    events = feed_all(HEADER + b"<presence status='a>b'/><iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert [e.raw for e in events[1:]] == [b"<presence status='a>b'/>",
                                           b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>"]


def test_whitespace_keepalive_is_reported_at_once():
    """A keepalive space between stanzas is forwarded now, not when the next stanza arrives."""
    dec = XmlStreamDecoder()
    dec.feed(HEADER)
    assert dec.feed(b" ") == [Whitespace(b" ")]


def test_entities_are_not_resolved_beyond_the_predefined():
    """&amp; and character references decode; there is no way to declare another entity."""
    (_, st) = feed_all(HEADER + b"<message><body>a &amp; b &#65;</body></message>")
    assert st.element.find("{jabber:client}body").text == "a & b A"


@pytest.mark.parametrize("evil,kind", [
    (b"<!DOCTYPE lol [<!ENTITY lol 'lol'>]>", MALFORMED),                # a DTD inside the stream: not XML
    (b"<?php echo 1 ?>", RESTRICTED),                                      # processing instruction
    (b"<!-- hello -->", RESTRICTED),                                       # comment
    (b"<message><body>&lol;</body></message>", MALFORMED),                # undefined entity
    (b"<message><body></message>", MALFORMED),                            # mismatched tag
    (b"<x:message/>", MALFORMED),                                          # unbound prefix
    (b"hello", TEXT_AT_STREAM_LEVEL),
])
def test_restricted_and_malformed_xml_is_fatal(evil, kind):
    """RFC 6120 §11.1: no DTD, PI or comment; malformed XML ends the stream; later bytes are ignored."""
    dec = XmlStreamDecoder()
    events = dec.feed(HEADER + b"<presence/>" + evil)
    assert kinds(events) == ["StreamOpened", "Stanza", "XmlError"]
    assert events[-1].kind == kind
    assert dec.dead and dec.feed(b"<presence/>") == []


def test_doctype_before_the_stream_is_refused():
    """A DTD in the prolog is refused before any entity could be declared."""
    events = feed_all(b"<?xml version='1.0'?><!DOCTYPE s [<!ENTITY a 'aaaa'>]><stream:stream/>")
    assert events[-1] == XmlError(RESTRICTED, events[-1].detail)


def test_stanza_size_limit_edge():
    """A stanza of exactly max_stanza_size bytes passes; one byte more ends the stream."""
    limits = XmppLimits(max_stanza_size=100)
    stanza = b"<message><body>" + b"x" * (100 - len(b"<message><body></body></message>")) + b"</body></message>"
    assert len(stanza) == 100
    assert kinds(feed_all(HEADER + stanza, limits)) == ["StreamOpened", "Stanza"]
    bigger = stanza.replace(b"<body>", b"<body>x")
    events = feed_all(HEADER + bigger, limits)
    assert events[-1].kind == STANZA_TOO_LARGE


def test_oversized_stanza_is_refused_before_it_completes():
    """An endless stanza is cut off at the limit, not buffered forever."""
    dec = XmlStreamDecoder(XmppLimits(max_stanza_size=1000))
    dec.feed(HEADER + b"<message><body>")
    events = []
    for _ in range(20):
        events += dec.feed(b"y" * 100)
    assert [e.kind for e in events] == [STANZA_TOO_LARGE]


def test_header_size_limit():
    """Bytes without a complete stream header are bounded by max_header_size."""
    events = feed_all(b"<stream:stream " + b"a" * 100, XmppLimits(max_header_size=64))
    assert events[-1].kind == HEADER_TOO_LARGE


def test_depth_limit_edge():
    """Nesting up to max_depth (stream = 1, stanza = 2, ...) is fine; one deeper is fatal."""
    limits = XmppLimits(max_depth=5)
    ok = b"<iq><a><b><c></c></b></a></iq>"            # depths 2..5
    assert kinds(feed_all(HEADER + ok, limits)) == ["StreamOpened", "Stanza"]
    deep = b"<iq><a><b><c><d/></c></b></a></iq>"
    assert feed_all(HEADER + deep, limits)[-1].kind == TOO_DEEP


def test_attribute_limit():
    """More than max_attributes attributes on one element is fatal."""
    attrs = b" ".join(b"a%d='1'" % i for i in range(5))
    events = feed_all(HEADER + b"<presence " + attrs + b"/>", XmppLimits(max_attributes=4))
    assert events[-1].kind == TOO_MANY_ATTRIBUTES


def test_close_then_nothing():
    """</stream:stream> is reported; anything but whitespace after it is an error."""
    dec = XmlStreamDecoder()
    events = dec.feed(HEADER + b"</stream:stream>")
    assert kinds(events) == ["StreamOpened", "StreamClosed"]
    assert dec.feed(b"<presence/>")[0].kind == "data_after_close"


def test_reset_starts_a_new_stream():
    """After TLS the session resets the decoder: a new header without declaration is a fresh stream."""
    dec = XmlStreamDecoder()
    dec.feed(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    dec.reset()
    assert kinds(dec.feed(HEADER + b"<presence/>")) == ["StreamOpened", "Stanza"]


def test_shallow_stanzas_are_framed_and_bounded_without_a_tree():
    """A shallow tag (the server's messages, only forwarded): the same bytes and top element, no children;
    other stanzas keep their tree; the limits still hold inside a shallow stanza."""
    message = (b"<message from='a@x/r' to='b@x/r' type='chat' id='1'><body>hi &amp; <b>bye</b></body>"
               b"<x xmlns='jabber:x:oob'><url>https://x/f</url></x></message>")
    iq = b"<iq type='result' id='2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>b@x/r</jid></bind></iq>"
    shallow = frozenset({"{jabber:client}message"})
    for pieces in ([HEADER + message + iq], [bytes([c]) for c in HEADER + message + iq]):
        dec = XmlStreamDecoder(shallow=shallow)
        events = [e for p in pieces for e in dec.feed(p)]
        assert kinds(events) == ["StreamOpened", "Stanza", "Stanza"]
        assert events[1].raw == message and events[2].raw == iq
        assert events[1].element.tag == "{jabber:client}message" and events[1].element.get("id") == "1"
        assert len(events[1].element) == 0 and not events[1].element.text
        assert events[2].element.find("{urn:ietf:params:xml:ns:xmpp-bind}bind") is not None
    deep = b"<message>" + b"<a>" * 40 + b"</a>" * 40 + b"</message>"
    events = XmlStreamDecoder(XmppLimits(max_depth=10), shallow=shallow).feed(HEADER + deep)
    assert isinstance(events[-1], XmlError) and events[-1].kind == TOO_DEEP


def test_feed_pieces_yields_each_piece_events_as_feed_would():
    """feed_pieces: the same events as feed(), in order, the first ones before the rest of the read is parsed."""
    stanzas = b"".join(b"<message to='b@x' id='%d'><body>number %d</body></message>" % (n, n) for n in range(40))
    whole = XmlStreamDecoder().feed(HEADER + stanzas + b" ")
    pieces = list(XmlStreamDecoder().feed_pieces(HEADER + stanzas + b" ", 256))
    assert len(pieces) >= 10 and [e for some in pieces for e in some] == whole
    assert kinds(pieces[0])[0] == "StreamOpened" and isinstance(whole[-1], Whitespace)
    broken = list(XmlStreamDecoder().feed_pieces(HEADER + stanzas[:300] + b"<a></b>" + stanzas, 128))
    assert isinstance(broken[-1][-1], XmlError) and kinds(broken[0])[0] == "StreamOpened"
