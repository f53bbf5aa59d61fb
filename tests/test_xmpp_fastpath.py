"""The XMPP decoder's fast path against its reference path: the same bytes give the same events.

XmlStreamDecoder builds each stanza's element tree with ElementTree's C TreeBuilder (the fast path, the default);
`reference=True` builds it in Python in every expat callback, as the decoder was first written. Framing, limits and
errors are shared code, the trees are not: each test feeds both the same input, cut the same way, and asserts
identical events (raw bytes, element trees compared node by node, error kinds and details), and under XmppSession
identical commands and identical questions to the checker (so identical decisions). The corpora: the stored
transcripts (tests/data/xmpp, which the session tests replay), the XMPP fuzz seeds and regressions (tests/fuzz),
hand-written edge cases of the framing, and deterministic mutations of all of them.
"""

from __future__ import annotations

import random
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from imguard.model import ALERT, BLOCK, MASK, ChatContext, Decision
from imguard.protocols.base import Send
from imguard.protocols.xmpp import XmppLimits, XmppSession
from imguard.protocols.xmpp import decoder as dec
from imguard.protocols.xmpp.decoder import Stanza, StreamClosed, StreamOpened, Whitespace, XmlError, XmlStreamDecoder
from imguard.protocols.xmpp.session import SERVER_STANZAS_FORWARDED
from imguard.files.expected import ExpectedTransfers
from tests.fuzz import fuzz_xmpp
from tests.fuzz.common import decode, transcript
from tests.fuzz.regressions import REGRESSIONS

DATA = Path(__file__).parent / "data" / "xmpp"
CTX = ChatContext(protocol="xmpp", client_address="127.0.0.1:41998", server_address="127.0.0.1:15222",
                  connection_id="c1")
HEADER = (b"<?xml version='1.0'?><stream:stream to='example.com' version='1.0' xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams'>")
SMALL = XmppLimits(max_stanza_size=2000, max_header_size=600, max_depth=8, max_stanza_elements=40, max_attributes=6)
CUTS = (None, 1, 7, 64, 1024)          # None: the whole input in one feed


def transcripts() -> dict[str, list[tuple[bool, bytes]]]:
    return {path.stem: transcript(path) for path in sorted(DATA.glob("*.json"))}


def directions(segments: list[tuple[bool, bytes]]) -> list[list[bytes]]:
    """A transcript as the two streams a session decodes, each with the transcript's own reads."""
    return [[data for side, data in segments if side == from_client] for from_client in (True, False)]


