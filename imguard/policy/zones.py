"""Who is inside the company: zones, groups, identity patterns, and the direction of a conversation.

Internal zone = domains (an identity whose domain is one of them, or a subdomain) plus networks
(CIDR; matched against an identity whose host is an IP address, the client address, and the server
address). Everything else is external. Both come from the `zones:` section of rules/groups.yaml.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from imguard.model import FROM_CLIENT, FROM_SERVER, INBOUND, INTERNAL, OUTBOUND, UNKNOWN, ChatContext

ZONE_INTERNAL = "internal"
ZONE_EXTERNAL = "external"
ZONES = (ZONE_INTERNAL, ZONE_EXTERNAL)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Identity:
    """An identity taken apart: `bare` without an XMPP resource, `domain` (or IRC host), lower case."""
    full: str
    bare: str
    domain: str


def parse_identity(identity: str) -> Identity:
    """'Alice@Example.com/phone' -> bare 'alice@example.com', domain 'example.com';
    'nick!user@host.example.net' -> domain 'host.example.net'; 'example.com' -> domain 'example.com';
    'alice' or '#room' -> no domain."""
    full = str(identity).strip().lower()
    bare = full
    at = bare.rfind("@")
    slash = bare.find("/", at + 1 if at >= 0 else 0)
    if slash >= 0:
        bare = bare[:slash]
    if at >= 0:
        domain = bare[at + 1:]
    elif "." in bare and not bare.startswith(("#", "&", "!", "+")) and " " not in bare:
        domain = bare
    else:
        domain = ""
    return Identity(full, bare, domain.strip("[]"))


def domain_in(domain: str, domains: Iterable[str]) -> bool:
    """True if `domain` is one of `domains` or a subdomain of one."""
    return any(domain == d or domain.endswith("." + d) for d in domains)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from 'ip', 'ip:port', '[v6]:port' or 'v6'; None when it is not one."""
    text = str(text).strip()
    if not text:
        return None
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(eq=False)
class Zones:
    """The internal zone; anything not in it is external."""
    domains: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    def ip_internal(self, address: str) -> bool | None:
        """True/False for an address inside/outside the internal networks; None if not an address."""
        ip = parse_ip(address)
        if ip is None:
            return None
        return any(ip.version == net.version and ip in net for net in self.networks)

    def __post_init__(self) -> None:
        self._zone_cache: dict[str, str] = {}

    def party_zone(self, identity: str) -> str:
        """'internal', 'external', or '' when the identity carries no domain or host to judge by."""
        zone = self._zone_cache.get(identity)
        if zone is None:
            if len(self._zone_cache) >= 10_000:     # bounded: identities come from the wire
                self._zone_cache.clear()
            zone = self._zone_cache[identity] = self._party_zone(identity)
        return zone

    def _party_zone(self, identity: str) -> str:
        ident = parse_identity(identity)
        if not ident.domain:
            return ""
        by_ip = self.ip_internal(ident.domain)
        if by_ip is not None:
            return ZONE_INTERNAL if by_ip else ZONE_EXTERNAL
        return ZONE_INTERNAL if domain_in(ident.domain, self.domains) else ZONE_EXTERNAL

    def address_zone(self, address: str) -> str:
        inside = self.ip_internal(address)
        if inside is None:
            return ""
        return ZONE_INTERNAL if inside else ZONE_EXTERNAL

    def sender_zone(self, ctx: ChatContext) -> str:
        """The sender's zone; a sender with no domain (a bare IRC nick) is the local user of a client
        in an internal network, so it takes the client address's zone when that is internal."""
        zone = self.party_zone(ctx.sender)
        if zone:
            return zone
        return ZONE_INTERNAL if self.address_zone(ctx.client_address) == ZONE_INTERNAL else ""

    def recipient_zone(self, ctx: ChatContext, recipient: str) -> str:
        """A recipient's zone; one with no domain (an IRC channel) lives on the server: the server
        address's zone."""
        return self.party_zone(recipient) or self.address_zone(ctx.server_address)


