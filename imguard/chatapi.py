"""Chat over HTTP: the carrier of the chat-API decoders (imguard/protocols/httpchat), one for the inline gateway and
the offline replay.

The decoders are pure (a body in, events out); what to do with the events is state and decisions: which calls are
held, the token -> user table, stored uploads and upload slots, blocked references, who shared which file, the
verdicts of delivered messages, the notice in place of a blocked delivered message, the WebSocket state. That is
this module, written once and without mitmproxy. It takes plain HTTP: an `HttpRequest` (httpchat/events.py), a
response's status, headers and whole body, a WebSocket message's bytes, and a `ChatContext` carrying the
connection's addresses and id (`base`); it answers with what to do:

    call, fate = chat.request_headers(req, base)       # None: not a chat call; fate: Fate or Respond
    outcome = yield from chat.request_body(call, body)     # None (forward as is), Rewrite(body), Respond(...)
    fate = chat.response_headers(call, status, headers)    # HOLD, COLLECT, STREAM, KILL or None
    outcome = yield from chat.response_body(call, status, headers, body)   # after HOLD
    chat.response_learned(call, status, body)               # after COLLECT (what a login or upload answer teaches)
    sock = chat.socket(req, base); chat.handshake(sock)     # a WebSocket upgrade: its state, or a Respond
    outcome = yield from chat.server_message(sock, data)    # Forward / Drop / Rewrite (to the client)
    outcome = chat.client_message(sock, data)               # Forward / Rewrite / Drop(reply)

The steps that need a file scanned or slow work done are generators (mitmproxy's layers yield commands the same
way): they yield `Inspect(data, ctx, name, mime)`, answered with (FileReport, Decision), and `Offload(fn)`, answered
with fn()'s result (or its exception thrown in). The gateway (gateway/chat_apis.py) answers Inspect from its worker
pool (Inspection.check) and runs Offload in a thread; the replay (replay/http.py) turns Inspect into the
InspectFile command every replayed file goes through and runs Offload at once. Decisions are recorded where they
are made (pipeline.check_message, the anomaly and message events below), so the alert log of a replay is the
gateway's. The full account of each hook's behaviour is gateway/chat_apis.py's docstring.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from types import ModuleType
from typing import Any, Callable, Generator

from imguard import alerts
from imguard.files.expected import ExpectedTransfers, normalize_url
from imguard.model import ALERT, ALLOW, BLOCK, FROM_CLIENT, FROM_SERVER, MASK, REASON_TOO_LARGE, ChatContext, Decision
from imguard.protocols import httpchat
from imguard.protocols.httpchat import bodies, tenants
from imguard.protocols.httpchat.common import WsCodec
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, LEARN, MESSAGE, UPLOAD, ChatMessage, DeliveredMessage,
                                               EncryptedContent, Endpoint, FileUpload, HttpRequest, Identity,
                                               MalformedRequest, SharedMedia, StoredMedia, UploadSlot)
from imguard.policy.walls import Rooms, decide_room, learn_members
from imguard.settings import MiB, setting

logger = logging.getLogger("imguard.chatapi")

SLOT = "chat_upload_slot"           # ExpectedTransfers kinds
MEDIA = "chat_media"
# EncryptedContent.scheme -> ChatContext.encryption (model.ENCRYPTION_SCHEMES): a room event sent encrypted is
# Megolm (Olm only carries to-device messages); an EncryptedFile in a message sent in clear is its own case.
_POLICY_SCHEME = {"m.room.encrypted": "megolm", "EncryptedFile": "matrix-attachment"}
RESPONSE_KEEP = 256 * 1024          # bytes of a learning response kept (login, upload results are small)
WALL_CALLS = ("join", "invite")     # Matrix membership requests the walls decide (httpchat/matrix.py membership_call)
WS_INLINE_MAX = 64 * 1024           # a larger server WebSocket message (or any on a compressed stream) is read and
                                    # re-encoded off the event loop (Offload)


@dataclass(frozen=True)
class ChatApiSettings:
    """Chat APIs over HTTP(S): Matrix, Slack, Mattermost, Rocket.Chat, Discord"""

    routes: list = setting(
        list(httpchat.DEFAULT_ROUTES),
        "Which requests are chat API calls: API=[HOST]/PATH_PREFIX, API one of matrix, slack, mattermost, "
        "rocketchat, discord, rvp, teams. Without HOST a prefix matches on any host, so a self-hosted server on any "
        "name is covered; with HOST (or *.domain) only there. Giving this option replaces the defaults. Within a "
        "prefix only the API's known message and upload endpoints are held; other calls are relayed untouched")
    max_upload_size: int = setting(
        64 * MiB, "Largest chat API upload (media, files, a message with attachments) buffered and scanned; "
                  "a larger one is not scanned: policy decides on it as unscannable (too_large), and the "
                  "bundled policy blocks it with 413. Never passed silently")
    max_message_size: int = setting(
        1 * MiB, "Largest chat message request body read (JSON or form); a larger one is refused with 413 in the "
                 "API's error shape (chat servers cap events far lower: Matrix at 64 KiB)")
    max_json_depth: int = setting(
        64, "Deepest JSON nesting read in a chat API body; deeper is refused with 400 before parsing (hostile "
            "nesting would otherwise cost recursion)")
    max_multipart_parts: int = setting(
        100, "Most parts in one multipart chat upload; more is refused with 400")
    max_identities: int = setting(
        100_000, "Access tokens whose user id is remembered (learned from login and whoami responses); the "
                 "oldest is forgotten first, and a message with an unknown token is attributed to the token's hash")
    max_delivery_size: int = setting(
        64 * MiB, "Largest response that delivers messages (Matrix /sync, /messages, /context, /event; Slack "
                  "conversations.history/replies; Mattermost channel posts and threads; Rocket.Chat history; "
                  "Discord channel messages) held to decide them; a larger one is cut off (the client retries) and "
                  "an anomaly recorded: its messages are never passed undecided. Also the largest server "
                  "WebSocket message of a chat socket, after decompression (Discord's zlib stream): a larger one "
                  "is dropped with an anomaly")
    max_shared_media: int = setting(
        100_000, "File references (mxc://, slack:F.., mattermost:.., rocketchat:.., discord:..) whose sender, room "
                 "and name (and the user they were shown to) are remembered from the responses that delivered "
                 "them, to name both parties when the file is downloaded; also the number of delivered-message "
                 "verdicts remembered. Oldest forgotten first")
    max_room_members: int = setting(
        100_000, "Matrix room members remembered, over all rooms, from the /sync responses of the users behind the "
                 "gateway, for the ethical walls (a join, a room message decided against the room's members); past "
                 "it a member is not recorded (an anomaly) and the walls decide on the members known")
    slack_hosts: list = setting(
        ["slack.com", "*.slack.com"],
        "Hosts whose answers to auth.test / rtm.connect may name a Slack team (the tenant of the token), each a "
        "name or *.domain (any name under it); the host must also be the one the connection's TLS names (the "
        "client's SNI or a name of the verified upstream certificate). An answer from another host teaches no "
        "team, and a learned team names the tenant only of calls to these hosts: elsewhere the tenant is unknown "
        "(a tenant_untrusted_host anomaly)")
    slack_plain_http: bool = setting(
        False, "Let a slack_hosts host reached over plain HTTP (nothing but the Host header names it) teach and use "
               "a Slack team: for labs and tests only")
    websocket: bool = setting(
        True, "Inspect chat over WebSockets: Rocket.Chat DDP sendMessage/updateMessage from the client, and the "
              "messages the server pushes to it on Slack (RTM, Socket Mode), Mattermost (/api/v4/websocket), "
              "Rocket.Chat (stream-room-messages) and Discord (the gateway, zlib-stream included)")


# --- what a step asks its driver, and what it answers -----------------------------------------------------------

@dataclass(frozen=True)
class Inspect:
    """Scan these bytes (Pipeline.check_file: recorded, quarantined); the driver sends back (FileReport, Decision)."""
    data: bytes
    context: ChatContext
    name: str
    mime: str


@dataclass(frozen=True)
class Offload:
    """Run fn() (pure, may run in a worker thread); the driver sends back its result, or throws its exception in."""
    fn: Callable[[], Any]


@dataclass(frozen=True)
class Respond:
    """Answer the client with this instead of what it asked for: nothing crosses (the API's own error JSON)."""
    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass(frozen=True)
class Rewrite:
    """Send this body (or WebSocket message) in place of the one that came."""
    body: bytes


@dataclass(frozen=True)
class Drop:
    """A WebSocket message that does not cross; `reply` (if any) goes back to its sender instead."""
    reply: bytes | None = None


class Fate(Enum):
    """What becomes of a body the carrier has not seen yet."""
    BUFFER = "buffer"       # a request: read whole before anything crosses (then request_body)
    HOLD = "hold"           # a response: held whole for its verdict (then response_body)
    COLLECT = "collect"     # a response: crosses as it comes, its first RESPONSE_KEEP bytes kept (response_learned)
    STREAM = "stream"       # crosses as it comes, undecided: too large to scan, and policy allows that
    KILL = "kill"           # the connection is cut: the client gets no byte of it


Step = Generator[Inspect | Offload, Any, Any]


@dataclass
class ChatCall:
    """One HTTP exchange the carrier holds: which API and endpoint, the request, what has been done with it."""
    api: ModuleType
    ep: Endpoint
    base: ChatContext                   # the connection's addresses and id (refreshed by the carrier per step)
    slot: UploadSlot | None = None
    done: bool = False                  # the request was decided (or needed no decision)
    answered: bool = False              # the carrier answered it itself
    held: bool = False                  # the response is held for response_body
    request: HttpRequest | None = None
    kept: bytearray = field(default_factory=bytearray)     # a learning response's first bytes (COLLECT)
    tenant: str = ""                    # the workspace, instance or tenant it goes to (httpchat/tenants.py)
    upstream: tenants.Upstream = tenants.NO_UPSTREAM    # what the connection vouches for (a Slack team's source)

    @property
    def tenant_base(self) -> ChatContext:
        return self.base.with_(tenant=self.tenant) if self.tenant else self.base

    def keep(self, chunk: bytes) -> bytes:
        if len(self.kept) < RESPONSE_KEEP:
            self.kept.extend(chunk[:RESPONSE_KEEP - len(self.kept)])
        return chunk


class SocketState(Enum):
    INSPECTED = "inspected"     # every server message read and decided
    UNREADABLE = "unreadable"   # its encoding cannot be read (zstd-stream): fail mode open, relayed uninspected
    BROKEN = "broken"           # its compressed stream could not be inflated: nothing more reaches the client


@dataclass
class ChatSocket:
    """A WebSocket's chat state: which API (None: not a chat socket), whose it is, how its server messages are read
    (the codec: plain JSON, Discord's zlib stream with its inflater and imguard's deflater)."""
    api: ModuleType | None
    base: ChatContext = field(default_factory=ChatContext)
    credential: str = ""        # the handshake's or a client message's credential key (Rocket.Chat: rc_uid)
    user: str = ""              # the socket's user, once a server message named it
    codec: WsCodec | None = None
    state: SocketState = SocketState.INSPECTED
    reason: str = ""
    tenant: str = ""            # the workspace, instance or tenant of its handshake (httpchat/tenants.py)

    @property
    def tenant_base(self) -> ChatContext:
        return self.base.with_(tenant=self.tenant) if self.tenant else self.base


class Unscannable:
    """A file not inspected, decided by policy (Pipeline.check_unscannable); the gateway's Inspection adds its fail
    modes to the same call."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def unscannable(self, data, ctx, name, claimed_mime, reason, detail, size=None, situation=""):
        return self.pipeline.check_unscannable(data, ctx, name, claimed_mime, reason, detail, size=size)


def _remember(table: OrderedDict, key: Any, value: Any, limit: int) -> None:
    """`key` -> `value` as the newest entry of a bounded table: past `limit` entries the oldest is forgotten."""
    table.pop(key, None)
    table[key] = value
    while len(table) > max(1, limit):
        table.popitem(last=False)


class ChatApiCarrier:
    """The chat-API state and decisions of one gateway process or one replay (see the module docstring)."""

    def __init__(self, pipeline, inspection: Any = None, transfers: Any = None,
                 settings: ChatApiSettings | None = None, record: Any = None, commit: Any = None,
                 parse_fail_open: Callable[[], bool] | None = None):
        # The fail mode (protocol "http", situation parse) of a WebSocket message imguard cannot read: closed (the
        # default) drops it, open relays it; both record an anomaly.
        self.parse_fail_open = parse_fail_open or (lambda: False)
        self.settings = settings if settings is not None else ChatApiSettings()
        self.routes = httpchat.Routes.parse(self.settings.routes)      # ValueError names a bad route
        self.limits = httpchat.DecodeLimits(self.settings.max_json_depth, self.settings.max_multipart_parts)
        self.pipeline = pipeline
        # unscannable(...): the gateway's Inspection (its fail modes), else policy alone
        self.inspection = inspection if inspection is not None else Unscannable(pipeline)
        # Upload slots and blocked references live in the shared table (so XMPP and chat APIs see the same
        # blocked URLs); a carrier without one gets a private table.
        self.transfers = transfers if transfers is not None else ExpectedTransfers()
        self.record = record if record is not None else pipeline.record
        # Archive records on disk before a request goes on: the gateway addon's commit (it logs and counts a
        # disk that refuses), else the pipeline's own.
        self.commit = commit if commit is not None else (getattr(pipeline, "commit", None) or (lambda: None))
        self.identities: OrderedDict[str, str] = OrderedDict()
        self.tenants: OrderedDict[str, str] = OrderedDict()      # credential key -> tenant its response named (Slack)
        self.slot_tenants: OrderedDict[str, str] = OrderedDict()  # upload slot URL -> the tenant that opened it
        # (connection, host, upstream) tenant_mismatch, ("untrusted", connection, host) tenant_untrusted_host told
        self.mismatches: OrderedDict[tuple, bool] = OrderedDict()
        self.shared: OrderedDict[str, SharedMedia] = OrderedDict()          # file ref -> who shared it (responses)
        self.shared_with: OrderedDict[str, str] = OrderedDict()             # file ref -> who it was last shown to
        # (api, user, message id, hash of its text and refs) -> notice, mask replacements, or "" (passed)
        self.delivered: OrderedDict[tuple, str | list] = OrderedDict()
        self.rooms = Rooms(self.settings.max_room_members)      # Matrix rooms' members, for the walls (_walls_*)
        self.stats = {"messages": 0, "files": 0, "blocked": 0, "masked": 0, "encrypted": 0, "malformed": 0,
                      "websocket": 0, "inbound_messages": 0, "inbound_files": 0, "inbound_blocked": 0}

    # --- helpers ------------------------------------------------------------------------------------------

    def user(self, key: str) -> str:
        return self.identities.get(key, key)

    def learn_identity(self, key: str, user: str) -> None:
        _remember(self.identities, key, user, self.settings.max_identities)

    def tenant(self, api: ModuleType, req: HttpRequest, slot_url: str = "", base: ChatContext | None = None,
               upstream: tenants.Upstream = tenants.NO_UPSTREAM) -> str:
        """The workspace, instance or tenant a call goes to (httpchat/tenants.py): what a response taught about its
        credential (Slack's own word on the token's team), else what the request names, its host checked against
        the connection's `upstream` (SNI, certificate names: a Host they do not vouch for is a tenant_mismatch
        anomaly, once per connection and host, and the tenant is unknown); an upload to a learned slot: the tenant
        that opened it."""
        if slot_url:
            return self.slot_tenants.get(slot_url, "")
        learned = self._learned_tenant(api, api.requester(req), req, base, upstream)
        if learned:
            return learned
        found = tenants.resolve(api.API, req, upstream)
        key = ((base or ChatContext()).connection_id, found.host, upstream)
        if found.mismatch and key not in self.mismatches:
            self._remember(self.mismatches, key, True)
            ctx = self._context(base or ChatContext(), api.API, "tenant", "", "", self.user)
            self._anomaly(ctx, "tenant_mismatch", found.mismatch, severity="medium", host=found.host,
                          sni=upstream.sni, certificate_names=list(upstream.cert_names))
        return found.name

    def _learned_tenant(self, api: ModuleType, key: str, req: HttpRequest, base: ChatContext | None,
                        upstream: tenants.Upstream) -> str:
        """The team a response taught for credential `key`, when the call goes to a host that may use it
        (tenants.team_source); else "" with a tenant_untrusted_host anomaly."""
        team = self.tenants.get(key, "") if key else ""
        if team and self._untrusted_host(api, req, base, upstream, team):
            return ""
        return team

    def _untrusted_host(self, api: ModuleType, req: HttpRequest, base: ChatContext | None,
                        upstream: tenants.Upstream, team: str) -> bool:
        """Whether `req`'s host may not name or use a Slack team (tenants.team_source): then a tenant_untrusted_host
        anomaly, once per connection and host."""
        host = tenants.host_of(req)
        why = tenants.team_source(host, upstream, self.settings.slack_hosts, self.settings.slack_plain_http)
        if not why:
            return False
        key = ("untrusted", (base or ChatContext()).connection_id, host)
        if key not in self.mismatches:
            self._remember(self.mismatches, key, True)
            ctx = self._context(base or ChatContext(), api.API, "tenant", "", "", self.user)
            self._anomaly(ctx, "tenant_untrusted_host", f"a Slack team ({team}) from or for a host imguard does not "
                          f"trust: {why}; the tenant is unknown", severity="medium", host=host, team=team,
                          sni=upstream.sni, certificate_names=list(upstream.cert_names))
        return True

    def _remember(self, table: OrderedDict, key: Any, value: Any) -> None:
        _remember(table, key, value, self.settings.max_shared_media)

    @staticmethod
    def _refuse(call: ChatCall | None, api: str, status: int, reason: str) -> Respond:
        if call is not None:
            call.answered = True
        return Respond(status, httpchat.error_body(api, status, reason))

    def _anomaly(self, ctx: ChatContext, kind: str, detail: str, **data: Any) -> None:
        try:
            self.record(alerts.anomaly_event(ctx, kind, detail, **data))
        except Exception:
            logger.exception("could not record an anomaly")

    def _blocked(self, ref: str) -> str | None:
        try:
            return self.transfers.blocked_url_reason(ref) if ref else None
        except Exception:
            logger.exception("blocked_url_reason failed")
            return None

    def _mark_blocked(self, ref: str, reason: str) -> None:
        if ref:
            try:
                self.transfers.mark_blocked_url(ref, reason)
            except Exception:
                logger.exception("mark_blocked_url failed")

    @staticmethod
    def _context(base: ChatContext, api: str, endpoint: str, sender: str, room: str, user: Callable[[str], str],
                 recipient: str | None = None) -> ChatContext:
        """What the client sends (recipient None: to the room), or with `recipient` (the user behind the gateway,
        "" when not known) what the server delivers to it: origin FROM_SERVER."""
        origin = FROM_CLIENT if recipient is None else FROM_SERVER
        ctx = base.with_(protocol=api, transfer_mechanism=f"{api}:{endpoint}", origin=origin)
        if recipient is not None:
            return ctx.with_(sender=sender, recipients=(recipient,) if recipient else (), conversation=room)
        return ctx.with_(sender=user(sender), recipients=(room,) if room else (), conversation=room)

    def context(self, call: ChatCall, endpoint: str, sender: str, room: str,
                recipient: str | None = None) -> ChatContext:
        return self._context(call.tenant_base, call.api.API, endpoint, sender, room, self.user, recipient)

    def _too_large(self, ctx: ChatContext, name: str, mime: str, size: int) -> tuple[bool, Decision]:
        """Policy's decision on a file over max_upload_size, not scanned (UNSCANNABLE "too_large"): (passes, decision).
        It passes only when policy explicitly allows or merely alerts."""
        limit = self.settings.max_upload_size
        _, decision = self.inspection.unscannable(
            b"", ctx, name, mime, REASON_TOO_LARGE,
            f"the upload ({size} bytes) is larger than chat max_upload_size ({limit})", size=size)
        return decision.action in (ALLOW, ALERT), decision

    # --- requests -----------------------------------------------------------------------------------------

    def request_headers(self, req: HttpRequest, base: ChatContext, urls: tuple[str, ...] = (),
                        content_length: int | None = None, upstream: tenants.Upstream = tenants.NO_UPSTREAM
                        ) -> tuple[ChatCall | None, Fate | Respond | None]:
        """A request's head (req.body empty; `urls` the URLs it was sent to, to find an upload slot; `upstream` what
        the connection vouches for, for the tenant): (None, None)
        when it is not a chat call; else its ChatCall and BUFFER (read the body whole, then request_body), a Respond
        (answered: a download of a blocked file, a body over its limit), STREAM (too large to scan and policy allows
        it) or None (nothing to read: a download or GET history, whose response response_headers will hold)."""
        method = req.method.upper()
        api = ep = slot = None
        if method in ("PUT", "POST"):
            for url in dict.fromkeys(urls):
                found = self.transfers.take(normalize_url(url), kind=SLOT)
                if found is not None:
                    api_name, slot = found
                    api = httpchat.APIS[api_name]
                    ep = api.upload_endpoint()
                    break
        if ep is None:
            for candidate in self.routes.match(req.host, req.path):
                ep = candidate.classify(method, req.path)
                if ep is not None:
                    api = candidate
                    break
        if ep is None and (found := self._walls_call(method, req)) is not None:
            api, ep = found
        if ep is None:
            return None, None
        if ep.kind == DOWNLOAD:
            reason = self._blocked(ep.ref)
            if reason:
                return None, self._refuse(None, api.API, 403, f"imguard: this file was blocked ({reason})")
        tenant = self.tenant(api, req, normalize_url(slot.url) if slot is not None else "", base, upstream)
        if ep.kind == DOWNLOAD or ep.kind == DELIVER and method == "GET":
            # nothing to read in the request: its response is held (response_headers)
            return ChatCall(api, ep, base, done=True, request=req, tenant=tenant, upstream=upstream), None
        call = ChatCall(api, ep, base, slot=slot, request=req, tenant=tenant, upstream=upstream)
        if ep.kind == LEARN and method == "GET":
            return call, None
        # a POSTed history call (Slack): its arguments (the channel) are read as a message's, then the response
        # is held
        if content_length is not None:
            over = self._check_size(call, req, content_length)
            if over is not None:
                return call, over
        return call, Fate.BUFFER

    def _check_size(self, call: ChatCall, req: HttpRequest, size: int) -> Respond | Fate | None:
        """None when the request is within its limit; else it is answered (Respond), or passed (STREAM) when policy
        allows an upload too large to scan."""
        api, ep = call.api, call.ep
        if ep.kind == UPLOAD:
            if size <= self.settings.max_upload_size:
                return None
            call.done = True
            slot = call.slot
            ctx = self.context(call, ep.name, slot.sender if slot else httpchat.common.bearer(req),
                               slot.room if slot else "")
            name = dict(req.query).get("filename") or req.path.rsplit("/", 1)[-1]
            passes, _ = self._too_large(ctx, name, req.header("content-type"), size)
            if passes:
                logger.warning("%s upload (%d bytes) too large to scan; policy allows it unscanned", api.API, size)
                return Fate.STREAM
            reason = f"upload larger than {self.settings.max_upload_size} bytes"
            self._mark_blocked(ep.ref or (slot.ref if slot else ""), reason)
            self.stats["blocked"] += 1
            return self._refuse(call, api.API, 413, f"imguard: {reason}")
        if size <= self.settings.max_message_size:
            return None
        call.done = True
        self.stats["malformed"] += 1
        ctx = self.context(call, ep.name, "", "")
        self._anomaly(ctx, "chat_request_too_large", f"a {api.API} {ep.name} request of {size} bytes (more than "
                      f"max_message_size {self.settings.max_message_size}) was refused unread", size=size)
        return self._refuse(call, api.API, 413, f"imguard: request larger than {self.settings.max_message_size} bytes")

    def request_body(self, call: ChatCall, req: HttpRequest | None, problem: str = "") -> Step:
        """The whole body (req.body, Content-Encoding undone; `problem`: why it could not be decoded): None (forward
        as it came), Rewrite(body) (masked) or Respond. A generator: yields Inspect for each file."""
        call.done = True
        api, ep = call.api, call.ep
        if req is None:
            return self._malformed(call, MalformedRequest(api.API, ep.name, 400, f"the body cannot be decoded: "
                                                          f"{problem}"))
        over = self._check_size(call, req, len(req.body))        # chunked, or a compressed body that grew
        if over is not None:
            return None if over is Fate.STREAM else over
        call.request = req
        if ep.kind in (LEARN, DELIVER):
            return None
        if ep.name in WALL_CALLS:
            return self._walls_membership(call, req)
        try:
            found = api.decode(ep, req, self.limits)
        except Exception as e:          # a decoder bug must not pass the request uninspected
            logger.exception("%s decoder failed on %s", api.API, ep.name)
            return self._malformed(call, MalformedRequest(api.API, ep.name, 400,
                                                          f"imguard could not read the request: {e!r}"))
        for event in found:
            if isinstance(event, MalformedRequest):
                return self._malformed(call, event)
        for event in found:
            if isinstance(event, FileUpload):
                refused = yield from self._file(call, event)
                if refused is not None:
                    return refused
        for event in found:
            if isinstance(event, EncryptedContent):
                refused = self._encrypted(call, event)
                if refused is not None:
                    return refused
        replacements = []
        for event in found:         # a request that delivers a message to the client (RVP: a NOTIFY to its Call-Back)
            if isinstance(event, DeliveredMessage):
                verdict = self._delivered(call.tenant_base, api, event, event.message.room)
                if isinstance(verdict, str) and verdict:
                    return self._refuse(call, api.API, 403, verdict)
                replacements += verdict or []
        for event in found:
            if isinstance(event, ChatMessage):
                verdict = self._message(call, event)
                if isinstance(verdict, Respond):
                    return verdict
                replacements += verdict
        if not replacements:
            return None
        try:
            return Rewrite(bodies.rewrite(req.body, req.header("content-type"), replacements,
                                          self.limits.max_json_depth))
        except bodies.BodyError as e:       # cannot mask: never forward the unmasked text
            logger.error("%s %s: masking failed (%s); request refused", api.API, ep.name, e)
            return self._refuse(call, api.API, 403, "imguard: the message could not be masked and was blocked")

    def _malformed(self, call: ChatCall, event: MalformedRequest) -> Respond:
        self.stats["malformed"] += 1
        ctx = self.context(call, event.endpoint, "", "")
        self._anomaly(ctx, "chat_request_malformed", f"{event.api} {event.endpoint}: {event.reason}",
                      status=event.status)
        return self._refuse(call, event.api, event.status, f"imguard: malformed request: {event.reason}")

    def _file(self, call: ChatCall, event: FileUpload) -> Step:
        api, ep, slot = call.api, call.ep, call.slot
        self.stats["files"] += 1
        sender = event.sender or (slot.sender if slot else "")
        room = event.room or (slot.room if slot else "")
        ctx = self.context(call, ep.name, sender, room)
        name = event.name or (slot.name if slot else "")
        _report, decision = yield Inspect(event.data, ctx, name, event.mime)
        if not decision.blocked:
            return None
        reason = decision.refusal
        self.stats["blocked"] += 1
        self._mark_blocked(event.ref or (slot.ref if slot else ""), reason)
        logger.info("%s %s upload %r blocked: %s", api.API, ep.name, name, reason)
        return self._refuse(call, api.API, 403, f"imguard: upload blocked: {reason}")

    def _encrypted(self, call: ChatCall, event: EncryptedContent) -> Respond | None:
        self.stats["encrypted"] += 1
        ctx = self.context(call, event.endpoint, event.sender, event.room)
        ctx = ctx.with_(encryption=_POLICY_SCHEME.get(event.scheme, event.scheme))     # policy's `encrypted`
        self._anomaly(ctx, "e2e_encrypted", "end-to-end encrypted content: it cannot be inspected",
                      severity="info", scheme=event.scheme)
        walled = self._walls_room_message(call, ctx, event.room)       # ciphertext is kept from a walled room too
        if walled is not None:
            return walled
        for ref in event.refs:
            reason = self._blocked(ref)
            if reason:
                return self._refuse_message(call, ctx, "", reason)
        decision = self._check_message("", ctx)
        if decision.blocked:
            self.stats["blocked"] += 1
            return self._refuse(call, call.api.API, 403, decision.notice or
                                f"imguard: blocked ({decision.refusal})")
        return None

    def _check_message(self, text: str, ctx: ChatContext) -> Decision:
        """Pipeline.check_message, and its archive record on disk before the request or frame goes on."""
        decision = self.pipeline.check_message(text, ctx)
        self.commit()
        return decision

    def _shares_blocked_file(self, text: str, ctx: ChatContext, reason: str) -> Decision:
        """The decision on a message that shares a blocked file (made here, not by policy), recorded."""
        decision = Decision(action=BLOCK, notice=f"This message shares a file that was blocked: {reason}")
        ctx = self.pipeline.with_direction(ctx)         # as policy's decisions see it (topology, then zones)
        try:
            self.record(alerts.message_event(text, ctx, decision))
            archive = getattr(self.pipeline, "archive", None)      # the gateway's pipeline has one; a test's may not
            if archive is not None:
                archive.add_message(text if getattr(self.pipeline, "keep_text", True) else None, ctx, decision)
                self.commit()
        except Exception:
            logger.exception("could not record a blocked message")
        return decision

    def _refuse_message(self, call: ChatCall, ctx: ChatContext, text: str, reason: str) -> Respond:
        decision = self._shares_blocked_file(text, ctx, reason)
        self.stats["blocked"] += 1
        return self._refuse(call, call.api.API, 403, f"imguard: {decision.notice}")

    def _message(self, call: ChatCall, event: ChatMessage) -> list | Respond:
        """The replacements a mask needs ([] = forward as is), or the Respond refusing the message."""
        if not event.parts and not event.refs:
            return []
        self.stats["messages"] += 1
        ctx = self.context(call, event.endpoint, event.sender, event.room)
        walled = self._walls_room_message(call, ctx, event.room)
        if walled is not None:
            return walled
        for ref in event.refs:
            reason = self._blocked(ref)
            if reason:
                return self._refuse_message(call, ctx, event.text, reason)
        decision = self._check_message(event.text, ctx)
        if decision.blocked:
            self.stats["blocked"] += 1
            return self._refuse(call, call.api.API, 403, decision.notice or
                                f"imguard: message blocked ({decision.refusal})")
        if decision.action == MASK:
            self.stats["masked"] += 1
            return bodies.masked_replacements(event.parts, decision.masked_text or "")
        return []

    def request_failed(self, call: ChatCall, detail: str) -> None:
        """A chat call that died before its body was complete: an anomaly; nothing was forwarded."""
        if call.done:
            return
        call.done = True
        ctx = self.context(call, call.ep.name, "", "")
        self._anomaly(ctx, "chat_request_incomplete", f"a {call.api.API} {call.ep.name} request ended before its "
                      f"body was complete ({detail}); nothing was forwarded")

    # --- responses ----------------------------------------------------------------------------------------

    def response_headers(self, call: ChatCall, status: int, headers: dict[str, str]) -> Fate | None:
        """A response's head (`headers`: lower-case names): HOLD (read it whole, then response_body), COLLECT (a
        learning response: its first bytes kept, then response_learned), STREAM, KILL, or None (not the carrier's)."""
        if call.answered:
            return None
        if call.ep.kind in (DOWNLOAD, DELIVER):
            return self._hold_response(call, status, headers)
        if not call.ep.learn or not 200 <= status < 300:
            return None
        return Fate.COLLECT

    def _hold_response(self, call: ChatCall, status: int, headers: dict[str, str]) -> Fate:
        """A media download or /sync response: held whole for its verdict, unless it is over its limit."""
        api, ep = call.api, call.ep
        if not 200 <= status < 300:
            return Fate.STREAM          # an error JSON: nothing delivered
        length = headers.get("content-length", "")
        size = int(length) if length.isdigit() else -1
        if ep.kind == DOWNLOAD and size > self.settings.max_upload_size:
            ctx = self._download_context(call)
            passes, _ = self._too_large(ctx, self._download_name(call), headers.get("content-type", ""), size)
            if passes:
                logger.warning("%s %s (%d bytes) too large to scan; policy allows it unscanned", api.API,
                               ep.name, size)
                return Fate.STREAM
            self.stats["inbound_blocked"] += 1
            logger.info("%s %s of %s (%d bytes) too large to scan: stopped", api.API, ep.name, ep.ref, size)
            return Fate.KILL                    # the user gets no byte of a file too large to inspect
        if ep.kind == DELIVER and size > self.settings.max_delivery_size:
            return self._delivery_too_large(call, size)
        call.held = True
        return Fate.HOLD

    def response_body(self, call: ChatCall, status: int, headers: dict[str, str], body: bytes) -> Step:
        """A held response, whole (Content-Encoding undone): None (deliver it as it came), Rewrite(body), Respond
        (the API's error instead) or Fate.KILL. A generator: yields Inspect for a download."""
        call.held = False
        if call.ep.kind == DOWNLOAD:
            return (yield from self._download(call, headers, body))
        return self._deliver(call, status, body)

    def refuse_failed(self, call: ChatCall) -> Respond:
        """What the client gets when inspecting its response failed (a carrier's exception): fail closed."""
        return self._refuse(call, call.api.API, 502 if call.ep.kind == DELIVER else 403,
                            "imguard: the response could not be inspected and was refused")

    def response_learned(self, call: ChatCall, status: int, body: bytes) -> None:
        """What a response teaches (body: its first bytes, decoded): token -> user, stored media, upload slots."""
        api, ep = call.api, call.ep
        req = call.request or HttpRequest("GET", "", "/")
        try:
            learned = api.learn(ep, req, status, body)
            team = tenants.learned(api.API, ep.name, status, body)
        except Exception:
            logger.exception("%s: reading the %s response failed", api.API, ep.name)
            return
        if team and self._untrusted_host(api, req, call.base, call.upstream, team):
            team = ""                           # a host that is not Slack's names no team
        if team and api.requester(req):
            _remember(self.tenants, api.requester(req), team, self.settings.max_identities)
        for fact in learned:
            if isinstance(fact, Identity):
                self.learn_identity(fact.key, fact.user)
                if team and fact.key:           # rtm.connect: its socket's URL key belongs to the team too
                    _remember(self.tenants, fact.key, team, self.settings.max_identities)
            elif isinstance(fact, StoredMedia):
                self.transfers.expect(fact.ref, True, kind=MEDIA,
                                      ttl=self.transfers.settings.blocked_url_ttl_seconds)
            elif isinstance(fact, UploadSlot):
                self.transfers.expect(normalize_url(fact.url), (api.API, fact), kind=SLOT)
                if call.tenant:
                    self._remember(self.slot_tenants, normalize_url(fact.url), call.tenant)

    # --- inbound: what the server delivers to the user behind the gateway ---------------------------------

    def _delivery_too_large(self, call: ChatCall, size: int) -> Fate:
        api, ep = call.api, call.ep
        ctx = self.context(call, ep.name, "", "", recipient=self._downloader(call))
        self._anomaly(ctx, "chat_response_too_large", f"a {api.API} {ep.name} response of {size} bytes (more than "
                      f"max_delivery_size {self.settings.max_delivery_size}) was cut off undelivered", size=size)
        return Fate.KILL

    def _downloader(self, call: ChatCall) -> str:
        """The user behind the gateway who receives the response: whose credential asked; for a download without
        one (Discord's CDN serves signed URLs to anyone), the user a decided response last showed the file to."""
        key = call.api.requester(call.request)
        if key:
            return self.user(key)
        return self.shared_with.get(call.ep.ref, "") if call.ep.kind == DOWNLOAD else ""

    def _download_name(self, call: ChatCall) -> str:
        ep = call.ep
        shared = self.shared.get(ep.ref)
        if shared is not None and shared.name:
            return shared.name
        return dict(call.request.query).get("filename") or ep.filename or ep.ref.rsplit("/", 1)[-1].rsplit(":", 1)[-1]

    def _download_context(self, call: ChatCall) -> ChatContext:
        shared = self.shared.get(call.ep.ref)
        sender, room = (shared.sender, shared.room) if shared is not None else ("", "")
        return self.context(call, call.ep.name, sender, room, recipient=self._downloader(call))

    def _download(self, call: ChatCall, headers: dict[str, str], data: bytes) -> Step:
        api, ep = call.api, call.ep
        ctx = self._download_context(call)
        name = self._download_name(call)
        mime = headers.get("content-type", "")
        self.stats["inbound_files"] += 1
        if len(data) > self.settings.max_upload_size:       # chunked, or a compressed body that grew
            passes, decision = self._too_large(ctx, name, mime, len(data))
            if passes:
                return None
        else:
            # A thumbnail or preview is an image the server made from the file, not the file itself; it is
            # scanned all the same, being bytes the user receives.
            _report, decision = yield Inspect(data, ctx, name, mime)
        if not decision.blocked:
            return None
        reason = decision.refusal
        self.stats["inbound_blocked"] += 1
        if not ep.derived:          # the shared file itself: later downloads and re-shares are refused
            self._mark_blocked(ep.ref, reason)
        logger.info("%s %s of %s (%r) blocked: %s", api.API, ep.name, ep.ref, name, reason)
        return self._refuse(call, api.API, 403, f"imguard: this file was blocked ({reason})")

    def _deliver(self, call: ChatCall, status: int, body: bytes) -> Rewrite | Respond | Fate | None:
        api, ep = call.api, call.ep
        if len(body) > self.settings.max_delivery_size:       # chunked, or a compressed body that grew
            return self._delivery_too_large(call, len(body))
        try:
            found = api.deliver(ep, call.request, status, body, self.limits)
        except bodies.BodyError as e:       # the server's fault: an anomaly, and nothing undecided passes
            ctx = self.context(call, ep.name, "", "", recipient=self._downloader(call))
            self._anomaly(ctx, "chat_response_malformed", f"a {api.API} {ep.name} response could not be read ({e}); "
                          "it was refused undelivered")
            return self._refuse(call, api.API, 502, "imguard: the response could not be inspected and was refused")
        walled = self._walls_learn(call, body) if api is httpchat.matrix and ep.name == "sync" else None
        blocked, masked = self._decide_delivered(call.tenant_base, api, found, self._downloader(call))
        if blocked or masked:       # re-serialised only when something changed
            body = api.rewrite_delivered(body, blocked, masked)
        if walled:                  # after: the locators above count the timeline's events as the server sent them
            body = httpchat.matrix.rewrite_sync_walls(body, *walled)
        return Rewrite(body) if blocked or masked or walled else None

    def _decide_delivered(self, base: ChatContext, api, found: list, user: str) -> tuple[list, list]:
        """What a response (or a server WebSocket message) delivers to `user`, the one path for every API:
        SharedMedia remembered; each DeliveredMessage from someone else decided inbound. Returns the
        (locator, notice) of the blocked and the (locator, replacements) of the masked messages."""
        blocked, masked = [], []
        for item in found:
            if isinstance(item, SharedMedia):
                self._remember(self.shared, item.ref, item)
                if user:
                    self._remember(self.shared_with, item.ref, user)
            elif isinstance(item, DeliveredMessage) and item.message.sender and item.message.sender != user:
                verdict = self._delivered(base, api, item, user)
                if isinstance(verdict, str) and verdict:
                    blocked.append((item.locator, verdict))
                elif isinstance(verdict, list) and verdict:
                    masked.append((item.locator, verdict))
        return blocked, masked

    def _delivered(self, base: ChatContext, api, item: DeliveredMessage, user: str) -> str | list:
        """The notice replacing a blocked message, the replacements of a masked one, or "" (pass as is)."""
        event = item.message
        if not event.parts and not event.refs and not item.encrypted:
            return ""
        # An edit keeps the message id: the text is part of the key, so an edited message is decided again. A
        # file it shares that was blocked since (its download) turns a remembered pass into a block. The tenant is
        # part of the key: a verdict for the company's workspace is not one for another.
        digest = hashlib.sha256("\0".join((event.text,) + event.refs).encode("utf-8", "replace")).hexdigest()[:16]
        key = (api.API, user, base.tenant, item.event_id, digest)
        reason = next((r for r in map(self._blocked, event.refs) if r), None)
        remembered = self.delivered.get(key) if item.event_id else None
        if remembered is not None and (not reason or isinstance(remembered, str) and remembered):
            return remembered           # a later response repeats it: decided already
        self.stats["inbound_messages"] += 1
        ctx = self._context(base, api.API, event.endpoint, event.sender, event.room, self.user, recipient=user)
        if item.encrypted:      # ciphertext (a Megolm event): policy's `encrypted` sees the scheme, as outbound
            self.stats["encrypted"] += 1
            ctx = ctx.with_(encryption=_POLICY_SCHEME.get(item.encrypted, item.encrypted))
            self._anomaly(ctx, "e2e_encrypted", "end-to-end encrypted content: it cannot be inspected",
                          severity="info", scheme=item.encrypted)
        walled = self._walls_delivered(ctx, event.room) if api is httpchat.matrix and event.room else None
        if walled is not None:
            decision = walled
        elif reason:
            decision = self._shares_blocked_file(event.text, ctx, reason)
        else:
            decision = self._check_message(event.text, ctx)
        verdict: str | list = ""
        if decision.blocked:
            self.stats["inbound_blocked"] += 1
            verdict = f"A message from {event.sender} was blocked by imguard: {decision.refusal}"
        elif decision.action == MASK:
            self.stats["masked"] += 1
            verdict = bodies.masked_replacements(event.parts, decision.masked_text or "")
        if item.event_id:
            self._remember(self.delivered, key, verdict)
        return verdict

    # --- ethical walls in Matrix rooms (imguard/policy/walls.py) --------------------------------------------------

    def _walls_call(self, method: str, req: HttpRequest) -> tuple[ModuleType, Endpoint] | None:
        """A Matrix join or invite request (not a chat call to the decoders): its Endpoint, the room as its ref."""
        for candidate in self.routes.match(req.host, req.path):
            asked = candidate.membership_call(method, req.path) if candidate is httpchat.matrix else None
            if asked is not None:
                return candidate, Endpoint(candidate.API, asked[0], MESSAGE, ref=asked[1])
        return None

    def _walls_check(self, kind: str, ctx: ChatContext, room: str) -> Decision | None:
        check = getattr(self.pipeline, "check_membership", None)       # a test's stand-in may have none
        return check(kind, ctx, room) if check is not None else None

    def _walls_membership(self, call: ChatCall, req: HttpRequest) -> Respond | None:
        """A join (decided against the room's members known from the users' /sync) or an invite (against the
        invitee), by the walls: refused with 403 M_FORBIDDEN and a `wall_join` / `wall_invite` event. A room known
        by alias only, or whose members no user behind the gateway has seen, is joined undecided (its members are
        decided at the user's next /sync: _walls_learn)."""
        api, ep = call.api, call.ep
        sender = api.requester(req)
        user = self.user(sender)
        members = (api.invitee(req, self.limits),) if ep.name == "invite" else self.rooms.identities(ep.ref, user)
        members = tuple(m for m in members if m)
        if not members:
            return None
        decision = self._walls_check(ep.name, self.context(call, ep.name, sender, ep.ref).with_(recipients=members),
                                     ep.ref)
        if decision is None or not decision.blocked:
            return None
        self.stats["blocked"] += 1
        return self._refuse(call, api.API, 403, decision.notice or f"imguard: {ep.name} refused ({decision.refusal})")

    def _walls_room_message(self, call: ChatCall, ctx: ChatContext, room: str) -> Respond | None:
        """Our user's message to a Matrix room, decided by the walls against the room's members (a `wall_message`
        event): refused with the wall's notice when one matched."""
        if call.api is not httpchat.matrix or not room or room not in self.rooms:
            return None
        decision = decide_room(lambda c: self._walls_check("message", c, room) or Decision(), self.rooms, room,
                               lambda members: ctx.with_(recipients=members), besides=ctx.sender)
        if decision is None or not decision.blocked:
            return None
        self.stats["blocked"] += 1
        return self._refuse(call, call.api.API, 403, decision.notice or f"imguard: blocked ({decision.refusal})")

    def _walls_learn(self, call: ChatCall, body: bytes) -> tuple[list, list] | None:
        """Who is in which room, from a /sync response (deliver() has read it), while a wall is in force. A member of
        the other side arriving in a room the user is in, or the user entering a room with one, is a `wall_join`
        event (its messages are refused from then on) and a notice in the room's timeline; an invite from the other
        side (its inviter, or a member invite_state or the table shows) is a `wall_invite` event and is taken out of
        the response. Returns what to rewrite (rewrite_sync_walls' invites to drop and notices), or None."""
        if not getattr(getattr(self.pipeline, "policy", None), "walls", None):
            return None         # no wall: nothing decides on members (a wall put in force learns from then on)
        user = self._downloader(call)
        seen = httpchat.matrix.sync_members(body, self.limits, depth_checked=True)
        learned = learn_members(self.rooms, seen.facts, user)
        base = self.context(call, "sync", "", "", recipient=user)
        if not learned.kept:
            self._anomaly(base, "room_members_overflow", f"more than {self.settings.max_room_members} Matrix room "
                          "members; the walls decide on those known", max_room_members=self.settings.max_room_members)
        drop: list[str] = []
        notices: list[tuple[str, str, dict]] = []

        def tell(room: str, joined: str, who: str, decision: Decision | None) -> None:
            """A notice in `room`'s timeline, after `joined`'s join, when the walls block its messages."""
            if decision is not None and decision.blocked and user:
                text = (f"imguard: {who} across an ethical wall ({decision.refusal}); messages across the wall "
                        "are refused.")
                notices.append((room, joined, httpchat.matrix.wall_notice_event(room, joined, text, user)))
        # a join in the user's timeline is told to the user even when the table knew the member from another user
        arrived = dict.fromkeys((*learned.arrived, *((r, m) for r, m in seen.arrivals if m != user and user
                                                     and r not in learned.entered and self.rooms.identity(r, user))))
        for room, member in arrived:
            tell(room, member, f"{member} joined this room", self._walls_check(
                "join", base.with_(sender=member, recipients=(user,), conversation=room), room))
        for room in learned.entered:
            ctx = base.with_(sender=user, recipients=self.rooms.identities(room, user), conversation=room,
                             origin=FROM_CLIENT)
            tell(room, user, "this room has members", self._walls_check("join", ctx, room))
        for room, (inviter, shown) in seen.invites.items():
            if room in self.rooms and self.rooms.identity(room, user) == user:
                continue            # already in the room: not an invite to decide
            others = dict.fromkeys(m for m in (*shown, *self.rooms.identities(room, user)) if m not in (user, inviter))
            for sender in (inviter, *others):
                decision = self._walls_check("invite", base.with_(sender=sender, recipients=(user,),
                                                                  conversation=room), room)
                if decision is not None and decision.blocked:
                    drop.append(room)
                    break
        return (drop, notices) if drop or notices else None

    def _walls_delivered(self, ctx: ChatContext, room: str) -> Decision | None:
        """A room message delivered to our user, from a member walled off from it (a `wall_message` event): its
        decision, else None (decided as any message)."""
        decision = self._walls_check("message", ctx, room)
        return decision if decision is not None and decision.blocked else None

    # --- WebSockets: Rocket.Chat DDP both ways; what Slack, Mattermost, Discord (and DDP) push to the client ---

    def socket(self, req: HttpRequest, base: ChatContext,
               upstream: tenants.Upstream = tenants.NO_UPSTREAM) -> ChatSocket:
        """The chat state of a WebSocket to `req` (its handshake: host, path, query, headers): api None when it is
        not a chat socket."""
        api = next((a for a in self.routes.match(req.host, req.path) if a.is_websocket(req.path)), None)
        sock = ChatSocket(api, base)
        if api is None:
            return sock
        sock.credential = api.ws_requester(req)
        sock.tenant = self._learned_tenant(api, sock.credential, req, base, upstream) or \
            self.tenant(api, req, "", base, upstream)
        try:
            sock.codec = api.ws_codec(req, self.settings.max_delivery_size)
        except httpchat.UnreadableSocket as e:
            sock.state, sock.reason = SocketState.UNREADABLE, str(e)
        return sock

    def _socket_context(self, sock: ChatSocket, endpoint: str = "websocket", sender: str = "", room: str = "",
                        recipient: str | None = None) -> ChatContext:
        return self._context(sock.tenant_base, sock.api.API, endpoint, sender, room, self.user, recipient)

    def handshake(self, sock: ChatSocket) -> Respond | None:
        """A WebSocket upgrade to a chat API whose server messages imguard could not read (Discord zstd-stream):
        an anomaly, and the http parse fail mode decides: closed (the default) refuses the upgrade (400 in the API's
        error shape), open relays the socket uninspected (None)."""
        if sock.api is None or sock.state is not SocketState.UNREADABLE:
            return None
        fail_open = self.parse_fail_open()
        ctx = self._socket_context(sock, recipient=self.user(sock.credential))
        self._anomaly(ctx, "chat_websocket_unreadable", f"{sock.reason}: " + (
            "relayed uninspected (fail mode http:parse=open)" if fail_open else "the connection was refused"),
            fail_mode="open" if fail_open else "closed")
        if fail_open:
            return None
        return self._refuse(None, sock.api.API, 400, f"imguard: {sock.reason}; the connection was refused")

    def client_message(self, sock: ChatSocket, data: bytes) -> Drop | Rewrite | None:
        """A client message on a chat socket: its credential noted (Discord IDENTIFY, DDP login); a post on it
        (Rocket.Chat DDP sendMessage/updateMessage, Slack RTM message) decided as a REST message: block -> Drop
        with the API's error as the reply; mask -> Rewrite."""
        if sock.api is None or sock.state is SocketState.UNREADABLE:     # UNREADABLE here: fail mode open
            return None
        api = sock.api
        key = api.ws_credential(data)
        if key:
            sock.credential = key
        found = api.decode_ws(data, sock.user or self.user(sock.credential), self.limits)
        replacements = []
        for call_id, index, event in found:
            self.stats["websocket"] += 1
            verdict, reason = self._ws_message(sock, event)
            if verdict is None:
                try:
                    return Drop(api.ws_error(call_id, reason, index is not None))
                except Exception:
                    logger.exception("could not answer a blocked %s WebSocket message", api.API)
                    return Drop()
            replacements += verdict
        if not replacements:
            return None
        try:
            return Rewrite(api.rewrite_ws(data, replacements))
        except Exception:
            logger.exception("masking a WebSocket message failed; dropped")
            return Drop()

    def _ws_message(self, sock: ChatSocket, event: ChatMessage) -> tuple[list | None, str]:
        """(replacements, "") or (None, the reason it was blocked)."""
        self.stats["messages"] += 1
        ctx = self._socket_context(sock, event.endpoint, event.sender, event.room)
        decision = self._check_message(event.text, ctx)
        if decision.blocked:
            self.stats["blocked"] += 1
            return None, decision.notice or f"imguard: message blocked ({decision.refusal})"
        if decision.action == MASK:
            self.stats["masked"] += 1
            return bodies.masked_replacements(event.parts, decision.masked_text or ""), ""
        return [], ""

    def _read_server(self, sock: ChatSocket, data: bytes) -> tuple[bytes | None, list | bodies.BodyError]:
        """(payload, what deliver_ws found in it, or the BodyError it raised); payload None while a compressed
        payload is incomplete. Raises the codec's FrameTooLarge / BodyError. Pure: may run in a worker thread."""
        payload = sock.codec.receive(data)
        if payload is None:
            return None, []
        try:
            return payload, sock.api.deliver_ws(payload, self.limits)
        except bodies.BodyError as e:
            return payload, e

    def _encode(self, sock: ChatSocket, payload: bytes) -> Step:
        """The payload as the socket's codec sends it to the client (re-compressed, ETF again): a large one
        offloaded."""
        if len(payload) > WS_INLINE_MAX:
            return (yield Offload(lambda: sock.codec.send(payload)))
        return sock.codec.send(payload)

    def server_message(self, sock: ChatSocket, data: bytes) -> Step:
        """A server message on a chat socket, the one path for every API: read through the socket's codec (Discord's
        zlib stream), who the socket's user is (a login result, hello, READY, a Socket Mode authorization), and the
        messages of others it pushes decided inbound as a history response's are. Returns None (it crosses as it
        came), Drop() or Rewrite(message) (changed, or always on a compressed stream). A generator (Offload)."""
        api = sock.api
        if api is None or sock.state is SocketState.UNREADABLE:
            return None
        if sock.state is SocketState.BROKEN:
            return Drop()

        def ctx() -> ChatContext:
            return self._socket_context(sock, recipient=sock.user or self.user(sock.credential))
        try:
            # Inflating and reading a large payload (a Discord READY of megabytes, ETF) would stall every
            # connection of a gateway worker: it is offloaded; this socket waits for its verdict in order.
            if len(data) > WS_INLINE_MAX or sock.codec.stream:
                payload, found = yield Offload(lambda: self._read_server(sock, data))
            else:
                payload, found = self._read_server(sock, data)
        except httpchat.FrameTooLarge as e:     # inflated to its end and discarded: the stream stays in step
            self._anomaly(ctx(), "chat_websocket_too_large", f"a {api.API} WebSocket message of {e.size} bytes or "
                          f"more (max_delivery_size {self.settings.max_delivery_size}) was dropped undelivered",
                          size=e.size)
            return Drop()
        except bodies.BodyError as e:           # the client's inflater follows imguard's stream: nothing more
            sock.state = SocketState.BROKEN     # can reach it, whatever the fail mode
            self._anomaly(ctx(), "chat_websocket_malformed", f"the {api.API} WebSocket's compressed stream cannot "
                          f"be read ({e}); nothing more is delivered on this connection")
            return Drop()
        if payload is None:             # part of a compressed payload: sent with its last part
            return Drop()
        if isinstance(found, bodies.BodyError):
            e, fail_open = found, self.parse_fail_open()
            self._anomaly(ctx(), "chat_websocket_malformed", f"a {api.API} WebSocket message could not be read "
                          f"({e}); " + ("relayed (fail mode http:parse=open)" if fail_open else "dropped"),
                          fail_mode="open" if fail_open else "closed")
            if not fail_open:
                return Drop()
            if sock.codec.stream:
                return Rewrite((yield from self._encode(sock, payload)))
            return None
        for item in found:
            if isinstance(item, Identity) and not item.key and item.user:
                sock.user = item.user
                if sock.credential and sock.credential != item.user:    # the token's user, for REST calls too
                    self.learn_identity(sock.credential, item.user)
        blocked, masked = self._decide_delivered(sock.tenant_base, api, found,
                                                 sock.user or self.user(sock.credential))
        if blocked or masked:
            try:
                payload = api.rewrite_ws_delivered(payload, blocked, masked)
            except Exception:
                logger.exception("rewriting a delivered %s WebSocket message failed; dropped", api.API)
                return Drop()
        if blocked or masked or sock.codec.stream:
            return Rewrite((yield from self._encode(sock, payload)))
        return None

