"""The contract between a protocol session (sans-io) and whatever carries its bytes.

A *session* sits on one connection between a chat client and its server. The carrier (the
mitmproxy adapter in imguard.gateway, or the offline replay) feeds it what it receives and carries
out the commands it returns, in order:

    session.data_received(from_client=True, data=b"<message ...")  ->  [Send(to_client=False, data=...)]

The session decides what crosses: bytes it does not return in a Send never reach the other side.
A file the session holds is handed out as an InspectFile command; the carrier runs inspection and
policy off the event loop and answers with session.file_verdict(...), after which the session
releases or drops what it held. The session never blocks and never touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Protocol, runtime_checkable

from imguard import alerts
from imguard.model import ChatContext, Decision, FileReport


@runtime_checkable
class MembershipChecker(Protocol):
    """A session's checker that also decides one person letting another into a conversation (an invitation:
    policy's ethical walls, Pipeline.check_membership, which records the decision). A checker without it (a test
    stand-in) leaves invitations undecided."""

    def check_membership(self, kind: str, ctx: ChatContext, room: str = "") -> Decision: ...


# --- commands: session -> carrier -------------------------------------------------------------------

class Send(NamedTuple):
    """Write `data` towards the client (to_client=True) or the server. (A NamedTuple rather than a frozen
    dataclass like the other commands: one or more per chat message, and it is built several times faster.)"""
    to_client: bool
    data: bytes


@dataclass(frozen=True)
class StartTls:
    """Start TLS on both legs now: with the server as a client, then with the client using a
    certificate from imguard's CA. Sends before this command are written in plaintext first.
    The carrier calls session.tls_started() when both handshakes are done."""


@dataclass(frozen=True)
class InspectFile:
    """Inspect these held bytes and decide on them; answer with session.file_verdict(transfer_id, ...)."""
    transfer_id: str
    data: bytes
    context: ChatContext
    name: str = ""
    claimed_mime: str = ""
    truncated: bool = False     # the transfer ended before its announced size
    # Told if the scan takes a while ("being scanned"): Notify commands for another connection (the tracker's
    # HeldTransfer.scanning_notices); the gateway delivers them after scan_notice_after_seconds, else never.
    slow_notices: tuple["Notify", ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Record:
    """An event for the alert log and archive (a message passed, a decision, an anomaly, ...).
    `event` is the JSON object to write; see imguard.alerts for the schema."""
    event: dict[str, Any]


@dataclass(frozen=True)
class Close:
    """Close both legs of the connection. `graceful`: what was sent is delivered first (a released file on a
    connection of its own): each leg is half-closed after its last byte and still read until its peer closes,
    since a full close with the peer's bytes (DCC ACKs) unread would be a reset that discards what is in flight."""
    reason: str = ""
    graceful: bool = field(default=False, compare=False)     # how, not whether: equal to a plain Close


@dataclass(frozen=True)
class Notify:
    """Tell the person on another connection something in their chat: a file stopped on a side connection
    (DCC, OFT, MSNFTP, MSRP, a SOCKS5 bytestream, an HTTP upload) is explained on the chat connection
    `connection_id` that announced it. The carrier records the request (alerts.notify_event) and carries out
    `session.notice(text)` on that connection's session, if it is still there."""
    connection_id: str
    protocol: str                       # the chat connection's protocol ("irc", "xmpp", "msnp", ...)
    text: str
    context: ChatContext                # the file's context (who sent what to whom)
    decision: Decision | None = None
    details: tuple[tuple[str, Any], ...] = ()    # extra imguard.* fields of the event (("dcc", {...}),)

    def event(self, context: ChatContext | None = None) -> dict[str, Any]:
        return alerts.notify_event(self.connection_id, self.protocol, context or self.context, self.text,
                                   self.decision, **dict(self.details))


