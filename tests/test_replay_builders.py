"""Builders for the replay tests: packets made with scapy's layers, capture files made with struct.

No tests here: the test_replay_*.py modules import these to construct exactly the captures they
need (every link type, byte order, timestamp resolution and kind of damage) instead of shipping
binary fixtures. The packets (Ethernet with 802.1Q/QinQ tags, Linux cooked SLL and SLL2, loopback, IPv4
with fragments, IPv6 with extension headers, TCP) are scapy's (`scapy.layers`), so the headers the reader
decodes are written by an independent implementation; they are returned as bytes, because the damage tests
cut and patch them. The file builders below stay byte by byte: they write what scapy's writer does not
(big-endian pcapng, nanosecond pcap, if_tsresol, simple and obsolete packet blocks, blocks to skip) and
what no writer would (the damaged files), to test the readers against every variant.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop, PadN
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1Q, Ether, Loopback, LoopbackOpenBSD
from scapy.packet import Raw

from imguard.replay.pcapfile import ACK, FIN, PSH, RST, SYN, TcpSegment

__all__ = ["ACK", "FIN", "PSH", "RST", "SYN", "ipv4", "ipv6", "tcp", "ether", "sll", "sll2", "null", "pcap",
           "pcapng", "Ifc", "seg", "conversation", "stream_capture"]

MAC_SRC, MAC_DST = "02:00:00:00:00:01", "02:00:00:00:00:02"
SLL_ADDRESS = b"\x02\0\0\0\0\x01\0\0"


def tcp(sport: int, dport: int, seq: int, ack: int = 0, flags: int = ACK, payload: bytes = b"") -> bytes:
    """A TCP header (no options) and its payload. Alone, without the IP addresses, its checksum is left 0."""
    return bytes(TCP(sport=sport, dport=dport, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF, dataofs=5, flags=flags,
                     window=65535, chksum=0) / Raw(payload))


def ipv4(src: str, dst: str, payload: bytes, proto: int = 6, frag: int = 0, total: int | None = None,
         ident: int = 1) -> bytes:
    """frag: the 16-bit flags and fragment offset field; total: a total length to write instead of the true one."""
    return bytes(IP(src=src, dst=dst, proto=proto, id=ident, flags=frag >> 13, frag=frag & 0x1FFF, ttl=64, len=total)
                 / Raw(payload))


def ipv6(src: str, dst: str, payload: bytes, next_header: int = 6, hop_by_hop: bool = False) -> bytes:
    if hop_by_hop:      # an 8-byte hop-by-hop options header (PadN) in front of the TCP header
        return bytes(IPv6(src=src, dst=dst, nh=0, hlim=64)
                     / IPv6ExtHdrHopByHop(nh=next_header, options=[PadN(optdata=b"\0" * 4)]) / Raw(payload))
    return bytes(IPv6(src=src, dst=dst, nh=next_header, hlim=64) / Raw(payload))


def ether(payload: bytes, ethertype: int = 0x0800, vlans: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Ethernet II; vlans = ((tpid, vid), ...) outermost first, e.g. ((0x88A8, 100), (0x8100, 200)) for QinQ."""
    types = [tpid for tpid, _ in vlans] + [ethertype]
    frame = Ether(dst=MAC_DST, src=MAC_SRC, type=types[0])
    for (_, vid), inner in zip(vlans, types[1:], strict=True):
        frame = frame / Dot1Q(vlan=vid, type=inner)
    return bytes(frame / Raw(payload))


def sll(payload: bytes, protocol: int = 0x0800) -> bytes:
    return bytes(CookedLinux(pkttype=0, lladdrtype=772, lladdrlen=6, src=SLL_ADDRESS, proto=protocol) / Raw(payload))


def sll2(payload: bytes, protocol: int = 0x0800) -> bytes:
    return bytes(CookedLinuxV2(proto=protocol, reserved=0, ifindex=1, lladdrtype=772, pkttype=0, lladdrlen=6,
                               src=SLL_ADDRESS) / Raw(payload))


def null(payload: bytes, family: int = 2, order: str = "<") -> bytes:
    """BSD loopback: the address family in the capturing host's byte order ("<": scapy's Loopback writes it in
    this machine's, little-endian on the machines the tests run on) or in network order (OpenBSD's loop)."""
    header = LoopbackOpenBSD(type=family) if order == ">" else Loopback(type=family)
    assert order == ">" or bytes(header)[:4] == struct.pack("<I", family), "a big-endian host: write it with struct"
    return bytes(header / Raw(payload))


