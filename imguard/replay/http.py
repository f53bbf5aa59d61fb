"""HTTP uploads and downloads in a capture: the offline counterpart of imguard.gateway.http_uploads.

The gateway scans uploads inside mitmproxy's HTTP flow hooks; a capture has no mitmproxy, so this is
a small sans-io HTTP/1.x request and response reader with the same decisions (a StreamSession, like the chat
sessions):

  * a PUT/POST whose URL a chat session announced (XEP-0363 slot: ExpectedTransfers.take_upload; a Yahoo
    relay or peer-to-peer transfer: find_ymsg_transfer) or that matches an `upload_paths` expression is held
    whole and inspected (InspectFile, mechanism "xep-0363" or "upload"); blocked: the client would have had a
    403 and the download URL is marked blocked, so a chat message that shares it later is stopped as well;
  * a GET of a URL marked blocked would have had a 403 (the server's answer to it does not cross);
  * a GET of a file shared *with* the user behind the gateway (ExpectedTransfers.expected_download: an
    XEP-0066 OOB link or an XEP-0363 URL in a Jingle offer that the server delivered to an XMPP client; or a
    Yahoo transfer offered to it, find_ymsg_transfer) has its 200 response held whole and inspected (inbound,
    mechanism "xep-0363-get" or "download", the context the chat session gave it), as the gateway's
    http_uploads holds it; blocked: the client would have had a 403 instead, an XMPP link is marked blocked,
    and the chat connection that announced it is told (Notify);
  * everything else crosses untouched.

Each held request drives a HeldTransfer (imguard.files.tracker; kind "http", the client its sender, not
owning the connection: requests follow one another on it). Its payload is the body, de-chunked, which
is what is inspected; its wire bytes are every byte of the request (head, chunk sizes, CRLFs,
trailers), so an allowed request is released to the server exactly as it came. This module keeps only
the HTTP framing and says, through the tracker's `refuse` hook, what a stopped upload gets: the 403
and the blocked download URL.

Chat API calls (Matrix, Slack, Mattermost, Rocket.Chat, Discord) go to the replay's chat carrier
(imguard/chatapi.py, the gateway's ChatApis addon without mitmproxy), driven as the addon drives it: the head to
request_headers; a call it buffers is held whole (de-chunked, its Content-Encoding undone: decode_content) for
request_body, whose Respond replaces it (the client gets the API's error; nothing reaches the server); a response
it holds (a download, a history) is read whole for response_body, a learning one (login, whoami, upload URLs) kept
for response_learned while it crosses. A file the carrier scans leaves as an InspectFile, and the carrier's step
waits for its file_verdict. After the 101 of a chat WebSocket, both sides' frames (replay/websocket.py) go to it
message by message. A 101 to anything else ends decoding: the rest of the connection is relayed.

Responses are framed (status line, Content-Length, chunked, or to the close) and paired with their requests in
order, so a held download's response is found on a kept-alive connection; the others are relayed as they come.
Requests are bounded: a header block over `max_header_bytes` or a body over `max_upload_size` ends
decoding with an anomaly (a body too large to hold is inspected as what was held, marked truncated,
so policy sees an unscannable file rather than nothing).
"""

from __future__ import annotations

import collections
import enum
import gzip
import re
import zlib
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from typing import Any
from urllib.parse import unquote, urlsplit

from imguard.chatapi import (RESPONSE_KEEP, ChatApiCarrier, ChatCall, ChatSocket, Drop, Fate, Inspect, Respond,
                             Rewrite, Step)
from imguard.files import downloads
from imguard.files.expected import ExpectedDownload, ExpectedUpload
from imguard.files.tracker import ConnectionHolds, HeldTransfer, HoldState, Notice, Party
from imguard.model import FROM_CLIENT, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Command, InspectFile, Notify, Send, StreamSession
from imguard.protocols.httpchat.events import HttpRequest
from imguard.replay import websocket as ws
from imguard.protocols.ymsg import YmsgTransfer, find_ymsg_transfer
from imguard.settings import KiB, MiB, setting


@dataclass(frozen=True)
class HttpLimits:
    """HTTP uploads in captures."""

    max_header_bytes: int = setting(64 * KiB, "Longest request head (request line and headers); a longer one "
                                    "stops decoding that connection with an anomaly")
    max_upload_size: int = setting(64 * MiB, "Largest upload body held for inspection, as the gateway's "
                                   "max_upload_size; a larger one is inspected as held, marked truncated")
    upload_paths: tuple = setting((), "URL regular expressions of upload endpoints scanned even when no chat "
                                  "session announced them, as the gateway's upload_paths")


_METHODS_WITH_BODY = (b"PUT", b"POST", b"PATCH")


class RequestState(enum.Enum):
    """Where the reader is in the client's current request."""
    HEAD = "head"                     # request line and headers, up to the empty line
    BODY = "body"                     # a Content-Length body
    CHUNK_SIZE = "chunk_size"         # a chunk's size line
    CHUNK_DATA = "chunk_data"         # a chunk's data
    CHUNK_CRLF = "chunk_crlf"         # the CRLF after a chunk's data
    CHUNK_TRAILER = "chunk_trailer"   # trailer lines after the last chunk, up to an empty one
    DONE = "done"                     # given up: the rest of the connection is relayed untouched


