"""A durable, bounded, append-only queue on disk: the events one sink has not accepted yet.

Layout (DIR is data_dir/queue/<sink>/, mode 0700):

    DIR/seg-<first seq, 20 digits>   segment files, append-only; a new one starts at `segment_bytes`
    DIR/state                        16 bytes: the cursor (seq of the next record to deliver) and the
                                     highest seq ever handed to the sink ("attempted")

Each record is `MAGIC(4) | length(4) | seq(8) | crc32(4) | payload`, big-endian, the CRC covering
length, seq and payload. A record is written with one write() under the queue's lock, so after a
crash of the process it is either whole or, at the tail, torn; a torn tail is cut off when the queue
is opened, and damage anywhere else is skipped by searching for the next valid record (the number of
bytes skipped is reported). Segments wholly behind the cursor are deleted.

Exactly-once delivery is impossible across a crash (the sink may have taken a record and the process
died before the cursor moved). So before a record is handed to the sink, `attempted` is raised past
it and fsync'ed; after a restart every record at or below the old `attempted` is returned with
`possible_duplicate` set. `attempted` is raised in steps of ATTEMPT_STEP records, so the fsync is paid
once per step; the price is that up to a step of never-sent records may also be flagged.

Bounded: a record that would push the backlog past `max_bytes` first drops the oldest undelivered
records (counted in `dropped`). A failed write (disk full) is cut back so the file stays valid, and
the error is raised to the caller, which keeps the event in the local log.

Cost: appends are on the gateway's event loop for every archived chat message, so the common path is
one header pack and one CRC per record, no scan of the segment list (the queue keeps its byte total), and
one write() per append() or per append_many() (the archive's group commit: a read's records at once).
peek_batch() reads a run of records with one pread() rather than two per record, and remembers where
each record it handed out ends, so ack_through() moves the cursor without reading them again.

The queue never calls out while holding its lock: problems (damage, drops) are collected and taken
by the caller with `take_problems()`, so reporting them may safely write to other queues.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

MAGIC = b"\xa5IQ1"
HEADER = struct.Struct(">4sIQI")       # magic, payload length, seq, crc32
STATE = struct.Struct(">QQ")           # cursor, attempted
ATTEMPT_STEP = 32
MAX_RECORD = 64 * 1024 * 1024
READ_CHUNK = 256 * 1024                # peek_batch() reads records in runs of up to this many bytes
_LENGTH_SEQ = struct.Struct(">IQ")     # the header fields the CRC covers


class QueueRecord(NamedTuple):
    # A tuple, not a dataclass: peek_batch() makes hundreds per call and a tuple is several times cheaper.
    seq: int
    payload: bytes
    possible_duplicate: bool


@dataclass(frozen=True)
class Problem:
    kind: str           # "corrupt" (damaged bytes skipped), "torn_tail" (cut at open), "dropped" (queue full)
    detail: str
    count: int = 0      # records dropped, or bytes skipped


def _crc(length: int, seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_LENGTH_SEQ.pack(length, seq)))


def encode_record(seq: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(payload), seq, _crc(len(payload), seq, payload)) + payload


class QueueBusy(RuntimeError):
    """Another process (or another queue object) has this queue open: two writers would interleave."""


MAX_QUEUE_SLOTS = 64


def open_free_queue(directory: Path, max_bytes: int) -> "DiskQueue":
    """The queue at `directory`, or, while another process holds it, at `directory`-1, -2, ...: several
    gateway workers share one data folder, each with a queue of its own. A worker that restarts takes the
    first free one, so the backlog a stopped or crashed worker left is delivered by whoever opens it next."""
    directory = Path(directory)
    for slot in range(MAX_QUEUE_SLOTS):
        candidate = directory if slot == 0 else directory.with_name(f"{directory.name}-{slot}")
        try:
            return DiskQueue(candidate, max_bytes)
        except QueueBusy:
            continue
    raise QueueBusy(f"{directory}: all {MAX_QUEUE_SLOTS} queue slots are in use by other processes")


class _Segment:
    __slots__ = ("first_seq", "path", "size")

    def __init__(self, first_seq: int, path: Path, size: int):
        self.first_seq, self.path, self.size = first_seq, path, size


def _parse(data: bytes, off: int) -> tuple[int, bytes, int] | None:
    """(seq, payload, end) of a valid record starting at data[off], or None."""
    if off + HEADER.size > len(data):
        return None
    magic, length, seq, crc = HEADER.unpack_from(data, off)
    if magic != MAGIC or length > MAX_RECORD:
        return None
    end = off + HEADER.size + length
    if end > len(data):
        return None
    payload = bytes(data[off + HEADER.size:end])
    if _crc(length, seq, payload) != crc:
        return None
    return seq, payload, end


def _resync(data: bytes, off: int) -> int:
    """The offset of the next valid record after `off`, or len(data)."""
    pos = off + 1
    while True:
        pos = data.find(MAGIC, pos)
        if pos < 0:
            return len(data)
        if _parse(data, pos) is not None:
            return pos
        pos += 1


class DiskQueue:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max(1, int(max_bytes))
        self.segment_bytes = segment_bytes or max(64 * 1024, min(16 * 1024 * 1024, self.max_bytes // 8))
        self._lock = threading.Lock()
        self._problems: list[Problem] = []
        self.dropped = 0                  # records dropped because the queue was full, since open
        self._segments: list[_Segment] = []
        self._bytes = 0                   # sum of the segments' sizes: append() checks the bound without a scan
        self._peeked: tuple | None = None  # the last peek: (head segment, read offset, seqs, ends, segments)
        self._read_fd: tuple[str, int] = ("", -1)                # (path, fd) of the segment being read
        self._state_fd = os.open(self.directory / "state", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._state_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._state_fd)
            raise QueueBusy(f"{self.directory} is in use by another process") from None
        raw = os.pread(self._state_fd, STATE.size, 0)
        self._cursor, self._attempted = STATE.unpack(raw) if len(raw) == STATE.size else (1, 0)
        self._cursor = max(self._cursor, 1)
        self._recovered_attempted = self._attempted
        self._write_fd = -1
        self._read_off = 0
        self._recover()

    # --- opening -------------------------------------------------------------------------------
    def _recover(self) -> None:
        for path in sorted(self.directory.glob("seg-*")):
            try:
                first = int(path.name[4:])
            except ValueError:
                continue
            self._segments.append(_Segment(first, path, path.stat().st_size))
        self._next_seq = self._cursor
        if self._segments:
            last = self._segments[-1]
            data = last.path.read_bytes()
            off, valid_end, last_seq = 0, 0, None
            while off < len(data):
                parsed = _parse(data, off)
                if parsed is None:
                    off = _resync(data, off)
                    continue
                last_seq, _, off = parsed
                valid_end = off
            if valid_end < len(data):
                self._problems.append(Problem("torn_tail", f"{last.path.name}: {len(data) - valid_end} bytes after "
                                              "the last whole record cut off (a write interrupted by a crash)",
                                              len(data) - valid_end))
                os.truncate(last.path, valid_end)
                last.size = valid_end
            if last_seq is not None:
                self._next_seq = max(self._next_seq, last_seq + 1)
            else:
                self._next_seq = max(self._next_seq, last.first_seq)
        # Delete segments wholly behind the cursor, then find the cursor inside the first one left.
        while len(self._segments) > 1 and self._segments[1].first_seq <= self._cursor:
            self._drop_head()
        if self._segments:
            data = self._segment_data(self._segments[0])
            off = 0
            while off < len(data):
                parsed = _parse(data, off)
                if parsed is None:
                    break                       # damage: peek() skips and reports it
                seq, _, end = parsed
                if seq >= self._cursor:
                    break
                off = end
            self._read_off = off
            self._write_fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
        self._bytes = sum(s.size for s in self._segments)

    def _drop_head(self) -> None:
        """Delete the first segment (wholly read); the read offset is the caller's to set."""
        segment = self._segments.pop(0)
        self._bytes -= segment.size
        self._delete(segment)

    def _delete(self, segment: _Segment) -> None:
        if self._read_fd[0] == str(segment.path):
            os.close(self._read_fd[1])
            self._read_fd = ("", -1)
        try:
            segment.path.unlink()
        except FileNotFoundError:
            pass

    def _fd_for(self, segment: _Segment) -> int:
        if self._read_fd[0] != str(segment.path):
            if self._read_fd[1] >= 0:
                os.close(self._read_fd[1])
            self._read_fd = (str(segment.path), os.open(segment.path, os.O_RDONLY))
        return self._read_fd[1]

    def _segment_data(self, segment: _Segment, start: int = 0) -> bytes:
        return os.pread(self._fd_for(segment), max(0, segment.size - start), start)

    def _read_at(self, segment: _Segment, off: int) -> tuple[int, bytes, int] | None:
        """(seq, payload, end) of the valid record at `off` of `segment`, or None."""
        fd = self._fd_for(segment)
        head = os.pread(fd, HEADER.size, off)
        if len(head) < HEADER.size:
            return None
        magic, length, seq, crc = HEADER.unpack(head)
        end = off + HEADER.size + length
        if magic != MAGIC or length > MAX_RECORD or end > segment.size:
            return None
        payload = os.pread(fd, length, off + HEADER.size)
        if len(payload) != length or _crc(length, seq, payload) != crc:
            return None
        return seq, payload, end

    # --- state ---------------------------------------------------------------------------------
    def _save_state(self, sync: bool = False) -> None:
        os.pwrite(self._state_fd, STATE.pack(self._cursor, self._attempted), 0)
        if sync:
            os.fsync(self._state_fd)

    @property
    def backlog_bytes(self) -> int:
        return self._bytes - self._read_off

    @property
    def backlog_records(self) -> int:
        return max(0, self._next_seq - self._cursor)

    def __len__(self) -> int:
        return self.backlog_records

    def take_problems(self) -> list[Problem]:
        with self._lock:
            problems, self._problems = self._problems, []
        return problems

    # --- reading -------------------------------------------------------------------------------
    def _at_cursor(self) -> tuple[int, bytes, int] | None:
        """The valid record at the read position (skipping and reporting damage), or None when empty."""
        while self._segments:
            head = self._segments[0]
            if self._read_off < head.size:
                parsed = self._read_at(head, self._read_off)
                if parsed is not None:
                    if parsed[0] >= self._cursor:
                        return parsed
                    self._read_off = parsed[2]       # already delivered (found again after damage)
                    continue
                rest = self._segment_data(head, self._read_off)
                skipped = _resync(rest, 0)
                self._problems.append(Problem("corrupt", f"{head.path.name}: {skipped} damaged bytes at offset "
                                              f"{self._read_off} skipped", skipped))
                self._read_off += skipped
                continue
            if len(self._segments) == 1:
                return None
            self._drop_head()
            self._read_off = 0
        return None

    def peek(self) -> QueueRecord | None:
        """The oldest undelivered record, left in place until ack()."""
        with self._lock:
            found = self._at_cursor()
            if found is None:
                return None
            seq, payload, _ = found
            return QueueRecord(seq, payload, seq <= self._recovered_attempted)

    def peek_batch(self, limit: int) -> list[QueueRecord]:
        """Up to `limit` oldest undelivered records, in order, left in place until ack_through()."""
        with self._lock:
            seqs, payloads = self._scan(limit)
            attempted = self._recovered_attempted
            return [QueueRecord(seq, payload, seq <= attempted) for seq, payload in zip(seqs, payloads, strict=True)]

    def peek_payloads(self, limit: int) -> tuple[int, list[bytes]]:
        """peek_batch() for a consumer that needs neither seqs nor duplicate flags (its records carry their
        own ids): the seq to pass to ack_through() (0 when empty) and up to `limit` payloads."""
        with self._lock:
            seqs, payloads = self._scan(limit)
            return (seqs[-1] if seqs else 0), payloads

    def _scan(self, limit: int) -> tuple[list[int], list[bytes]]:
        """The seqs and payloads of up to `limit` records from the cursor. Reads a run of records with one
        pread() and parses it in memory, and remembers where each ends, for ack_through()."""
        first = self._at_cursor()
        if first is None:
            return [], []
        head = self._segments[0]
        seqs, payloads, ends, where = [first[0]], [first[1]], [first[2]], [head]
        index, off = 0, first[2]
        unpack, crc32, header_size = HEADER.unpack_from, zlib.crc32, HEADER.size
        while len(seqs) < limit:
            segment = self._segments[index]
            if off >= segment.size:
                if index + 1 >= len(self._segments):
                    break
                index, off = index + 1, 0
                continue
            data = os.pread(self._fd_for(segment), min(segment.size - off, READ_CHUNK), off)
            size, pos, count = len(data), 0, len(seqs)
            while count < limit and pos + header_size <= size:
                magic, length, seq, crc = unpack(data, pos)
                end = pos + header_size + length
                if magic != MAGIC or end > size:
                    break               # the end of the run, a record cut by it, or damage
                payload = data[pos + header_size:end]
                if crc32(payload, crc32(data[pos + 4:pos + 16])) != crc:     # the CRC covers length and seq
                    break
                seqs.append(seq)
                payloads.append(payload)
                ends.append(off + end)
                where.append(segment)
                pos = end
                count += 1
            if pos == 0:
                parsed = self._read_at(segment, off)        # a record larger than a run
                if parsed is None:
                    break               # damage: skipped and reported when it reaches the head
                seqs.append(parsed[0])
                payloads.append(parsed[1])
                ends.append(parsed[2])
                where.append(segment)
                off = parsed[2]
            else:
                off += pos
        self._peeked = (head, self._read_off, seqs, ends, where)
        return seqs, payloads

    def _ack_peeked(self, seq: int) -> None:
        """Move past the records of the last peek up to `seq` from where the peek found they end, without
        reading them again; only if nothing moved the read position since (an append that dropped records)."""
        peeked, self._peeked = self._peeked, None
        if peeked is None or not self._segments or peeked[0] is not self._segments[0] or peeked[1] != self._read_off:
            return
        _, _, seqs, ends, where = peeked
        i = len(seqs) - 1
        while i >= 0 and seqs[i] > seq:
            i -= 1
        if i < 0 or not any(s is where[i] for s in self._segments):
            return
        while self._segments[0] is not where[i]:
            self._drop_head()
        self._read_off = ends[i]
        self._cursor = seqs[i] + 1
        while len(self._segments) > 1 and self._read_off >= self._segments[0].size:
            self._drop_head()
            self._read_off = 0

    def ack_through(self, seq: int) -> None:
        """The sink accepted every record up to `seq`: move past them."""
        with self._lock:
            self._ack_peeked(seq)
            while True:
                found = self._at_cursor()
                if found is None or found[0] > seq:
                    break
                self._advance()
            self._save_state()

    def mark_attempted(self, seq: int) -> None:
        """Record (durably) that `seq` is about to be handed to the sink."""
        with self._lock:
            if seq <= self._attempted:
                return
            self._attempted = seq + ATTEMPT_STEP - 1
            self._save_state(sync=True)

    def _advance(self) -> int | None:
        found = self._at_cursor()
        if found is None:
            return None
        seq, _, end = found
        self._read_off = end
        self._cursor = seq + 1
        while len(self._segments) > 1 and self._read_off >= self._segments[0].size:
            self._drop_head()
            self._read_off = 0
        return seq

    def ack(self, seq: int) -> None:
        """The sink accepted record `seq`: move past it. (Ignored if it was dropped meanwhile.)"""
        with self._lock:
            found = self._at_cursor()
            if found is None or found[0] != seq:
                return
            self._advance()
            self._save_state()

    # --- writing -------------------------------------------------------------------------------
    def append(self, payload: bytes, sync: bool = False) -> int:
        """Add a record; returns its seq (-1 when it is larger than the whole queue and was dropped). Drops the
        oldest records first when the queue would overflow. With `sync`, fsync'ed before returning. Raises
        OSError when the disk refuses the write (nothing partial is left behind)."""
        return self.append_many([payload], sync)

    def append_many(self, payloads: list[bytes], sync: bool = False) -> int:
        """append() for several records in one write per segment (a group commit: the archive gathers the
        records of one read and writes them at once). Returns the seq of the last record written, -1 if none.
        On OSError, the records of the write that failed are not in the queue (those before it may be)."""
        last = -1
        with self._lock:
            buffer: list[bytes] = []
            pending = 0                                 # bytes in buffer
            for payload in payloads:
                length = len(payload)
                record_len = HEADER.size + length
                if self._bytes + pending - self._read_off + record_len > self.max_bytes:
                    self._write_records(buffer, sync)
                    buffer, pending = [], 0
                    if record_len > self.max_bytes:
                        self.dropped += 1
                        self._problems.append(Problem("dropped", f"a {record_len}-byte event is larger than the "
                                                      f"whole queue ({self.max_bytes} bytes)", 1))
                        continue
                    self._make_room(record_len)
                segments = self._segments
                if not segments or (segments[-1].size + pending and
                                    segments[-1].size + pending + record_len > self.segment_bytes):
                    self._write_records(buffer, sync)
                    buffer, pending = [], 0
                    self._new_segment(self._next_seq)
                seq = self._next_seq
                buffer.append(encode_record(seq, payload))
                pending += record_len
                self._next_seq = seq + 1
                last = seq
            self._write_records(buffer, sync)
        return last

    def _write_records(self, records: list[bytes], sync: bool) -> None:
        """Write encoded records (seqs already taken) to the current segment in one write (fsync'ed with `sync`)."""
        if not records:
            return
        segment = self._segments[-1]
        data = b"".join(records)
        try:
            if os.write(self._write_fd, data) != len(data):
                raise OSError(28, "short write to the queue")
            if sync:
                os.fsync(self._write_fd)
        except OSError:
            try:
                os.truncate(segment.path, segment.size)    # leave no partial record behind
            except OSError:
                pass
            self._next_seq -= len(records)                 # the seqs were not used
            raise
        segment.size += len(data)
        self._bytes += len(data)

    def _make_room(self, record_len: int) -> None:
        dropped = 0
        while self.backlog_bytes + record_len > self.max_bytes and self._advance() is not None:
            dropped += 1
        if dropped:
            self.dropped += dropped
            self._problems.append(Problem("dropped", f"queue full ({self.max_bytes} bytes): the {dropped} "
                                          "oldest undelivered events dropped", dropped))
            self._save_state()

    def _new_segment(self, first_seq: int) -> None:
        path = self.directory / f"seg-{first_seq:020d}"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if self._write_fd >= 0:
            os.close(self._write_fd)
        self._write_fd = fd
        segment = _Segment(first_seq, path, os.fstat(fd).st_size)
        self._segments.append(segment)
        self._bytes += segment.size
        # A consumed head segment is no longer the one being written: it can go.
        while len(self._segments) > 1 and self._read_off >= self._segments[0].size:
            self._drop_head()
            self._read_off = 0

    def close(self) -> None:
        with self._lock:
            self._save_state()
            for fd in (self._write_fd, self._state_fd, self._read_fd[1]):
                if fd >= 0:
                    os.close(fd)
            self._write_fd = self._state_fd = -1
            self._read_fd = ("", -1)
