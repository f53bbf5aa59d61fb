"""File inspection off the event loop: a small thread pool with a bounded number of pending files.

Pipeline.check_file (libmagic, archive walk, YARA, policy, alert write) takes milliseconds to
seconds; the event loop must never wait for it. `Inspection.check()` is awaited by a hook handler,
which pauses only the connection that holds the file. When more than `max_pending` files are
waiting, a new one is not scanned: it gets an UNSCANNABLE finding (reason "limit") and policy
decides on that, so overload never turns into a silent pass. A scanner exception is handled the same
way with reason "scanner_error". A file whose scan takes longer than `timeout` is decided at once on an
unscannable (reason "timeout") report; its worker finishes in the background and keeps its queue slot
until then. For overload and timeout the operator's fail mode (failmode.py) has the last word over policy:
closed -> at least block, open -> relayed with an alert.

A file whose scan takes longer than `notice_after` seconds (scan_notice_after_seconds) is not silent: the
notices its InspectFile carries (`slow_notices`: "being scanned", for the people of ours who wait for it, on
their chat connection; the tracker's tell rule says who) are delivered through `notify` (the addon's
notify_command: recorded, then sent) while the scan goes on; a scan that ends sooner tells nobody. Those for
the connection that holds the file (in-band files) are told by its SessionLayer instead (layer.py).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from imguard.gateway.layer import FileJob
from imguard.model import (REASON_LIMIT, REASON_SCANNER_ERROR, REASON_TIMEOUT, ChatContext,
                           Decision, FileReport)
from imguard.protocols.base import Notify

logger = logging.getLogger("imguard.gateway")


class Inspection:
    def __init__(self, pipeline, workers: int = 2, max_pending: int = 32, fail_modes=None, timeout: float = 0,
                 notice_after: float = 0, notify: Callable[[Notify], None] | None = None):
        self.pipeline = pipeline
        self.max_pending = max(1, max_pending)
        self.fail_modes = fail_modes        # imguard.gateway.failmode.FailModes: overload / timeout (None = closed)
        self.timeout = timeout              # seconds one file may take (0 = no limit)
        self.notice_after = notice_after    # seconds before a file's slow_notices are delivered (0 = never)
        self.notify = notify                # delivers a Notify (GatewayAddon.notify_command); None = never
        self.pending = 0
        self.executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="imguard-inspect")

    async def check(self, data: bytes, ctx: ChatContext, name: str = "", claimed_mime: str = "",
                    truncated: bool = False) -> tuple[FileReport, Decision]:
        if self.pending >= self.max_pending:
            logger.warning("inspection queue full (%d pending): %r not scanned", self.pending, name)
            return self.unscannable(data, ctx, name, claimed_mime, REASON_LIMIT,
                                    f"the inspection queue was full ({self.max_pending} files)", situation="overload")
        self.pending += 1
        scan = None
        try:
            loop = asyncio.get_running_loop()
            scan = loop.run_in_executor(self.executor, self.pipeline.check_file, data, ctx, name,
                                        claimed_mime, truncated)
            # A file counts against the queue until its worker is done, even after a timeout decided it.
            scan.add_done_callback(self._finished)
            if not self.timeout:
                return await scan
            try:
                return await asyncio.wait_for(asyncio.shield(scan), self.timeout)
            except asyncio.TimeoutError:
                # The worker thread finishes on its own (and records what it found); this transfer is decided now.
                logger.warning("inspection of %r took more than %s s", name, self.timeout)
                return self.unscannable(data, ctx, name, claimed_mime, REASON_TIMEOUT,
                                        f"inspection took more than {self.timeout} s", situation="timeout")
        except Exception as e:  # the scanner failed: never a crash, never a silent pass
            logger.exception("inspection of %r failed", name)
            return self.unscannable(data, ctx, name, claimed_mime, REASON_SCANNER_ERROR, f"inspection failed: {e!r}")
        finally:
            if scan is None:
                self.pending -= 1

    def _finished(self, _future) -> None:
        self.pending -= 1

    def unscannable(self, data: bytes, ctx: ChatContext, name: str, claimed_mime: str, reason: str,
                    detail: str, size: int | None = None, situation: str = "") -> tuple[FileReport, Decision]:
        """A file that was not inspected: Pipeline.check_unscannable decides and records it like any file; for
        overload and timeout (`situation`) the operator's fail mode has the last word (failmode.py)."""
        adjust = None
        if situation:
            from imguard.gateway.failmode import apply_to_decision

            def adjust(decision: Decision) -> tuple[Decision, dict]:
                decision, mode = apply_to_decision(self.fail_modes, situation, ctx, decision)
                return decision, {"situation": situation, "mode": mode}
        return self.pipeline.check_unscannable(data, ctx, name, claimed_mime, reason, detail, size=size,
                                               adjust=adjust)

    async def inspect_file(self, job: FileJob) -> None:
        """mitmproxy's InspectFileHook (a SessionLayer's InspectFile): this addon answers it. The hook pauses only
        the layer that holds the file while the check runs in a worker."""
        cmd = job.command
        slow = None
        # A notice for the very connection that holds the file (in-band: IBB, MSNSLP, ...) is its layer's to tell
        # (SessionLayer: that connection is paused, and a notice delivered here would wait for the verdict).
        elsewhere = tuple(n for n in cmd.slow_notices if n.connection_id != cmd.context.connection_id)
        if elsewhere and self.notice_after > 0 and self.notify is not None:
            slow = asyncio.get_running_loop().call_later(self.notice_after, self._tell_slow, elsewhere, cmd.name)
        try:
            job.report, job.decision = await self.check(cmd.data, cmd.context, cmd.name, cmd.claimed_mime,
                                                        cmd.truncated)
        finally:
            if slow is not None:
                slow.cancel()

    def _tell_slow(self, notices: tuple[Notify, ...], name: str) -> None:
        logger.info("inspection of %r takes more than %s s: telling who waits for it", name, self.notice_after)
        for notice in notices:
            try:
                self.notify(notice)
            except Exception:   # a notice that cannot go never stops the scan
                logger.exception("slow-scan notice for %r not delivered", name)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
