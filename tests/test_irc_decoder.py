"""The IRC line decoder, CTCP and DCC parsing: real transcripts, chunk boundaries, hostile input."""

from __future__ import annotations

import pytest

from imguard.protocols.irc.decoder import (BadLine, Ctcp, DccChat, DccError, DccResume, DccSend, IrcLimits,
                                           LineDecoder, LineTooLong, Message, format_address, format_dcc_send,
                                           parse_dcc, parse_line, split_ctcp)
from tests.test_irc_support import DATA, side

TRANSCRIPTS = sorted(p.name for p in DATA.glob("*.json") if p.name != "zeek_irc_dcc_chat.json")


def feed_all(data: bytes, chunks=None, limits=IrcLimits()):
    dec = LineDecoder(limits)
    events = []
    if chunks is None:
        events += dec.feed(data)
    else:
        pos = 0
        for size in chunks:
            events += dec.feed(data[pos:pos + size])
            pos += size
        events += dec.feed(data[pos:])
    return events, dec


def summary(events):
    return [(type(e).__name__, e.raw, getattr(e, "command", None), getattr(e, "params", None),
             getattr(e, "prefix", None), getattr(e, "tags", None)) for e in events]


@pytest.mark.parametrize("name", TRANSCRIPTS)
@pytest.mark.parametrize("from_client", [True, False])
def test_transcript_round_trips_byte_exact(name, from_client):
    """Every line of every real transcript parses, and the raws concatenate back to the input."""
    data = side(name, from_client)
    events, dec = feed_all(data)
    assert b"".join(e.raw for e in events) + dec.pending == data
    assert not [e for e in events if isinstance(e, BadLine)]


@pytest.mark.parametrize("name", ["zeek_irc_dcc_send_control.json", "zeek_irc_basic.json"])
def test_chunk_boundaries(name):
    """The same events whatever the split: every boundary of the first 700 bytes, and 1-byte feeds of all."""
    data = side(name, True) + side(name, False)[:700]
    whole = summary(feed_all(data)[0])
    for cut in range(1, 700):
        assert summary(feed_all(data, [cut])[0]) == whole, cut
    assert summary(feed_all(data, [1] * len(data))[0]) == whole


def test_parses_tags_prefix_command_params():
    """IRCv3 tags are unescaped, the prefix split, the command upper-cased, the trailing kept with spaces."""
    m = parse_line(b"@time=2025-07-28T20:51:05.978Z;+draft/reply=a\\sb\\:c;flag "
                   b":tim1!tim@10.0.0.22 privmsg #testing :do we still need more packets?\r\n")
    assert isinstance(m, Message)
    assert m.tags == {"time": "2025-07-28T20:51:05.978Z", "+draft/reply": "a b;c", "flag": ""}
    assert (m.nick, m.user, m.host) == ("tim1", "tim", "10.0.0.22")
    assert m.command == "PRIVMSG"
    assert m.params == ("#testing", "do we still need more packets?")
    assert m.has_trailing


def test_last_param_without_colon_and_rewrite():
    """`PRIVMSG #brotest test` (irc-basic: no ':') is text too; a rewrite keeps tags and prefix."""
    m = parse_line(b"@a=b :n!u@h PRIVMSG #brotest test\r\n")
    assert m.params == ("#brotest", "test") and not m.has_trailing
    assert m.with_last_param("x y\r\nQUIT") == b"@a=b :n!u@h PRIVMSG #brotest :x y  QUIT\r\n"


def test_bare_lf_and_empty_params():
    """A bare LF ends a line (servers accept it); `670  :text` (two spaces) has one param."""
    assert parse_line(b"PING x\n").params == ("x",)
    m = parse_line(b":irc.joulunet.org 670  :STARTTLS successful, go ahead with TLS handshake\r\n")
    assert m.command == "670" and m.params == ("STARTTLS successful, go ahead with TLS handshake",)


def test_latin1_text_is_not_lost():
    """Bytes that are not UTF-8 are read as Latin-1, so policy sees every character."""
    m = parse_line(b"PRIVMSG #c :caf\xe9 cr\xe8me\r\n")
    assert m.encoding == "latin-1" and m.params[1] == "café crème"
    assert m.with_last_param("thé") == b"PRIVMSG #c :th\xe9\r\n"


@pytest.mark.parametrize("raw,kind", [
    (b"PRIVMSG a :hi\rPRIVMSG b :secret\r\n", "bare_cr"),
    (b"PRIVMSG a :hi\x00there\r\n", "nul_byte"),
    (b"\r\n", "empty_line"),
    (b":prefixonly\r\n", "empty_command"),
    (b"@tagsonly\r\n", "bad_tags"),
    (b"PRIV-MSG a :b\r\n", "bad_command"),
])
def test_bad_lines_are_events_not_exceptions(raw, kind):
    """Malformed lines become BadLine with a kind; nothing raises."""
    ev = parse_line(raw)
    assert isinstance(ev, BadLine) and ev.kind == kind and ev.raw == raw


def test_overlong_body_is_flagged_but_parsed():
    """A body over 512 bytes (tags excluded) is flagged; with 8000 bytes of tags it is still fine."""
    long_text = b"x" * 600
    assert parse_line(b"PRIVMSG #c :" + long_text + b"\r\n").overlong
    assert not parse_line(b"@t=" + b"v" * 8000 + b" PRIVMSG #c :hi\r\n").overlong


def test_line_at_the_limit_passes_and_one_more_byte_fails():
    """max_line_length counts the CRLF: exactly the limit is accepted, one byte more is LineTooLong."""
    limits = IrcLimits(max_line_length=100)
    line = b"PRIVMSG #c :" + b"a" * (100 - 14) + b"\r\n"
    assert len(line) == 100
    events, _ = feed_all(line, limits=limits)
    assert len(events) == 1 and isinstance(events[0], Message)
    events, dec = feed_all(b"PRIVMSG #c :" + b"a" * (100 - 13) + b"\r\n", limits=limits)
    assert [type(e) for e in events] == [LineTooLong] and dec.dead


