"""mitmproxy embedded in imguard's process: a Master with a minimal addon chain and imguard's addons first.

    gateway = Gateway(settings, pipeline)       # builds the master, options, addons
    await gateway.start()                       # listeners bound (raises GatewayError if one fails)
    await gateway.wait()                        # until stop() / SIGTERM
    await gateway.stop()

Addon chain, in order (order matters: a hook runs through the chain in this order):
    ProxyAuth      --proxy-auth: credentials of the explicit listeners (407, SOCKS5 auth) before anything else
    PassthroughAddon  --exclude destinations and (fail mode tls=open) clients that refused interception:
                   relayed untouched before GatewayAddon chooses a layer; tls_failed_client alerts (failmode.py)
    GatewayAddon   our next_layer before NextLayer; server_connect (self-connect guard, relay) before
                   Proxyserver's; inspect_file
    HttpUploads    buffer and scan HTTP uploads
    ChatApis       chat over HTTP(S): Matrix, Slack, Mattermost, Rocket.Chat, Discord calls (chat_apis.py)
    ProxyDestinations  --proxy-destinations: where explicit-proxy clients may go; after the two above, which
                   claim the announced uploads and chat calls a plain proxy request may carry (proxy_access.py)
    Core, Proxyserver, NextLayer, TlsConfig      mitmproxy's minimum for proxying (no Dumper, no TermLog,
                   no DnsResolver: no DNS mode; no ErrorCheck: it calls sys.exit, start() reports instead)
    LateTlsAddon   after TlsConfig: per-host no-verify, server TLS first for sessions
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from mitmproxy import options
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import asyncio_utils

from imguard.files.expected import (REFUSE_AUTO, ExpectedTransfers, SharedTransfers, check_upload_refusal,
                                    open_transfers, parse_upload_relays, url_origin)
from imguard.gateway import ca, sdnotify
from imguard.gateway.addon import ConnectionInfo, GatewayAddon, SessionFactory
from imguard.gateway.tls_memory import LateTlsAddon
from imguard.gateway.dcc import DccRelayPorts, parse_port_range
from imguard.protocols.detect import parse_port_map
from imguard.gateway.failmode import DOWNGRADE, PARSE, STORE, FailModes, PassthroughAddon
from imguard.gateway.http_uploads import HttpUploads
from imguard.gateway.shared_notices import SharedNoticeRouter
from imguard.gateway.chat_apis import ChatApis
from imguard.gateway.inspection import Inspection
from imguard.gateway.proxy_access import ProxyAuth, ProxyDestinations
from imguard.gateway.settings import GatewaySettings
from imguard.protocols import registry

logger = logging.getLogger("imguard.gateway")


class GatewayError(Exception):
    """The gateway cannot start with this configuration (message says why)."""


class GatewayMaster(Master):
    def __init__(self, opts: options.Options, first: list, last: list):
        super().__init__(opts, with_termlog=False)
        self.addons.add(*first)
        self.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig())
        self.addons.add(*last)


def parse_hostport(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise GatewayError(f"bytestream_relay {value!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


AUTO = "auto"
OFF = ("", "none")
AUTO_BYTESTREAM_PORT = 1080         # the bytestream relay's port with --bytestream-relay auto (socks5's own port)


def side_relays(settings: GatewaySettings, modes: list) -> tuple[tuple[str, int] | None, str, list[str]]:
    """(bytestream relay HOST:PORT or None, side relay host (DCC, MSNFTP, OFT offers) or '', listeners to add
    for them) from the settings.

    'auto' turns a relay on in transparent mode only, at --listen-host (the gateway's address on the users'
    network: where the transparent listener already listens, so one setting places all three); ''/'none' turns
    it off. In transparent mode the bytestream relay's socks5 listener is opened here when --mode has none on
    its port; elsewhere it must be one of the --mode listeners (as before: a reverse or explicit proxy names
    its own listeners)."""
    transparent = any(isinstance(m, mode_specs.TransparentMode) for m in modes)
    values = {}
    for name in ("bytestream_relay", "dcc_relay"):
        value = str(getattr(settings, name) or "").strip()
        if value.lower() in OFF or (value.lower() == AUTO and not transparent):
            value = ""
        elif value.lower() == AUTO:
            host = settings.listen_host.strip("[]")
            if host in ("", "0.0.0.0", "::"):
                raise GatewayError(f"{name} auto: --listen-host {settings.listen_host!r} is not one address; give "
                                   f"the gateway's address on the users' network (the relays are announced there), "
                                   f"or set --{name.replace('_', '-')} yourself ('none' turns it off)")
            value = host if name == "dcc_relay" else f"{host}:{AUTO_BYTESTREAM_PORT}"
        values[name] = value
    relay = parse_hostport(values["bytestream_relay"])
    extra: list[str] = []
    if relay is not None:
        socks5 = [m for m in modes if isinstance(m, mode_specs.Socks5Mode)]
        if transparent and not any(m.listen_port() == relay[1] for m in socks5):
            extra.append(f"socks5@{relay[1]}")
        elif not transparent and not socks5:
            raise GatewayError(f"bytestream_relay {values['bytestream_relay']} needs a socks5 listener "
                               f"(e.g. --mode socks5@{relay[1]})")
    return relay, values["dcc_relay"], extra


def default_factories(pipeline, transfers, relay: tuple[str, int] | None = None, dcc_relay: Any = None,
                      irc_limits: Any = None, xmpp_limits: Any = None,
                      limits: Iterable[Any] = (),
                      downgrade_fail_open: Callable[[str], bool] = lambda protocol: False
                      ) -> dict[str, SessionFactory]:
    """The sessions of every protocol in the registry (imguard.protocols.registry): protocol name ->
    factory(ConnectionInfo) -> StreamSession, each a registry.build with the gateway's state. `relay` is the
    XMPP bytestream relay, `dcc_relay` the side relay (a DccRelay: IRC, MSNP and OSCAR sessions rewrite their
    DCC, MSNFTP and OFT offers to its ports; None: offers not rewritten); `limits` are
    limits instances (IrcLimits, MsnpLimits, ...; irc_limits/xmpp_limits the same, by name), any class not
    given keeps its defaults."""
    by_class = {type(given): given for given in (*limits, irc_limits, xmpp_limits) if given is not None}

    def factory(protocol: str) -> SessionFactory:
        def build(info: ConnectionInfo):
            return registry.build(registry.SessionRequest(
                protocol, info.context, tls_on_connect=info.tls_on_connect, checker=pipeline, transfers=transfers,
                limits=by_class, expected=info.offer, bytestream_relay=relay, dcc_relay=dcc_relay,
                stream_hash=info.hash, streamhost=info.streamhost,
                downgrade_fail_open=downgrade_fail_open(protocol), listener=info.listener))
        return build
    return {name: factory(name) for name in registry.PROTOCOLS}


def check_upload_relays(entries, modes: list[mode_specs.ProxyMode]) -> set[int]:
    """Each XMPP upload relay (PUBLIC=UPSTREAM) needs a reverse listener on PUBLIC's port whose upstream is
    UPSTREAM (`--mode reverse:UPSTREAM@PORT`): else the client would be sent to a port nothing serves. Returns
    the relays' ports."""
    try:
        relays = parse_upload_relays(entries)
    except ValueError as e:
        raise GatewayError(str(e)) from None
    listeners = {(m.custom_listen_port, f"{m.scheme}://{m.address[0]}:{m.address[1]}".lower())
                 for m in modes if isinstance(m, mode_specs.ReverseMode)}
    for upstream, public in relays.items():
        port = int(public.rsplit(":", 1)[1])
        if not any(p == port and url_origin(u) == upstream for p, u in listeners):
            raise GatewayError(f"xmpp_upload_relay {public}={upstream} needs a reverse listener in front of the upload "
                               f"service: --mode reverse:{upstream}@{port}")
    return {int(public.rsplit(":", 1)[1]) for public in relays.values()}


