"""Discord HTTP API (/api/v{9,10}/ or unversioned /api/), token in Authorization ("Bot ..." or a user token).

    POST  /api/v10/channels/{id}/messages        JSON {content, embeds, attachments}, or multipart with
                                                 payload_json + files[n]              -> ChatMessage + FileUpload
    PATCH /api/v10/channels/{id}/messages/{mid}  same shapes (an edit)
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
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import (DecodeLimits, bearer, dump, json_body, malformed, message_parts,
                                               parse_delivered, rewrite_json, text_of)
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, LEARN, MESSAGE, UPLOAD, ChatMessage,
                                               DeliveredMessage, Endpoint, FileUpload, HttpRequest, Identity,
                                               SharedMedia, TextPart, UploadSlot)

API = "discord"
_V = r"/api(?:/v\d+)?"
MESSAGES = re.compile(rf"^{_V}/channels/(\d+)/messages(?:/\d+)?$")
ATTACHMENTS = re.compile(rf"^{_V}/channels/(\d+)/attachments$")
ME = re.compile(rf"^{_V}/users/@me$")
CDN = re.compile(r"^/attachments/(\d+)/(\d+)/([^/]+)$")
TEXT_KEYS = frozenset({"content", "title", "description", "name", "value", "text"})


def classify(method: str, path: str) -> Endpoint | None:
    if method in ("POST", "PATCH") and MESSAGES.match(path):
        return Endpoint(API, "message", UPLOAD)        # may carry files: size-limited as an upload
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
    return bearer(req)


def upload_endpoint() -> Endpoint:
    return Endpoint(API, "upload_url", UPLOAD)


def decode(ep: Endpoint, req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> list:
    sender = bearer(req)
    if ep.name == "upload_url":
        return [FileUpload(API, ep.name, "", "", "", req.content_type, req.body)]
    if ep.name == "attachments":
        return []
    room = MESSAGES.match(req.path).group(1)
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
        if not isinstance(msg, dict):
            continue
        author = msg.get("author") if isinstance(msg.get("author"), dict) else {}
        sender, room = text_of(author.get("id")), text_of(msg.get("channel_id")) or channel
        attachments = [a for a in msg.get("attachments") or [] if isinstance(a, dict) and text_of(a.get("id"))] \
            if isinstance(msg.get("attachments"), list) else []
        refs = tuple("discord:attachment:" + a["id"] for a in attachments)
        parts = message_parts(msg, "content", ("embeds", "referenced_message", "message_snapshots"), TEXT_KEYS)
        message = ChatMessage(API, ep.name, sender, room, parts, refs, kind="message")
        edited = text_of(msg.get("edited_timestamp"))
        out.append(DeliveredMessage(message, text_of(msg.get("id")) + (f"@{edited}" if edited else ""), locator))
        out += [SharedMedia("discord:attachment:" + a["id"], sender, room, text_of(a.get("filename")))
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


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    if ep.name == "users_me" and 200 <= status < 300:
        try:
            data = bodies.parse_json(body, 16)
        except bodies.BodyError:
            return []
        user, key = text_of(data.get("id")) if isinstance(data, dict) else "", bearer(req)
        return [Identity(key, user)] if user and key else []
    if ep.name != "attachments" or not 200 <= status < 300:
        return []
    try:
        data = bodies.parse_json(body, 16)
    except bodies.BodyError:
        return []
    room = ATTACHMENTS.match(req.path).group(1)
    out = []
    for a in data.get("attachments", []) if isinstance(data, dict) else []:
        if isinstance(a, dict) and text_of(a.get("upload_url")) and text_of(a.get("upload_filename")):
            out.append(UploadSlot(a["upload_url"], "discord:" + a["upload_filename"], "", bearer(req), room))
    return out


CODES = {400: 50035, 403: 200000, 413: 40005}


def error_body(status: int, reason: str) -> bytes:
    return dump({"message": reason, "code": CODES.get(status, 0)})
