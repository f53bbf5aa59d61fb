"""The capture reader: every shared capture against facts from capinfos/tshark, and constructed
captures for every format, link type and kind of damage (warnings, never exceptions)."""

from __future__ import annotations

import collections
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from imguard.replay.pcapfile import Capture, CaptureError, CaptureLimits
from imguard.replay.reassembly import Reassembler
from test_replay_builders import (ACK, FIN, PSH, SYN, Ifc, ether, ipv4, ipv6, null, pcap, pcapng, sll, sll2,
                                  tcp)

PCAPS = Path(__file__).resolve().parent / "data" / "captures"      # part of the project: see its README
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")

# file -> (format, frames, TCP frames, link type, TCP connections): capinfos -c -E and tshark -z conv,tcp.
FACTS = {
    "generated/irc_dcc_send.pcap": ("pcap", 61, 61, 1, 3),
    "generated/xmpp_plain_httpupload.pcap": ("pcap", 85, 85, 1, 4),
    "generated/xmpp_plain_ibb_socks5.pcap": ("pcap", 115, 115, 1, 4),
    "ndpi/Oscar.pcap": ("pcapng", 71, 71, 1, 1),
    "ndpi/irc.pcap": ("pcap", 29, 29, 1, 1),
    "ndpi/jabber.pcap": ("pcapng", 376, 358, 1, 12),      # 18 ARP frames
    "ndpi/msnms.pcap": ("pcap", 364, 364, 1, 6),
    "zeek/irc-basic.pcap": ("pcap", 34, 34, 1, 1),
    "zeek/irc-dcc-first-command.pcap": ("pcap", 10, 10, 1, 2),
    "zeek/irc-dcc-send.pcapng": ("pcapng", 1184, 1184, 1, 3),
    "zeek/irc-more-commands.pcap": ("pcap", 145, 145, 1, 2),
    "zeek/irc-starttls.pcap": ("pcap", 20, 20, 113, 1),  # Linux cooked (SLL)
    "zeek/xmpp-dialback-starttls.pcap": ("pcap", 37, 37, 1, 1),
    "zeek/xmpp-starttls.pcap": ("pcap", 34, 34, 1, 1),
}


@pytest.mark.parametrize("name", sorted(FACTS))
def test_shared_capture_counts(name):
    """Every shared capture reads whole, without a warning, with the frame, TCP and connection counts
    capinfos and tshark report."""
    fmt, frames, tcp_frames, linktype, connections = FACTS[name]
    capture = Capture.open(PCAPS / name)
    reassembler = Reassembler()
    list(reassembler.run(capture.tcp_segments()))
    assert (capture.stats.format, capture.stats.frames, capture.stats.tcp) == (fmt, frames, tcp_frames)
    assert capture.stats.linktypes == {linktype: frames}
    assert len(reassembler.connections) == connections
    assert not list(capture.warnings)


def test_the_facts_cover_every_capture():
    assert sorted(str(p.relative_to(PCAPS)) for p in PCAPS.glob("*/*.pcap*")) == sorted(FACTS)


def _tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), "-Y", "tcp", "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


@needs_tshark
@pytest.mark.parametrize("name", sorted(FACTS))
def test_connections_match_tshark(name):
    """Our connections are tshark's tcp.stream conversations: same endpoints, same frame counts, and the
    same TCP payload bytes per direction (minus what tshark itself marks as retransmitted)."""
    path = PCAPS / name
    frames = collections.Counter()
    endpoints = {}
    payload = collections.Counter()
    for stream, src, sport, dst, dport, length, retrans in _tshark_fields(
            path, "tcp.stream", "ip.src", "tcp.srcport", "ip.dst", "tcp.dstport", "tcp.len",
            "tcp.analysis.retransmission"):
        frames[stream] += 1
        endpoints[stream] = frozenset({f"{src}:{sport}", f"{dst}:{dport}"})
        if not retrans:
            payload[(endpoints[stream], f"{src}:{sport}")] += int(length or 0)
    theirs = sorted((sorted(endpoints[s]), n) for s, n in frames.items())

    capture = Capture.open(path)
    reassembler = Reassembler()
    list(reassembler.run(capture.tcp_segments()))
    ours = sorted((sorted({c.client_address, c.server_address}), c.packets + c.late_packets)
                  for c in reassembler.connections)
    assert ours == theirs
    conv = subprocess.run(["tshark", "-r", str(path), "-q", "-z", "conv,tcp"], capture_output=True, text=True,
                          check=True).stdout
    assert len(reassembler.connections) == sum("<->" in line for line in conv.splitlines())
    for c in reassembler.connections:
        key = frozenset({c.client_address, c.server_address})
        assert c.bytes[True] == payload[(key, c.client_address)]
        assert c.bytes[False] == payload[(key, c.server_address)]