def test_endless_line_is_cut_at_the_limit_whatever_the_chunks():
    """Bytes without LF: LineTooLong as soon as max_line_length bytes are buffered; lines before it in the same
    feed are still returned; then the decoder is dead and holds nothing."""
    limits = IrcLimits(max_line_length=1000)
    data = b"PING :a\r\n" + b"A" * 2000
    whole = [type(e).__name__ for e in feed_all(data, limits=limits)[0]]
    assert whole == ["Message", "LineTooLong"]
    for chunk in (1, 7, 999, 1000, 1011):
        events, dec = feed_all(data, [chunk] * (len(data) // chunk), limits=limits)
        assert [type(e).__name__ for e in events] == whole, chunk
        assert dec.dead and dec.pending == b"" and dec.feed(b"\r\n") == []


def test_default_limit_is_tags_plus_rfc_body():
    """8191 bytes of IRCv3 tags + a 512-byte RFC 2812 message."""
    assert IrcLimits().max_line_length == 8191 + 512


# --- CTCP -------------------------------------------------------------------------------------------

def test_ctcp_split():
    assert split_ctcp("\x01ACTION waves\x01") == ("", [Ctcp("ACTION", "waves")])
    assert split_ctcp("hi \x01VERSION\x01 there") == ("hi  there", [Ctcp("VERSION")])
    assert split_ctcp("\x01DCC SEND a 1 2 3") == ("", [Ctcp("DCC", "SEND a 1 2 3")])     # unterminated
    assert split_ctcp("plain") == ("plain", [])


# --- DCC --------------------------------------------------------------------------------------------

def test_dcc_send_from_the_zeek_capture():
    """The offer of zeek/irc-dcc-send.pcapng: 167772167 is 10.0.0.7."""
    assert parse_dcc("SEND ssh.trace 167772167 59130 1320211") == DccSend(
        name="ssh.trace", host="10.0.0.7", port=59130, size=1320211, address_text="167772167")


@pytest.mark.parametrize("args,expected", [
    ('SEND "my file.txt" 3232235777 5000 10', DccSend("my file.txt", "192.168.1.1", 5000, 10, "", "3232235777")),
    ("SEND my file.txt 3232235777 5000 10", DccSend("my file.txt", "192.168.1.1", 5000, 10, "", "3232235777")),
    ("SEND x.bin 2001:db8::7 5000 10", DccSend("x.bin", "2001:db8::7", 5000, 10, "", "2001:db8::7")),
    ("SEND x.bin 167772167 0 10 123", DccSend("x.bin", "10.0.0.7", 0, 10, "123", "167772167")),
    ("SEND x.bin 167772167 5000", DccSend("x.bin", "10.0.0.7", 5000, None, "", "167772167")),
    ("TSEND x.bin 167772167 5000 10", DccSend("x.bin", "10.0.0.7", 5000, 10, "", "167772167")),
    ("RESUME x.bin 5000 4096", DccResume("RESUME", "x.bin", 5000, 4096)),
    ('ACCEPT "a b" 0 4096 77', DccResume("ACCEPT", "a b", 0, 4096, "77")),
    ("CHAT CHAT 167772167 59214", DccChat("CHAT", "10.0.0.7", 59214, "", "167772167")),
])
def test_dcc_forms(args, expected):
    assert parse_dcc(args) == expected


@pytest.mark.parametrize("args,kind", [
    ("SEND x 167772167 5000 -1", "dcc_bad_size"),
    ("SEND x 167772167 5000 99999999999999999999999999", "dcc_bad_size"),
    ("SEND x 167772167 5000 1e9", "dcc_bad_size"),
    ("SEND x 167772167 65536 10", "dcc_bad_port"),
    ("SEND x 167772167 -5 10", "dcc_bad_port"),
    ("SEND x 167772167 0 10", "dcc_bad_port"),           # passive without a token
    ("SEND x 4294967296 5000 10", "dcc_bad_address"),
    ("SEND x 0 5000 10", "dcc_bad_address"),
    ("SEND x evil.example 5000 10", "dcc_bad_address"),
    ("SEND x 1.2.3 5000 10", "dcc_bad_address"),
    ('SEND "unterminated 167772167 5000 10', "dcc_bad_name"),
    ("SEND x", "dcc_malformed"),
    ("SEND", "dcc_malformed"),
    ("RESUME x 5000 -3", "dcc_bad_size"),
    ("SSEND x 167772167 5000 10", "dcc_unsupported"),
    ("", "dcc_unsupported"),
])
def test_dcc_bad_numbers_are_dcc_errors(args, kind):
    """Negative or absurd sizes, ports over 65535, garbage addresses: a DccError with a kind, never a crash."""
    with pytest.raises(DccError) as e:
        parse_dcc(args)
    assert e.value.kind == kind


def test_dcc_absurd_size_is_a_setting():
    """max_dcc_size bounds the announced size (the edge passes)."""
    limits = IrcLimits(max_dcc_size=1000)
    assert parse_dcc("SEND x 167772167 5000 1000", limits).size == 1000
    with pytest.raises(DccError):
        parse_dcc("SEND x 167772167 5000 1001", limits)


def test_format_round_trip():
    assert format_address("10.0.0.7") == "167772167"
    assert format_address("2001:db8::7") == "2001:db8::7"
    args = format_dcc_send("my file.txt", "10.0.0.7", 5000, 10)
    assert args == 'SEND "my file.txt" 167772167 5000 10'
    assert parse_dcc(args).name == "my file.txt"
