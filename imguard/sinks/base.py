"""What a remote sink is: a name, a filter and a blocking send() that either delivers or says how it failed."""

from __future__ import annotations

from typing import Any

from imguard.alerts import severity_of
from imguard.model import SEVERITIES


class DeliveryError(Exception):
    """The sink did not take the event. `ambiguous` when it may have taken it anyway (a timeout after the
    request was sent, a connection cut mid-write): the retry is then flagged as a possible duplicate.
    `permanent` when retrying cannot help this event (it cannot be encoded, the receiver refused its content):
    the bus moves it to the sink's dead-letter file and goes on with the next one."""

    def __init__(self, message: str, ambiguous: bool = False, permanent: bool = False):
        super().__init__(message)
        self.ambiguous = ambiguous
        self.permanent = permanent


def severity_rank(name: str) -> int:
    """0 for no severity, 1 (info) .. 5 (critical)."""
    return SEVERITIES.index(name) + 1 if name in SEVERITIES else 0


def at_least(event: dict[str, Any], minimum: str) -> bool:
    """Whether the event's severity is at or above `minimum` ("" = any event)."""
    if not minimum:
        return True
    ev = event.get("event", {})
    return ev.get("kind") == "alert" and severity_rank(severity_of(event)) >= severity_rank(minimum)


class Sink:
    name = "sink"

    def accepts(self, event: dict[str, Any]) -> bool:
        """Whether this sink wants the event at all (decided once, when the event is queued)."""
        return True

    def send(self, event: dict[str, Any]) -> None:
        """Deliver one event; return only when the receiver has it. Raise DeliveryError otherwise."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def one_line(value: Any, limit: int = 200) -> str:
    """Text from the wire made safe for a one-line human field (a mail subject, a log header): every
    control character, line or paragraph separator becomes a space, and it is cut at `limit`."""
    text = str(value)
    out = "".join(" " if (ord(c) < 32 or 0x7f <= ord(c) < 0xa0 or c in "\u2028\u2029") else c for c in text)
    return out[:limit] + ("..." if len(out) > limit else "")
