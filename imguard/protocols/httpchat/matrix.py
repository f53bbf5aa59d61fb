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
         (same text parts and refs as a sent one) and SharedMedia for each mxc it shares; an m.room.encrypted
         event (Megolm) -> DeliveredMessage with no text and `encrypted` set (policy decides on the fact; a
         message in clear with an EncryptedFile: `encrypted` "EncryptedFile", its text and refs as usual);
         rewrite_delivered() swaps a blocked event's content for a notice (an encrypted one becomes an
         m.room.message, which the client shows instead of failing to decrypt) and masks a masked one's texts
    GET  /_matrix/client/{r0,v3}/rooms/{room}/messages                          -> DELIVER, the events in `chunk`
    GET  /_matrix/client/{r0,v3}/rooms/{room}/context/{eventId}                 -> DELIVER, `event`,
         `events_before`, `events_after`
    GET  /_matrix/client/{r0,v3}/rooms/{room}/event/{eventId}                   -> DELIVER, the event itself
    GET  /_matrix/client/v1/rooms/{room}/relations/{eventId}[/{relType}[/{eventType}]], .../threads
                                                                                -> DELIVER, the events in `chunk`
                                                                                   (thread replies, thread roots)
    POST .../login, .../register; GET .../account/whoami                         -> learn Identity
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import NamedTuple
from urllib.parse import unquote

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import (DELIVER_MAX_DEPTH, DecodeLimits, bearer, dump, json_body, learned_object,
                                               malformed, rewrite_json, text_of)
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
ROOM_READ = re.compile(rf"^/_matrix/client/{_V}/rooms/([^/]+)/(messages|context|event)(?:/([^/]+))?$")
ROOM_CHUNK = re.compile(rf"^/_matrix/client/{_V}/rooms/([^/]+)/(relations/[^/]+(?:/[^/]+){{0,2}}|threads)$")
LOGIN = re.compile(rf"^/_matrix/client/{_V}/(?:login|register|refresh)$")
WHOAMI = re.compile(rf"^/_matrix/client/{_V}/account/whoami$")

SYNC_MAX_DEPTH = DELIVER_MAX_DEPTH
ENCRYPTED = "m.room.encrypted"          # a Megolm room event (EncryptedContent.scheme, DeliveredMessage.encrypted)
FILE_MSGTYPES = ("m.file", "m.image", "m.video", "m.audio")


def mxc(server: str, media_id: str) -> str:
    return f"mxc://{unquote(server)}/{unquote(media_id)}"


def is_websocket(path: str) -> bool:
    return False                # the client-server API has no WebSocket (MSC3079 was never merged)


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
        return Endpoint(API, f"media_{m.group(1)}", DOWNLOAD, ref=mxc(m.group(2), m.group(3)),
                        filename=unquote(m.group(4) or ""), derived=m.group(1) == "thumbnail")
    if method == "GET" and SYNC.match(path):
        return Endpoint(API, "sync", DELIVER)
    if method == "GET" and (m := ROOM_READ.match(path)) and (m.group(2) == "messages") == (m.group(3) is None):
        return Endpoint(API, m.group(2), DELIVER)
    if method == "GET" and (m := ROOM_CHUNK.match(path)):
        return Endpoint(API, m.group(2).split("/", 1)[0], DELIVER)
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
    if event_type == ENCRYPTED:
        return [EncryptedContent(API, ep.name, sender, room, ENCRYPTED)]
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


# --- what /sync, /messages, /context and /event responses deliver -----------------------------------------

def deliver(ep: Endpoint, req: HttpRequest, status: int, body: bytes,
            limits: DecodeLimits = DecodeLimits()) -> list:
    """The messages a response brings (DeliveredMessage, own ones included: the carrier knows whose token it is)
    and the media they share (SharedMedia): /sync (rooms.{join,leave}.*.timeline.events), /messages, /relations
    and /threads (chunk), /context (event, events_before, events_after), /event (the event itself). JSON without
    them brings nothing. Raises bodies.BodyError for a body that is not JSON, or nested deeper than
    SYNC_MAX_DEPTH (events from others carry any JSON they like, so the request limit does not apply)."""
    if ep.kind != DELIVER or not 200 <= status < 300 or not body:
        return []
    data = bodies.parse_json(body, max(limits.max_json_depth, SYNC_MAX_DEPTH))
    if not isinstance(data, dict):
        return []
    if ep.name == "sync":
        return _sync_events(ep, data)
    m = ROOM_READ.match(req.path) or ROOM_CHUNK.match(req.path)
    room = unquote(m.group(1)) if m else ""
    found: list[tuple[tuple, object]] = []
    if ep.name in ("messages", "relations", "threads") and isinstance(data.get("chunk"), list):
        found = [(("chunk", i), e) for i, e in enumerate(data["chunk"])]
    elif ep.name == "context":
        found = [(("event",), data.get("event"))]
        for key in ("events_before", "events_after"):
            if isinstance(data.get(key), list):
                found += [((key, i), e) for i, e in enumerate(data[key])]
    elif ep.name == "event":
        found = [((), data)]
    out: list = []
    for locator, event in found:
        if isinstance(event, dict):
            out += _event(ep, event, text_of(event.get("room_id")) or room, locator)
    return out


