"""The Overview's health panel: the last event from each gateway, and the sinks' backlogs and dead letters.

Read from the data folder only (the console is another process, perhaps on another host):
- Gateways: the tail of `alerts.jsonl` (its last `HEALTH_TAIL_BYTES`; and of `alerts.jsonl.1` when the live file
  is shorter, just after a rotation). Every event names its gateway (`observer.name`, the instance, else
  `observer.hostname`); a gateway whose last event is old is quiet or down. A gateway that wrote nothing within
  the tail is not listed (the alerts' index still has its alerts).
- Sinks: DATA_DIR/queue/<sink>/ (imguard/sinks/queue.py): the undelivered records, counted from the cursor in
  `state` to the last whole record of the newest segment, and the bytes on disk; DATA_DIR/dead-letter/<sink>.jsonl
  (imguard/sinks/bus.py): the records a sink refused for good, their count and the time of the last one. Read
  without the queue's lock (the gateway holds it while running): a figure may be a moment old, never wrong for long.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from datetime import UTC, datetime
from pathlib import Path

import orjson

from imguard.sinks import queue as disk_queue

HEALTH_TAIL_BYTES = 4 * 1024 * 1024


@dataclasses.dataclass
class Gateway:
    name: str
    hostname: str
    last_event: str
    last_action: str
    events: int                 # events of it in the tail read


@dataclasses.dataclass
class Sink:
    name: str
    backlog: int | None         # undelivered records (None: the queue could not be read)
    queue_bytes: int
    dead_letters: int
    last_dead_letter: str


def _tail_lines(path: Path, limit: int) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            chunk = f.read(limit)
    except OSError:
        return []
    lines = chunk.split(b"\n")
    if size > limit:
        lines = lines[1:]               # the first is cut
    return [line for line in lines if line.strip()]


def gateways(data_dir: Path) -> list[Gateway]:
    alerts = Path(data_dir) / "alerts.jsonl"
    lines = _tail_lines(alerts, HEALTH_TAIL_BYTES)
    if sum(map(len, lines)) < HEALTH_TAIL_BYTES // 2:
        lines = _tail_lines(alerts.with_name(alerts.name + ".1"), HEALTH_TAIL_BYTES) + lines
    seen: dict[str, Gateway] = {}
    for line in lines:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        observer = event.get("observer") if isinstance(event, dict) else None
        if not isinstance(observer, dict):
            continue
        hostname = str(observer.get("hostname") or "")
        name = str(observer.get("name") or hostname or "(unnamed)")
        when = str(event.get("@timestamp") or "")
        action = str((event.get("event") or {}).get("action") or "")
        known = seen.get(name)
        if known is None:
            seen[name] = Gateway(name, hostname, when, action, 1)
        else:
            known.events += 1
            if when >= known.last_event:
                known.last_event, known.last_action = when, action
    return sorted(seen.values(), key=lambda g: g.name)


def _backlog(directory: Path) -> int | None:
    try:
        cursor = disk_queue.STATE.unpack((directory / "state").read_bytes()[:disk_queue.STATE.size])[0]
    except (OSError, struct.error):
        cursor = 0
    segments = sorted(p for p in directory.glob("seg-*"))
    if not segments:
        return 0
    try:
        body = segments[-1].read_bytes()
    except OSError:
        return None
    last, off = None, 0
    while off < len(body):
        parsed = disk_queue._parse(body, off)
        if parsed is None:
            break
        seq, _, off = parsed
        last = seq
    if last is None:
        return 0
    return max(0, last + 1 - cursor)


def sinks(data_dir: Path) -> list[Sink]:
    data_dir = Path(data_dir)
    found: dict[str, Sink] = {}
    queues = data_dir / "queue"
    for directory in sorted(queues.iterdir()) if queues.is_dir() else ():
        if not directory.is_dir():
            continue
        size = sum(p.stat().st_size for p in directory.glob("seg-*") if p.is_file())
        found[directory.name] = Sink(directory.name, _backlog(directory), size, 0, "")
    letters = data_dir / "dead-letter"
    for path in sorted(letters.glob("*.jsonl")) if letters.is_dir() else ():
        name = path.name.removesuffix(".jsonl")
        sink = found.setdefault(name, Sink(name, None, 0, 0, ""))
        try:
            with open(path, "rb") as f:
                sink.dead_letters = sum(1 for line in f if line.strip())
            sink.last_dead_letter = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except OSError:
            continue
    return list(found.values())
