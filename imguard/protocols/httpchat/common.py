"""What every chat-API decoder shares: decode limits, credentials, JSON error bodies, the WebSocket codec shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.events import HttpRequest, MalformedRequest, TextPart, credential_key


@dataclass(frozen=True)
class DecodeLimits:
    max_json_depth: int = 64
    max_parts: int = 100


def bearer(req: HttpRequest) -> str:
    """The credential key of the request's token: Authorization (Bearer, Bot, or bare), or access_token/token
    query parameters (Matrix's legacy form, Slack's)."""
    auth = req.header("authorization").strip()
    scheme, _, token = auth.partition(" ")
    if token and scheme.lower() in ("bearer", "bot", "token"):
        return credential_key(token.strip())
    if auth:
        return credential_key(auth)
    return credential_key(req.param("access_token") or req.param("token"))


def json_body(req: HttpRequest, limits: DecodeLimits) -> object:
    if not req.body.strip():
        raise bodies.BodyError("empty body where JSON was expected")
    return bodies.parse_json(req.body, limits.max_json_depth)


def learned_object(status: int, body: bytes) -> dict | None:
    """The JSON object a successful response carries (a login, a whoami, an upload URL), else None: a failed call
    or a body that is not a JSON object teaches nothing. Such responses are small: read only 16 levels deep."""
    if not 200 <= status < 300:
        return None
    try:
        data = bodies.parse_json(body, 16)
    except bodies.BodyError:
        return None
    return data if isinstance(data, dict) else None


def malformed(api: str, endpoint: str, error: Exception | str, status: int = 400) -> MalformedRequest:
    return MalformedRequest(api, endpoint, status, str(error))


def dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def text_of(value: object) -> str:
    return value if isinstance(value, str) else ""


# --- what responses deliver ---------------------------------------------------------------------------

DELIVER_MAX_DEPTH = 256     # others' messages carry any JSON they like; json.loads copes with this depth


def node_at(data: object, locator: tuple) -> dict:
    """The JSON object at `locator` (a path of keys and indexes from the root). Raises BodyError when there is
    none."""
    node = data
    try:
        for key in locator:
            node = node[key]            # type: ignore[index]
    except (KeyError, IndexError, TypeError) as e:
        raise bodies.BodyError(f"no message at {locator!r}") from e
    if not isinstance(node, dict):
        raise bodies.BodyError(f"no message at {locator!r}")
    return node


def rewrite_delivered(data: object, blocked, masked, blank, within=None, after_mask=None) -> object:
    """The parsed response `data` changed in place: for each (message locator, notice) in `blocked`,
    blank(message, notice) (the API's way of saying "this message was blocked": nothing of the original left);
    for each (message locator, [(part locator, text)]) in `masked` (bodies.masked_replacements) those texts set,
    the part locators ("json", key, ...) read from within(message) (default the message itself), then
    after_mask(message) (drop a pre-rendered copy of the text). Raises BodyError when a locator does not fit."""
    for locator, notice in blocked:
        blank(node_at(data, locator), notice)
    for locator, parts in masked:
        message = node_at(data, locator)
        base = within(message) if within else message
        for part, text in parts:
            node = base
            try:
                for key in part[1:-1]:
                    node = node[key]
                node[part[-1]] = text
            except (KeyError, IndexError, TypeError) as e:
                raise bodies.BodyError(f"no text at {part!r} in the message at {locator!r}") from e
        if after_mask:
            after_mask(message)
    return data


def rewrite_json(body: bytes, blocked, masked, blank, within=None, after_mask=None) -> bytes:
    """rewrite_delivered over a JSON response body, re-serialised."""
    data = bodies.parse_json(body, DELIVER_MAX_DEPTH)
    return dump(rewrite_delivered(data, blocked, masked, blank, within, after_mask))


def parse_delivered(body: bytes, limits: DecodeLimits) -> object:
    """A response body that delivers messages, parsed (depth bounded by DELIVER_MAX_DEPTH at least: the request
    limit does not apply to what others wrote). Raises BodyError."""
    return bodies.parse_json(body, max(limits.max_json_depth, DELIVER_MAX_DEPTH))


def message_parts(obj: dict, first: str, under: tuple = (), keys: frozenset = frozenset()) -> tuple:
    """TextParts of a delivered message object: its main text (key `first`), then every string keyed by one of
    `keys` below each key of `under` (attachments, blocks, embeds), locators relative to the object."""
    parts = []
    if isinstance(obj.get(first), str) and obj[first]:
        parts.append(TextPart(("json", first), obj[first]))
    for key in under:
        parts += [TextPart(("json",) + path, s) for path, s in bodies.strings_under(obj.get(key), keys, (key,))]
    return tuple(parts)


# --- WebSockets: what a server pushes to the client ------------------------------------------------------

class FrameTooLarge(bodies.BodyError):
    """A server WebSocket message larger (decompressed) than the carrier's limit: never passed undecided."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"a WebSocket message of {size} bytes or more (the limit is {limit})")
        self.size = size


class UnreadableSocket(Exception):
    """The client asked the server for an encoding imguard cannot read (Discord compress=zstd-stream):
    decided at the handshake."""


class WsCodec(Protocol):
    """How a socket's server messages become payloads and payloads messages again (PlainFrames; Discord's
    ZlibStream, MessageFrames, EtfPayloads). `stream`: every payload must go through send() (a compressed stream
    whose state the client follows), not only the changed ones."""
    stream: bool

    def receive(self, data: bytes) -> bytes | None: ...

    def send(self, payload: bytes) -> bytes: ...


class PlainFrames:
    """A socket whose server messages are JSON text as they come: receive() gives the payload, send() the frame."""

    stream = False

    def __init__(self, max_size: int):
        self.max_size = max_size

    def receive(self, data: bytes) -> bytes | None:
        """The complete payload the message carries, None while more messages are needed (a compressed stream).
        Raises FrameTooLarge, or BodyError when the bytes cannot be read."""
        if len(data) > self.max_size:
            raise FrameTooLarge(len(data), self.max_size)
        return data

    def send(self, payload: bytes) -> bytes:
        return payload


def plain_codec(req: HttpRequest, max_size: int) -> PlainFrames:
    return PlainFrames(max_size)


def ws_json(data: bytes, limits: DecodeLimits) -> object:
    """A server WebSocket message's JSON. Raises BodyError: on the APIs whose sockets speak only JSON a message
    that is not is the server's fault (an anomaly, and the fail mode decides)."""
    return bodies.parse_json(data, max(limits.max_json_depth, DELIVER_MAX_DEPTH))


def rewrite_ws_json(data: bytes, blocked, masked, blank, within=None, after_mask=None) -> bytes:
    """rewrite_delivered over a server WebSocket message whose locators are ("ws", path in the frame...)."""
    frame = bodies.parse_json(data, DELIVER_MAX_DEPTH)
    out = rewrite_delivered(frame, [(loc[1:], n) for loc, n in blocked], [(loc[1:], p) for loc, p in masked], blank,
                            within, after_mask)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()