def pcap(records: list, linktype: int = 1, order: str = "<", nano: bool = False, snaplen: int = 65535) -> bytes:
    """records: (ts, data) or (ts, data, wire_length)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = bytearray(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
    for record in records:
        ts, data = record[0], record[1]
        wire = record[2] if len(record) > 2 else len(data)
        sec = int(ts)
        frac = round((ts - sec) * (1_000_000_000 if nano else 1_000_000))
        out += struct.pack(order + "IIII", sec, frac, len(data), wire) + data
    return bytes(out)


@dataclass
class Ifc:
    linktype: int
    tsresol: int | None = None      # the raw if_tsresol byte (None: the default, microseconds)


def _block(order: str, block_type: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = len(body) + 12
    return struct.pack(order + "II", block_type, total) + body + struct.pack(order + "I", total)


def pcapng(interfaces: list[Ifc], packets: list, order: str = "<", extra_blocks: bool = True) -> bytes:
    """One section. packets: (interface, ts units since epoch as an int, data) for EPBs, ("spb", data) for a
    simple packet block, ("pb", interface, ts, data) for the obsolete packet block."""
    out = bytearray(_block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1)))
    for ifc in interfaces:
        options = b""
        if ifc.tsresol is not None:
            options += struct.pack(order + "HH", 9, 1) + bytes([ifc.tsresol]) + b"\0\0\0"
        options += struct.pack(order + "HH", 2, 4) + b"eth0"           # if_name, to be skipped
        options += struct.pack(order + "HH", 0, 0)
        out += _block(order, 1, struct.pack(order + "HHI", ifc.linktype, 0, 0) + options)
    if extra_blocks:    # blocks the reader must skip: a name resolution block and a custom block
        out += _block(order, 4, struct.pack(order + "HH", 0, 0))
        out += _block(order, 0x00000BAD, b"PEN.whatever")
    for p in packets:
        if p[0] == "spb":
            out += _block(order, 3, struct.pack(order + "I", len(p[1])) + p[1])
        elif p[0] == "pb":
            _, ifc, ts, data = p
            out += _block(order, 2, struct.pack(order + "HHIIII", ifc, 0, ts >> 32, ts & 0xFFFFFFFF, len(data),
                                                len(data)) + data)
        else:
            ifc, ts, data = p
            out += _block(order, 6, struct.pack(order + "IIIII", ifc, ts >> 32, ts & 0xFFFFFFFF, len(data),
                                                len(data)) + data)
    return bytes(out)


# --- segments for reassembly tests --------------------------------------------------------------------

CLIENT = ("10.0.0.1", 40000)
SERVER = ("10.0.0.2", 5222)


def seg(from_client: bool, seq: int, payload: bytes = b"", flags: int = ACK | PSH, ack: int = 0,
        ts: float = 0.0, client=CLIENT, server=SERVER, missing: int = 0) -> TcpSegment:
    (src, sport), (dst, dport) = (client, server) if from_client else (server, client)
    if not payload and flags == ACK | PSH:
        flags = ACK
    return TcpSegment(0, ts, src, sport, dst, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, payload, missing)


def conversation(client_isn: int = 1000, server_isn: int = 5000) -> list[TcpSegment]:
    """A handshake, 'hello' / 'world' both ways, and a FIN handshake."""
    c, s = client_isn, server_isn
    return [
        seg(True, c, flags=SYN),
        seg(False, s, flags=SYN | ACK, ack=c + 1),
        seg(True, c + 1, flags=ACK, ack=s + 1),
        seg(True, c + 1, b"hello", ack=s + 1),
        seg(False, s + 1, b"world", ack=c + 6),
        seg(True, c + 6, flags=FIN | ACK, ack=s + 6),
        seg(False, s + 6, flags=FIN | ACK, ack=c + 7),
        seg(True, c + 7, flags=ACK, ack=s + 7),
    ]


def stream_capture(items: list, port: int = 5222, client=("192.0.2.10", 40001), server=("192.0.2.20", None),
                   close: bool = True, t0: float = 1_700_000_000.0) -> bytes:
    """A pcap of one TCP connection: handshake, then each item (from_client, payload) as one segment
    acknowledged by the peer; an item (from_client, payload, "lost") advances the sequence numbers but is
    left out of the capture (its ACK is kept, so the gap is known at once); then a FIN handshake."""
    server = (server[0], port)
    seqs = {True: 100, False: 900}
    frames = []

    def packet(from_client, flags, payload=b""):
        (src, sp), (dst, dp) = (client, server) if from_client else (server, client)
        return ether(ipv4(src, dst, tcp(sp, dp, seqs[from_client], seqs[not from_client], flags, payload)))

    frames.append(packet(True, SYN))
    seqs[True] += 1
    frames.append(packet(False, SYN | ACK))
    seqs[False] += 1
    frames.append(packet(True, ACK))
    for item in items:
        from_client, payload = item[0], item[1]
        if len(item) < 3:
            frames.append(packet(from_client, ACK | PSH, payload))
        seqs[from_client] += len(payload)
        frames.append(packet(not from_client, ACK))
    if close:
        frames.append(packet(True, FIN | ACK))
        seqs[True] += 1
        frames.append(packet(False, FIN | ACK))
        seqs[False] += 1
        frames.append(packet(True, ACK))
    return pcap([(t0 + i / 100, f) for i, f in enumerate(frames)])
