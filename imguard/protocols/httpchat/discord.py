"""Discord HTTP API (/api/v{9,10}/ or unversioned /api/), token in Authorization ("Bot ..." or a user token).

    POST  /api/v10/channels/{id}/messages        JSON {content, embeds, attachments}, or multipart with
                                                 payload_json + files[n]              -> ChatMessage + FileUpload
    PATCH /api/v10/channels/{id}/messages/{mid}  same shapes (an edit)
    POST  /api/v10/webhooks/{id}/{token}[?wait=]  same shapes (an incoming webhook, as discord.py's Webhook.send
    PATCH /api/v10/webhooks/{id}/{token}/messages/{mid}   sends them; no Authorization: the sender is webhook:{id},
                                                 the room the webhook's id; the token is never recorded)
    POST  /api/v10/channels/{id}/attachments     {files: [{filename, file_size, id}]} -> learn UploadSlot per file
    PUT   <upload_url> (any host, learned)       raw bytes                            -> FileUpload
          a later message's attachments[].uploaded_filename                           -> refs discord:<name>
    GET   /api/v10/users/@me                     -> learn Identity (the token's user id)
    GET   /api/v10/channels/{id}/messages[/{mid}]  a list of messages, or one -> DELIVER: deliver() ->
          DeliveredMessage per message (author.id, content, embeds, the replied-to message; locator (i,) or ()),
          SharedMedia discord:attachment:<id>; rewrite_delivered() makes a blocked one the notice (embeds,
          attachments, components, the quoted message dropped) and masks a masked one's texts
    GET   /attachments/{channel}/{id}/{name} on cdn.discordapp.com, media.discordapp.net (host routes)
                                                 -> DOWNLOAD ref discord:attachment:<id>
    Gateway WebSocket (wss://gateway.discord.gg/?v=10&encoding=json[&compress=zlib-stream], host route
    *.discord.gg): the client's IDENTIFY/RESUME carries its token, the server's READY its user; op 0
    MESSAGE_CREATE / MESSAGE_UPDATE -> deliver_ws(): DeliveredMessage of d (locator ("ws", "d")). ws_codec()
    reads zlib-stream (ZlibStream) and per-message zlib (MessageFrames), in JSON or ETF (EtfPayloads, etf.py:
    the payload handed on as JSON, encoded again only when changed); another encoding or compression
    (zstd-stream) raises UnreadableSocket (the carrier applies the fail mode at the handshake)
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import replace
from urllib.parse import unquote

from imguard.protocols.httpchat import bodies, etf
from imguard.protocols.httpchat.common import (DELIVER_MAX_DEPTH, DecodeLimits, FrameTooLarge, UnreadableSocket, bearer,
                                               dump, json_body, learned_object, malformed, message_parts,
                                               parse_delivered, rewrite_json, rewrite_ws_json, text_of, ws_json)
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, LEARN, MESSAGE, UPLOAD, ChatMessage,
                                               DeliveredMessage, Endpoint, FileUpload, HttpRequest, Identity,
                                               SharedMedia, TextPart, UploadSlot, credential_key)

API = "discord"
_V = r"/api(?:/v\d+)?"
MESSAGES = re.compile(rf"^{_V}/channels/(\d+)/messages(?:/\d+)?$")
ATTACHMENTS = re.compile(rf"^{_V}/channels/(\d+)/attachments$")
WEBHOOK = re.compile(rf"^{_V}/webhooks/(\d+)/[^/]+(/messages/(?:\d+|@original))?$")
ME = re.compile(rf"^{_V}/users/@me$")
CDN = re.compile(r"^/attachments/(\d+)/(\d+)/([^/]+)$")
TEXT_KEYS = frozenset({"content", "title", "description", "name", "value", "text"})
SYNC_FLUSH = b"\x00\x00\xff\xff"         # ends each payload of a zlib-stream gateway connection
DEFLATE_WBITS = 12
ETF_READ = (b"MESSAGE_CREATE", b"MESSAGE_UPDATE", b"READY")     # the dispatches deliver_ws reads, as ETF atoms
UNKNOWN_AUTHOR = "unknown"          # the sender of a partial MESSAGE_UPDATE without its author


def classify(method: str, path: str) -> Endpoint | None:
    if method in ("POST", "PATCH") and MESSAGES.match(path):
        return Endpoint(API, "message", UPLOAD)        # may carry files: size-limited as an upload
    if (m := WEBHOOK.match(path)) and (method, bool(m.group(2))) in (("POST", False), ("PATCH", True)):
        return Endpoint(API, "webhook", UPLOAD)
    if method == "POST" and ATTACHMENTS.match(path):
        return Endpoint(API, "attachments", MESSAGE, learn=True)
    if method != "GET":
        return None
    if m := CDN.match(path):
        return Endpoint(API, "cdn_attachment", DOWNLOAD, ref="discord:attachment:" + m.group(2),
                        filename=unquote(m.group(3)))
    if m := MESSAGES.match(path):
        return Endpoint(API, "messages" if m.group(0).endswith("/messages") else "message_get", DELIVER)
    if ME.match(path):
        return Endpoint(API, "users_me", LEARN, learn=True)
    return None


def requester(req: HttpRequest) -> str:
    if m := WEBHOOK.match(req.path):
        return "webhook:" + m.group(1)
    return bearer(req)


def upload_endpoint() -> Endpoint:
    return Endpoint(API, "upload_url", UPLOAD)


def decode(ep: Endpoint, req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> list:
    sender = requester(req)
    if ep.name == "upload_url":
        return [FileUpload(API, ep.name, "", "", "", req.content_type, req.body)]
    if ep.name == "attachments":
        return []
    room = (MESSAGES.match(req.path) or WEBHOOK.match(req.path)).group(1)
    try:
        out: list = []
        if req.content_type == "multipart/form-data":
            parts = bodies.parse_multipart(req.body, req.header("content-type"), limits.max_parts)
            payload, prefix = {}, ()
            for i, p in enumerate(parts):
                if p.name == "payload_json":
                    payload = bodies.parse_json(p.data, limits.max_json_depth)
                    prefix = ("multipart", i, "json")
                elif p.filename is not None or p.name.startswith("files["):
                    out.append(FileUpload(API, ep.name, sender, room, p.filename or "", p.content_type, p.data))
                elif p.name == "content" and p.text:
                    out.append(ChatMessage(API, ep.name, sender, room, (TextPart(("multipart", i), p.text),),
                                           kind="message"))
            if not isinstance(payload, dict):
                return [malformed(API, ep.name, "payload_json is not a JSON object")]
        else:
            payload, prefix = json_body(req, limits), ("json",)
            if not isinstance(payload, dict):
                return [malformed(API, ep.name, "the message is not a JSON object")]
        if payload:
            texts = []
            if text_of(payload.get("content")):
                texts.append(TextPart(prefix + ("content",), payload["content"]))
            texts += [TextPart(prefix + path, s)
                      for path, s in bodies.strings_under(payload.get("embeds"), TEXT_KEYS, ("embeds",))]
            refs = []
            attachments = payload.get("attachments")
            for a in attachments if isinstance(attachments, list) else []:
                if isinstance(a, dict) and text_of(a.get("uploaded_filename")):
                    refs.append("discord:" + a["uploaded_filename"])
            out.append(ChatMessage(API, ep.name, sender, room, tuple(texts), tuple(refs), kind="message"))
        return out
    except bodies.BodyError as e:
        return [malformed(API, ep.name, e)]


def deliver(ep: Endpoint, req: HttpRequest, status: int, body: bytes,
            limits: DecodeLimits = DecodeLimits()) -> list:
    """The messages of a channel (a JSON list) or one message: DeliveredMessage each (own ones included) and
    SharedMedia for their attachments. Raises bodies.BodyError for a body that is not JSON."""
    if ep.kind != DELIVER or not 200 <= status < 300 or not body:
        return []
    data = parse_delivered(body, limits)
    found = [((i,), m) for i, m in enumerate(data)] if isinstance(data, list) else [((), data)]
    m = MESSAGES.match(req.path)
    channel = m.group(1) if m else ""
    out: list = []
    for locator, msg in found:
        out += _delivered(ep.name, msg, channel, locator)
    return out


def snowflake(value: object) -> str:
    """An id as a string: JSON carries snowflakes as strings, ETF as 64-bit integers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return text_of(value)


