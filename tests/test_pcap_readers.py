"""scapy's raw readers (RawPcapReader, RawPcapNgReader: `imguard pcap`'s default) against imguard's own struct reader,
kept as the reference: the same frames (number, time, link type, bytes, length on the wire, interface) and the same
warnings, on every test capture, on pcapng files with several interfaces (Ethernet with 802.1Q and QinQ tags, Linux
cooked SLL and SLL2, raw IP) written by scapy's own writer and checked against tshark, on every format variant the
builders write, and on damaged files."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from imguard.replay.pcapfile import Capture, CaptureLimits
from test_replay_builders import ACK, PSH, Ifc, ether, ipv4, ipv6, null, pcap, pcapng, sll, sll2, tcp

PCAPS = Path(__file__).resolve().parent / "data" / "captures"
SCAPY, STRUCT = CaptureLimits(reader="scapy"), CaptureLimits(reader="struct")
CAPTURES = sorted(str(p.relative_to(PCAPS)) for p in PCAPS.glob("*/*.pcap*"))


def read(data: bytes, limits: CaptureLimits) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(frames, TCP segments, warnings) as one reader gives them."""
    capture = Capture(data, limits=limits)
    frames = [(f.number, f.ts, f.linktype, bytes(f.data), f.wire_length, f.interface) for f in capture.frames()]
    capture = Capture(data, limits=limits)
    segments = [(s.frame, s.ts, s.src, s.sport, s.dst, s.dport, s.seq, s.flags, bytes(s.payload), s.missing)
                for s in capture.tcp_segments()]
    warnings = sorted((w.kind, w.frame, w.offset, w.count) for w in capture.warnings)
    return frames, segments, warnings


