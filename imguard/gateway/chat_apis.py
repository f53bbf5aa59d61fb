"""Chat over HTTP(S): the mitmproxy addon that puts the client APIs of Matrix, Slack, Mattermost, Rocket.Chat and
Discord through policy, with the pure decoders of imguard/protocols/httpchat.

The state and the decisions are the carrier's (imguard/chatapi.py: ChatApiCarrier, shared with the offline replay,
replay/http.py); this addon only maps mitmproxy's flows to it: a flow's request to an HttpRequest and its addresses to
a base ChatContext, the carrier's answers back to the flow (Respond -> flow.response, Rewrite -> the body, Fate ->
stream / hold / kill, Drop -> message.drop() and the reply injected), a file to scan to the worker pool
(Inspection.check), slow socket work to a thread. It is the carrier (a subclass) with mitmproxy's hooks, so the
gateway and its tests reach the carrier's tables (stats, identities, shared media) on it.

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
                message's (max_message_size), for the channel; it goes on unchanged. The call's tenant
                (httpchat/tenants.py) is named here: a host only when the client's SNI or the upstream
                certificate (_upstream) names it, else unknown with a tenant_mismatch anomaly.
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
                  check_message (recorded: alert log, archive; an encrypted one, Matrix m.room.encrypted, with
                  no text, its scheme as the context's encryption, and an e2e_encrypted anomaly); block ->
                  api.rewrite_delivered puts the notice "A message from X was blocked by imguard: <reason>" in
                  its place (the API's own shape: the Matrix event's content, and an encrypted event's type made
                  m.room.message; the Slack/Mattermost/Rocket.Chat/Discord message text, its files and
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
import logging
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from mitmproxy import ctx as mitm_ctx
from mitmproxy import http

from imguard.chatapi import (RESPONSE_KEEP, SLOT, WS_INLINE_MAX, ChatApiCarrier, ChatApiSettings, ChatCall,  # noqa: F401
                             ChatSocket, Drop, Fate, Inspect, Respond, Rewrite, SocketState, Step)
from imguard.gateway import http_uploads
from imguard.gateway.http_uploads import flow_context
from imguard.gateway.inspection import Inspection
from imguard.model import ChatContext
from imguard.protocols.httpchat import tenants
from imguard.protocols.httpchat.events import HttpRequest

logger = logging.getLogger("imguard.gateway")

META = "imguard_chat"               # flow.metadata: the ChatCall of a chat call
WS = "imguard_chat_socket"          # flow.metadata: the ChatSocket of a chat WebSocket

__all__ = ["ChatApis", "ChatApiSettings", "ChatSocket", "SocketState"]


class ChatApis(ChatApiCarrier):
    """The carrier (imguard/chatapi.py) with mitmproxy's hooks: flows in, the carrier's answers carried out."""

    def __init__(self, pipeline, inspection: Inspection, transfers: Any = None,
                 settings: ChatApiSettings | None = None, record: Any = None, commit: Any = None,
                 parse_fail_open: Callable[[], bool] | None = None):
        super().__init__(pipeline, inspection, transfers, settings, record, commit, parse_fail_open)
        self.worker_pool = inspection       # Inspection.check answers the carrier's Inspect

    # --- flows <-> the carrier's terms --------------------------------------------------------------------

    @staticmethod
    def _request(flow: http.HTTPFlow, body: bytes) -> HttpRequest:
        parts = urlsplit(flow.request.path)
        return HttpRequest(flow.request.method.upper(), flow.request.pretty_host, parts.path or "/",
                           tuple(parse_qsl(parts.query, keep_blank_values=True)),
                           tuple((k.lower(), v) for k, v in flow.request.headers.items(multi=True)), body)

    @staticmethod
    def _base(flow: http.HTTPFlow) -> ChatContext:
        """The flow's addresses and connection (gateway/http_uploads.flow_context), for the carrier's contexts."""
        return flow_context(flow, "")

    @staticmethod
    def _upstream(flow: http.HTTPFlow) -> tenants.Upstream:
        """What the connection vouches for (the tenant's host is checked against it, httpchat/tenants.py): the SNI
        the client sent, the DNS names and addresses of the upstream certificate (verified: ssl_insecure is off;
        its subject CN only when it has no subjectAltName)."""
        names: list[str] = []
        server = flow.server_conn
        certs = server.certificate_list if server is not None and server.tls else []
        if certs:
            sans = certs[0].altnames
            names = [*sans.get_values_for_type(x509.DNSName),
                     *(str(a) for a in sans.get_values_for_type(x509.IPAddress))] or [certs[0].cn or ""]
        sni = flow.client_conn.sni if flow.client_conn.tls else ""
        return tenants.Upstream(sni or "", tuple(n for n in names if n))

    def _call(self, flow: http.HTTPFlow) -> ChatCall | None:
        call = flow.metadata.get(META)
        if call is not None:
            call.base = self._base(flow)
        return call

    @staticmethod
    def _answer(flow: http.HTTPFlow, respond: Respond) -> None:
        flow.request.stream = False
        flow.response = http.Response.make(respond.status, respond.body, {"content-type": respond.content_type})

    async def _drive(self, step: Step) -> Any:
        """Run a carrier step: Inspect answered by the worker pool, Offload run in a thread."""
        try:
            request = next(step)
            while True:
                try:
                    if isinstance(request, Inspect):
                        answer = await self.worker_pool.check(request.data, request.context, request.name,
                                                              request.mime)
                    else:
                        answer = await asyncio.to_thread(request.fn)
                except Exception as e:
                    request = step.throw(e)
                    continue
                request = step.send(answer)
        except StopIteration as stop:
            return stop.value

    # --- hooks --------------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or http_uploads.META in flow.metadata:
            return                  # answered already, or an announced / configured upload HttpUploads holds
        if self._websocket_handshake(flow):
            return
        req = flow.request
        length = req.headers.get("content-length", "")
        call, fate = self.request_headers(self._request(flow, b""), self._base(flow),
                                          urls=(req.pretty_url, req.url),
                                          content_length=int(length) if length.isdigit() else None,
                                          upstream=self._upstream(flow))
        if call is not None:
            flow.metadata[META] = call
        if isinstance(fate, Respond):
            self._answer(flow, fate)
        elif fate is Fate.BUFFER:
            req.stream = False      # buffer: nothing reaches the server before the verdict
        elif fate is Fate.STREAM:
            req.stream = True

    async def request(self, flow: http.HTTPFlow) -> None:
        call = self._call(flow)
        if call is None or call.done or flow.response is not None:
            return
        try:
            try:
                req = self._request(flow, flow.request.get_content(strict=True) or b"")
                problem = ""
            except ValueError as e:
                req, problem = None, str(e)
            outcome = await self._drive(self.request_body(call, req, problem))
        except Exception:       # mitmproxy would log a hook's exception and forward the request: fail closed
            logger.exception("%s %s: inspection failed; request refused", call.api.API, call.ep.name)
            outcome = self._refuse(call, call.api.API, 403, "imguard: the request could not be inspected and was "
                                   "refused")
        if isinstance(outcome, Respond):
            self._answer(flow, outcome)
        elif isinstance(outcome, Rewrite):
            flow.request.content = outcome.body

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = self._call(flow)
        if call is None:
            return
        fate = self.response_headers(call, flow.response.status_code,
                                     {k.lower(): v for k, v in flow.response.headers.items()})
        if fate is Fate.HOLD:
            flow.response.stream = False
        elif fate is Fate.STREAM:
            flow.response.stream = True
        elif fate is Fate.KILL:
            flow.kill()
        elif fate is Fate.COLLECT:
            flow.response.stream = call.keep

    async def response(self, flow: http.HTTPFlow) -> None:
        call = self._call(flow)
        if call is None or call.answered:
            return
        if call.held:
            try:
                outcome = await self._drive(self.response_body(
                    call, flow.response.status_code, {k.lower(): v for k, v in flow.response.headers.items()},
                    flow.response.get_content(strict=False) or b""))
            except Exception:   # fail closed: what imguard could not inspect does not reach the user
                logger.exception("%s %s: inspecting the response failed; refused", call.api.API, call.ep.name)
                outcome = self.refuse_failed(call)
            if isinstance(outcome, Respond):
                self._answer(flow, outcome)
            elif isinstance(outcome, Rewrite):
                flow.response.content = outcome.body
            elif outcome is Fate.KILL:
                flow.kill()
            return
        if not call.ep.learn:
            return
        body = bytes(call.kept) or (flow.response.raw_content or b"")
        encoding = flow.response.headers.get("content-encoding", "")
        if body and encoding and encoding != "identity":
            try:
                from mitmproxy.net import encoding as enc
                body = enc.decode(body, encoding)
            except Exception:
                return
        self.response_learned(call, flow.response.status_code, body)

    def error(self, flow: http.HTTPFlow) -> None:
        call = self._call(flow)
        if call is not None:
            self.request_failed(call, flow.error.msg if flow.error else "unknown error")

    # --- WebSockets ---------------------------------------------------------------------------------------

    def _socket(self, flow: http.HTTPFlow) -> ChatSocket:
        """The chat socket state of a WebSocket flow (made at its handshake, or at its first message)."""
        sock = flow.metadata.get(WS)
        if sock is None:
            sock = flow.metadata[WS] = self.socket(self._request(flow, b""), self._base(flow), self._upstream(flow))
        elif sock.api is not None:
            sock.base = self._base(flow)
        return sock

    def _websocket_handshake(self, flow: http.HTTPFlow) -> bool:
        """A WebSocket upgrade to a chat API: its state made; refused (400) when the carrier says so. True when
        answered."""
        if not self.settings.websocket or flow.request.headers.get("upgrade", "").lower() != "websocket":
            return False
        refused = self.handshake(self._socket(flow))
        if refused is None:
            return False
        self._answer(flow, refused)
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
        if message.injected:
            return
        if message.from_client:
            outcome = self.client_message(sock, message.content)
        else:
            outcome = await self._drive(self.server_message(sock, message.content))
        if isinstance(outcome, Rewrite):
            message.content = outcome.body
        elif isinstance(outcome, Drop):
            message.drop()
            if outcome.reply is not None:
                try:
                    mitm_ctx.master.commands.call("inject.websocket", flow, True, outcome.reply)
                except Exception:
                    logger.exception("could not answer a blocked %s WebSocket message", sock.api.API)