def _delivered(endpoint: str, msg: object, channel: str, locator: tuple) -> list:
    """A message object (REST, or a gateway MESSAGE_CREATE / MESSAGE_UPDATE's d) -> DeliveredMessage and
    SharedMedia for its attachments."""
    if not isinstance(msg, dict):
        return []
    author = msg.get("author") if isinstance(msg.get("author"), dict) else {}
    sender, room = snowflake(author.get("id")), snowflake(msg.get("channel_id")) or channel
    attachments = [a for a in msg.get("attachments") or [] if isinstance(a, dict) and snowflake(a.get("id"))] \
        if isinstance(msg.get("attachments"), list) else []
    refs = tuple("discord:attachment:" + snowflake(a["id"]) for a in attachments)
    parts = message_parts(msg, "content", ("embeds", "referenced_message", "message_snapshots"), TEXT_KEYS)
    message = ChatMessage(API, endpoint, sender, room, parts, refs, kind="message")
    edited = text_of(msg.get("edited_timestamp"))
    out: list = [DeliveredMessage(message, snowflake(msg.get("id")) + (f"@{edited}" if edited else ""), locator)]
    out += [SharedMedia("discord:attachment:" + snowflake(a["id"]), sender, room, text_of(a.get("filename")))
            for a in attachments]
    return out


