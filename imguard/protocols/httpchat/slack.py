"""Slack Web API: POST /api/<method>, arguments as JSON, form-encoded or multipart; token in Authorization or `token`.

    chat.postMessage, chat.postEphemeral, chat.update, chat.meMessage, chat.scheduleMessage
                             -> ChatMessage: text, and the text/pretext/fallback/title of blocks and attachments
    files.upload (legacy)    -> FileUpload (`file` part, or `content` field) + ChatMessage (initial_comment, title)
    files.getUploadURLExternal -> learn UploadSlot(upload_url, slack:<file_id>)
    <upload_url> (any host, learned)  -> FileUpload (raw body, or the multipart `file`/`filename` part)
    files.completeUploadExternal -> ChatMessage (initial_comment, titles), refs slack:<id> of its files
    auth.test                -> learn Identity (the token's user_id)
    rtm.connect, rtm.start   -> learn Identity (the token's and the socket URL's user: self.id)
    conversations.history, conversations.replies (GET or POST; channel in the query or the body)
                             -> DELIVER: deliver() reads `messages` [{user, text, ts, blocks, attachments, files}]
                                -> DeliveredMessage (locator ("messages", i)) and SharedMedia slack:<file id>;
                                rewrite_delivered() makes a blocked one the notice (text only: blocks,
                                attachments and files dropped) and masks a masked one's texts
    GET /files-pri/{team}-{file}/[download/]{name} (files.slack.com: url_private, url_private_download)
                             -> DOWNLOAD ref slack:<file id>
    GET /files-tmb/{team}-{file}-{hash}/{name} (thumb_*)  -> DOWNLOAD of slack:<file id>, derived
    WebSocket on wss-*.slack.com: /websocket/{ticket} (RTM), /link/?ticket= (Socket Mode), / (the web client,
             ?token=); the server pushes {"type":"message","user","text","channel","ts",...} (Socket Mode: in an
             envelope {"envelope_id","payload":{"event":{...}}}) -> deliver_ws(): DeliveredMessage per message
             (locator ("ws", ...) within the frame), rewrite_ws_delivered() as rewrite_delivered(); the client
             posts on RTM with {"id","type":"message","channel","text"} -> decode_ws(): ChatMessage; a block is
             answered ws_error() {"ok":false,"reply_to":id,"error":{...}}, a mask rewrite_ws()
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote, urlencode

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import (DELIVER_MAX_DEPTH, DecodeLimits, bearer, dump, json_body, learned_object,
                                               malformed, message_parts, parse_delivered, plain_codec, rewrite_json,
                                               rewrite_ws_json, text_of, ws_json)
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, LEARN, MESSAGE, UPLOAD, ChatMessage,
                                               DeliveredMessage, Endpoint, FileUpload, HttpRequest, Identity,
                                               SharedMedia, TextPart, UploadSlot, credential_key)

API = "slack"
METHOD = re.compile(r"^/api/([a-z]+(?:\.[a-zA-Z]+)+)$")
FILES_PRI = re.compile(r"^/files-pri/([A-Za-z0-9]+)-([A-Za-z0-9]+)/(?:(download)/)?([^/]+)$")
FILES_TMB = re.compile(r"^/files-tmb/([A-Za-z0-9]+)-([A-Za-z0-9]+)-[A-Za-z0-9]+/([^/]+)$")
DELIVER_METHODS = {"conversations.history", "conversations.replies"}
MESSAGE_METHODS = {"chat.postMessage", "chat.postEphemeral", "chat.update", "chat.meMessage", "chat.scheduleMessage"}
TEXT_KEYS = frozenset({"text", "pretext", "fallback", "title"})
# "/" (the web client, ?token=), /websocket/{ticket} (RTM), /link/?ticket= (Socket Mode), on the wss-*.slack.com hosts
WEBSOCKET = re.compile(r"^/(?:websocket/[^/]+|link/?)?$")
WS_MESSAGE_EVENTS = ("message", "app_mention")


def classify(method: str, path: str) -> Endpoint | None:
    if method == "GET" and (f := FILES_PRI.match(path)):
        return Endpoint(API, "files_pri_download" if f.group(3) else "files_pri", DOWNLOAD, ref="slack:" + f.group(2),
                        filename=unquote(f.group(4)))
    if method == "GET" and (f := FILES_TMB.match(path)):
        return Endpoint(API, "files_tmb", DOWNLOAD, ref="slack:" + f.group(2), filename=unquote(f.group(3)),
                        derived=True)
    m = METHOD.match(path)
    if method not in ("GET", "POST") or not m:
        return None
    name = m.group(1)
    if name in DELIVER_METHODS:
        return Endpoint(API, name, DELIVER)
    if name in ("auth.test", "rtm.connect", "rtm.start"):
        return Endpoint(API, name, LEARN, learn=True)
    if method != "POST":
        return None
    if name in MESSAGE_METHODS:
        return Endpoint(API, name, MESSAGE)
    if name == "files.upload":
        return Endpoint(API, name, UPLOAD)
    if name == "files.getUploadURLExternal":
        return Endpoint(API, name, MESSAGE, learn=True)
    if name == "files.completeUploadExternal":
        return Endpoint(API, name, MESSAGE)
    return None


def upload_endpoint() -> Endpoint:
    """The endpoint of a learned upload URL (files.getUploadURLExternal's upload_url)."""
    return Endpoint(API, "upload_url", UPLOAD)


def _arguments(req: HttpRequest, limits: DecodeLimits) -> tuple[dict, str, list]:
    """(arguments, "json"|"form"|"multipart", multipart parts) of a Web API call."""
    ctype = req.content_type
    if ctype == "application/json":
        obj = json_body(req, limits)
        if not isinstance(obj, dict):
            raise bodies.BodyError("the JSON arguments are not an object")
        return obj, "json", []
    if ctype == "multipart/form-data":
        parts = bodies.parse_multipart(req.body, req.header("content-type"), limits.max_parts)
        return {p.name: p.text for p in parts if p.filename is None}, "multipart", parts
    return dict(bodies.parse_form(req.body)), "form", []


def _sender(req: HttpRequest, args: dict) -> str:
    key = bearer(req)
    return key or credential_key(text_of(args.get("token")))


def _json_field(args: dict, key: str, limits: DecodeLimits) -> object:
    """Form-encoded calls carry blocks/attachments/files as JSON strings."""
    value = args.get(key)
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        return bodies.parse_json(value.encode(), limits.max_json_depth)
    return value


def decode(ep: Endpoint, req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> list:
    if ep.name == "upload_url":
        return _decode_upload_url(ep, req, limits)
    try:
        args, form, parts = _arguments(req, limits)
        sender = _sender(req, args)
        room = text_of(args.get("channel") or args.get("channel_id") or args.get("channels"))
        if ep.name in MESSAGE_METHODS:
            texts = []
            if text_of(args.get("text")):
                texts.append(TextPart(_loc(form, parts, "text"), args["text"]))
            for key in ("blocks", "attachments"):
                value = _json_field(args, key, limits)
                if form == "json":
                    texts += [TextPart(("json", key) + path, s) for path, s in bodies.strings_under(value, TEXT_KEYS)]
                elif value:         # a JSON string inside a form: policy reads it, a mask rewrites the whole field
                    found = [s for _, s in bodies.strings_under(value, TEXT_KEYS)]
                    if found:
                        texts.append(TextPart(_loc(form, parts, key), "\n".join(found)))
            return [ChatMessage(API, ep.name, sender, room, tuple(texts), kind=ep.name)]
        if ep.name == "files.upload":
            out: list = []
            files = [p for p in parts if p.filename is not None]
            for p in files:
                out.append(FileUpload(API, ep.name, sender, room, text_of(args.get("filename")) or p.filename or "",
                                      p.content_type, p.data))
            if not files and "content" in args:
                out.append(FileUpload(API, ep.name, sender, room, text_of(args.get("filename")), "text/plain",
                                      args["content"].encode("utf-8")))
            if not files and "content" not in args:
                return [malformed(API, ep.name, "files.upload without a file or content")]
            texts = [TextPart(_loc(form, parts, k), args[k]) for k in ("initial_comment", "title")
                     if text_of(args.get(k))]
            if texts:
                out.append(ChatMessage(API, ep.name, sender, room, tuple(texts), kind=ep.name))
            return out
        if ep.name == "files.getUploadURLExternal":
            return []
        if ep.name == "files.completeUploadExternal":
            files = _json_field(args, "files", limits)
            refs, texts = [], []
            for i, f in enumerate(files if isinstance(files, list) else []):
                if isinstance(f, dict) and text_of(f.get("id")):
                    refs.append("slack:" + f["id"])
                    if text_of(f.get("title")) and form == "json":
                        texts.append(TextPart(("json", "files", i, "title"), f["title"]))
            if text_of(args.get("initial_comment")):
                texts.append(TextPart(_loc(form, parts, "initial_comment"), args["initial_comment"]))
            return [ChatMessage(API, ep.name, sender, room, tuple(texts), tuple(refs), kind=ep.name)]
    except bodies.BodyError as e:
        return [malformed(API, ep.name, e)]
    return []


def _loc(form: str, parts: list, key: str) -> tuple:
    if form == "multipart":
        index = next(i for i, p in enumerate(parts) if p.name == key and p.filename is None)
        return ("multipart", index)
    return (form, key)


def _decode_upload_url(ep: Endpoint, req: HttpRequest, limits: DecodeLimits) -> list:
    if req.content_type == "multipart/form-data":
        try:
            parts = bodies.parse_multipart(req.body, req.header("content-type"), limits.max_parts)
        except bodies.BodyError as e:
            return [malformed(API, ep.name, e)]
        return [FileUpload(API, ep.name, "", "", p.filename or p.name, p.content_type, p.data)
                for p in parts if p.filename is not None or p.name in ("file", "filename")]
    return [FileUpload(API, ep.name, "", "", "", req.content_type, req.body)]


def requester(req: HttpRequest) -> str:
    """Who asks: the credential key of the token (Authorization, or `token` in the query or the body)."""
    try:
        args = _call_arguments(req, DecodeLimits())
    except bodies.BodyError:
        args = dict(req.query)
    return _sender(req, args)


def _call_arguments(req: HttpRequest, limits: DecodeLimits) -> dict:
    """A Web API call's arguments from the query and the body (GET or POST)."""
    args = dict(req.query)
    if req.body.strip():
        args.update(_arguments(req, limits)[0])
    return args


def deliver(ep: Endpoint, req: HttpRequest, status: int, body: bytes,
            limits: DecodeLimits = DecodeLimits()) -> list:
    """conversations.history / .replies: each message -> DeliveredMessage (own ones included), each file it
    carries -> SharedMedia. Raises bodies.BodyError for a body that is not JSON."""
    if ep.kind != DELIVER or not 200 <= status < 300 or not body:
        return []
    data = parse_delivered(body, limits)
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return []
    try:
        room = text_of(_call_arguments(req, limits).get("channel"))
    except bodies.BodyError:
        room = req.param("channel")
    out: list = []
    for i, msg in enumerate(messages):
        out += _delivered(ep.name, msg, room, ("messages", i))
    return out


def _delivered(endpoint: str, msg: object, room: str, locator: tuple) -> list:
    """A Slack message object (history, or an RTM / Socket Mode event) -> DeliveredMessage and its SharedMedia."""
    if not isinstance(msg, dict):
        return []
    room = text_of(msg.get("channel")) or room
    sender = text_of(msg.get("user")) or text_of(msg.get("bot_id"))
    files = [f for f in msg.get("files") or [] if isinstance(f, dict) and text_of(f.get("id"))] \
        if isinstance(msg.get("files"), list) else []
    refs = tuple("slack:" + f["id"] for f in files)
    parts = message_parts(msg, "text", ("blocks", "attachments"), TEXT_KEYS)
    message = ChatMessage(API, endpoint, sender, room, parts, refs, kind=text_of(msg.get("subtype")) or "message")
    out: list = [DeliveredMessage(message, f"{room}/{text_of(msg.get('ts'))}" if msg.get("ts") else "", locator)]
    out += [SharedMedia("slack:" + f["id"], sender, room, text_of(f.get("name")) or text_of(f.get("title")))
            for f in files]
    return out


def _blank(msg: dict, notice: str) -> None:
    msg["text"] = notice
    for key in ("blocks", "attachments", "files"):
        msg.pop(key, None)


def rewrite_delivered(body: bytes, blocked=(), masked=()) -> bytes:
    """The history response with each blocked message's text the notice (its blocks, attachments and files
    dropped), each masked one's texts masked. Raises bodies.BodyError when a locator does not fit."""
    return rewrite_json(body, blocked, masked, _blank)


# --- the WebSocket: RTM (rtm.connect's url), Socket Mode (apps.connections.open's url), the web client ---------

def is_websocket(path: str) -> bool:
    return bool(WEBSOCKET.match(path))


ws_codec = plain_codec          # JSON text messages


def ws_url_key(url: str) -> str:
    """How a socket URL that is its own credential (an RTM or Socket Mode ticket) is known: rtm.connect's
    answer teaches its user under this key, the handshake of that URL finds it."""
    req = HttpRequest.make("GET", url)
    return credential_key("ws:" + req.path + "?" + urlencode(sorted(req.query)))


def ws_requester(req: HttpRequest) -> str:
    """Whose socket: the token of the handshake (Authorization, ?token= as the web client sends it), else the
    ticket URL rtm.connect handed out."""
    return bearer(req) or ws_url_key(req.path + ("?" + urlencode(req.query) if req.query else ""))


def ws_credential(data: bytes) -> str:
    return ""                   # the client sends no credential on the socket


def decode_ws(data: bytes, sender: str = "", limits: DecodeLimits = DecodeLimits()) -> list:
    """A client message on an RTM socket, RTM's way to post: {"id": 1, "type": "message", "channel", "text"}
    -> [(id, None, ChatMessage)] with the text at ("ws", None, "text") (rewrite_ws). Anything else (ping,
    typing) -> []."""
    try:
        frame = bodies.parse_json(data, limits.max_json_depth)
    except bodies.BodyError:
        return []               # the server refuses what is not JSON
    if not isinstance(frame, dict) or frame.get("type") != "message" or not text_of(frame.get("text")):
        return []
    message = ChatMessage(API, "rtm.message", sender, text_of(frame.get("channel")),
                          (TextPart(("ws", None, "text"), frame["text"]),), kind="message")
    return [(str(frame.get("id", "")), None, message)]


def rewrite_ws(data: bytes, replacements: list[tuple[tuple, str]]) -> bytes:
    """The client message with its text masked (decode_ws's locators)."""
    frame = bodies.parse_json(data, DELIVER_MAX_DEPTH)
    for (_, _, *path), text in replacements:
        node = frame
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = text
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()


def ws_error(call_id: str, reason: str, framed: bool = False) -> bytes:
    """RTM's answer to a message it refused, as the server sends it: the client's send fails with `reason`."""
    return dump({"ok": False, "reply_to": int(call_id) if call_id.isdigit() else call_id,
                 "error": {"code": 2, "msg": reason}})


def deliver_ws(data: bytes, limits: DecodeLimits = DecodeLimits()) -> list:
    """What one server message brings: an RTM event {"type": "message", "user", "text", "channel", "ts", ...}
    (locator ("ws",)), the same inside a Socket Mode envelope {"envelope_id", "payload": {"event": {...},
    "authorizations": [{"user_id"}]}} (locator ("ws", "payload", "event"); the authorization names the socket's
    user: Identity("", user id)); a message_changed event's message and previous_message each (message_replied:
    its message). Other events
    (hello, presence, typing, acks) bring nothing. Raises bodies.BodyError when the message is not JSON."""
    frame = ws_json(data, limits)
    if not isinstance(frame, dict):
        return []
    out: list = []
    event, base = frame, ("ws",)
    payload = frame.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("event"), dict):
        auth = payload.get("authorizations")
        if isinstance(auth, list) and auth and isinstance(auth[0], dict) and text_of(auth[0].get("user_id")):
            out.append(Identity("", auth[0]["user_id"]))
        event, base = payload["event"], ("ws", "payload", "event")
    if event.get("type") not in WS_MESSAGE_EVENTS or event.get("subtype") == "message_deleted":
        return out
    room = text_of(event.get("channel"))
    if event.get("subtype") in ("message_changed", "message_replied"):    # the message inside (and the old one)
        for key in ("message", "previous_message"):
            out += _delivered("ws." + event["subtype"], event.get(key), room, base + (key,))
        return out
    return out + _delivered("ws." + event["type"], event, room, base)


def rewrite_ws_delivered(data: bytes, blocked=(), masked=()) -> bytes:
    """The server message with deliver_ws's messages blocked or masked as rewrite_delivered does."""
    return rewrite_ws_json(data, blocked, masked, _blank)


LEARNING_METHODS = frozenset({"rtm.connect", "rtm.start", "auth.test", "files.getUploadURLExternal"})


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    data = learned_object(status, body) if ep.name in LEARNING_METHODS else None
    if data is None or not data.get("ok"):
        return []
    if ep.name in ("rtm.connect", "rtm.start"):
        if not isinstance(data.get("self"), dict):
            return []
        user, url = text_of(data["self"].get("id")), text_of(data.get("url"))
        out = [Identity(ws_url_key(url), user)] if user and url else []
        key = requester(req)
        return out + ([Identity(key, user)] if user and key else [])
    if ep.name == "auth.test":
        user = text_of(data.get("user_id"))
        key = requester(req)
        return [Identity(key, user)] if user and key else []
    if not text_of(data.get("upload_url")):        # files.getUploadURLExternal
        return []
    try:
        args, _, _ = _arguments(req, DecodeLimits())
    except bodies.BodyError:
        args = {}
    return [UploadSlot(data["upload_url"], "slack:" + text_of(data.get("file_id")), text_of(args.get("filename")),
                       _sender(req, args))]


CODES = {400: "invalid_arguments", 403: "restricted_action", 413: "file_too_large"}


def error_body(status: int, reason: str) -> bytes:
    return dump({"ok": False, "error": CODES.get(status, "request_refused"), "detail": reason})