@dataclass(frozen=True)
class Anomaly:
    """Malformed or suspicious traffic (Zeek's 'weird'): recorded as an anomaly event, never a crash. A fact: the
    carrier's recording stage (alerts.anomaly_event) turns it into the event and stamps its time."""
    context: ChatContext
    kind: str
    detail: str
    severity: str | None = None
    data: dict[str, Any] = field(default_factory=dict)       # imguard.anomaly.* fields

    def event(self, context: ChatContext | None = None) -> dict[str, Any]:
        return alerts.anomaly_event(context or self.context, self.kind, self.detail, self.severity, **self.data)


@dataclass(frozen=True)
class ProtocolEvent:
    """Something a session saw that the record keeps but that is not a decision: a login, a nick change, a file
    offer, a link. A fact: the recording stage (alerts.protocol_event) makes the event; `data` goes under
    imguard.<protocol>."""
    protocol: str
    action: str
    context: ChatContext
    category: str = "session"
    data: dict[str, Any] = field(default_factory=dict)

    def event(self, context: ChatContext | None = None) -> dict[str, Any]:
        return alerts.protocol_event(self.protocol, self.action, context or self.context, self.category, **self.data)


@dataclass(frozen=True)
class Link:
    """A file offered as a link (XEP-0066): the recording stage makes an alerts.link_event."""
    context: ChatContext
    url: str

    def event(self, context: ChatContext | None = None) -> dict[str, Any]:
        return alerts.link_event(context or self.context, self.url)


@dataclass(frozen=True)
class MessageDecision:
    """A message the session decided itself, without the policy (an XMPP message linking to a file that was
    blocked): recorded as the pipeline records its own decisions (alerts.message_event)."""
    text: str | None
    context: ChatContext
    decision: Decision

    def event(self, context: ChatContext | None = None) -> dict[str, Any]:
        return alerts.message_event(self.text, context or self.context, self.decision)


# What a session saw. The carrier records fact.event(context): the fact's context as decisions see it (its direction
# derived from the topology and zones, Pipeline.with_direction), so every event of a conversation says its direction.
Fact = Anomaly | ProtocolEvent | Link | MessageDecision


@dataclass(frozen=True)
class ConnectUpstream:
    """Open the upstream leg to (host, port) now (a relay session that learnt its destination from the client,
    such as the SOCKS5 bytestream relay); then call session.upstream_connected(), or session.upstream_failed()
    for the next candidate."""
    host: str
    port: int
    jid: str = ""


@dataclass(frozen=True)
class Wake:
    """Call session.wake() `after` seconds from now, on this connection or on the one `connection_id` names: a
    deadline kept on a connection that may be idle (a warning's window, imguard/conversation.py), or news for another
    connection's session (a file held on a DCC connection, released by its sender's answer in the chat). A wake
    for a connection that is gone by then is dropped; the session checks its own state when woken."""
    after: float = 0.0
    connection_id: str = ""


Command = Send | StartTls | InspectFile | Record | Close | Notify | ConnectUpstream | Anomaly | ProtocolEvent | Link \
    | MessageDecision | Wake
FACTS = (Anomaly, ProtocolEvent, Link, MessageDecision)


class OutgoingCommands:
    """The commands a session returns, being collected: consecutive Sends in one direction become one
    Send (one write on the wire instead of one per line or stanza), other commands keep their place.
    `merge=False` keeps every Send apart (datagram protocols: one Send is one datagram)."""

    def __init__(self, merge: bool = True):
        self.merge = merge
        self._cmds: list[Command] = []
        self._parts: list[bytes] = []
        self._to_client: bool | None = None

    def send(self, to_client: bool, data: bytes) -> None:
        if not data:
            return
        if not self.merge:
            self._cmds.append(Send(to_client=to_client, data=data))
            return
        if self._to_client is not None and self._to_client != to_client:
            self._flush()
        self._to_client = to_client
        self._parts.append(data)

    def add(self, *cmds: Command | None) -> None:
        for c in cmds:
            if c is None:
                continue
            if isinstance(c, Send):
                self.send(c.to_client, c.data)
            else:
                self._flush()
                self._cmds.append(c)

    def _flush(self) -> None:
        if self._parts:
            self._cmds.append(Send(to_client=bool(self._to_client), data=b"".join(self._parts)))
        self._parts = []
        self._to_client = None

    @property
    def cmds(self) -> list[Command]:
        self._flush()
        return self._cmds


