"""Supervision: the review queue (issue 22), as FINRA Rule 3110 asks of a supervised firm's communications.

What enters the queue:
- **Flagged items**: an alert whose rule says `review: true` (docs/rules.md) carries `imguard.review`; the console
  queues each such alert once (by its `event.id`), with its chat context and a link to the alert and conversation.
- **Samples**: with `console_review_sample_percent` > 0, for each UTC day the console draws that percentage of the
  day's *unflagged* archived conversations (no record of it that day matched a rule): the day's conversations,
  sorted, then `random.Random(f"{seed}|{day}").sample(...)` (`draw`): the same seed and archive give the same
  sample, so an examiner can redo it. The seed is `console_review_sample_seed`, or one drawn once and kept in the
  trail. A day is drawn once: the last `console_review_sample_days` completed days are caught up when a reviewer
  opens the queue, and an admin may draw a given day (today too) from the queue's page.

How an item ends: one table, `State` x `Disposition` -> `State` (`TRANSITIONS`). A reviewer marks an item with a
disposition and a required comment: `no_issue`, `false_positive` and `violation` close it; `escalated` passes it
on (to a second reviewer, who closes it the same way). A closed item takes no further step.

The trail (its only store): DATA_DIR/console/review.jsonl, 0600, one O_APPEND line per act (`queue`, `sample`,
`dispose`), each carrying the previous line's digest and its own (`prev`, `digest`: SHA-256 over the previous
digest and the line's canonical JSON), so an edited, dropped or reordered line is found by `Trail.verify`; the
queue is the trail replayed through the table. Every disposition is also a `console_review` line of the access
log. Export: CSV (formula-safe, `archive.to_csv`) or JSON lines.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import random
import secrets
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Iterable

from imguard.console import data


class State(enum.Enum):
    PENDING = "pending"             # queued, no reviewer has decided
    ESCALATED = "escalated"         # a reviewer passed it on: a second review closes it
    CLOSED = "closed"               # decided; takes no further step


class Disposition(enum.Enum):
    NO_ISSUE = "no_issue"
    FALSE_POSITIVE = "false_positive"
    VIOLATION = "violation"
    ESCALATED = "escalated"


class Source(enum.Enum):
    RULE = "rule"                   # a `review: true` rule flagged it
    SAMPLE = "sample"               # drawn from the unflagged conversations of a day


# The whole life of an item: (state, disposition) -> next state; a pair not here is refused.
TRANSITIONS: dict[tuple[State, Disposition], State] = {
    (State.PENDING, Disposition.NO_ISSUE): State.CLOSED,
    (State.PENDING, Disposition.FALSE_POSITIVE): State.CLOSED,
    (State.PENDING, Disposition.VIOLATION): State.CLOSED,
    (State.PENDING, Disposition.ESCALATED): State.ESCALATED,
    (State.ESCALATED, Disposition.NO_ISSUE): State.CLOSED,
    (State.ESCALATED, Disposition.FALSE_POSITIVE): State.CLOSED,
    (State.ESCALATED, Disposition.VIOLATION): State.CLOSED,
}
OPEN = (State.PENDING, State.ESCALATED)
MAX_COMMENT = 2000
GENESIS = "0" * 64
EXPORT_COLUMNS = ("item", "source", "queued", "state", "disposition", "reviewer", "decided", "comment", "time",
                  "protocol", "sender", "recipients", "room", "rules", "alert", "summary", "sample_day", "steps")


class ReviewError(ValueError):
    """A step the queue refuses (unknown item, a transition not in the table, no comment); says why."""


@dataclasses.dataclass
class Step:
    time: str
    reviewer: str
    disposition: Disposition
    comment: str


@dataclasses.dataclass
class Item:
    id: int
    source: Source
    queued: str                     # when it entered the queue
    time: str = ""                  # when the flagged item happened (a sample: its day)
    protocol: str = ""
    sender: str = ""
    recipients: list[str] = dataclasses.field(default_factory=list)
    room: str = ""
    rules: list[str] = dataclasses.field(default_factory=list)
    alert: str = ""                 # the alert's event.id (a flagged item)
    sides: list[str] = dataclasses.field(default_factory=list)     # the other side's alert of the same message
    summary: str = ""
    sample_day: str = ""
    state: State = State.PENDING
    steps: list[Step] = dataclasses.field(default_factory=list)

    @property
    def last(self) -> Step | None:
        return self.steps[-1] if self.steps else None

    def export_row(self) -> dict[str, Any]:
        last = self.last
        return {"item": self.id, "source": self.source.value, "queued": self.queued, "state": self.state.value,
                "disposition": last.disposition.value if last else "", "reviewer": last.reviewer if last else "",
                "decided": last.time if last else "", "comment": last.comment if last else "", "time": self.time,
                "protocol": self.protocol, "sender": self.sender, "recipients": " ".join(self.recipients),
                "room": self.room, "rules": " ".join(self.rules), "alert": " ".join([self.alert, *self.sides]).strip(),
                "summary": self.summary, "sample_day": self.sample_day,
                "steps": json.dumps([{"time": s.time, "reviewer": s.reviewer, "disposition": s.disposition.value,
                                      "comment": s.comment} for s in self.steps], ensure_ascii=False)}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _digest(prev: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256((prev + "\n" + canonical).encode()).hexdigest()


class Trail:
    """The append-only, chained file of every act on the queue."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lines, self.problems = self._read()
        self.head = self.lines[-1]["digest"] if self.lines else GENESIS

    def _read(self) -> tuple[list[dict[str, Any]], list[str]]:
        lines, problems, prev = [], [], GENESIS
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = json.loads(raw)
                    body = {k: v for k, v in line.items() if k != "digest"}
                except (ValueError, AttributeError):
                    problems.append(f"line {number}: not a JSON object")
                    continue
                if body.get("prev") != prev or _digest(prev, body) != line.get("digest"):
                    problems.append(f"line {number}: its digest does not follow from the line before "
                                    "(edited, removed or reordered)")
                prev = str(line.get("digest", ""))
                lines.append(line)
        return lines, problems

    def verify(self) -> list[str]:
        """The problems of the whole file, read again from disk ([] when every line chains)."""
        return self._read()[1]

    def append(self, op: str, **fields: Any) -> dict[str, Any]:
        body = {"n": len(self.lines) + 1, "time": _now(), "op": op, **fields, "prev": self.head}
        line = {**body, "digest": _digest(self.head, body)}
        os.write(self._fd, (json.dumps(line, ensure_ascii=True) + "\n").encode())
        self.lines.append(line)
        self.head = line["digest"]
        return line

    def close(self) -> None:
        os.close(self._fd)