def classify_direction(ctx: ChatContext, zones: Zones | None = None) -> str:
    """The direction of a message or file: from the topology, refined by the zones.

    Returns ctx.direction when it is already set. When the session knows which side of the intercepted
    connection the content came from (ctx.origin), the party on the client side is inside, and the other
    party is outside unless the zones say it is internal:
      from the client: every recipient internal by the zones (a room or channel: its server's address; no
      recipient: the server's address) -> internal, else -> outbound;
      from the server: a sender internal by the zones -> internal, else -> inbound.
    So a fresh deployment decides sensibly without editing the zones; the zones only name who else is inside.

    Without an origin (`imguard scan`), from the zones alone: an external sender -> inbound; an internal sender
    with any external recipient -> outbound; an internal sender with only internal recipients -> internal;
    anything else (unknown sender, no recipients and no server) -> "" (unknown). Recipients without a domain
    take the zone of the server address; with no recipients at all the server address stands for the recipient.
    """
    if ctx.direction:
        return ctx.direction
    zones = zones or Zones()
    if ctx.origin == FROM_SERVER:
        return INTERNAL if zones.party_zone(ctx.sender) == ZONE_INTERNAL else INBOUND
    if ctx.origin == FROM_CLIENT:
        rzones = [zones.recipient_zone(ctx, r) for r in ctx.recipients] or [zones.address_zone(ctx.server_address)]
        return INTERNAL if all(z == ZONE_INTERNAL for z in rzones) else OUTBOUND
    sender = zones.sender_zone(ctx)
    if sender == ZONE_EXTERNAL:
        return INBOUND
    if sender != ZONE_INTERNAL:
        return UNKNOWN
    if ctx.recipients:
        rzones = [zones.recipient_zone(ctx, r) for r in ctx.recipients]
    else:
        rzones = [zones.address_zone(ctx.server_address)] if ctx.server_address else []
    if ZONE_EXTERNAL in rzones:
        return OUTBOUND
    if rzones and all(z == ZONE_INTERNAL for z in rzones):
        return INTERNAL
    return UNKNOWN


# --- identity patterns ------------------------------------------------------------------------------

@dataclass
class PartyPattern:
    """One value of a sender/recipient condition or of a group: an exact identity, a glob
    (`*@example.com`), `domain:example.com`, `group:finance` or `zone:internal`/`zone:external`."""
    text: str
    kind: str = "exact"          # exact, glob, domain, group, zone
    value: str = ""
    members: list["PartyPattern"] = field(default_factory=list)   # for a group, filled in by the loader

    @classmethod
    def parse(cls, text: str) -> "PartyPattern":
        t = text.strip()
        low = t.lower()
        for prefix in ("domain:", "group:", "zone:"):
            if low.startswith(prefix):
                value = t[len(prefix):].strip()
                return cls(t, prefix[:-1], value if prefix == "group:" else value.lower())
        if any(c in t for c in "*?["):
            return cls(t, "glob", low)
        return cls(t, "exact", low)

    def matches(self, identity: str, zones: Zones, zone: str | None = None) -> bool:
        """Does `identity` fit? `zone` is the party's zone when the caller already knows it."""
        if self.kind == "zone":
            return (zone if zone is not None else zones.party_zone(identity)) == self.value
        ident = parse_identity(identity)
        if self.kind == "exact":
            return self.value in (ident.bare, ident.full)
        if self.kind == "glob":
            return fnmatch.fnmatchcase(ident.bare, self.value) or fnmatch.fnmatchcase(ident.full, self.value)
        if self.kind == "domain":
            return bool(ident.domain) and domain_in(ident.domain, (self.value,))
        if self.kind == "group":
            return any(m.matches(identity, zones) for m in self.members)
        return False
