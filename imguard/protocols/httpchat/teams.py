"""Microsoft Teams over Microsoft Graph (/v1.0/ or /beta/ on graph.microsoft.com), token in Authorization: Bearer.
Teams chat is Graph's chatMessage; its files are OneDrive / SharePoint drive items, uploaded before the message
that links them.

    POST  /v1.0/chats/{chat}/messages                          JSON chatMessage {body: {contentType, content},
    POST  /v1.0/teams/{team}/channels/{channel}/messages         subject, attachments: [{name, contentUrl}]}
    POST  .../messages/{id}/replies, PATCH .../messages/{id}     -> ChatMessage (room: the chat or the channel)
    PUT   /v1.0/{drive}/items/{item}[:/{path}:]/content          raw bytes (the small-file upload) -> FileUpload
    POST  /v1.0/{drive}/items/{item}[:/{path}:]/createUploadSession  -> learn UploadSlot(the session's uploadUrl)
    PUT   <uploadUrl> (any host, learned)                        Content-Range: bytes a-b/total -> FileUpload when
          the one request carries the whole file; a chunk of a larger session cannot be scanned alone: refused
          (413, MalformedRequest) - the session never completes
    GET   /v1.0/me                                               -> learn Identity (the token's user id)
    GET   /v1.0/chats/{chat}/messages, .../channels/{c}/messages[/{id}/replies] {value: [chatMessage]}, or one
          message -> DELIVER: DeliveredMessage per message (from.user.id, body.content, subject; locator
          ("value", i) or ()); rewrite_delivered() makes a blocked one the notice (plain text, its attachments,
          mentions and reactions dropped) and masks a masked one's texts
    {drive} is me/drive, drives/{id}, users/{id}/drive, groups/{id}/drive or sites/{id}/drive; {item} an id or
    root; msgraph-sdk sends a path-addressed item ("root:/name:") percent-encoded as one segment.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import (DecodeLimits, bearer, dump, json_body, learned_object, malformed,
                                               parse_delivered, rewrite_json, text_of)
from imguard.protocols.httpchat.events import (DELIVER, LEARN, MESSAGE, UPLOAD, ChatMessage, DeliveredMessage,
                                               Endpoint, FileUpload, HttpRequest, Identity, TextPart, UploadSlot)

API = "teams"
_V = r"/(?:v1\.0|beta)"
MESSAGES = re.compile(rf"^{_V}/(?:chats/([^/]+)|teams/[^/]+/channels/([^/]+))/messages"
                      r"(?:/([^/]+)(/replies(?:/[^/]+)?)?)?$")
_DRIVE = r"(?:me/drive|drives/[^/]+|(?:users|groups|sites)/[^/]+/drive)"
_ITEM = r"(?:items/([^/]+)|root)(?::/(.+?):)?"
CONTENT = re.compile(rf"^{_V}/{_DRIVE}/{_ITEM}/content$")
UPLOAD_SESSION = re.compile(rf"^{_V}/{_DRIVE}/{_ITEM}/createUploadSession$")
ME = re.compile(rf"^{_V}/me$")
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
NOTICE_TYPE = "text"


def classify(method: str, path: str) -> Endpoint | None:
    m = MESSAGES.match(path)
    if m and (method == "POST" and (m.group(3) is None or m.group(4) == "/replies")
              or method == "PATCH" and m.group(3) is not None):
        return Endpoint(API, "message", MESSAGE)
    if method == "PUT" and CONTENT.match(path):
        return Endpoint(API, "drive_content", UPLOAD)
    if method == "POST" and UPLOAD_SESSION.match(path):
        return Endpoint(API, "create_upload_session", MESSAGE, learn=True)
    if method != "GET":
        return None
    if m and (m.group(3) is None or m.group(4) in ("/replies", None)):
        return Endpoint(API, "messages", DELIVER)
    if ME.match(path):
        return Endpoint(API, "me", LEARN, learn=True)
    return None


def requester(req: HttpRequest) -> str:
    return bearer(req)


def upload_endpoint() -> Endpoint:
    """The endpoint of a learned upload-session URL (createUploadSession's uploadUrl)."""
    return Endpoint(API, "upload_session", UPLOAD)


def item_name(path: str) -> str:
    """The file name a drive-item path names: the last segment of ":/folder/name:" (or of a percent-encoded
    "root:/folder/name:" item id, as msgraph-sdk sends it); "" for an item addressed by id."""
    m = CONTENT.match(path) or UPLOAD_SESSION.match(path)
    if m is None:
        return ""
    addressed = m.group(2) or unquote(m.group(1) or "")
    if m.group(2):
        return unquote(m.group(2)).rsplit("/", 1)[-1]
    if ":/" in addressed:
        return addressed.split(":/", 1)[1].rstrip(":").rsplit("/", 1)[-1]
    return ""


def _room(path: str) -> str:
    m = MESSAGES.match(path)
    return unquote(m.group(1) or m.group(2)) if m else ""


def _parts(msg: dict, prefix: tuple) -> tuple:
    parts = []
    body = msg.get("body")
    if isinstance(body, dict) and text_of(body.get("content")):
        parts.append(TextPart(prefix + ("body", "content"), body["content"]))
    if text_of(msg.get("subject")):
        parts.append(TextPart(prefix + ("subject",), msg["subject"]))
    for i, a in enumerate(msg.get("attachments") if isinstance(msg.get("attachments"), list) else []):
        if isinstance(a, dict) and text_of(a.get("content")):
            parts.append(TextPart(prefix + ("attachments", i, "content"), a["content"]))
    return tuple(parts)


def _refs(msg: dict) -> tuple:
    found = msg.get("attachments") if isinstance(msg.get("attachments"), list) else []
    return tuple("teams:" + a["contentUrl"] for a in found if isinstance(a, dict) and text_of(a.get("contentUrl")))


def decode(ep: Endpoint, req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> list:
    sender = bearer(req)
    if ep.name == "create_upload_session":
        return []
    if ep.name == "drive_content":
        return [FileUpload(API, ep.name, sender, "", item_name(req.path), req.content_type, req.body)]
    if ep.name == "upload_session":
        return _session_chunk(ep, req)
    try:
        msg = json_body(req, limits)
    except bodies.BodyError as e:
        return [malformed(API, ep.name, e)]
    if not isinstance(msg, dict):
        return [malformed(API, ep.name, "the chatMessage is not a JSON object")]
    return [ChatMessage(API, ep.name, sender, _room(req.path), _parts(msg, ("json",)), _refs(msg), kind="message")]


def _session_chunk(ep: Endpoint, req: HttpRequest) -> list:
    """A PUT to an upload session: the file when this one request carries all of it, else a refusal (a chunk
    alone is not the file, and the gateway does not join the session's requests)."""
    crange = req.header("content-range").strip()
    m = CONTENT_RANGE.match(crange)
    if m is None:
        return [malformed(API, ep.name, f"an upload-session PUT without a valid Content-Range ({crange!r})")]
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if first != 0 or total == "*" or last + 1 != int(total) or len(req.body) != int(total):
        return [malformed(API, ep.name, f"a chunk ({crange}) of an upload session: imguard inspects a file sent "
                          "in one request only (raise the client's chunk size above the file)", status=413)]
    return [FileUpload(API, ep.name, "", "", "", req.content_type, req.body)]


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    data = learned_object(status, body) if ep.name in ("me", "create_upload_session") else None
    if data is None:
        return []
    if ep.name == "me":
        key, user = bearer(req), text_of(data.get("id"))
        return [Identity(key, user)] if key and user else []
    url = text_of(data.get("uploadUrl"))
    name = item_name(req.path)
    return [UploadSlot(url, "teams:" + url, name, bearer(req), "")] if url else []


def deliver(ep: Endpoint, req: HttpRequest, status: int, body: bytes,
            limits: DecodeLimits = DecodeLimits()) -> list:
    """A page of messages ({value: [...]}) or one message -> DeliveredMessage each (own ones included).
    Raises bodies.BodyError for a body that is not JSON."""
    if ep.kind != DELIVER or not 200 <= status < 300 or not body:
        return []
    data = parse_delivered(body, limits)
    if not isinstance(data, dict):
        return []
    found = [(("value", i), m) for i, m in enumerate(data["value"])] if isinstance(data.get("value"), list) \
        else [((), data)]
    room = _room(req.path)
    out: list = []
    for locator, msg in found:
        if not isinstance(msg, dict):
            continue
        author = msg.get("from") if isinstance(msg.get("from"), dict) else {}
        user = author.get("user") if isinstance(author.get("user"), dict) else {}
        app = author.get("application") if isinstance(author.get("application"), dict) else {}
        sender = text_of(user.get("id")) or text_of(app.get("id"))
        where = text_of(msg.get("chatId")) or room
        message = ChatMessage(API, ep.name, sender, where, _parts(msg, ("json",)), _refs(msg),
                              kind=text_of(msg.get("messageType")) or "message")
        out.append(DeliveredMessage(message, f"{where}/{text_of(msg.get('id'))}" if msg.get("id") else "", locator))
    return out


def _blank(msg: dict, notice: str) -> None:
    msg["body"] = {"contentType": NOTICE_TYPE, "content": notice}
    msg.pop("subject", None)
    for key in ("attachments", "mentions", "reactions", "hostedContents"):
        if key in msg:
            msg[key] = []


def rewrite_delivered(body: bytes, blocked=(), masked=()) -> bytes:
    return rewrite_json(body, blocked, masked, _blank)


def is_websocket(path: str) -> bool:
    return False


CODES = {400: "invalidRequest", 403: "accessDenied", 413: "requestEntityTooLarge"}


def error_body(status: int, reason: str) -> bytes:
    """Graph's error JSON (an ODataError: msgraph-sdk raises it with error.code and error.message)."""
    return dump({"error": {"code": CODES.get(status, "generalException"), "message": reason}})
