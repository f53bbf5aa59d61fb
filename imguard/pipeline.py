"""Inspection, decision and recording glued together: what every carrier (inline gateway, offline
replay, `imguard scan`) calls, so a verdict is the same wherever the bytes came from.

    check_message(text, ctx)        -> Decision               fast, called inline on the event loop
    check_file(data, ctx, name, ..) -> (FileReport, Decision) slow, called from a worker thread

Both write their decision to the alert log. The policy can be swapped at any time (hot reload):
a call uses the policy object it read at its start.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from imguard import alerts
from imguard.conversation import ConversationSettings, FirstContacts, disclaimer_event, disclaimer_record
from imguard.inspect import passwords as zip_passwords
from imguard.model import BLOCK, REASON_TRUNCATED, UNSCANNABLE, ChatContext, Decision, FileReport, Finding

logger = logging.getLogger("imguard")


DIRECTION_CACHE_SIZE = 4096            # contexts whose derived direction is remembered


@dataclass
class Pipeline:
    inspector: "object"                 # imguard.inspect.Inspector
    policy: "object"                    # imguard.policy.Policy
    alert_log: alerts.AlertLog | None = None
    quarantine: "object" = None         # imguard.quarantine.QuarantineStore: keeps blocked files
    archive: "object" = None            # imguard.archive.Archive: the record of messages and transfers
    keep_text: bool = True              # write message text into the record
    filestore: "object" = None          # imguard.filestore.FileStore: keeps every other file for the retro-hunt

    def __post_init__(self) -> None:
        self._in_force = (self.policy, self.inspector)
        self._directions: tuple = (None, {})     # (policy, {ChatContext: the same with its direction})
        # the recent short messages of each conversation: passwords for its encrypted zips (inspect/passwords.py)
        self.passwords = zip_passwords.for_limits(getattr(self.inspector, "limits", None))
        self.contacts = FirstContacts()         # when each pair of parties last got a disclaimer

    def start_disclaimers(self, settings: ConversationSettings) -> int:
        """Use these settings for disclaimers and, with an archive, remember the disclaimers of their period from it
        (a restart does not disclaim again); the number of pairs read. Called once, before traffic."""
        self.contacts = FirstContacts(settings)
        if self.archive is None:
            return 0
        try:
            return self.contacts.load(self.archive)
        except Exception as e:       # a database that cannot answer costs a repeated disclaimer, not the gateway
            logger.warning("disclaimers: could not read the archive's (%s: %s); starting from none",
                           type(e).__name__, e)
            return 0

    def swap(self, policy: "object", inspector: "object") -> None:
        """Put a reloaded configuration in force, in one assignment. A check that has started keeps the pair
        it read: a file is never inspected with one version's signatures and decided by another's rules."""
        self._in_force = (policy, inspector)
        self.policy, self.inspector = policy, inspector       # for readers of the attributes

    def _with_direction(self, policy: "object", ctx: ChatContext) -> ChatContext:
        """The context with its direction derived from the policy's zones when the protocol did not say.
        Remembered per (policy, context): sessions reuse one context per peer, so a conversation's
        thousands of messages classify once (and share one derived object, which the event writer
        caches on)."""
        if ctx.direction:
            return ctx
        owner, cache = self._directions
        if owner is not policy:             # reloaded: a new table (a thread still on the old policy keeps the old)
            cache = {}
            self._directions = (policy, cache)
        derived = cache.get(ctx)
        if derived is None:
            classify = getattr(policy, "classify_direction", None)
            direction = classify(ctx) if classify is not None else ""
            derived = ctx.with_(direction=direction) if direction else ctx
            if len(cache) >= DIRECTION_CACHE_SIZE:
                cache.clear()
            cache[ctx] = derived
        return derived

    def with_direction(self, ctx: ChatContext) -> ChatContext:
        """The context as decisions see it: its direction derived (topology, then zones) when it has none."""
        return self._with_direction(self._in_force[0], ctx)

    def check_message(self, text: str, ctx: ChatContext) -> Decision:
        policy = self._in_force[0]
        ctx = self._with_direction(policy, ctx)
        decision = policy.decide_message(text, ctx)
        if decision.disclaimers:
            self._disclaim(ctx, decision)
        kept_text = text if self.keep_text else None
        alert_log = self.alert_log
        if alert_log is not None:
            # write_message writes the same line as write(message_event(...)), an allowed message without
            # building its event. A log without it (a test stand-in) gets the event.
            write_message = getattr(alert_log, "write_message", None)
            if write_message is not None:
                write_message(kept_text, ctx, decision)
            else:
                alert_log.write(alerts.message_event(kept_text, ctx, decision))
        record_id = ""
        if self.archive is not None:
            record_id = self.archive.add_message(kept_text, ctx, decision)
        self.passwords.saw(text, ctx, record_id or "")
        return decision

    def _disclaim(self, ctx: ChatContext, decision: Decision) -> None:
        """Keep in the decision only the disclaimer due now for this conversation (none for a message that does not
        cross); the one given is an event and an archive record. The session injects it."""
        due = self.contacts.due(ctx, decision.disclaimers) if not decision.blocked else None
        decision.disclaimers = [due[0]] if due is not None else []
        if due is None:
            return
        match, pair, first = due
        if self.alert_log is not None:
            self.alert_log.write(disclaimer_event(ctx, match, pair, first))
        if self.archive is not None:
            self.archive.add_message(match.notice, *disclaimer_record(ctx, match, pair, decision.policy_version))

    def check_membership(self, kind: str, ctx: ChatContext, room: str = "") -> Decision:
        """An invitation (`kind` "invite": ctx.sender lets ctx.recipients into `room`), decided by the ethical walls
        (Policy.decide_membership). Recorded only when a wall matched: every attempt across a wall is an event."""
        policy = self._in_force[0]
        ctx = self._with_direction(policy, ctx)
        decision = policy.decide_membership(ctx)
        if (decision.matches or decision.shadow) and self.alert_log is not None:
            self.alert_log.write(alerts.membership_event(kind, ctx, decision, room))
        return decision

    def check_file(self, data: "bytes | Path", ctx: ChatContext, name: str = "", claimed_mime: str = "",
                   truncated: bool = False) -> tuple[FileReport, Decision]:
        policy, inspector = self._in_force
        ctx = self._with_direction(policy, ctx)
        started = time.perf_counter_ns()
        seen = self.passwords.seq               # the messages so far came before the file; later ones, after it
        report = inspector.inspect(data, ctx, name=name, claimed_mime=claimed_mime)
        if zip_passwords.locked_members(report) and isinstance(data, (bytes, bytearray, memoryview)):
            report = self._conversation_passwords(inspector, data, ctx, name, claimed_mime, report, seen)
        inspect_ns = time.perf_counter_ns() - started
        if truncated:
            report.findings.append(Finding(UNSCANNABLE, "the transfer ended before the announced size",
                                           data={"reason": REASON_TRUNCATED}))
        decision = policy.decide_file(report, ctx)
        self._record_file(data, report, ctx, decision, {"event": {"duration": inspect_ns}})  # ECS: nanoseconds
        return report, decision

    def _conversation_passwords(self, inspector: "object", data: "bytes | bytearray | memoryview", ctx: ChatContext,
                                name: str, claimed_mime: str, report: FileReport, seen: int) -> FileReport:
        """An encrypted zip the configured passwords did not open: inspected again with the words of the
        conversation's recent messages, then (zip_password_wait) with those and each message that comes while it
        waits (passwords.pool: all of the window's, bounded by zip_password_tries), keeping the report that leaves
        the fewest members locked. Waits only on a thread other than the one that
        delivers messages (the gateway's inspection workers; not the replay, not `imguard scan`)."""
        memory = self.passwords
        seq, found = memory.candidates(ctx, seen)
        locked = zip_passwords.locked_members(report)
        tried: list = []        # every candidate of the window so far: each member may have its own password

        def again(candidates: list) -> None:
            nonlocal report, locked, tried
            tried = zip_passwords.pool(tried, candidates, zip_passwords.room(inspector),
                                       zip_passwords.opened_by(report))
            retry = inspector.inspect(data, ctx, name=name, claimed_mime=claimed_mime,
                                      extra_passwords=tuple(tried))
            if zip_passwords.locked_members(retry) < locked:
                report, locked = retry, zip_passwords.locked_members(retry)
        if found:
            again(found)
        wait = float(getattr(getattr(inspector, "limits", None), "zip_password_wait", 0.0) or 0.0)
        if threading.current_thread() is (memory.message_thread or threading.main_thread()):
            wait = 0.0
        deadline = time.monotonic() + wait
        while locked and (left := deadline - time.monotonic()) > 0:
            seq, found = memory.wait(ctx, seq, left)
            if not found:
                break
            again(found)
        return report

    def check_unscannable(self, data: bytes, ctx: ChatContext, name: str, claimed_mime: str, reason: str,
                          detail: str, size: int | None = None,
                          adjust: Callable[[Decision], tuple[Decision, dict]] | None = None,
                          ) -> tuple[FileReport, Decision]:
        """The decision on a file the carrier could not have inspected (the queue was full, the scan took too long
        or failed, it is too large to hold): a report with only an UNSCANNABLE finding (`reason`), decided by
        policy like any file, then `adjust`ed (the gateway's fail mode: the decision it leaves, and the
        imguard.fail_mode fields for the event, {situation, mode}), and recorded like any
        file: the alert log, the quarantine for a blocked one, the archive. Policy failing here blocks."""
        policy = self._in_force[0]
        ctx = self._with_direction(policy, ctx)
        report = FileReport(name=name, path=name, size=len(data) if size is None else size,
                            sha256=hashlib.sha256(data).hexdigest() if data else "", claimed_mime=claimed_mime,
                            findings=[Finding(UNSCANNABLE, detail, data={"reason": reason})])
        try:
            decision = policy.decide_file(report, ctx)
        except Exception:
            logger.exception("policy failed on an unscannable file; blocking it")
            decision = Decision(action=BLOCK)
        fail_mode: dict = {}
        if adjust is not None:
            decision, fail_mode = adjust(decision)
        self._record_file(data, report, ctx, decision,
                          {"event": {"kind": "alert"}, "imguard": {"fail_mode": fail_mode}} if fail_mode else {})
        return report, decision

    def _record_file(self, data: "bytes | Path", report: FileReport, ctx: ChatContext, decision: Decision,
                     extra: dict[str, dict]) -> None:
        """A file's decision, recorded: a blocked file kept in the quarantine first (so its alert can name where
        the evidence is; a full disk never turns a block into a pass: the block stands and the alert says what
        failed), then the alert (with `extra` fields merged into its sections), then the archive, on disk before
        the verdict is used (files are few)."""
        stored = quarantine_error = None
        if decision.blocked and data and self.quarantine is not None and \
                isinstance(data, (bytes, bytearray, memoryview)):
            try:
                stored = self.quarantine.put(bytes(data), report, ctx, decision)
            except OSError as e:
                quarantine_error = f"{type(e).__name__}: {e}"
        elif data and report.sha256 and self.filestore is not None:
            # Not blocked: kept for a later retro-hunt (blocked files are the quarantine's). Best effort: a full
            # disk costs the retro-hunt this file, never the transfer.
            try:
                self.filestore.put(data, report.sha256)
            except (OSError, ValueError) as e:
                logger.warning("file store: could not keep %s: %s", report.sha256, e)
        if self.alert_log is not None:
            event = alerts.file_event(report, ctx, decision)
            for section, fields in extra.items():
                event[section].update(fields)
            if stored is not None:
                event["imguard"]["quarantine_path"] = str(stored)
            if quarantine_error is not None:
                event["imguard"]["quarantine_error"] = quarantine_error
            self.alert_log.write(event)
        if self.archive is not None:
            self.archive.add_file(report, ctx, decision)
            self.archive.commit()

    def commit(self) -> None:
        """Put the archive records gathered so far on disk: a carrier calls this before it forwards the traffic
        they record (the gateway: before each write towards a peer). Raises OSError when the disk refuses."""
        if self.archive is not None:
            self.archive.commit()

    def record(self, event: dict) -> None:
        if self.alert_log is not None:
            self.alert_log.write(event)

    def close(self) -> None:
        """Flush and close the event sinks and the archive (undelivered events stay queued on disk)."""
        for part in (self.alert_log, self.archive):
            if part is not None:
                part.close()