def same(data: bytes, limits: dict | None = None) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Both readers agree on `data`; what they read."""
    ours = read(data, CaptureLimits(reader="struct", **(limits or {})))
    theirs = read(data, CaptureLimits(reader="scapy", **(limits or {})))
    assert theirs[0] == ours[0], "frames differ"
    assert theirs[1] == ours[1], "TCP segments differ"
    assert theirs[2] == ours[2], "warnings differ"
    return ours


def test_the_default_reader_is_scapys():
    assert CaptureLimits().reader == "scapy"
    with pytest.raises(ValueError, match="reader must be one of scapy, struct"):
        CaptureLimits(reader="dpkt")


@pytest.mark.parametrize("name", CAPTURES)
def test_every_test_capture_reads_the_same(name):
    frames, segments, warnings = same((PCAPS / name).read_bytes())
    assert frames and not warnings


def _packet(payload: bytes, sport: int = 1234, seq: int = 100) -> bytes:
    return ipv4("192.0.2.1", "192.0.2.2", tcp(sport, 6667, seq, 7, ACK | PSH, payload))


def test_pcapng_with_several_interfaces_written_by_scapy(tmp_path):
    """scapy's pcapng writer, one interface per link type (its IDBs): Ethernet with a VLAN tag and with QinQ tags,
    Linux cooked SLL and SLL2, raw IPv4 and IPv6. Both readers give the same frames; each decodes to its TCP segment;
    tshark (an independent reader) sees the same interfaces, link types and VLAN ids."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
    from scapy.packet import Raw
    from scapy.utils import PcapNgWriter

    def segment(n: int):
        return IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=40000 + n, dport=5222, flags="PA", seq=n) / Raw(
            f"frame {n}".encode())

    packets = [
        ("eth0", Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=10) / segment(0)),
        ("eth0", Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1AD(vlan=100) / Dot1Q(vlan=200)
         / segment(1)),
        ("any", CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, src=b"\x02\0\0\0\0\x01\0\0") / segment(2)),
        ("any2", CookedLinuxV2(ifindex=3, lladdrtype=1, lladdrlen=6, src=b"\x02\0\0\0\0\x01\0\0") / segment(3)),
        ("tun0", segment(4)),
        ("tun6", IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=40005, dport=5222, flags="PA", seq=5)
         / Raw(b"frame 5")),
        ("eth0", Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / segment(6)),
    ]
    path = tmp_path / "interfaces.pcapng"
    writer = PcapNgWriter(str(path))
    for n, (ifname, packet) in enumerate(packets):
        packet.time = 1_700_000_000 + n / 4
        packet.sniffed_on = ifname
        writer.write(packet)
    writer.close()
    data = path.read_bytes()
    frames, segments, warnings = same(data)
    assert not warnings
    assert [bytes(s[8]) for s in segments] == [f"frame {n}".encode() for n in range(len(packets))]
    assert [s[1] for s in segments] == [1_700_000_000 + n / 4 for n in range(len(packets))]
    ids = [f[5] for f in frames]                # one interface per name: eth0, any, any2, tun0, tun6, eth0 again
    assert ids[0] == ids[1] == ids[6] and len({ids[0], *ids[2:6]}) == 5
    assert [f[2] for f in frames] == [1, 1, 113, 276, f := frames[4][2], frames[5][2], 1] and f in (12, 101, 228)

    tshark = shutil.which("tshark")
    assert tshark, "tshark is not installed (tools/setup.sh installs it)"
    out = subprocess.run([tshark, "-r", str(path), "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=|",
                          "-e", "frame.interface_id", "-e", "ieee8021ad.id", "-e", "vlan.id", "-e", "tcp.srcport"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert [int(r[0]) for r in rows] == [f[5] for f in frames]
    assert [(r[1], r[2]) for r in rows] == [("", "10"), ("100", "200")] + [("", "")] * 5
    assert [int(r[3]) for r in rows] == [s[3] for s in segments]


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_variants(order):
    """Big- and little-endian sections, if_tsresol in powers of 10 and 2, EPB, SPB (its length from the block: the
    snap length is 0, none), the obsolete PB, blocks to skip, and a second section restarting the interfaces."""
    ifcs = [Ifc(1), Ifc(228, tsresol=9), Ifc(113, tsresol=0x80 | 10), Ifc(276)]
    first = pcapng(ifcs, [
        (0, 1_700_000_000_000_000, ether(_packet(b"eth"), vlans=((0x8100, 7),))),
        (1, 1_700_000_000_500_000_000, _packet(b"raw4", seq=102)),
        (2, 1_700_000_000 * 1024 + 256, sll(_packet(b"sll", seq=106))),
        (3, 1_700_000_001_000_000, sll2(_packet(b"sll2", seq=109))),
        ("spb", ether(_packet(b"spb", seq=113))),
        ("pb", 0, 1_700_000_002_000_000, ether(_packet(b"pb", seq=116))),
    ], order=order)
    second = pcapng([Ifc(101)], [(0, 2_000_000, _packet(b"second", seq=118))], order=">" if order == "<" else "<")
    frames, segments, warnings = same(first + second)
    assert [s[8] for s in segments] == [b"eth", b"raw4", b"sll", b"sll2", b"spb", b"pb", b"second"]
    assert [f[2] for f in frames] == [1, 228, 113, 276, 1, 1, 101] and not warnings


def _idb_with_tsoffset(linktype: int, seconds: int) -> bytes:
    options = struct.pack("<HHq", 14, 8, seconds) + struct.pack("<HH", 0, 0)
    body = struct.pack("<HHI", linktype, 0, 0) + options
    return struct.pack("<II", 1, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def test_pcapng_if_tsoffset():
    """if_tsoffset (seconds added to every timestamp of its interface), which scapy's reader does not apply itself."""
    data = pcapng([], [], extra_blocks=False) + _idb_with_tsoffset(1, 1_000_000_000)
    frame = ether(_packet(b"late"))
    body = struct.pack("<IIIII", 0, 0, 5_000_000, len(frame), len(frame)) + frame + b"\0" * (-len(frame) % 4)
    data += struct.pack("<II", 6, len(body) + 12) + body + struct.pack("<I", len(body) + 12)
    frames, _, _ = same(data)
    assert frames[0][1] == 1_000_000_005.0


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_variants(order, nano):
    """Both byte orders, both resolutions, every link type the decoder knows, a cut by the snap length, the FCS bits
    in the link-type field."""
    records = [(1.25, ether(_packet(b"a"), vlans=((0x88A8, 100), (0x8100, 200)))),
               (1.5, ether(_packet(b"snapped" * 10, seq=101))[:60], len(ether(_packet(b"snapped" * 10)))),
               (2.0, ether(ipv6("2001:db8::1", "2001:db8::2", tcp(1, 2, 3, 0, ACK, b"v6"), hop_by_hop=True),
                           0x86DD))]
    frames, segments, _ = same(pcap(records, order=order, nano=nano))
    assert [s[9] for s in segments] == [0, 70 - (60 - 54), 0]
    for linktype, frame in [(113, sll(_packet(b"x"))), (276, sll2(_packet(b"x"))), (101, _packet(b"x")),
                            (0, null(_packet(b"x"))), (108, null(_packet(b"x"), order=">")),
                            (1 | 0x10000000, ether(_packet(b"fcs")) + b"\0\0\0\0")]:
        frames, segments, _ = same(pcap([(3.0, frame)], linktype=linktype, order=order, nano=nano))
        assert len(segments) == 1


def test_modified_pcap_is_read_by_struct_whatever_the_setting():
    """The old Red Hat "modified" pcap (magic a1b2cd34, 24-byte record headers), which scapy does not read."""
    frame = ether(_packet(b"redhat"))
    data = struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 1)
    data += struct.pack("<IIII", 10, 0, len(frame), len(frame)) + b"\0" * 8 + frame
    frames, segments, _ = same(data)
    assert segments[0][8] == b"redhat"


def _damaged() -> list[tuple[str, bytes, dict]]:
    good = pcap([(1.0, ether(_packet(b"one"))), (2.0, ether(_packet(b"two", seq=103)))])
    ng = pcapng([Ifc(1)], [(0, 1, ether(_packet(b"one"))), (0, 2, ether(_packet(b"two", seq=103)))])
    one_ng = pcapng([Ifc(1)], [(0, 1, ether(_packet(b"one")))])
    frame = ether(_packet(b"x"))
    epb = struct.pack("<IIIII", 5, 0, 3, len(frame), len(frame)) + frame + b"\0" * (-len(frame) % 4)
    unknown_interface = one_ng + struct.pack("<II", 6, len(epb) + 12) + epb + struct.pack("<I", len(epb) + 12)
    big = struct.pack("<IIIII", 0, 0, 3, 4000, 4000) + frame + b"\0" * (-len(frame) % 4)
    caplen_past_block = one_ng + struct.pack("<II", 6, len(big) + 12) + big + struct.pack("<I", len(big) + 12)
    return [
        ("pcap cut in a record", good[:-5], {}),
        ("pcap cut in a record header", good[:len(good) - len(ether(_packet(b"two"))) - 10], {}),
        ("pcap absurd record length", good + struct.pack("<IIII", 2, 0, 0x7FFFFFF0, 0x7FFFFFF0) + b"\0" * 64,
         {"max_record_bytes": 1 << 20}),
        ("pcap caplen over wire length", pcap([(1.0, frame, 20)]), {}),
        ("pcapng cut", ng[:-7], {}),
        ("pcapng cut in a block header", ng + b"\x06\0\0\0\x20", {}),
        ("pcapng block length not a multiple of 4", one_ng + struct.pack("<II", 6, 13) + b"\0" * 20, {}),
        ("pcapng trailing length differs", one_ng + struct.pack("<III", 0xBAD, 12, 16), {}),
        ("pcapng packet on an unknown interface", unknown_interface, {}),
        ("pcapng captured length past its block", caplen_past_block, {}),
    ]


@pytest.mark.parametrize("case", _damaged(), ids=lambda case: case[0])
def test_damage_gives_the_same_frames_and_warnings(case):
    _, data, limits = case
    frames, _, warnings = same(data, limits)
    assert warnings, "damage must be a warning"


@pytest.mark.parametrize("name", ["zeek/irc-dcc-send.pcapng", "ndpi/jabber.pcap", "zeek/irc-starttls.pcap"])
def test_random_damage_gives_the_same_frames_and_warnings(name):
    """Real captures cut short and with bytes overwritten: scapy's reader never raises, and reads the same frames and
    TCP segments with the same warnings (kind, frame, offset) as the reference."""
    rng = random.Random(name)
    original = (PCAPS / name).read_bytes()
    for _ in range(40):
        data = bytearray(original[:rng.randrange(24, len(original))])
        for _ in range(rng.randrange(0, 20)):
            data[rng.randrange(24, len(data))] = rng.randrange(256)
        same(bytes(data), {"max_record_bytes": 1 << 20})


def test_imguard_pcap_gives_the_same_summary_with_either_reader(tmp_path):
    """The whole `imguard pcap` (sessions, files, policy) on a real capture: the same JSON summary either way."""
    summaries = []
    for reader in ("struct", "scapy"):
        result = subprocess.run([sys.executable, "-m", "imguard", "pcap", str(PCAPS / "zeek/irc-dcc-send.pcapng"),
                                 "--json", "--reader", reader, "--data-dir", str(tmp_path / "data")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode in (0, 1), result.stderr
        summaries.append(json.loads(result.stdout.splitlines()[0]))
    assert summaries[0] == summaries[1] and summaries[0]["transfers"]
    result = subprocess.run([sys.executable, "-m", "imguard", "pcap", str(PCAPS / "zeek/irc-basic.pcap"), "--reader",
                             "dpkt"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "reader must be one of" in result.stderr