def _blank(msg: dict, notice: str) -> None:
    msg["content"] = notice
    msg["embeds"], msg["attachments"], msg["components"] = [], [], []
    for key in ("referenced_message", "message_snapshots", "sticker_items"):
        msg.pop(key, None)


def rewrite_delivered(body: bytes, blocked=(), masked=()) -> bytes:
    """The response with each blocked message's content the notice (embeds, attachments, components and the
    quoted message dropped) and each masked one's texts masked. Raises bodies.BodyError when a locator does not
    fit."""
    return rewrite_json(body, blocked, masked, _blank)


# --- the gateway (wss://gateway.discord.gg/?v=10&encoding=json[&compress=zlib-stream]) --------------------

def is_websocket(path: str) -> bool:
    return path in ("", "/")


class ZlibStream:
    """compress=zlib-stream: everything the server sends on the socket is one zlib stream, a payload ending
    where a message ends with the Z_SYNC_FLUSH suffix 00 00 ff ff (a long one may span several messages).
    receive() inflates with one decompressobj for the connection, as the client does; send() deflates what goes
    on to the client with one compressobj of imguard's own: the client's inflater follows the bytes it gets,
    so once imguard changes one payload, every later one must come from this stream (all are re-compressed,
    changed or not, and the upstream bytes stay the server's). A payload larger than max_size is inflated to
    its end and discarded (FrameTooLarge; the stream stays in step); a stream that cannot be inflated raises
    bodies.BodyError and is dead."""

    stream = True

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._inflate = zlib.decompressobj()
        # 4 KiB window, memLevel 5: about 32 KiB per connection instead of zlib's default 256 KiB (any window up to
        # 32 KiB is what the client's inflater accepts)
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, DEFLATE_WBITS, 5)
        self._pending = bytearray()
        self._size = 0                  # inflated bytes of the payload so far (counted past the limit too)
        self._last = b""                # the stream's last 4 bytes: the suffix may straddle two messages

    def receive(self, data: bytes) -> bytes | None:
        """The payload this message completes, None while it does not end with the suffix."""
        try:
            tail = data
            while tail:
                room = self.max_size + 1 - len(self._pending) if self._size <= self.max_size else 65536
                out = self._inflate.decompress(tail, max(room, 1))
                self._size += len(out)
                if self._size <= self.max_size:
                    self._pending += out
                else:
                    self._pending.clear()       # memory bounded: the rest is inflated only to stay in step
                if not out and self._inflate.unconsumed_tail == tail:
                    break
                tail = self._inflate.unconsumed_tail
        except zlib.error as e:
            raise bodies.BodyError(f"the zlib stream cannot be inflated ({e})") from None
        if self._inflate.eof:
            raise bodies.BodyError("the zlib stream ended")
        self._last = (self._last + data)[-len(SYNC_FLUSH):]
        if self._last != SYNC_FLUSH:
            return None
        payload, size = bytes(self._pending), self._size
        self._pending.clear()
        self._size = 0
        if size > self.max_size:
            raise FrameTooLarge(size, self.max_size)
        return payload

    def send(self, payload: bytes) -> bytes:
        return self._deflate.compress(payload) + self._deflate.flush(zlib.Z_SYNC_FLUSH)