def default_transfers(settings: GatewaySettings | None = None, data_dir: Path | None = None):
    """The expected-transfers table of the `transfer_store` setting (imguard.files.expected.open_transfers)."""
    if settings is None:
        return ExpectedTransfers()
    return open_transfers(settings.transfer_store, data_dir, timeout=settings.transfer_store_timeout)


class Gateway:
    def __init__(self, settings: GatewaySettings, pipeline, *, data_dir: Path,
                 factories: dict[str, SessionFactory] | None = None, transfers: Any = "default",
                 irc_limits: Any = None, xmpp_limits: Any = None, chat_settings: Any = None,
                 session_limits: Iterable[Any] = ()):
        self.settings = settings
        self.pipeline = pipeline
        self.data_dir = Path(data_dir)
        try:
            self.modes = [mode_specs.ProxyMode.parse(m) for m in settings.mode]
            port_map = parse_port_map(settings.ports)
            http_ports = {int(p) for p in settings.http_ports}
        except ValueError as e:
            raise GatewayError(str(e)) from None
        if not self.modes:
            raise GatewayError("no --mode given: the gateway would not listen anywhere")
        # The side-channel relays ('auto': on in transparent mode, at --listen-host) and their listeners.
        self.relay, dcc_host, self.relay_modes = side_relays(settings, self.modes)
        # An upload relay's port is an HTTP port: a proxied client's CONNECT to it is intercepted and its PUT scanned.
        http_ports |= check_upload_relays(getattr(xmpp_limits, "upload_relay", ()), self.modes)
        try:
            for name in ("upload_refuse_unrelayed", "upload_relay_links"):
                check_upload_refusal(getattr(xmpp_limits, name, REFUSE_AUTO), name)
        except ValueError as e:
            raise GatewayError(f"xmpp_{e}") from None
        try:
            self.transfers = default_transfers(settings, self.data_dir) if transfers == "default" else transfers
        except ValueError as e:
            raise GatewayError(str(e)) from None
        self.dcc_ports: DccRelayPorts | None = None
        dcc_relay = None
        if dcc_host:
            try:
                self.dcc_ports = DccRelayPorts(dcc_host, parse_port_range(settings.dcc_relay_ports),
                                               self.transfers)
            except ValueError as e:
                raise GatewayError(str(e)) from None
            from imguard.protocols.irc import DccRelay
            # One relay for every "connect to the offered address" mechanism: DCC, MSNFTP, OFT (gateway/dcc.py).
            dcc_relay = DccRelay(self.dcc_ports.host, self.dcc_ports.allocate)
        try:
            self.fail_modes = FailModes.parse(settings.fail_mode)
        except ValueError as e:
            raise GatewayError(str(e)) from None
        self.inspection = Inspection(pipeline, settings.inspect_workers, settings.inspect_queue,
                                     fail_modes=self.fail_modes, timeout=settings.inspect_timeout,
                                     notice_after=settings.scan_notice_after_seconds)
        if factories is None:
            factories = default_factories(pipeline, self.transfers, self.relay, dcc_relay=dcc_relay,
                                          irc_limits=irc_limits, xmpp_limits=xmpp_limits, limits=session_limits,
                                          downgrade_fail_open=lambda proto: self.fail_modes.is_open(proto, DOWNGRADE))
        self.addon = GatewayAddon(pipeline=pipeline, inspection=self.inspection, factories=factories,
                                  port_map=port_map, http_ports=http_ports, transfers=self.transfers,
                                  bytestream_relay=self.relay, max_queued_bytes=settings.max_queued_bytes,
                                  max_total_queued_bytes=settings.max_total_queued_bytes,
                                  parse_fail_open=lambda protocol: self.fail_modes.is_open(protocol, PARSE),
                                  quick_ack=settings.quick_ack, dcc_ports=self.dcc_ports)
        self.inspection.notify = self.addon.notify_command      # "being scanned" notices of slow scans
        if isinstance(self.transfers, SharedTransfers):     # notices for chat connections other workers hold
            self.addon.notices = SharedNoticeRouter(self.transfers)
        self.uploads = HttpUploads(self.inspection, self.transfers, settings.upload_paths, settings.max_upload_size,
                                   notify=self.addon.notify_command, record=self.addon.record,
                                   store_fail_open=lambda: self.fail_modes.is_open("http", STORE))
        try:
            self.chat_apis = ChatApis(pipeline, self.inspection, self.transfers, chat_settings, self.addon.record,
                                      self.addon.commit,
                                      parse_fail_open=lambda: self.fail_modes.is_open("http", PARSE))
        except ValueError as e:
            raise GatewayError(str(e)) from None
        try:    # who may use the explicit proxy listeners, and to reach what (proxy_access.py)
            self.proxy_destinations = ProxyDestinations(settings.proxy_destinations, port_map, http_ports,
                                                        is_relay=self.addon.is_relay,
                                                        side_expected=self.addon.side_expected,
                                                        record=self.addon.record)
        except ValueError as e:
            raise GatewayError(str(e)) from None
        self.proxy_auth = ProxyAuth(self.addon.is_relay, self.addon.record, self.addon.find_relay_mode)
        self.late = LateTlsAddon(settings.no_verify_upstream)
        self.passthrough = PassthroughAddon(settings.exclude, self.fail_modes)     # --exclude, fail mode tls=open
        self.passthrough.port_map, self.passthrough.recorder = port_map, self.addon.record
        self.master: GatewayMaster | None = None
        self._stack = contextlib.ExitStack()

    def _options(self) -> dict[str, Any]:
        s = self.settings
        ca_dir = ca.ca_dir(self.data_dir)
        ca.ensure_ca(ca_dir)
        opts: dict[str, Any] = dict(
            mode=list(s.mode) + self.relay_modes + (self.dcc_ports.specs() if self.dcc_ports else []),    # + relays
            listen_host=s.listen_host, confdir=str(ca_dir), tcp_timeout=int(s.tcp_timeout),
            connection_strategy="eager",    # server greetings seen; STARTTLS's server handshake happens first
            rawtcp=True, ssl_insecure=False,
            keep_host_header=True,          # reverse mode: upload URLs keep the host the chat server announced
            proxyauth=s.proxy_auth or None,     # ProxyAuth: credentials of the explicit listeners
        )
        if s.upstream_ca:
            if not Path(s.upstream_ca).is_file():
                raise GatewayError(f"upstream_ca {s.upstream_ca}: no such file")
            opts["ssl_verify_upstream_trusted_ca"] = str(s.upstream_ca)
        return opts

    async def start(self) -> None:
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)
        opts = options.Options()
        self.master = GatewayMaster(opts, [self.proxy_auth, self.passthrough, self.addon, self.inspection, self.uploads,
                                           self.chat_apis, self.proxy_destinations], [self.late])
        # Certificates are only ever signed with imguard's own CA: the mitmproxy 12.3 wheel has options to sign
        # with a third party's leaked intermediate (`emudhra`, `emudhra_old`); they stay off whatever their
        # default becomes.
        for unsafe in ("emudhra", "emudhra_old"):
            if unsafe in opts:
                opts.update(**{unsafe: False})
        try:
            opts.update(**self._options())      # after addons.add: addon options exist only then
        except GatewayError:
            raise
        except Exception as e:
            raise GatewayError(f"invalid gateway options: {e}") from None
        self._stack.enter_context(asyncio_utils.install_exception_handler(self.master._asyncio_exception_handler))
        self._stack.enter_context(asyncio_utils.set_eager_task_factory())
        ps = self.master.addons.get("proxyserver")
        ok = await ps.setup_servers()
        failed = [f"{i.mode.full_spec}: {i.last_exception}" for i in ps.servers if i.last_exception]
        if not ok or failed:
            await self._teardown()
            raise GatewayError("cannot listen: " + "; ".join(failed or ["see the log"]))
        await self.master.running()
        sdnotify.ready(f"{len(self.listen_addrs)} listeners bound")     # systemd Type=notify: started

    @property
    def listen_addrs(self) -> list[tuple[str, tuple]]:
        """(mode spec, address) for each bound listener."""
        ps = self.master.addons.get("proxyserver")
        return [(i.mode.full_spec, addr) for i in ps.servers for addr in i.listen_addrs]

    def port_of(self, spec_prefix: str) -> int:
        for spec, addr in self.listen_addrs:
            if spec.startswith(spec_prefix):
                return addr[1]
        raise KeyError(spec_prefix)

    async def wait(self) -> None:
        await self.master.should_exit.wait()

    def shutdown(self) -> None:
        """Thread-safe and signal-safe: ask the gateway to stop."""
        if self.master is not None:
            self.master.shutdown()

    async def _teardown(self) -> None:
        ps = self.master.addons.get("proxyserver")
        with contextlib.suppress(Exception):
            await ps.servers.update([])
        self._stack.close()

    async def stop(self) -> None:
        if self.master is None:
            return
        sdnotify.stopping()
        await self._teardown()
        ps = self.master.addons.get("proxyserver")
        for handler in list(ps.connections.values()):     # close live connections: a clean exit
            with contextlib.suppress(Exception):
                for io in list(handler.transports.values()):
                    if io.handler is not None:
                        io.handler.cancel()
        with contextlib.suppress(Exception):
            await self.master.done()
        self.inspection.close()
        self.master = None
