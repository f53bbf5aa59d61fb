"""What every chat-API decoder shares: decode limits, credentials, JSON error bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass

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
