"""What the gateway does when it cannot do its job: fail modes, and the connections it must not touch.

    modes = FailModes.parse(["closed", "xmpp:parse=open", "irc=open"])
    modes.mode("xmpp", OVERLOAD)  -> "closed"       modes.is_open("xmpp", PARSE) -> True

Situations (the second part of a key), each `open` (relay and alert) or `closed` (block and alert):

    overload   the inspection queue is full: a file is not scanned       closed: the file is blocked
    timeout    inspection took longer than --inspect-timeout             closed: the file is blocked
    tls        a client refused the gateway's certificate (pinning,      closed: nothing more (that connection
               CA not installed): the handshake failed                   failed); open: the next connections of
                                                                         that client to that server are relayed
                                                                         untouched for TLS_OPEN_TTL seconds
    parse      the protocol session cannot go on (a decoder error)       closed: the connection is closed;
                                                                         open: the rest is relayed uninspected
    store      the shared expected-transfers table (transfer_store)      closed: the HTTP upload or download is
               cannot be read: is this PUT/GET an announced file?        refused (503 with a notice); open: it
                                                                         is relayed unscanned, with an alert.
                                                                         A chat session that cannot write or
                                                                         read it fails as in `parse`
    downgrade  a client logs in without the STARTTLS its server offers   closed: its credentials are not
               (XMPP `starttls_stripping`)                               forwarded (a SASL failure with a notice);
                                                                         open: forwarded, with the alert

Keys: `MODE` (every protocol, every situation), `PROTO=MODE`, `SITUATION=MODE`, `PROTO:SITUATION=MODE`; the
most specific wins. Protocols are the names the gateway gives connections: xmpp, irc, socks5 (XEP-0065
bytestreams), http (uploads; with parse, a chat API WebSocket message or encoding imguard cannot read: closed
drops it or refuses the socket, open relays it), dcc.

`PassthroughAddon` runs ahead of GatewayAddon: connections to --exclude destinations, and (fail mode tls=open)
those whose client refused interception a moment ago, get mitmproxy's TCPLayer(ignore=True): relayed
byte for byte, no TLS interception, no session, no flow.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from mitmproxy import tls
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy.layers import TCPLayer

from imguard import alerts
from imguard.model import ALERT, BLOCK, ChatContext, Decision

logger = logging.getLogger("imguard.gateway")

OPEN, CLOSED = "open", "closed"
OVERLOAD, TIMEOUT, TLS, PARSE, STORE = "overload", "timeout", "tls", "parse", "store"
DOWNGRADE = "downgrade"
SITUATIONS = (OVERLOAD, TIMEOUT, TLS, PARSE, STORE, DOWNGRADE)
# Defaults for a security product: nothing passes uninspected unless the operator says so (see docs/deploy.md).
DEFAULT_FAIL_MODES = ("closed",)
TLS_OPEN_TTL = 3600.0


class FailModes:
    def __init__(self, table: dict[tuple[str, str], str]):
        self.table = table

    @classmethod
    def parse(cls, entries) -> "FailModes":
        table: dict[tuple[str, str], str] = {("", ""): CLOSED}
        for entry in entries or ():
            for item in str(entry).split(","):
                item = item.strip().lower()
                if not item:
                    continue
                key, sep, mode = item.rpartition("=")
                if not sep:
                    key, mode = "", item
                if mode not in (OPEN, CLOSED):
                    raise ValueError(f"fail mode {item!r}: the mode must be 'open' or 'closed'")
                proto, colon, situation = key.partition(":")
                if not colon and proto in SITUATIONS:
                    proto, situation = "", proto
                if situation and situation not in SITUATIONS:
                    raise ValueError(f"fail mode {item!r}: unknown situation {situation!r} "
                                     f"(one of {', '.join(SITUATIONS)})")
                table[(proto, situation)] = mode
        return cls(table)

    def mode(self, protocol: str, situation: str) -> str:
        protocol = (protocol or "").lower()
        for key in ((protocol, situation), (protocol, ""), ("", situation), ("", "")):
            if key in self.table:
                return self.table[key]
        return CLOSED

    def is_open(self, protocol: str, situation: str) -> bool:
        return self.mode(protocol, situation) == OPEN

    def describe(self) -> str:
        return ", ".join(f"{p or '*'}:{s or '*'}={m}" for (p, s), m in sorted(self.table.items()))


def apply_to_decision(modes: FailModes | None, situation: str, ctx: ChatContext,
                      decision: Decision) -> tuple[Decision, str]:
    """The decision on a file that could not be inspected (overload, timeout), after the fail mode:
    closed -> at least BLOCK; open -> relayed, recorded as an alert. Returns (decision, mode)."""
    mode = modes.mode(ctx.protocol, situation) if modes is not None else CLOSED
    if mode == CLOSED and not decision.blocked:
        notice = decision.notice or (f"Your file was blocked: the gateway could not inspect it in time ({situation}).")
        decision = Decision(action=BLOCK, matches=decision.matches, shadow=decision.shadow, notice=notice,
                            policy_version=decision.policy_version)
    elif mode == OPEN and decision.blocked:
        decision = Decision(action=ALERT, matches=decision.matches, shadow=decision.shadow,
                            policy_version=decision.policy_version)
    return decision, mode


def _parse_targets(entries) -> tuple[list, set[str]]:
    networks, names = [], set()
    for entry in entries or ():
        for item in str(entry).split(","):
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                names.add(item.lower().rstrip("."))
    return networks, names


class PassthroughAddon:
    """Ahead of GatewayAddon: relays untouched what must not be intercepted."""

    def __init__(self, exclude=(), fail_modes: FailModes | None = None, ttl: float = TLS_OPEN_TTL):
        self.networks, self.names = _parse_targets(exclude)
        self.fail_modes = fail_modes or FailModes.parse(())
        self.ttl = ttl
        self.pinned: dict[tuple[str, str], float] = {}    # (client ip, server host:port) -> until (monotonic)
        self.stats = {"excluded": 0, "tls_passthrough": 0, "tls_failed": 0}
        self.port_map: dict[int, tuple[str, bool]] = {}     # set by the Gateway: port -> (protocol, tls)
        self.recorder: Any = None                           # set by the Gateway: Pipeline.record

    def excluded(self, host: str) -> bool:
        host = str(host).strip("[]").lower().rstrip(".")
        if host in self.names or any(host.endswith("." + n) for n in self.names):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in self.networks)

    @staticmethod
    def _key(context) -> tuple[str, str] | None:
        if not context.client.peername or not context.server.address:
            return None
        host, port = context.server.address[0], context.server.address[1]
        return str(context.client.peername[0]), f"{host}:{port}"

    def next_layer(self, nextlayer: mlayer.NextLayer) -> None:
        context = nextlayer.context
        if nextlayer.layer is not None or context.client.transport_protocol != "tcp" or not context.layers:
            return
        # Decided once, where the destination is first known and before any TLS is terminated: at the top of a
        # transparent, reverse or SOCKS5 connection, or inside an HTTP proxy's CONNECT tunnel.
        if context.server.address is None or context.client.tls:
            return
        host = str(context.server.address[0])
        if (self.networks or self.names) and self.excluded(host):
            self.stats["excluded"] += 1
            logger.info("%s -> %s:%s: excluded from interception, relayed untouched",
                        context.client.peername[0], host, context.server.address[1])
            nextlayer.layer = TCPLayer(context, ignore=True)
            return
        key = self._key(context)
        if key is not None and key in self.pinned:
            if self.pinned[key] > time.monotonic():
                self.stats["tls_passthrough"] += 1
                logger.info("%s -> %s: relayed untouched (its client refused interception; fail mode tls=open)", *key)
                nextlayer.layer = TCPLayer(context, ignore=True)
            else:
                del self.pinned[key]

    def tls_failed_client(self, data: tls.TlsData) -> None:
        """A client refused the gateway's certificate: an alert, and with tls=open, passthrough next time."""
        context = data.context
        protocol = ""
        for layer in context.layers:
            chat = getattr(layer, "chat", None)
            if isinstance(chat, ChatContext) and chat.protocol:
                protocol = chat.protocol
        if not protocol and context.server.address:
            protocol = self.port_map.get(int(context.server.address[1]), ("tls", False))[0]
        key = self._key(context)
        mode = self.fail_modes.mode(protocol, TLS)
        self.stats["tls_failed"] += 1
        ctx = ChatContext(protocol=protocol, client_address=f"{key[0]}" if key else "",
                          server_address=key[1] if key else "", connection_id=context.client.id)
        detail = str(data.conn.error or "client TLS handshake failed")
        action = "its next connections to this server are relayed untouched" if mode == OPEN else \
            "the connection is closed; the client cannot use this server through the gateway"
        self._record(alerts.tls_failure_event(ctx, detail, side="client", fail_mode=mode, consequence=action,
                                              sni=str(data.conn.sni or "")))
        if mode == OPEN and key is not None:
            self.pinned[key] = time.monotonic() + self.ttl
            if len(self.pinned) > 10000:        # bounded: the oldest entries go first
                for k in sorted(self.pinned, key=self.pinned.get)[:1000]:
                    del self.pinned[k]

    def _record(self, event: dict) -> None:
        if self.recorder is not None:
            try:
                self.recorder(event)
            except Exception:
                logger.exception("could not record a TLS failure")
