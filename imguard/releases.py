"""A released file reaches its receiver: the console's one-time link, sent into the chat by the gateway.

The console (imguard/console/release.py) decides a release in its own process, perhaps on another host that shares
the data folder; the gateway holds the receivers' chat connections. What passes between them is durable data, not a
socket: when the approvals suffice, the console posts a `Handoff` to the outbox `DATA_DIR/releases/` (one JSON file
per release, 0600 in 0700, written under a temporary name and renamed, so no reader sees half of one). Every gateway
process (each worker, each host on the shared folder) reads the outbox every `release_poll_seconds` and looks, for
each receiver of a handoff, among its own live sessions for that person (`StreamSession.addressee()`: an XMPP
session's bound JID, an IRC session's account or registered nick). It claims the (release, receiver) pair by
creating `<request>.<receiver's digest>.claim` with O_EXCL, so the pair is delivered once even when several
processes hold sessions of that person, and tells each such session of its own the link in the protocol's own terms
(`session.notice(text)`, the path of a notice about a blocked file: NoticeRouter.deliver). A receiver who is not
connected gets it at the first poll after they log in. One table says how a (release, receiver) pair ends:

    PENDING  --a live session of the receiver, the claim won-->            DELIVERED   release_delivered
    PENDING  --release_delivery_hours or the link's expiry passed-->        EXPIRED     release_delivery_expired

A handoff whose receivers have all ended is removed (its claims an hour later, once no process can still be
delivering from an earlier read of it). The link is the credential: it is in the outbox (0600, removed when done)
and in the receiver's chat, never in an event, which names the release by its request number and the file's hash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import json
import logging
import os
import time
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

from imguard import alerts
from imguard.model import ChatContext
from imguard.settings import setting

logger = logging.getLogger("imguard.releases")

CLAIM_KEEP_SECONDS = 3600.0         # a removed handoff's claims are kept this long (a slower reader's late claim)
NAME_CHARS = 60                     # of the file's name in the chat message (the name came from the wire)


@dataclasses.dataclass(frozen=True)
class DeliverySettings:
    """released files sent into the chat"""

    release_poll_seconds: float = setting(5.0, "How often the gateway reads the console's outbox (DATA_DIR/releases) "
                                               "for released files to send their receivers as a one-time link in "
                                               "the chat; 0 sends none (the analyst passes the link on).")
    release_delivery_hours: float = setting(72.0, "How long a released file's link waits for its receiver to be "
                                                  "connected through the gateway (at most until the link expires); "
                                                  "then it is dropped (release_delivery_expired).")


class Fate(enum.Enum):
    """How a (release, receiver) pair ended; the event's action."""
    DELIVERED = "release_delivered"
    EXPIRED = "release_delivery_expired"


@dataclasses.dataclass(frozen=True)
class Handoff:
    """A release for the gateway to deliver: written by the console, read by every gateway."""
    request: int                    # the release request's number (its ledger line)
    sha256: str
    name: str                       # the file's name as it crossed (hostile: shown cut and on one line)
    receivers: tuple[str, ...]
    link: str                       # the one-time download URL: the credential
    expires: str                    # when the link stops working (ISO 8601)
    written: str                    # when the console released it (ISO 8601)

    def text(self) -> str:
        """The chat message: the link first (a notice line may be cut), then what it is; the name without control
        and format characters (a bidi override would turn the line around)."""
        name = " ".join("".join(c for c in self.name if unicodedata.category(c) not in ("Cc", "Cf")).split())
        name = name[:NAME_CHARS] + ("..." if len(name) > NAME_CHARS else "")
        return (f"imguard: a blocked file was released to you: {self.link} (works once, until "
                f"{self.expires.replace('T', ' ')}; '{name}', release request {self.request})")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Handoff":
        receivers = data["receivers"]
        if not isinstance(receivers, list) or not all(isinstance(r, str) for r in receivers):
            raise ValueError("receivers is not a list of names")
        return cls(int(data["request"]), str(data["sha256"]), str(data.get("name", "")), tuple(receivers),
                   str(data["link"]), str(data["expires"]), str(data["written"]))

    def due(self, lifetime: float) -> float:
        """When it stops being delivered: the link's expiry or `lifetime` seconds after the release."""
        return min(_seconds(self.expires), _seconds(self.written) + lifetime)


def _seconds(iso: str) -> float:
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return 0.0                  # unreadable: already due
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _digest(receiver: str) -> str:
    return hashlib.sha256(receiver.lower().encode()).hexdigest()[:32]