EDGE_CASES = {
    # an empty-element stanza right before the stream's end tag (its end is found from the '/>')
    "empty_then_close": [HEADER + b"<presence/></stream:stream>"],
    # text that ends with '/>' just before the end tag: not an empty-element tag
    "text_ends_like_empty_tag": [HEADER + b"<message><body>a/></body></message><iq>x/></iq>"],
    "child_ends_like_empty_tag": [HEADER + b"<message><x xmlns='urn:x'/></message>"],
    "tails_and_mixed_text": [HEADER + b"<message><body>a<b>b</b>c<i/>d</body>e<x xmlns='u:x'>f</x>g</message>"],
    "entities_and_cdata": [HEADER + b"<message><body>&lt;&amp;&#x263A;<![CDATA[<not a tag/>]]>&gt;</body></message>"],
    "namespaced_attributes": [HEADER + b"<message xml:lang='en' xmlns:p='urn:p' p:a='1' to='b@x'>"
                              b"<body xml:lang='de' p:b='2'>hallo</body><p:thing p:c='3'/></message>"],
    "prefixed_stanza": [HEADER + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
                        b"</starttls></stream:features>"],
    "forwarded_inside": [HEADER + b"<message to='a@x'><forwarded xmlns='urn:xmpp:forward:0'><message "
                         b"xmlns='jabber:client' to='b@x'><body>inner</body></message></forwarded>"
                         b"<body>outer</body></message>"],
    "presence_shallow": [HEADER + b"<presence from='a@x/r'><show>away</show><status>lunch <b>now</b></status>"
                         b"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/></presence>"
                         b"<message><body>after</body></message>"],
    "whitespace_keepalives": [HEADER, b" ", b"\n\n", b"<message><body>x</body></message>", b"\t \r\n"],
    "restart_with_declaration": [HEADER + b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
                                 b" <?xml version='1.0'?>" + HEADER[21:] + b"<iq type='set' id='b'/>"],
    "restart_without_declaration": [HEADER + b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" + HEADER[21:]
                                    + b"<iq/>"],
    "restart_inside_an_element": [HEADER + b"<message>" + HEADER],
    "text_at_stream_level": [HEADER + b"<iq/>hello<iq/>"],
    "cdata_at_stream_level": [HEADER + b"<iq/><![CDATA[x]]>"],
    "comment": [HEADER + b"<message><!-- hi --></message>"],
    "comment_between": [HEADER + b"<iq/><!-- hi --><iq/>"],
    "processing_instruction": [HEADER + b"<message><?pi x?></message>"],
    "doctype": [b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]>" + HEADER[21:]],
    "undefined_entity": [HEADER + b"<message><body>&nope;</body></message>"],
    "unbound_prefix": [HEADER + b"<message><q:body>x</q:body></message>"],
    "mismatched_tag": [HEADER + b"<message><body>x</message>"],
    "not_a_stream": [b"<message/>"],
    "too_deep": [HEADER + b"<a>" * 12 + b"x" + b"</a>" * 12],
    "too_many_elements": [HEADER + b"<message>" + b"<x/>" * 50 + b"</message>"],
    "too_many_attributes": [HEADER + b"<message " + b" ".join(b"a%d='1'" % i for i in range(9)) + b"/>"],
    "stanza_too_large": [HEADER + b"<message><body>" + b"y" * 3000 + b"</body></message>"],
    "header_too_large": [b"<?xml version='1.0'?>" + b" " * 700 + HEADER[21:]],
    "data_after_close": [HEADER + b"</stream:stream>", b"<iq/>"],
    "whitespace_after_close": [HEADER + b"<iq/></stream:stream>", b"  \n"],
    "utf8_and_latin1_declared": [HEADER + "<message><body>grüße ☺ 𝄞</body></message>".encode(),
                                 b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:] + b"<m>\xe9</m>"],
    "gt_in_attribute": [HEADER + b"<message to='a>b' id=\"c>d\"><body a='/>'>x</body></message>"],
    # Input after the parser was let go on an idle stream (between reads, nothing pending): a new parser re-fed
    # the header must still know its namespaces (default, stream:, any other prefix) and its encoding.
    "idle_between_stanzas": [HEADER, b"<message><body>1</body></message>", b"\n",
                             b"<message xml:lang='en'><body>2</body></message>", b"<stream:features><bind "
                             b"xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>", b"</stream:stream>"],
    "idle_other_prefixes": [b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:"
                            b"dialback' xmlns:p='urn:p' xmlns:stream='http://etherx.jabber.org/streams' "
                            b"version='1.0'>", b"<db:result from='a' to='b'>k</db:result>",
                            b"<message p:x='1'><p:y/></message>", b"<p:z p:a='2'/>", b"<q:z/>"],
    "idle_latin1": [b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:], b"<m>\xe9</m>", b"<m>\xfc\xe9</m>"],
    "idle_then_restart": [HEADER, b"<iq/>", b"<?xml version='1.0'?>" + HEADER[21:], b"<iq/>", HEADER[21:], b"<iq/>"],
    "idle_then_text": [HEADER, b"<iq/>", b"  ", b"x<iq/>"],
    "idle_then_errors": [HEADER, b"<iq/>", b"<message><!-- c --></message>"],
    "idle_then_unbound_prefix": [HEADER + b"<iq/>", b"<stream:features/>", b"<q:iq/>"],
    # a header only the namespace declarations of which are re-fed: other prefixes, spacing, quotes, look-alikes
    "idle_odd_header": [b"<s:stream xmlns:s='http://etherx.jabber.org/streams'\n xmlns = \"jabber:client\" "
                        b"to='a>b xmlns:q=\"u:q\"' xmlns:p='urn:p' >", b"<message/>", b"<p:x/>", b"<s:features/>",
                        b"<q:x/>"],
}