# --- constructed captures -------------------------------------------------------------------------------

def _packet(payload: bytes = b"hi", src="192.0.2.1", dst="192.0.2.2", sport=1234, dport=6667, seq=100,
            flags=ACK | PSH) -> bytes:
    return ipv4(src, dst, tcp(sport, dport, seq, 7, flags, payload))


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_byte_orders_and_resolutions(order, nano):
    """Both byte orders and both timestamp resolutions give the same frames, with exact timestamps."""
    data = pcap([(1700000000.25, ether(_packet(b"one"))), (1700000001.5, ether(_packet(b"two", seq=103)))],
                order=order, nano=nano)
    capture = Capture(data)
    segments = list(capture.tcp_segments())
    assert [s.payload for s in segments] == [b"one", b"two"]
    assert [s.ts for s in segments] == [1700000000.25, 1700000001.5]
    s = segments[0]
    assert (s.src, s.sport, s.dst, s.dport, s.seq, s.ack, s.flags) == ("192.0.2.1", 1234, "192.0.2.2", 6667, 100, 7,
                                                                       ACK | PSH)


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_interfaces_link_types_and_resolutions(order):
    """pcapng: several interfaces with their own link types and if_tsresol (10^-9 and 2^-10), EPB, SPB and
    the obsolete PB; other blocks are skipped."""
    ifcs = [Ifc(1), Ifc(228, tsresol=9), Ifc(113, tsresol=0x80 | 10)]
    packets = [
        (0, 1_700_000_000_000_000, ether(_packet(b"eth"))),
        (1, 1_700_000_000_500_000_000, _packet(b"raw4", seq=102)),
        (2, 1_700_000_000 * 1024 + 256, sll(_packet(b"sll", seq=106))),
        ("spb", ether(_packet(b"spb", seq=109))),
        ("pb", 0, 1_700_000_002_000_000, ether(_packet(b"pb", seq=112))),
    ]
    capture = Capture(pcapng(ifcs, packets, order=order))
    segments = list(capture.tcp_segments())
    assert [s.payload for s in segments] == [b"eth", b"raw4", b"sll", b"spb", b"pb"]
    assert [s.ts for s in segments] == [1700000000.0, 1700000000.5, 1700000000.25, 0.0, 1700000002.0]
    assert capture.stats.linktypes == {1: 3, 228: 1, 113: 1}
    assert not list(capture.warnings)


def test_pcapng_sections_with_different_byte_orders():
    """A second section header restarts the interface list and may change the byte order."""
    first = pcapng([Ifc(1)], [(0, 1_000_000, ether(_packet(b"le")))], order="<")
    second = pcapng([Ifc(101)], [(0, 2_000_000, _packet(b"be", seq=102))], order=">")
    capture = Capture(first + second)
    assert [s.payload for s in capture.tcp_segments()] == [b"le", b"be"]


@pytest.mark.parametrize("linktype, frame", [
    (1, ether(_packet(b"x"), vlans=((0x8100, 10),))),
    (1, ether(_packet(b"x"), vlans=((0x88A8, 100), (0x8100, 200)))),        # QinQ
    (113, sll(_packet(b"x"))),
    (276, sll2(_packet(b"x"))),
    (101, _packet(b"x")),
    (228, _packet(b"x")),
    (12, _packet(b"x")),
    (0, null(_packet(b"x"), order="<")),
    (0, null(_packet(b"x"), order=">")),
    (108, null(_packet(b"x"), order=">")),
])
def test_link_types(linktype, frame):
    """Each supported link type decodes down to the same TCP segment."""
    capture = Capture(pcap([(1.0, frame)], linktype=linktype))
    [segment] = list(capture.tcp_segments())
    assert (segment.src, segment.dport, segment.payload) == ("192.0.2.1", 6667, b"x")


