"""What every chat-API decoder shares: decode limits, credentials, JSON error bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass

from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.events import HttpRequest, MalformedRequest, credential_key


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