def node(el: ET.Element | None) -> tuple | None:
    """An element tree as a comparable value: tag, attributes, text, tail and children, all the way down."""
    if el is None:
        return None
    return (el.tag, dict(el.attrib), el.text, el.tail, tuple(node(child) for child in el))


def comparable(event) -> tuple:
    if isinstance(event, Stanza):
        return ("stanza", event.raw, node(event.element))
    if isinstance(event, StreamOpened):
        return ("opened", event.raw, event.attrs)
    if isinstance(event, (Whitespace, StreamClosed)):
        return (type(event).__name__, event.raw)
    assert isinstance(event, XmlError), event
    return ("error", event.kind, event.detail)


def run(reads: list[bytes], cut: int | None, reference: bool, limits: XmppLimits, shallow: frozenset[str]) -> list:
    decoder = XmlStreamDecoder(limits, shallow=shallow, reference=reference)
    out = []
    for data in reads:
        if cut is None:
            out += [comparable(e) for e in decoder.feed(data)]
        else:
            for i in range(0, len(data), cut):
                out += [comparable(e) for e in decoder.feed(data[i:i + cut])]
    return out


def assert_same(reads: list[bytes], limits: XmppLimits = XmppLimits(), cuts=CUTS) -> int:
    """Both paths, every cut, with and without shallow presences; returns how many events the fast path made."""
    made = 0
    for shallow in (frozenset(), SERVER_STANZAS_FORWARDED):
        for cut in cuts:
            fast = run(reads, cut, False, limits, shallow)
            reference = run(reads, cut, True, limits, shallow)
            assert fast == reference, (cut, shallow)
            assert b"".join(e[1] for e in fast if e[0] != "error") == b"".join(reads)[:sum(
                len(e[1]) for e in fast if e[0] != "error")]          # byte-exact framing, on both paths
            made += len(fast)
    return made


@pytest.mark.parametrize("name", sorted(transcripts()))
def test_transcripts_decode_the_same_on_both_paths(name):
    """Every stored XMPP transcript, each direction as it was read: the same events from both paths (a capture
    taken mid-stream has no stream header: its events are the error that says so)."""
    for reads in directions(transcripts()[name]):
        assert assert_same(reads) > 0


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases_decode_the_same_on_both_paths(name):
    """Hand-written framing edge cases, errors included: the same events, the same error kinds and details."""
    assert_same(EDGE_CASES[name], SMALL)


