"""Which protocol a new connection speaks: by its destination port and by its first bytes. Pure.

    detect(port, client_bytes, server_bytes, port_map)  ->  Detection | NEED_MORE

The gateway calls this each time bytes arrive before a layer is chosen. A port in the map decides
the protocol; the first bytes confirm it and say whether TLS starts at once. A port not in the map
is recognised by its first bytes alone (the client's, or the server's for a protocol whose server speaks
first); the signatures are the protocol registry's (imguard.protocols.registry). What is neither known nor
recognised is UNKNOWN: relayed untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imguard.protocols import registry
from imguard.protocols.framing import is_number

# Protocol names the detector returns.
XMPP = "xmpp"
IRC = "irc"
MSNP = "msnp"
OSCAR = "oscar"
YMSG = "ymsg"
SIP = "sip"
MSRP = "msrp"
HTTP = "http"
SOCKS5 = "socks5"
TLS = "tls"             # a TLS ClientHello on a port that is not a chat port: decided by the caller
UNKNOWN = ""

MAX_SNIFF = 4096        # bytes looked at before giving up and calling the connection UNKNOWN


@dataclass(frozen=True)
class Detection:
    protocol: str               # a chat protocol of the registry (XMPP, IRC, MSNP, ...), HTTP, SOCKS5, TLS or UNKNOWN
    tls_first: bool = False     # the client opened with a TLS ClientHello
    reason: str = ""            # how it was decided, for logs: "port 5222", "first bytes", ...


NEED_MORE = None                # not enough bytes yet to decide


def parse_port_map(entries: list[str] | tuple[str, ...]) -> dict[int, tuple[str, bool]]:
    """["5222=xmpp", "5223=xmpp+tls"] -> {5222: ("xmpp", False), 5223: ("xmpp", True)}."""
    ports: dict[int, tuple[str, bool]] = {}
    for entry in entries:
        port, sep, proto = str(entry).partition("=")
        if not sep or not is_number(port.strip()) or not proto.strip():
            raise ValueError(f"port map entry {entry!r}: expected PORT=PROTOCOL, e.g. 5222=xmpp")
        proto = proto.strip().lower()
        tls = proto.endswith("+tls")
        ports[int(port)] = (proto.removesuffix("+tls"), tls)
    return ports


def starts_like_tls(data: bytes) -> bool:
    """A TLS handshake record (ClientHello) header: 0x16 0x03 0x00..0x04."""
    return len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and data[2] <= 0x04


# (protocol, first bytes, compared upper-cased), in registry order; checked before HTTP, so "OPTIONS sip:" is SIP.
_CLIENT_OPENERS = tuple((p.name, p.client_openers, p.case_insensitive)
                        for p in registry.PROTOCOLS.values() if p.client_openers)
_SERVER_HELLOS = tuple((p.name, p.server_hello) for p in registry.PROTOCOLS.values() if p.server_hello)
_CLIENT_HELLOS = tuple((p.name, p.client_hello) for p in registry.PROTOCOLS.values() if p.client_hello)
_HTTP_REQUEST = re.compile(rb"^(GET|PUT|POST|HEAD|DELETE|OPTIONS|PATCH|CONNECT|NOTIFY) \S+ HTTP/1\.[01]\r?\n")
_HTTP_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ",
                 b"NOTIFY ")      # RVP (Exchange 2000 IM) sends its messages as NOTIFY


def _could_become(data: bytes, openers: tuple[bytes, ...]) -> bool:
    """`data` is a proper prefix of one of `openers`: wait for more."""
    return any(len(data) < len(o) and o.startswith(data) for o in openers)


def sniff(data: bytes) -> str | None:
    """The protocol the client's first bytes announce, UNKNOWN, or NEED_MORE."""
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")   # a BOM or whitespace may precede an XML stream header
    if not head:
        return NEED_MORE if len(data) < MAX_SNIFF else UNKNOWN
    if starts_like_tls(head):
        return TLS
    if head[:1] == b"\x05" and len(head) >= 2 and 1 <= head[1] <= 8 and len(head) == 2 + head[1]:
        return SOCKS5                                  # VER=5, NMETHODS, METHODS: a SOCKS5 greeting
    for protocol, openers, upper in _CLIENT_OPENERS:
        if any((head.upper() if upper else head).startswith(o) for o in openers):
            return protocol
    for protocol, hello in _CLIENT_HELLOS:     # binary first bytes (Sametime's HANDSHAKE), on the data as it came
        if all(want is None or got == want for got, want in zip(data, hello, strict=False)):
            if len(data) >= len(hello):
                return protocol
            return NEED_MORE
    if any(head.startswith(m) for m in _HTTP_METHODS):
        if _HTTP_REQUEST.match(head):
            return HTTP
        return NEED_MORE if b"\n" not in head and len(head) < MAX_SNIFF else UNKNOWN
    if len(head) < 16 and (any(_could_become(head.upper() if upper else head, openers)
                               for _, openers, upper in _CLIENT_OPENERS)
                           or _could_become(head, _HTTP_METHODS) or head in (b"\x16", b"\x16\x03", b"\x05")):
        return NEED_MORE
    return UNKNOWN