def block_words(decision: Decision) -> tuple[str, str]:
    """("blocked" or "quarantined", why) for a notice: the titles (or ids) of the rules that decided."""
    words = {"block": "blocked", "quarantine": "quarantined"}
    why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
    return words.get(decision.action, "blocked"), why


def limited_anomaly(counts: dict[str, int], limit: int, ctx: ChatContext, kind: str, detail: str,
                    severity: str | None = None, **data: Any) -> Anomaly | None:
    """An anomaly record, at most `limit` of one kind per connection: `counts` (the session's, by kind) counts
    them all, the last one recorded says `further_suppressed`, and later ones are only counted (a peer
    repeating one malformation must not flood the alert log)."""
    seen = counts[kind] = counts.get(kind, 0) + 1
    if seen > limit:
        return None
    if seen == limit:
        data["further_suppressed"] = True
    return Anomaly(ctx, kind, detail, severity, data=data)


# --- what a session is ------------------------------------------------------------------------------

class StreamSession:
    """One connection's protocol logic: the whole contract between a session and its carrier. Every session
    subclasses it; the parts a protocol may not need are declared here with their defaults, so a carrier calls
    them all without probing the session."""

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        """Bytes from one side: the commands that carry out what the session decided."""
        raise NotImplementedError

    def data_received_steps(self, from_client: bool, data: bytes) -> Iterator[list[Command]]:
        """The same commands as data_received, a stanza or line at a time, so a carrier can forward what is
        decided while it checks the rest of a read (SessionLayer._run_steps). Default: the read as one step."""
        yield self.data_received(from_client, data)

    def start(self) -> list[Command]:
        """The connection is open, before any byte (an unannounced side connection is closed here; a relay
        that learnt its upstream from the client speaks first to it). Default: nothing."""
        return []

    def tls_started(self) -> list[Command]:
        """Both TLS handshakes of a STARTTLS are done. Default: nothing."""
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        """The verdict on a file the session handed out with InspectFile. Default: nothing (it holds none)."""
        return []

    def connection_closed(self, from_client: bool) -> list[Command]:
        """One side closed. Default: close the other."""
        return [Close("peer closed")]

    def wake(self) -> list[Command]:
        """A Wake this session (or another connection's) asked for is due. Default: nothing."""
        return []

    def passes_close_on(self, from_client: bool) -> bool:
        """Whether the carrier passes one side's close on to the other now, after connection_closed. False while the
        session holds what that side sent for later (a DCC file waiting for its sender's answer: its receiver must
        not read the end before the file); the session's own Close comes when it is settled. Default: True."""
        return True

    def notice(self, text: str) -> list[Command] | None:
        """Tell this connection's user `text` in the protocol's own terms (a Notify from another connection).
        None: the protocol has no way to (the carrier logs the notice as undelivered)."""
        return None

    def addressee(self) -> str:
        """The person on this connection, once a notice reaches them (an XMPP bound JID, an IRC registered
        account or nick), to find them for a released file's link (imguard/releases.py). Default: '' (none)."""
        return ""

    def upstream_connected(self) -> list[Command]:
        """The upstream leg asked for with ConnectUpstream is open. Default: nothing."""
        return []

    def upstream_failed(self) -> list[Command]:
        """The upstream leg asked for with ConnectUpstream could not be opened. Default: close."""
        return [Close("upstream unreachable")]


@dataclass
class RelaySession(StreamSession):
    """A session that forwards every byte untouched: the baseline, and the fallback for unknown protocols."""

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        return [Send(to_client=not from_client, data=data)]
