"""The IRC line parser's fast path (ASCII lines without tags, parsed as text) against its pure reference path:
the same event, field by field, for every line of the stored transcripts, hand-made edge cases and mutated lines."""

from __future__ import annotations

import dataclasses
import random

import pytest

from imguard.protocols.irc import decoder
from imguard.protocols.irc.decoder import BadLine, IrcLimits, LineDecoder, Message, parse_line, parse_line_reference
from tests.test_irc_support import DATA, side

EDGES = [
    b"PRIVMSG bob :hello there\r\n", b":alice!u@h PRIVMSG bob :hello\r\n", b"PING x\n", b"PING\r\n", b"PING :\r\n",
    b"privmsg bob :lower case command\r\n", b":srv 001 alice :Welcome\r\n", b":srv 670  :two spaces before\r\n",
    b"MODE #c +o  x \r\n", b"MODE #c +o x   \r\n", b"PRIVMSG  bob   :  spaces kept  \r\n", b"PRIVMSG bob hi there\r\n",
    b":p   PRIVMSG bob :x\r\n", b":\r\n", b": PRIVMSG\r\n", b":onlyprefix\r\n", b"\r\n", b"\n", b"   \r\n",
    b" PING\r\n",
    b"PRIV-MSG a :b\r\n", b"PRIVMSG a :hi\rthere\r\n", b"PRIVMSG a :nul\x00\r\n", b"PRIVMSG a :cr at end\r\r\n",
    b"PRIVMSG a :no line end", b"PRIVMSG a :lf only\n", b"@a=b PRIVMSG c :tags go to the reference\r\n",
    b"PRIVMSG #c :caf\xe9\r\n", "PRIVMSG #c :caf\u00e9 utf-8\r\n".encode(), b"PRIVMSG #c :\x01ACTION waves\x01\r\n",
    b"PRIVMSG a :" + b"x" * 600 + b"\r\n", b"001\r\n", b"PRIVMSG a ::double colon\r\n", b"PRIVMSG a:b :c\r\n",
    b"CPRIVMSG bob #c :text\r\n", b"PRIVMSG bob\t:tab\r\n", b"PRIVMSG \r\n", b"QUIT\r\n", b"QUIT :\r\n",
]
ALPHABET = b" :!@#,\r\n\x00\x01\t\xe9aPRIVMSGbob0123456789-"


def fields(event) -> tuple:
    return (type(event).__name__, *(getattr(event, f.name) for f in dataclasses.fields(event)))


def transcript_lines() -> list[bytes]:
    lines = []
    for path in sorted(DATA.glob("*.json")):
        for from_client in (True, False):
            lines += side(path.name, from_client).splitlines(keepends=True)
    return lines


def mutations(lines: list[bytes], count: int, seed: int = 21) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        line = bytearray(rng.choice(lines))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(line) + 1)
            if rng.random() < 0.5 and line:
                del line[min(pos, len(line) - 1)]
            else:
                line[pos:pos] = bytes([rng.choice(ALPHABET)])
        out.append(bytes(line))
    return out


CORPUS = EDGES + transcript_lines()


@pytest.mark.parametrize("limits", [IrcLimits(), IrcLimits(max_body_length=20)])
def test_fast_path_gives_the_reference_events(limits):
    """Every line of the transcripts, the edge cases and 3,000 mutated lines: the same event on both paths."""
    lines = CORPUS + mutations(CORPUS, 3000)
    assert len(transcript_lines()) > 100
    fast = [fields(parse_line(line, limits)) for line in lines]
    reference = [fields(parse_line_reference(line, limits)) for line in lines]
    assert fast == reference
    kinds = {f[0] for f in fast}
    assert kinds == {"Message", "BadLine"}         # both kinds were compared, not only the easy one


def test_fast_path_is_taken_for_plain_lines():
    """A plain ASCII chat line is parsed by the fast path (its Message is built without __init__), a line with tags
    or non-ASCII bytes by the reference; and REFERENCE sends every line to the reference."""
    calls = []
    original = decoder.parse_line_reference

    def counting(raw, limits=decoder._DEFAULT_LIMITS):
        calls.append(raw)
        return original(raw, limits)
    decoder.parse_line_reference = counting
    try:
        assert isinstance(parse_line(b":a!u@h PRIVMSG bob :hi\r\n"), Message) and calls == []
        parse_line(b"@t=1 PRIVMSG bob :hi\r\n")
        parse_line(b"PRIVMSG bob :caf\xe9\r\n")
        assert isinstance(parse_line(b"PRIVMSG a :x\x00\r\n"), BadLine)
        assert len(calls) == 3
        decoder.REFERENCE = True
        parse_line(b"PRIVMSG bob :hi\r\n")
        assert len(calls) == 4
    finally:
        decoder.REFERENCE = False
        decoder.parse_line_reference = original


def test_decoder_events_match_over_chunked_transcripts():
    """LineDecoder on both paths, the transcripts fed in 7-byte chunks: the same events in the same order."""
    for path in sorted(DATA.glob("*.json")):
        data = side(path.name, True) + side(path.name, False)
        runs = []
        for reference in (False, True):
            decoder.REFERENCE = reference
            try:
                dec = LineDecoder()
                runs.append([fields(e) for pos in range(0, len(data), 7) for e in dec.feed(data[pos:pos + 7])])
            finally:
                decoder.REFERENCE = False
        assert runs[0] == runs[1], path.name
