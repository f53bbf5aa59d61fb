"""Reading packet captures: pcap and pcapng files -> frames -> TCP segments.

Frames come from scapy's raw readers (`scapy.utils.RawPcapReader`, `RawPcapNgReader`: records as bytes,
no per-packet dissection), the default, or from imguard's own `struct` reader (`CaptureLimits.reader`),
which is kept as the reference the tests compare scapy's frames against (tests/test_pcap_readers.py) and
reads the one format scapy does not (the "modified" pcap of old Red Hat tcpdump). Measured on
bench/bench_pcap.py, the whole `imguard pcap` takes 4-9% longer with scapy's readers (docs/architecture.md,
"Replay"; the bar for using them was 10%). What scapy's readers leave out is added here: pcapng's
if_tsoffset, the interface list restarted by each section, frame numbers that count a packet scapy skips
(as Wireshark numbers them), a simple packet block's length taken from its block, and the damage checks
that turn a cut or corrupt file into a `CaptureWarning` at the right frame and offset. The `struct` reader
reads

  * pcap, both byte orders, microsecond (a1b2c3d4) and nanosecond (a1b23c4d) timestamps, and the
    "modified" pcap of old Red Hat tcpdump (a1b2cd34, 8 more bytes per record header);
  * pcapng: SHB (several sections, each with its own byte order), IDB (link type, if_tsresol,
    if_tsoffset per interface), EPB, SPB and the obsolete PB; every other block is skipped.

Whichever reader gives the frames, the link layer and IP/TCP are decoded here, by a small `struct` decoder
on purpose: it is the hot loop of `imguard pcap`, and per-packet dissection with a general library (scapy's
`Ether(bytes)`) is an order of magnitude slower. It decodes link types Ethernet (802.1Q / 802.1ad / QinQ
tags), Linux cooked SLL and SLL2, raw IP (101, 228, 229 and the DLT_RAW values 12 and 14), BSD loopback
(0, in either byte order) and OpenBSD loop (108), then IPv4 / IPv6 (extension headers walked) and TCP.

IP fragments (v4 and v6) are reassembled (bounded by `max_fragment_bytes`). Nothing here raises on
bad input after the file header: a file cut mid-record, a record with an
absurd length, an unknown link type, a malformed header become `CaptureWarning`s (counted, the first
occurrence kept with its frame number and file offset) and the frames read so far are still
returned, as Zeek turns malformed traffic into a "weird" rather than a crash. Only a file that is not
a capture at all raises `CaptureError`.

    capture = Capture.open("irc-dcc-send.pcapng")
    for segment in capture.tcp_segments():      # TcpSegment(frame, ts, src, sport, dst, dport, seq, ...)
        ...
    capture.warnings, capture.stats
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import socket
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from struct import Struct
from typing import Iterator

from imguard.settings import MiB, setting

# --- link types (https://www.tcpdump.org/linktypes.html) -------------------------------------------

LINKTYPE_NULL = 0           # BSD loopback: 4-byte address family in the capturing host's byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_DLT12 = 12     # DLT_RAW on most BSDs, as written by some old tools
LINKTYPE_RAW_DLT14 = 14     # DLT_RAW on OpenBSD
LINKTYPE_RAW = 101          # raw IPv4 or IPv6, told apart by the version nibble
LINKTYPE_LOOP = 108         # OpenBSD loopback: address family in network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

LINKTYPE_NAMES = {
    LINKTYPE_NULL: "null", LINKTYPE_ETHERNET: "ethernet", LINKTYPE_RAW_DLT12: "raw", LINKTYPE_RAW_DLT14: "raw",
    LINKTYPE_RAW: "raw", LINKTYPE_LOOP: "loop", LINKTYPE_LINUX_SLL: "linux-sll", LINKTYPE_IPV4: "ipv4",
    LINKTYPE_IPV6: "ipv6", LINKTYPE_LINUX_SLL2: "linux-sll2",
}

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = (0x8100, 0x88A8, 0x9100)   # 802.1Q, 802.1ad (QinQ outer), the old QinQ value

# BSD address families for IPv6 differ by OS (24 NetBSD/OpenBSD, 28 FreeBSD, 30 macOS).
AF_INET_BSD = 2
AF_INET6_BSD = (24, 28, 30)

# TCP flags
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

PCAP_MAGICS = {
    # magic as read little-endian -> (byte order prefix, timestamp divisor, record header size)
    0xA1B2C3D4: ("<", 1_000_000, 16), 0xD4C3B2A1: (">", 1_000_000, 16),
    0xA1B23C4D: ("<", 1_000_000_000, 16), 0x4D3CB2A1: (">", 1_000_000_000, 16),
    0xA1B2CD34: ("<", 1_000_000, 24), 0x34CDB2A1: (">", 1_000_000, 24),
}
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D


READERS = ("scapy", "struct")


@dataclass(frozen=True)
class CaptureLimits:
    """Capture reading: the reader and its limits."""

    reader: str = setting(
        "scapy", "What reads capture files into frames: 'scapy' (scapy's RawPcapReader and RawPcapNgReader) or "
                 "'struct' (imguard's own reader, the reference the tests compare scapy's frames against). The "
                 "link layer, IP, TCP and reassembly are imguard's either way; the old Red Hat 'modified' pcap "
                 "(magic a1b2cd34), which scapy does not read, is always read by 'struct'")

    max_record_bytes: int = setting(
        16 * MiB, "A capture record (packet or pcapng block) longer than this is taken as garbage and reading "
                  "stops there with a warning: real packets are at most 256 KiB, and a corrupt length would "
                  "otherwise make the reader allocate gigabytes")
    max_fragment_bytes: int = setting(
        4 * MiB, "Bytes of IP fragments held while their datagrams are incomplete; past it the oldest incomplete "
                 "datagram is dropped (a warning), so a capture full of lone fragments cannot grow memory")

    def __post_init__(self) -> None:
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, not {self.reader!r}")


class _Defragmenter:
    """IPv4/IPv6 fragments -> whole datagrams. The first copy of each fragment offset wins; memory is bounded
    by max_bytes (the oldest incomplete datagram is dropped first). No timeouts: a capture is finite."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.pending: OrderedDict[tuple, list] = OrderedDict()   # key -> [{offset: bytes}, total length or None]

    def add(self, key: tuple, offset: int, more: bool, payload: bytes) -> tuple[bytes | None, int]:
        entry = self.pending.get(key)
        if entry is None:
            entry = self.pending[key] = [{}, None]
        pieces = entry[0]
        if offset not in pieces:
            pieces[offset] = payload
            self.bytes += len(payload)
        if not more:
            entry[1] = offset + len(payload)
        if entry[1] is not None:
            whole = bytearray()
            for start in sorted(pieces):
                if start > len(whole):
                    break                                       # a hole: wait for more fragments
                piece = pieces[start]
                if start + len(piece) > len(whole):
                    whole += piece[len(whole) - start:]
            else:
                if len(whole) >= entry[1]:
                    self._drop(key)
                    return bytes(whole[:entry[1]]), 0
        evicted = 0
        while self.bytes > self.max_bytes and self.pending:
            self._drop(next(iter(self.pending)))
            evicted += 1
        return None, evicted

    def _drop(self, key: tuple) -> None:
        entry = self.pending.pop(key)
        self.bytes -= sum(len(p) for p in entry[0].values())

    def clear(self) -> int:
        """Forget every incomplete datagram; how many there were."""
        count = len(self.pending)
        self.pending.clear()
        self.bytes = 0
        return count