def _sync_events(ep: Endpoint, data: dict) -> list:
    rooms = data.get("rooms")
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
                if isinstance(event, dict):
                    out += _event(ep, event, room, ("rooms", section, room, "timeline", "events", index))
    return out


def _event(ep: Endpoint, event: dict, room: str, locator: tuple) -> list:
    """DeliveredMessage and SharedMedia of one room event (nothing for other event types, or a redacted one)."""
    if event.get("type") not in ("m.room.message", "m.sticker", ENCRYPTED):
        return []
    content = event.get("content")
    if not isinstance(content, dict) or not content:
        return []                       # redacted: nothing left to read
    sender = text_of(event.get("sender"))
    if event.get("type") == ENCRYPTED:  # Megolm ciphertext: who, where and that it is encrypted, no text
        message = ChatMessage(API, ep.name, sender, room, kind=ENCRYPTED)
        return [DeliveredMessage(message, text_of(event.get("event_id")), locator, encrypted=ENCRYPTED)]
    parts, refs, _, attachment = _content(content)
    message = ChatMessage(API, ep.name, sender, room, parts, refs,
                          kind=text_of(content.get("msgtype")) or text_of(event.get("type")))
    out: list = [DeliveredMessage(message, text_of(event.get("event_id")), locator,
                                  encrypted="EncryptedFile" if attachment else "")]
    name = text_of(content.get("filename")) or text_of(content.get("body"))
    out.extend(SharedMedia(ref, sender, room, name) for ref in refs if ref.startswith("mxc://"))
    return out


def notice_content(notice: str) -> dict:
    """What a blocked event's content becomes: the notice only (no formatted_body, no url: nothing of the
    original is left)."""
    return {"msgtype": "m.notice", "body": notice}


def _blank(event: dict, notice: str) -> None:
    if not isinstance(event.get("content"), dict):
        raise bodies.BodyError("the event has no content")
    event["content"] = notice_content(notice)
    if event.get("type") == ENCRYPTED:
        event["type"] = "m.room.message"        # the notice is clear text: the client shows it, decrypts nothing
    unsigned = event.get("unsigned")
    if isinstance(unsigned, dict):
        unsigned.pop("m.relations", None)       # an aggregated edit would bring the text back


def _within(event: dict) -> dict:
    content = event.get("content")
    if not isinstance(content, dict):
        raise bodies.BodyError("the event has no content")
    return content


def rewrite_delivered(body: bytes, blocked=(), masked=()) -> bytes:
    """The response with, for each (event locator, notice) in `blocked`, the event's content replaced by
    notice_content(notice), and for each (event locator, [(part locator, text)]) in `masked` those texts of the
    event's content replaced (bodies.masked_replacements gives them). Raises bodies.BodyError when the body
    cannot be read or a locator does not lead to an event."""
    return rewrite_json(body, blocked, masked, _blank, _within)


rewrite_sync = rewrite_delivered


def requester(req: HttpRequest) -> str:
    """Who asks (the credential key of the access token)."""
    return bearer(req)


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    data = learned_object(status, body)
    if data is None:
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


# --- room membership, for the ethical walls (imguard/policy/walls.py; read by chatapi.py) ---------------------------

MEMBERSHIP = re.compile(rf"^/_matrix/client/{_V}/(?:join/([^/]+)|rooms/([^/]+)/(join|invite))$")
MEMBER_EVENT = "m.room.member"


def membership_call(method: str, path: str) -> tuple[str, str] | None:
    """("join", the room id or alias) of POST /join/{room} or /rooms/{room}/join, ("invite", the room id) of POST
    /rooms/{room}/invite; None for any other request."""
    if method.upper() != "POST" or not (m := MEMBERSHIP.match(path)):
        return None
    if m.group(1) is not None:
        return "join", unquote(m.group(1))
    return m.group(3), unquote(m.group(2))


