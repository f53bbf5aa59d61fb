"""Rocket.Chat REST API v1 and its DDP WebSocket; the user id comes in X-User-Id (token in X-Auth-Token).

    POST /api/v1/rooms.upload/{rid}      multipart file, msg, description, tmid  -> FileUpload + ChatMessage
    POST /api/v1/rooms.media/{rid}       multipart file                          -> FileUpload
    POST /api/v1/rooms.mediaConfirm/{rid}/{fileId}  JSON msg, description        -> ChatMessage, ref rocketchat:<fileId>
    POST /api/v1/chat.sendMessage        JSON {message: {rid, msg, attachments}} -> ChatMessage
    POST /api/v1/chat.postMessage        JSON {roomId|channel, text, attachments} -> ChatMessage
    POST /api/v1/chat.update             JSON {roomId, msgId, text}              -> ChatMessage
    WebSocket (/websocket, /sockjs/.../websocket): DDP {"msg":"method","method":"sendMessage"|"updateMessage",
             "params":[{"rid","msg"}]}, bare or in a SockJS frame (a JSON array of strings) -> ChatMessage
"""

from __future__ import annotations

import json
import re

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import DecodeLimits, dump, json_body, malformed, text_of
from imguard.protocols.httpchat.events import MESSAGE, UPLOAD, ChatMessage, Endpoint, FileUpload, HttpRequest, TextPart

API = "rocketchat"
UPLOAD_PATH = re.compile(r"^/api/v1/rooms\.(upload|media)/([^/]+)$")
CONFIRM = re.compile(r"^/api/v1/rooms\.mediaConfirm/([^/]+)/([^/]+)$")
CHAT = re.compile(r"^/api/v1/chat\.(sendMessage|postMessage|update)$")
WEBSOCKET = re.compile(r"^(?:/websocket|/sockjs/.*/websocket)$")
TEXT_KEYS = frozenset({"text", "title", "description", "pretext", "value"})
DDP_METHODS = ("sendMessage", "updateMessage")


def classify(method: str, path: str) -> Endpoint | None:
    if method == "POST" and UPLOAD_PATH.match(path):
        return Endpoint(API, "rooms." + UPLOAD_PATH.match(path).group(1), UPLOAD)
    if method == "POST" and CONFIRM.match(path):
        return Endpoint(API, "rooms.mediaConfirm", MESSAGE)
    if method == "POST" and (m := CHAT.match(path)):
        return Endpoint(API, "chat." + m.group(1), MESSAGE)
    return None


def is_websocket(path: str) -> bool:
    return bool(WEBSOCKET.match(path))


def _sender(req: HttpRequest) -> str:
    return req.header("x-user-id")


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


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    return []


def error_body(status: int, reason: str) -> bytes:
    types = {400: "error-invalid-params", 403: "error-action-not-allowed", 413: "error-file-too-large"}
    return dump({"success": False, "error": reason, "errorType": types.get(status, "error-not-allowed")})
