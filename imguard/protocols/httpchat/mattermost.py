"""Mattermost API v4 (/api/v4/...), session token in Authorization: Bearer (or the MMAUTHTOKEN cookie).

    POST /api/v4/files                 multipart (channel_id, files, client_ids), or the raw body with
                                       ?channel_id=&filename=                       -> FileUpload per file
    POST /api/v4/posts, /api/v4/posts/ephemeral; PUT /api/v4/posts/{id}; PUT /api/v4/posts/{id}/patch
                                       JSON {channel_id, message, file_ids, props.attachments}   -> ChatMessage
    POST /api/v4/uploads/{upload_id}   a resumable upload's data: FileUpload of that chunk (see below)
    WebSocket /api/v4/websocket        carries no posts from clients (they are REST): not decoded

A resumable upload (POST /api/v4/uploads, then data in one or more POSTs to /api/v4/uploads/{id}) is scanned
per request: a file sent in one request is scanned whole; a file split over several requests is scanned
chunk by chunk, which misses a signature cut by a chunk boundary (clients send 64 MiB+ chunks, so this only
concerns files larger than that).
"""

from __future__ import annotations

import re

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import DecodeLimits, bearer, dump, json_body, malformed, text_of
from imguard.protocols.httpchat.events import (MESSAGE, UPLOAD, ChatMessage, Endpoint, FileUpload, HttpRequest,
                                               TextPart, credential_key)

API = "mattermost"
POSTS = re.compile(r"^/api/v4/posts(?:/ephemeral)?$")
POST_EDIT = re.compile(r"^/api/v4/posts/[a-z0-9]+(?:/patch)?$")
FILES = re.compile(r"^/api/v4/files$")
UPLOAD_DATA = re.compile(r"^/api/v4/uploads/([a-z0-9]+)$")
TEXT_KEYS = frozenset({"text", "pretext", "fallback", "title", "value"})


def classify(method: str, path: str) -> Endpoint | None:
    if method == "POST" and POSTS.match(path) or method == "PUT" and POST_EDIT.match(path):
        return Endpoint(API, "post", MESSAGE)
    if method == "POST" and FILES.match(path):
        return Endpoint(API, "files", UPLOAD)
    if method == "POST" and UPLOAD_DATA.match(path):
        return Endpoint(API, "upload_data", UPLOAD)
    return None


def _sender(req: HttpRequest) -> str:
    key = bearer(req)
    if key:
        return key
    m = re.search(r"MMAUTHTOKEN=([^;\s]+)", req.header("cookie"))
    return credential_key(m.group(1)) if m else ""


def decode(ep: Endpoint, req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> list:
    sender = _sender(req)
    try:
        if ep.name == "files":
            if req.content_type == "multipart/form-data":
                parts = bodies.parse_multipart(req.body, req.header("content-type"), limits.max_parts)
                room = next((p.text for p in parts if p.name == "channel_id"), "") or req.param("channel_id")
                files = [FileUpload(API, ep.name, sender, room, p.filename or "", p.content_type, p.data)
                         for p in parts if p.filename is not None or p.name == "files"]
                return files or [malformed(API, ep.name, "no file in the upload")]
            return [FileUpload(API, ep.name, sender, req.param("channel_id"), req.param("filename"),
                               req.content_type, req.body)]
        if ep.name == "upload_data":
            return [FileUpload(API, ep.name, sender, "", "", req.content_type, req.body)]
        post = json_body(req, limits)
        if not isinstance(post, dict):
            return [malformed(API, ep.name, "the post is not a JSON object")]
        if "post" in post and isinstance(post["post"], dict) and "message" not in post:    # /posts/ephemeral
            post, prefix = post["post"], ("json", "post")
        else:
            prefix = ("json",)
        texts = []
        if text_of(post.get("message")):
            texts.append(TextPart(prefix + ("message",), post["message"]))
        props = post.get("props")
        if isinstance(props, dict):
            texts += [TextPart(prefix + ("props",) + path, s)
                      for path, s in bodies.strings_under(props.get("attachments"), TEXT_KEYS, ("attachments",))]
        ids = post.get("file_ids")
        refs = tuple("mattermost:" + i for i in ids if isinstance(i, str)) if isinstance(ids, list) else ()
        return [ChatMessage(API, ep.name, sender, text_of(post.get("channel_id")), tuple(texts), refs, kind="post")]
    except bodies.BodyError as e:
        return [malformed(API, ep.name, e)]


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    return []


def error_body(status: int, reason: str) -> bytes:
    ids = {400: "api.imguard.malformed.app_error", 403: "api.imguard.blocked.app_error",
           413: "api.imguard.too_large.app_error"}
    return dump({"id": ids.get(status, "api.imguard.refused.app_error"), "message": reason, "detailed_error": "",
                 "request_id": "", "status_code": status})