def draw(population: Iterable[str], seed: str, day: str, percent: float) -> list[str]:
    """The sample of one day: `percent` of the conversations (rounded up, at least one of a non-empty day when
    percent > 0), chosen by a generator seeded with the seed and the day from the population sorted."""
    keys = sorted(set(population))
    if percent <= 0 or not keys:
        return []
    count = min(len(keys), math.ceil(len(keys) * min(percent, 100.0) / 100.0))
    return sorted(random.Random(f"{seed}|{day}").sample(keys, count))


SIDES_WINDOW = 2.0      # seconds between the two sides' alerts of one message (as data.merge_sides)


def _message_key(event: dict[str, Any]) -> str:
    """What the two sides' alerts of one message share: the dataset, the sender without a device part, the text's
    or file's digest, the rules."""
    extra = event.get("imguard") or {}
    digest = (extra.get("message") or {}).get("sha256") or ((event.get("file") or {}).get("hash") or {}).get(
        "sha256") or ""
    context = extra.get("context") or {}
    return json.dumps([(event.get("event") or {}).get("dataset"), data.bare(str(context.get("sender") or "")),
                       digest, sorted(map(str, (extra.get("review") or {}).get("rules") or []))])


def _within(a: str, b: str, seconds: float) -> bool:
    try:
        first, second = (datetime.fromisoformat(x.replace("Z", "+00:00")) for x in (a, b))
    except ValueError:
        return False
    return abs((second - first).total_seconds()) <= seconds