class MessageFrames:
    """No compress parameter: each message is one payload (JSON text, or ETF binary), except that a client which
    IDENTIFYs with "compress": true gets some payloads as binary messages, each one whole zlib stream (told by its
    zlib header). send() compresses again what came compressed. A message that is neither is handed on as it came
    (deliver_ws refuses it and the fail mode decides): one unreadable message does not break the next."""

    stream = False

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._compressed = False

    def receive(self, data: bytes) -> bytes | None:
        self._compressed = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        if not self._compressed:
            if len(data) > self.max_size:
                raise FrameTooLarge(len(data), self.max_size)
            return data
        inflater = zlib.decompressobj()
        try:
            payload = inflater.decompress(data, self.max_size + 1)
        except zlib.error:
            payload = b""
        if len(payload) > self.max_size:
            raise FrameTooLarge(len(payload), self.max_size)
        if not inflater.eof or inflater.unused_data:
            self._compressed = False
            return data
        return payload

    def send(self, payload: bytes) -> bytes:
        return zlib.compress(payload) if self._compressed else payload


class EtfPayloads:
    """encoding=etf (the desktop client's erlpack), over any of the two transports above: each payload is read
    from ETF and handed on as JSON (the decoders' one format); send() gives the client the server's own ETF bytes
    when the payload is unchanged, and encodes again only what imguard changed. A payload that is not readable
    ETF is handed on as it came (not JSON: deliver_ws then refuses it, and the fail mode decides)."""

    def __init__(self, transport: ZlibStream | MessageFrames, max_depth: int = DELIVER_MAX_DEPTH):
        self.transport, self.stream, self.max_depth = transport, transport.stream, max_depth
        self._last: tuple[bytes, bytes] | None = None     # (the JSON handed on, the ETF it came from)

    def receive(self, data: bytes) -> bytes | None:
        raw = self.transport.receive(data)
        if raw is None:
            return None
        if raw[1:2] != bytes([etf.COMPRESSED]) and not any(name in raw for name in ETF_READ):
            # ETF has no escapes: a payload without these atoms is no dispatch the decoders read (GUILD_CREATE,
            # presence, ...); it is not decoded (pure-Python ETF runs at a few MB/s), handed on as an empty object
            self._last = (b"{}", raw)
            return b"{}"
        try:
            payload = json.dumps(etf.decode(raw, self.max_depth, self.transport.max_size),
                                 ensure_ascii=False, separators=(",", ":")).encode()
        except bodies.BodyError:
            payload = raw
        self._last = (payload, raw)
        return payload

    def send(self, payload: bytes) -> bytes:
        if self._last is not None and payload == self._last[0]:
            return self.transport.send(self._last[1])
        return self.transport.send(etf.encode(json.loads(payload)))


