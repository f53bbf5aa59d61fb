"""Where events go: the local JSON-lines file, syslog, a webhook and mail, each remote sink behind a
durable on-disk queue so that a sink that is down neither blocks traffic nor loses alerts.

    bus = build_sinks(SinkSettings(...), data_dir, instance="gw1", metrics=metrics)
    bus.write(event)        # what AlertLog.write does, plus the remote sinks
    bus.close()

See imguard/sinks/bus.py for the delivery guarantees and docs/events.md for the events themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imguard.alerts import AlertLog
from imguard.sinks.base import DeliveryError, Sink
from imguard.sinks.bus import EventBus
from imguard.sinks.mail import EmailSink
from imguard.sinks.settings import SinkSettings
from imguard.sinks.syslog import SyslogSink
from imguard.sinks.webhook import WebhookSink

__all__ = ["DeliveryError", "EmailSink", "EventBus", "Sink", "SinkSettings", "SyslogSink", "WebhookSink",
           "build_sinks", "check_settings"]


def make_sinks(settings: SinkSettings) -> list[Sink]:
    """The remote sinks the settings turn on. Raises ValueError naming the bad setting."""
    sinks: list[Sink] = []
    if settings.syslog_address:
        sinks.append(SyslogSink(settings.syslog_address, settings.syslog_facility, settings.syslog_min_severity,
                                max_bytes=settings.syslog_max_bytes, ca_file=settings.syslog_ca_file))
    if settings.webhook_url:
        sinks.append(WebhookSink(settings.webhook_url, settings.webhook_timeout, settings.webhook_all_events))
    if settings.email_smtp:
        sinks.append(EmailSink(settings.email_smtp, settings.email_from, list(settings.email_to),
                               settings.email_min_severity, settings.email_starttls,
                               ca_file=settings.email_ca_file))
    return sinks


def check_settings(settings: SinkSettings) -> list[str]:
    """Every problem with the sink settings, as `setting: message` lines (empty when usable)."""
    from imguard.model import SEVERITIES
    errors = []
    try:
        make_sinks(settings)
    except ValueError as e:
        errors.append(str(e))
    for name in ("email_min_severity", "syslog_min_severity"):
        value = getattr(settings, name)
        if value and value not in SEVERITIES:
            errors.append(f"{name}: {value!r} is not one of {', '.join(SEVERITIES)}")
    for name in ("jsonl_max_bytes", "jsonl_backups", "queue_max_bytes", "syslog_max_bytes"):
        if getattr(settings, name) < 0:
            errors.append(f"{name}: must not be negative")
    if settings.queue_max_bytes and settings.queue_max_bytes < 4096:
        errors.append("queue_max_bytes: at least 4096 bytes, or one alert would not fit")
    if 0 < settings.syslog_max_bytes < 480:
        errors.append("syslog_max_bytes: at least 480 bytes (RFC 5424 6.1), or 0 for no limit")
    if settings.email_ca_file and not settings.email_starttls:
        errors.append("email_ca_file: only used with email_starttls (turn it on, or the mail goes in clear text)")
    if settings.webhook_timeout <= 0:
        errors.append("webhook_timeout: must be more than 0 seconds")
    return errors


def build_sinks(settings: SinkSettings | None, data_dir: Path, instance: str = "", metrics: Any = None,
                alerts_path: Path | None = None, plain_flush_seconds: float = 0.0) -> EventBus:
    """The event bus for a gateway: data_dir/alerts.jsonl (rotated by size), plus each remote sink the
    settings turn on, with its queue in data_dir/queue/<sink>/ (or the next free slot, <sink>-1, ..., when
    another worker holds it). `instance` (else settings.instance, else the host name) names the gateway in
    observer.name. Raises ValueError on bad settings."""
    settings = settings or SinkSettings()
    errors = check_settings(settings)
    if errors:
        raise ValueError("; ".join(errors))
    data_dir = Path(data_dir)
    local = AlertLog(alerts_path or data_dir / "alerts.jsonl", instance=instance or settings.instance,
                     max_bytes=settings.jsonl_max_bytes, backups=settings.jsonl_backups,
                     plain_flush_seconds=plain_flush_seconds, allowed_messages=settings.jsonl_allowed_messages)
    try:
        return EventBus(local, make_sinks(settings), queue_dir=data_dir / "queue",
                        queue_max_bytes=settings.queue_max_bytes, dedup_window=settings.dedup_window_seconds,
                        retry_max=settings.retry_max_seconds, metrics=metrics)
    except BaseException:
        local.close()
        raise
