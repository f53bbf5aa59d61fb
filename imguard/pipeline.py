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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from imguard import alerts
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
        if self.archive is not None:
            self.archive.add_message(kept_text, ctx, decision)
        return decision

    def check_file(self, data: "bytes | Path", ctx: ChatContext, name: str = "", claimed_mime: str = "",
                   truncated: bool = False) -> tuple[FileReport, Decision]:
        policy, inspector = self._in_force
        ctx = self._with_direction(policy, ctx)
        started = time.perf_counter_ns()
        report = inspector.inspect(data, ctx, name=name, claimed_mime=claimed_mime)
        inspect_ns = time.perf_counter_ns() - started
        if truncated:
            report.findings.append(Finding(UNSCANNABLE, "the transfer ended before the announced size",
                                           data={"reason": REASON_TRUNCATED}))
        decision = policy.decide_file(report, ctx)
        self._record_file(data, report, ctx, decision, {"event": {"duration": inspect_ns}})  # ECS: nanoseconds
        return report, decision

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