class Outbox:
    """The handoffs in DATA_DIR/releases: posted by the console, read and claimed by the gateways."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, request: int) -> Path:
        return self.folder / f"{request}.json"

    def _claim_path(self, handoff: Handoff, receiver: str) -> Path:
        return self.folder / f"{handoff.request}.{_digest(receiver)}.claim"

    def post(self, handoff: Handoff) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        path = self._path(handoff.request)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(dataclasses.asdict(handoff)).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        return path

    def pending(self) -> Iterator[Handoff]:
        """The handoffs waiting (one that is not a handoff is logged and left alone)."""
        try:
            paths = sorted(self.folder.glob("*.json"))
        except OSError:
            return
        for path in paths:
            try:
                handoff = Handoff.from_json(json.loads(path.read_bytes()))
            except FileNotFoundError:
                continue            # removed by another gateway since the listing
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("release outbox: %s is not a release handoff (%s): skipped", path, e)
                continue
            if path.name != f"{handoff.request}.json":
                logger.warning("release outbox: %s names request %d: skipped", path, handoff.request)
                continue
            yield handoff

    def claimed(self, handoff: Handoff, receiver: str) -> bool:
        return self._claim_path(handoff, receiver).exists()

    def claim(self, handoff: Handoff, receiver: str) -> bool:
        """Take the (release, receiver) pair: True for exactly one caller, in any process on the folder."""
        try:
            os.close(os.open(self._claim_path(handoff, receiver), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
        return True

    def remove(self, handoff: Handoff) -> None:
        self._path(handoff.request).unlink(missing_ok=True)

    def sweep(self, now: float) -> None:
        """Remove the claims of removed handoffs once CLAIM_KEEP_SECONDS old."""
        for claim in self.folder.glob("*.claim"):
            try:
                if (not self._path(int(claim.name.split(".", 1)[0])).exists()
                        and claim.stat().st_mtime < now - CLAIM_KEEP_SECONDS):
                    claim.unlink(missing_ok=True)
            except (OSError, ValueError):
                continue


class Addressed(Protocol):
    """What delivery needs of a session: StreamSession.addressee(), and the ChatContext of a session that names
    one (XMPP's, IRC's)."""
    context: ChatContext

    def addressee(self) -> str: ...


class Router(Protocol):
    """The gateway's live sessions and their notice path (imguard.gateway.notices.NoticeRouter)."""
    sessions: dict[str, tuple[Any, Any]]

    def deliver(self, connection_id: str, text: str) -> bool: ...


class ReleaseDelivery:
    """The gateway's side: the outbox read every `release_poll_seconds`, each handoff sent to its receivers' live
    sessions of this process, each pair's end recorded once (`record`: the pipeline's, to alerts.jsonl)."""

    def __init__(self, outbox: Outbox, router: Router, record: Callable[[dict[str, Any]], None],
                 settings: DeliverySettings = DeliverySettings(), clock: Callable[[], float] = time.time):
        self.outbox, self.router, self.record, self.settings, self.clock = outbox, router, record, settings, clock

    def sessions_of(self, receiver: str) -> list[tuple[str, Addressed]]:
        """(connection id, session) of `receiver`'s live sessions in this process."""
        wanted = receiver.lower()
        if not wanted:
            return []
        return [(connection_id, session) for connection_id, (session, _) in list(self.router.sessions.items())
                if session.addressee().lower() == wanted]

    def poll(self) -> int:
        """One reading of the outbox (on the event loop: the notices are scheduled on it); pairs delivered."""
        now = self.clock()
        delivered = 0
        for handoff in self.outbox.pending():
            lifetime = self.settings.release_delivery_hours * 3600
            waiting = [r for r in handoff.receivers if not self.outbox.claimed(handoff, r)]
            if now >= handoff.due(lifetime):
                for receiver in waiting:
                    if self.outbox.claim(handoff, receiver):
                        self.record(release_event(Fate.EXPIRED, handoff, receiver))
                self.outbox.remove(handoff)
                continue
            for receiver in waiting:
                sessions = self.sessions_of(receiver)
                if not sessions or not self.outbox.claim(handoff, receiver):
                    continue
                text = handoff.text()
                reached = [(cid, s) for cid, s in sessions if self.router.deliver(cid, text)]
                self.record(release_event(Fate.DELIVERED, handoff, receiver, reached))
                delivered += bool(reached)
            if all(self.outbox.claimed(handoff, r) for r in handoff.receivers):
                self.outbox.remove(handoff)
        self.outbox.sweep(now)
        return delivered

    async def run(self) -> None:
        """Poll until cancelled (a failing poll is logged; the next one tries again)."""
        if self.settings.release_poll_seconds <= 0:
            return
        while True:
            await asyncio.sleep(self.settings.release_poll_seconds)
            try:
                self.poll()
            except Exception:
                logger.exception("release outbox not read")


def release_event(fate: Fate, handoff: Handoff, receiver: str,
                  sessions: list[tuple[str, Addressed]] | None = None) -> dict[str, Any]:
    """The end of one (release, receiver) pair: delivered to `sessions` ((connection id, session)), or expired
    undelivered. Without the link (the credential)."""
    sessions = sessions or []
    protocols = sorted({session.context.protocol for _, session in sessions} - {""})
    ctx = ChatContext(protocol=protocols[0] if protocols else "", recipients=(receiver,),
                      connection_id=sessions[0][0] if sessions else "")
    delivered = fate is Fate.DELIVERED and bool(sessions)
    event = alerts._base("event", "release", ctx, ["file"], ["info"], action=fate.value,
                         outcome="success" if delivered else "failure")
    event["file"] = {"hash": {"sha256": handoff.sha256}}
    event.setdefault("related", {})["hash"] = [handoff.sha256]
    how = (f"sent into the chat of {receiver} ({', '.join(protocols) or 'no session'})" if fate is Fate.DELIVERED
           else f"not delivered: {receiver} was not connected through the gateway before it was due")
    event["message"] = f"release request {handoff.request}: the one-time link to {handoff.sha256[:16]}... {how}"
    event["imguard"]["release"] = {"request": handoff.request, "receiver": receiver, "expires": handoff.expires,
                                   "released": handoff.written,
                                   "connection_ids": [cid for cid, _ in sessions], "protocols": protocols}
    return event