@dataclass(frozen=True)
class HeldUpload:
    """What the head of a held upload request said."""
    url: str                            # the URL it was sent to
    expected: ExpectedUpload | YmsgTransfer | None  # what a chat session announced for it (None: upload_paths)
    content_type: str                   # its Content-Type header

    @property
    def download_url(self) -> str:
        """The URL to mark blocked: the slot's GET URL, else the upload URL itself."""
        return getattr(self.expected, "get_url", "") or self.url

    @property
    def name(self) -> str:
        return (self.expected.name if self.expected is not None else "") or \
            unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])

    @property
    def claimed_mime(self) -> str:
        return getattr(self.expected, "content_type", "") or self.content_type

    def context(self, connection: ChatContext) -> ChatContext:
        """The file's context: the announcer's (sender, conversation), with this connection's addresses."""
        base = dict(client_address=connection.client_address, server_address=connection.server_address,
                    connection_id=connection.connection_id,
                    transfer_mechanism="xep-0363" if self.expected is not None else "upload",
                    origin=FROM_CLIENT)     # a request's body comes from the client (the gateway's flow_context)
        announcer = self.expected.context if self.expected is not None else None
        if isinstance(announcer, ChatContext):
            return announcer.with_(**{k: v for k, v in base.items() if not getattr(announcer, k)})
        return ChatContext(protocol="http", **base)


class ResponseState(enum.Enum):
    """Where the reader is in the server's current response."""
    HEAD = "head"                     # status line and headers, up to the empty line
    BODY = "body"                     # a Content-Length body
    CHUNK_SIZE = "chunk_size"
    CHUNK_DATA = "chunk_data"
    CHUNK_CRLF = "chunk_crlf"
    CHUNK_TRAILER = "chunk_trailer"
    TO_CLOSE = "to_close"             # no length: the body ends when the server closes
    DONE = "done"                     # given up: the rest of the connection is relayed untouched


class ResponseFate(enum.Enum):
    """What becomes of the response being read."""
    FORWARD = "forward"               # crosses as it comes
    DROP = "drop"                     # the request was answered by imguard (a 403): the server's answer never crosses
    HOLD = "hold"                     # a download shared with our user: held for its verdict
    CHAT_HOLD = "chat_hold"           # a chat API's download or delivery: held whole for the chat carrier
    CHAT_COLLECT = "chat_collect"     # a chat API's learning response: crosses, its first bytes kept


@dataclass
class PendingRequest:
    """A request whose response has not been read yet (responses come in request order)."""
    method: bytes
    url: str
    download: ExpectedDownload | None = None    # a file shared with our user: its 200 response is held
    answered: bool = False                      # imguard answered it itself: the server's answer is dropped
    extra: dict = field(default_factory=dict)
    chat: ChatCall | None = None                # a chat API call the chat carrier holds
    socket: ChatSocket | None = None            # a WebSocket upgrade to a chat API: its state


@dataclass
class HeldChatBody:
    """A chat API request or response body read whole for the chat carrier (as mitmproxy buffers it)."""
    call: ChatCall
    head: bytes
    headers: dict[str, str]
    status: int = 0
    body: bytearray = field(default_factory=bytearray)     # the payload, de-chunked
    wire: bytearray = field(default_factory=bytearray)     # every byte as it crossed
    limit: int = 0                                          # bytes of payload kept (more is only counted)
    size: int = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.body) <= self.limit:
            self.body += data[:self.limit + 1 - len(self.body)]
        self.wire += data


class ChatSocketStream:
    """A chat WebSocket after its 101: each direction's frames to whole messages (replay/websocket.py), handed to
    the chat carrier as mitmproxy's WebSocket layer hands them to the gateway's."""

    def __init__(self, sock: ChatSocket, deflate: ws.Deflate | None, max_message: int):
        self.sock = sock
        self.readers = {True: ws.WsReader(True, deflate, max_message), False: ws.WsReader(False, deflate, max_message)}


