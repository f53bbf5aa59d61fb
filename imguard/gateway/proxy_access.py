"""Who may use the explicit proxy listeners (regular@, socks5@), and to reach what: no open relay.

Two addons, one concern each, around the others in the chain (master.py):

    ProxyAuth          first: credentials (--proxy-auth USER:PASS or @htpasswd). A CONNECT or a proxy request
                       without them gets 407 (Proxy-Authenticate: Basic); a SOCKS5 client must use
                       username/password (RFC 1929, mitmproxy's Socks5Proxy asks for it when the `proxyauth`
                       option is set, which this addon declares) and a wrong one gets the RFC's failure reply.
    ProxyDestinations  after HttpUploads and ChatApis: where a proxy client may go (--proxy-destinations chat,
                       the default): a port of the port map, an HTTP port (chat APIs, uploads), a side transfer
                       a chat session announced, or, for a plain proxy request, a URL one announced (the
                       uploads and chat-API addons before it have claimed the flow). Anything else is refused
                       with a `proxy_destination_refused` anomaly: 403 to a CONNECT or a proxy request, a
                       SOCKS5 failure reply (mitmproxy's: "host unreachable") to a SOCKS5 connect.

Neither touches the bytestream relay (a socks5 listener whose destinations are stream hashes: only announced
ones are relayed, see GatewayAddon._redirect_bytestream) or the DCC relay ports: their peers cannot
authenticate and reach only what a chat session announced. mitmproxy's own ProxyAuth addon is not used: it
asks every HTTP request of every mode for credentials (a reverse-mode upload would get 401) and its SOCKS5
side reads one global option, which would lock XEP-0065 clients out of the relay.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from mitmproxy import ctx as mitm_ctx
from mitmproxy import exceptions, http
from mitmproxy.addons.proxyauth import make_auth_required_response, parse_http_basic_auth
from mitmproxy.connection import Client
from mitmproxy.proxy import mode_specs, server_hooks
from mitmproxy.proxy.layers import modes
from mitmproxy.utils import htpasswd

from imguard import alerts
from imguard.gateway.notices import connection_handler
from imguard.model import ChatContext

logger = logging.getLogger("imguard.gateway")

CHAT, ANY = "chat", "any"
DESTINATION_MODES = (CHAT, ANY)
CLAIMED = ("imguard_upload", "imguard_download", "imguard_chat")   # flow.metadata keys of HttpUploads, ChatApis


def is_explicit(client: Client, is_relay: Callable[[Client], bool]) -> bool:
    """A client of a regular@ or socks5@ listener that is not the bytestream relay."""
    return isinstance(client.proxy_mode, (mode_specs.RegularMode, mode_specs.Socks5Mode)) and not is_relay(client)


def reachable_from_outside(addresses) -> list:
    """The listen addresses other machines can reach (anything but loopback: a LAN address, 0.0.0.0, ::)."""
    out = []
    for address in addresses:
        host = str(address[0]).strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            out.append(address)
    return out


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Credentials:
    """USER:PASS (the password may hold ':') or @FILE (an htpasswd file, bcrypt or SHA1)."""

    def __init__(self, spec: str):
        self.spec = spec
        self._file: htpasswd.HtpasswdFile | None = None
        if spec.startswith("@"):
            path = Path(spec[1:]).expanduser()
            try:
                self._file = htpasswd.HtpasswdFile.from_file(path)
            except (ValueError, OSError) as e:
                raise ValueError(f"proxy_auth {spec}: cannot read the htpasswd file: {e}") from None
            self.user, self.password = "", ""
        else:
            self.user, sep, self.password = spec.partition(":")
            if not sep or not self.user:
                raise ValueError("proxy_auth: expected USER:PASS or @HTPASSWD_FILE")

    def __call__(self, user: str, password: str) -> bool:
        if self._file is not None:
            return self._file.check_password(user, password)
        return hmac.compare_digest(user.encode(), self.user.encode()) and \
            hmac.compare_digest(password.encode(), self.password.encode())


class _WithoutProxyAuth:
    """A connection's view of the options with no `proxyauth`: mitmproxy's Socks5Proxy then offers 'no
    authentication' (the bytestream relay: XEP-0065 clients never authenticate)."""

    def __init__(self, options: Any):
        self._options = options

    def __getattr__(self, name: str) -> Any:
        return None if name == "proxyauth" else getattr(self._options, name)

    def __contains__(self, name: str) -> bool:
        return name in self._options


