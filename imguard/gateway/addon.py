"""imguard's mitmproxy addons: choosing a layer for each connection, guarding against self-connects,
redirecting bytestream and DCC relay connections, routing notices between connections, and running file
inspection in worker threads.

`GatewayAddon` must sit *ahead* of mitmproxy's NextLayer in the addon chain: NextLayer never overrides a
layer another addon has set, and hooks run in chain order. `LateTlsAddon` must sit *after* TlsConfig,
because it adjusts what TlsConfig produced (per-host verification, server-TLS-first).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import struct
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from mitmproxy import ctx as mitm_ctx
from mitmproxy.connection import Client
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy import events, mode_specs, server_hooks
from mitmproxy.utils import asyncio_utils
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer, TCPLayer, modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import HTTP_ALPNS

from imguard import alerts
from imguard.protocols import detect as det
from imguard.files.expected import Listener
from imguard.gateway.inspection import Inspection
from imguard.gateway.layer import RefuseLayer, SessionLayer, tls_first_stack
from imguard.gateway.notices import NoticeRouter, connection_handler
from imguard.model import ChatContext
from imguard.protocols import registry
from imguard.protocols.base import Fact, Notify, Wake

logger = logging.getLogger("imguard.gateway")


@dataclass(frozen=True)
class ConnectionInfo:
    """What a session factory is told about a new connection."""
    protocol: str               # "xmpp", "irc", "bytestream", ... (a key of the factory table)
    tls_on_connect: bool        # the client opened with TLS: the session sees decrypted bytes from the start
    context: ChatContext        # protocol, client/server address, connection id; the session fills in the rest
    detail: str = ""            # how the protocol was recognised
    streamhost: tuple[str, int] | None = None   # bytestream relay: the real streamhost
    hash: str = ""              # bytestream relay: the SOCKS5 destination hash
    offer: Any = None           # a side connection (DCC, MSNFTP, OFT, MSRP): the entry that announced it
                                # (DccOffer, MsnftpOffer, OftOffer, MsrpOffer; None: unannounced)
    listener: Listener = Listener.NONE  # the kind of listener it arrived on (listener_of)


SessionFactory = Callable[[ConnectionInfo], Any]


def listener_of(context) -> Listener:
    """The kind of listener a connection arrived on, from its mitmproxy mode: told to the session as a fact (an XMPP
    session refuses an upload slot whose PUT would go around the gateway)."""
    return Listener.of_mode(context.client.proxy_mode.type_name)


def _hostport(address) -> str:
    if not address:
        return ""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@functools.lru_cache(maxsize=256)
def is_local_address(host: str) -> bool:
    """True if `host` is an address of this machine (loopback, unspecified, or bindable here). No DNS."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))      # binding succeeds only for a local address
        return True
    except OSError:
        return False


COMMIT_ERROR_LOG_SECONDS = 10.0        # a disk that keeps refusing the archive is logged this often


SIDE_LOOKUP_FAILED: Any = ("", None)      # _side_by_destination: the table failed (the connection is refused)


