"""Every protocol imguard decodes, in one table: both carriers (the inline gateway and the offline replay)
build their sessions, port maps, detection and side-connection lookups from it. Pure: no mitmproxy.

    spec = PROTOCOLS["msnp"]            # name, default ports, first-bytes signatures, limits class
    session = build(SessionRequest("msnp", context, checker=pipeline, transfers=table))
    found = find_side(table, "192.0.2.7", 6891)   # -> (SIDE_CONNECTIONS entry, the announced entry) | None

A *main* protocol is what a client speaks to its server (xmpp, irc, msnp, oscar, ymsg, sip, msrp); it has
default port-map entries and first-bytes signatures (imguard.protocols.detect reads them). A *side* protocol
is a data connection announced on a main connection (dcc, msnftp, oft, msrp): the carrier finds it by its
destination in the ExpectedTransfers table (`find_side`, SIDE_CONNECTIONS) before any detection, because it
carries raw file bytes that no first-bytes rule recognises. MSRP is both: port 2855 (relays) and
SDP-announced addresses. The XEP-0065 bytestream is found by its SOCKS5 destination hash instead (the
gateway's relay listener, the replay's CONNECT).

A carrier tells a session what it knows in a `SessionRequest`; fields a protocol does not use are ignored:
the relays are the gateway's (a capture is observed, not rewritten), the clock is the replay's (capture time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from imguard.files.expected import Listener
from imguard.conversation import ConversationSettings
from imguard.model import ChatContext
from imguard.protocols.base import StreamSession
from imguard.protocols.irc import IrcLimits, IrcSession, dcc_session, find_offer
from imguard.protocols.msnp import DirectMsnftpSession, MsnpLimits, MsnpSession, find_msnftp_offer
from imguard.protocols.msrp import MsrpLimits, MsrpSession, find_msrp_offer
from imguard.protocols.sametime import SametimeLimits, SametimeSession
from imguard.protocols.oscar import OftSession, OscarLimits, OscarSession, find_oft_offer
from imguard.protocols.sip import SipDatagramHandler, SipLimits, SipSession
from imguard.protocols.socks5_bytestream import Socks5BytestreamSession, Socks5Limits
from imguard.protocols.xmpp import XmppLimits, XmppSession
from imguard.protocols.ymsg import YmsgLimits, YmsgSession


@dataclass(frozen=True)
class SessionRequest:
    """What a carrier knows about a new connection, for `build`."""
    protocol: str                       # a key of PROTOCOLS
    context: ChatContext                # addresses and connection id; the session fills in the rest
    tls_on_connect: bool = False        # the bytes the session sees were TLS from the first byte (decrypted)
    checker: Any = None                 # check_message(text, ctx): the Pipeline (or the replay's observer of it)
    transfers: Any = None               # the shared ExpectedTransfers table
    clock: Callable[[], float] = time.monotonic     # the replay passes the capture's time
    limits: Mapping[type, Any] = field(default_factory=dict)   # limits class -> instance (absent: its defaults)
    expected: Any = None                # a side connection: the entry find_side found (DccOffer, OftOffer, ...)
    bytestream_relay: tuple[str, int] | None = None     # gateway: XMPP streamhosts rewritten to this relay
    dcc_relay: Any = None               # gateway: the side relay (IRC DCC, MSNFTP, OFT offers rewritten to its ports)
    stream_hash: str | None = None      # gateway's socks5 relay: the destination hash mitmproxy's SOCKS5 layer
                                        # read (None: the session sees the client's SOCKS5 handshake itself)
    streamhost: tuple[str, int] | None = None   # gateway's socks5 relay: the real streamhost
    downgrade_fail_open: bool = False   # fail mode PROTO:downgrade=open: a client's plaintext login the server
                                        # offered STARTTLS for is still forwarded (closed: refused, credentials kept)
    listener: Listener = Listener.NONE  # the kind of listener the connection arrived on (XMPP: may its client's
                                        # upload go around the gateway?)

    def limit(self, cls: type) -> Any:
        """The limits of class `cls` the carrier was configured with, else the defaults."""
        found = self.limits.get(cls)
        return found if found is not None else cls()


Builder = Callable[[SessionRequest], StreamSession]


@dataclass(frozen=True)
class Protocol:
    """One entry of the table."""
    name: str
    title: str                              # the heading of its limits in `imguard run --help`, else its name
    build: Builder
    ports: tuple[str, ...] = ()             # default port-map entries, PORT=NAME[+tls]
    client_openers: tuple[bytes, ...] = ()  # the client's first bytes start with one of these
    case_insensitive: bool = False          # openers compared with the client's bytes upper-cased (IRC)
    server_hello: tuple[int | None, ...] = ()   # the server speaks first with these bytes (None: any byte there)
    client_hello: tuple[int | None, ...] = ()   # the client's first bytes, where no fixed prefix will do (None: any)
    limits: type | None = None              # its limits class (command-line options, SessionRequest.limits)
    context_protocol: str = ""              # ChatContext.protocol of its connections (default: name)
    mechanism: str = ""                     # ChatContext.transfer_mechanism of its connections (side protocols)


def _xmpp(r: SessionRequest) -> StreamSession:
    return XmppSession(checker=r.checker, transfers=r.transfers, context=r.context, limits=r.limit(XmppLimits),
                       tls_on_connect=r.tls_on_connect, bytestream_relay=r.bytestream_relay, clock=r.clock,
                       stripped_auth_open=r.downgrade_fail_open, listener=r.listener,
                       conversation=r.limit(ConversationSettings))


def _irc(r: SessionRequest) -> StreamSession:
    # With dcc_relay, offers are rewritten to the gateway's relay ports; without, DCC connections are caught by
    # their destination (find_side) where the carrier sees it.
    return IrcSession(checker=r.checker, transfers=r.transfers, context=r.context, limits=r.limit(IrcLimits),
                      tls_on_connect=r.tls_on_connect, dcc_relay=r.dcc_relay,
                      conversation=r.limit(ConversationSettings))


def _dcc(r: SessionRequest) -> StreamSession:
    return dcc_session(r.checker, r.transfers, r.context, r.expected, r.limit(IrcLimits), r.limit(ConversationSettings))


def _bytestream(r: SessionRequest) -> StreamSession:
    # Offline there is no relay: the capture's server is the streamhost (the replay answers ConnectUpstream).
    return Socks5BytestreamSession(transfers=r.transfers, context=r.context, checker=r.checker,
                                   stream_hash=r.stream_hash, streamhost=r.streamhost, limits=r.limit(Socks5Limits),
                                   conversation=r.limit(ConversationSettings))


def _msnp(r: SessionRequest) -> StreamSession:
    return MsnpSession(r.checker, r.transfers, r.context, r.limit(MsnpLimits), side_relay=r.dcc_relay)


def _msnftp(r: SessionRequest) -> StreamSession:
    return DirectMsnftpSession(r.checker, r.transfers, r.context, r.expected, r.limit(MsnpLimits))


def _oscar(r: SessionRequest) -> StreamSession:
    return OscarSession(r.checker, r.transfers, r.context, r.limit(OscarLimits), side_relay=r.dcc_relay)


def _oft(r: SessionRequest) -> StreamSession:
    return OftSession(r.checker, r.transfers, r.context, r.expected, r.limit(OscarLimits))


def _ymsg(r: SessionRequest) -> StreamSession:
    return YmsgSession(r.checker, r.transfers, r.context, r.limit(YmsgLimits))


def _sip(r: SessionRequest) -> StreamSession:
    return SipSession(r.checker, r.transfers, r.context, r.limit(SipLimits), tls_on_connect=r.tls_on_connect)


def _sip_udp(r: SessionRequest) -> StreamSession:
    return SipDatagramHandler(r.checker, r.transfers, r.context, r.limit(SipLimits))


def _msrp(r: SessionRequest) -> StreamSession:
    tls = r.tls_on_connect or bool(getattr(r.expected, "tls", False))
    return MsrpSession(r.checker, r.transfers, r.context, offer=r.expected, limits=r.limit(MsrpLimits),
                       tls_on_connect=tls)


def _sametime(r: SessionRequest) -> StreamSession:
    return SametimeSession(r.checker, r.transfers, r.context, r.limit(SametimeLimits))


_SIP_METHODS = (b"MESSAGE", b"INVITE", b"REGISTER", b"OPTIONS")

_TABLE = (
    Protocol("xmpp", "XMPP session limits (per connection)", _xmpp, ports=("5222=xmpp", "5223=xmpp+tls"),
             client_openers=(b"<?xml", b"<stream:stream", b"<stream "), limits=XmppLimits),
    Protocol("irc", "IRC session and DCC limits (per connection)", _irc, ports=("6667=irc", "6697=irc+tls"),
             client_openers=(b"NICK ", b"USER ", b"CAP LS", b"CAP REQ", b"PASS "), case_insensitive=True,
             limits=IrcLimits),
    Protocol("msnp", "MSNP (MSN Messenger) limits (per connection)", _msnp, ports=("1863=msnp",),
             client_openers=(b"VER ", b"USR ", b"ANS "), limits=MsnpLimits),
    # The login and BOS servers speak first: FLAP channel 1, any sequence, length 4, protocol version 1.
    Protocol("oscar", "OSCAR (AIM/ICQ) limits (per connection)", _oscar, ports=("5190=oscar",),
             server_hello=(0x2a, 0x01, None, None, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01), limits=OscarLimits),
    Protocol("ymsg", "YMSG (Yahoo! Messenger) limits (per connection)", _ymsg, ports=("5050=ymsg",),
             client_openers=(b"YMSG",), limits=YmsgLimits),
    Protocol("sip", "SIP limits (per connection)", _sip, ports=("5060=sip", "5061=sip+tls"),
             client_openers=tuple(m + s for m in _SIP_METHODS for s in (b" sip:", b" sips:")) + (b"SIP/2.0 ",),
             limits=SipLimits),
    Protocol("msrp", "MSRP limits (per connection)", _msrp, ports=("2855=msrp",), client_openers=(b"MSRP ",),
             limits=MsrpLimits),
    # The client speaks first: a HANDSHAKE (type 0, no options, channel 0) of protocol major version 0x1e, after
    # its 4-byte length (under 64 KiB). Its TLS form (HCL Sametime's "Direct connection using TLS") is TLS from the
    # first byte on the same port 1533 (the mux takes both), so no +tls entry: a ClientHello on a mapped port is
    # TLS first (detect), and this session reads what is inside.
    Protocol("sametime", "Sametime (Community protocol) limits (per connection)", _sametime, ports=("1533=sametime",),
             client_hello=(0, 0, None, None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x1e), limits=SametimeLimits),
    # SIP over UDP (its usual transport): the datagrams to a port mapped to sip; one datagram, one event.
    Protocol("sip-udp", "SIP over UDP", _sip_udp, context_protocol="sip"),
    # Side protocols: found by their destination (SIDE_CONNECTIONS), never by port or first bytes.
    Protocol("dcc", "IRC DCC", _dcc, context_protocol="irc", mechanism="dcc"),
    Protocol("msnftp", "MSNFTP", _msnftp, context_protocol="msnp", mechanism="msnftp"),
    Protocol("oft", "OSCAR file transfer", _oft, context_protocol="oscar", mechanism="oft"),
    Protocol("bytestream", "XEP-0065 SOCKS5 bytestream relay limits (per connection)", _bytestream,
             context_protocol="xmpp", mechanism="socks5", limits=Socks5Limits),
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in _TABLE}


@dataclass(frozen=True)
class SideConnection:
    """A data connection a main connection announced, recognised by its destination (host, port)."""
    protocol: str                                   # the PROTOCOLS entry whose session it gets
    find: Callable[[Any, str, int], Any]            # (transfers, host, port) -> the announced entry, or None
    what: str                                       # for logs and the detection reason

    def tls_first(self, entry: Any) -> bool:
        """The announced connection is TLS from its first byte (MSRP over TCP/TLS/MSRP)."""
        return bool(getattr(entry, "tls", False))


def _find_dcc(transfers: Any, host: str, port: int) -> Any:
    return find_offer(transfers, host, port, take=True)        # a DCC address is used once


def _find_oft(transfers: Any, host: str, port: int) -> Any:
    return find_oft_offer(transfers, host=host, port=port)


# Tried in this order on every new connection whose port is not a chat or web server's.
SIDE_CONNECTIONS: tuple[SideConnection, ...] = (
    SideConnection("dcc", _find_dcc, "DCC offer"),
    SideConnection("msnftp", find_msnftp_offer, "MSNFTP invitation"),
    SideConnection("oft", _find_oft, "OSCAR SendFile rendezvous"),
    SideConnection("msrp", find_msrp_offer, "SDP MSRP offer"),
)
SIDES: dict[str, SideConnection] = {side.protocol: side for side in SIDE_CONNECTIONS}


def build(request: SessionRequest) -> StreamSession:
    """The session for `request.protocol` (KeyError: not a protocol of this table)."""
    return PROTOCOLS[request.protocol].build(request)


def context_for(protocol: str, context: ChatContext) -> ChatContext:
    """`context` with the protocol and transfer mechanism a connection of `protocol` is recorded under."""
    spec = PROTOCOLS.get(protocol)
    if spec is None:
        return context.with_(protocol=protocol)
    return context.with_(protocol=spec.context_protocol or spec.name,
                         transfer_mechanism=spec.mechanism or context.transfer_mechanism)


def find_side(transfers: Any, host: str, port: int,
              protocols: Any = None) -> tuple[SideConnection, Any] | None:
    """The side connection announced for a new connection to host:port: (its SIDE_CONNECTIONS entry, the
    announced entry), or None. `protocols`: only these side protocols (the ones the carrier has sessions for).
    A finder that takes its entry (DCC) has taken it."""
    if transfers is None:
        return None
    for side in SIDE_CONNECTIONS:
        if protocols is not None and side.protocol not in protocols:
            continue
        entry = side.find(transfers, host, port)
        if entry is not None:
            return side, entry
    return None


def default_ports() -> list[str]:
    """The default port map of every main protocol, PORT=NAME[+tls]."""
    return [entry for spec in _TABLE for entry in spec.ports]


def limits_classes() -> list[tuple[str, type, str]]:
    """(protocol, limits class, title) of every protocol with limits, in table order."""
    return [(spec.name, spec.limits, spec.title) for spec in _TABLE if spec.limits is not None]
