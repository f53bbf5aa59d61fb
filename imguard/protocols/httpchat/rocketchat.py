"""Rocket.Chat REST API v1 and its DDP WebSocket; the user id comes in X-User-Id (token in X-Auth-Token).

    POST /api/v1/rooms.upload/{rid}      multipart file, msg, description, tmid  -> FileUpload + ChatMessage
    POST /api/v1/rooms.media/{rid}       multipart file                          -> FileUpload
    POST /api/v1/rooms.mediaConfirm/{rid}/{fileId}  JSON msg, description        -> ChatMessage, ref rocketchat:<fileId>
    POST /api/v1/chat.sendMessage        JSON {message: {rid, msg, attachments}} -> ChatMessage
    POST /api/v1/chat.postMessage        JSON {roomId|channel, text, attachments} -> ChatMessage
    POST /api/v1/chat.update             JSON {roomId, msgId, text}              -> ChatMessage
    WebSocket (/websocket, /sockjs/.../websocket): DDP {"msg":"method","method":"sendMessage"|"updateMessage",
             "params":[{"rid","msg"}]}, bare or in a SockJS frame (a JSON array of strings) -> ChatMessage
    GET  /api/v1/{channels,groups,im,dm}.history?roomId=   {messages: [{_id, rid, msg, u: {_id, username},
             attachments, file, files, md}]} -> DELIVER: deliver() -> DeliveredMessage per message (not system
             messages, those with `t`; locator ("messages", i)), SharedMedia rocketchat:<file id>;
             rewrite_delivered() makes a blocked one the notice (attachments, files and the pre-parsed `md`
             dropped) and masks a masked one's texts (its `md` dropped: the client renders `msg` again)
    GET  /file-upload/{fileId}/{name}    -> DOWNLOAD ref rocketchat:<fileId>
    WebSocket, from the server: DDP {"msg":"changed","collection":"stream-room-messages","fields":{"args":[msg]}}
             -> deliver_ws(): DeliveredMessage per message, locator ("ws", frame index, "fields", "args", i);
             a login method's result {"msg":"result","result":{"id","token"}} -> Identity("", user id)
"""

from __future__ import annotations

import json
import re

from urllib.parse import unquote

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import (DELIVER_MAX_DEPTH, DecodeLimits, dump, json_body, malformed,
                                               message_parts, parse_delivered, plain_codec, rewrite_json, text_of)
from imguard.protocols.httpchat.common import rewrite_delivered as rewrite_delivered_data
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, MESSAGE, UPLOAD, ChatMessage, DeliveredMessage,
                                               Endpoint, FileUpload, HttpRequest, Identity, SharedMedia, TextPart)

API = "rocketchat"
UPLOAD_PATH = re.compile(r"^/api/v1/rooms\.(upload|media)/([^/]+)$")
CONFIRM = re.compile(r"^/api/v1/rooms\.mediaConfirm/([^/]+)/([^/]+)$")
CHAT = re.compile(r"^/api/v1/chat\.(sendMessage|postMessage|update)$")
WEBSOCKET = re.compile(r"^(?:/websocket|/sockjs/.*/websocket)$")
HISTORY = re.compile(r"^/api/v1/(channels|groups|im|dm)\.history$")
FILE_UPLOAD = re.compile(r"^/file-upload/([^/]+)/([^/]+)$")
TEXT_KEYS = frozenset({"text", "title", "description", "pretext", "value"})
DDP_METHODS = ("sendMessage", "updateMessage")


def classify(method: str, path: str) -> Endpoint | None:
    if method == "POST" and UPLOAD_PATH.match(path):
        return Endpoint(API, "rooms." + UPLOAD_PATH.match(path).group(1), UPLOAD)
    if method == "POST" and CONFIRM.match(path):
        return Endpoint(API, "rooms.mediaConfirm", MESSAGE)
    if method == "POST" and (m := CHAT.match(path)):
        return Endpoint(API, "chat." + m.group(1), MESSAGE)
    if method == "GET" and (m := HISTORY.match(path)):
        return Endpoint(API, m.group(1) + ".history", DELIVER)
    if method == "GET" and (m := FILE_UPLOAD.match(path)):
        return Endpoint(API, "file_upload", DOWNLOAD, ref="rocketchat:" + unquote(m.group(1)),
                        filename=unquote(m.group(2)))
    return None


