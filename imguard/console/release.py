"""The quarantine's release workflow, and the analysis download as an encrypted zip.

A release request is one small state machine (`State`, `Step`, `TRANSITIONS`: every allowed (state, step) in one
table, as h11's `_state.py`), and its only store is the quarantine's chained ledger (imguard/quarantine.py
`record_step`): each step is a ledger line (`op` = the step's name, `extra` = the request id, who, the receivers),
so the workflow is as tamper-evident as the files and `imguard archive verify` checks it with the rest. The
requests are the ledger replayed through the table; a line the table refuses is not applied.

    (none)      --release_request-->  REQUESTED     the blocked person asked (the page the notice names)
    REQUESTED   --release_approve-->  APPROVED      an analyst approved, with a reason
    APPROVED    --release_approve-->  APPROVED      a second, different analyst approved (four eyes)
    APPROVED    --release-->          RELEASED      enough analysts approved: a one-time link is issued
    REQUESTED/APPROVED --release_refuse--> REFUSED  an analyst refused, with a reason
    RELEASED    --release_download--> DOWNLOADED   the receiver used the link; it works no more

A file blocked as malware (a rule whose id names malware, a YARA match tagged malware/malicious or with meta
category malware, an antivirus engine's detection) needs `FOUR_EYES` distinct analysts; any other, one. The link
is 32 random bytes; the ledger keeps only its SHA-256, so reading the ledger does not give the file away.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Callable, Iterator

from imguard.console.data import bare
from imguard.quarantine import QuarantineStore
from imguard.releases import Handoff, Outbox

logger = logging.getLogger("imguard.console")

ZIP_PASSWORD = b"infected"          # the field's usual password for samples
FOUR_EYES = 2                       # distinct analysts who must approve the release of malware


class State(enum.Enum):
    REQUESTED = "requested"
    APPROVED = "approved"           # approved by fewer analysts than the file needs
    RELEASED = "released"           # a one-time link exists
    DOWNLOADED = "downloaded"       # the link was used
    REFUSED = "refused"


class Step(enum.Enum):
    REQUEST = "release_request"
    APPROVE = "release_approve"
    REFUSE = "release_refuse"
    RELEASE = "release"
    DOWNLOAD = "release_download"


TRANSITIONS: dict[tuple[State | None, Step], State] = {
    (None, Step.REQUEST): State.REQUESTED,
    (State.REQUESTED, Step.APPROVE): State.APPROVED,
    (State.REQUESTED, Step.REFUSE): State.REFUSED,
    (State.APPROVED, Step.APPROVE): State.APPROVED,
    (State.APPROVED, Step.REFUSE): State.REFUSED,
    (State.APPROVED, Step.RELEASE): State.RELEASED,
    (State.RELEASED, Step.DOWNLOAD): State.DOWNLOADED,
}
OPEN = (State.REQUESTED, State.APPROVED)


class ReleaseError(ValueError):
    """A step the workflow refuses; the message says why (shown to the analyst)."""


@dataclass
class Request:
    id: int                         # the ledger seq of its request line
    sha256: str
    requester: str
    why: str
    time: str
    malware: bool
    receivers: list[str]
    state: State = State.REQUESTED
    approvals: list[tuple[str, str, str]] = field(default_factory=list)     # (analyst, reason, time)
    refusal: tuple[str, str, str] | None = None
    link_hash: str = ""
    expires: str = ""
    downloaded: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)             # the ledger lines, in order

    @property
    def needed(self) -> int:
        return FOUR_EYES if self.malware else 1


def is_malware(sidecar: dict[str, Any]) -> bool:
    """Was the file blocked as malware: a rule of the malware category, or a finding that says malware."""
    for sighting in sidecar.get("sightings") or []:
        for m in (sighting.get("decision") or {}).get("matches") or []:
            if "malware" in str(m.get("rule_id", "")).lower():
                return True
    return any(_malware_finding(f) for f in _findings(sidecar.get("report") or {}))


def _findings(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from report.get("findings") or []
    for member in report.get("members") or []:
        if isinstance(member, dict):
            yield from _findings(member)


def _malware_finding(finding: dict[str, Any]) -> bool:
    if finding.get("kind") == "engine":
        return True
    if finding.get("kind") != "yara":
        return False
    data = finding.get("data") or {}
    tags = {str(t).lower() for t in data.get("tags") or []}
    meta = data.get("meta") or {}
    return bool(tags & {"malware", "malicious"}) or str(meta.get("category", "")).lower() == "malware"


def parties(sidecar: dict[str, Any], person: str) -> list[str] | None:
    """The receivers a release for `person` goes to (the recipients of what they sent, or themselves when they were
    the recipient); None when `person` was no party to any sighting of the file."""
    who = bare(person.strip()).lower()
    receivers: list[str] = []
    party = False
    for sighting in sidecar.get("sightings") or []:
        ctx = sighting.get("context") or {}
        recipients = [bare(str(r)) for r in ctx.get("recipients") or []]
        if bare(str(ctx.get("sender") or "")).lower() == who:
            party = True
            receivers += recipients
        elif who in (r.lower() for r in recipients):
            party = True
            receivers.append(bare(person.strip()))
    return sorted(set(receivers)) if party else None


class Releases:
    """The requests of one quarantine, read from and written to its ledger. One console process per data folder
    writes them (the lock makes a check and its step one act within the process)."""

    def __init__(self, store: QuarantineStore, link_seconds: float, clock: Callable[[], float] = time.time,
                 outbox: Outbox | None = None):
        self.store, self.link_seconds, self.clock = store, link_seconds, clock
        self.outbox = outbox        # where a released link is handed to the gateways (imguard/releases.py)
        self._lock = threading.Lock()

    def requests(self, sha256: str = "") -> list[Request]:
        found: dict[int, Request] = {}
        for entry in self.store.ledger_entries():
            try:
                step = Step(entry.get("op"))
            except ValueError:
                continue            # put, remove
            extra = entry.get("extra") or {}
            if step is Step.REQUEST:
                found[entry["seq"]] = Request(entry["seq"], entry["sha256"], str(extra.get("actor", "")),
                                              entry.get("reason", ""), entry.get("time", ""),
                                              bool(extra.get("malware")), list(extra.get("receivers") or []),
                                              history=[entry])
                continue
            request = found.get(extra.get("request"))
            if request is None or (request.state, step) not in TRANSITIONS:
                continue
            request.state = TRANSITIONS[(request.state, step)]
            request.history.append(entry)
            actor, reason, when = str(extra.get("actor", "")), entry.get("reason", ""), entry.get("time", "")
            if step is Step.APPROVE:
                request.approvals.append((actor, reason, when))
            elif step is Step.REFUSE:
                request.refusal = (actor, reason, when)
            elif step is Step.RELEASE:
                request.link_hash, request.expires = str(extra.get("link", "")), str(extra.get("expires", ""))
            elif step is Step.DOWNLOAD:
                request.downloaded = when
        result = [r for r in found.values() if not sha256 or r.sha256 == sha256]
        return sorted(result, key=lambda r: r.id, reverse=True)

    def get(self, request_id: int) -> Request | None:
        return next((r for r in self.requests() if r.id == request_id), None)

    def ask(self, sha256: str, requester: str, why: str) -> Request:
        """The blocked person's request. Refused (ReleaseError) when the file is not in quarantine, `requester`
        was no party to it, or they already have an open request for it."""
        why = why.strip()
        if not why:
            raise ReleaseError("say why you need the file")
        sidecar = self.store.show(sha256) if len(sha256) == 64 else None
        receivers = parties(sidecar, requester) if sidecar else None
        if receivers is None:
            raise ReleaseError("no such file was blocked for you")
        with self._lock:
            if any(r.requester.lower() == bare(requester.strip()).lower() and r.state in OPEN
                   for r in self.requests(sha256)):
                raise ReleaseError("you have already asked for this file; an analyst will decide")
            entry = self.store.record_step(Step.REQUEST.value, sha256, why,
                                           actor=bare(requester.strip()), malware=is_malware(sidecar),
                                           receivers=receivers)
        return self.get(entry["seq"])

    def approve(self, request_id: int, analyst: str, reason: str, link_base: str = "") -> tuple[Request, str]:
        """An analyst's approval; returns the request and, when it is now released, the one-time link's token
        (shown once; only its hash is kept). With `link_base` (the console's public URL) and an outbox, the link
        `link_base/released/<token>` is also handed to the gateways, which send it into the receivers' chat."""
        reason = reason.strip()
        if not reason:
            raise ReleaseError("an approval needs a reason")
        with self._lock:
            request = self._open(request_id, Step.APPROVE)
            if any(a == analyst for a, _, _ in request.approvals):
                raise ReleaseError("you have approved this already: a file blocked as malware needs a second "
                                   "analyst")
            self.store.record_step(Step.APPROVE.value, request.sha256, reason, request=request.id, actor=analyst)
            token = ""
            if len(request.approvals) + 1 >= request.needed:
                token = secrets.token_urlsafe(32)
                expires = datetime.fromtimestamp(self.clock() + self.link_seconds, UTC)
                self.store.record_step(Step.RELEASE.value, request.sha256, "approved by " + ", ".join(
                    [a for a, _, _ in request.approvals] + [analyst]), request=request.id, actor=analyst,
                    link=link_hash(token), expires=expires.isoformat(timespec="seconds"),
                    receivers=request.receivers)
                if self.outbox is not None and link_base:
                    self._hand_off(request, token, expires, link_base)
        return self.get(request_id), token

    def _hand_off(self, request: Request, token: str, expires: datetime, link_base: str) -> None:
        """Post the released link to the outbox; a folder that refuses is logged (the analyst still has the link)."""
        sidecar = self.store.show(request.sha256) or {}
        handoff = Handoff(request.id, request.sha256, str((sidecar.get("report") or {}).get("name") or ""),
                          tuple(request.receivers), f"{link_base.rstrip('/')}/released/{token}",
                          expires.isoformat(timespec="seconds"),
                          datetime.fromtimestamp(self.clock(), UTC).isoformat(timespec="seconds"))
        try:
            self.outbox.post(handoff)
        except OSError as e:
            logger.error("release %d: the link could not be handed to the gateways (%s): pass it on yourself",
                         request.id, e)

    def refuse(self, request_id: int, analyst: str, reason: str) -> Request:
        reason = reason.strip()
        if not reason:
            raise ReleaseError("a refusal needs a reason")
        with self._lock:
            request = self._open(request_id, Step.REFUSE)
            self.store.record_step(Step.REFUSE.value, request.sha256, reason, request=request.id, actor=analyst)
        return self.get(request_id)

    def redeem(self, token: str, who: str) -> tuple[Request, bytes] | None:
        """The file of a released request whose link `token` is, once: the download is recorded and the link is
        spent. None for an unknown, spent or expired link."""
        wanted = link_hash(token)
        with self._lock:
            request = next((r for r in self.requests() if r.link_hash and
                            secrets.compare_digest(r.link_hash, wanted)), None)
            if request is None or request.state is not State.RELEASED or _expired(request.expires, self.clock()):
                return None
            try:
                content = self.store.read(request.sha256)
            except FileNotFoundError:
                return None
            self.store.record_step(Step.DOWNLOAD.value, request.sha256, "one-time link used", request=request.id,
                                   actor=who)
        return self.get(request.id), content

    def _open(self, request_id: int, step: Step) -> Request:
        request = self.get(request_id)
        if request is None:
            raise ReleaseError("no such request")
        if (request.state, step) not in TRANSITIONS:
            raise ReleaseError(f"this request is {request.state.value}: it cannot be decided again")
        return request


def link_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _expired(expires: str, now: float) -> bool:
    try:
        return datetime.fromisoformat(expires).timestamp() < now
    except ValueError:
        return True


def analysis_zip(content: bytes, sha256: str) -> bytes:
    """`content` in a zip encrypted with AES-256 (WinZip AE-2, pyzipper) under the password `infected`, the member
    named by its SHA-256 (the name from the wire is hostile; no extension, so nothing opens it by a double click)."""
    import pyzipper

    out = io.BytesIO()
    with pyzipper.AESZipFile(out, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as archive:
        archive.setpassword(ZIP_PASSWORD)
        archive.setencryption(pyzipper.WZ_AES, nbits=256)
        archive.writestr(sha256, content)
    return out.getvalue()