class GatewayAddon:
    """Picks the layer for each new connection and answers InspectFileHook."""

    def __init__(self, *, pipeline, inspection: Inspection, factories: dict[str, SessionFactory],
                 port_map: dict[int, tuple[str, bool]], http_ports: set[int] | frozenset = frozenset(),
                 transfers=None, bytestream_relay: tuple[str, int] | None = None, max_queued_bytes: int = 0,
                 max_total_queued_bytes: int = 0, parse_fail_open: Callable[[str], bool] | None = None,
                 quick_ack: bool = True, dcc_ports=None):
        self.pipeline = pipeline
        self.inspection = inspection
        # "being scanned" after this long for a file held on its chat connection (SessionLayer._scanning_timer)
        self.scan_notice_after = getattr(inspection, "notice_after", 0)
        self.factories = factories
        self.port_map = port_map
        self.http_ports = set(http_ports)
        self.transfers = transfers
        self.bytestream_relay = bytestream_relay
        self.max_queued_bytes = max_queued_bytes     # per connection, while its layer waits for a scan
        self.max_total_queued_bytes = max_total_queued_bytes     # all connections together
        self.queued_layers: weakref.WeakSet = weakref.WeakSet()  # the SessionLayers holding queued bytes now
        self._parse_fail_open = parse_fail_open      # fail mode parse, per protocol (None: closed)
        self.relay_mode: mode_specs.ProxyMode | None = None
        self._sniff_tls: set[str] = set()      # client ids whose TLS we terminated to look inside
        self._bytestreams: dict[str, tuple[str, tuple[str, int]]] = {}   # client id -> (hash, streamhost)
        self.dcc_ports = dcc_ports              # imguard.gateway.dcc.SideRelayPorts, or None (offers not rewritten)
        self._dcc_offers: dict[str, Any] = {}   # client id -> (side protocol, offer), server_connect -> next_layer
        self._sides: dict[str, Any] = {}        # client id -> a side transfer found for a proxy client's destination
                                                # (side_expected), kept for next_layer: a DCC finder takes its entry
        self.notices = NoticeRouter()                   # the live sessions by connection id, for notices
        self.metrics = None                             # imguard.metrics.Metrics, set by `imguard run`
        self.quick_ack = quick_ack                      # GatewaySettings.quick_ack (tcp_socket)
        self._commit_error_logged = float("-inf")       # when a failed archive write was last logged
        self.stats = {"sessions": 0, "relayed": 0, "refused": 0, "self_connect": 0, "notices": 0}

    # --- recording (the Carrier interface of SessionLayer) --------------------------------------------

    def record(self, event: dict[str, Any]) -> None:
        """Write the event (a failing record is logged, never raised into a session)."""
        try:
            self.pipeline.record(event)
        except Exception:
            logger.exception("could not record an event")

    def parse_fail_open(self, protocol: str) -> bool:
        """Fail mode parse: a connection whose session failed is relayed uninspected (True) or closed."""
        return self._parse_fail_open is not None and self._parse_fail_open(protocol)

    def record_fact(self, fact: Fact) -> None:
        """A session's fact, recorded with the direction its context has for decisions."""
        self.record(fact.event(self.pipeline.with_direction(fact.context)))

    def notify_command(self, cmd: Notify) -> None:
        """A session's Notify: recorded, then delivered as a notice on the connection it names (NoticeRouter)."""
        self.record(cmd.event(self.pipeline.with_direction(cmd.context)))
        if self.notices.deliver(cmd.connection_id, cmd.text):
            self.stats["notices"] += 1

    def wake_command(self, cmd: Wake, connection_id: str) -> None:
        """A session's Wake: its session.wake() (or another connection's) after cmd.after seconds (NoticeRouter)."""
        self.notices.wake(cmd.connection_id or connection_id, cmd.after)

    def commit(self) -> None:
        """Pipeline.commit (the archive records of a read on disk before its stanzas are forwarded). A disk that
        refuses is logged (at most every COMMIT_ERROR_LOG_SECONDS) and counted, and traffic goes on: the
        alert log still has every message."""
        commit = getattr(self.pipeline, "commit", None)
        if commit is None:
            return
        try:
            commit()
        except OSError as e:
            if self.metrics is not None:
                self.metrics.anomaly("archive_write_failed")
            now = time.monotonic()
            if now - self._commit_error_logged >= COMMIT_ERROR_LOG_SECONDS:
                self._commit_error_logged = now
                logger.error("cannot write the archive queue: %s; records are being lost", e)

    def tcp_socket(self, client_id: str, connection) -> Any:
        """The kernel socket under `connection` (a leg of client `client_id`'s connection), for SessionLayer to
        set TCP_QUICKACK on; None when quick_ack is off or the leg is not a TCP socket of the event loop
        (mitmproxy's own handler holds the streams, so they are looked up there once per leg)."""
        if not self.quick_ack:
            return None
        return self._leg_socket(client_id, connection)

    def leg_reset(self, client_id: str, connection) -> bool:
        """Whether the read of `connection` ended in an error (ECONNRESET, a broken or timed-out connection) rather
        than the peer's FIN. mitmproxy reports both as one ConnectionClosed; asyncio keeps the error on the
        stream it failed (StreamReader.exception()), while a FIN leaves it None."""
        handler = connection_handler(client_id)
        io = handler.transports.get(connection) if handler is not None else None
        reader = getattr(io, "reader", None)
        return isinstance(reader, asyncio.StreamReader) and isinstance(reader.exception(), OSError)

    def reset_on_close(self, client_id: str, connection) -> None:
        """SO_LINGER (on, 0 s) on the socket under `connection`: its close sends a reset, not a FIN."""
        sock = self._leg_socket(client_id, connection)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _leg_socket(self, client_id: str, connection) -> Any:
        """The kernel TCP socket under one leg, or None."""
        if getattr(connection, "transport_protocol", None) != "tcp":
            return None
        handler = connection_handler(client_id)
        io = handler.transports.get(connection) if handler is not None else None
        writer = getattr(io, "writer", None)
        try:
            sock = writer.get_extra_info("socket") if writer is not None else None
        except KeyError:        # a writer that is not an asyncio transport's (mitmproxy's UDP datagram writer)
            return None
        if sock is None or getattr(sock, "type", None) != socket.SOCK_STREAM or \
                getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return None
        return sock

    def anomaly(self, ctx: ChatContext, kind: str, detail: str, **data: Any) -> None:
        logger.warning("%s: %s: %s", ctx.client_address or "-", kind, detail)
        self.record(alerts.anomaly_event(ctx, kind, detail, **data))

    # --- helpers ---------------------------------------------------------------------------------------

    def _http_reverse_ports(self) -> set[int]:
        """Ports of the gateway's reverse:http(s) listeners (an upload relay): a proxied client may reach them
        through the gateway; not a loop, since they forward to their own upstream."""
        ps = mitm_ctx.master.addons.get("proxyserver")
        return {addr[1] for instance in (ps.servers if ps else []) if isinstance(instance.mode, mode_specs.ReverseMode)
                and instance.mode.scheme in ("http", "https") for addr in instance.listen_addrs}

    def _listen_addrs(self) -> list:
        ps = mitm_ctx.master.addons.get("proxyserver")
        return ps.listen_addrs() if ps else []

    def is_relay(self, client: Client) -> bool:
        return self.relay_mode is not None and client.proxy_mode == self.relay_mode

    def find_relay_mode(self) -> mode_specs.ProxyMode | None:
        """The socks5 listener that is the bytestream relay (matched by port), once the listeners are up."""
        if self.bytestream_relay is None:
            return None
        ps = mitm_ctx.master.addons.get("proxyserver")
        for instance in ps.servers if ps else []:
            if not isinstance(instance.mode, mode_specs.Socks5Mode):
                continue
            ports = {addr[1] for addr in instance.listen_addrs} | {instance.mode.custom_listen_port}
            if self.bytestream_relay[1] in ports:
                return instance.mode
        return None

    def running(self) -> None:
        self.relay_mode = self.find_relay_mode()
        if self.bytestream_relay is not None and self.relay_mode is None:
            logger.error("bytestream_relay %s:%d is not one of the gateway's socks5 listeners: SOCKS5 file "
                         "transfers will not be inspected", *self.bytestream_relay)

    @staticmethod
    def chat_context(context, protocol: str) -> ChatContext:
        return ChatContext(protocol=protocol, client_address=_hostport(context.client.peername),
                           server_address=_hostport(context.server.address), connection_id=context.client.id)

    # --- hooks -------------------------------------------------------------------------------------------

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Refuse connections to the gateway itself; send bytestream relay connections to the real streamhost."""
        server = data.server
        if server.address is None:
            return
        if self.is_relay(data.client):
            self._redirect_bytestream(data)
            if server.error:
                return
        elif self._is_dcc_relay(data.client):
            self._redirect_dcc(data)
            if server.error:
                return
        host, port = str(server.address[0]), int(server.address[1])
        own_ports = {addr[1] for addr in self._listen_addrs()} - self._http_reverse_ports()
        if port in own_ports and server.transport_protocol == "tcp" and is_local_address(host):
            self.stats["self_connect"] += 1
            server.error = f"refused: {host}:{port} is the gateway itself"
            ctx = ChatContext(client_address=_hostport(data.client.peername), server_address=f"{host}:{port}",
                              connection_id=data.client.id)
            self.anomaly(ctx, "self_connect", f"a connection to the gateway's own listener {host}:{port} was refused "
                         "(a direct connection to the transparent port, or a loop)")

    def _redirect_bytestream(self, data: server_hooks.ServerConnectionHookData) -> None:
        host, port = data.server.address[0], data.server.address[1]
        target = None
        if self.transfers is not None and isinstance(host, str) and len(host) == 40:
            try:
                target = self.transfers.lookup_bytestream(host.lower())
            except Exception:
                logger.exception("bytestream lookup failed")
        ctx = ChatContext(protocol="socks5", client_address=_hostport(data.client.peername),
                          connection_id=data.client.id, transfer_mechanism="socks5")
        if target is not None and not isinstance(target, tuple):
            target = (getattr(target, "host", ""), getattr(target, "port", 0))
        if target is None or not target[0] or not target[1]:
            data.server.error = f"unknown bytestream {host}:{port}"
            self.anomaly(ctx, "unknown_bytestream", f"relay connection for an unannounced stream {host!r}")
            return
        self._bytestreams[data.client.id] = (host.lower(), (str(target[0]), int(target[1])))
        data.server.address = (str(target[0]), int(target[1]))

    def _is_dcc_relay(self, client: Client) -> bool:
        return self.dcc_ports is not None and self.dcc_ports.is_relay(client.proxy_mode)

    def _redirect_dcc(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A connection to a side relay port (DCC, MSNFTP, OFT) goes on to the real listener of the offer that
        port was given to; a connection no offer announced is refused (anomaly)."""
        port = data.client.sockname[1] if data.client.sockname else 0
        try:
            claim = self.dcc_ports.take(port)
        except Exception:
            logger.exception("side relay offer lookup failed")
            claim = None
        if claim is None:
            data.server.error = f"no offer for side relay port {port}"
            ctx = ChatContext(client_address=_hostport(data.client.peername),
                              server_address=f"{self.dcc_ports.host}:{port}", connection_id=data.client.id)
            self.anomaly(ctx, "dcc_unannounced", f"a connection to side relay port {port} that no offer "
                         "announced (or whose offer expired or was used); closed", port=port)
            return
        self._dcc_offers[data.client.id] = claim
        data.server.address = claim[1].real_address

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A relay connection must start its session without waiting for the client: the target of a SOCKS5
        bytestream sends nothing until the streamhost does, and the streamhost waits for the SOCKS5 handshake
        the session replays. mitmproxy asks next_layer only when bytes arrive, so nudge it with an empty read."""
        if not self.is_relay(data.client) or "bytestream" not in self.factories:
            return
        handler = connection_handler(data.client.id)
        if handler is not None:
            asyncio_utils.create_task(handler.server_event(events.DataReceived(data.client, b"")),
                                      name="imguard relay start", keep_ref=True)

    def side_expected(self, client: Client, address: tuple) -> bool:
        """Whether a chat session announced a side transfer to `address` (ProxyDestinations asks, for a proxy
        client's destination); the entry found is kept for this client's next_layer."""
        found = self._side_by_destination(address)
        if found is None or found is SIDE_LOOKUP_FAILED:      # a table that cannot answer: not announced
            return False
        self._sides[client.id] = found
        return True

    def client_disconnected(self, client: Client) -> None:
        self._sides.pop(client.id, None)
        self._bytestreams.pop(client.id, None)
        self._dcc_offers.pop(client.id, None)
        self.notices.forget(client.id)
        self._sniff_tls.discard(client.id)

    def next_layer(self, nextlayer: mlayer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        context = nextlayer.context
        if context.client.transport_protocol == "udp" and context.layers:
            nextlayer.layer = self._datagram_layer(context)
            return
        if context.client.transport_protocol != "tcp" or not context.layers:
            return          # QUIC and the like: mitmproxy's own layers
        if context.client.tls:
            if context.client.id in self._sniff_tls:
                self._inside_tls(nextlayer)
            return          # other TLS (HTTPS in a CONNECT tunnel, reverse:https): mitmproxy's layers
        top = context.layers[0]
        if isinstance(top, (modes.HttpProxy, modes.HttpUpstreamProxy)) and len(context.layers) == 1:
            return          # the explicit proxy request itself; a CONNECT tunnel comes back here
        if isinstance(top, modes.ReverseProxy) and context.client.proxy_mode.scheme != "tcp":
            return          # reverse:http(s)/tls/...: mitmproxy's stack for that scheme
        if self.is_relay(context.client):
            nextlayer.layer = self._bytestream_layer(context)
            return
        if self._is_dcc_relay(context.client):
            protocol, offer = self._dcc_offers.pop(context.client.id, None) or ("dcc", None)
            nextlayer.layer = self._side_layer(context, registry.SIDES[protocol], offer)
            return
        if context.server.address is None:
            return
        port = int(context.server.address[1])
        if not isinstance(top, modes.ReverseProxy):
            # A side connection a chat session announced (DCC when offers are not rewritten, MSNFTP, OFT, MSRP) is
            # recognised by its destination, before any protocol detection (it carries raw file bytes), as Zeek's
            # dcc-send.zeek does.
            found = self._sides.pop(context.client.id, None) or self._side_by_destination(context.server.address)
            if found is SIDE_LOOKUP_FAILED:
                nextlayer.layer = RefuseLayer(context)
                return
            if found is not None:
                nextlayer.layer = self._side_layer(context, *found)
                return
        found = det.detect(port, nextlayer.data_client(), nextlayer.data_server(), self.port_map)
        if found is det.NEED_MORE:
            return
        nextlayer.layer = self._layer_for(context, found)

    def _datagram_layer(self, context) -> mlayer.Layer | None:
        """SIP over UDP (the usual SIP transport): a SipDatagramHandler on the flow of datagrams between one
        client address and the server, each datagram one event and each Send one datagram. Other UDP (DNS,
        QUIC, ...) is left to mitmproxy's own layers (None)."""
        if context.server.address is None:
            return None
        port = int(context.server.address[1])
        factory = self.factories.get("sip-udp")
        if self.port_map.get(port, ("", False))[0] != "sip" or factory is None:
            return None
        chat = self.chat_context(context, "sip")
        session = factory(ConnectionInfo("sip-udp", False, chat, f"UDP port {port}"))
        self.notices.remember(context.client.id, session, context)
        return SessionLayer(context, session, chat, self)

    def _side_by_destination(self, address) -> tuple[registry.SideConnection, Any] | None:
        """The side connection announced for this destination (registry.find_side), among the ones this gateway
        has sessions for; DCC only when offers are not rewritten to the relay pool (MSNFTP and OFT offers that
        were rewritten wait under the relay's address, which no connection through here names)."""
        if self.transfers is None:
            return None
        port = int(address[1])
        if port in self.port_map or port in self.http_ports:
            return None     # never let an offer claim a chat or web server's port
        protocols = {p for p in self.factories if p != "dcc" or self.dcc_ports is None}
        try:
            return registry.find_side(self.transfers, str(address[0]), port, protocols)
        except Exception as e:
            # The (shared) table cannot say whether a file was announced here: refused, never relayed as unknown.
            logger.error("side connection lookup for %s:%d failed, connection refused: %s", address[0], port, e)
            return SIDE_LOOKUP_FAILED

    def _side_layer(self, context, side: registry.SideConnection, offer) -> mlayer.Layer:
        chat = registry.context_for(side.protocol, self.chat_context(context, side.protocol))
        factory = self.factories.get(side.protocol)
        if factory is None or offer is None:
            self.anomaly(chat, f"{side.protocol}_unannounced" if offer is None else f"{side.protocol}_unsupported",
                         f"{side.protocol.upper()} connection closed: " + (
                             "no offer announced it" if offer is None else f"no {side.protocol} session available"))
            self.stats["refused"] += 1
            return RefuseLayer(context)
        tls_first = side.tls_first(offer)
        try:
            session = factory(ConnectionInfo(side.protocol, tls_first, chat, side.what, offer=offer))
        except Exception as e:
            logger.exception("cannot start a %s session", side.protocol)
            self.anomaly(chat, "session_error", f"cannot start a {side.protocol} session: {e!r}")
            self.stats["refused"] += 1
            return RefuseLayer(context)
        self.stats["sessions"] += 1
        self.notices.remember(context.client.id, session, context)     # for a Wake (a warned file's answer)
        logger.info("%s -> %s: %s for %s %r (%s)", chat.client_address, chat.server_address, side.protocol,
                    side.what, getattr(offer, "name", ""), getattr(offer, "offer_id", ""))
        if tls_first:
            return tls_first_stack(context, session, chat, self)
        return SessionLayer(context, session, chat, self)

    def _layer_for(self, context, found: det.Detection) -> mlayer.Layer | None:
        port = int(context.server.address[1])
        if found.protocol == det.HTTP:
            return HttpLayer(context, HTTPMode.transparent)     # mitmproxy's HTTP layer: uploads get scanned
        if found.protocol == det.TLS:
            # Intercept TLS to HTTP ports (uploads) and, in reverse:tcp mode, to the server the operator put us
            # in front of; the decrypted first bytes decide next (_inside_tls). Any other TLS is not ours.
            if port in self.http_ports or isinstance(context.layers[0], modes.ReverseProxy):
                self._sniff_tls.add(context.client.id)
                server_tls = ServerTLSLayer(context)
                server_tls.child_layer = ClientTLSLayer(context)
                return server_tls
            self.stats["relayed"] += 1
            return TCPLayer(context, ignore=True)
        factory = self.factories.get(found.protocol)
        if factory is None:
            self.stats["relayed"] += 1
            return TCPLayer(context, ignore=True)               # not inspected: no flow, no per-chunk hook
        chat = self.chat_context(context, found.protocol)
        info = ConnectionInfo(found.protocol, found.tls_first, chat, found.reason, listener=listener_of(context))
        try:
            session = factory(info)
        except Exception as e:
            logger.exception("cannot start a %s session", found.protocol)
            self.anomaly(chat, "session_error", f"cannot start a {found.protocol} session: {e!r}")
            self.stats["refused"] += 1
            return RefuseLayer(context)
        self.stats["sessions"] += 1
        self.notices.remember(context.client.id, session, context)
        logger.info("%s -> %s: %s (%s)", chat.client_address, chat.server_address, found.protocol, found.reason)
        if found.tls_first:
            return tls_first_stack(context, session, chat, self)
        return SessionLayer(context, session, chat, self)

    def _inside_tls(self, nextlayer: mlayer.NextLayer) -> None:
        """TLS we terminated on an unmapped port: a chat protocol inside gets its session (tls_on_connect),
        HTTP goes to mitmproxy's HTTP layer, anything else is relayed without a flow."""
        context = nextlayer.context
        if context.client.alpn in HTTP_ALPNS:
            self._sniff_tls.discard(context.client.id)
            return
        found = det.detect(None, nextlayer.data_client(), nextlayer.data_server(), {})
        if found is det.NEED_MORE:
            return
        self._sniff_tls.discard(context.client.id)
        if found.protocol in (det.HTTP, det.TLS):
            return
        factory = self.factories.get(found.protocol)
        if factory is None:
            self.stats["relayed"] += 1
            nextlayer.layer = TCPLayer(context, ignore=True)
            return
        chat = self.chat_context(context, found.protocol)
        try:
            session = factory(ConnectionInfo(found.protocol, True, chat, "first bytes inside TLS",
                                             listener=listener_of(context)))
        except Exception as e:
            logger.exception("cannot start a %s session", found.protocol)
            self.anomaly(chat, "session_error", f"cannot start a {found.protocol} session: {e!r}")
            nextlayer.layer = RefuseLayer(context)
            return
        self.stats["sessions"] += 1
        self.notices.remember(context.client.id, session, context)
        logger.info("%s -> %s: %s (first bytes inside TLS)", chat.client_address, chat.server_address, found.protocol)
        nextlayer.layer = SessionLayer(context, session, chat, self, tls=True)

    def _bytestream_layer(self, context) -> mlayer.Layer:
        chat = self.chat_context(context, "socks5").with_(transfer_mechanism="socks5")
        hash_, streamhost = self._bytestreams.pop(context.client.id, ("", None))
        factory = self.factories.get("bytestream")
        if factory is None:
            self.anomaly(chat, "bytestream_unsupported", "no bytestream session available: relay connection closed")
            return RefuseLayer(context)
        try:
            session = factory(ConnectionInfo("bytestream", False, chat, "relay listener", streamhost, hash_))
        except Exception as e:
            self.anomaly(chat, "session_error", f"cannot start a bytestream session: {e!r}")
            return RefuseLayer(context)
        self.stats["sessions"] += 1
        self.notices.remember(context.client.id, session, context)     # for a Wake (a warned file's answer)
        return SessionLayer(context, session, chat, self)
