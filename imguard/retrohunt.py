"""The retro-hunt: today's signatures over the files that crossed before, and who received them.

    summary = hunt(pipeline, since="2026-12-01T00:00:00+00:00")       # the policy and signatures in force
    hunts = BackgroundHunts(pipeline); hunts.start("reload")             # the same, in a low-priority thread

The sightings (who sent a file to whom, when, over which protocol) are the archive's file records
(imguard/archive.py); the bytes are in the file store (imguard/filestore.py) or, for a file blocked then, the
quarantine. Each SHA-256 seen since `since` is inspected once with the inspector in force and decided by the
policy in force for every distinct context it was seen in. A file that no sighting blocked then and one blocks
now raises one `retrohunt` alert (dataset `imguard.retrohunt`, docs/events.md) naming every sender and receiver
and the rules that now match. A hash whose bytes retention already removed is counted as seen but not
rescannable (`not_kept`): the alert cannot be raised for it, the summary says how many.

The hunt writes no archive record: it finds, it does not re-transfer. The file store's index remembers each
(file, rules) alerted, so the background hunt after the next signature change does not raise it again.

Why a thread of its own, niced, rather than a low-priority queue in the inspection pool: the pool is bounded and
its fullness is a signal (the gateway's fail modes turn a full queue into `unscannable` or a relayed file), so
thousands of old files queued there would make live transfers fail, whatever their priority. The hunt's thread
lowers its own nice value (on Linux a per-thread attribute) to 19: YARA releases the GIL while it scans, so the
kernel gives the cores to the pool's workers first, and the hunt uses what they leave.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import enum
import logging
import os
import re
import threading
import time
from typing import Any, Callable

from imguard import alerts
from imguard.model import BLOCK, YARA_MATCH, ChatContext, Decision, FileReport

logger = logging.getLogger("imguard.retrohunt")

SIGHTINGS_IN_EVENT = 50         # sightings listed in an alert (all senders and receivers are named anyway)


class Outcome(enum.Enum):
    UNCHANGED = "unchanged"             # rescanned: no sighting blocks now
    NOW_BLOCKED = "now_blocked"         # allowed then, blocked now: an alert
    ALREADY_BLOCKED = "already_blocked"  # blocked when it crossed: nothing new to say
    ALREADY_ALERTED = "already_alerted"  # blocked now, and an earlier background hunt said so for the same rules
    NOT_KEPT = "not_kept"               # the hash was seen, its bytes are gone (retention): not rescannable
    FAILED = "failed"                   # inspection or policy raised: logged


@dataclasses.dataclass(frozen=True)
class Sighting:
    time: str
    protocol: str
    direction: str
    sender: str
    recipients: tuple[str, ...]
    conversation: str
    mechanism: str
    file_name: str
    action: str

    def context(self) -> ChatContext:
        return ChatContext(protocol=self.protocol or "", direction=self.direction or "", sender=self.sender or "",
                           recipients=self.recipients, conversation=self.conversation or "",
                           transfer_mechanism=self.mechanism or "")

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "protocol": self.protocol, "direction": self.direction, "sender": self.sender,
                "recipients": list(self.recipients), "conversation": self.conversation,
                "mechanism": self.mechanism, "file_name": self.file_name, "action": self.action}


@dataclasses.dataclass
class Summary:
    since: str
    files: int = 0                      # distinct SHA-256 seen since `since`
    rescanned: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = dataclasses.field(default_factory=lambda: {o.value: 0 for o in Outcome})
    alerts: list[dict[str, Any]] = dataclasses.field(default_factory=list)    # the retrohunt events written
    not_kept: list[str] = dataclasses.field(default_factory=list)             # hashes seen, bytes gone
    stopped: bool = False               # a newer hunt or close() stopped this one

    def to_dict(self) -> dict[str, Any]:
        return {"since": self.since, "files": self.files, "rescanned": self.rescanned,
                "seconds": round(self.seconds, 3), "outcomes": self.outcomes, "now_blocked": len(self.alerts),
                "not_kept": self.not_kept, "stopped": self.stopped,
                "files_per_second": round(self.rescanned / self.seconds, 1) if self.seconds else 0.0}


_AGE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_time(value: str) -> str:
    """`7d`, `12h`, `30m`, `2w` (before now) or an ISO date/time -> the ISO UTC time the archive compares with."""
    match = _AGE.match(value.strip())
    if match:
        when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            seconds=int(match[1]) * _UNITS[match[2]])
        return when.isoformat(timespec="seconds")
    try:
        when = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"--since {value!r}: an age (7d, 12h, 30m, 2w) or an ISO date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")


def sightings(archive, since: str) -> dict[str, list[Sighting]]:
    """Every file record since `since`, by SHA-256, oldest first (the archive's records are the sightings)."""
    db = archive.database()
    m = db.mark
    found: dict[str, list[Sighting]] = {}
    for row in db.rows("SELECT sha256, time, protocol, direction, sender, recipients, conversation, mechanism, "
                       f"file_name, action FROM records WHERE kind = 'file' AND sha256 IS NOT NULL AND sha256 <> '' "
                       f"AND time >= {m} ORDER BY time, id", [since]):
        sha256, when, protocol, direction, sender, recipients, conversation, mechanism, name, action = row
        found.setdefault(sha256, []).append(Sighting(
            when, protocol or "", direction or "", sender or "", tuple((recipients or "").split()),
            conversation or "", mechanism or "", name or "", action or ""))
    return found


def _content(pipeline, sha256: str) -> bytes | None:
    for store in (getattr(pipeline, "filestore", None), getattr(pipeline, "quarantine", None)):
        if store is None:
            continue
        try:
            data = store.read(sha256)
        except (OSError, ValueError):
            data = None
        if data:
            return data
    return None


def _yara_rules(report: FileReport) -> list[str]:
    return sorted({f.data.get("rule", "") for member in report.walk() for f in member.findings
                   if f.kind == YARA_MATCH} - {""})


def retrohunt_event(report: FileReport, seen: list[Sighting], decision: Decision, signatures_version: str
                    ) -> dict[str, Any]:
    """The alert for a file allowed when it crossed and blocked by the policy and signatures in force now: the file
    event of the new decision (its rules, its YARA matches), with every sender and receiver of its sightings."""
    senders = list(dict.fromkeys(s.sender for s in seen if s.sender))
    recipients = list(dict.fromkeys(r for s in seen for r in s.recipients))
    first = seen[0]
    ctx = first.context().with_(sender=senders[0] if senders else "", recipients=tuple(recipients))
    event = alerts.file_event(report, ctx, decision)
    event["event"].update(dataset="imguard.retrohunt", action="retrohunt", kind="alert")
    if "intrusion_detection" not in event["event"]["category"]:
        event["event"]["category"].append("intrusion_detection")
    related = event.setdefault("related", {})
    related["user"] = list(dict.fromkeys([*related.get("user", []), *senders, *recipients]))
    yara = _yara_rules(report)
    event["imguard"]["retrohunt"] = {
        "senders": senders, "recipients": recipients, "sightings_count": len(seen),
        "sightings": [s.to_dict() for s in seen[:SIGHTINGS_IN_EVENT]],
        "first_seen": first.time, "last_seen": seen[-1].time,
        "previous_actions": sorted({s.action for s in seen}),
        "rules": list(decision.rule_ids), "yara_rules": yara, "signatures_version": signatures_version,
    }
    names = ", ".join(decision.rule_ids) or "-"
    event["message"] = (f"retrohunt: file {report.name or first.file_name!r} ({report.sha256}) crossed "
                        f"{len(seen)} time(s) since {first.time} and is now blocked by {names}"
                        f"{' (YARA ' + ', '.join(yara) + ')' if yara else ''}; senders: {', '.join(senders) or '-'}; "
                        f"receivers: {', '.join(recipients) or '-'}")
    return event


def hunt(pipeline, since: str, *, progress: Callable[[int, int], None] | None = None,
         stop: threading.Event | None = None, pause: float = 0.0, repeat: bool = True, workers: int = 1) -> Summary:
    """Rescan every file seen since `since` with the pipeline's policy and inspector in force; write a retrohunt
    alert (pipeline.record) for each that is now blocked. `progress(done, total)` after each file; `stop` ends
    the hunt early; `pause` seconds between files (a gentler background hunt); `workers` files rescanned at once
    (YARA releases the GIL: `imguard retrohunt` uses both cores, the background hunt one). Without `repeat` (the
    background hunt after a reload), a file already alerted for the same rules is counted, not alerted again: the
    next signature change would otherwise raise every earlier finding anew. `imguard retrohunt` repeats: it was
    asked."""
    started = time.perf_counter()
    summary = Summary(since=since)
    if getattr(pipeline, "archive", None) is None:
        return summary
    policy, inspector = pipeline._in_force
    version = str(getattr(getattr(inspector, "signatures", None), "version", ""))
    # The archive is written by its own thread: the sightings of files that crossed a moment ago (the very ones a
    # signature change is most likely about) are on disk before they are read.
    pipeline.archive.flush()
    seen_by_hash = sightings(pipeline.archive, since)
    summary.files = len(seen_by_hash)

    def rescan(item: tuple[str, list[Sighting]]) -> tuple[str, list[Sighting], Rescan]:
        if stop is not None and stop.is_set():
            return item[0], item[1], Rescan(None)
        result = _rescan(pipeline, policy, inspector, item[0], item[1])
        if pause:
            time.sleep(pause)
        return item[0], item[1], result

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # One worker: in this thread (the background hunt's, niced). Several: pool.map keeps the order.
        results = map(rescan, seen_by_hash.items()) if workers <= 1 else pool.map(rescan, seen_by_hash.items())
        for done, (sha256, seen, result) in enumerate(results, 1):
            if result.outcome is None:
                summary.stopped = True
                continue
            outcome = _settle(pipeline, sha256, seen, result, version, summary, repeat)
            summary.outcomes[outcome.value] += 1
            if progress is not None:
                progress(done, summary.files)
    summary.seconds = time.perf_counter() - started
    return summary


@dataclasses.dataclass(frozen=True)
class Rescan:
    outcome: Outcome | None             # None: stopped before this file
    report: FileReport | None = None
    decision: Decision | None = None    # the first blocking decision, for NOW_BLOCKED


def _rescan(pipeline, policy, inspector, sha256: str, seen: list[Sighting]) -> Rescan:
    """One file, inspected once and decided for each context it was seen in (no side effects: in a worker)."""
    if all(s.action == BLOCK for s in seen):
        return Rescan(Outcome.ALREADY_BLOCKED)
    data = _content(pipeline, sha256)
    if data is None:
        return Rescan(Outcome.NOT_KEPT)
    try:
        first = seen[0]
        report = inspector.inspect(data, first.context(), name=first.file_name)
        for context in dict.fromkeys(s.context() for s in seen if s.action != BLOCK):
            decision = policy.decide_file(report, context)
            if decision.blocked:
                return Rescan(Outcome.NOW_BLOCKED, report, decision)
    except Exception:
        logger.exception("retro-hunt: rescanning %s failed", sha256)
        return Rescan(Outcome.FAILED)
    return Rescan(Outcome.UNCHANGED, report)


def _settle(pipeline, sha256: str, seen: list[Sighting], result: Rescan, version: str, summary: Summary,
            repeat: bool) -> Outcome:
    """Count a rescan's outcome and raise its alert (in the hunt's own thread)."""
    if result.report is not None:
        summary.rescanned += 1
    if result.outcome is Outcome.NOT_KEPT:
        summary.not_kept.append(sha256)
    if result.outcome is not Outcome.NOW_BLOCKED:
        return result.outcome
    assert result.report is not None and result.decision is not None
    filestore = getattr(pipeline, "filestore", None)
    if filestore is not None and not filestore.remember_hunted(sha256, result.decision.rule_ids) and not repeat:
        return Outcome.ALREADY_ALERTED
    event = retrohunt_event(result.report, seen, result.decision, version)
    pipeline.record(event)
    summary.alerts.append(event)
    logger.warning("%s", event["message"])
    return Outcome.NOW_BLOCKED


class BackgroundHunts:
    """One background hunt at a time, in a niced thread: a new start (the signatures changed again) stops the
    one under way, whose results the newer signatures supersede."""

    def __init__(self, pipeline, window_days: int = 30, pause: float = 0.0):
        self.pipeline = pipeline
        self.window_days = window_days
        self.pause = pause
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last: Summary | None = None

    def start(self, reason: str) -> threading.Thread:
        with self._lock:
            self._stop_current()
            self._stop = threading.Event()
            since = (datetime.datetime.now(datetime.timezone.utc)
                     - datetime.timedelta(days=self.window_days)).isoformat(timespec="seconds")
            self._thread = threading.Thread(target=self._run, args=(since, reason, self._stop),
                                            name="imguard retro-hunt", daemon=True)
            self._thread.start()
            return self._thread

    def _run(self, since: str, reason: str, stop: threading.Event) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)      # this thread only (Linux)
        except (OSError, AttributeError):
            pass
        try:
            summary = hunt(self.pipeline, since, stop=stop, pause=self.pause, repeat=False)
        except Exception:
            logger.exception("retro-hunt (%s) failed", reason)
            return
        self.last = summary
        logger.info("retro-hunt (%s) since %s: %d files, %d rescanned, %d now blocked, %d not kept, %.1fs",
                    reason, since, summary.files, summary.rescanned, len(summary.alerts), len(summary.not_kept),
                    summary.seconds)

    def _stop_current(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        with self._lock:
            self._stop_current()