class HttpUploadSession(StreamSession):
    """One HTTP/1.x connection seen in a capture: client requests decoded, server bytes relayed."""

    def __init__(self, transfers: Any, context: ChatContext, limits: HttpLimits = HttpLimits(),
                 chat: ChatApiCarrier | None = None):
        self.transfers = transfers
        self.chat = chat                 # the replay's chat-API carrier (imguard/chatapi.py), shared by its sessions
        self._chat_request: HeldChatBody | None = None     # a chat request being read whole
        self._chat_response: HeldChatBody | None = None    # a chat response being read whole (or its first bytes)
        self._chat_steps: dict[str, tuple[Step, Any]] = {}  # carrier steps waiting for a file verdict
        self._socket: ChatSocketStream | None = None        # after a chat WebSocket's 101
        self._discard = False            # the request's body is dropped (imguard answered it)
        self.context = context.with_(protocol=context.protocol or "http")
        self.limits = limits
        self._paths = [re.compile(p) for p in limits.upload_paths]
        self._buf = bytearray()
        self._state = RequestState.HEAD
        self._remaining = 0              # bytes left of the body, of the chunk, or of its CRLF
        self._counter = 0
        self._holds = ConnectionHolds()  # the held requests of this connection, counted in the process ledger
        self._upload: HeldTransfer | None = None    # the request being read, when it is held
        self._inspecting: dict[str, HeldTransfer] = {}   # held requests and responses out for inspection
        self._pending: collections.deque[PendingRequest] = collections.deque()
        self._rbuf = bytearray()
        self._rstate = ResponseState.HEAD
        self._rremaining = 0
        self._fate = ResponseFate.FORWARD
        self._download: HeldTransfer | None = None      # the response being read, when it is held
        self._status = 0

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self._socket is not None:
            return self._socket_data(from_client, data)
        if not from_client:
            return self._server_data(data)
        if self._state is RequestState.DONE:
            return [Send(to_client=False, data=data)]
        self._buf += data
        out: list[Command] = []
        while self._buf and self._state is not RequestState.DONE:
            before = (self._state, len(self._buf))
            if self._state is RequestState.HEAD:
                out += self._read_head()
            elif self._state is RequestState.BODY:
                take = bytes(self._buf[:self._remaining])
                del self._buf[:len(take)]
                self._remaining -= len(take)
                out += self._body_bytes(take)
                if self._remaining == 0 and self._state is RequestState.BODY:
                    out += self._request_done()
            else:
                out += self._read_chunked()
            if (self._state, len(self._buf)) == before:
                break
        return out

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        waiting = self._chat_steps.pop(transfer_id, None)
        if waiting is not None:
            step, done = waiting
            return self._chat_run(step, done, (report, decision))
        upload = self._inspecting.pop(transfer_id, None)
        if upload is None:
            return []
        # allowed: the tracker's default delivery, the request's wire bytes in one write to the server
        return upload.verdict(decision)

    def connection_closed(self, from_client: bool) -> list[Command]:
        if from_client and self._chat_request is not None and self.chat is not None:
            held, self._chat_request = self._chat_request, None
            self.chat.request_failed(held.call, "the client closed the connection")
            return []
        if not from_client and self._chat_response is not None:
            return self._chat_response_done()       # read to the close
        if not from_client:
            if self._download is None:
                return []
            # A body read to the close is whole; one with a length or chunks that stopped early is truncated.
            return self._inspect_download(truncated=self._rstate is not ResponseState.TO_CLOSE)
        if self._upload is None:
            return []
        # The request ended before its body did: inspect what came, marked truncated.
        return self._inspect(truncated=True)

    # --- requests -----------------------------------------------------------------------------------

    def _read_head(self) -> list[Command]:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > self.limits.max_header_bytes:
                return self._give_up("http_header_too_long", f"a request head over {self.limits.max_header_bytes} "
                                     "bytes")
            return []
        head = bytes(self._buf[:end + 4])
        del self._buf[:end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._buf[:0] = head
            return self._give_up("http_bad_request", f"not an HTTP/1.x request line: {lines[0][:80]!r}")
        method, target = parts[0], parts[1].decode("latin-1")
        headers: dict[str, str] = {}
        pairs: list[tuple[str, str]] = []           # every header, repeated ones too (the chat carrier's request)
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                pairs.append((name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")))
                headers[pairs[-1][0]] = pairs[-1][1]
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length", "0").strip()
        self._remaining = int(length) if length.isdigit() else 0
        urls = self._urls(target, headers)
        out: list[Command] = []
        pending = PendingRequest(method, urls[0])
        self._pending.append(pending)
        if method == b"GET" and self.transfers is not None:
            reason = next((r for r in (self.transfers.blocked_url_reason(u) for u in urls) if r), None)
            if reason:
                out.append(Anomaly(self.context, "blocked_download", "a download of a file that was blocked",
                                   data={"url": urls[0], "reason": reason}))
                out.append(Send(to_client=True, data=_response(403, f"imguard: blocked ({reason})")))
                head = b""
                pending.answered = True
            else:
                pending.download = next((d for d in map(self._expected_download, urls) if d is not None), None)
        elif method in _METHODS_WITH_BODY:
            expected, url = None, urls[0]
            for candidate in urls:
                expected = self._expected_upload(candidate)
                if expected is not None:
                    url = candidate
                    break
            if expected is not None or any(p.search(u) for p in self._paths for u in urls):
                self._upload = self._held_transfer(HeldUpload(url, expected, headers.get("content-type", "")))
        if self.chat is not None and self._upload is None and not pending.answered and pending.download is None:
            answer = self._chat_request_head(pending, method, target, headers, pairs, urls, head)
            if answer is not None:
                out += answer
                head = b""
        out += self._raw(head)
        if chunked:
            self._state = RequestState.CHUNK_SIZE
        elif self._remaining:
            self._state = RequestState.BODY
        else:
            out += self._request_done()
        return out

    def _expected_upload(self, url: str) -> ExpectedUpload | YmsgTransfer | None:
        """Whose upload this is, as the gateway's HTTP side asks: an XEP-0363 slot (taken: one PUT per slot), else a
        Yahoo relay or peer-to-peer transfer (find_ymsg_transfer)."""
        if self.transfers is None:
            return None
        return self.transfers.take_upload(url) or find_ymsg_transfer(self.transfers, url=url)

    def _expected_download(self, url: str) -> ExpectedDownload | YmsgTransfer | None:
        """A file announced as coming to our user by this GET: a link shared with it (ExpectedDownload), else a Yahoo
        transfer offered to it (find_ymsg_transfer, not outbound)."""
        if self.transfers is None:
            return None
        found = self.transfers.expected_download(url)
        if found is None:
            found = find_ymsg_transfer(self.transfers, url=url)
            if found is not None and found.outbound:
                return None
        return found

    def _urls(self, target: str, headers: dict[str, str]) -> list[str]:
        if "://" in target:
            return [target]
        host = headers.get("host", "") or self.context.server_address
        urls = [f"http://{host}{target}"]
        if self.context.server_address and self.context.server_address != host:
            urls.append(f"http://{self.context.server_address}{target}")
        return urls

    def _body_bytes(self, data: bytes) -> list[Command]:
        if self._chat_request is not None:
            self._chat_request.add(data)
            return []
        if self._discard:
            return []
        upload = self._upload
        if upload is None:
            return [Send(to_client=False, data=data)] if data else []
        if len(data) > upload.room:
            return self._too_large(upload, data)
        out = upload.append(data)
        if upload.state is not HoldState.RECEIVING:     # cut: the connection's or the process's hold bound
            self._stop_decoding()
        return out

    def _too_large(self, upload: HeldTransfer, data: bytes) -> list[Command]:
        """A body over max_upload_size: what fits is inspected, marked truncated, and decoding stops. Every byte
        read so far stays with the request (released with it, or dropped with it); later ones are relayed."""
        fits, rest = data[:upload.room], data[upload.room:] + bytes(self._buf)
        self._buf.clear()
        out = upload.append(fits)
        if rest:
            out += upload.append(b"", rest)     # read with it: kept with it, but not inspected
        out += self._inspect(truncated=True)
        self._stop_decoding()
        return out + [Anomaly(self.context, "http_upload_too_large", f"an upload over max_upload_size "
                              f"({self.limits.max_upload_size}); the rest is not decoded")]

    def _read_chunked(self) -> list[Command]:
        out: list[Command] = []
        if self._state is RequestState.CHUNK_SIZE:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return []
            line = bytes(self._buf[:end + 2])
            del self._buf[:end + 2]
            out += self._raw(line)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                return out + self._give_up("http_bad_chunk", f"a bad chunk size line {line[:40]!r}")
            self._remaining = size
            self._state = RequestState.CHUNK_DATA if size else RequestState.CHUNK_TRAILER
        elif self._state is RequestState.CHUNK_DATA:
            data = bytes(self._buf[:self._remaining])
            del self._buf[:len(data)]
            self._remaining -= len(data)
            out += self._body_bytes(data)
            if self._remaining == 0 and self._state is RequestState.CHUNK_DATA:
                self._state, self._remaining = RequestState.CHUNK_CRLF, 2
        elif self._state is RequestState.CHUNK_CRLF:
            crlf = bytes(self._buf[:self._remaining])
            del self._buf[:len(crlf)]
            self._remaining -= len(crlf)
            out += self._raw(crlf)
            if self._remaining == 0:
                self._state = RequestState.CHUNK_SIZE
        else:                                                           # trailer: lines until an empty one
            end = self._buf.find(b"\r\n")
            if end < 0:
                return []
            line = bytes(self._buf[:end + 2])
            del self._buf[:end + 2]
            out += self._raw(line)
            if line == b"\r\n":
                out += self._request_done()
        return out

    def _raw(self, data: bytes) -> list[Command]:
        """Framing bytes (head, chunk sizes, CRLFs): held in place with a held request, else forwarded."""
        if self._chat_request is not None:
            self._chat_request.wire += data
            return []
        if self._discard:
            return []
        if self._upload is not None:
            return self._upload.append(b"", data) if data else []
        return [Send(to_client=False, data=data)] if data else []

    def _request_done(self) -> list[Command]:
        self._state = RequestState.HEAD
        self._discard = False
        if self._chat_request is not None:
            return self._chat_request_done()
        if self._upload is None:
            return []
        return self._inspect(truncated=False)

    def _inspect(self, truncated: bool) -> list[Command]:
        """The held request is whole (or all there will be): the body goes out for inspection."""
        upload, self._upload = self._upload, None
        if upload is None:
            return []
        out = upload.inspect(truncated=truncated)
        if upload.state is HoldState.INSPECTING:
            self._inspecting[upload.transfer_id] = upload
        return out

    def _held_transfer(self, request: HeldUpload) -> HeldTransfer:
        self._counter += 1
        return HeldTransfer(
            f"http:{self.context.connection_id}:{self._counter}", request.context(self.context),
            sender_is_client=True, kind="http", max_bytes=self.limits.max_upload_size, name=request.name,
            claimed_mime=request.claimed_mime, owns_connection=False, holds=self._holds,
            refuse=lambda transfer: self._refuse(transfer, request))

    def _refuse(self, transfer: HeldTransfer, request: HeldUpload) -> list[Command]:
        """A stopped upload: the client has a 403 instead of the server's answer, and the download URL is marked
        blocked, so a chat message that shares it later is stopped as well."""
        decision = transfer.decision
        if decision is not None:
            reason = decision.notice or (", ".join(decision.rule_ids) if decision.rule_ids else decision.action)
        else:
            reason = "not inspected"        # cut before it was whole
        if self.transfers is not None:
            self.transfers.mark_blocked_url(request.download_url, reason)
        return [Send(to_client=True, data=_response(403, f"imguard: upload blocked ({reason})"))]

    # --- chat APIs: the chat carrier (imguard/chatapi.py), as the gateway's ChatApis addon drives it --------------

    def _chat_request_head(self, pending: PendingRequest, method: bytes, target: str, headers: dict[str, str],
                           pairs: list[tuple[str, str]], urls: list[str], head: bytes) -> list[Command] | None:
        """A request's head to the chat carrier: None when the head crosses as usual (not a chat call, or one whose
        response is held); else what the client gets instead (the request is answered: its head and body dropped),
        or [] when the request is held whole (its head with it)."""
        parts = urlsplit(target)
        host = parts.hostname or (headers.get("host", "") or self.context.server_address).rsplit(":", 1)[0]
        req = HttpRequest(method.decode("latin-1").upper(), host.lower(), parts.path or "/", tuple(_query(parts.query)),
                          tuple(pairs))
        if "websocket" in headers.get("upgrade", "").lower():
            sock = self.chat.socket(req, self.context)
            refused = self.chat.handshake(sock)
            if refused is not None:
                return self._chat_answer(pending, refused)
            if sock.api is not None:
                pending.socket = sock
            return None
        length = headers.get("content-length", "").strip()
        call, fate = self.chat.request_headers(req, self.context, urls=tuple(urls),
                                               content_length=int(length) if length.isdigit() else None)
        if isinstance(fate, Respond):
            return self._chat_answer(pending, fate)
        if call is None:
            return None
        pending.chat = call
        if fate is Fate.BUFFER:
            limit = max(self.chat.settings.max_upload_size, self.chat.settings.max_message_size)
            self._chat_request = HeldChatBody(call, head, headers, limit=limit)
            return []
        return None

    def _chat_answer(self, pending: PendingRequest, respond: Respond) -> list[Command]:
        """The client gets the carrier's answer; the request (whatever of it is still to come) does not cross."""
        pending.answered = True
        self._discard = True
        return [Send(to_client=True, data=_response(respond.status, respond.body, respond.content_type))]

    def _chat_request_done(self) -> list[Command]:
        held, self._chat_request = self._chat_request, None
        try:
            body, problem = decode_content(bytes(held.body), held.headers.get("content-encoding", "")), ""
            req = dataclasses_replace(held.call.request, body=body)
        except ValueError as e:
            req, problem = None, str(e)

        def done(outcome) -> list[Command]:
            if isinstance(outcome, Respond):
                return [Send(to_client=True, data=_response(outcome.status, outcome.body, outcome.content_type))]
            if isinstance(outcome, Rewrite):
                return [Send(to_client=False, data=held.head + outcome.body)]
            return [Send(to_client=False, data=held.head + bytes(held.wire))]
        return self._chat_run(self.chat.request_body(held.call, req, problem), done)

    def _chat_run(self, step: Step, done, answer: Any = None, started: bool = True) -> list[Command]:
        """Drive a carrier step: an Offload runs at once; an Inspect leaves as an InspectFile, and the step waits for
        its file_verdict; `done(outcome)` gives the commands of the outcome."""
        try:
            request = step.send(answer) if answer is not None else next(step)
            while not isinstance(request, Inspect):
                try:
                    result = request.fn()
                except Exception as e:
                    request = step.throw(e)
                    continue
                request = step.send(result)
        except StopIteration as stop:
            return done(stop.value)
        self._counter += 1
        transfer_id = f"chat:{self.context.connection_id}:{self._counter}"
        self._chat_steps[transfer_id] = (step, done)
        return [InspectFile(transfer_id, request.data, request.context, request.name, request.mime)]

    def _chat_response_head(self, call: ChatCall, status: int, headers: dict[str, str], head: bytes) -> ResponseFate:
        fate = self.chat.response_headers(call, status, headers)
        if fate is Fate.HOLD:
            limit = max(self.chat.settings.max_upload_size, self.chat.settings.max_delivery_size)
            self._chat_response = HeldChatBody(call, head, headers, status, limit=limit)
            return ResponseFate.CHAT_HOLD
        if fate is Fate.COLLECT:
            # as the gateway's collector: the first RESPONSE_KEEP bytes as they came
            self._chat_response = HeldChatBody(call, head, headers, status, limit=RESPONSE_KEEP - 1)
            return ResponseFate.CHAT_COLLECT
        if fate is Fate.KILL:
            return ResponseFate.DROP
        return ResponseFate.FORWARD

    def _chat_response_done(self) -> list[Command]:
        held, self._chat_response = self._chat_response, None
        try:
            body = decode_content(bytes(held.body), held.headers.get("content-encoding", ""))
        except ValueError:
            if not held.call.held:      # a learning response that cannot be read teaches nothing (as inline)
                return []
            body = bytes(held.body)     # as mitmproxy's get_content(strict=False): the bytes as they came
        if not held.call.held:          # a learning response: it crossed already
            self.chat.response_learned(held.call, held.status, body)
            return []

        def done(outcome) -> list[Command]:
            if isinstance(outcome, Respond):
                return [Send(to_client=True, data=_response(outcome.status, outcome.body, outcome.content_type))]
            if isinstance(outcome, Rewrite):
                return [Send(to_client=True, data=held.head + outcome.body)]
            if outcome is Fate.KILL:
                return []
            return [Send(to_client=True, data=bytes(held.wire))]
        return self._chat_run(self.chat.response_body(held.call, held.status, held.headers, body), done)

    def _upgraded(self, pending: PendingRequest, head: bytes, headers: dict[str, str]) -> list[Command]:
        """101 Switching Protocols: the connection is no longer HTTP. A chat socket's messages go to the carrier
        (what is already read of either side with them); any other is relayed untouched."""
        self._pending.popleft()
        out = [Send(to_client=True, data=head)]
        rest_server, rest_client = bytes(self._rbuf), bytes(self._buf)
        self._rbuf, self._buf = bytearray(), bytearray()
        if pending.socket is None or "websocket" not in headers.get("upgrade", "").lower():
            self._rstate, self._state = ResponseState.DONE, RequestState.DONE
            return out + ([Send(to_client=True, data=rest_server)] if rest_server else []) + \
                ([Send(to_client=False, data=rest_client)] if rest_client else [])
        deflate = ws.Deflate.negotiated(headers.get("sec-websocket-extensions", ""))
        self._socket = ChatSocketStream(pending.socket, deflate, self.chat.settings.max_delivery_size + 1)
        if rest_client:
            out += self._socket_data(True, rest_client)
        if rest_server:
            out += self._socket_data(False, rest_server)
        return out

    def _socket_data(self, from_client: bool, data: bytes) -> list[Command]:
        stream = self._socket
        reader = stream.readers[from_client]
        if reader.broken:               # that side could not be followed: relayed, not decoded
            return [Send(to_client=not from_client, data=data)]
        out: list[Command] = []
        for item in reader.feed(data):
            if isinstance(item, ws.WsControl):
                out.append(Send(to_client=not from_client, data=item.wire))
            elif isinstance(item, ws.WsError):
                out.append(Anomaly(self.context, "websocket_unreadable", f"a chat WebSocket: {item.detail}; the rest "
                                   "of that side is not decoded"))
                out.append(Send(to_client=not from_client, data=item.wire))
            elif from_client:
                out += self._socket_outcome(item, True, self.chat.client_message(stream.sock, item.payload))
            else:
                out += self._chat_run(self.chat.server_message(stream.sock, item.payload),
                                      lambda outcome, item=item: self._socket_outcome(item, False, outcome))
        return out

    @staticmethod
    def _socket_outcome(item: ws.WsMessage, from_client: bool, outcome) -> list[Command]:
        """What crosses for a socket message: as it came, rewritten (one unmasked frame: the replay keeps what would
        have crossed, not its exact framing), or nothing (and the carrier's reply to the sender)."""
        if isinstance(outcome, Rewrite):
            return [Send(to_client=not from_client, data=ws.frame(item.opcode, outcome.body))]
        if isinstance(outcome, Drop):
            return [Send(to_client=from_client, data=ws.frame(ws.TEXT, outcome.reply))] if outcome.reply else []
        return [Send(to_client=not from_client, data=item.wire)]

    # --- responses ----------------------------------------------------------------------------------

    def _server_data(self, data: bytes) -> list[Command]:
        if self._rstate is ResponseState.DONE:
            return [Send(to_client=True, data=data)]
        self._rbuf += data
        out: list[Command] = []
        while self._rbuf and self._rstate is not ResponseState.DONE:
            before = (self._rstate, len(self._rbuf))
            if self._rstate is ResponseState.HEAD:
                out += self._read_response_head()
            elif self._rstate in (ResponseState.BODY, ResponseState.TO_CLOSE):
                take = bytes(self._rbuf if self._rstate is ResponseState.TO_CLOSE else self._rbuf[:self._rremaining])
                del self._rbuf[:len(take)]
                self._rremaining -= len(take)
                out += self._response_body(take)
                if self._rstate is ResponseState.BODY and self._rremaining == 0:
                    out += self._response_done()
            else:
                out += self._read_response_chunked()
            if (self._rstate, len(self._rbuf)) == before:
                break
        return out

    def _read_response_head(self) -> list[Command]:
        if not self._pending:           # nothing asked for it: relayed as it comes
            data, self._rbuf = bytes(self._rbuf), bytearray()
            return [Send(to_client=True, data=data)]
        end = self._rbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._rbuf) > self.limits.max_header_bytes:
                return self._give_up_responses("http_header_too_long", "a response head over "
                                               f"{self.limits.max_header_bytes} bytes")
            return []
        head = bytes(self._rbuf[:end + 4])
        del self._rbuf[:end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self._rbuf[:0] = head
            return self._give_up_responses("http_bad_response", f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = self._status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        pending = self._pending[0]
        if status >= 200:
            self._pending.popleft()
        if status == 101:
            return self._upgraded(pending, head, headers)
        if pending.answered:
            self._fate = ResponseFate.DROP
        elif pending.chat is not None:
            self._fate = self._chat_response_head(pending.chat, status, headers, head)
        elif pending.download is not None and status in (200, 206):
            self._fate = ResponseFate.HOLD
            self._download = self._held_download(pending.download, headers.get("content-type", ""))
        else:
            self._fate = ResponseFate.FORWARD
        out = self._response_framing(head)
        length = headers.get("content-length", "").strip()
        if pending.method == b"HEAD" or status < 200 or status in (204, 304):
            out += self._response_done()
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._rstate = ResponseState.CHUNK_SIZE
        elif length.isdigit():
            self._rremaining = int(length)
            self._rstate = ResponseState.BODY
            if not self._rremaining:
                out += self._response_done()
        else:
            self._rstate = ResponseState.TO_CLOSE
        return out

    def _read_response_chunked(self) -> list[Command]:
        state = self._rstate
        if state is ResponseState.CHUNK_DATA:
            data = bytes(self._rbuf[:self._rremaining])
            del self._rbuf[:len(data)]
            self._rremaining -= len(data)
            out = self._response_body(data)
            if self._rremaining == 0:
                self._rstate, self._rremaining = ResponseState.CHUNK_CRLF, 2
            return out
        if state is ResponseState.CHUNK_CRLF:
            crlf = bytes(self._rbuf[:self._rremaining])
            del self._rbuf[:len(crlf)]
            self._rremaining -= len(crlf)
            if self._rremaining == 0:
                self._rstate = ResponseState.CHUNK_SIZE
            return self._response_framing(crlf)
        end = self._rbuf.find(b"\r\n")           # a chunk size line, or a trailer line
        if end < 0:
            return []
        line = bytes(self._rbuf[:end + 2])
        del self._rbuf[:end + 2]
        out = self._response_framing(line)
        if state is ResponseState.CHUNK_TRAILER:
            return out + (self._response_done() if line == b"\r\n" else [])
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            return out + self._give_up_responses("http_bad_chunk", f"a bad chunk size line {line[:40]!r}")
        self._rremaining = size
        self._rstate = ResponseState.CHUNK_DATA if size else ResponseState.CHUNK_TRAILER
        return out

    def _response_framing(self, data: bytes) -> list[Command]:
        """A response's head or chunk framing: crosses, is held with the held download, or is dropped."""
        if not data or self._fate is ResponseFate.DROP:
            return []
        if self._fate is ResponseFate.CHAT_HOLD and self._chat_response is not None:
            self._chat_response.wire += data
            return []
        if self._fate is ResponseFate.HOLD and self._download is not None:
            return self._download.append(b"", data)
        return [Send(to_client=True, data=data)]

    def _response_body(self, data: bytes) -> list[Command]:
        if self._fate in (ResponseFate.CHAT_HOLD, ResponseFate.CHAT_COLLECT) and self._chat_response is not None:
            self._chat_response.add(data)
            if self._fate is ResponseFate.CHAT_HOLD:
                return []
        download = self._download
        if self._fate is not ResponseFate.HOLD or download is None:
            return self._response_framing(data)
        if len(data) > download.room:
            # Larger than a file held for inspection may be: what fits is inspected, marked truncated (policy sees
            # an unscannable file); the rest of the response never crosses (fail closed: the gateway kills a
            # response too large to inspect unless policy lets it through unscanned).
            out = download.append(data[:download.room]) + self._inspect_download(truncated=True)
            self._fate = ResponseFate.DROP
            return out + [Anomaly(self.context, "http_download_too_large", "a download over max_upload_size "
                                  f"({self.limits.max_upload_size}); the rest of it is not forwarded")]
        return download.append(data)

    def _response_done(self) -> list[Command]:
        self._rstate = ResponseState.HEAD
        if self._chat_response is not None:
            out = self._chat_response_done()
            self._fate = ResponseFate.FORWARD
            return out
        out = self._inspect_download(truncated=self._status == 206) if self._download is not None else []
        self._fate = ResponseFate.FORWARD
        return out

    def _inspect_download(self, truncated: bool) -> list[Command]:
        download, self._download = self._download, None
        if download is None or download.state is not HoldState.RECEIVING:
            return []
        out = download.inspect(truncated=truncated)
        if download.state is HoldState.INSPECTING:
            self._inspecting[download.transfer_id] = download
        return out

    def _held_download(self, expected: ExpectedDownload | YmsgTransfer, content_type: str) -> HeldTransfer:
        """The response to a GET of a file shared with our user: held, in the context its chat session gave it (the
        party who shared it to our user, inbound), with this connection's addresses, as the gateway's HTTP side
        holds it (imguard.gateway.http_uploads; a Yahoo download's mechanism is "download")."""
        self._counter += 1
        ctx = downloads.context(expected, client_address=self.context.client_address,
                                server_address=self.context.server_address,
                                connection_id=expected.context.connection_id or self.context.connection_id)
        name = expected.name or unquote(urlsplit(expected.url).path.rsplit("/", 1)[-1])
        return HeldTransfer(
            f"http:{self.context.connection_id}:{self._counter}", ctx, sender_is_client=False, kind="http",
            max_bytes=self.limits.max_upload_size, name=name,
            claimed_mime=getattr(expected, "content_type", "") or content_type,
            owns_connection=False, holds=self._holds,
            refuse=lambda transfer: self._refuse_download(transfer, expected),
            tell=lambda transfer, notice: self._tell_receiver(transfer, notice, expected))

    def _refuse_download(self, transfer: HeldTransfer, expected: ExpectedDownload | YmsgTransfer) -> list[Command]:
        """A stopped download: the client has a 403 instead of the file, and the link stays blocked (a later GET,
        or a message passing it on, is refused too)."""
        decision = transfer.decision
        reason = decision.refusal if decision is not None else "not inspected"
        if self.transfers is not None and isinstance(expected, ExpectedDownload):
            self.transfers.mark_blocked_url(expected.url, reason)
        return [Send(to_client=True, data=_response(403, f"imguard: download blocked ({reason})"))]

    @staticmethod
    def _tell_receiver(transfer: HeldTransfer, notice: Notice, expected: ExpectedDownload | YmsgTransfer
                       ) -> list[Command]:
        """Our user, who fetched it, is told on the chat connection that announced the link, in the words the
        gateway uses (files/downloads.py); the outside sender cannot be reached from a download."""
        ctx = transfer.context
        if notice.party is not Party.INSIDE_RECEIVER or not ctx.connection_id:
            return []
        decision = notice.decision
        text = downloads.receiver_notice(expected, transfer.name, decision) if decision is not None else notice.text
        fallback = "http" if downloads.is_link(expected) else "ymsg"
        return [Notify(ctx.connection_id, ctx.protocol or fallback, text, ctx, decision)]

    def _give_up_responses(self, kind: str, detail: str) -> list[Command]:
        """Responses that cannot be framed: recorded, the rest relayed untouched; a held download is cut."""
        download, self._download = self._download, None
        self._rstate = ResponseState.DONE
        rest, self._rbuf = bytes(self._rbuf), bytearray()
        out = download.cut(kind, detail) if download is not None else [Anomaly(self.context, kind, detail)]
        return out + ([Send(to_client=True, data=rest)] if rest else [])

    def _stop_decoding(self) -> None:
        self._state = RequestState.DONE
        self._upload = None

    def _give_up(self, kind: str, detail: str) -> list[Command]:
        """Not HTTP as this reader knows it: record why and relay the rest untouched. A request being held cannot
        be followed to its end: it is cut (fail closed), its anomaly is this one."""
        upload = self._upload
        self._stop_decoding()
        rest, self._buf = bytes(self._buf), bytearray()
        if upload is not None:
            out = upload.cut(kind, detail)
        else:
            out = [Anomaly(self.context, kind, detail)]
        return out + ([Send(to_client=False, data=rest)] if rest else [])


def _response(status: int, text: str | bytes, content_type: str = "text/plain") -> bytes:
    reason = {400: "Bad Request", 403: "Forbidden", 413: "Payload Too Large", 502: "Bad Gateway"}.get(status, "")
    body = text if isinstance(text, bytes) else (text + "\n").encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def _query(query: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl
    return parse_qsl(query, keep_blank_values=True)


def decode_content(body: bytes, encoding: str) -> bytes:
    """A body with its Content-Encoding undone (gzip, x-gzip, deflate: zlib or raw, br with the brotli package; the
    last applied first). ValueError for an encoding that cannot be undone."""
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        try:
            if coding in ("identity", ""):
                continue
            if coding in ("gzip", "x-gzip"):
                body = gzip.decompress(body)
            elif coding == "deflate":
                try:
                    body = zlib.decompress(body)
                except zlib.error:
                    body = zlib.decompress(body, -15)
            elif coding == "br":
                try:
                    import brotli
                except ImportError:
                    raise ValueError("br: the brotli package is not installed") from None
                body = brotli.decompress(body)
            else:
                raise ValueError(f"the content encoding {coding!r} is not supported")
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{coding}: {e}") from e
        except Exception as e:
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"{coding}: {e}") from e
    return body