@pytest.mark.parametrize("linktype, wrap", [
    (1, lambda p: ether(p, 0x86DD)), (229, lambda p: p), (101, lambda p: p), (113, lambda p: sll(p, 0x86DD)),
    (0, lambda p: null(p, family=30)), (0, lambda p: null(p, family=24, order=">")),
])
def test_ipv6(linktype, wrap):
    """IPv6, with and without an extension header in front of TCP."""
    for hop in (False, True):
        packet = ipv6("2001:db8::1", "2001:db8::2", tcp(5000, 5222, 1, 0, ACK | PSH, b"v6"), hop_by_hop=hop)
        [segment] = list(Capture(pcap([(1.0, wrap(packet))], linktype=linktype)).tcp_segments())
        assert (segment.src, segment.dst, segment.payload) == ("2001:db8::1", "2001:db8::2", b"v6")


def test_ethernet_padding_and_fcs_are_not_payload():
    """The IP length bounds the payload: padding to 60 bytes and a trailing FCS are not TCP data."""
    frame = ether(_packet(b"")) + b"\0" * 6 + b"\xde\xad\xbe\xef"
    [segment] = list(Capture(pcap([(1.0, frame)])).tcp_segments())
    assert segment.payload == b"" and segment.missing == 0


def test_snap_length_cut_is_reported_as_missing():
    """A packet cut by the snap length keeps its captured payload and says how much is missing."""
    frame = ether(_packet(b"A" * 100))
    capture = Capture(pcap([(1.0, frame[:-60], len(frame))], snaplen=len(frame) - 60))
    [segment] = list(capture.tcp_segments())
    assert segment.payload == b"A" * 40 and segment.missing == 60


def test_truncated_file_keeps_the_frames_before():
    """A file cut in the middle of a record: the whole frames are returned and a warning says where."""
    data = pcap([(1.0, ether(_packet(b"one"))), (2.0, ether(_packet(b"two", seq=103)))])
    for cut in (len(data) - 5, len(data) - (len(ether(_packet(b"two"))) + 10)):
        capture = Capture(data[:cut])
        assert [s.payload for s in capture.tcp_segments()] == [b"one"]
        [warning] = list(capture.warnings)
        assert warning.kind == "truncated-record" and warning.frame == 2 and "cut short" in warning.detail


def test_truncated_pcapng():
    data = pcapng([Ifc(1)], [(0, 1, ether(_packet(b"one"))), (0, 2, ether(_packet(b"two", seq=103)))])
    capture = Capture(data[:-7])
    assert [s.payload for s in capture.tcp_segments()] == [b"one"]
    assert capture.warnings.kinds() == {"truncated-record"}


def test_garbage_record_length_stops_with_a_warning():
    """An absurd record length is not followed (no giant allocation): reading stops with a warning."""
    good = pcap([(1.0, ether(_packet(b"one")))])
    garbage = struct.pack("<IIII", 2, 0, 0x7FFFFFF0, 0x7FFFFFF0) + b"\0" * 64
    capture = Capture(good + garbage, limits=CaptureLimits(max_record_bytes=1 << 20))
    assert [s.payload for s in capture.tcp_segments()] == [b"one"]
    [warning] = list(capture.warnings)
    assert warning.kind == "garbage-record" and warning.frame == 2 and warning.offset == len(good)


def test_garbage_pcapng_block():
    good = pcapng([Ifc(1)], [(0, 1, ether(_packet(b"one")))])
    capture = Capture(good + struct.pack("<II", 6, 13) + b"\0" * 20)
    assert [s.payload for s in capture.tcp_segments()] == [b"one"]
    assert capture.warnings.kinds() == {"garbage-record"}


