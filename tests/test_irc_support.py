"""Helpers for the IRC tests: transcripts, a tiny pcap/pcapng TCP reassembler, a test checker, a playbook.

The transcripts in tests/data/irc/*.json come from the shared captures (see tests/data/irc/README.md and
extract.py). The big DCC payload (1,320,211 bytes) is not copied: `tcp_payload` reads it from the
capture itself, with the standard library only.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from imguard.model import ALLOW, BLOCK, MASK, Decision, RuleMatch
from imguard.protocols.base import FACTS, Notify, Record, Send

DATA = Path(__file__).parent / "data" / "irc"
PCAPS = Path(__file__).parent / "data" / "captures"      # part of the project: see its README


# --- transcripts ------------------------------------------------------------------------------------

def transcript(name: str) -> list[tuple[bool, bytes]]:
    """[(from_client, bytes)] one per TCP segment, in capture order."""
    doc = json.loads((DATA / name).read_text())
    return [(side == "c", text.encode("latin-1")) for side, text in doc["segments"]]


def side(name: str, from_client: bool) -> bytes:
    return b"".join(data for fc, data in transcript(name) if fc == from_client)


# --- captures ---------------------------------------------------------------------------------------

def _packets(path: Path):
    """(linktype, frame bytes) of every packet in a pcap or pcapng file."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        linktype = struct.unpack(end + "I", data[20:24])[0]
        pos = 24
        while pos + 16 <= len(data):
            incl = struct.unpack(end + "I", data[pos + 8:pos + 12])[0]
            yield linktype, data[pos + 16:pos + 16 + incl]
            pos += 16 + incl
        return
    if magic != b"\x0a\x0d\x0d\x0a":
        raise ValueError(f"{path}: not a pcap or pcapng file")
    end = "<" if data[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
    linktypes: list[int] = []
    pos = 0
    while pos + 12 <= len(data):
        btype, blen = struct.unpack(end + "II", data[pos:pos + 8])
        body = data[pos + 8:pos + blen - 4]
        if btype == 0x0A0D0D0A:
            linktypes = []
        elif btype == 1:        # interface description
            linktypes.append(struct.unpack(end + "H", body[:2])[0])
        elif btype == 6:        # enhanced packet
            iface, _, _, caplen, _ = struct.unpack(end + "IIIII", body[:20])
            yield linktypes[iface], body[20:20 + caplen]
        elif btype == 3:        # simple packet
            yield linktypes[0], body[4:]
        pos += blen


def _tcp(linktype: int, frame: bytes):
    """(src, sport, dst, dport, seq, flags, payload) or None."""
    if linktype == 1:
        ethertype, pos = struct.unpack(">H", frame[12:14])[0], 14
        while ethertype == 0x8100:
            ethertype, pos = struct.unpack(">H", frame[pos + 2:pos + 4])[0], pos + 4
    elif linktype == 113:
        ethertype, pos = struct.unpack(">H", frame[14:16])[0], 16
    elif linktype == 101:
        ethertype, pos = (0x0800 if frame[0] >> 4 == 4 else 0x86DD), 0
    else:
        return None
    if ethertype == 0x0800:
        ihl = (frame[pos] & 0x0F) * 4
        total = struct.unpack(">H", frame[pos + 2:pos + 4])[0]
        if frame[pos + 9] != 6:
            return None
        src = str(ipaddress.IPv4Address(frame[pos + 12:pos + 16]))
        dst = str(ipaddress.IPv4Address(frame[pos + 16:pos + 20]))
        seg = frame[pos + ihl:pos + total]
    elif ethertype == 0x86DD:
        if frame[pos + 6] != 6:
            return None
        plen = struct.unpack(">H", frame[pos + 4:pos + 6])[0]
        src = str(ipaddress.IPv6Address(frame[pos + 8:pos + 24]))
        dst = str(ipaddress.IPv6Address(frame[pos + 24:pos + 40]))
        seg = frame[pos + 40:pos + 40 + plen]
    else:
        return None
    sport, dport, seq = struct.unpack(">HHI", seg[:8])
    off = (seg[12] >> 4) * 4
    return src, sport, dst, dport, seq, seg[13], seg[off:]


def tcp_payload(path: Path, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The reassembled bytes src sent to dst (retransmissions and overlaps removed; a gap is an error)."""
    segments: dict[int, bytes] = {}
    isn = None
    for linktype, frame in _packets(path):
        t = _tcp(linktype, frame)
        if t is None or (t[0], t[1]) != src or (t[2], t[3]) != dst:
            continue
        s, flags, payload = t[4], t[5], t[6]
        if flags & 0x02:        # SYN
            isn = s + 1
            continue
        if payload and len(payload) > len(segments.get(s, b"")):
            segments[s] = payload
    assert isn is not None, "no SYN for this flow in the capture"
    out = bytearray()
    expect = isn
    for s in sorted(segments, key=lambda x: (x - isn) % 2 ** 32):
        rel = (s - expect) % 2 ** 32
        payload = segments[s]
        if rel > 2 ** 31:       # overlap with what we have
            skip = (expect - s) % 2 ** 32
            payload = payload[skip:]
        elif rel:
            raise AssertionError(f"gap of {rel} bytes in the capture at {len(out)}")
        out += payload
        expect = (expect + len(payload)) % 2 ** 32
    return bytes(out)


def capture(name: str) -> Path:
    path = PCAPS / name
    assert path.is_file(), f"capture {path} is missing (tests/data/captures/ is part of the project)"
    return path


# --- a checker and a playbook -----------------------------------------------------------------------

@dataclass
class Checker:
    """A stand-in for Pipeline.check_message: decisions by substring, every call remembered."""
    block: tuple[str, ...] = ()
    mask: dict[str, str] = field(default_factory=dict)    # word -> replacement
    notice: str = ""
    calls: list = field(default_factory=list)

    def check_message(self, text, ctx):
        self.calls.append((text, ctx))
        for word in self.block:
            if word in text:
                return Decision(action=BLOCK, matches=[RuleMatch("no-" + word, BLOCK, "high", "enforce",
                                                                 title=f"no {word}")], notice=self.notice)
        for word, repl in self.mask.items():
            if word in text:
                return Decision(action=MASK, masked_text=text.replace(word, repl),
                                matches=[RuleMatch("mask-" + word, MASK, "medium", "enforce")], notice=self.notice)
        return Decision(action=ALLOW)


def sends(cmds, to_client: bool) -> bytes:
    return b"".join(c.data for c in cmds if isinstance(c, Send) and c.to_client == to_client)


def events(cmds) -> list[dict]:
    """The events the carrier would record for these commands: a Record's as it is, a typed fact's (Anomaly,
    ProtocolEvent, Link, MessageDecision) or a Notify's built by its event()."""
    return [c.event if isinstance(c, Record) else c.event() for c in cmds if isinstance(c, (Record, Notify, *FACTS))]


def records(cmds, action: str | None = None) -> list[dict]:
    evs = events(cmds)
    return [e for e in evs if action is None or e["event"].get("action") == action]


def notifies(cmds) -> list[Notify]:
    """The notices a session asks the carrier to deliver on another connection."""
    return [c for c in cmds if isinstance(c, Notify)]


def anomalies(cmds) -> list[str]:
    return [e["imguard"]["anomaly"]["kind"] for e in records(cmds, "anomaly")]


def feed(session, items) -> list:
    """Feed [(from_client, bytes)]; all commands returned, in order."""
    out = []
    for from_client, data in items:
        out += session.data_received(from_client, data)
    return out


# --- self tests of the helpers ---------------------------------------------------------------------

def test_transcripts_have_both_sides():
    """Every stored transcript has client bytes, and all but the one-line ones have server bytes."""
    for path in DATA.glob("*.json"):
        segs = transcript(path.name)
        assert any(fc for fc, _ in segs), path.name


def test_reassembler_matches_stored_transcript():
    """The pcap reader gives the same client bytes as the tshark-extracted transcript of irc-basic."""
    path = capture("zeek/irc-basic.pcap")
    assert tcp_payload(path, ("192.168.6.110", 49170), ("130.239.18.119", 6667)) == side("zeek_irc_basic.json", True)
    assert tcp_payload(path, ("130.239.18.119", 6667), ("192.168.6.110", 49170)) == side("zeek_irc_basic.json",
                                                                                          False)

