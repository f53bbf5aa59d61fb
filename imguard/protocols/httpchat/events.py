"""What the chat-API decoders take and what they return: plain frozen data, no I/O.

In:   HttpRequest (method, host, path, query, headers, body), and for learning a response's status and body.
Out:  ChatMessage, FileUpload, EncryptedContent, MalformedRequest (what a request carries), the facts a
      response teaches (Identity, StoredMedia, UploadSlot), which the carrier keeps in its tables, and what a
      response delivers to the client (DeliveredMessage, SharedMedia: Matrix /sync and /messages, Slack
      conversations.history, Mattermost channel posts, Rocket.Chat history, Discord channel messages).

A `TextPart.locator` says where a text sits in the body, so the carrier can rewrite exactly that text when
policy masks it (bodies.rewrite): ("json", key, index, ...) in a JSON body, ("form", name) in a form body,
("multipart", part index) for a text part and ("multipart", part index, "json", ...) inside a JSON part
(Discord's payload_json).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

# Joins the text parts of one message for policy. A paragraph separator: not in ordinary chat text, and
# when a mask span swallows it the carrier falls back to the whole masked text for every part (never the
# unmasked one).
PART_SEPARATOR = "\n\u2029"


@dataclass(frozen=True)
class HttpRequest:
    method: str
    host: str
    path: str                                       # without the query, percent-encoding kept
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()       # names in lower case
    body: bytes = b""

    @classmethod
    def make(cls, method: str, url: str, headers: dict | list | tuple = (), body: bytes = b"",
             host: str = "") -> "HttpRequest":
        """From a path or URL ("/api/v4/posts?x=1", "https://host/path"); headers as a dict or pairs."""
        parts = urlsplit(url)
        items = headers.items() if isinstance(headers, dict) else headers
        return cls(method.upper(), host or parts.hostname or "", parts.path or "/",
                   tuple(parse_qsl(parts.query, keep_blank_values=True)),
                   tuple((str(k).lower(), str(v)) for k, v in items), body)

    def header(self, name: str, default: str = "") -> str:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)

    def param(self, name: str, default: str = "") -> str:
        return next((v for k, v in self.query if k == name), default)

    @property
    def content_type(self) -> str:
        return self.header("content-type").split(";", 1)[0].strip().lower()


def credential_key(secret: str) -> str:
    """How a bearer token appears in events and tables: a short hash, never the token itself."""
    return "token:" + hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()[:16] if secret else ""


@dataclass(frozen=True)
class TextPart:
    locator: tuple
    text: str
    html: bool = False          # the text is HTML (Matrix formatted_body): policy sees it stripped; a mask
                                # rewrites it as escaped plain text


@dataclass(frozen=True)
class ChatMessage:
    """A message posted to a room, channel or conversation."""
    api: str
    endpoint: str
    sender: str                 # a user id, or credential_key(token) until the carrier knows whose token it is
    room: str
    parts: tuple[TextPart, ...] = ()
    refs: tuple[str, ...] = ()  # media or file references the message shares: mxc://..., slack:F..., ...
    kind: str = ""              # msgtype / subtype, for the record

    @property
    def text(self) -> str:
        return PART_SEPARATOR.join(p.text for p in self.parts)


@dataclass(frozen=True)
class FileUpload:
    """A file's bytes, complete, on their way to the server."""
    api: str
    endpoint: str
    sender: str
    room: str
    name: str
    mime: str
    data: bytes
    ref: str = ""               # the reference it will be shared under when known before the upload (async mxc)


@dataclass(frozen=True)
class EncryptedContent:
    """End-to-end encrypted content the gateway cannot read (Megolm events, EncryptedFile attachments)."""
    api: str
    endpoint: str
    sender: str
    room: str
    scheme: str                 # "m.room.encrypted", "EncryptedFile"
    refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class MalformedRequest:
    """A request the decoder cannot read: answered with `status` (400, 413) and never forwarded."""
    api: str
    endpoint: str
    status: int
    reason: str


# --- what responses deliver to the client behind the gateway ------------------------------------------

@dataclass(frozen=True)
class DeliveredMessage:
    """A message in a response to the client (a Matrix timeline event, a Slack/Mattermost/Rocket.Chat/Discord
    history message), the client's own included: the carrier decides those from someone else. `message.sender`
    is who wrote it; `event_id` names it for the carrier's verdict memory (a repeat is not recorded twice);
    `locator` is where the message object sits in the response JSON (the path from the root; in a WebSocket
    message "ws" then the path in it: ("ws", "d") in a Discord dispatch, ("ws", SockJS frame index, ...) in DDP),
    and the texts' locators are relative to it: the module's rewrite_delivered (rewrite_ws_delivered) replaces it
    there when policy blocks or masks it. `encrypted`: its content is end-to-end encrypted (the EncryptedContent
    scheme, Matrix "m.room.encrypted"): the message has no text, and policy decides on the fact."""
    message: ChatMessage
    event_id: str
    locator: tuple
    encrypted: str = ""


@dataclass(frozen=True)
class SharedMedia:
    """A message in a response shares `ref` (an mxc://, slack:F.., mattermost:.., rocketchat:.., discord:..): who
    sent it, where, under which name. The carrier remembers it to name the sender when the file is downloaded."""
    ref: str
    sender: str
    room: str
    name: str = ""


# --- what responses teach -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """The credential `key` (credential_key) belongs to `user`."""
    key: str
    user: str


@dataclass(frozen=True)
class StoredMedia:
    """An upload the server accepted (after inspection allowed it) is known under `ref`."""
    ref: str


@dataclass(frozen=True)
class UploadSlot:
    """A two-step upload: the bytes for `ref` will come to `url` (any host)."""
    url: str
    ref: str
    name: str = ""
    sender: str = ""
    room: str = ""


@dataclass(frozen=True)
class Endpoint:
    """What classify() found: which endpoint, and what the carrier must do with the request and response."""
    api: str
    name: str                   # "send_message", "media_upload", ...
    kind: str                   # MESSAGE (small body, decoded), UPLOAD (file bytes, size-limited), LEARN (only
                                # the response matters), DOWNLOAD (GET of a reference: refused when blocked, else
                                # the response's bytes held and scanned), DELIVER (a response that carries
                                # messages to the client, Matrix /sync, history calls: held, decoded, decided)
    learn: bool = False         # read the response (login, upload result, upload URL)
    ref: str = ""               # DOWNLOAD: the reference fetched; async upload: the reference written
    filename: str = ""          # DOWNLOAD: the file name the path carries, if any
    derived: bool = False       # DOWNLOAD: a thumbnail or preview the server made from the file, not the file
                                # itself (scanned all the same; its block does not mark the reference blocked)


MESSAGE = "message"
UPLOAD = "upload"
LEARN = "learn"
DOWNLOAD = "download"
DELIVER = "deliver"