def ws_codec(req: HttpRequest, max_size: int) -> ZlibStream | MessageFrames | EtfPayloads:
    """How the server's messages are read, from the handshake's query: encoding json or etf, compress
    zlib-stream or none (per-message zlib then possible). Raises UnreadableSocket for what imguard cannot read:
    another encoding or compression (zstd-stream)."""
    encoding, compress = req.param("encoding", "json").lower(), req.param("compress").lower()
    if encoding not in ("json", "etf"):
        raise UnreadableSocket(f"the client asked the gateway for encoding={encoding}, which imguard cannot read")
    if compress and compress != "zlib-stream":
        raise UnreadableSocket(f"the client asked the gateway for compress={compress}, which imguard cannot read")
    transport = ZlibStream(max_size) if compress else MessageFrames(max_size)
    return EtfPayloads(transport) if encoding == "etf" else transport


def ws_requester(req: HttpRequest) -> str:
    return ""                   # the handshake carries no credential: IDENTIFY does


def ws_credential(data: bytes) -> str:
    """The token of an IDENTIFY (op 2) or RESUME (op 6): {"op":2,"d":{"token",...}} (sent uncompressed, in the
    socket's encoding: JSON, or ETF)."""
    try:
        frame = etf.decode(data, 32) if data[:1] == bytes([etf.VERSION]) else bodies.parse_json(data, 32)
    except bodies.BodyError:
        return ""
    if isinstance(frame, dict) and frame.get("op") in (2, 6) and isinstance(frame.get("d"), dict):
        token = text_of(frame["d"].get("token"))
        if token.startswith("Bot "):
            token = token[4:]
        return credential_key(token.strip())
    return ""


def decode_ws(data: bytes, sender: str = "", limits: DecodeLimits = DecodeLimits()) -> list:
    return []                   # no chat from the client on this socket: its clients post over REST


def deliver_ws(data: bytes, limits: DecodeLimits = DecodeLimits()) -> list:
    """What one gateway payload brings: a dispatch (op 0) MESSAGE_CREATE or MESSAGE_UPDATE -> DeliveredMessage
    of its d (locator ("ws", "d")) and SharedMedia of its attachments; READY -> Identity("", d.user.id), the
    socket's user. Heartbeat acks, HELLO and other dispatches bring nothing. Raises bodies.BodyError when the
    payload is not JSON."""
    frame = ws_json(data, limits)
    if not isinstance(frame, dict) or frame.get("op") != 0 or not isinstance(frame.get("d"), dict):
        return []
    kind, d = frame.get("t"), frame["d"]
    if kind == "READY" and isinstance(d.get("user"), dict) and snowflake(d["user"].get("id")):
        return [Identity("", snowflake(d["user"]["id"]))]
    if kind not in ("MESSAGE_CREATE", "MESSAGE_UPDATE"):
        return []
    found = _delivered("gateway." + kind, d, "", ("ws", "d"))
    if kind == "MESSAGE_UPDATE" and "content" in d and not isinstance(d.get("author"), dict):
        # a partial update (Discord: "may contain only a subset" of the message) that changes the text but does
        # not say whose it is: decided all the same, from an unknown sender, rather than passed undecided
        found = [DeliveredMessage(replace(x.message, sender=UNKNOWN_AUTHOR), x.event_id, x.locator)
                 if isinstance(x, DeliveredMessage) else x for x in found]
    return found


def rewrite_ws_delivered(data: bytes, blocked=(), masked=()) -> bytes:
    """The payload with its message blocked (the notice) or masked as rewrite_delivered does."""
    return rewrite_ws_json(data, blocked, masked, _blank)


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    data = learned_object(status, body) if ep.name in ("users_me", "attachments") else None
    if data is None:
        return []
    if ep.name == "users_me":
        user, key = text_of(data.get("id")), bearer(req)
        return [Identity(key, user)] if user and key else []
    room = ATTACHMENTS.match(req.path).group(1)
    out = []
    for a in data.get("attachments", []):
        if isinstance(a, dict) and text_of(a.get("upload_url")) and text_of(a.get("upload_filename")):
            out.append(UploadSlot(a["upload_url"], "discord:" + a["upload_filename"], "", bearer(req), room))
    return out


CODES = {400: 50035, 403: 200000, 413: 40005}


def error_body(status: int, reason: str) -> bytes:
    return dump({"message": reason, "code": CODES.get(status, 0)})
