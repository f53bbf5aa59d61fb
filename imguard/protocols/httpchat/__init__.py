"""Chat over HTTP(S): pure decoders for the client APIs of Matrix, Slack, Mattermost, Rocket.Chat, Discord and
Microsoft Teams (Microsoft Graph, teams.py), and Exchange 2000 Instant Messaging's RVP (rvp.py).

No mitmproxy, no I/O: the gateway's ChatApis addon (imguard/gateway/chat_apis.py) hands a request over as an
HttpRequest and acts on what comes back; tests and the offline replay can do the same.

    routes = Routes.parse(["matrix=/_matrix/", "mattermost=chat.example.com/api/v4/"])
    apis = routes.match(host, path)                    # the API modules whose prefix matches, best first
    ep = api.classify(method, path)                    # Endpoint, or None: not a chat call, relay it untouched
    events = api.decode(ep, request, limits)           # ChatMessage, FileUpload, EncryptedContent, MalformedRequest
    learned = api.learn(ep, request, status, body)     # Identity, StoredMedia, UploadSlot (from the response)
    who = api.requester(request)                       # whose credential asks (the receiver of a response)
    found = api.deliver(ep, request, status, body)     # DELIVER (Matrix /sync, /messages, history calls):
                                                       # DeliveredMessage, SharedMedia
    api.rewrite_delivered(body, [(locator, notice)], [(locator, masked parts)])   # block: the notice; mask
    # WebSockets (Slack RTM / Socket Mode, Mattermost, Rocket.Chat DDP, Discord's gateway), what the server pushes:
    api.is_websocket(path); codec = api.ws_codec(request, max_size)   # plain JSON, or Discord's zlib(-stream)
                                                       # and ETF (etf.py), handed on as JSON
    payload = codec.receive(message)                   # None while a compressed payload is incomplete
    api.ws_requester(request), api.ws_credential(client message)      # whose socket (credential key or user id)
    found = api.deliver_ws(payload, limits)            # DeliveredMessage, SharedMedia, Identity("", socket's user)
    codec.send(api.rewrite_ws_delivered(payload, blocked, masked))
    api.error_body(status, reason)                     # the API's own error JSON
    bodies.rewrite(body, content_type, bodies.masked_replacements(message.parts, masked_text))

Each module's docstring lists its endpoints and the shapes read.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from imguard.protocols.httpchat import discord, mattermost, matrix, rocketchat, rvp, slack, teams
from imguard.protocols.httpchat.common import DecodeLimits, FrameTooLarge, UnreadableSocket
from imguard.protocols.httpchat.events import (DELIVER, DOWNLOAD, LEARN, MESSAGE, PART_SEPARATOR, UPLOAD,
                                               ChatMessage, DeliveredMessage, EncryptedContent, Endpoint, FileUpload,
                                               HttpRequest, Identity, MalformedRequest, SharedMedia, StoredMedia,
                                               TextPart, UploadSlot, credential_key)

APIS: dict[str, ModuleType] = {m.API: m for m in (matrix, slack, mattermost, rocketchat, discord, rvp, teams)}

# Matched by path prefix on any host, longest prefix first, so a self-hosted server on any name is covered.
# The file downloads: Slack's files.slack.com serves /files-pri/ and /files-tmb/, Mattermost its public links under
# /files/, Rocket.Chat /file-upload/ (any host: within them only the APIs' exact download paths are held);
# Discord's CDN only on its two hosts (/attachments/ is too common a path). The WebSockets of Discord's gateway
# (gateway.discord.gg/?v=10) and Slack (wss-primary.slack.com/websocket/.., /link/..) are on their vendors' hosts;
# Mattermost's (/api/v4/websocket) and Rocket.Chat's (/websocket) on any host. RVP's node URLs (/instmsg/, where
# clients and federating servers send); a server's deliveries to a client's Call-Back listener go to whatever path
# the client chose: a site that wants them decided adds a route for it ("rvp=/" takes every NOTIFY). Microsoft
# Graph (Teams) under /v1.0/ and /beta/ on any host; its upload sessions' URLs are learned.
DEFAULT_ROUTES = ("matrix=/_matrix/", "mattermost=/api/v4/", "rocketchat=/api/v1/", "rocketchat=/websocket",
                  "rocketchat=/sockjs/", "discord=/api/v10/", "discord=/api/v9/", "slack=/api/", "discord=/api/",
                  "slack=/files-pri/", "slack=/files-tmb/", "mattermost=/files/", "rocketchat=/file-upload/",
                  "discord=cdn.discordapp.com/attachments/",
                  "discord=media.discordapp.net/attachments/",
                  "discord=*.discord.gg/", "slack=*.slack.com/", "rvp=/instmsg/",
                  "teams=/v1.0/", "teams=/beta/")

__all__ = ["APIS", "DEFAULT_ROUTES", "Routes", "Route", "DecodeLimits", "HttpRequest", "Endpoint", "TextPart",
           "ChatMessage", "FileUpload", "EncryptedContent", "MalformedRequest", "Identity", "StoredMedia",
           "UploadSlot", "DeliveredMessage", "SharedMedia", "credential_key", "PART_SEPARATOR", "MESSAGE",
           "UPLOAD", "LEARN", "DOWNLOAD", "DELIVER", "error_body", "FrameTooLarge", "UnreadableSocket"]


@dataclass(frozen=True)
class Route:
    api: str
    host: str           # "" = any host; "example.com" = that host; "*.example.com" = its subdomains
    prefix: str

    def matches(self, host: str, path: str) -> bool:
        if not path.startswith(self.prefix):
            return False
        if not self.host:
            return True
        host = host.lower().rstrip(".")
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


class Routes:
    def __init__(self, routes: list[Route]):
        # Longest prefix first (then host-specific before any-host): /api/v4/ wins over Slack's /api/.
        self.routes = sorted(routes, key=lambda r: (-len(r.prefix), not r.host))

    @classmethod
    def parse(cls, entries) -> "Routes":
        """Entries "API=[HOST]/PREFIX" (e.g. "matrix=/_matrix/", "mattermost=chat.corp.example/api/v4/",
        "slack=*.slack.com/api/"). Raises ValueError naming the bad entry."""
        routes = []
        for entry in entries:
            for item in str(entry).split(","):
                item = item.strip()
                if not item:
                    continue
                api, sep, target = item.partition("=")
                api = api.strip().lower()
                if not sep or api not in APIS:
                    raise ValueError(f"chat API route {item!r}: expected API=[HOST]/PREFIX with API one of "
                                     f"{', '.join(APIS)}")
                slash = target.find("/")
                if slash < 0:
                    raise ValueError(f"chat API route {item!r}: the path prefix must start with /")
                routes.append(Route(api, target[:slash].lower().rstrip("."), target[slash:]))
        return cls(routes)

    def match(self, host: str, path: str) -> list[ModuleType]:
        """The API modules whose routes match, best first (the caller asks each to classify the call: an
        unversioned Discord /api/channels/... path also matches Slack's /api/)."""
        found = []
        for route in self.routes:
            if route.matches(host, path) and APIS[route.api] not in found:
                found.append(APIS[route.api])
        return found

    def __iter__(self):
        return iter(self.routes)


def error_body(api: str, status: int, reason: str) -> bytes:
    return APIS[api].error_body(status, reason)
