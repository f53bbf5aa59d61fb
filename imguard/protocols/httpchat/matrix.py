"""Matrix client-server API (spec v1.x): room messages, the content repository, and who holds which token.

    PUT  /_matrix/client/{r0,v3,unstable}/rooms/{room}/send/{type}/{txn}      -> ChatMessage / EncryptedContent
         m.room.message: body + formatted_body (HTML, stripped for policy); m.file/m.image/m.video/m.audio and
         m.sticker share `url` (mxc://) -> refs; an EncryptedFile (`file`, info.thumbnail_file) -> EncryptedContent
         plus its mxc in refs; m.room.encrypted (Megolm) -> EncryptedContent
    POST /_matrix/media/{r0,v3}/upload, /_matrix/client/v1/media/upload          -> FileUpload (learn content_uri)
    POST /_matrix/media/v1/create                                               -> learn (async upload's mxc)
    PUT  /_matrix/media/{r0,v3}/upload/{server}/{mediaId}                       -> FileUpload, ref mxc://server/id
    GET  /_matrix/{media/{r0,v3},client/v1/media}/{download,thumbnail}/{server}/{id}[/name] -> DOWNLOAD ref
         (the response's bytes are what the user receives: the carrier holds and scans them; a thumbnail is an
         image the server made, not the shared file, scanned all the same)
    GET  /_matrix/client/{r0,v3}/sync                                            -> DELIVER: deliver() reads the
         response: every m.room.message / m.sticker in rooms.{join,leave}.*.timeline.events -> DeliveredMessage
         (same text parts and refs as a sent one) and SharedMedia for each mxc it shares; rewrite_sync()
         swaps a blocked event's content for a notice and masks a masked one's texts
    POST .../login, .../register; GET .../account/whoami                         -> learn Identity
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import DecodeLimits, bearer, dump, json_body, malformed, text_of
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, LEARN, MESSAGE, UPLOAD, ChatMessage,
                                               DeliveredMessage, EncryptedContent, Endpoint, FileUpload, HttpRequest,
                                               Identity, SharedMedia, StoredMedia, TextPart, credential_key)

API = "matrix"
_V = r"(?:r0|v1|v3|unstable(?:/[^/]+)?)"
SEND = re.compile(rf"^/_matrix/client/{_V}/rooms/([^/]+)/send/([^/]+)/([^/]+)$")
UPLOAD_PATH = re.compile(rf"^/_matrix/(?:media/{_V}|client/v1/media)/upload/?$")
ASYNC_UPLOAD = re.compile(rf"^/_matrix/(?:media/{_V}|client/v1/media)/upload/([^/]+)/([^/]+)$")
CREATE = re.compile(rf"^/_matrix/(?:media/{_V}|client/v1/media)/create$")
MEDIA_GET = re.compile(rf"^/_matrix/(?:media/{_V}|client/v1/media)/(download|thumbnail)/([^/]+)/([^/]+)(?:/(.*))?$")
SYNC = re.compile(rf"^/_matrix/client/{_V}/sync$")
LOGIN = re.compile(rf"^/_matrix/client/{_V}/(?:login|register|refresh)$")
WHOAMI = re.compile(rf"^/_matrix/client/{_V}/account/whoami$")

SYNC_MAX_DEPTH = 256
FILE_MSGTYPES = ("m.file", "m.image", "m.video", "m.audio")


def mxc(server: str, media_id: str) -> str:
    return f"mxc://{unquote(server)}/{unquote(media_id)}"


def classify(method: str, path: str) -> Endpoint | None:
    if method == "PUT" and (m := SEND.match(path)):
        return Endpoint(API, "send", MESSAGE)
    if method == "POST" and UPLOAD_PATH.match(path):
        return Endpoint(API, "media_upload", UPLOAD, learn=True)
    if method == "PUT" and (m := ASYNC_UPLOAD.match(path)):
        return Endpoint(API, "media_upload_async", UPLOAD, ref=mxc(m.group(1), m.group(2)))
    if method == "POST" and CREATE.match(path):
        return Endpoint(API, "media_create", LEARN)     # the mxc it returns comes back in the upload's PUT path
    if method == "GET" and (m := MEDIA_GET.match(path)):
        return Endpoint(API, f"media_{m.group(1)}", DOWNLOAD, ref=mxc(m.group(2), m.group(3)))
    if method == "GET" and SYNC.match(path):
        return Endpoint(API, "sync", DELIVER)
    if method == "POST" and LOGIN.match(path):
        return Endpoint(API, "login", LEARN, learn=True)
    if method == "GET" and WHOAMI.match(path):
        return Endpoint(API, "whoami", LEARN, learn=True)
    return None


def decode(ep: Endpoint, req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> list:
    sender = bearer(req)
    if ep.kind == UPLOAD:
        name = req.param("filename")
        return [FileUpload(API, ep.name, sender, "", name, req.content_type, req.body, ref=ep.ref)]
    if ep.name != "send":
        return []
    m = SEND.match(req.path)
    room, event_type = unquote(m.group(1)), unquote(m.group(2))
    try:
        content = json_body(req, limits)
    except bodies.BodyError as e:
        return [malformed(API, ep.name, e)]
    if not isinstance(content, dict):
        return [malformed(API, ep.name, "the event content is not a JSON object")]
    if event_type == "m.room.encrypted":
        return [EncryptedContent(API, ep.name, sender, room, "m.room.encrypted")]
    if event_type not in ("m.room.message", "m.sticker"):
        return []                   # reactions, receipts, call signalling, custom events: no chat text
    parts, refs, encrypted_refs, encrypted = _content(content)
    out: list = []
    if encrypted:
        out.append(EncryptedContent(API, ep.name, sender, room, "EncryptedFile", encrypted_refs))
    out.append(ChatMessage(API, ep.name, sender, room, parts, refs,
                           kind=text_of(content.get("msgtype")) or event_type))
    return out


def _content(content: dict) -> tuple[tuple, tuple, tuple, bool]:
    """An m.room.message / m.sticker content: (text parts, refs, encrypted refs, has an EncryptedFile)."""
    parts = []
    body = content.get("body")
    if isinstance(body, str) and body:
        parts.append(TextPart(("json", "body"), body))
    formatted = content.get("formatted_body")
    if isinstance(formatted, str) and formatted:
        parts.append(TextPart(("json", "formatted_body"), bodies.strip_html(formatted), html=True))
    new = content.get("m.new_content")          # an edit carries the new text in m.new_content too
    if isinstance(new, dict):
        for key in ("body", "formatted_body"):
            value = new.get(key)
            if isinstance(value, str) and value:
                text = bodies.strip_html(value) if key == "formatted_body" else value
                parts.append(TextPart(("json", "m.new_content", key), text, html=key == "formatted_body"))
    caption = content.get("filename")
    if isinstance(caption, str) and caption and caption != body:
        parts.append(TextPart(("json", "filename"), caption))
    refs = []
    info = content.get("info") if isinstance(content.get("info"), dict) else {}
    for value in (content.get("url"), info.get("thumbnail_url")):
        if isinstance(value, str) and value.startswith("mxc://"):
            refs.append(value)
    encrypted = [f for f in (content.get("file"), info.get("thumbnail_file")) if isinstance(f, dict)]
    encrypted_refs = tuple(text_of(f.get("url")) for f in encrypted if text_of(f.get("url")))
    refs.extend(encrypted_refs)
    return tuple(parts), tuple(refs), encrypted_refs, bool(encrypted)


# --- what a /sync response delivers -------------------------------------------------------------------

def deliver(ep: Endpoint, req: HttpRequest, status: int, body: bytes,
            limits: DecodeLimits = DecodeLimits()) -> list:
    """The messages a /sync response brings (DeliveredMessage, own ones included: the carrier knows whose token
    it is) and the media they share (SharedMedia). JSON without rooms brings nothing. Raises bodies.BodyError
    for a body that is not JSON, or nested deeper than SYNC_MAX_DEPTH (events from others carry any JSON they
    like, so the request limit does not apply; json.loads itself copes with this depth)."""
    if ep.name != "sync" or not 200 <= status < 300 or not body:
        return []
    data = bodies.parse_json(body, max(limits.max_json_depth, SYNC_MAX_DEPTH))
    rooms = data.get("rooms") if isinstance(data, dict) else None
    if not isinstance(rooms, dict):
        return []
    out: list = []
    for section in ("join", "leave"):
        joined = rooms.get(section)
        if not isinstance(joined, dict):
            continue
        for room, state in joined.items():
            timeline = state.get("timeline") if isinstance(state, dict) else None
            events = timeline.get("events") if isinstance(timeline, dict) else None
            if not isinstance(events, list):
                continue
            for index, event in enumerate(events):
                if not isinstance(event, dict) or event.get("type") not in ("m.room.message", "m.sticker"):
                    continue
                content = event.get("content")
                if not isinstance(content, dict) or not content:
                    continue                # redacted: nothing left to read
                sender = text_of(event.get("sender"))
                parts, refs, _, _ = _content(content)
                message = ChatMessage(API, ep.name, sender, room, parts, refs,
                                      kind=text_of(content.get("msgtype")) or text_of(event.get("type")))
                out.append(DeliveredMessage(message, text_of(event.get("event_id")),
                                            ("rooms", section, room, "timeline", "events", index)))
                name = text_of(content.get("filename")) or text_of(content.get("body"))
                out.extend(SharedMedia(ref, sender, room, name) for ref in refs if ref.startswith("mxc://"))
    return out


def notice_content(notice: str) -> dict:
    """What a blocked event's content becomes: the notice only (no formatted_body, no url: nothing of the
    original is left)."""
    return {"msgtype": "m.notice", "body": notice}


def rewrite_sync(body: bytes, blocked=(), masked=(), max_depth: int = SYNC_MAX_DEPTH) -> bytes:
    """The sync response with, for each (event locator, notice) in `blocked`, the event's content replaced by
    notice_content(notice), and for each (event locator, [(part locator, text)]) in `masked` those texts of the
    event's content replaced (bodies.masked_replacements gives them). Raises bodies.BodyError when the body
    cannot be read or a locator does not lead to an event."""
    data = bodies.parse_json(body, max_depth)

    def event_at(locator: tuple) -> dict:
        node = data
        try:
            for key in locator:
                node = node[key]
        except (KeyError, IndexError, TypeError) as e:
            raise bodies.BodyError(f"no event at {locator!r}") from e
        if not isinstance(node, dict) or not isinstance(node.get("content"), dict):
            raise bodies.BodyError(f"no event at {locator!r}")
        return node

    for locator, notice in blocked:
        event = event_at(locator)
        event["content"] = notice_content(notice)
        unsigned = event.get("unsigned")
        if isinstance(unsigned, dict):
            unsigned.pop("m.relations", None)   # an aggregated edit would bring the text back
    for locator, parts in masked:
        event = event_at(locator)
        for part, text in parts:
            node = event["content"]
            try:
                for key in part[1:-1]:          # ("json", "m.new_content", "body"): the path in the content
                    node = node[key]
                node[part[-1]] = text
            except (KeyError, IndexError, TypeError) as e:
                raise bodies.BodyError(f"no text at {part!r} in the event at {locator!r}") from e
    return dump(data)


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    if not 200 <= status < 300:
        return []
    try:
        data = bodies.parse_json(body, 16)
    except bodies.BodyError:
        return []
    if not isinstance(data, dict):
        return []
    if ep.name == "media_upload":
        uri = text_of(data.get("content_uri"))
        return [StoredMedia(uri)] if uri.startswith("mxc://") else []
    user = text_of(data.get("user_id"))
    if not user:
        return []
    if ep.name == "login":
        token = text_of(data.get("access_token"))
        return [Identity(credential_key(token), user)] if token else []
    if ep.name == "whoami":
        key = bearer(req)
        return [Identity(key, user)] if key else []
    return []


ERRCODES = {400: "M_BAD_JSON", 403: "M_FORBIDDEN", 413: "M_TOO_LARGE"}


def error_body(status: int, reason: str) -> bytes:
    return dump({"errcode": ERRCODES.get(status, "M_UNKNOWN"), "error": reason})