def test_edge_cases_reach_what_they_name():
    """The edge cases are not vacuous: the empty-element cases frame as stanzas, the hostile ones fail with the
    error their name says (on the fast path, which test_edge_cases_decode_the_same_on_both_paths ties to the
    reference)."""
    def events(name):
        return run(EDGE_CASES[name], None, False, SMALL, frozenset())
    assert [e[1] for e in events("empty_then_close")][1:] == [b"<presence/>", b"</stream:stream>"]
    assert events("text_ends_like_empty_tag")[1][2][4][0][2] == "a/>"
    assert [e[1] for e in events("text_ends_like_empty_tag")][1:] == [b"<message><body>a/></body></message>",
                                                                     b"<iq>x/></iq>"]
    assert events("presence_shallow")[1][2][4][1] == ("{jabber:client}status", {}, "lunch ", None,
                                                      (("{jabber:client}b", {}, "now", None, ()),))
    shallow = run(EDGE_CASES["presence_shallow"], None, False, SMALL, SERVER_STANZAS_FORWARDED)
    assert shallow[1][2] == ("{jabber:client}presence", {"from": "a@x/r"}, None, None, ())
    assert shallow[2][2][4][0][2] == "after"
    kinds = {name: [e[1] for e in events(name) if e[0] == "error"] for name in EDGE_CASES}
    assert kinds["too_deep"] == [dec.TOO_DEEP]
    assert kinds["too_many_elements"] == [dec.STANZA_TOO_LARGE]
    assert kinds["too_many_attributes"] == [dec.TOO_MANY_ATTRIBUTES]
    assert kinds["stanza_too_large"] == [dec.STANZA_TOO_LARGE]
    assert kinds["header_too_large"] == [dec.HEADER_TOO_LARGE]
    assert kinds["comment"] == kinds["processing_instruction"] == kinds["doctype"] == [dec.RESTRICTED]
    assert kinds["text_at_stream_level"] == kinds["cdata_at_stream_level"] == [dec.TEXT_AT_STREAM_LEVEL]
    assert kinds["data_after_close"] == [dec.DATA_AFTER_CLOSE]
    assert kinds["mismatched_tag"] == kinds["unbound_prefix"] == kinds["restart_inside_an_element"] == [dec.MALFORMED]
    assert [e[0] for e in events("restart_with_declaration")].count("opened") == 2


def stanza_tags(name: str) -> list:
    return [e[2][0] for e in run(EDGE_CASES[name], None, False, SMALL, frozenset()) if e[0] == "stanza"]


def test_input_after_an_idle_release_keeps_the_headers_namespaces_and_encoding():
    """After each read that leaves the stream between stanzas the decoder lets go of its expat parser (idle
    memory, issue 21); the stanzas that come after are read in the header's namespaces (default, stream:,
    db: and any other prefix it declares) and encoding, on the fast path (tied to the reference above); an
    undeclared prefix is still an error."""
    assert stanza_tags("idle_between_stanzas") == ["{jabber:client}message", "{jabber:client}message",
                                                   "{http://etherx.jabber.org/streams}features"]
    events = run(EDGE_CASES["idle_between_stanzas"], None, False, SMALL, frozenset())
    assert events[-1] == ("StreamClosed", b"</stream:stream>")
    assert events[3][2][1] == {"{http://www.w3.org/XML/1998/namespace}lang": "en"}
    assert stanza_tags("idle_other_prefixes") == ["{jabber:server:dialback}result", "{jabber:server}message",
                                                  "{urn:p}z"]
    other = run(EDGE_CASES["idle_other_prefixes"], None, False, SMALL, frozenset())
    assert other[2][2][1] == {"{urn:p}x": "1"} and other[2][2][4][0][0] == "{urn:p}y"
    assert other[-1][:2] == ("error", dec.MALFORMED)
    assert [e[2][2] for e in run(EDGE_CASES["idle_latin1"], None, False, SMALL, frozenset())[1:]] == ["é", "üé"]
    restarts = run(EDGE_CASES["idle_then_restart"], None, False, SMALL, frozenset())
    assert [e[0] for e in restarts] == ["opened", "stanza", "opened", "stanza", "opened", "stanza"]
    assert run(EDGE_CASES["idle_then_text"], None, False, SMALL, frozenset())[-1][:2] == ("error",
                                                                                          dec.TEXT_AT_STREAM_LEVEL)
    assert run(EDGE_CASES["idle_then_errors"], None, False, SMALL, frozenset())[-1][:2] == ("error", dec.RESTRICTED)
    assert run(EDGE_CASES["idle_then_unbound_prefix"], None, False, SMALL, frozenset())[-1][:2] == ("error",
                                                                                                   dec.MALFORMED)
    odd = run(EDGE_CASES["idle_odd_header"], None, False, SMALL, frozenset())
    assert odd[0][2] == {"to": "a>b xmlns:q=\"u:q\""}
    assert [e[2][0] for e in odd[1:4]] == ["{jabber:client}message", "{urn:p}x",
                                           "{http://etherx.jabber.org/streams}features"]
    assert odd[-1][:2] == ("error", dec.MALFORMED)              # q: was never declared, only quoted