def invitee(req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> str:
    """The user an invite's body names ("" when it names none or cannot be read)."""
    try:
        content = json_body(req, limits)
    except bodies.BodyError:
        return ""
    return text_of(content.get("user_id")) if isinstance(content, dict) else ""


class SyncMembers(NamedTuple):
    """What a /sync response shows of room membership, read in one pass (sync_members)."""
    facts: list[tuple[str, str, str]]           # (room, user, membership) for the member table (room_members)
    invites: dict[str, tuple[str, tuple[str, ...]]]     # rooms.invite: room -> (the inviter, members in invite_state)
    arrivals: list[tuple[str, str]]             # (room, user): a join in rooms.join's timeline (not a profile change)


NO_MEMBERS = SyncMembers([], {}, [])


def _parse(body: bytes, limits: DecodeLimits, depth_checked: bool) -> object:
    """A /sync body's JSON; `depth_checked`: deliver() read these very bytes, their depth is known to be within
    bounds (the bracket count costs as much as the parse: it is not done twice)."""
    if not depth_checked:
        return bodies.parse_json(body, max(limits.max_json_depth, SYNC_MAX_DEPTH))
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise bodies.BodyError(f"malformed JSON: {e}") from None


def sync_members(body: bytes, limits: DecodeLimits = DecodeLimits(), depth_checked: bool = False) -> SyncMembers:
    """The m.room.member events a /sync response carries, in order: rooms.join and rooms.leave, their state then
    timeline events; for rooms.invite the inviter as "join" (the sender of the invite in invite_state is in the
    room), and each invite as (inviter, the users invite_state shows joined). NO_MEMBERS for a body that is not
    such JSON."""
    try:
        data = _parse(body, limits, depth_checked)
    except bodies.BodyError:
        return NO_MEMBERS
    rooms = data.get("rooms") if isinstance(data, dict) else None
    if not isinstance(rooms, dict):
        return NO_MEMBERS
    out = SyncMembers([], {}, [])
    for section, lists in (("join", ("state", "timeline")), ("leave", ("state", "timeline")),
                           ("invite", ("invite_state",))):
        entries = rooms.get(section)
        if not isinstance(entries, dict):
            continue
        for room, state in entries.items():
            inviter, joined = "", []
            for key in lists if isinstance(state, dict) else ():
                events = state[key].get("events") if isinstance(state.get(key), dict) else None
                for event in events if isinstance(events, list) else ():
                    if not isinstance(event, dict) or event.get("type") != MEMBER_EVENT:
                        continue
                    content = event.get("content") if isinstance(event.get("content"), dict) else {}
                    user, membership = text_of(event.get("state_key")), text_of(content.get("membership"))
                    if section != "invite":
                        if user and membership:
                            out.facts.append((room, user, membership))
                        if (membership == "join" and user and section == "join" and key == "timeline"
                                and _before(event) != "join"):
                            out.arrivals.append((room, user))
                    elif membership == "invite" and text_of(event.get("sender")):
                        inviter = text_of(event.get("sender"))
                        out.facts.append((room, inviter, "join"))
                    elif membership == "join" and user:
                        joined.append(user)
            if section == "invite" and inviter:
                out.invites[room] = (inviter, tuple(dict.fromkeys(joined)))
    return out


def _before(event: dict) -> str:
    """The membership a member event changed (unsigned.prev_content): "join" for a join that renames."""
    unsigned = event.get("unsigned") if isinstance(event.get("unsigned"), dict) else {}
    prev = unsigned.get("prev_content") if isinstance(unsigned.get("prev_content"), dict) else {}
    return text_of(prev.get("membership"))


def room_members(body: bytes, limits: DecodeLimits = DecodeLimits()) -> list[tuple[str, str, str]]:
    """(room, user, membership) of the m.room.member events a /sync response carries (sync_members)."""
    return sync_members(body, limits).facts


WALL_SENDER = "@imguard"        # the sender of a wall's notice in a room's timeline: @imguard:<the user's server>


def wall_notice_event(room: str, member: str, notice: str, user: str) -> dict:
    """The event a /sync shows in `room` telling `user` that `member` (across a wall) is there: an m.notice from
    @imguard on the user's server, with an event id of its own that stays the same for the same arrival (a client
    that sees it twice keeps one)."""
    server = user.partition(":")[2] or "localhost"
    digest = hashlib.sha256("\0".join((room, member, user)).encode("utf-8", "replace")).hexdigest()[:24]
    return {"type": "m.room.message", "sender": f"{WALL_SENDER}:{server}", "event_id": f"$imguard-wall-{digest}",
            "origin_server_ts": int(time.time() * 1000), "room_id": room, "content": notice_content(notice),
            "unsigned": {}}


def rewrite_sync_walls(body: bytes, drop_invites=(), notices=()) -> bytes:
    """The /sync response (one deliver() read) without the rooms.invite entries of `drop_invites`, and with each
    (room, member, event) of `notices` in rooms.join.<room>.timeline.events: right after `member`'s join there, else
    last. Raises bodies.BodyError when the body cannot be read."""
    data = _parse(body, DecodeLimits(), True)
    rooms = data.get("rooms") if isinstance(data, dict) else None
    if not isinstance(rooms, dict):
        raise bodies.BodyError("the /sync response has no rooms")
    invites = rooms.get("invite")
    for room in drop_invites:
        if isinstance(invites, dict):
            invites.pop(room, None)
    for room, member, event in notices:
        joined = rooms.get("join")
        state = joined.get(room) if isinstance(joined, dict) else None
        if not isinstance(state, dict):
            continue
        timeline = state.get("timeline")
        if not isinstance(timeline, dict):
            timeline = state["timeline"] = {}
        events = timeline.get("events")
        if not isinstance(events, list):
            events = timeline["events"] = []
        at = next((i + 1 for i, e in enumerate(events) if isinstance(e, dict) and e.get("type") == MEMBER_EVENT
                   and e.get("state_key") == member), len(events))
        if 0 < at <= len(events) and isinstance(events[at - 1].get("origin_server_ts"), int):
            event = dict(event, origin_server_ts=events[at - 1]["origin_server_ts"])
        events.insert(at, event)
    return dump(data)