class CaptureError(Exception):
    """The file is not a packet capture at all (empty, or an unknown magic number)."""


@dataclass
class CaptureWarning:
    """Something wrong in the capture: kept with where it first happened and how often it happened."""

    kind: str           # a short stable name, e.g. "truncated-record", "unknown-linktype"
    detail: str         # one sentence about the first occurrence
    frame: int = 0      # frame number (1-based, as Wireshark counts) of the first occurrence, 0 if none
    offset: int = -1    # file offset of the first occurrence, -1 if not about a file position
    count: int = 1

    def __str__(self) -> str:
        where = []
        if self.frame:
            where.append(f"frame {self.frame}")
        if self.offset >= 0:
            where.append(f"offset {self.offset}")
        times = f" ({self.count} times)" if self.count > 1 else ""
        return f"{self.kind}: {self.detail}" + (f" [{', '.join(where)}]" if where else "") + times

    def to_dict(self) -> dict:
        return {"kind": self.kind, "detail": self.detail, "frame": self.frame, "offset": self.offset,
                "count": self.count}


class Warnings:
    """Warnings collected by kind and key: the first occurrence is kept, later ones only counted."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, CaptureWarning] = {}

    def add(self, kind: str, detail: str, frame: int = 0, offset: int = -1, key: object = None) -> None:
        k = (kind, key)
        existing = self._by_key.get(k)
        if existing is not None:
            existing.count += 1
        else:
            self._by_key[k] = CaptureWarning(kind, detail, frame, offset)

    def __iter__(self) -> Iterator[CaptureWarning]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def kinds(self) -> set[str]:
        return {w.kind for w in self}


@dataclass(slots=True)
class Frame:
    """One captured packet as the file holds it."""

    number: int         # 1-based, as Wireshark numbers frames
    ts: float           # seconds since the epoch
    linktype: int
    data: bytes         # the captured bytes (may be shorter than the packet on the wire)
    wire_length: int    # the packet's length on the wire
    interface: int = 0


@dataclass(slots=True)
class TcpSegment:
    """A TCP segment decoded from a frame."""

    frame: int
    ts: float
    src: str            # IP address as text (IPv6 compressed, no brackets)
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes      # the captured payload
    missing: int = 0    # payload bytes on the wire that the capture did not keep (snap length): a gap

    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)

    @property
    def has_ack(self) -> bool:
        return bool(self.flags & ACK)


@dataclass(slots=True)
class UdpDatagram:
    """A UDP datagram decoded from a frame (`Capture.packets()`: SIP's usual transport)."""

    frame: int
    ts: float
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes      # the captured payload (a datagram cut by the snap length is cut here too)
    missing: int = 0    # payload bytes on the wire that the capture did not keep


@dataclass
class CaptureStats:
    format: str = ""                # "pcap" or "pcapng"
    bytes: int = 0                  # file size
    frames: int = 0
    ipv4: int = 0
    ipv6: int = 0
    tcp: int = 0
    udp: int = 0
    other: int = 0                  # frames that are neither TCP nor UDP over IP (ARP, ICMP, ...)
    fragments: int = 0              # IP fragments (reassembled into datagrams)
    malformed: int = 0
    linktypes: dict[int, int] = field(default_factory=dict)   # link type -> frames

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


_U16BE = Struct(">H")
_U32BE = Struct(">I")
_U32LE = Struct("<I")
_IPV4 = Struct(">BBHHHBBH4s4s")
_IPV6 = Struct(">IHBB16s16s")
_TCP = Struct(">HHIIBB")
_UDP = Struct(">HHH")

_inet_ntop = socket.inet_ntop
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_EXT_HEADERS = (0, 43, 60, 135, 139, 140)   # hop-by-hop, routing, destination options, mobility, HIP, shim6


class Capture:
    """One capture file: its frames, their TCP segments, and what was wrong with it."""

    def __init__(self, data: bytes | memoryview | mmap.mmap, name: str = "<bytes>",
                 limits: CaptureLimits | None = None):
        self.name = name
        self.limits = limits or CaptureLimits()
        self.warnings = Warnings()
        self.stats = CaptureStats(bytes=len(data))
        self._data = data
        if len(data) < 4:
            raise CaptureError(f"{name}: not a packet capture (file is {len(data)} bytes long)")
        magic = self._magic = _U32LE.unpack_from(data, 0)[0]
        if magic == PCAPNG_SHB:
            self.stats.format = "pcapng"
        elif magic in PCAP_MAGICS:
            self.stats.format = "pcap"
            if len(data) < 24:
                raise CaptureError(f"{name}: pcap file header cut short ({len(data)} of 24 bytes)")
        else:
            raise CaptureError(f"{name}: not a pcap or pcapng file (magic number {magic:#010x})")
        self._ip_cache: dict[bytes, str] = {}
        self._defrag = _Defragmenter(self.limits.max_fragment_bytes)
        self.position = 0               # bytes of the file read so far (for a progress bar)
        self.udp = False                # decode_tcp also returns UDP datagrams (packets() turns it on)

    @classmethod
    def open(cls, path: str | os.PathLike, limits: CaptureLimits | None = None) -> "Capture":
        """Map the file into memory (read it, when it cannot be mapped) and check its header."""
        path = Path(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except (OSError, ValueError):
                data = f.read()
        return cls(data, str(path), limits)

    # --- frames ---------------------------------------------------------------------------------------

    def frames(self) -> Iterator[Frame]:
        """Every frame in file order. Stops with a warning at the first record that cannot be read."""
        if self.limits.reader == "scapy" and self._magic not in _STRUCT_ONLY:
            yield from self._scapy_frames()
        elif self.stats.format == "pcap":
            yield from self._pcap_frames()
        else:
            yield from self._pcapng_frames()

    def _pcap_frames(self) -> Iterator[Frame]:
        data, size, warn = self._data, len(self._data), self.warnings
        magic = _U32LE.unpack_from(data, 0)[0]
        order, divisor, rec_size = PCAP_MAGICS[magic]
        header = Struct(order + "HHiIII").unpack_from(data, 4)
        network = header[5]
        linktype = network & 0xFFFF             # upper bits: FCS presence and length (draft-ietf-opsawg-pcap)
        record = Struct(order + "IIII")
        max_record = self.limits.max_record_bytes
        offset, number = 24, 0
        stats = self.stats
        while offset < size:
            if offset + rec_size > size:
                warn.add("truncated-record", f"the capture ends inside a record header ({size - offset} of "
                         f"{rec_size} bytes); the file was cut short", number + 1, offset)
                return
            ts_sec, ts_frac, caplen, origlen = record.unpack_from(data, offset)
            if caplen > max_record:
                warn.add("garbage-record", f"record length {caplen} is absurd (limit {max_record}); the rest of "
                         f"the file ({size - offset} bytes) is not read", number + 1, offset)
                return
            start = offset + rec_size
            end = start + caplen
            if end > size:
                warn.add("truncated-record", f"the capture ends inside a packet ({size - start} of {caplen} "
                         "bytes); the file was cut short", number + 1, offset)
                return
            number += 1
            if caplen > origlen:
                warn.add("bad-record-length", f"captured length {caplen} exceeds the length on the wire "
                         f"{origlen}", number, offset)
                origlen = caplen
            stats.frames = number
            self.position = end
            yield Frame(number, ts_sec + ts_frac / divisor, linktype, data[start:end], origlen)
            offset = end

    def _pcapng_frames(self) -> Iterator[Frame]:
        data, size, warn = self._data, len(self._data), self.warnings
        max_record = self.limits.max_record_bytes
        offset, number = 0, 0
        order = "<"
        u32 = _U32LE
        interfaces: list[tuple[int, int, float]] = []     # (linktype, units per second, offset seconds)
        while offset < size:
            if offset + 12 > size:
                warn.add("truncated-record", f"the capture ends inside a block header ({size - offset} bytes "
                         "left); the file was cut short", number + 1, offset)
                return
            block_type = _U32LE.unpack_from(data, offset)[0]    # the SHB type reads the same in both orders
            if block_type == PCAPNG_SHB:
                bom = _U32LE.unpack_from(data, offset + 8)[0]
                if bom == PCAPNG_BYTE_ORDER_MAGIC:
                    order, u32 = "<", _U32LE
                elif bom == 0x4D3C2B1A:
                    order, u32 = ">", _U32BE
                else:
                    warn.add("garbage-record", f"section header with an unknown byte-order magic {bom:#010x}; "
                             "the rest of the file is not read", number + 1, offset)
                    return
                interfaces = []      # interface ids are per section
            else:
                block_type = u32.unpack_from(data, offset)[0]
            total = u32.unpack_from(data, offset + 4)[0]
            if total < 12 or total % 4 or total > max_record:
                warn.add("garbage-record", f"block of type {block_type:#x} claims length {total} (must be a "
                         f"multiple of 4, at least 12, at most {max_record}); the rest of the file "
                         f"({size - offset} bytes) is not read", number + 1, offset)
                return
            if offset + total > size:
                warn.add("truncated-record", f"the capture ends inside a block of type {block_type:#x} "
                         f"({size - offset} of {total} bytes); the file was cut short", number + 1, offset)
                return
            if u32.unpack_from(data, offset + total - 4)[0] != total:
                warn.add("garbage-record", f"block of type {block_type:#x}: trailing length differs from the "
                         f"leading length {total}; the rest of the file is not read", number + 1, offset)
                return
            body = offset + 8
            body_end = offset + total - 4
            if block_type == 6 or block_type == 2:          # enhanced packet block / obsolete packet block
                if block_type == 6:
                    if_id, ts_hi, ts_lo, caplen, origlen = Struct(order + "IIIII").unpack_from(data, body)
                else:
                    if_id, _drops, ts_hi, ts_lo, caplen, origlen = Struct(order + "HHIIII").unpack_from(data, body)
                start = body + 20
                number += 1
                self.stats.frames = number
                if start + caplen > body_end:
                    warn.add("garbage-record", f"packet block's captured length {caplen} exceeds its block "
                             f"length {total}; packet skipped", number, offset)
                    offset += total
                    continue
                if if_id >= len(interfaces):
                    warn.add("unknown-interface", f"packet on interface {if_id}, but the section describes "
                             f"{len(interfaces)} interfaces; packet skipped", number, offset, key=if_id)
                    offset += total
                    continue
                linktype, units, ts_offset = interfaces[if_id]
                if caplen > origlen:
                    warn.add("bad-record-length", f"captured length {caplen} exceeds the length on the wire "
                             f"{origlen}", number, offset)
                    origlen = caplen
                ts = ((ts_hi << 32) | ts_lo) / units + ts_offset
                self.position = offset + total
                yield Frame(number, ts, linktype, data[start:start + caplen], origlen, if_id)
            elif block_type == 3:                           # simple packet block: interface 0, no timestamp
                origlen = u32.unpack_from(data, body)[0]
                start = body + 4
                caplen = min(origlen, body_end - start)
                number += 1
                self.stats.frames = number
                if not interfaces:
                    warn.add("unknown-interface", "simple packet block before any interface description; "
                             "packet skipped", number, offset, key="spb")
                else:
                    yield Frame(number, 0.0, interfaces[0][0], data[start:start + caplen], origlen, 0)
            elif block_type == 1:                           # interface description block
                linktype, _reserved, _snaplen = Struct(order + "HHI").unpack_from(data, body)
                units, ts_offset = 1_000_000, 0.0
                for code, value in _options(data, body + 8, body_end, order):
                    if code == 9 and value:                 # if_tsresol
                        v = value[0]
                        units = 2 ** (v & 0x7F) if v & 0x80 else 10 ** v
                    elif code == 14 and len(value) >= 8:    # if_tsoffset, seconds
                        ts_offset = float(Struct(order + "q").unpack_from(value, 0)[0])
                interfaces.append((linktype, units, ts_offset))
            offset += total

    def _scapy_frames(self) -> Iterator[Frame]:
        """The frames as scapy's raw readers give them, numbered as Wireshark numbers them; damage becomes a
        warning at the frame and offset where reading stopped (scapy's own log lines about it are dropped)."""
        data, size, warn = self._data, len(self._data), self.warnings
        source = data if isinstance(data, mmap.mmap) else io.BytesIO(data)
        source.seek(0)
        pcap_reader, ng_reader = _scapy_readers()
        try:
            reader = (ng_reader if self.stats.format == "pcapng" else pcap_reader)(source)
        except Exception as e:        # scapy parses hostile input: whatever it raises is a warning, not a crash
            warn.add("garbage-record", f"scapy could not read the file header ({e}); nothing is read", 1, 0)
            return
        if self.stats.format == "pcap":
            yield from self._scapy_pcap(reader, source, size)
        else:
            yield from self._scapy_pcapng(reader, source, size)

    def _scapy_pcap(self, reader, source, size: int) -> Iterator[Frame]:
        warn, stats = self.warnings, self.stats
        read = reader._read_packet
        max_record = self.limits.max_record_bytes
        divisor = 1_000_000_000 if reader.nano else 1_000_000
        linktype = reader.linktype & 0xFFFF     # upper bits: FCS presence and length (draft-ietf-opsawg-pcap)
        number = 0
        offset = source.tell()
        while True:
            try:
                packet, (ts_sec, ts_frac, origlen, caplen) = read(max_record)
            except EOFError:
                if offset < size:
                    warn.add("truncated-record", f"the capture ends inside a record header ({size - offset} of "
                             "16 bytes); the file was cut short", number + 1, offset)
                return
            except Exception as e:        # see _scapy_frames
                warn.add("garbage-record", f"scapy could not read the record ({e}); the rest of the file is not "
                         "read", number + 1, offset)
                return
            if caplen > max_record:
                warn.add("garbage-record", f"record length {caplen} is absurd (limit {max_record}); the rest of "
                         f"the file ({size - offset} bytes) is not read", number + 1, offset)
                return
            if len(packet) < caplen:
                if offset + 16 + caplen > size:
                    warn.add("truncated-record", f"the capture ends inside a packet ({size - offset - 16} of "
                             f"{caplen} bytes); the file was cut short", number + 1, offset)
                    return
                warn.add("record-cut", f"scapy reads at most {len(packet)} bytes of a record; the rest of its "
                         f"{caplen} bytes is a gap", number + 1, offset)
            number += 1
            if caplen > origlen:
                warn.add("bad-record-length", f"captured length {caplen} exceeds the length on the wire "
                         f"{origlen}", number, offset)
                origlen = caplen
            stats.frames = number
            offset = self.position = offset + 16 + caplen
            yield Frame(number, ts_sec + ts_frac / divisor, linktype, packet, origlen)

    def _scapy_pcapng(self, reader, source, size: int) -> Iterator[Frame]:
        warn, stats, tell = self.warnings, self.stats, source.tell
        read = reader._read_block
        max_record = self.limits.max_record_bytes
        number = 0
        while True:
            offset = tell()
            try:
                block = read(max_record)
            except EOFError:
                if offset < size:
                    kind, detail = _pcapng_damage(self._data, offset, reader.endian, max_record)
                    warn.add(kind, detail, number + 1, offset)
                return
            except Exception as e:        # see _scapy_frames
                warn.add("garbage-record", f"scapy could not read the block ({e}); the rest of the file is not "
                         "read", number + 1, offset)
                return
            if reader.skipped is not None:                  # a packet on an interface the section lacks
                number += 1
                stats.frames = number
                if_id, reader.skipped = reader.skipped, None
                warn.add("unknown-interface", f"packet on interface {if_id}, but the section describes "
                         f"{len(reader.interfaces)} interfaces; packet skipped", number, offset, key=if_id)
                continue
            if block is None:                               # not a packet: SHB, IDB, statistics, names, ...
                continue
            packet, meta = block
            number += 1
            stats.frames = number
            self.position = tell()
            caplen, origlen = reader.caplen, meta.wirelen
            reader.caplen = -1
            if caplen > len(packet):
                warn.add("garbage-record", f"packet block's captured length {caplen} exceeds its block; packet "
                         "skipped", number, offset)
                continue
            if caplen < 0:                                  # SPB: what the block holds
                caplen = len(packet)
            if caplen > origlen:
                warn.add("bad-record-length", f"captured length {caplen} exceeds the length on the wire "
                         f"{origlen}", number, offset)
                origlen = caplen
            options = reader.interfaces[reader.if_id][2]
            ts = 0.0 if meta.tshigh is None else ((meta.tshigh << 32) | meta.tslow) / meta.tsresol + options["tsoffset"]
            yield Frame(number, ts, meta.linktype, packet, origlen, reader.if_id)

    # --- decoding -------------------------------------------------------------------------------------

    def tcp_segments(self) -> Iterator[TcpSegment]:
        """The TCP segments of every frame, in file order; other frames are counted in `stats`."""
        decode = self.decode_tcp
        for frame in self.frames():
            segment = decode(frame)
            if segment is not None:
                yield segment
        incomplete = self._defrag.clear()
        if incomplete:
            self.warnings.add("ip-fragment-incomplete", f"{incomplete} fragmented datagrams never completed (a "
                              "fragment is missing from the capture); their streams show gaps")

    def packets(self) -> Iterator[TcpSegment | UdpDatagram]:
        """The TCP segments and UDP datagrams of every frame, in file order; other frames are counted."""
        self.udp = True
        yield from self.tcp_segments()

    def _ip(self, raw: bytes, family: int) -> str:
        text = self._ip_cache.get(raw)
        if text is None:
            text = _inet_ntop(family, raw)
            if len(self._ip_cache) < 65536:
                self._ip_cache[raw] = text
        return text

    def decode_tcp(self, frame: Frame) -> TcpSegment | UdpDatagram | None:
        """Link layer -> IP -> TCP (and UDP, when `udp` is on). None for anything else (counted, and warned about
        when malformed)."""
        stats, data, linktype = self.stats, frame.data, frame.linktype
        stats.linktypes[linktype] = stats.linktypes.get(linktype, 0) + 1
        n = len(data)
        version = 0
        # link layer -> offset of the IP header and its version (4 or 6), or return
        if linktype == LINKTYPE_ETHERNET:
            if n < 14:
                return self._malformed(frame, "ethernet", f"frame of {n} bytes is shorter than an Ethernet header")
            off = 12
            ethertype = (data[12] << 8) | data[13]
            while ethertype in ETHERTYPE_VLAN:
                off += 4
                if n < off + 2:
                    return self._malformed(frame, "vlan", "frame ends inside an 802.1Q tag")
                ethertype = (data[off] << 8) | data[off + 1]
            off += 2
        elif linktype == LINKTYPE_LINUX_SLL:
            if n < 16:
                return self._malformed(frame, "sll", f"frame of {n} bytes is shorter than a Linux cooked header")
            ethertype = (data[14] << 8) | data[15]
            off = 16
            while ethertype in ETHERTYPE_VLAN:      # the VLAN tag left in place by some drivers
                if n < off + 4:
                    return self._malformed(frame, "vlan", "frame ends inside an 802.1Q tag")
                ethertype = (data[off + 2] << 8) | data[off + 3]
                off += 4
        elif linktype == LINKTYPE_LINUX_SLL2:
            if n < 20:
                return self._malformed(frame, "sll2", f"frame of {n} bytes is shorter than a Linux SLL2 header")
            ethertype = (data[0] << 8) | data[1]
            off = 20
            while ethertype in ETHERTYPE_VLAN:
                if n < off + 4:
                    return self._malformed(frame, "vlan", "frame ends inside an 802.1Q tag")
                ethertype = (data[off + 2] << 8) | data[off + 3]
                off += 4
        elif linktype in (LINKTYPE_RAW, LINKTYPE_RAW_DLT12, LINKTYPE_RAW_DLT14, LINKTYPE_IPV4, LINKTYPE_IPV6):
            if not n:
                return self._malformed(frame, "raw", "empty frame")
            off = 0
            version = data[0] >> 4
            ethertype = ETHERTYPE_IPV4 if version == 4 else ETHERTYPE_IPV6 if version == 6 else 0
            if not ethertype:
                return self._malformed(frame, "ip", f"raw IP frame with IP version {version}")
        elif linktype == LINKTYPE_NULL or linktype == LINKTYPE_LOOP:
            if n < 4:
                return self._malformed(frame, "loopback", "frame shorter than the 4-byte loopback header")
            family = _U32BE.unpack_from(data, 0)[0]
            if linktype == LINKTYPE_NULL and family > 0xFFFF:   # written in the other byte order
                family = _U32LE.unpack_from(data, 0)[0]
            off = 4
            ethertype = (ETHERTYPE_IPV4 if family == AF_INET_BSD else
                         ETHERTYPE_IPV6 if family in AF_INET6_BSD else 0)
            if not ethertype:
                stats.other += 1
                return None
        else:
            self.warnings.add("unknown-linktype", f"link type {linktype} is not decoded; its frames are skipped",
                              frame.number, key=linktype)
            stats.other += 1
            return None

        # IP
        missing = frame.wire_length - n        # bytes the capture did not keep (snap length)
        if ethertype == ETHERTYPE_IPV4:
            if n < off + 20:
                return self._malformed(frame, "ipv4", "frame ends inside the IPv4 header")
            vihl, _tos, total, ident, frag, _ttl, proto, _sum, src, dst = _IPV4.unpack_from(data, off)
            ihl = (vihl & 0x0F) * 4
            if vihl >> 4 != 4 or ihl < 20:
                return self._malformed(frame, "ipv4", f"bad IPv4 version/header length byte {vihl:#04x}")
            stats.ipv4 += 1
            if frag & 0x3FFF:                       # more fragments, or a non-zero offset
                stats.fragments += 1
                if proto != 6 and not (proto == 17 and self.udp):
                    stats.other += 1
                    return None
                if total < ihl:
                    return self._malformed(frame, "ipv4", f"IPv4 fragment total length {total} below its header")
                whole = self._fragment(frame, (4, src, dst, ident, proto), (frag & 0x1FFF) * 8, bool(frag & 0x2000),
                                       data, off + ihl, off + total)
                if whole is None:
                    return None
                # the datagram is whole: decode its TCP header and payload from the reassembled bytes
                data, n, missing, off, total, ihl = whole, len(whole), 0, 0, len(whole), 0
            if proto != 6:
                if proto == 17:
                    stats.udp += 1
                    if self.udp:
                        return self._udp_datagram(frame, data, off + ihl, off + total if total else n + missing,
                                                  n, missing, self._ip(src, _AF_INET), self._ip(dst, _AF_INET))
                else:
                    stats.other += 1
                return None
            end = off + total
            if total < ihl:
                if total == 0:      # TSO: the length is filled in by the NIC; trust the frame
                    end = n + missing
                else:
                    return self._malformed(frame, "ipv4", f"IPv4 total length {total} below its header length")
            tcp_off = off + ihl
            src_text = self._ip(src, _AF_INET)
            dst_text = self._ip(dst, _AF_INET)
        elif ethertype == ETHERTYPE_IPV6:
            if n < off + 40:
                return self._malformed(frame, "ipv6", "frame ends inside the IPv6 header")
            vtf, plen, proto, _hops, src, dst = _IPV6.unpack_from(data, off)
            if vtf >> 28 != 6:
                return self._malformed(frame, "ipv6", f"bad IPv6 version {vtf >> 28}")
            stats.ipv6 += 1
            end = off + 40 + plen
            tcp_off = off + 40
            while proto in _EXT_HEADERS or proto == 44 or proto == 51:
                if n < tcp_off + 8:
                    return self._malformed(frame, "ipv6", "frame ends inside an IPv6 extension header")
                if proto == 44:
                    frag = (data[tcp_off + 2] << 8) | data[tcp_off + 3]
                    proto = data[tcp_off]
                    if frag & 0xFFF9:               # an offset, or more fragments: a real fragment
                        stats.fragments += 1
                        ident = bytes(data[tcp_off + 4:tcp_off + 8])
                        whole = self._fragment(frame, (6, src, dst, ident, proto), frag & 0xFFF8, bool(frag & 1),
                                               data, tcp_off + 8, end)
                        if whole is None:
                            return None
                        data, n, missing, tcp_off, end = whole, len(whole), 0, 0, len(whole)
                        continue
                    tcp_off += 8
                elif proto == 51:                   # AH: length in 4-byte units, minus 2
                    proto, tcp_off = data[tcp_off], tcp_off + (data[tcp_off + 1] + 2) * 4
                else:
                    proto, tcp_off = data[tcp_off], tcp_off + (data[tcp_off + 1] + 1) * 8
            if proto != 6:
                if proto == 17:
                    stats.udp += 1
                    if self.udp:
                        return self._udp_datagram(frame, data, tcp_off, end if plen else n + missing, n, missing,
                                                  self._ip(src, _AF_INET6), self._ip(dst, _AF_INET6))
                else:
                    stats.other += 1
                return None
            if plen == 0:                           # jumbogram or TSO: trust the frame
                end = n + missing
            src_text = self._ip(src, _AF_INET6)
            dst_text = self._ip(dst, _AF_INET6)
        else:
            stats.other += 1
            return None

        # TCP
        if n < tcp_off + 20:
            return self._malformed(frame, "tcp", "frame ends inside the TCP header")
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(data, tcp_off)
        payload_off = tcp_off + (doff >> 4) * 4
        if payload_off < tcp_off + 20 or payload_off > end:
            return self._malformed(frame, "tcp", f"TCP data offset {doff >> 4} is outside the segment")
        stats.tcp += 1
        # The IP length bounds the payload: Ethernet padding and trailers (FCS) are not TCP data.
        if end <= n:
            return TcpSegment(frame.number, frame.ts, src_text, sport, dst_text, dport, seq, ack, flags,
                              data[payload_off:end], 0)
        if end > n + missing:
            self.warnings.add("ip-length", "IP length exceeds the packet on the wire; payload cut to the frame",
                              frame.number)
            end = n + missing
        payload_captured = data[payload_off:n] if payload_off < n else b""
        return TcpSegment(frame.number, frame.ts, src_text, sport, dst_text, dport, seq, ack, flags,
                          payload_captured, end - max(payload_off, n))

    def _udp_datagram(self, frame: Frame, data: bytes, off: int, end: int, n: int, missing: int, src: str,
                      dst: str) -> UdpDatagram | None:
        """The UDP header at `off` and its payload, bounded by the IP length `end` and the UDP length."""
        if n < off + 8:
            return self._malformed(frame, "udp", "frame ends inside the UDP header")
        sport, dport, length = _UDP.unpack_from(data, off)
        if length < 8:
            return self._malformed(frame, "udp", f"UDP length {length} below its header")
        end = min(end, off + length)
        return UdpDatagram(frame.number, frame.ts, src, sport, dst, dport, bytes(data[off + 8:min(end, n)]),
                           max(0, end - max(off + 8, n)))

    def _fragment(self, frame: Frame, key: tuple, offset: int, more: bool, data: bytes, start: int,
                  end: int) -> bytes | None:
        """Add one IP fragment; the reassembled payload once the datagram is whole, else None."""
        if end > len(data):
            self.warnings.add("ip-fragment-cut", "an IP fragment cut by the snap length cannot be reassembled; "
                              "its datagram is lost (its stream shows a gap)", frame.number)
            return None
        whole, evicted = self._defrag.add(key, offset, more, bytes(data[start:end]))
        if evicted:
            self.warnings.add("ip-fragment-evicted", f"{evicted} incomplete fragmented datagrams dropped to stay "
                              f"within max_fragment_bytes={self.limits.max_fragment_bytes}", frame.number)
        return whole

    def _malformed(self, frame: Frame, layer: str, detail: str) -> None:
        self.stats.malformed += 1
        self.warnings.add("malformed-" + layer, detail, frame.number)
        return None


def _options(data, offset: int, end: int, order: str) -> Iterator[tuple[int, bytes]]:
    """pcapng options: (code, value) until opt_endofopt or the end of the block."""
    header = Struct(order + "HH")
    while offset + 4 <= end:
        code, length = header.unpack_from(data, offset)
        if code == 0:
            return
        value = bytes(data[offset + 4:offset + 4 + length])
        offset += 4 + ((length + 3) & ~3)
        yield code, value


# --- scapy's raw readers ---------------------------------------------------------------------------------

_STRUCT_ONLY = (0xA1B2CD34, 0x34CDB2A1)    # the "modified" pcap: scapy does not read it


def _not_a_reader_warning(record: logging.LogRecord) -> bool:
    """A logging filter on scapy's logger: its capture readers' warnings ("Pcap: ...", "PcapNg: ...") are dropped,
    as the reader turns damage into CaptureWarnings; scapy's other messages pass."""
    return not str(record.msg).startswith(("Pcap: ", "PcapNg: ", "PcapReader: "))


_READERS: tuple | None = None


def _scapy_readers() -> tuple:
    """scapy's RawPcapReader, and a RawPcapNgReader that also keeps what imguard's frames need and scapy's
    metadata leaves out: if_tsoffset, the EPB's captured length and interface, a packet skipped for naming
    an interface the section lacks, an SPB's bytes up to its block's end (scapy cuts them to the snap
    length, and a snap length of 0 means none), and the interface list restarted by each section header.
    Imported on first use (scapy takes ~0.2 s to import)."""
    global _READERS
    if _READERS is not None:
        return _READERS
    from scapy.utils import RawPcapNgReader, RawPcapReader
    logging.getLogger("scapy.runtime").addFilter(_not_a_reader_warning)

    class NgReader(RawPcapNgReader):
        skipped: int | None = None      # the interface id of a packet just skipped
        caplen = -1                     # the last packet block's captured length (-1: an SPB)
        if_id = 0

        def _read_block_shb(self):
            super()._read_block_shb()
            self.interfaces = []         # interface ids are per section

        def _read_block_idb(self, block, size):
            super()._read_block_idb(block, size)
            value = self._read_options(block[8:]).get(14)      # if_tsoffset, seconds
            tsoffset = 0.0
            if isinstance(value, bytes) and len(value) >= 8:
                tsoffset = float(Struct(self.endian + "q").unpack_from(value, 0)[0])
            self.interfaces[-1][2]["tsoffset"] = tsoffset

        def _check_interface_id(self, intid):
            if intid < len(self.interfaces):
                self.if_id = intid
                return True
            self.skipped = intid
            return False

        def _read_block_epb(self, block, size):
            self.caplen = _EPB_CAPLEN[self.endian].unpack_from(block, 12)[0] if len(block) >= 16 else -1
            return super()._read_block_epb(block, size)

        def _read_block_pkt(self, block, size):
            self.caplen = _EPB_CAPLEN[self.endian].unpack_from(block, 12)[0] if len(block) >= 16 else -1
            return super()._read_block_pkt(block, size)

        def _read_block_spb(self, block, size):
            self.caplen = -1
            result = super()._read_block_spb(block, size)
            if result is None:
                return None
            wirelen = result[1].wirelen
            return block[4:4 + min(wirelen, len(block) - 4)], result[1]

    _READERS = (RawPcapReader, NgReader)
    return _READERS


_EPB_CAPLEN = {"<": Struct("<I"), ">": Struct(">I"), "!": Struct(">I")}


def _pcapng_damage(data, offset: int, order: str, max_record: int) -> tuple[str, str]:
    """Why the pcapng block at `offset` could not be read: (warning kind, one sentence)."""
    size = len(data)
    order = "<" if order == "<" else ">"
    if offset + 12 > size:
        return "truncated-record", (f"the capture ends inside a block header ({size - offset} bytes left); the "
                                    "file was cut short")
    block_type, total = Struct(order + "II").unpack_from(data, offset)
    if block_type == PCAPNG_SHB:
        return "garbage-record", "a section header that cannot be read; the rest of the file is not read"
    if total < 12 or total % 4 or total > max_record:
        return "garbage-record", (f"block of type {block_type:#x} claims length {total} (must be a multiple of "
                                  f"4, at least 12, at most {max_record}); the rest of the file "
                                  f"({size - offset} bytes) is not read")
    if offset + total > size:
        return "truncated-record", (f"the capture ends inside a block of type {block_type:#x} ({size - offset} "
                                    f"of {total} bytes); the file was cut short")
    return "garbage-record", (f"block of type {block_type:#x} cannot be read (its trailing length or its "
                              "contents are wrong); the rest of the file is not read")
