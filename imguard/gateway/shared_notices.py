"""Notices across workers and gateways: the chat connection that announced a file may be held by another process.

With a shared expected-transfers table (transfer_store sqlite or PostgreSQL), a side connection (an HTTP upload, a
SOCKS5 bytestream, a DCC) may land on another worker or gateway host than the chat connection that announced it.
The Notify for a file stopped there names a connection this process does not hold: the notice is posted to the
shared table (kind NOTICE, expiring after NOTICE_TTL seconds), and every process delivers, every POLL_SECONDS, the
posted notices for the connections it holds (taken once: the row is deleted by exactly one reader). Connection ids
are mitmproxy's client ids (UUIDs), unique across processes. With the in-memory table the plain NoticeRouter is
used and nothing is polled.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from imguard.files.expected import NOTICE, TransferStoreError
from imguard.gateway.notices import NoticeRouter

logger = logging.getLogger("imguard.gateway")

POLL_SECONDS = 0.5
NOTICE_TTL = 120.0


class SharedNoticeRouter(NoticeRouter):
    """A NoticeRouter whose notices for connections held elsewhere go through the shared table."""

    def __init__(self, transfers: Any, poll_seconds: float = POLL_SECONDS) -> None:
        super().__init__()
        self.transfers = transfers
        self.poll_seconds = poll_seconds
        self._task: asyncio.Task | None = None

    def remember(self, connection_id: str, session: Any, context: Any) -> None:
        super().remember(connection_id, session, context)
        if self._task is None:
            try:
                self._task = asyncio.get_running_loop().create_task(self._poll(), name="imguard shared notices")
            except RuntimeError:        # off the event loop (a test): delivered on the next remember on it
                pass

    def deliver(self, connection_id: str, text: str) -> bool:
        if not connection_id or connection_id in self.sessions:
            return super().deliver(connection_id, text)
        try:
            self.transfers.expect(f"{connection_id} {uuid.uuid4().hex}", (connection_id, text), kind=NOTICE,
                                  ttl=NOTICE_TTL)
        except TransferStoreError as e:
            logger.error("notice for connection %s not delivered (shared table: %s): %s", connection_id, e, text)
            return False
        return True

    def deliver_posted(self) -> int:
        """Deliver the posted notices for the connections this process holds; how many."""
        delivered = 0
        for key, value in self.transfers.entries(NOTICE):
            connection_id, text = value if isinstance(value, tuple) and len(value) == 2 else ("", "")
            if connection_id in self.sessions and self.transfers.take(key, kind=NOTICE) is not None:
                delivered += super().deliver(connection_id, str(text))
        return delivered

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            if not self.sessions:
                continue
            try:
                self.deliver_posted()
            except TransferStoreError as e:
                logger.warning("shared notices not read: %s", e)
            except Exception:
                logger.exception("shared notices not read")