class ProxyAuth:
    """Proxy authentication for the explicit listeners (see the module docstring)."""

    def __init__(self, is_relay: Callable[[Client], bool], record: Callable[[dict], None],
                 relay_mode: Callable[[], Any] = lambda: None):
        self.is_relay = is_relay
        self.relay_mode = relay_mode        # the bytestream relay's listener mode, once listening (or None)
        self.record = record
        self.credentials: Credentials | None = None
        self._authenticated: set[str] = set()      # client ids that gave valid credentials
        self.stats = {"refused": 0}

    def load(self, loader) -> None:
        # The name mitmproxy's Socks5Proxy looks for to ask SOCKS5 clients for username/password.
        loader.add_option("proxyauth", Optional[str], None,
                          "imguard: proxy credentials of the explicit listeners (set from --proxy-auth)")

    def configure(self, updated) -> None:
        if "proxyauth" in updated:
            spec = mitm_ctx.options.proxyauth
            try:
                self.credentials = Credentials(spec) if spec else None
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        """Say it at start when an explicit listener serves other machines without credentials."""
        ps = mitm_ctx.master.addons.get("proxyserver")
        if self.credentials is not None or ps is None:
            return
        relay = self.relay_mode()
        for instance in ps.servers:
            if not isinstance(instance.mode, (mode_specs.RegularMode, mode_specs.Socks5Mode)) or instance.mode == relay:
                continue
            exposed = reachable_from_outside(instance.listen_addrs)
            if exposed:
                logger.warning("%s listens on %s without --proxy-auth: anyone who reaches it may use it (to chat "
                               "destinations only with --proxy-destinations chat); set --proxy-auth USER:PASS",
                               instance.mode.full_spec, ", ".join(_hostport(str(a[0]), int(a[1])) for a in exposed))

    def client_connected(self, client: Client) -> None:
        """The relay listener's connections never authenticate, whatever --proxy-auth says."""
        if self.credentials is None or not self.is_relay(client):
            return
        handler = connection_handler(client.id)
        if handler is not None and isinstance(handler.layer, modes.Socks5Proxy):
            handler.layer.context.options = _WithoutProxyAuth(handler.layer.context.options)

    def client_disconnected(self, client: Client) -> None:
        self._authenticated.discard(client.id)

    def socks5_auth(self, data: modes.Socks5AuthData) -> None:
        if self.credentials is not None and self.credentials(data.username, data.password):
            data.valid = True
            self._authenticated.add(data.client_conn.id)
        else:
            self._refused(data.client_conn, "socks5", data.username)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._check(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A plain proxy request (GET http://..., not in a CONNECT tunnel) carries its credentials itself."""
        self._check(flow)

    def _check(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        if self.credentials is None or flow.response is not None or client.id in self._authenticated or \
                not isinstance(client.proxy_mode, mode_specs.RegularMode):
            return
        try:
            _, user, password = parse_http_basic_auth(flow.request.headers.get("proxy-authorization", ""))
        except ValueError:
            user, password = "", None
        if password is not None and self.credentials(user, password):
            self._authenticated.add(client.id)
            del flow.request.headers["proxy-authorization"]        # not passed on to the server
            return
        self._refused(client, "http", user)
        flow.response = make_auth_required_response(is_proxy=True)
        flow.response.headers["Proxy-Authenticate"] = 'Basic realm="imguard"'

    def _refused(self, client: Client, how: str, user: str) -> None:
        self.stats["refused"] += 1
        peer = _hostport(*client.peername[:2]) if client.peername else "-"
        detail = (f"proxy client {peer} gave no valid credentials ({how}"
                  + (f", user {user!r})" if user else ")") + "; refused")
        logger.warning("%s: proxy_auth_failed: %s", peer, detail)
        ctx = ChatContext(client_address=peer, connection_id=client.id)
        self.record(alerts.anomaly_event(ctx, "proxy_auth_failed", detail, proxy=how, user=user))


class ProxyDestinations:
    """The destinations the explicit listeners relay to (see the module docstring). `side_expected(client,
    address)` is the gateway addon's: a side transfer announced for that destination (kept for the layer
    choice that follows)."""

    def __init__(self, mode: str, port_map: dict[int, tuple[str, bool]], http_ports, *,
                 is_relay: Callable[[Client], bool], side_expected: Callable[[Client, tuple], bool],
                 record: Callable[[dict], None]):
        if mode not in DESTINATION_MODES:
            raise ValueError(f"proxy_destinations {mode!r}: expected one of {', '.join(DESTINATION_MODES)}")
        self.mode = mode
        self.chat_ports = {port for port, (protocol, _) in port_map.items() if protocol != "none"}
        self.http_ports = set(http_ports)
        self.is_relay = is_relay
        self.side_expected = side_expected
        self.record = record
        self._tunnels: set[str] = set()        # client ids whose CONNECT was allowed: what runs inside is theirs
        self.stats = {"refused": 0}

    def by_port(self, port: int) -> bool:
        return self.mode == ANY or port in self.chat_ports or port in self.http_ports

    def client_disconnected(self, client: Client) -> None:
        self._tunnels.discard(client.id)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        if flow.response is not None or not is_explicit(client, self.is_relay):
            return
        address = (flow.request.host, flow.request.port)
        if self.by_port(address[1]) or self.side_expected(client, address):
            self._tunnels.add(client.id)
            return
        flow.response = self._refusal(client, address, "CONNECT")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A plain proxy request: allowed by its port, or because the uploads or chat-API addon claimed it (an
        announced upload slot or shared file, a chat API call)."""
        client = flow.client_conn
        if flow.response is not None or client.id in self._tunnels or \
                not isinstance(client.proxy_mode, mode_specs.RegularMode) or self.is_relay(client):
            return
        if flow.request.method == "CONNECT" or self.by_port(flow.request.port):
            return
        if any(key in flow.metadata for key in CLAIMED):
            return
        flow.request.stream = False         # HttpUploads streams what is not its own: a refusal is not streamed
        flow.response = self._refusal(client, (flow.request.host, flow.request.port), flow.request.method)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A SOCKS5 connect: refused here, before the connection is opened (mitmproxy replies 'host
        unreachable' and closes)."""
        client, server = data.client, data.server
        if server.error or server.address is None or not isinstance(client.proxy_mode, mode_specs.Socks5Mode) \
                or self.is_relay(client):
            return
        address = (str(server.address[0]), int(server.address[1]))
        if self.by_port(address[1]) or self.side_expected(client, address):
            return
        self._refusal(client, address, "SOCKS5")
        server.error = f"refused: {_hostport(*address)} is not a chat destination (proxy_destinations chat)"

    def _refusal(self, client: Client, address: tuple, how: str) -> http.Response:
        self.stats["refused"] += 1
        peer = _hostport(*client.peername[:2]) if client.peername else "-"
        target = _hostport(str(address[0]), int(address[1]))
        detail = (f"{how} to {target} refused: not a chat destination (not a port of the port map or an HTTP "
                  "port, and no chat session announced it); --proxy-destinations any lifts this")
        logger.warning("%s: proxy_destination_refused: %s", peer, detail)
        ctx = ChatContext(client_address=peer, server_address=target, connection_id=client.id)
        self.record(alerts.anomaly_event(ctx, "proxy_destination_refused", detail, proxy=how.lower()))
        return http.Response.make(403, f"imguard: {detail}\n".encode(), {"content-type": "text/plain"})