def test_unknown_link_type_is_warned_once_and_counted():
    capture = Capture(pcap([(1.0, b"\0" * 40), (2.0, b"\0" * 40), (3.0, b"\0" * 40)], linktype=147))
    assert list(capture.tcp_segments()) == []
    [warning] = list(capture.warnings)
    assert (warning.kind, warning.count, warning.frame) == ("unknown-linktype", 3, 1)
    assert "147" in warning.detail


def test_malformed_headers_are_warnings():
    frames = [ether(b"\x45\0"), ether(_packet()[:30]), b"\x01\x02", ether(ipv4("1.1.1.1", "2.2.2.2", b"\0" * 8))]
    capture = Capture(pcap([(float(i), f) for i, f in enumerate(frames)]))
    assert list(capture.tcp_segments()) == []
    assert capture.stats.malformed == 4
    assert capture.warnings.kinds() == {"malformed-ipv4", "malformed-tcp", "malformed-ethernet"}


def _v4_fragments(payload: bytes, size: int = 16, ident: int = 7) -> list[bytes]:
    """The IPv4 datagram carrying `payload` (a TCP segment), cut into fragments by scapy."""
    from scapy.layers.inet import IP, fragment
    from scapy.packet import Raw
    return [bytes(f) for f in fragment(IP(src="192.0.2.1", dst="192.0.2.2", id=ident, proto=6) / Raw(payload),
                                       fragsize=size)]


