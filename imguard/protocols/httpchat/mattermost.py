"""Mattermost API v4 (/api/v4/...), session token in Authorization: Bearer (or the MMAUTHTOKEN cookie).

    POST /api/v4/files                 multipart (channel_id, files, client_ids), or the raw body with
                                       ?channel_id=&filename=                       -> FileUpload per file
    POST /api/v4/posts, /api/v4/posts/ephemeral; PUT /api/v4/posts/{id}; PUT /api/v4/posts/{id}/patch
                                       JSON {channel_id, message, file_ids, props.attachments}   -> ChatMessage
    POST /api/v4/uploads/{upload_id}   a resumable upload's data: FileUpload of that chunk (see below)
    WebSocket /api/v4/websocket        carries no posts from clients (they are REST); the client may
                                       authenticate on it ({"action":"authentication_challenge"}). The server
                                       pushes {"event":"posted"|"post_edited"|"ephemeral_message","data":{"post":
                                       "<JSON string>"}} -> deliver_ws(): DeliveredMessage (locator ("ws", "data",
                                       "post")); rewrite_ws_delivered() re-serialises the post into data.post;
                                       the "hello" event's broadcast.user_id names the socket's user
    GET  /api/v4/users/me              -> learn Identity (the session's user id)
    GET  /api/v4/channels/{id}/posts, /api/v4/posts/{id}/thread  {order, posts: {id: post}}; GET /api/v4/posts/{id}
                                       a post -> DELIVER: deliver() -> DeliveredMessage per post (not system
                                       posts; locator ("posts", id)), SharedMedia mattermost:<file id>;
                                       rewrite_delivered() makes a blocked post the notice (files, attachments,
                                       embeds dropped) and masks a masked one's texts
    GET  /api/v4/files/{id}[/preview|/thumbnail]   -> DOWNLOAD ref mattermost:<id> (preview, thumbnail derived)
    GET  /files/{id}/public?h=         (a public link, no session)   -> DOWNLOAD ref mattermost:<id>

A resumable upload (POST /api/v4/uploads, then data in one or more POSTs to /api/v4/uploads/{id}) is scanned
per request: a file sent in one request is scanned whole; a file split over several requests is scanned
chunk by chunk, which misses a signature cut by a chunk boundary (clients send 64 MiB+ chunks, so this only
concerns files larger than that).
"""

from __future__ import annotations

import json
import re

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import (DELIVER_MAX_DEPTH, DecodeLimits, bearer, dump, json_body, learned_object,
                                               malformed, message_parts, parse_delivered, plain_codec, rewrite_json,
                                               text_of, ws_json)
from imguard.protocols.httpchat.common import rewrite_delivered as rewrite_delivered_data
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, LEARN, MESSAGE, UPLOAD, ChatMessage,
                                               DeliveredMessage, Endpoint, FileUpload, HttpRequest, Identity,
                                               SharedMedia, TextPart, credential_key)

API = "mattermost"
POSTS = re.compile(r"^/api/v4/posts(?:/ephemeral)?$")
POST_EDIT = re.compile(r"^/api/v4/posts/[a-z0-9]+(?:/patch)?$")
FILES = re.compile(r"^/api/v4/files$")
UPLOAD_DATA = re.compile(r"^/api/v4/uploads/([a-z0-9]+)$")
FILE_GET = re.compile(r"^/api/v4/files/([a-z0-9]+)(?:/(preview|thumbnail))?$")
PUBLIC_FILE = re.compile(r"^/files/([a-z0-9]+)/public$")
CHANNEL_POSTS = re.compile(r"^/api/v4/channels/([a-z0-9]+)/posts$")
THREAD = re.compile(r"^/api/v4/posts/([a-z0-9]+)/thread$")
POST_GET = re.compile(r"^/api/v4/posts/([a-z0-9]+)$")
ME = "/api/v4/users/me"
WEBSOCKET = "/api/v4/websocket"
WS_POST_EVENTS = ("posted", "post_edited", "ephemeral_message")
WS_POST = ("ws", "data", "post")
TEXT_KEYS = frozenset({"text", "pretext", "fallback", "title", "value"})