def is_websocket(path: str) -> bool:
    return bool(WEBSOCKET.match(path))


ws_codec = plain_codec          # DDP JSON text, bare or SockJS-framed


def ws_requester(req: HttpRequest) -> str:
    """Whose socket, until a login result says: the rc_uid cookie (a user id)."""
    return cookie(req.header("cookie"), "rc_uid")


def ws_credential(data: bytes) -> str:
    return ""                   # a DDP login's result names the user (deliver_ws)


def _sender(req: HttpRequest) -> str:
    return req.header("x-user-id")


def requester(req: HttpRequest) -> str:
    """Who asks: X-User-Id, else the rc_uid cookie or query parameter (how the web client fetches files)."""
    return req.header("x-user-id") or cookie(req.header("cookie"), "rc_uid") or req.param("rc_uid")


def cookie(header: str, name: str) -> str:
    return next((v for k, v in (c.strip().partition("=")[::2] for c in header.split(";")) if k == name), "")


def decode(ep: Endpoint, req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> list:
    sender = _sender(req)
    try:
        if ep.kind == UPLOAD:
            room = UPLOAD_PATH.match(req.path).group(2)
            parts = bodies.parse_multipart(req.body, req.header("content-type"), limits.max_parts)
            out: list = [FileUpload(API, ep.name, sender, room, p.filename or "", p.content_type, p.data)
                         for p in parts if p.filename is not None or p.name == "file"]
            if not out:
                return [malformed(API, ep.name, "no file in the upload")]
            texts = [TextPart(("multipart", i), p.text) for i, p in enumerate(parts)
                     if p.filename is None and p.name in ("msg", "description") and p.text]
            if texts:
                out.append(ChatMessage(API, ep.name, sender, room, tuple(texts), kind=ep.name))
            return out
        body = json_body(req, limits)
        if not isinstance(body, dict):
            return [malformed(API, ep.name, "the body is not a JSON object")]
        if ep.name == "rooms.mediaConfirm":
            m = CONFIRM.match(req.path)
            texts = [TextPart(("json", k), body[k]) for k in ("msg", "description") if text_of(body.get(k))]
            return [ChatMessage(API, ep.name, sender, m.group(1), tuple(texts), ("rocketchat:" + m.group(2),),
                                kind=ep.name)]
        if ep.name == "chat.sendMessage":
            message = body.get("message")
            if not isinstance(message, dict):
                return [malformed(API, ep.name, "chat.sendMessage without a message object")]
            return [_message(ep.name, sender, message, ("json", "message"), "msg")]
        room = text_of(body.get("roomId") or body.get("channel"))
        msg = _message(ep.name, sender, body, ("json",), "text")
        return [ChatMessage(API, ep.name, sender, room, msg.parts, kind=ep.name)]
    except bodies.BodyError as e:
        return [malformed(API, ep.name, e)]


def _message(endpoint: str, sender: str, message: dict, prefix: tuple, key: str) -> ChatMessage:
    texts = []
    if text_of(message.get(key)):
        texts.append(TextPart(prefix + (key,), message[key]))
    texts += [TextPart(prefix + path, s)
              for path, s in bodies.strings_under(message.get("attachments"), TEXT_KEYS, ("attachments",))]
    return ChatMessage(API, endpoint, sender, text_of(message.get("rid")), tuple(texts), kind=endpoint)


def decode_ws(data: bytes, sender: str = "", limits: DecodeLimits = DecodeLimits()) -> list:
    """ChatMessages in one client WebSocket message (DDP, bare or SockJS-framed). Locators are
    ("ws", frame index, "json", ...) for rewrite_ws."""
    try:
        outer = bodies.parse_json(data, limits.max_json_depth)
    except bodies.BodyError:
        return []               # SockJS heartbeats ("h"), binary frames: not chat
    frames = [(None, outer)]
    if isinstance(outer, list):             # SockJS: ["{...}", "{...}"]
        frames = []
        for i, item in enumerate(outer):
            if isinstance(item, str):
                try:
                    frames.append((i, bodies.parse_json(item.encode(), limits.max_json_depth)))
                except bodies.BodyError:
                    continue
    out = []
    for index, frame in frames:
        if not (isinstance(frame, dict) and frame.get("msg") == "method" and frame.get("method") in DDP_METHODS):
            continue
        params = frame.get("params")
        if not (isinstance(params, list) and params and isinstance(params[0], dict)):
            continue
        msg = _message("ddp." + frame["method"], sender, params[0], ("ws", index, "params", 0), "msg")
        out.append((text_of(frame.get("id")), index, msg))
    return out


def rewrite_ws(data: bytes, replacements: list[tuple[tuple, str]]) -> bytes:
    outer = json.loads(data)
    for loc, text in replacements:
        _, index, *path = loc
        if index is None:
            target = outer
        else:
            target = json.loads(outer[index])
        obj = target
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = text
        if index is not None:
            outer[index] = json.dumps(target, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(outer, ensure_ascii=False, separators=(",", ":")).encode()


def ws_error(call_id: str, reason: str, sockjs: bool) -> bytes:
    """A DDP method result carrying an error, as the server would send it: the client's call fails with `reason`."""
    result = {"msg": "result", "id": call_id,
              "error": {"isClientSafe": True, "error": "error-action-not-allowed", "reason": reason,
                        "message": f"{reason} [error-action-not-allowed]", "errorType": "Meteor.Error"}}
    text = json.dumps(result, separators=(",", ":"))
    return ("a" + json.dumps([text])).encode() if sockjs else text.encode()


# --- what the server delivers ----------------------------------------------------------------------------

def _delivered(endpoint: str, msg: object, room: str, locator: tuple) -> list:
    if not isinstance(msg, dict) or msg.get("t"):       # a system message (user joined, ...)
        return []
    user = msg.get("u") if isinstance(msg.get("u"), dict) else {}
    sender, room = text_of(user.get("_id")) or text_of(user.get("username")), text_of(msg.get("rid")) or room
    files = [f for f in msg.get("files") or [] if isinstance(f, dict)] if isinstance(msg.get("files"), list) else []
    if isinstance(msg.get("file"), dict):
        files.append(msg["file"])
    names = {text_of(f.get("_id")): text_of(f.get("name")) for f in files if text_of(f.get("_id"))}
    refs = tuple("rocketchat:" + i for i in names)
    parts = message_parts(msg, "msg", ("attachments",), TEXT_KEYS)
    message = ChatMessage(API, endpoint, sender, room, parts, refs, kind="message")
    edited = msg.get("editedAt")
    version = json.dumps(edited, sort_keys=True) if edited else ""
    out: list = [DeliveredMessage(message, text_of(msg.get("_id")) + (f"@{version}" if version else ""), locator)]
    out += [SharedMedia(ref, sender, room, names[ref.split(":", 1)[1]]) for ref in refs]
    return out


def deliver(ep: Endpoint, req: HttpRequest, status: int, body: bytes,
            limits: DecodeLimits = DecodeLimits()) -> list:
    """A history response's messages (DeliveredMessage, own ones included) and the files they share."""
    if ep.kind != DELIVER or not 200 <= status < 300 or not body:
        return []
    data = parse_delivered(body, limits)
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return []
    out: list = []
    for i, msg in enumerate(messages):
        out += _delivered(ep.name, msg, req.param("roomId"), ("messages", i))
    return out


def _blank(msg: dict, notice: str) -> None:
    msg["msg"] = notice
    for key in ("attachments", "file", "files", "md", "urls", "blocks"):
        msg.pop(key, None)


def _after_mask(msg: dict) -> None:
    msg.pop("md", None)         # the server's parse of the original text: the client would render it


def rewrite_delivered(body: bytes, blocked=(), masked=()) -> bytes:
    return rewrite_json(body, blocked, masked, _blank, after_mask=_after_mask)


def _ws_frames(data: bytes, max_depth: int) -> tuple[object, list]:
    """(the outer JSON, [(frame index or None, frame)]) of a WebSocket message, bare DDP or SockJS-framed
    ("a" + a JSON array of strings, as the server sends it). Raises bodies.BodyError."""
    sockjs = data[:1] == b"a"
    outer = bodies.parse_json(data[1:] if sockjs else data, max_depth)
    if not sockjs and not isinstance(outer, list):
        return outer, [(None, outer)]
    if sockjs and not isinstance(outer, list):
        raise bodies.BodyError("a SockJS message frame that is not an array")
    frames = []
    for i, item in enumerate(outer if isinstance(outer, list) else []):
        if isinstance(item, str):
            try:
                frames.append((i, bodies.parse_json(item.encode(), max_depth)))
            except bodies.BodyError:
                continue
    return outer, frames


def deliver_ws(data: bytes, limits: DecodeLimits = DecodeLimits()) -> list:
    """What one server WebSocket message brings: DeliveredMessage per stream-room-messages message (locator
    ("ws", frame index, "fields", "args", i)) with its SharedMedia, and Identity("", user id) for a login
    result. Anything else (heartbeats "h", "o", other collections) brings nothing."""
    try:
        _, frames = _ws_frames(data, max(limits.max_json_depth, DELIVER_MAX_DEPTH))
    except bodies.BodyError:
        return []
    out: list = []
    for index, frame in frames:
        if not isinstance(frame, dict):
            continue
        result = frame.get("result")
        if frame.get("msg") == "result" and isinstance(result, dict) and text_of(result.get("token")) \
                and text_of(result.get("id")):
            out.append(Identity("", result["id"]))
        fields = frame.get("fields")
        if frame.get("msg") != "changed" or frame.get("collection") != "stream-room-messages" \
                or not isinstance(fields, dict) or not isinstance(fields.get("args"), list):
            continue
        room = text_of(fields.get("eventName"))
        for i, msg in enumerate(fields["args"]):
            out += _delivered("ddp.stream-room-messages", msg, room, ("ws", index, "fields", "args", i))
    return out


def rewrite_ws_delivered(data: bytes, blocked=(), masked=()) -> bytes:
    """The server WebSocket message with deliver_ws's messages blocked or masked as rewrite_delivered does,
    framed as it came (SockJS or bare)."""
    sockjs = data[:1] == b"a"
    outer, frames = _ws_frames(data, DELIVER_MAX_DEPTH)
    by_index = dict(frames)
    touched = {loc[1] for loc, _ in list(blocked) + list(masked)}
    for index in touched:
        if index not in by_index:
            raise bodies.BodyError(f"no frame {index!r}")
        rewrite_delivered_data(by_index[index], [(loc[2:], n) for loc, n in blocked if loc[1] == index],
                               [(loc[2:], p) for loc, p in masked if loc[1] == index], _blank,
                               after_mask=_after_mask)
        if index is not None:
            outer[index] = json.dumps(by_index[index], ensure_ascii=False, separators=(",", ":"))
    text = json.dumps(outer, ensure_ascii=False, separators=(",", ":"))
    return ("a" + text).encode() if sockjs else text.encode()


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    return []


def error_body(status: int, reason: str) -> bytes:
    types = {400: "error-invalid-params", 403: "error-action-not-allowed", 413: "error-file-too-large"}
    return dump({"success": False, "error": reason, "errorType": types.get(status, "error-not-allowed")})
