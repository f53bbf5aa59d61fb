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

A host is only as good as what vouches for it. The Host header is the client's to write: a client that reaches a
personal instance (its TLS SNI, the certificate that instance presents) while its Host names the company's would
otherwise be let through. So a host-based tenant (Matrix, Mattermost, Rocket.Chat, RVP, a Slack workspace host) is
checked against the connection's `Upstream`, which the adapter reads from the transport (mitmproxy's
client_conn.sni, server_conn.certificate_list): the Host must be the SNI the client sent or a name of the upstream
server's certificate (which the gateway verified; an HTTP/2 client may reuse one connection for every name that
certificate carries). Otherwise `resolve` reports the mismatch (the carrier records a `tenant_mismatch` anomaly)
and the tenant is unknown: a rule that lets only the company's tenants through refuses the call (fail closed). A
connection without TLS carries no name but the Host, which is taken as it stands.

A Slack team is only as good as the server that named it: any host answering `auth.test` could claim the company's
team id. So a team is learned only from an answer of a host the carrier trusts (`team_source`: one of the
`slack_hosts` setting's names, vouched for by the connection as above; over plain HTTP only when the
`slack_plain_http` setting allows it), and a team learned for a token names the tenant only of calls to such a host:
elsewhere the tenant is unknown and the carrier records a `tenant_untrusted_host` anomaly.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

from imguard.protocols.httpchat.common import learned_object, text_of
from imguard.protocols.httpchat.events import HttpRequest

SLACK_SERVICE_HOSTS = frozenset({"slack.com", "api.slack.com", "files.slack.com", "edgeapi.slack.com",
                                 "app.slack.com", "wss-primary.slack.com", "wss-backup.slack.com"})
SLACK_TEAM_METHODS = ("auth.test", "rtm.connect", "rtm.start")
_GUILD = re.compile(r"/guilds/(\d{1,24})(?:/|$)")
_TEAM_ID = re.compile(r"^[TE][A-Z0-9]{2,30}$")


@dataclass(frozen=True)
class Upstream:
    """What the connection, not the request, says about the server a call reaches (read by the adapter from the
    transport; empty in the offline replay and on plain HTTP)."""
    sni: str = ""                       # the server name the client sent in its TLS ClientHello
    cert_names: tuple[str, ...] = ()    # the DNS names and addresses (subject CN, subjectAltName) of the certificate
                                        # the upstream server presented, verified by the gateway


NO_UPSTREAM = Upstream()


@dataclass(frozen=True)
class Tenant:
    """The tenant a call goes to ("" unknown) and, when the request's host is not the connection's, why."""
    name: str
    mismatch: str = ""          # a sentence for the tenant_mismatch anomaly; "" when nothing disagrees
    host: str = ""              # the host the request names (Host, :authority), for the anomaly


def _name(value: str) -> str:
    return value.strip().lower().rstrip(".")


def host_of(req: HttpRequest) -> str:
    host = _name(req.host)
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def certificate_covers(pattern: str, host: str) -> bool:
    """Whether a certificate name covers `host` (RFC 6125: a wildcard stands for exactly one leftmost label)."""
    pattern = _name(pattern)
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:] and "." in rest
    return pattern == host


def vouched(host: str, upstream: Upstream) -> str:
    """"" when the connection vouches for `host` (the SNI names it, or the upstream certificate does) or names
    nothing (no TLS); else the sentence saying what it names instead."""
    sni = _name(upstream.sni)
    if not sni and not upstream.cert_names:
        return ""
    if host and (host == sni or any(certificate_covers(n, host) for n in upstream.cert_names)):
        return ""
    names = ", ".join(upstream.cert_names[:5]) + (", ..." if len(upstream.cert_names) > 5 else "")
    said = [f"the TLS SNI names {sni!r}"] if sni else []
    said += [f"the server's certificate names {names}"] if upstream.cert_names else []
    return (f"the request's Host names {host or 'nothing'!r} but " + " and ".join(said) +
            ": the tenant is unknown")


def _host_tenant(host: str, upstream: Upstream) -> Tenant:
    problem = vouched(host, upstream)
    return Tenant("", problem, host) if problem else Tenant(host, "", host)


def host_listed(host: str, patterns) -> bool:
    """Whether `host` is one of `patterns`: a name, or `*.domain` for any name under domain (not domain itself)."""
    host = _name(host)
    for pattern in patterns:
        pattern = _name(pattern)
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
        if host and pattern == host:
            return True
    return False


def team_source(host: str, upstream: Upstream, trusted, plain_http: bool = False) -> str:
    """"" when an answer from `host` may name a Slack team (and a learned team may name the tenant of a call to
    it): the host is one of `trusted` (host_listed) and the connection vouches for it (the SNI or a name of the
    upstream certificate); without TLS only when `plain_http` allows it. Else the sentence saying why not."""
    if not host_listed(host, trusted):
        return f"the host {host or 'nothing'!r} is not one of slack_hosts ({', '.join(trusted) or 'none'})"
    if upstream == NO_UPSTREAM:
        return "" if plain_http else (f"the host {host!r} was reached without TLS (no SNI, no certificate vouches "
                                      "for it) and slack_plain_http is off")
    return vouched(host, upstream)


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


def resolve(api: str, req: HttpRequest, upstream: Upstream = NO_UPSTREAM) -> Tenant:
    """The tenant the request names by itself ("" when it does not), a host checked against `upstream`."""
    if api == "slack":
        host = host_of(req)
        if host.endswith(".slack.com") and host not in SLACK_SERVICE_HOSTS:
            return _host_tenant(host, upstream)
        return Tenant("")
    if api == "teams":
        return Tenant(text_of(token_claims(req).get("tid")).lower())
    if api == "discord":
        m = _GUILD.search(req.path)
        return Tenant(m.group(1) if m else "")
    return _host_tenant(host_of(req), upstream)


def of_request(api: str, req: HttpRequest, upstream: Upstream = NO_UPSTREAM) -> str:
    """The tenant's name (resolve): "" when the request names none or the connection does not vouch for it."""
    return resolve(api, req, upstream).name


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
