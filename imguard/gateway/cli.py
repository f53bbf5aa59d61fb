"""`imguard run` and `imguard ca`: the functions imguard/cli.py calls.

    add_run_arguments(parser); run_main(args) -> exit code
    add_ca_arguments(parser);  ca_main(args)  -> exit code
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from imguard import settings as settings_mod
from imguard.gateway import ca
from imguard.gateway.settings import GatewaySettings

logger = logging.getLogger("imguard.gateway")

LIST_INT_FIELDS = ("http_ports",)


def _data_dir(value: str | None) -> Path:
    if value:
        return Path(value).expanduser()
    from imguard.runtime import default_data_dir
    return default_data_dir()


def session_limits() -> list[tuple[str, str, type]]:
    """(key, title, settings class) of every per-connection limits class: each protocol's, from the registry (one
    table for the gateway, the replay and these options), then the chat APIs'. The key is the protocol's name and
    the option prefix (settings.option_prefix)."""
    from imguard.gateway.chat_apis import ChatApiSettings
    from imguard.protocols import registry
    return [(name, title, cls) for name, cls, title in registry.limits_classes()] + [
        ("chat", "Chat APIs over HTTP(S): Matrix, Slack, Mattermost, Rocket.Chat, Discord", ChatApiSettings)]


# Where decisions go: alert sinks, the archive, the quarantine and the metrics endpoint (unprefixed:
# their names are their own).
RECORD_SETTINGS = (("event sinks: the local JSON-lines log, syslog, webhook, email",
                    "imguard.sinks.settings:SinkSettings"),
                   ("conversation archive", "imguard.archive:ArchiveSettings"),
                   ("quarantine of blocked files", "imguard.quarantine:QuarantineSettings"),
                   ("file store and retro-hunt", "imguard.filestore:FileStoreSettings"),
                   ("Prometheus metrics", "imguard.metrics:MetricsSettings"),
                   ("files held for inspection, all connections together", "imguard.files.tracker:HoldSettings"),
                   ("YARA signature sets", "imguard.inspect.signatures:SignatureSettings"),
                   ("conversation controls (XMPP, IRC): warn and continue",
                    "imguard.conversation:ConversationSettings"),
                   ("released files sent into the chat", "imguard.releases:DeliverySettings"))


def _limits_class(path: str) -> type:
    import importlib
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    settings_mod.add_arguments(parser, GatewaySettings)
    from imguard.inspect import InspectLimits
    settings_mod.add_arguments(parser, InspectLimits, "inspection limits (as for `imguard scan`)")
    for key, title, cls in session_limits():
        settings_mod.add_arguments(parser, cls, title, prefix=settings_mod.option_prefix(key, cls))
    for title, path in RECORD_SETTINGS:
        settings_mod.add_arguments(parser, _limits_class(path), title)
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="imguard's own log level (mitmproxy's log stays at WARNING)")


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    overrides = {}
    for name in LIST_INT_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = [int(p) for item in value for p in str(item).split(",") if p.strip()]
    if getattr(args, "ports", None):
        # --ports adds to (or overrides, port by port) the default map; PORT=none relays a port untouched.
        overrides["ports"] = list(GatewaySettings().ports) + list(args.ports)
    return settings_mod.from_arguments(GatewaySettings, args, **overrides)


def limits_from_args(args: argparse.Namespace) -> dict[str, object]:
    """{"inspect": InspectLimits, "irc": IrcLimits, "xmpp": XmppLimits, "msnp": MsnpLimits, ...} from the parsed
    options (one entry per session_limits() key)."""
    from imguard.inspect import InspectLimits
    limits: dict[str, object] = {"inspect": settings_mod.from_arguments(InspectLimits, args)}
    for key, _, cls in session_limits():
        limits[key] = settings_mod.from_arguments(cls, args, prefix=settings_mod.option_prefix(key, cls))
    for _, path in RECORD_SETTINGS:
        cls = _limits_class(path)
        limits[cls.__name__] = settings_mod.from_arguments(cls, args)
    return limits


def _bundled(name: str) -> Path:
    from imguard.runtime import bundled
    return bundled(name)        # an installed wheel's copy, or the checkout's folder


def describe_start(gateway, alerts_path: Path) -> str:
    lines = ["imguard gateway running"]
    dcc = getattr(gateway, "dcc_ports", None)
    for spec, addr in gateway.listen_addrs:
        if dcc is not None and spec in dcc.specs():
            continue        # the DCC relay pool: one line below
        lines.append(f"  listening   {addr[0] or '*'}:{addr[1]}  ({spec})")
    protos = sorted(gateway.addon.factories)
    ports = ", ".join(f"{p}={proto}{'+tls' if tls else ''}"
                      for p, (proto, tls) in sorted(gateway.addon.port_map.items()))
    lines.append(f"  inspecting  {', '.join(protos) or 'no chat protocol (modules missing)'}; ports {ports}")
    lines.append(f"  uploads     HTTP(S) PUT/POST announced by chat sessions"
                 f"{' + ' + ', '.join(gateway.settings.upload_paths) if gateway.settings.upload_paths else ''}"
                 f" (max {gateway.settings.max_upload_size} bytes)")
    chat_apis = getattr(gateway, "chat_apis", None)
    if chat_apis is not None:
        apis = sorted({str(route).partition("=")[0] for route in chat_apis.settings.routes})
        lines.append(f"  chat APIs   {', '.join(apis)} over HTTP(S), by path on any host (--chat-routes)")
    if gateway.relay:
        lines.append(f"  bytestreams SOCKS5 streamhosts rewritten to {gateway.relay[0]}:{gateway.relay[1]}")
    if dcc is not None:
        lines.append(f"  dcc relay   IRC DCC offers rewritten to {dcc.host}, "
                     f"ports {dcc.ports.start}-{dcc.ports.stop - 1}")
    lines.append(f"  CA          {ca.ca_dir(gateway.data_dir)} (export with `imguard ca`)")
    lines.append(f"  alerts      {alerts_path}")
    lines.append("  everything else is relayed untouched")
    return "\n".join(lines)


async def _quarantine_retention(pipeline, every: float = 3600.0) -> None:
    """Apply the archive's retention rules and the quarantine's age and size limits, sparing legal holds
    (imguard/archive_audit.py housekeeping), at start and then hourly, off the event loop."""
    from imguard.archive_audit import housekeeping
    if getattr(pipeline, "quarantine", None) is None and getattr(pipeline, "archive", None) is None:
        return
    loop = asyncio.get_running_loop()
    while True:
        try:
            result = await loop.run_in_executor(None, housekeeping, pipeline)
            if getattr(pipeline, "filestore", None) is not None:      # age limit of kept files, without traffic too
                await loop.run_in_executor(None, pipeline.filestore.apply_retention)
            if result is not None and (result.deleted or result.files_deleted):
                logger.info("retention removed %d records and %d quarantined files", result.deleted,
                            result.files_deleted)
        except OSError as e:
            logger.warning("quarantine retention failed: %s", e)
        await asyncio.sleep(every)


async def _serve(gateway, alerts_path: Path) -> int:
    from imguard.gateway.master import GatewayError
    loop = asyncio.get_running_loop()
    # The handlers go in before the listeners open: a SIGTERM that arrives while the gateway starts (a
    # service manager, a test that saw the port) is a clean stop, not a kill.
    stop_requested = asyncio.Event()

    def request_stop() -> None:
        stop_requested.set()
        gateway.shutdown()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, request_stop)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await gateway.start()
    except GatewayError as e:
        print(f"imguard: {e}", file=sys.stderr)
        return 2
    if stop_requested.is_set():
        gateway.shutdown()          # asked before the master existed
    print(describe_start(gateway, alerts_path), flush=True)
    reloader = getattr(gateway, "reloader", None)       # imguard.reload.PolicyReloader: SIGHUP and file changes
    watcher = None
    if reloader is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
        interval = gateway.settings.reload_interval
        print(f"  reload      rules and signatures on SIGHUP"
              f"{f' and when their files change (checked every {interval:g} s)' if interval > 0 else ''}", flush=True)
        watcher = asyncio.create_task(reloader.watch(interval), name="imguard reload watch")
    if getattr(gateway, "fail_modes", None) is not None:
        print(f"  fail modes  {gateway.fail_modes.describe()}", flush=True)
    retention = asyncio.create_task(_quarantine_retention(gateway.pipeline), name="imguard quarantine retention")
    releases = getattr(gateway, "releases", None)       # imguard.releases.ReleaseDelivery: links into the chat
    deliveries = asyncio.create_task(releases.run(), name="imguard release delivery") if releases else None
    try:
        await gateway.wait()
    finally:
        retention.cancel()
        if deliveries is not None:
            deliveries.cancel()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
        await gateway.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
    print("imguard gateway stopped", flush=True)
    return 0


def run_main(args: argparse.Namespace) -> int:
    from imguard.gateway import sdnotify
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "INFO") or "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sdnotify.journal_logging()      # under systemd: priorities journald understands, its own timestamps
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    try:
        s = settings_from_args(args)
        limits = limits_from_args(args)
    except (TypeError, ValueError) as e:
        print(f"imguard: {e}", file=sys.stderr)
        return 2
    data_dir = _data_dir(s.data_dir)
    rules = [Path(r) for r in s.rules] if s.rules else [_bundled("rules")]
    signatures = Path(s.signatures) if s.signatures else _bundled("signatures")
    from imguard.files import tracker
    tracker.LEDGER.max_bytes = limits["HoldSettings"].max_total_held_bytes
    from imguard import metrics as metrics_mod, runtime
    metrics = metrics_mod.Metrics()
    try:
        metrics_server = metrics_mod.serve(metrics, limits["MetricsSettings"].metrics_listen)
    except (OSError, ValueError) as e:
        print(f"imguard: metrics_listen: {e}", file=sys.stderr)
        return 2
    try:
        pipeline = runtime.build_pipeline(rules, signatures, data_dir, limits=limits["inspect"],
                                          sink_settings=limits["SinkSettings"],
                                          archive_settings=limits["ArchiveSettings"],
                                          quarantine_settings=limits["QuarantineSettings"], metrics=metrics,
                                          filestore_settings=limits["FileStoreSettings"],
                                          signature_settings=limits["SignatureSettings"],
                                          plain_flush_seconds=0.2)
    except (runtime.ConfigError, OSError, ValueError) as e:
        print("imguard: the configuration cannot be used:", file=sys.stderr)
        for err in getattr(e, "errors", None) or [str(e)]:
            print(f"  {err}", file=sys.stderr)
        if metrics_server is not None:
            metrics_server.close()
        return 2
    try:
        pipeline.start_disclaimers(limits["ConversationSettings"])     # with the archive's memory of them
        return _run_gateway(s, limits, pipeline, metrics, metrics_server, data_dir, rules, signatures)
    finally:
        # Undelivered events stay queued on disk for the next start; the archive writer finishes its batch.
        pipeline.close()
        if metrics_server is not None:
            metrics_server.close()


def _run_gateway(s, limits, pipeline, metrics, metrics_server, data_dir: Path, rules: list[Path],
                 signatures: Path) -> int:
    from imguard.gateway.master import Gateway, GatewayError
    try:
        gateway = Gateway(s, pipeline, data_dir=data_dir, irc_limits=limits["irc"], xmpp_limits=limits["xmpp"],
                          chat_settings=limits["chat"],
                          session_limits=[limits[key] for key, _, _ in session_limits() if key != "chat"]
                          + [limits["ConversationSettings"]])
    except GatewayError as e:
        print(f"imguard: {e}", file=sys.stderr)
        return 2
    gateway.addon.metrics = metrics
    from imguard.releases import Outbox, ReleaseDelivery
    gateway.releases = ReleaseDelivery(Outbox(data_dir / "releases"), gateway.addon.notices, gateway.addon.record,
                                       limits["DeliverySettings"])
    if metrics_server is not None:
        print(f"  metrics     http://{metrics_server.address[0]}:{metrics_server.address[1]}/metrics", flush=True)
    from imguard.reload import PolicyReloader
    gateway.reloader = PolicyReloader(pipeline, rules, signatures, data_dir,
                                      signature_settings=limits["SignatureSettings"])
    return asyncio.run(_serve(gateway, data_dir / "alerts.jsonl"))


def add_ca_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="", help="imguard's data folder (default: $IMGUARD_DATA_DIR, "
                        "$XDG_DATA_HOME/imguard or ~/.local/share/imguard); the CA lives in its ca/ folder")
    parser.add_argument("--export", metavar="PATH", nargs="?", const="-", default="",
                        help="write the CA certificate to PATH (DER for .der/.cer, PEM otherwise); without PATH "
                             "or with '-', PEM on stdout. Install it in the chat clients' trust store")


def ca_main(args: argparse.Namespace) -> int:
    from imguard.runtime import ensure_data_dir
    directory = ca.ca_dir(ensure_data_dir(_data_dir(getattr(args, "data_dir", ""))))
    if getattr(args, "export", "") and args.export != "-":
        path = ca.export(directory, Path(args.export))
        cert = ca.ca_certificate(directory)
        print(f"wrote {path} ({cert.subject.rfc4514_string()})")
        return 0
    sys.stdout.write(ca.ensure_ca(directory).read_text())
    return 0