@pytest.mark.parametrize("reference", [False, True])
def test_the_parser_is_let_go_only_when_idle(reference):
    """The parser is released at the end of a feed that leaves nothing pending between stanzas, and only then:
    not inside a stanza, not with part of a tag pending, not before the header is complete, not after the close."""
    decoder = XmlStreamDecoder(reference=reference)
    decoder.feed(HEADER[:40])
    assert decoder._parser is not None
    decoder.feed(HEADER[40:])
    assert decoder._parser is None                               # idle after the header
    decoder.feed(b"<message><body>x</bo")
    assert decoder._parser is not None and decoder.buffered
    decoder.feed(b"dy></message><pres")
    assert decoder._parser is not None
    decoder.feed(b"ence/>")
    assert decoder._parser is None and not decoder.buffered
    decoder.feed(b"</stream:stream>")
    assert decoder._parser is not None and decoder.closed


def without_release(monkeypatch, inputs: list[list[bytes]], limits: XmppLimits) -> None:
    """Every input, both paths, every cut: the same events with the idle release as with it disabled."""
    for reads in inputs:
        for reference in (False, True):
            for cut in CUTS:
                with_it = run(reads, cut, reference, limits, SERVER_STANZAS_FORWARDED)
                with monkeypatch.context() as m:
                    m.setattr(XmlStreamDecoder, "_release_if_idle", lambda self: None)
                    assert run(reads, cut, reference, limits, SERVER_STANZAS_FORWARDED) == with_it, (cut, reference)


def test_the_idle_release_changes_no_event(monkeypatch):
    """The transcripts and the edge cases, cut at every size: the events are the same whether the parser is let
    go when idle or kept (the decoder before issue 21), on both paths."""
    without_release(monkeypatch, [reads for segments in transcripts().values() for reads in directions(segments)
                                  if reads], XmppLimits())
    without_release(monkeypatch, list(EDGE_CASES.values()), SMALL)


def test_the_idle_release_changes_no_event_on_mutated_streams(monkeypatch):
    """Damaged streams, read as they come: the same events with and without the idle release."""
    for reads in mutations(150, seed=2121):
        for reference in (False, True):
            with_it = run(reads, None, reference, SMALL, frozenset())
            with monkeypatch.context() as m:
                m.setattr(XmlStreamDecoder, "_release_if_idle", lambda self: None)
                assert run(reads, None, reference, SMALL, frozenset()) == with_it


def fuzz_inputs() -> list[bytes]:
    return fuzz_xmpp.seeds() + [data for _, data in REGRESSIONS.get("xmpp", [])]


def test_fuzz_corpus_decodes_the_same_on_both_paths():
    """The XMPP fuzz seeds and regressions, each segment a read of the stream its flags name."""
    built = 0
    for data in fuzz_inputs():
        streams: dict[bool, list[bytes]] = {True: [], False: []}
        for flags, segment in decode(data[1:]):
            streams[bool(flags & 1)].append(segment)
        for reads in streams.values():
            if reads:
                built += assert_same(reads, cuts=(None, 13))
    assert built > 1000


TOKENS = [b"<", b">", b"/>", b"</", b"'", b'"', b"&amp;", b"&#0;", b"<!--", b"-->", b"<![CDATA[", b"]]>", b"<?xml ?>",
          b"<body>", b"</body>", b"<x xmlns='u:x'/>", b" xml:lang='en'", b"\x00", b"\xff", b"\xe2\x98", b"\n",
          b"<presence/>", b"</stream:stream>", HEADER[21:]]


