"""Which workspace, instance or tenant a chat API call goes to: the fact policy's `tenant` condition tests
(ChatContext.tenant), as the inline CASBs tell a company's Slack or Teams from a personal one.

Pure: a request's host, path and credential, and what a response taught. Per API:
- Slack: the team id (`T0123ABC`) its token belongs to, learned from Slack's own answer to `auth.test` /
  `rtm.connect` (`team_id`, `team.id`; slack_sdk's apps and Slack's clients make one of them first), else the
  workspace host a web client calls (`acme.slack.com`), else unknown. Never a `team_id` argument: the client
  writes that, and Slack ignores it for a token of a single workspace.
- Teams (Microsoft Graph): the Entra ID tenant (`tid`) of the bearer token, read from the JWT's claims (not
  verified: Graph itself refuses a token whose signature does not hold, so a forged claim gets no chat through).
- Discord: the guild (server) id when the path names one (`/guilds/{id}/...`); channel calls do not, so they are
  unknown (a rule that lets only the company's tenants through refuses them).
- Matrix: the homeserver the client talks to (the request's host); Mattermost, Rocket.Chat, RVP: the instance's
  host. Lower case, without the port.
"""

from __future__ import annotations

import base64
import json
import re

from imguard.protocols.httpchat.common import learned_object, text_of
from imguard.protocols.httpchat.events import HttpRequest

SLACK_SERVICE_HOSTS = frozenset({"slack.com", "api.slack.com", "files.slack.com", "edgeapi.slack.com",
                                 "app.slack.com", "wss-primary.slack.com", "wss-backup.slack.com"})
SLACK_TEAM_METHODS = ("auth.test", "rtm.connect", "rtm.start")
_GUILD = re.compile(r"/guilds/(\d{1,24})(?:/|$)")
_TEAM_ID = re.compile(r"^[TE][A-Z0-9]{2,30}$")


def host_of(req: HttpRequest) -> str:
    host = req.host.strip().lower().rstrip(".")
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def token_claims(req: HttpRequest) -> dict:
    """The claims of a bearer JWT (header.payload.signature), unverified; {} when it is not one."""
    scheme, _, token = req.header("authorization").strip().partition(" ")
    parts = token.strip().split(".") if scheme.lower() == "bearer" else []
    if len(parts) != 3 or len(parts[1]) > 16384:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def of_request(api: str, req: HttpRequest) -> str:
    """The tenant the request names by itself; "" when it does not."""
    if api == "slack":
        host = host_of(req)
        if host.endswith(".slack.com") and host not in SLACK_SERVICE_HOSTS:
            return host
        return ""
    if api == "teams":
        return text_of(token_claims(req).get("tid")).lower()
    if api == "discord":
        m = _GUILD.search(req.path)
        return m.group(1) if m else ""
    return host_of(req)


def learned(api: str, endpoint: str, status: int, body: bytes) -> str:
    """The tenant a response says its request's credential belongs to (Slack's team id), or ""."""
    if api != "slack" or endpoint not in SLACK_TEAM_METHODS:
        return ""
    data = learned_object(status, body)
    if data is None or not data.get("ok"):
        return ""
    team = data.get("team")
    team_id = text_of(data.get("team_id")) or (text_of(team.get("id")) if isinstance(team, dict) else "")
    return team_id if _TEAM_ID.match(team_id) else ""