def sniff_server(data: bytes) -> str | None:
    """The protocol a server that speaks first announces (OSCAR's FLAP hello), UNKNOWN, or NEED_MORE."""
    for protocol, hello in _SERVER_HELLOS:
        if all(want is None or got == want for got, want in zip(data, hello, strict=False)):
            return protocol if len(data) >= len(hello) else NEED_MORE
    return UNKNOWN


def detect(port: int | None, client_bytes: bytes, server_bytes: bytes,
           port_map: dict[int, tuple[str, bool]]) -> Detection | None:
    """Decide the protocol of a connection to `port`, or NEED_MORE (None).

    A mapped port decides as soon as the first bytes arrive: a ClientHello means TLS first (whatever
    the map says), plaintext means the mapped protocol. A server that speaks first (an IRC greeting)
    on a mapped port is enough too. An unmapped port needs the client's first bytes to say what they are,
    or, for a protocol whose server speaks first (OSCAR), the server's.
    """
    mapped = port_map.get(port) if port is not None else None
    if mapped is not None:
        proto, tls_first = mapped
        if client_bytes:
            head = client_bytes.lstrip()
            if starts_like_tls(head):
                return Detection(proto, tls_first=True, reason=f"port {port}, TLS ClientHello")
            if head in (b"\x16", b"\x16\x03"):
                return NEED_MORE
            if tls_first:
                # A plaintext client on a TLS-first port: treat it as the plaintext protocol, it is what the
                # client speaks; the session can flag the downgrade.
                return Detection(proto, tls_first=False, reason=f"port {port}, plaintext on a TLS port")
            return Detection(proto, tls_first=False, reason=f"port {port}")
        if server_bytes:
            return Detection(proto, tls_first=False, reason=f"port {port}, server spoke first")
        return NEED_MORE

    if not client_bytes:
        # Server speaks first on an unknown port: recognised by its hello (OSCAR), else nothing we know.
        if not server_bytes:
            return NEED_MORE
        found = sniff_server(server_bytes)
        if found is NEED_MORE:
            return NEED_MORE
        if found:
            return Detection(found, reason="server's first bytes")
        return Detection(UNKNOWN, reason="server spoke first on an unknown port")
    found = sniff(client_bytes)
    if found is NEED_MORE:
        if server_bytes or len(client_bytes) >= MAX_SNIFF:
            return Detection(UNKNOWN, reason="unrecognised first bytes")
        return NEED_MORE
    if found == TLS:
        return Detection(TLS, tls_first=True, reason="TLS ClientHello on an unknown port")
    return Detection(found, reason="first bytes" if found else "unrecognised first bytes")