def mutations(count: int, seed: int = 21) -> list[list[bytes]]:
    """Deterministic mutations of the transcripts' client and server streams and the edge cases: bytes flipped,
    tokens inserted, pieces cut out, at random places."""
    rng = random.Random(seed)
    bases = [reads for segments in transcripts().values() for reads in directions(segments) if reads]
    bases += list(EDGE_CASES.values())
    out = []
    for _ in range(count):
        data = bytearray(b"".join(rng.choice(bases)))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            what = rng.random()
            if what < 0.4:
                data[at:at] = rng.choice(TOKENS)
            elif what < 0.7 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            else:
                del data[at:at + rng.randint(1, 40)]
        cut = rng.choice([7, 100, 1000])
        out.append([bytes(data[i:i + cut]) for i in range(0, len(data), cut)])
    return out


def test_mutated_streams_decode_the_same_on_both_paths():
    """Hundreds of damaged streams: whatever either path makes of them (stanzas, then an error), the other makes
    the same, event for event."""
    outcomes = set()
    for reads in mutations(400):
        for limits in (XmppLimits(), SMALL):
            fast = run(reads, None, False, limits, SERVER_STANZAS_FORWARDED)
            assert fast == run(reads, None, True, limits, SERVER_STANZAS_FORWARDED)
            assert run(reads, None, False, limits, frozenset()) == run(reads, None, True, limits, frozenset())
            outcomes.add(fast[-1][1] if fast and fast[-1][0] == "error" else "no error")
    assert {"no error", dec.MALFORMED, dec.RESTRICTED} <= outcomes, outcomes      # both sides of the edge covered


# --- under the session --------------------------------------------------------------------------------------

class Checker:
    """Decides by the text, so both paths meet every action; remembers each question."""

    def __init__(self):
        self.calls = []

    def check_message(self, text, ctx):
        self.calls.append((text, ctx))
        if "secret" in text or "hello" in text:
            return Decision(action=BLOCK, notice="no")
        if "(plain" in text:
            return Decision(action=MASK, masked_text="***")
        if len(text) % 3 == 0:
            return Decision(action=ALERT)
        return Decision()


def session_run(segments: list[tuple[bool, bytes]], reference: bool, monkeypatch) -> tuple[list, list]:
    monkeypatch.setattr(dec, "REFERENCE", reference)
    checker = Checker()
    session = XmppSession(checker, ExpectedTransfers(), CTX, stripped_auth_open=True)
    commands = []
    for from_client, data in segments:
        commands += session.data_received(from_client, data)
    commands += session.connection_closed(True) + session.connection_closed(False)
    shown = [(type(c).__name__, c.to_client, c.data) if isinstance(c, Send) else type(c).__name__ for c in commands]
    return shown, checker.calls


@pytest.mark.parametrize("name", sorted(transcripts()))
def test_sessions_decide_the_same_on_both_paths(name, monkeypatch):
    """XmppSession over each transcript, once on each path: the same commands (bytes sent either way, facts,
    closes) and the same questions to the checker (text and context), hence the same decisions."""
    segments = transcripts()[name]
    fast = session_run(segments, False, monkeypatch)
    assert fast == session_run(segments, True, monkeypatch)
    assert any(kind[0] == "Send" for kind in fast[0] if isinstance(kind, tuple))


def test_sessions_decide_the_same_on_mutated_transcripts(monkeypatch):
    """Damaged client and server reads under the session: the same commands and checker questions."""
    rng = random.Random(6120)
    asked = 0
    for segments in transcripts().values():
        for _ in range(15):
            damaged = []
            for from_client, data in segments:
                data = bytearray(data)
                if data and rng.random() < 0.2:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                damaged.append((from_client, bytes(data)))
            fast = session_run(damaged, False, monkeypatch)
            assert fast == session_run(damaged, True, monkeypatch)
            asked += len(fast[1])
    assert asked > 0


def test_the_fast_path_is_the_default():
    """What the gateway runs is the fast path (the reference is what the tests above hold it to)."""
    assert dec.REFERENCE is False and XmlStreamDecoder().reference is False
    session = XmppSession(Checker(), ExpectedTransfers(), CTX)
    assert not any(d.reference for d in session._decoders.values())
