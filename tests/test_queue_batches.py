"""DiskQueue batches: peek_batch()/peek_payloads() read runs of records (across segments, around damage)
and ack_through() moves past exactly what was acknowledged, even when the queue changed in between."""

from imguard.sinks.queue import DiskQueue


def _drain(queue, limit):
    out = []
    while True:
        last, payloads = queue.peek_payloads(limit)
        if not payloads:
            return out
        out += payloads
        queue.ack_through(last)


def test_batches_across_segments_and_reopening(tmp_path):
    queue = DiskQueue(tmp_path, 1 << 20, segment_bytes=4096)
    payloads = [f"record {n} ".encode() * (n % 7 + 1) for n in range(500)]
    for p in payloads:
        queue.append(p)
    assert len(list(tmp_path.glob("seg-*"))) > 5
    batch = queue.peek_batch(120)
    assert [r.payload for r in batch] == payloads[:120] and [r.seq for r in batch] == list(range(1, 121))
    queue.ack_through(batch[49].seq)                 # part of a batch
    assert queue.peek().seq == 51 and queue.backlog_records == 450
    queue.close()
    queue = DiskQueue(tmp_path, 1 << 20, segment_bytes=4096)
    assert _drain(queue, 64) == payloads[50:]
    assert queue.backlog_bytes == 0 and len(list(tmp_path.glob("seg-*"))) == 1
    queue.append(b"after")
    assert _drain(queue, 64) == [b"after"] and queue.take_problems() == []
    queue.close()


def test_a_record_larger_than_a_read_run(tmp_path):
    queue = DiskQueue(tmp_path, 16 << 20)
    big = bytes(range(256)) * 4000                       # > READ_CHUNK
    for p in (b"a", big, b"b", big, big, b"c"):
        queue.append(p)
    assert _drain(queue, 3) == [b"a", big, b"b", big, big, b"c"]
    queue.close()


def test_ack_after_the_oldest_were_dropped_meanwhile(tmp_path):
    """An append that overflows drops the oldest records between a peek and its ack: the ack must not move
    the cursor from stale positions (back or past records never handed out)."""
    queue = DiskQueue(tmp_path, 2000, segment_bytes=64 * 1024)
    for n in range(10):
        queue.append(b"%03d" % n + b"x" * 80)
    last, payloads = queue.peek_payloads(5)
    assert last == 5
    for n in range(10, 30):
        queue.append(b"%03d" % n + b"x" * 80)           # 19 fit: the 11 oldest dropped, past the peeked 5
    assert queue.dropped == 11
    queue.ack_through(last)
    assert [int(p[:3]) for p in _drain(queue, 100)] == list(range(11, 30))


def test_damage_inside_a_batch_is_skipped_and_reported(tmp_path):
    queue = DiskQueue(tmp_path, 1 << 20)
    for n in range(20):
        queue.append(b"payload %02d" % n)
    queue.close()
    [segment] = tmp_path.glob("seg-*")
    data = bytearray(segment.read_bytes())
    data[data.index(b"payload 07")] ^= 0x20
    segment.write_bytes(bytes(data))
    queue = DiskQueue(tmp_path, 1 << 20)
    got = _drain(queue, 100)
    assert got == [b"payload %02d" % n for n in range(20) if n != 7]
    assert [p.kind for p in queue.take_problems()] == ["corrupt"]
    queue.close()


def test_append_many_is_append_in_one_write_per_segment(tmp_path):
    """A group commit reads back exactly like the same records appended one by one: seqs, segments, reopening,
    and a full queue dropping its oldest records."""
    one, many = DiskQueue(tmp_path / "one", 1 << 20, segment_bytes=4096), DiskQueue(tmp_path / "many", 1 << 20,
                                                                                     segment_bytes=4096)
    payloads = [f"record {n} ".encode() * (n % 7 + 1) for n in range(500)]
    for p in payloads:
        one.append(p)
    assert many.append_many(payloads[:1]) == 1 and many.append_many(payloads[1:]) == 500
    assert many.append_many([]) == -1
    assert sorted(p.name for p in (tmp_path / "many").glob("seg-*")) == \
        sorted(p.name for p in (tmp_path / "one").glob("seg-*"))
    many.close()
    many = DiskQueue(tmp_path / "many", 1 << 20, segment_bytes=4096)
    assert _drain(many, 64) == _drain(one, 64) == payloads
    many.close()

    small = DiskQueue(tmp_path / "small", 2000, segment_bytes=1000)
    assert small.append_many([b"x" * 100] * 30) == 30
    kept = _drain(small, 100)
    assert 0 < len(kept) < 30 and small.dropped == 30 - len(kept)
    problems = small.take_problems()
    assert problems and {p.kind for p in problems} == {"dropped"} and sum(p.count for p in problems) == small.dropped
