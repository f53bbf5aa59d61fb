"""systemd integration without libsystemd: readiness notification (sd_notify(3)) and journald-friendly logging.

    ready("listening on 10.0.0.1:8081")   READY=1 once every listener is bound (the unit is Type=notify)
    stopping()                            STOPPING=1 when the gateway starts to shut down
    journal_logging()                     "<6>INFO imguard...: ..." lines on a stderr that journald reads

Each is a no-op outside systemd: without $NOTIFY_SOCKET nothing is sent, and without $JOURNAL_STREAM naming
stderr the log format is left alone. The protocol is one datagram of newline-separated KEY=VALUE lines on the
unix socket $NOTIFY_SOCKET names (a path, or "@name" for an abstract socket); a failure to send is logged, never
raised: a gateway that cannot tell systemd it is ready is still a working gateway (systemd times it out).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

logger = logging.getLogger("imguard.gateway")


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]             # Linux abstract namespace
    if address.startswith("/"):
        return address
    if address:
        logger.warning("NOTIFY_SOCKET=%r is not a unix socket path: systemd is not notified", address)
    return None


def notify(*states: str) -> bool:
    """Send `states` ("READY=1", "STATUS=...") to systemd in one datagram; True when it was sent."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode("utf-8"), address)
    except OSError as e:
        logger.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def ready(status: str = "") -> bool:
    """READY=1 (and a STATUS line `systemctl status` shows): call once every listener is bound."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping() -> bool:
    return notify("STOPPING=1")


# --- logging ----------------------------------------------------------------------------------------

# Python's levels as syslog priorities, which journald reads from a "<N>" line prefix (sd-daemon(3)).
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class JournalFormatter(logging.Formatter):
    """Each line of a record prefixed with its syslog priority; no timestamp (journald keeps its own)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in PRIORITIES if record.levelno >= level), 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(stream=None) -> bool:
    """$JOURNAL_STREAM ("DEVICE:INODE", systemd.exec(5)) names the file `stream` (stderr) writes to."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def journal_logging() -> bool:
    """When stderr goes to journald, log through JournalFormatter; True when it did."""
    if not stderr_is_journal():
        return False
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setFormatter(JournalFormatter())
    return True