def classify(method: str, path: str) -> Endpoint | None:
    if method == "POST" and POSTS.match(path) or method == "PUT" and POST_EDIT.match(path):
        return Endpoint(API, "post", MESSAGE)
    if method == "POST" and FILES.match(path):
        return Endpoint(API, "files", UPLOAD)
    if method == "POST" and UPLOAD_DATA.match(path):
        return Endpoint(API, "upload_data", UPLOAD)
    if method != "GET":
        return None
    if m := FILE_GET.match(path):
        return Endpoint(API, "file_" + (m.group(2) or "get"), DOWNLOAD, ref="mattermost:" + m.group(1),
                        derived=m.group(2) is not None)
    if m := PUBLIC_FILE.match(path):
        return Endpoint(API, "file_public", DOWNLOAD, ref="mattermost:" + m.group(1))
    if CHANNEL_POSTS.match(path):
        return Endpoint(API, "channel_posts", DELIVER)
    if THREAD.match(path):
        return Endpoint(API, "thread", DELIVER)
    if POST_GET.match(path):
        return Endpoint(API, "post_get", DELIVER)
    if path == ME:
        return Endpoint(API, "users_me", LEARN, learn=True)
    return None


def requester(req: HttpRequest) -> str:
    return _sender(req)


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


def deliver(ep: Endpoint, req: HttpRequest, status: int, body: bytes,
            limits: DecodeLimits = DecodeLimits()) -> list:
    """The posts a channel's, a thread's or a single post's response brings (DeliveredMessage, own ones included)
    and the files they share (SharedMedia). Raises bodies.BodyError for a body that is not JSON."""
    if ep.kind != DELIVER or not 200 <= status < 300 or not body:
        return []
    data = parse_delivered(body, limits)
    if not isinstance(data, dict):
        return []
    if ep.name == "post_get":
        found = [((), data)]
    else:
        posts = data.get("posts")
        found = [(("posts", k), v) for k, v in posts.items()] if isinstance(posts, dict) else []
    out: list = []
    for locator, post in found:
        out += _delivered(ep.name, post, locator)
    return out


def _delivered(endpoint: str, post: object, locator: tuple) -> list:
    """A post (REST, or a WebSocket event's) -> DeliveredMessage (not system posts) and its SharedMedia."""
    if not isinstance(post, dict) or text_of(post.get("type")).startswith("system_"):
        return []
    sender, room = text_of(post.get("user_id")), text_of(post.get("channel_id"))
    ids = post.get("file_ids") if isinstance(post.get("file_ids"), list) else []
    refs = tuple("mattermost:" + i for i in ids if isinstance(i, str) and i)
    parts = message_parts(post, "message", ("props",), TEXT_KEYS)
    message = ChatMessage(API, endpoint, sender, room, parts, refs, kind="post")
    out: list = [DeliveredMessage(message, text_of(post.get("id")), locator)]
    meta = post.get("metadata") if isinstance(post.get("metadata"), dict) else {}
    names = {text_of(f.get("id")): text_of(f.get("name")) for f in meta.get("files") or []
             if isinstance(f, dict)} if isinstance(meta.get("files"), list) else {}
    out += [SharedMedia(ref, sender, room, names.get(ref.split(":", 1)[1], "")) for ref in refs]
    return out


def _blank(post: dict, notice: str) -> None:
    post["message"] = notice
    post["file_ids"] = []
    post["props"] = {}
    post.pop("message_source", None)
    meta = post.get("metadata")
    if isinstance(meta, dict):
        for key in ("files", "embeds", "images"):
            meta.pop(key, None)


def _after_mask(post: dict) -> None:
    post.pop("message_source", None)        # the original markdown, when the server sends it


def rewrite_delivered(body: bytes, blocked=(), masked=()) -> bytes:
    """The response with each blocked post's message the notice (its files, attachments and embeds dropped) and
    each masked one's texts masked. Raises bodies.BodyError when a locator does not fit."""
    return rewrite_json(body, blocked, masked, _blank, after_mask=_after_mask)


