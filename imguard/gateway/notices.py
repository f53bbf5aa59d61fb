"""Notices across connections: a file stopped on a side connection (a DCC, an OFT or MSNFTP connection, a
SOCKS5 bytestream, an HTTP upload) is explained to its sender on the chat connection that announced it.

The session of the side connection returns a `Notify` command; the gateway addon records it and asks the
router to deliver it. The router knows each live session by its connection id (ChatContext.connection_id =
mitmproxy's client id) and sends a NoticeInjected event into that connection's layer stack, as mitmproxy's
inject.tcp does: scheduled on the event loop, never run inside the caller's layer. The SessionLayer there,
however deep under TLS layers, carries out session.notice(text)'s commands.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import ctx as mitm_ctx
from mitmproxy.utils import asyncio_utils

from imguard.gateway.layer import NoticeInjected, NoticeTarget, WakeInjected

logger = logging.getLogger("imguard.gateway")


def connection_handler(client_id: str) -> Any:
    """mitmproxy's handler of the live connection of client `client_id` (its layers and its streams), or None."""
    master = getattr(mitm_ctx, "master", None)
    ps = master.addons.get("proxyserver") if master is not None else None
    return ps.connections.get(client_id) if ps is not None and client_id else None


class NoticeRouter:
    """The live sessions by connection id, and the delivery of a notice to one of them."""

    def __init__(self) -> None:
        self.sessions: dict[str, tuple[Any, Any]] = {}     # connection id -> (session, its mitmproxy context)

    def remember(self, connection_id: str, session: Any, context: Any) -> None:
        self.sessions[connection_id] = (session, context)

    def forget(self, connection_id: str) -> None:
        self.sessions.pop(connection_id, None)

    def deliver(self, connection_id: str, text: str) -> bool:
        """Tell the person on connection `connection_id` `text` through its session's notice(). False when that
        connection or its session is gone, or it is called off the event loop (the Notify's record still
        stands)."""
        handler = connection_handler(connection_id)
        session, context = self.sessions.get(connection_id, (None, None))
        if handler is None or session is None:
            logger.warning("notice for connection %s not delivered (connection gone): %s", connection_id or "-", text)
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            logger.error("notice for connection %s not delivered (called off the event loop): %s", connection_id, text)
            return False

        def inject() -> None:
            event = NoticeInjected(NoticeTarget(context.client, context.server), text)
            asyncio_utils.create_task(handler.server_event(event), name="imguard notice", keep_ref=True)
        loop.call_soon(inject)
        return True

    def wake(self, connection_id: str, after: float) -> bool:
        """session.wake() on connection `connection_id` in `after` seconds (a Wake command), if it is still there
        then. False when it is gone now, or called off the event loop."""
        if connection_id not in self.sessions:
            logger.info("wake for connection %s dropped (connection gone)", connection_id or "-")
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            logger.error("wake for connection %s dropped (called off the event loop)", connection_id)
            return False

        def inject() -> None:
            handler = connection_handler(connection_id)
            _, context = self.sessions.get(connection_id, (None, None))
            if handler is None or context is None:
                return                      # it ended meanwhile: nothing to wake
            event = WakeInjected(NoticeTarget(context.client, context.server), "")
            asyncio_utils.create_task(handler.server_event(event), name="imguard wake", keep_ref=True)
        loop.call_later(max(0.0, after), inject)
        return True