def _v6_fragments(payload: bytes, size: int = 16, ident: int = 9) -> list[bytes]:
    """The same in IPv6 fragment headers (scapy's fragment6: `size` bytes of data per fragment)."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
    from scapy.packet import Raw
    whole = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(id=ident, nh=6) / Raw(payload)
    return [bytes(f) for f in fragment6(whole, 40 + 8 + size)]


@pytest.mark.parametrize("version", [4, 6])
def test_ip_fragments_are_reassembled_in_any_order(version):
    """A TCP segment in IP fragments, out of order and with a duplicate: one segment, the whole payload."""
    segment = tcp(1234, 6667, 100, 7, ACK | PSH, b"fragmented payload " * 4)
    if version == 4:
        frames = [ether(f) for f in _v4_fragments(segment)]
    else:
        frames = [ether(f, 0x86DD) for f in _v6_fragments(segment)]
    order = [2, 0, 4, 0, 1, 3, 5]
    capture = Capture(pcap([(float(i), frames[j]) for i, j in enumerate(order) if j < len(frames)]))
    [whole] = list(capture.tcp_segments())
    assert whole.payload == b"fragmented payload " * 4 and (whole.sport, whole.seq) == (1234, 100)
    assert capture.stats.fragments == len([j for j in order if j < len(frames)]) and not list(capture.warnings)


def test_missing_fragment_is_a_warning():
    frames = _v4_fragments(tcp(1, 2, 3, 0, ACK, b"x" * 40))
    capture = Capture(pcap([(1.0, ether(frames[0])), (2.0, ether(frames[2]))]))
    assert list(capture.tcp_segments()) == []
    assert capture.warnings.kinds() == {"ip-fragment-incomplete"}


def test_fragment_memory_is_bounded():
    lone = [ether(_v4_fragments(tcp(1, 2, 3, 0, ACK, b"y" * 64), ident=i)[0]) for i in range(10)]
    capture = Capture(pcap([(float(i), f) for i, f in enumerate(lone)]), limits=CaptureLimits(max_fragment_bytes=50))
    assert list(capture.tcp_segments()) == []
    assert capture.warnings.kinds() == {"ip-fragment-evicted", "ip-fragment-incomplete"}
    assert capture._defrag.bytes == 0


def test_udp_and_arp_are_counted_not_decoded():
    udp = ether(ipv4("192.0.2.1", "192.0.2.2", b"\0" * 8, proto=17))
    arp = ether(b"\0" * 28, ethertype=0x0806)
    capture = Capture(pcap([(1.0, udp), (2.0, arp)]))
    assert list(capture.tcp_segments()) == []
    assert (capture.stats.udp, capture.stats.other, len(capture.warnings)) == (1, 1, 0)


@pytest.mark.parametrize("data", [b"", b"\xd4\xc3", b"GET / HTTP/1.1\r\n", b"\xd4\xc3\xb2\xa1" + b"\0" * 10])
def test_not_a_capture(data, tmp_path):
    """Only a file that is not a capture at all raises, with a message naming the file."""
    path = tmp_path / "x.pcap"
    path.write_bytes(data)
    with pytest.raises(CaptureError, match="x.pcap"):
        Capture.open(path)


def test_flags_survive():
    capture = Capture(pcap([(1.0, ether(_packet(b"", flags=SYN))), (2.0, ether(_packet(b"", flags=FIN | ACK)))]))
    first, second = capture.tcp_segments()
    assert first.syn and not first.has_ack and second.fin and second.has_ack


@pytest.mark.parametrize("name", ["zeek/irc-dcc-send.pcapng", "ndpi/jabber.pcap", "zeek/irc-starttls.pcap"])
def test_damaged_captures_never_raise(name):
    """Real captures cut short at random points and with random bytes overwritten: reading and reassembly
    give partial results and warnings, never an exception (Zeek: malformed input is a weird, not a crash)."""
    import random

    rng = random.Random(name)
    original = (PCAPS / name).read_bytes()
    for _ in range(30):
        data = bytearray(original[:rng.randrange(24, len(original))])
        for _ in range(rng.randrange(0, 20)):
            data[rng.randrange(24, len(data))] = rng.randrange(256)
        capture = Capture(bytes(data), limits=CaptureLimits(max_record_bytes=1 << 20))
        reassembler = Reassembler()
        for _ in reassembler.run(capture.tcp_segments()):
            pass
        assert all(w.kind and w.detail for w in capture.warnings)


# --- UDP (packets(): SIP's usual transport) ---------------------------------------------------------------------

def udp(sport: int, dport: int, payload: bytes, length: int | None = None) -> bytes:
    """A UDP header (scapy's; `length` written instead of the true one) and its payload."""
    from scapy.layers.inet import UDP
    from scapy.packet import Raw
    return bytes(UDP(sport=sport, dport=dport, len=length, chksum=0) / Raw(payload))


def test_packets_gives_udp_datagrams_in_file_order_and_tcp_segments_stay_tcp_only():
    from imguard.replay.pcapfile import UdpDatagram
    from test_replay_builders import ether, ipv4, ipv6, pcap, tcp
    frames = [(1.0, ether(ipv4("10.0.0.1", "10.0.0.2", udp(40000, 5060, b"MESSAGE sip:b SIP/2.0\r\n\r\n"), proto=17))),
              (2.0, ether(ipv4("10.0.0.1", "10.0.0.2", tcp(40001, 5222, 1, payload=b"<x/>")))),
              (3.0, ether(ipv6("::1", "::2", udp(5060, 40000, b"SIP/2.0 200 OK\r\n\r\n") + b"\0\0", next_header=17),
                          ethertype=0x86DD))]
    capture = Capture(pcap(frames))
    packets = list(capture.packets())
    assert [type(p).__name__ for p in packets] == ["UdpDatagram", "TcpSegment", "UdpDatagram"]
    first, last = packets[0], packets[2]
    assert (first.src, first.sport, first.dst, first.dport, first.payload) == (
        "10.0.0.1", 40000, "10.0.0.2", 5060, b"MESSAGE sip:b SIP/2.0\r\n\r\n")
    assert isinstance(last, UdpDatagram) and last.payload == b"SIP/2.0 200 OK\r\n\r\n"   # the UDP length bounds it
    assert [type(p).__name__ for p in Capture(pcap(frames)).tcp_segments()] == ["TcpSegment"]


def test_udp_with_a_bad_length_is_malformed_not_a_crash():
    from test_replay_builders import ether, ipv4, pcap
    capture = Capture(pcap([(1.0, ether(ipv4("10.0.0.1", "10.0.0.2", udp(1, 5060, b"x", length=3), proto=17)))]))
    assert list(capture.packets()) == [] and "malformed-udp" in capture.warnings.kinds()
