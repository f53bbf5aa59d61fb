"""TCP reassembly on constructed segments: order, retransmission, overlap, gaps, mid-stream starts,
RST, port reuse, sequence wrap-around and the out-of-order memory bound."""

from __future__ import annotations

import random

from imguard.replay.reassembly import (Reassembler, ReassemblySettings, StreamClosed, StreamData, StreamGap,
                                       StreamOpened)
from test_replay_builders import ACK, FIN, PSH, RST, SYN, conversation, seg


def run(segments, **settings) -> tuple[Reassembler, list]:
    reassembler = Reassembler(ReassemblySettings(**settings), service_ports=[5222, 6667])
    return reassembler, list(reassembler.run(segments))


def transcript(events) -> list[tuple]:
    """Events as short tuples: ('open', client, server), ('c', b'..') / ('s', b'..'), ('gap-c', n), ('close', why)."""
    out = []
    for e in events:
        if isinstance(e, StreamOpened):
            out.append(("open", e.client, e.server))
        elif isinstance(e, StreamData):
            if out and out[-1][0] == ("c" if e.from_client else "s"):      # merge consecutive data
                out[-1] = (out[-1][0], out[-1][1] + e.data)
            else:
                out.append(("c" if e.from_client else "s", e.data))
        elif isinstance(e, StreamGap):
            out.append(("gap-c" if e.from_client else "gap-s", e.length))
        elif isinstance(e, StreamClosed):
            out.append(("close", e.reason))
    return out


def streams(events) -> dict[bool, bytes]:
    data = {True: b"", False: b""}
    for e in events:
        if isinstance(e, StreamData):
            data[e.from_client] += e.data
    return data


CLIENT, SERVER = ("10.0.0.1", 40000), ("10.0.0.2", 5222)


def test_in_order_conversation():
    """Handshake, data both ways, FIN both ways: opened, the bytes, closed by FIN."""
    reassembler, events = run(conversation())
    assert transcript(events) == [("open", CLIENT, SERVER), ("c", b"hello"), ("s", b"world"), ("close", "fin")]
    [conn] = reassembler.connections
    assert (conn.midstream, conn.client_by, conn.closed_by_client) == (False, "syn", True)
    assert conn.bytes == [5, 5] and conn.gaps == 0


def test_out_of_order_segments_are_delivered_in_order():
    """A later segment arriving first waits for the hole to be filled."""
    segs = [seg(True, 1, b"", SYN), seg(True, 2 + 6, b"world"), seg(True, 2, b"hello "), seg(True, 13, b"!")]
    _, events = run(segs)
    assert transcript(events)[1:] == [("c", b"hello world!"), ("close", "end of capture")]


def test_retransmission_with_overlap_first_copy_wins():
    """Retransmitted and overlapping segments: every byte once, the first copy kept, a differing
    retransmission counted as a conflict (how an evasion attempt looks)."""
    segs = [seg(True, 1, b"", SYN),
            seg(True, 2, b"abcdef"),
            seg(True, 2, b"abcdef"),             # plain retransmission
            seg(True, 5, b"DEFghi"),             # overlaps delivered bytes 'def' with other bytes; adds 'ghi'
            seg(True, 14, b"mno"),               # out of order
            seg(True, 13, b"LMN"),               # overlaps the buffered 'mn' with other bytes
            seg(True, 11, b"jk")]
    reassembler, events = run(segs)
    assert streams(events)[True] == b"abcdefghijkLmno"
    conn = reassembler.connections[0]
    assert conn.retransmitted_bytes == 6 + 3 + 2
    assert conn.overlap_conflicts == 1          # only the buffered overlap can be compared


def test_missing_segment_becomes_a_gap_at_fin():
    """A segment the capture lacks is an explicit gap with its size, never skipped silently."""
    segs = [seg(True, 1, b"", SYN), seg(True, 2, b"aaaa"), seg(True, 10, b"cccc"), seg(True, 14, b"", FIN | ACK)]
    _, events = run(segs)
    assert transcript(events)[1:] == [("c", b"aaaa"), ("gap-c", 4), ("c", b"cccc"), ("close", "end of capture")]


def test_ack_above_hole_declares_the_gap_at_once():
    """The peer acknowledged bytes the capture never showed: the gap is declared then, not at the end."""
    segs = [seg(True, 1, b"", SYN), seg(False, 100, b"", SYN | ACK, ack=2),
            seg(True, 2, b"aaaa"), seg(True, 10, b"cccc"),
            seg(False, 101, b"", ACK, ack=14)]       # the server got everything up to 14
    _, events = run(segs)
    t = transcript(events)
    assert t[1:4] == [("c", b"aaaa"), ("gap-c", 4), ("c", b"cccc")]
    assert t[-1] == ("close", "end of capture")


def test_ack_beyond_everything_seen_is_a_gap_at_the_end_of_the_stream():
    segs = [seg(True, 1, b"", SYN), seg(True, 2, b"aaaa"), seg(False, 100, b"", ACK, ack=2 + 4 + 500)]
    _, events = run(segs)
    assert ("gap-c", 500) in transcript(events)


def test_midstream_start_by_service_port():
    """No SYN seen: the stream starts at the first seq seen; the side on the service port is the server
    even when it speaks first and has the higher port."""
    client, server = ("10.0.0.9", 1024), ("10.0.0.8", 6667)
    segs = [seg(False, 7000, b":server 001 hi\r\n", client=client, server=server),
            seg(True, 900, b"PRIVMSG #c :x\r\n", client=client, server=server)]
    reassembler, events = run(segs)
    assert transcript(events) == [("open", client, server), ("s", b":server 001 hi\r\n"), ("c", b"PRIVMSG #c :x\r\n"),
                                  ("close", "end of capture")]
    conn = reassembler.connections[0]
    assert conn.midstream and conn.client_by == "service-port"


