"""Discord HTTP API (/api/v{9,10}/ or unversioned /api/), token in Authorization ("Bot ..." or a user token).

    POST  /api/v10/channels/{id}/messages        JSON {content, embeds, attachments}, or multipart with
                                                 payload_json + files[n]              -> ChatMessage + FileUpload
    PATCH /api/v10/channels/{id}/messages/{mid}  same shapes (an edit)
    POST  /api/v10/channels/{id}/attachments     {files: [{filename, file_size, id}]} -> learn UploadSlot per file
    PUT   <upload_url> (any host, learned)       raw bytes                            -> FileUpload
          a later message's attachments[].uploaded_filename                           -> refs discord:<name>
"""

from __future__ import annotations

import re

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import DecodeLimits, bearer, dump, json_body, malformed, text_of
from imguard.protocols.httpchat.events import (MESSAGE, UPLOAD, ChatMessage, Endpoint, FileUpload, HttpRequest,
                                               TextPart, UploadSlot)

API = "discord"
_V = r"/api(?:/v\d+)?"
MESSAGES = re.compile(rf"^{_V}/channels/(\d+)/messages(?:/\d+)?$")
ATTACHMENTS = re.compile(rf"^{_V}/channels/(\d+)/attachments$")
TEXT_KEYS = frozenset({"content", "title", "description", "name", "value", "text"})


def classify(method: str, path: str) -> Endpoint | None:
    if method in ("POST", "PATCH") and MESSAGES.match(path):
        return Endpoint(API, "message", UPLOAD)        # may carry files: size-limited as an upload
    if method == "POST" and ATTACHMENTS.match(path):
        return Endpoint(API, "attachments", MESSAGE, learn=True)
    return None


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


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
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
