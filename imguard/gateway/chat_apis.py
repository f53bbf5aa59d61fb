"""Chat over HTTP(S): the mitmproxy addon that puts the client APIs of Matrix, Slack, Mattermost, Rocket.Chat and
Discord through policy, with the pure decoders of imguard/protocols/httpchat.

It sits after HttpUploads in the addon chain (master.py) and leaves alone what HttpUploads took (an announced
XEP-0363 slot, a configured upload path). Hooks:

requestheaders  the host and path are matched against the routes (ChatApiSettings.routes, any host by path
                prefix by default) and the API module classifies the call. A chat call is buffered whole
                (request.stream = False): nothing reaches the server before the verdict. Above the size limit
                (max_upload_size for uploads, max_message_size for messages) it is not read: an upload goes to
                policy as UNSCANNABLE "too_large" (413 unless policy allows), a message is refused with 413.
                A PUT/POST to an upload URL a response announced (Slack upload_url, Discord upload_url) is an
                upload too. A download (DOWNLOAD endpoint: Matrix media, Slack files-pri/files-tmb, Mattermost
                /api/v4/files/{id}, Rocket.Chat /file-upload/, Discord's CDN) of a reference already blocked
                (its upload or an earlier download was) is answered 403 in the API's shape at once; any other
                download and every call that delivers messages (DELIVER) is marked for its response (below).
                A DELIVER call POSTed with its arguments (Slack conversations.history) has its body read as a
                message's (max_message_size), for the channel; it goes on unchanged.
request         decode -> MalformedRequest: 400/413 in the API's error shape; FileUpload: scanned in a worker
                thread (Inspection), block -> 403 and its reference (mxc, slack:F.., discord:..) marked blocked;
                EncryptedContent: counted, an e2e_encrypted anomaly recorded, policy asked with empty text;
                ChatMessage: a message that shares a blocked reference is blocked, else check_message(text):
                block -> 403 naming the reason, mask -> the body rewritten at each text's place.
responseheaders a call whose response teaches something (login, whoami, auth.test, users/me, media upload,
                upload URLs) has its response streamed through a collector (at most 256 KiB kept). A download
                and a DELIVER response are held whole (a download above max_upload_size goes to policy as
                UNSCANNABLE "too_large" and is killed unless policy allows; a DELIVER response above
                max_delivery_size is killed with an anomaly). Everything else stays streamed.
response        learned: token -> user id (Identity), mxc of an allowed upload (StoredMedia), upload URLs.
                Inbound (origin FROM_SERVER, what reaches the user behind the gateway), one path for every API:
                - download: the bytes are scanned (Inspection) with the downloader (api.requester: the
                  credential's user; without a credential, as on Discord's CDN, the user a decided response last
                  showed the file to) as recipient and, when a decided response showed who shared that
                  reference, its sender, room and name; block -> 403 in the API's error shape instead of the
                  file, and the reference marked blocked. A thumbnail or preview (Endpoint.derived) is an image
                  the server made, not the shared file, but it is what the user receives: scanned the same way
                  (its block does not mark the reference).
                - DELIVER (api.deliver): each message from someone other than the requester goes to
                  check_message (recorded: alert log, archive); block -> api.rewrite_delivered puts the notice
                  "A message from X was blocked by imguard: <reason>" in its place (the API's own shape: the
                  Matrix event's content, the Slack/Mattermost/Rocket.Chat/Discord message text, its files and
                  attachments dropped), mask -> its texts masked; the body is re-serialised only when something
                  changed. A message sharing a blocked reference is blocked. The references each message shares
                  are remembered (sender, room, name; bounded) for the download above. A verdict is remembered
                  per (api, user, message id, text), so a message a later response repeats is replaced again
                  without being recorded twice, while an edit (same id, new text) is decided again. A body the
                  decoder cannot read: an anomaly and 502, never passed undecided.
error           a chat call that died before its body was complete (client gone half-way, lying
                Content-Length): an anomaly; nothing was forwarded.
websocket_message  a chat WebSocket (api.is_websocket: Slack RTM /websocket/.. and Socket Mode /link/ on
                *.slack.com, Mattermost /api/v4/websocket, Rocket.Chat /websocket, Discord's gateway on
                *.discord.gg) has a ChatSocket (flow.metadata): its API, whose it is (api.ws_requester: the
                handshake's token, cookie or ticket URL; api.ws_credential: a client message's, Discord's
                IDENTIFY), its codec (api.ws_codec) and state (SocketState).
                Client messages (api.decode_ws): Rocket.Chat DDP sendMessage/updateMessage and Slack RTM
                messages go to policy; block -> dropped and the client answered with the API's error
                (api.ws_error: a DDP method error, RTM's {"ok":false,"reply_to"}); mask -> rewritten
                (api.rewrite_ws). Mattermost's and Discord's clients post over REST.
                Server messages, one path for every API: the codec gives the payload (Discord compress=zlib-stream:
                one inflater per connection, a payload complete at 00 00 ff ff, maybe over several messages, the
                earlier ones dropped and the payload sent with the last; re-compressed with imguard's own deflater,
                every payload, changed or not, since the client's inflater follows what it gets; Discord encoding=etf:
                the payload read from Erlang's term format and handed on as JSON, the server's ETF bytes given back
                when unchanged); api.deliver_ws names the socket's user (a DDP login result, Mattermost hello, Discord
                READY, a Socket Mode authorization; a token's user is learned for the REST calls too) and the messages
                pushed, decided as a DELIVER response's (above: inbound, recorded, the notice or the mask via
                api.rewrite_ws_delivered). A payload over max_delivery_size (inflated: a zlib bomb is inflated to its
                end and discarded, the stream kept in step): dropped with an anomaly. A message that cannot be read:
                an anomaly, and the http parse fail mode decides (closed, the default: the message is dropped; open:
                relayed). A compressed stream that cannot be inflated: an anomaly and nothing more is delivered on
                that socket (the client's heartbeat goes unanswered and it reconnects), whatever the fail mode:
                imguard's stream towards the client cannot resume. A message over 64 KiB, and every one on a
                compressed stream, is read and re-encoded in a worker thread (WS_INLINE_MAX): a READY of megabytes
                does not stall the other connections.
requestheaders  (WebSocket) an upgrade to a chat socket whose encoding imguard cannot read (Discord
                compress=zstd-stream, an encoding other than json and etf): an anomaly; fail mode closed refuses
                it with 400 in Discord's error shape (a security product does not relay what it cannot read, and
                rewriting the query would break the client, whose decoder expects what it asked for), open
                relays the socket uninspected. encoding=etf (the desktop client's) is read: discord.EtfPayloads.

Every refusal uses the API's own error JSON (Matrix {"errcode","error"}, Slack {"ok":false,"error"}, ...), so the
client shows the reason instead of a generic failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

from mitmproxy import ctx as mitm_ctx
from mitmproxy import http

from imguard import alerts
from imguard.files.expected import ExpectedTransfers, normalize_url
from imguard.gateway import http_uploads
from imguard.gateway.http_uploads import block_reason, flow_context, too_large
from imguard.gateway.inspection import Inspection
from imguard.model import BLOCK, FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision
from imguard.protocols import httpchat
from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import WsCodec
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, LEARN, UPLOAD, ChatMessage, DeliveredMessage,
                                               EncryptedContent, FileUpload, HttpRequest, Identity, MalformedRequest,
                                               SharedMedia, StoredMedia, UploadSlot)
from imguard.settings import MiB, setting

logger = logging.getLogger("imguard.gateway")

META = "imguard_chat"
SLOT = "chat_upload_slot"           # ExpectedTransfers kinds
MEDIA = "chat_media"
RESPONSE_KEEP = 256 * 1024          # bytes of a learning response kept (login, upload results are small)
WS = "imguard_chat_socket"          # flow.metadata: the ChatSocket of a chat WebSocket
WS_INLINE_MAX = 64 * 1024           # a larger server WebSocket message (or any on a compressed stream) is read and
                                    # re-encoded in a worker thread, off the event loop


class SocketState(Enum):
    INSPECTED = "inspected"     # every server message read and decided
    UNREADABLE = "unreadable"   # its encoding cannot be read (zstd-stream): fail mode open, relayed uninspected
    BROKEN = "broken"           # its compressed stream could not be inflated: nothing more reaches the client


@dataclass
class ChatSocket:
    """A WebSocket flow's chat state: which API (None: not a chat socket), whose it is, how its server messages
    are read (the codec: plain JSON, Discord's zlib stream with its inflater and imguard's deflater)."""
    api: ModuleType | None
    credential: str = ""        # the handshake's or a client message's credential key (Rocket.Chat: rc_uid)
    user: str = ""              # the socket's user, once a server message named it
    codec: WsCodec | None = None
    state: SocketState = SocketState.INSPECTED
    reason: str = ""


@dataclass(frozen=True)
class ChatApiSettings:
    """Chat APIs over HTTP(S): Matrix, Slack, Mattermost, Rocket.Chat, Discord"""

    routes: list = setting(
        list(httpchat.DEFAULT_ROUTES),
        "Which requests are chat API calls: API=[HOST]/PATH_PREFIX, API one of matrix, slack, mattermost, "
        "rocketchat, discord. Without HOST a prefix matches on any host, so a self-hosted server on any name is "
        "covered; with HOST (or *.domain) only there. Giving this option replaces the defaults. Within a "
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
    websocket: bool = setting(
        True, "Inspect chat over WebSockets: Rocket.Chat DDP sendMessage/updateMessage from the client, and the "
              "messages the server pushes to it on Slack (RTM, Socket Mode), Mattermost (/api/v4/websocket), "
              "Rocket.Chat (stream-room-messages) and Discord (the gateway, zlib-stream included)")


def _remember(table: OrderedDict, key: Any, value: Any, limit: int) -> None:
    """`key` -> `value` as the newest entry of a bounded table: past `limit` entries the oldest is forgotten."""
    table.pop(key, None)
    table[key] = value
    while len(table) > max(1, limit):
        table.popitem(last=False)


class ChatApis:
    def __init__(self, pipeline, inspection: Inspection, transfers: Any = None,
                 settings: ChatApiSettings | None = None, record: Any = None, commit: Any = None,
                 parse_fail_open: Callable[[], bool] | None = None):
        # The fail mode (protocol "http", situation parse) of a WebSocket message imguard cannot read: closed (the
        # default) drops it, open relays it; both record an anomaly.
        self.parse_fail_open = parse_fail_open or (lambda: False)
        self.settings = settings if settings is not None else ChatApiSettings()
        self.routes = httpchat.Routes.parse(self.settings.routes)      # ValueError names a bad route
        self.limits = httpchat.DecodeLimits(self.settings.max_json_depth, self.settings.max_multipart_parts)
        self.pipeline = pipeline
        self.inspection = inspection
        # Upload slots and blocked references live in the shared table (so XMPP and chat APIs see the same
        # blocked URLs); a gateway without one gets a private table.
        self.transfers = transfers if transfers is not None else ExpectedTransfers()
        self.record = record if record is not None else pipeline.record
        # Archive records on disk before a request goes on: the gateway addon's commit (it logs and counts a
        # disk that refuses), else the pipeline's own.
        self.commit = commit if commit is not None else (getattr(pipeline, "commit", None) or (lambda: None))
        self.identities: OrderedDict[str, str] = OrderedDict()
        self.shared: OrderedDict[str, SharedMedia] = OrderedDict()          # file ref -> who shared it (responses)
        self.shared_with: OrderedDict[str, str] = OrderedDict()             # file ref -> who it was last shown to
        # (api, user, message id, hash of its text and refs) -> notice, mask replacements, or "" (passed)
        self.delivered: OrderedDict[tuple, str | list] = OrderedDict()
        self.stats = {"messages": 0, "files": 0, "blocked": 0, "masked": 0, "encrypted": 0, "malformed": 0,
                      "websocket": 0, "inbound_messages": 0, "inbound_files": 0, "inbound_blocked": 0}

    # --- helpers ------------------------------------------------------------------------------------------

    def user(self, key: str) -> str:
        return self.identities.get(key, key)

    def learn_identity(self, key: str, user: str) -> None:
        _remember(self.identities, key, user, self.settings.max_identities)

    def _remember(self, table: OrderedDict, key: Any, value: Any) -> None:
        _remember(table, key, value, self.settings.max_shared_media)

    def _respond(self, flow: http.HTTPFlow, api: str, status: int, reason: str) -> None:
        flow.request.stream = False
        flow.response = http.Response.make(status, httpchat.error_body(api, status, reason),
                                           {"content-type": "application/json"})
        meta = flow.metadata.get(META)
        if meta is not None:
            meta["answered"] = True

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
    def _split(flow: http.HTTPFlow) -> tuple[str, tuple]:
        parts = urlsplit(flow.request.path)
        return parts.path or "/", tuple(parse_qsl(parts.query, keep_blank_values=True))

    def _request(self, flow: http.HTTPFlow, body: bytes) -> HttpRequest:
        path, query = self._split(flow)
        return HttpRequest(flow.request.method.upper(), flow.request.pretty_host, path, query,
                           tuple((k.lower(), v) for k, v in flow.request.headers.items(multi=True)), body)

    def _context(self, flow: http.HTTPFlow, api: str, endpoint: str, sender: str, room: str,
                 recipient: str | None = None) -> ChatContext:
        """What the client sends (recipient None: to the room), or with `recipient` (the user behind the gateway,
        "" when not known) what the server delivers to it: origin FROM_SERVER."""
        origin = FROM_CLIENT if recipient is None else FROM_SERVER
        ctx = flow_context(flow, f"{api}:{endpoint}", protocol=api, origin=origin)
        if recipient is not None:
            return ctx.with_(sender=sender, recipients=(recipient,) if recipient else (), conversation=room)
        return ctx.with_(sender=self.user(sender), recipients=(room,) if room else (), conversation=room)

    # --- hooks --------------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or http_uploads.META in flow.metadata:
            return                  # answered already, or an announced / configured upload HttpUploads holds
        if self._websocket_handshake(flow):
            return
        req = flow.request
        method = req.method.upper()
        path, _ = self._split(flow)
        api = ep = slot = None
        if method in ("PUT", "POST"):
            for url in dict.fromkeys((req.pretty_url, req.url)):
                found = self.transfers.take(normalize_url(url), kind=SLOT)
                if found is not None:
                    api_name, slot = found
                    api = httpchat.APIS[api_name]
                    ep = api.upload_endpoint()
                    break
        if ep is None:
            for candidate in self.routes.match(req.pretty_host, path):
                ep = candidate.classify(method, path)
                if ep is not None:
                    api = candidate
                    break
        if ep is None:
            return
        if ep.kind == DOWNLOAD:
            reason = self._blocked(ep.ref)
            if reason:
                self._respond(flow, api.API, 403, f"imguard: this file was blocked ({reason})")
                return
        if ep.kind == DOWNLOAD or ep.kind == DELIVER and method == "GET":
            # nothing to read in the request: its response is held (below)
            flow.metadata[META] = {"api": api, "ep": ep, "slot": None, "done": True, "answered": False,
                                   "request": self._request(flow, b"")}
            return
        meta = {"api": api, "ep": ep, "slot": slot, "done": False, "answered": False}
        flow.metadata[META] = meta
        if ep.kind == LEARN and method == "GET":
            return
        # a POSTed history call (Slack): its arguments (the channel) are read as a message's, then the response
        # is held
        req.stream = False          # buffer: nothing reaches the server before the verdict
        length = req.headers.get("content-length", "")
        if length.isdigit():
            self._check_size(flow, meta, int(length))

    def _check_size(self, flow: http.HTTPFlow, meta: dict, size: int) -> bool:
        """False when the request is over its limit (then it is answered, or passed when policy allows)."""
        api, ep = meta["api"], meta["ep"]
        if ep.kind == UPLOAD:
            if size <= self.settings.max_upload_size:
                return True
            meta["done"] = True
            slot = meta["slot"]
            ctx = self._context(flow, api.API, ep.name, slot.sender if slot else httpchat.common.bearer(
                self._request(flow, b"")), slot.room if slot else "")
            path, query = self._split(flow)
            name = dict(query).get("filename") or path.rsplit("/", 1)[-1]
            passes, decision = too_large(self.inspection, ctx, name,
                                         flow.request.headers.get("content-type", ""), size,
                                         self.settings.max_upload_size, "chat max_upload_size")
            if passes:
                logger.warning("%s upload (%d bytes) too large to scan; policy allows it unscanned", api.API, size)
                flow.request.stream = True
                return False
            reason = f"upload larger than {self.settings.max_upload_size} bytes"
            self._respond(flow, api.API, 413, f"imguard: {reason}")
            self._mark_blocked(ep.ref or (slot.ref if slot else ""), reason)
            self.stats["blocked"] += 1
            return False
        if size <= self.settings.max_message_size:
            return True
        meta["done"] = True
        self.stats["malformed"] += 1
        ctx = self._context(flow, api.API, ep.name, "", "")
        self._anomaly(ctx, "chat_request_too_large", f"a {api.API} {ep.name} request of {size} bytes (more than "
                      f"max_message_size {self.settings.max_message_size}) was refused unread", size=size)
        self._respond(flow, api.API, 413, f"imguard: request larger than {self.settings.max_message_size} bytes")
        return False

    async def request(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if not meta or meta["done"] or flow.response is not None:
            return
        meta["done"] = True
        try:
            await self._inspect_request(flow, meta)
        except Exception:       # mitmproxy would log a hook's exception and forward the request: fail closed
            logger.exception("%s %s: inspection failed; request refused", meta["api"].API, meta["ep"].name)
            self._respond(flow, meta["api"].API, 403, "imguard: the request could not be inspected and was refused")

    async def _inspect_request(self, flow: http.HTTPFlow, meta: dict) -> None:
        api, ep = meta["api"], meta["ep"]
        try:
            data = flow.request.get_content(strict=True) or b""
        except ValueError as e:
            self._malformed(flow, MalformedRequest(api.API, ep.name, 400, f"the body cannot be decoded: {e}"))
            return
        if not self._check_size(flow, meta, len(data)):        # chunked, or a compressed body that grew
            return
        req = self._request(flow, data)
        meta["request"] = req
        if ep.kind in (LEARN, DELIVER):
            return
        try:
            found = api.decode(ep, req, self.limits)
        except Exception as e:          # a decoder bug must not pass the request uninspected
            logger.exception("%s decoder failed on %s", api.API, ep.name)
            self._malformed(flow, MalformedRequest(api.API, ep.name, 400, f"imguard could not read the request: {e!r}"))
            return
        for event in found:
            if isinstance(event, MalformedRequest):
                self._malformed(flow, event)
                return
        slot: UploadSlot | None = meta["slot"]
        for event in found:
            if isinstance(event, FileUpload) and not await self._file(flow, api, ep, event, slot):
                return
        for event in found:
            if isinstance(event, EncryptedContent) and not self._encrypted(flow, api, event):
                return
        replacements = []
        for event in found:
            if isinstance(event, ChatMessage):
                verdict = self._message(flow, api, event)
                if verdict is None:
                    return
                replacements += verdict
        if replacements:
            try:
                flow.request.content = bodies.rewrite(data, flow.request.headers.get("content-type", ""),
                                                      replacements, self.limits.max_json_depth)
            except bodies.BodyError as e:       # cannot mask: never forward the unmasked text
                logger.error("%s %s: masking failed (%s); request refused", api.API, ep.name, e)
                self._respond(flow, api.API, 403, "imguard: the message could not be masked and was blocked")

    def _malformed(self, flow: http.HTTPFlow, event: MalformedRequest) -> None:
        self.stats["malformed"] += 1
        ctx = self._context(flow, event.api, event.endpoint, "", "")
        self._anomaly(ctx, "chat_request_malformed", f"{event.api} {event.endpoint}: {event.reason}",
                      status=event.status)
        self._respond(flow, event.api, event.status, f"imguard: malformed request: {event.reason}")

    async def _file(self, flow, api, ep, event: FileUpload, slot: UploadSlot | None) -> bool:
        self.stats["files"] += 1
        sender = event.sender or (slot.sender if slot else "")
        room = event.room or (slot.room if slot else "")
        ctx = self._context(flow, api.API, ep.name, sender, room)
        name = event.name or (slot.name if slot else "")
        report, decision = await self.inspection.check(event.data, ctx, name, event.mime)
        if not decision.blocked:
            return True
        reason = block_reason(decision)
        self.stats["blocked"] += 1
        self._respond(flow, api.API, 403, f"imguard: upload blocked: {reason}")
        self._mark_blocked(event.ref or (slot.ref if slot else ""), reason)
        logger.info("%s %s upload %r blocked: %s", api.API, ep.name, name, reason)
        return False

    def _encrypted(self, flow, api, event: EncryptedContent) -> bool:
        self.stats["encrypted"] += 1
        ctx = self._context(flow, api.API, event.endpoint, event.sender, event.room)
        self._anomaly(ctx, "e2e_encrypted", "end-to-end encrypted content: it cannot be inspected",
                      severity="info", scheme=event.scheme)
        for ref in event.refs:
            reason = self._blocked(ref)
            if reason:
                return self._refuse_message(flow, api, ctx, "", ref, reason)
        decision = self._check_message("", ctx)
        if decision.blocked:
            self.stats["blocked"] += 1
            self._respond(flow, api.API, 403, decision.notice or f"imguard: blocked ({block_reason(decision)})")
            return False
        return True

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

    def _refuse_message(self, flow, api, ctx: ChatContext, text: str, ref: str, reason: str) -> bool:
        decision = self._shares_blocked_file(text, ctx, reason)
        self.stats["blocked"] += 1
        self._respond(flow, api.API, 403, f"imguard: {decision.notice}")
        return False

    def _message(self, flow, api, event: ChatMessage) -> list | None:
        """The replacements a mask needs ([] = forward as is), or None when the message was refused."""
        if not event.parts and not event.refs:
            return []
        self.stats["messages"] += 1
        ctx = self._context(flow, api.API, event.endpoint, event.sender, event.room)
        for ref in event.refs:
            reason = self._blocked(ref)
            if reason:
                self._refuse_message(flow, api, ctx, event.text, ref, reason)
                return None
        decision = self._check_message(event.text, ctx)
        if decision.blocked:
            self.stats["blocked"] += 1
            self._respond(flow, api.API, 403, decision.notice or f"imguard: message blocked ({block_reason(decision)})")
            return None
        if decision.action == MASK:
            self.stats["masked"] += 1
            return bodies.masked_replacements(event.parts, decision.masked_text or "")
        return []

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if meta and not meta["answered"] and meta["ep"].kind in (DOWNLOAD, DELIVER):
            self._hold_response(flow, meta)
            return
        if not meta or meta["answered"] or not meta["ep"].learn or not 200 <= flow.response.status_code < 300:
            return
        kept = bytearray()

        def collect(chunk: bytes) -> bytes:
            if len(kept) < RESPONSE_KEEP:
                kept.extend(chunk[:RESPONSE_KEEP - len(kept)])
            return chunk
        flow.response.stream = collect
        meta["response"] = kept

    async def response(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if meta and not meta["answered"] and meta.get("held"):
            meta["held"] = False
            api, ep = meta["api"], meta["ep"]
            try:
                if ep.kind == DOWNLOAD:
                    await self._download(flow, meta)
                else:
                    self._deliver(flow, meta)
            except Exception:   # fail closed: what imguard could not inspect does not reach the user
                logger.exception("%s %s: inspecting the response failed; refused", api.API, ep.name)
                self._respond(flow, api.API, 502 if ep.kind == DELIVER else 403,
                              "imguard: the response could not be inspected and was refused")
            return
        if not meta or meta["answered"] or not meta["ep"].learn:
            return
        api, ep = meta["api"], meta["ep"]
        body = bytes(meta.get("response") or b"") or (flow.response.raw_content or b"")
        encoding = flow.response.headers.get("content-encoding", "")
        if body and encoding and encoding != "identity":
            try:
                from mitmproxy.net import encoding as enc
                body = enc.decode(body, encoding)
            except Exception:
                return
        req = meta.get("request") or self._request(flow, b"")
        try:
            learned = api.learn(ep, req, flow.response.status_code, body)
        except Exception:
            logger.exception("%s: reading the %s response failed", api.API, ep.name)
            return
        for fact in learned:
            if isinstance(fact, Identity):
                self.learn_identity(fact.key, fact.user)
            elif isinstance(fact, StoredMedia):
                self.transfers.expect(fact.ref, True, kind=MEDIA,
                                      ttl=self.transfers.settings.blocked_url_ttl_seconds)
            elif isinstance(fact, UploadSlot):
                self.transfers.expect(normalize_url(fact.url), (api.API, fact), kind=SLOT)

    # --- inbound: what the server delivers to the user behind the gateway ---------------------------------

    def _hold_response(self, flow: http.HTTPFlow, meta: dict) -> None:
        """A media download or /sync response: held whole for its verdict (HttpUploads, earlier in the chain,
        set every response it does not hold to streamed), unless it is over its limit."""
        api, ep = meta["api"], meta["ep"]
        if not 200 <= flow.response.status_code < 300:
            flow.response.stream = True         # an error JSON: nothing delivered
            return
        length = flow.response.headers.get("content-length", "")
        size = int(length) if length.isdigit() else -1
        if ep.kind == DOWNLOAD and size > self.settings.max_upload_size:
            ctx = self._download_context(flow, meta)
            passes, _ = too_large(self.inspection, ctx, self._download_name(flow, meta),
                                  flow.response.headers.get("content-type", ""), size,
                                  self.settings.max_upload_size, "chat max_upload_size")
            if passes:
                logger.warning("%s %s (%d bytes) too large to scan; policy allows it unscanned", api.API,
                               ep.name, size)
                flow.response.stream = True
            else:
                self.stats["inbound_blocked"] += 1
                logger.info("%s %s of %s (%d bytes) too large to scan: stopped", api.API, ep.name, ep.ref, size)
                flow.kill()                     # the user gets no byte of a file too large to inspect
            return
        if ep.kind == DELIVER and size > self.settings.max_delivery_size:
            self._delivery_too_large(flow, meta, size)
            return
        flow.response.stream = False
        meta["held"] = True

    def _delivery_too_large(self, flow: http.HTTPFlow, meta: dict, size: int) -> None:
        api, ep = meta["api"], meta["ep"]
        ctx = self._context(flow, api.API, ep.name, "", "", recipient=self._downloader(meta))
        self._anomaly(ctx, "chat_response_too_large", f"a {api.API} {ep.name} response of {size} bytes (more than "
                      f"max_delivery_size {self.settings.max_delivery_size}) was cut off undelivered", size=size)
        flow.kill()

    def _downloader(self, meta: dict) -> str:
        """The user behind the gateway who receives the response: whose credential asked; for a download without
        one (Discord's CDN serves signed URLs to anyone), the user a decided response last showed the file to."""
        key = meta["api"].requester(meta["request"])
        if key:
            return self.user(key)
        return self.shared_with.get(meta["ep"].ref, "") if meta["ep"].kind == DOWNLOAD else ""

    def _download_name(self, flow: http.HTTPFlow, meta: dict) -> str:
        ep = meta["ep"]
        shared = self.shared.get(ep.ref)
        if shared is not None and shared.name:
            return shared.name
        _, query = self._split(flow)
        return dict(query).get("filename") or ep.filename or ep.ref.rsplit("/", 1)[-1].rsplit(":", 1)[-1]

    def _download_context(self, flow: http.HTTPFlow, meta: dict) -> ChatContext:
        api, ep = meta["api"], meta["ep"]
        shared = self.shared.get(ep.ref)
        sender, room = (shared.sender, shared.room) if shared is not None else ("", "")
        return self._context(flow, api.API, ep.name, sender, room, recipient=self._downloader(meta))

    async def _download(self, flow: http.HTTPFlow, meta: dict) -> None:
        api, ep = meta["api"], meta["ep"]
        data = flow.response.get_content(strict=False) or b""
        ctx = self._download_context(flow, meta)
        name = self._download_name(flow, meta)
        mime = flow.response.headers.get("content-type", "")
        self.stats["inbound_files"] += 1
        if len(data) > self.settings.max_upload_size:       # chunked, or a compressed body that grew
            passes, decision = too_large(self.inspection, ctx, name, mime, len(data), self.settings.max_upload_size,
                                         "chat max_upload_size")
            if passes:
                return
        else:
            # A thumbnail or preview is an image the server made from the file, not the file itself; it is
            # scanned all the same, being bytes the user receives.
            report, decision = await self.inspection.check(data, ctx, name, mime)
        if not decision.blocked:
            return
        reason = block_reason(decision)
        self.stats["inbound_blocked"] += 1
        self._respond(flow, api.API, 403, f"imguard: this file was blocked ({reason})")
        if not ep.derived:          # the shared file itself: later downloads and re-shares are refused
            self._mark_blocked(ep.ref, reason)
        logger.info("%s %s of %s (%r) blocked: %s", api.API, ep.name, ep.ref, name, reason)

    def _deliver(self, flow: http.HTTPFlow, meta: dict) -> None:
        api, ep = meta["api"], meta["ep"]
        body = flow.response.get_content(strict=False) or b""
        if len(body) > self.settings.max_delivery_size:       # chunked, or a compressed body that grew
            self._delivery_too_large(flow, meta, len(body))
            return
        try:
            found = api.deliver(ep, meta["request"], flow.response.status_code, body, self.limits)
        except bodies.BodyError as e:       # the server's fault: an anomaly, and nothing undecided passes
            ctx = self._context(flow, api.API, ep.name, "", "", recipient=self._downloader(meta))
            self._anomaly(ctx, "chat_response_malformed", f"a {api.API} {ep.name} response could not be read ({e}); "
                          "it was refused undelivered")
            self._respond(flow, api.API, 502, "imguard: the response could not be inspected and was refused")
            return
        blocked, masked = self._decide_delivered(flow, api, found, self._downloader(meta))
        if blocked or masked:       # re-serialised only when something changed
            flow.response.content = api.rewrite_delivered(body, blocked, masked)

    def _decide_delivered(self, flow: http.HTTPFlow, api, found: list, user: str) -> tuple[list, list]:
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
                verdict = self._delivered(flow, api, item, user)
                if isinstance(verdict, str) and verdict:
                    blocked.append((item.locator, verdict))
                elif isinstance(verdict, list) and verdict:
                    masked.append((item.locator, verdict))
        return blocked, masked

    def _delivered(self, flow: http.HTTPFlow, api, item: DeliveredMessage, user: str) -> str | list:
        """The notice replacing a blocked message, the replacements of a masked one, or "" (pass as is)."""
        event = item.message
        if not event.parts and not event.refs:
            return ""
        # An edit keeps the message id: the text is part of the key, so an edited message is decided again. A
        # file it shares that was blocked since (its download) turns a remembered pass into a block.
        digest = hashlib.sha256("\0".join((event.text,) + event.refs).encode("utf-8", "replace")).hexdigest()[:16]
        key = (api.API, user, item.event_id, digest)
        reason = next((r for r in map(self._blocked, event.refs) if r), None)
        remembered = self.delivered.get(key) if item.event_id else None
        if remembered is not None and (not reason or isinstance(remembered, str) and remembered):
            return remembered           # a later response repeats it: decided already
        self.stats["inbound_messages"] += 1
        ctx = self._context(flow, api.API, event.endpoint, event.sender, event.room, recipient=user)
        if reason:
            decision = self._shares_blocked_file(event.text, ctx, reason)
        else:
            decision = self._check_message(event.text, ctx)
        verdict: str | list = ""
        if decision.blocked:
            self.stats["inbound_blocked"] += 1
            verdict = f"A message from {event.sender} was blocked by imguard: {block_reason(decision)}"
        elif decision.action == MASK:
            self.stats["masked"] += 1
            verdict = bodies.masked_replacements(event.parts, decision.masked_text or "")
        if item.event_id:
            self._remember(self.delivered, key, verdict)
        return verdict

    def error(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if not meta or meta["done"]:
            return
        meta["done"] = True
        api, ep = meta["api"], meta["ep"]
        ctx = self._context(flow, api.API, ep.name, "", "")
        detail = flow.error.msg if flow.error else "unknown error"
        self._anomaly(ctx, "chat_request_incomplete", f"a {api.API} {ep.name} request ended before its body was "
                      f"complete ({detail}); nothing was forwarded")

    # --- WebSockets: Rocket.Chat DDP both ways; what Slack, Mattermost, Discord (and DDP) push to the client ---

    def _socket(self, flow: http.HTTPFlow) -> ChatSocket:
        """The chat socket state of a WebSocket flow (made at its handshake, or at its first message)."""
        sock = flow.metadata.get(WS)
        if sock is not None:
            return sock
        path, _ = self._split(flow)
        api = next((a for a in self.routes.match(flow.request.pretty_host, path) if a.is_websocket(path)), None)
        sock = ChatSocket(api)
        flow.metadata[WS] = sock
        if api is None:
            return sock
        req = self._request(flow, b"")
        sock.credential = api.ws_requester(req)
        try:
            sock.codec = api.ws_codec(req, self.settings.max_delivery_size)
        except httpchat.UnreadableSocket as e:
            sock.state, sock.reason = SocketState.UNREADABLE, str(e)
        return sock

    def _websocket_handshake(self, flow: http.HTTPFlow) -> bool:
        """A WebSocket upgrade to a chat API: its state made. One whose server messages imguard could not read
        (Discord zstd-stream) is an anomaly, and the http parse fail mode decides: closed (the
        default) refuses the upgrade (400 in the API's error shape: the client cannot connect through the
        gateway), open relays the socket uninspected. True when answered."""
        if not self.settings.websocket or flow.request.headers.get("upgrade", "").lower() != "websocket":
            return False
        sock = self._socket(flow)
        if sock.api is None or sock.state is not SocketState.UNREADABLE:
            return False
        fail_open = self.parse_fail_open()
        ctx = self._context(flow, sock.api.API, "websocket", "", "", recipient=self.user(sock.credential))
        self._anomaly(ctx, "chat_websocket_unreadable", f"{sock.reason}: " + (
            "relayed uninspected (fail mode http:parse=open)" if fail_open else "the connection was refused"),
            fail_mode="open" if fail_open else "closed")
        if fail_open:
            return False
        self._respond(flow, sock.api.API, 400, f"imguard: {sock.reason}; the connection was refused")
        return True

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        if not self.settings.websocket or flow.websocket is None:
            return
        try:
            await self._websocket_message(flow)
        except Exception:       # fail closed: a message imguard could not inspect is not forwarded
            logger.exception("chat WebSocket message could not be inspected; dropped")
            flow.websocket.messages[-1].drop()

    async def _websocket_message(self, flow: http.HTTPFlow) -> None:
        sock = self._socket(flow)
        if sock.api is None:
            return
        message = flow.websocket.messages[-1]
        del flow.websocket.messages[:-1]            # a chat socket lives for hours: keep no history
        if message.injected or sock.state is SocketState.UNREADABLE:     # UNREADABLE here: fail mode open
            return
        if not message.from_client:
            await self._websocket_delivered(flow, message, sock)
            return
        key = sock.api.ws_credential(message.content)
        if key:
            sock.credential = key
        self._websocket_sent(flow, message, sock)

    def _websocket_sent(self, flow: http.HTTPFlow, message, sock: ChatSocket) -> None:
        """A client message on a chat socket that posts (Rocket.Chat DDP sendMessage/updateMessage, Slack RTM
        message) decided as a REST message: block -> dropped and the client answered with the API's error."""
        api = sock.api
        found = api.decode_ws(message.content, sock.user or self.user(sock.credential), self.limits)
        replacements = []
        for call_id, index, event in found:
            self.stats["websocket"] += 1
            verdict, reason = self._ws_message(flow, api, event)
            if verdict is None:
                message.drop()
                try:
                    mitm_ctx.master.commands.call("inject.websocket", flow, True,
                                                  api.ws_error(call_id, reason, index is not None))
                except Exception:
                    logger.exception("could not answer a blocked %s WebSocket message", api.API)
                return
            replacements += verdict
        if replacements:
            try:
                message.content = api.rewrite_ws(message.content, replacements)
            except Exception:
                logger.exception("masking a WebSocket message failed; dropped")
                message.drop()

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

    async def _websocket_delivered(self, flow: http.HTTPFlow, message, sock: ChatSocket) -> None:
        """A server message on a chat socket, the one path for every API: read through the socket's codec (Discord's
        zlib stream), who the socket's user is (a login result, hello, READY, a Socket Mode authorization), and the
        messages of others it pushes decided inbound as a history response's are; the message re-encoded for the
        client when it changed (always on a compressed stream)."""
        api = sock.api
        if sock.state is SocketState.BROKEN:
            message.drop()
            return

        def ctx() -> ChatContext:
            return self._context(flow, api.API, "websocket", "", "", recipient=sock.user or self.user(sock.credential))
        data = message.content
        try:
            # Inflating and reading a large payload (a Discord READY of megabytes, ETF) would stall every
            # connection of this worker: it runs in a thread; this socket waits for its verdict in order.
            if len(data) > WS_INLINE_MAX or sock.codec.stream:
                payload, found = await asyncio.to_thread(self._read_server, sock, data)
            else:
                payload, found = self._read_server(sock, data)
        except httpchat.FrameTooLarge as e:     # inflated to its end and discarded: the stream stays in step
            message.drop()
            self._anomaly(ctx(), "chat_websocket_too_large", f"a {api.API} WebSocket message of {e.size} bytes or "
                          f"more (max_delivery_size {self.settings.max_delivery_size}) was dropped undelivered",
                          size=e.size)
            return
        except bodies.BodyError as e:           # the client's inflater follows imguard's stream: nothing more
            sock.state = SocketState.BROKEN     # can reach it, whatever the fail mode
            message.drop()
            self._anomaly(ctx(), "chat_websocket_malformed", f"the {api.API} WebSocket's compressed stream cannot "
                          f"be read ({e}); nothing more is delivered on this connection")
            return
        if payload is None:             # part of a compressed payload: sent with its last part
            message.drop()
            return
        if isinstance(found, bodies.BodyError):
            e, fail_open = found, self.parse_fail_open()
            self._anomaly(ctx(), "chat_websocket_malformed", f"a {api.API} WebSocket message could not be read "
                          f"({e}); " + ("relayed (fail mode http:parse=open)" if fail_open else "dropped"),
                          fail_mode="open" if fail_open else "closed")
            if not fail_open:
                message.drop()
            elif sock.codec.stream:
                message.content = await self._encode(sock, payload)
            return
        for item in found:
            if isinstance(item, Identity) and not item.key and item.user:
                sock.user = item.user
                if sock.credential and sock.credential != item.user:    # the token's user, for REST calls too
                    self.learn_identity(sock.credential, item.user)
        blocked, masked = self._decide_delivered(flow, api, found, sock.user or self.user(sock.credential))
        if blocked or masked:
            try:
                payload = api.rewrite_ws_delivered(payload, blocked, masked)
            except Exception:
                logger.exception("rewriting a delivered %s WebSocket message failed; dropped", api.API)
                message.drop()
                return
        if blocked or masked or sock.codec.stream:
            message.content = await self._encode(sock, payload)

    @staticmethod
    async def _encode(sock: ChatSocket, payload: bytes) -> bytes:
        """The payload as the socket's codec sends it to the client (re-compressed, ETF again): a large one in a
        thread."""
        if len(payload) > WS_INLINE_MAX:
            return await asyncio.to_thread(sock.codec.send, payload)
        return sock.codec.send(payload)

    def _ws_message(self, flow, api, event: ChatMessage) -> tuple[list | None, str]:
        """(replacements, "") or (None, the reason it was blocked)."""
        self.stats["messages"] += 1
        ctx = self._context(flow, api.API, event.endpoint, event.sender, event.room)
        decision = self._check_message(event.text, ctx)
        if decision.blocked:
            self.stats["blocked"] += 1
            return None, decision.notice or f"imguard: message blocked ({block_reason(decision)})"
        if decision.action == MASK:
            self.stats["masked"] += 1
            return bodies.masked_replacements(event.parts, decision.masked_text or ""), ""
        return [], ""