def test_midstream_start_by_port_heuristics_and_syn_ack():
    """Without the handshake: a likely server port (MSN's 1863 against a client's 1176), else the ephemeral
    port is the client, else the lower port is the server; a SYN-ACK names the server outright."""
    for first, second, client, by in [
            (("10.0.0.2", 1863), ("10.0.0.1", 1176), ("10.0.0.1", 1176), "service-port"),
            (("10.0.0.2", 30000), ("10.0.0.1", 50000), ("10.0.0.1", 50000), "ephemeral-port"),
            (("10.0.0.2", 4000), ("10.0.0.1", 20000), ("10.0.0.1", 20000), "port-order"),
            (("10.0.0.2", 4000), ("10.0.0.1", 4000), ("10.0.0.2", 4000), "first-sender")]:
        r, _ = run([seg(True, 1, b"x", client=first, server=second)])      # `first` sends first
        assert (r.connections[0].client, r.connections[0].client_by) == (client, by)
    a, b = ("10.0.0.1", 50000), ("10.0.0.2", 4000)
    r, _ = run([seg(True, 1, b"", SYN | ACK, client=b, server=a)])        # b sends a SYN-ACK: b is the server
    assert (r.connections[0].server, r.connections[0].client_by) == (b, "syn-ack")
    assert r.connections[0].midstream


def test_rst_closes_and_flushes_what_waited_behind_a_hole():
    segs = [seg(True, 1, b"", SYN), seg(True, 2, b"ab"), seg(True, 6, b"ef"), seg(False, 50, b"", RST)]
    reassembler, events = run(segs)
    assert transcript(events)[1:] == [("c", b"ab"), ("gap-c", 2), ("c", b"ef"), ("close", "rst")]
    assert reassembler.connections[0].closed_by_client is False


def test_packets_after_close_and_port_reuse():
    """Late packets of a closed connection are counted, not reopened; a new SYN on the same 4-tuple is a
    new connection."""
    segs = conversation(1000) + [seg(True, 1007, b"", ACK)] + conversation(90000)
    reassembler, events = run(segs)
    assert [type(e).__name__ for e in events].count("StreamOpened") == 2
    first, second = reassembler.connections
    assert first.late_packets == 2      # the last ACK of the FIN handshake, and the extra one
    assert second.bytes == [5, 5] and second.client_by == "syn"


def test_syn_retransmission_after_close_is_not_a_new_connection():
    segs = conversation(1000) + [seg(True, 1000, b"", SYN)]
    reassembler, _ = run(segs)
    assert len(reassembler.connections) == 1


def test_sequence_wrap_around():
    isn = 0xFFFFFFF0
    segs = [seg(True, isn, b"", SYN), seg(True, isn + 1, b"x" * 10), seg(True, isn + 11, b"y" * 10),
            seg(True, isn + 21, b"", FIN | ACK)]
    _, events = run(segs)
    assert streams(events)[True] == b"x" * 10 + b"y" * 10
    assert not [e for e in events if isinstance(e, StreamGap)]


def test_out_of_order_buffer_is_bounded():
    """With a hole that is never filled, buffered data beyond max_out_of_order_bytes forces the gap."""
    segs = [seg(True, 1, b"", SYN), seg(True, 2, b"a")] + [seg(True, 100 + 10 * i, b"b" * 10) for i in range(10)]
    reassembler = Reassembler(ReassemblySettings(max_out_of_order_bytes=25))
    events = []
    for s in segs:
        events += reassembler.feed(s)
        halves = reassembler._halves[reassembler.connections[0].id]
        assert halves[True].buffered <= 25
    assert transcript(events)[1:] == [("c", b"a"), ("gap-c", 97), ("c", b"b" * 100)]


def test_snap_length_missing_bytes_are_a_gap():
    segs = [seg(True, 1, b"", SYN), seg(True, 2, b"abc", missing=7), seg(True, 12, b"def")]
    _, events = run(segs)
    assert transcript(events)[1:] == [("c", b"abc"), ("gap-c", 7), ("c", b"def"), ("close", "end of capture")]


def test_data_after_fin_is_ignored():
    segs = [seg(True, 1, b"", SYN), seg(True, 2, b"abc", FIN | ACK | PSH), seg(True, 5, b"late")]
    _, events = run(segs)
    assert streams(events)[True] == b"abc"


def test_any_arrival_order_gives_the_same_stream():
    """Segments shuffled, duplicated and re-split at random give the same bytes (h11's chunk-boundary test,
    for TCP): what the capture order is must not change what a session sees."""
    rng = random.Random(6)
    payload = bytes(rng.randrange(256) for _ in range(3000))
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(payload)), 40))
        pieces = [(a, payload[a:b]) for a, b in zip([0] + cuts, cuts + [len(payload)], strict=True)]
        segs = [seg(True, 1000 + 1 + off, data) for off, data in pieces]
        segs += [seg(True, 1000 + 1 + off, data) for off, data in rng.sample(pieces, 10)]     # duplicates
        rng.shuffle(segs)
        segs = [seg(True, 1000, b"", SYN)] + segs
        _, events = run(segs)
        assert streams(events)[True] == payload
        assert not [e for e in events if isinstance(e, StreamGap)]
