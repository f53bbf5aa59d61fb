"""TCP reassembly: segments in capture order -> per-connection byte streams, with the holes shown.

Pure and sans-io like the protocol sessions: `Reassembler.feed(segment)` returns events, and
`finish()` returns the events of the end of the capture.

    StreamOpened(conn, client, server)      a new connection (conn.midstream: no handshake was seen)
    StreamData(conn, from_client, data)     the next bytes of one direction, in order, each byte once
    StreamGap(conn, from_client, length)    `length` bytes of that direction that the capture lacks
    StreamClosed(conn, reason)              FIN both ways, RST, or the end of the capture

What the code decides, and why:
  * Which side is the client: the sender of a SYN; else the receiver of a SYN-ACK; else (a stream the
    capture joined mid-way) the side *not* on a service port (the configured ones, then
    LIKELY_SERVER_PORTS); else the side on an ephemeral port (32768-65535); else the side with the
    higher port; else the first sender.
  * A stream that starts mid-way starts at the first sequence number seen in each direction.
  * Out-of-order segments wait in a buffer (at most `max_out_of_order_bytes` per connection).
  * Retransmissions and overlaps: the first copy of a byte wins (as most stacks do), later copies are
    dropped; a later copy that *differs* from a buffered one is counted (`overlap_conflicts`), since
    that is how an evasion attempt looks.
  * A hole is never skipped silently. It becomes a StreamGap when it can no longer be filled: the
    peer acknowledged bytes beyond it (the receiver got them, the capture did not), the buffer is
    full, the direction ended (FIN, RST, end of capture), or the capture kept only the first bytes
    of a packet (snap length). Suricata and Zeek treat gaps the same way.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

from imguard.replay.pcapfile import ACK, FIN, RST, SYN, TcpSegment
from imguard.settings import MiB, setting

MASK32 = 0xFFFFFFFF

# Ports a server listens on, for telling client from server when the handshake is not in the capture (the
# idea of Zeek's likely_server_ports): chat (MSN 1863, Yahoo 5050, AIM/ICQ 5190, XMPP c2s/s2s/BOSH, XEP-0065
# proxies 7777/8010, IRC), the web and proxies, mail, and the usual infrastructure ports.
LIKELY_SERVER_PORTS = frozenset({
    21, 22, 23, 25, 53, 80, 110, 143, 443, 465, 587, 993, 995, 1080, 1194, 1863, 3128, 3478, 5050, 5060, 5061,
    5190, 5222, 5223, 5269, 5280, 5281, 5349, 6667, 6668, 6669, 6697, 7000, 7070, 7777, 8000, 8008, 8010, 8080,
    8443, 8448, 9999,
})
EPHEMERAL_PORTS = range(32768, 65536)       # Linux's default range and IANA's 49152-65535 within it


@dataclass(frozen=True)
class ReassemblySettings:
    """TCP reassembly limits."""

    max_out_of_order_bytes: int = setting(
        4 * MiB, "Bytes of out-of-order segments buffered per connection while waiting for a hole to be "
                 "filled; past it the hole is declared a gap, so a lossy or hostile capture cannot grow "
                 "memory without bound")
    max_ack_jump: int = setting(
        1 << 30, "An acknowledgement further than this past the data seen is not taken as proof of a "
                 "capture gap (it is more likely a corrupt or forged segment)")


@dataclass(eq=False)
class Connection:
    """One TCP connection: who is client and server, and what reassembly saw of it."""

    id: int                         # 1, 2, ... in the order connections first appear in the capture
    client: tuple[str, int]
    server: tuple[str, int]
    first_ts: float = 0.0
    last_ts: float = 0.0
    midstream: bool = False         # the client's SYN was not seen: the capture joined it mid-way
    client_by: str = "syn"          # how the client was told: syn, syn-ack, service-port, ephemeral-port,
                                    # port-order, first-sender
    bytes: list[int] = field(default_factory=lambda: [0, 0])       # delivered [server->client, client->server]
    gap_bytes: list[int] = field(default_factory=lambda: [0, 0])   # lost bytes, same indexing
    gaps: int = 0
    packets: int = 0
    retransmitted_bytes: int = 0
    overlap_conflicts: int = 0      # a retransmission carried different bytes than the first copy
    late_packets: int = 0           # packets seen after the connection closed
    closed: bool = False
    close_reason: str = ""
    closed_by_client: bool | None = None    # who sent the first FIN or the RST (None: neither was seen)

    @property
    def name(self) -> str:
        return f"C{self.id}"

    @property
    def client_address(self) -> str:
        return _address(self.client)

    @property
    def server_address(self) -> str:
        return _address(self.server)

    def __repr__(self) -> str:
        return f"<{self.name} {self.client_address} -> {self.server_address}>"

    def to_dict(self) -> dict:
        return {
            "id": self.id, "client": self.client_address, "server": self.server_address,
            "midstream": self.midstream, "client_by": self.client_by,
            "bytes_from_client": self.bytes[1], "bytes_from_server": self.bytes[0],
            "gap_bytes_from_client": self.gap_bytes[1], "gap_bytes_from_server": self.gap_bytes[0],
            "gaps": self.gaps, "packets": self.packets, "retransmitted_bytes": self.retransmitted_bytes,
            "overlap_conflicts": self.overlap_conflicts, "close_reason": self.close_reason,
        }


def _address(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- events -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamOpened:
    conn: Connection
    client: tuple[str, int]
    server: tuple[str, int]
    ts: float = 0.0


@dataclass(frozen=True)
class StreamData:
    conn: Connection
    from_client: bool
    data: bytes
    ts: float = 0.0


@dataclass(frozen=True)
class StreamGap:
    conn: Connection
    from_client: bool
    length: int
    ts: float = 0.0


@dataclass(frozen=True)
class StreamClosed:
    conn: Connection
    reason: str = ""               # "fin", "rst", "end of capture"
    ts: float = 0.0


StreamEvent = StreamOpened | StreamData | StreamGap | StreamClosed


# --- one direction ----------------------------------------------------------------------------------

class _Half:
    """One direction of a connection: where its stream is, and what waits out of order."""

    __slots__ = ("started", "next", "fin_at", "done", "starts", "entries", "buffered")

    def __init__(self) -> None:
        self.started = False
        self.next = 0                   # absolute sequence number of the next byte to deliver
        self.fin_at: int | None = None  # absolute sequence number of the FIN
        self.done = False               # FIN reached: nothing more is delivered
        self.starts: list[int] = []     # sorted starts of buffered entries
        self.entries: list[tuple[int, int, bytes | None]] = []   # (start, end, data or None = known lost)
        self.buffered = 0               # bytes of data held in entries

    def unwrap(self, seq: int) -> int:
        """The 32-bit sequence number as an absolute number near `next` (handles wrap-around)."""
        delta = (seq - self.next) & MASK32
        if delta >= 0x80000000:
            delta -= 0x100000000
        return self.next + delta


class Reassembler:
    """Segments in capture order in, stream events out."""

    def __init__(self, settings: ReassemblySettings | None = None, service_ports: Iterable[int] = ()):
        self.settings = settings or ReassemblySettings()
        self.service_ports = frozenset(service_ports)
        self.likely_server_ports = LIKELY_SERVER_PORTS - self.service_ports
        self._conns: dict[tuple, Connection] = {}
        self._halves: dict[int, tuple[_Half, _Half]] = {}   # conn.id -> (server->client, client->server)
        self._client_isn: dict[int, int] = {}
        self.connections: list[Connection] = []
        self._last_id = 0                   # connections and UDP flows share one numbering

    # --- public -----------------------------------------------------------------------------------

    def feed(self, seg: TcpSegment) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        a, b = (seg.src, seg.sport), (seg.dst, seg.dport)
        key = (a, b) if a <= b else (b, a)
        conn = self._conns.get(key)
        flags = seg.flags
        if conn is not None and conn.closed:
            if flags & SYN and not flags & ACK and self._client_isn.get(conn.id) != seg.seq:
                conn = None                        # the 4-tuple is reused by a new connection
            else:
                conn.late_packets += 1
                return out
        if conn is None:
            conn = self._open(seg, a, b, key, out)
        conn.packets += 1
        conn.last_ts = seg.ts
        from_client = a == conn.client
        halves = self._halves[conn.id]
        half, other = halves[from_client], halves[not from_client]

        if flags & RST:
            if conn.closed_by_client is None:
                conn.closed_by_client = from_client
            self._close(conn, "rst", seg.ts, out)
            return out

        seq = seg.seq
        if flags & SYN:
            if not half.started:
                half.started, half.next = True, seq + 1
                if from_client:
                    self._client_isn[conn.id] = seq
            seq += 1
        elif not half.started:
            # The capture joined this direction mid-way: its stream starts at the first seq seen.
            half.started, half.next = True, seq
            if from_client:
                conn.midstream = True
        start = half.unwrap(seq)

        if not half.done:
            if seg.payload:
                self._add(conn, half, from_client, start, seg.payload, seg.ts, out)
            if seg.missing:
                self._add(conn, half, from_client, start + len(seg.payload), None, seg.ts, out,
                          length=seg.missing)
            if flags & FIN and half.fin_at is None:
                half.fin_at = start + len(seg.payload) + seg.missing
                if conn.closed_by_client is None:
                    conn.closed_by_client = from_client

        # The peer acknowledged bytes of the other direction that the capture never showed: they were
        # received, so they will not be retransmitted, and the hole before them is a gap now.
        if flags & ACK and other.started and not other.done:
            acked = other.unwrap(seg.ack)
            if other.next < acked <= other.next + self.settings.max_ack_jump:
                if other.fin_at is not None and acked > other.fin_at:
                    acked = other.fin_at
                self._skip_to(conn, other, not from_client, acked, seg.ts, out)
                self._drain(conn, other, not from_client, seg.ts, out)

        self._check_fin(conn, half, from_client, seg.ts, out)
        self._check_fin(conn, other, not from_client, seg.ts, out)
        if halves[0].done and halves[1].done and not conn.closed:
            self._close(conn, "fin", seg.ts, out)
        return out

    def finish(self) -> list[StreamEvent]:
        """The end of the capture: flush every open connection, declaring what is missing as gaps."""
        out: list[StreamEvent] = []
        for conn in self.connections:
            if not conn.closed:
                self._close(conn, "end of capture", conn.last_ts, out)
        return out

    def datagram_flow(self, client: tuple[str, int], server: tuple[str, int], ts: float) -> Connection:
        """A UDP flow (the datagrams between one client address and a server, as the gateway's UDP connections
        are), numbered in the same sequence as the TCP connections. It has no stream: its datagrams are not
        reassembled, each is one event for its session; not in `connections`, which are TCP's."""
        self._last_id += 1
        return Connection(self._last_id, client, server, first_ts=ts, last_ts=ts, client_by="udp-port")

    def run(self, segments: Iterable[TcpSegment]) -> Iterable[StreamEvent]:
        """All events for a sequence of segments, the end of the capture included."""
        feed = self.feed
        for seg in segments:
            yield from feed(seg)
        yield from self.finish()

    # --- connections ------------------------------------------------------------------------------

    def _open(self, seg: TcpSegment, a, b, key, out) -> Connection:
        flags = seg.flags
        if flags & SYN and not flags & ACK:
            client, server, by = a, b, "syn"
        elif flags & SYN:
            client, server, by = b, a, "syn-ack"
        elif (b[1] in self.service_ports) != (a[1] in self.service_ports):
            client, server = (a, b) if b[1] in self.service_ports else (b, a)
            by = "service-port"
        elif (b[1] in self.likely_server_ports) != (a[1] in self.likely_server_ports):
            client, server = (a, b) if b[1] in self.likely_server_ports else (b, a)
            by = "service-port"
        elif (a[1] in EPHEMERAL_PORTS) != (b[1] in EPHEMERAL_PORTS):
            client, server = (a, b) if a[1] in EPHEMERAL_PORTS else (b, a)
            by = "ephemeral-port"
        elif a[1] != b[1]:
            client, server = (a, b) if b[1] < a[1] else (b, a)
            by = "port-order"
        else:
            client, server, by = a, b, "first-sender"
        self._last_id += 1
        conn = Connection(self._last_id, client, server, first_ts=seg.ts, last_ts=seg.ts, client_by=by)
        if by != "syn":
            conn.midstream = True
        self.connections.append(conn)
        self._conns[key] = conn
        self._halves[conn.id] = (_Half(), _Half())
        out.append(StreamOpened(conn, client, server, seg.ts))
        return conn

    def _close(self, conn: Connection, reason: str, ts: float, out: list) -> None:
        halves = self._halves.pop(conn.id)
        for from_client in (True, False):
            half = halves[from_client]
            if half.started and not half.done:
                end = half.fin_at
                # Whatever is still buffered was sent; the holes before it are gaps.
                while half.entries:
                    self._skip_to(conn, half, from_client, half.entries[0][0], ts, out)
                    self._drain(conn, half, from_client, ts, out)
                if end is not None and end > half.next:
                    self._gap(conn, half, from_client, end - half.next, ts, out)
                    half.next = end
                half.done = True
        conn.closed, conn.close_reason = True, reason
        out.append(StreamClosed(conn, reason, ts))

    # --- one direction ----------------------------------------------------------------------------

    def _add(self, conn, half: _Half, from_client: bool, start: int, data: bytes | None, ts: float,
             out: list, length: int = 0) -> None:
        """Take `data` (or `length` bytes known lost, when data is None) at absolute seq `start`."""
        end = start + (len(data) if data is not None else length)
        if half.fin_at is not None and end > half.fin_at:       # nothing counts after the FIN
            end = half.fin_at
            if data is not None:
                data = data[:max(0, end - start)]
        if end <= start:
            return
        if end <= half.next:
            if data is not None:
                conn.retransmitted_bytes += end - start
            return
        if start < half.next:
            if data is not None:
                conn.retransmitted_bytes += half.next - start
                data = data[half.next - start:]
            start = half.next
        if start == half.next and not half.entries:
            if data is None:
                self._gap(conn, half, from_client, end - start, ts, out)
            else:
                self._deliver(conn, from_client, data, ts, out)
            half.next = end
            return
        self._buffer(conn, half, start, end, data)
        self._drain(conn, half, from_client, ts, out)
        limit = self.settings.max_out_of_order_bytes
        while half.buffered > limit and half.entries:
            # Full: give up on the first hole, so memory stays bounded.
            self._skip_to(conn, half, from_client, half.entries[0][0], ts, out)
            self._drain(conn, half, from_client, ts, out)

    def _buffer(self, conn, half: _Half, start: int, end: int, data: bytes | None) -> None:
        """Insert [start, end) into the out-of-order buffer; bytes already buffered win."""
        pieces: list[tuple[int, int]] = []
        cursor = start
        i = bisect.bisect_right(half.starts, start) - 1
        if i < 0:
            i = 0
        entries = half.entries
        while i < len(entries) and cursor < end:
            e_start, e_end, e_data = entries[i]
            if e_end <= cursor:
                i += 1
                continue
            if e_start >= end:
                break
            if e_start > cursor:
                pieces.append((cursor, e_start))
            # the overlap [max(cursor, e_start), min(end, e_end)) is already held: compare it
            o_start, o_end = max(cursor, e_start), min(end, e_end)
            if data is not None and e_data is not None and o_end > o_start:
                if data[o_start - start:o_end - start] != e_data[o_start - e_start:o_end - e_start]:
                    conn.overlap_conflicts += 1
                conn.retransmitted_bytes += o_end - o_start
            cursor = max(cursor, e_end)
            i += 1
        if cursor < end:
            pieces.append((cursor, end))
        for p_start, p_end in pieces:
            piece = data[p_start - start:p_end - start] if data is not None else None
            j = bisect.bisect_left(half.starts, p_start)
            half.starts.insert(j, p_start)
            entries.insert(j, (p_start, p_end, piece))
            if piece is not None:
                half.buffered += p_end - p_start

    def _drain(self, conn, half: _Half, from_client: bool, ts: float, out: list) -> None:
        """Deliver buffered entries that now continue the stream."""
        entries = half.entries
        while entries and entries[0][0] <= half.next:
            e_start, e_end, e_data = entries.pop(0)
            half.starts.pop(0)
            if e_data is not None:
                half.buffered -= e_end - e_start
            if e_end <= half.next:
                continue
            skip = half.next - e_start
            if e_data is None:
                self._gap(conn, half, from_client, e_end - half.next, ts, out)
            else:
                self._deliver(conn, from_client, e_data[skip:] if skip else e_data, ts, out)
            half.next = e_end

    def _skip_to(self, conn, half: _Half, from_client: bool, position: int, ts: float, out: list) -> None:
        """Declare the bytes up to `position` lost (a gap), unless buffered data covers them."""
        while half.next < position:
            if half.entries and half.entries[0][0] <= half.next:
                self._drain(conn, half, from_client, ts, out)
                continue
            stop = min(position, half.entries[0][0]) if half.entries else position
            self._gap(conn, half, from_client, stop - half.next, ts, out)
            half.next = stop

    def _check_fin(self, conn, half: _Half, from_client: bool, ts: float, out: list) -> None:
        if half.fin_at is not None and not half.done and half.next >= half.fin_at:
            half.done = True
            half.entries.clear()
            half.starts.clear()
            half.buffered = 0

    def _deliver(self, conn, from_client: bool, data: bytes, ts: float, out: list) -> None:
        conn.bytes[from_client] += len(data)
        out.append(StreamData(conn, from_client, data, ts))

    def _gap(self, conn, half, from_client: bool, length: int, ts: float, out: list) -> None:
        if length <= 0:
            return
        conn.gap_bytes[from_client] += length
        conn.gaps += 1
        out.append(StreamGap(conn, from_client, length, ts))