# --- the WebSocket (/api/v4/websocket) -------------------------------------------------------------------

def is_websocket(path: str) -> bool:
    return path == WEBSOCKET


ws_codec = plain_codec          # JSON text messages


def ws_requester(req: HttpRequest) -> str:
    """Whose socket: the handshake's token (Authorization: Bearer, the MMAUTHTOKEN cookie)."""
    return _sender(req)


def ws_credential(data: bytes) -> str:
    """The token a client message authenticates the socket with: {"action":"authentication_challenge",
    "data":{"token"}} (a client whose handshake carried none)."""
    try:
        frame = bodies.parse_json(data, 16)
    except bodies.BodyError:
        return ""
    if isinstance(frame, dict) and frame.get("action") == "authentication_challenge" \
            and isinstance(frame.get("data"), dict) and text_of(frame["data"].get("token")):
        return credential_key(frame["data"]["token"])
    return ""


def _ws_post(frame: object, limits: DecodeLimits) -> dict | None:
    """The post a posted / post_edited / ephemeral_message event carries (data.post, a JSON string)."""
    if not isinstance(frame, dict) or frame.get("event") not in WS_POST_EVENTS \
            or not isinstance(frame.get("data"), dict):
        return None
    post = frame["data"].get("post")
    if not isinstance(post, str):
        raise bodies.BodyError(f"a {frame['event']} event without its post")
    found = bodies.parse_json(post.encode("utf-8"), max(limits.max_json_depth, DELIVER_MAX_DEPTH))
    if not isinstance(found, dict):
        raise bodies.BodyError(f"a {frame['event']} event whose post is not a JSON object")
    return found


def decode_ws(data: bytes, sender: str = "", limits: DecodeLimits = DecodeLimits()) -> list:
    return []                   # no chat from the client on this socket: its clients post over REST


def deliver_ws(data: bytes, limits: DecodeLimits = DecodeLimits()) -> list:
    """What one server message brings: {"event":"posted"|"post_edited"|"ephemeral_message","data":{"post":
    "<the post as a JSON string>","sender_name"},"broadcast":{...},"seq"} -> DeliveredMessage (locator
    ("ws", "data", "post")) with its SharedMedia; {"event":"hello","broadcast":{"user_id"}} names the socket's
    user: Identity("", user id). Other events bring nothing. Raises bodies.BodyError when the message (or its
    post) is not JSON."""
    frame = ws_json(data, limits)
    if isinstance(frame, dict) and frame.get("event") == "hello" and isinstance(frame.get("broadcast"), dict) \
            and text_of(frame["broadcast"].get("user_id")):
        return [Identity("", frame["broadcast"]["user_id"])]
    post = _ws_post(frame, limits)
    return [] if post is None else _delivered("ws." + frame["event"], post, WS_POST)


def rewrite_ws_delivered(data: bytes, blocked=(), masked=()) -> bytes:
    """The server message with its post blocked (the notice) or masked as rewrite_delivered does, the post
    re-serialised into data.post."""
    frame = bodies.parse_json(data, DELIVER_MAX_DEPTH)
    post = _ws_post(frame, DecodeLimits())
    if post is None or any(loc != WS_POST for loc, _ in list(blocked) + list(masked)):
        raise bodies.BodyError("no post where the rewrite expected one")
    rewrite_delivered_data(post, [((), n) for _, n in blocked], [((), p) for _, p in masked], _blank,
                           after_mask=_after_mask)
    frame["data"]["post"] = json.dumps(post, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    data = learned_object(status, body) if ep.name == "users_me" else None
    if data is None:
        return []
    user, key = text_of(data.get("id")), _sender(req)
    return [Identity(key, user)] if user and key else []


def error_body(status: int, reason: str) -> bytes:
    ids = {400: "api.imguard.malformed.app_error", 403: "api.imguard.blocked.app_error",
           413: "api.imguard.too_large.app_error"}
    return dump({"id": ids.get(status, "api.imguard.refused.app_error"), "message": reason, "detailed_error": "",
                 "request_id": "", "status_code": status})