def conversation_key(record: dict[str, Any]) -> str:
    """One name per conversation: its room, else the two people (without device parts), in order."""
    protocol = record.get("protocol") or ""
    if record.get("conversation"):
        return json.dumps([protocol, "room", record["conversation"]])
    recipients = (record.get("recipients") or "").split()
    people = sorted({data.bare(record.get("sender") or ""), data.bare(recipients[0]) if recipients else ""})
    return json.dumps([protocol, "pair", *people])


class ReviewQueue:
    """The queue: the trail replayed; every change is a trail line first."""

    def __init__(self, path: Path, percent: float = 0.0, seed: str = "", days: int = 7):
        self.trail = Trail(path)
        self.percent, self.days = percent, days
        self._lock = threading.Lock()
        self._alert_mark = 0            # the alert index's rows looked at (per process)
        self.items: dict[int, Item] = {}
        self._alerts: set[str] = set()
        self._sides: dict[str, tuple[int, str]] = {}      # a flagged item's message key -> (item, time)
        self.sampled: dict[str, dict[str, Any]] = {}      # day -> its `sample` line
        self.seed = seed
        for line in self.trail.lines:
            self._apply(line)
        if not self.seed:
            self.seed = next((s["seed"] for s in reversed(self.sampled.values())), "") or secrets.token_hex(16)

    # --- replay ------------------------------------------------------------------------------------

    def _apply(self, line: dict[str, Any]) -> None:
        op = line.get("op")
        if op == "queue":
            item = Item(id=int(line["item"]), source=Source(line["source"]), queued=line["time"],
                        time=line.get("when", ""), protocol=line.get("protocol", ""), sender=line.get("sender", ""),
                        recipients=list(line.get("recipients") or []), room=line.get("room", ""),
                        rules=list(line.get("rules") or []), alert=line.get("alert", ""),
                        summary=line.get("summary", ""), sample_day=line.get("day", ""))
            self.items[item.id] = item
            if item.alert:
                self._alerts.add(item.alert)
            if line.get("key"):
                self._sides[line["key"]] = (item.id, item.time)
        elif op == "side":
            self._alerts.add(line.get("alert", ""))
            if int(line["item"]) in self.items:
                self.items[int(line["item"])].sides.append(line.get("alert", ""))
        elif op == "dispose":
            item = self.items.get(int(line["item"]))
            disposition = Disposition(line["disposition"])
            if item is not None and (item.state, disposition) in TRANSITIONS:
                item.state = TRANSITIONS[(item.state, disposition)]
                item.steps.append(Step(line["time"], line["reviewer"], disposition, line["comment"]))
        elif op == "sample":
            self.sampled[line["day"]] = line

    # --- what enters ---------------------------------------------------------------------------------

    def _queue(self, **fields: Any) -> Item:
        line = self.trail.append("queue", item=len(self.items) + 1, **fields)
        self._apply(line)
        return self.items[line["item"]]

    def take_flagged(self, alerts: data.AlertIndex) -> int:
        """Queue the alerts flagged since the last call; how many were new."""
        with self._lock:
            events, self._alert_mark = alerts.flagged_for_review(self._alert_mark)
            added = 0
            for event in events:
                event_id = str((event.get("event") or {}).get("id") or "")
                if not event_id or event_id in self._alerts:
                    continue
                context = (event.get("imguard") or {}).get("context") or {}
                rules = (event.get("imguard") or {}).get("review", {}).get("rules") or []
                key, when = _message_key(event), str(event.get("@timestamp") or "")
                earlier = self._sides.get(key)
                if earlier and _within(earlier[1], when, SIDES_WINDOW):
                    # The other side of one message (both parties behind the gateway: outbound on the
                    # sender's connection, inbound on the receiver's): one item to review, both alerts named.
                    self._apply(self.trail.append("side", item=earlier[0], alert=event_id))
                    continue
                self._queue(source=Source.RULE.value, alert=event_id, when=when, key=key,
                            protocol=str(context.get("protocol") or ""), sender=str(context.get("sender") or ""),
                            recipients=[str(r) for r in context.get("recipients") or []],
                            room=str(context.get("conversation") or ""), rules=[str(r) for r in rules],
                            summary=str(event.get("message") or "")[:500])
                added += 1
            return added

    def sample_day(self, archive: data.ArchiveReader, day: str, actor: str = "") -> dict[str, Any] | None:
        """Draw `day`'s sample (once per day); its `sample` line, or None when it was drawn already."""
        date.fromisoformat(day)                 # ValueError for a day that is not one
        with self._lock:
            if day in self.sampled:
                return None
            until = (date.fromisoformat(day) + timedelta(days=1)).isoformat()
            first: dict[str, dict[str, Any]] = {}       # key -> the conversation's first record of the day
            flagged: set[str] = set()
            page = 1
            while True:
                records = archive.search(data.RecordQuery(since=day, until=until, page=page, per_page=5000))
                for record in records[:5000]:
                    if not (record.get("conversation") or (record.get("recipients") or "").strip()):
                        continue                # no second party: no conversation to read
                    key = conversation_key(record)
                    first[key] = record         # newest first: the last one kept is the day's first
                    if record.get("rules") or (record.get("action") or "allow") != "allow":
                        flagged.add(key)
                if len(records) <= 5000:
                    break
                page += 1
            population = sorted(set(first) - flagged)
            chosen = draw(population, self.seed, day, self.percent)
            line = self.trail.append("sample", day=day, seed=self.seed, percent=self.percent,
                                     population=len(population), flagged=len(flagged), drawn=len(chosen),
                                     actor=actor)
            self._apply(line)
            for key in chosen:
                record = first[key]
                recipients = (record.get("recipients") or "").split()
                self._queue(source=Source.SAMPLE.value, day=day, when=str(record.get("time") or ""),
                            protocol=str(record.get("protocol") or ""), sender=data.bare(record.get("sender") or ""),
                            recipients=[data.bare(r) for r in recipients[:1]], room=str(record.get("conversation")
                                                                                       or ""))
            return line

    def catch_up(self, archive: data.ArchiveReader, today: date | None = None) -> int:
        """Draw the samples of the last `days` completed days not drawn yet (nothing when sampling is off)."""
        if self.percent <= 0 or self.days <= 0:
            return 0
        today = today or datetime.now(UTC).date()
        drawn = 0
        for back in range(self.days, 0, -1):
            day = (today - timedelta(days=back)).isoformat()
            if day not in self.sampled and self.sample_day(archive, day, actor="console") is not None:
                drawn += 1
        return drawn

    # --- working it ------------------------------------------------------------------------------------

    def dispose(self, item_id: int, reviewer: str, disposition: str, comment: str) -> Item:
        comment = comment.strip()
        if not comment:
            raise ReviewError("a comment is required: say what you looked at and why you decided so")
        if len(comment) > MAX_COMMENT:
            raise ReviewError(f"the comment is longer than {MAX_COMMENT} characters")
        try:
            chosen = Disposition(disposition)
        except ValueError:
            raise ReviewError(f"no such disposition: {disposition!r}") from None
        with self._lock:
            item = self.items.get(item_id)
            if item is None:
                raise ReviewError("no such item in the review queue")
            if (item.state, chosen) not in TRANSITIONS:
                raise ReviewError(f"an item {item.state.value} cannot be marked {chosen.value}")
            if item.state is State.ESCALATED and item.last and item.last.reviewer == reviewer:
                raise ReviewError("an item you escalated is decided by another reviewer")
            self._apply(self.trail.append("dispose", item=item_id, reviewer=reviewer, disposition=chosen.value,
                                          comment=comment, state_before=item.state.value,
                                          state_after=TRANSITIONS[(item.state, chosen)].value))
            return item

    def list(self, state: str = "open") -> list[Item]:
        with self._lock:
            items = list(self.items.values())
        if state == "open":
            items = [i for i in items if i.state in OPEN]
        elif state in {s.value for s in State}:
            items = [i for i in items if i.state.value == state]
        return sorted(items, key=lambda i: i.id, reverse=True)

    def export_rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [item.export_row() for item in sorted(self.items.values(), key=lambda i: i.id)]

    def close(self) -> None:
        self.trail.close()
