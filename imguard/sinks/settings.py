"""Where events go: the settings of every sink, the queue in front of them and the duplicate filter."""

from __future__ import annotations

import dataclasses

from imguard.settings import MiB, setting


@dataclasses.dataclass(frozen=True)
class SinkSettings:
    """event sinks"""

    instance: str = setting("", "This gateway's name in every event (observer.name), to tell gateways apart "
                                "in a shared SIEM or archive ('' = the host name).")
    jsonl_max_bytes: int = setting(100 * MiB, "Size at which alerts.jsonl is rotated to alerts.jsonl.1 (0: never). "
                                              "A line is never split across two files.")
    jsonl_backups: int = setting(10, "Rotated alerts.jsonl.N files kept; the oldest is deleted.")
    jsonl_allowed_messages: bool = setting(True, "Write a line to alerts.jsonl for every allowed chat message "
                                                 "that no rule matched, not even a shadow rule. Off: the archive keeps "
                                                 "them, the metrics count them, and a message costs about a tenth "
                                                 "less CPU; alerts and every message a rule matched are still "
                                                 "written.")
    syslog_address: str = setting("", "Send events to syslog (RFC 5424) at udp://host:port, tcp://host:port "
                                      "(octet-counting framing, RFC 6587), tls://host:port (RFC 5425: the same over "
                                      "TLS, the receiver's certificate verified) or unix:///path ('' = off).")
    syslog_ca_file: str = setting("", "PEM file of the CA certificates that verify a tls:// syslog receiver's "
                                      "certificate, e.g. an internal CA ('' = the system's CAs).")
    syslog_facility: str = setting("local0", "Syslog facility name (kern, user, daemon, auth, local0..local7).")
    syslog_max_bytes: int = setting(8096, "Longest syslog record, in bytes (rsyslog takes 8096 by default, its "
                                          "maxMessageSize of 8k, and cuts a longer one: over TCP the rest arrives as "
                                          "a record of its own). A longer event is made to fit: its inspection "
                                          "report dropped, then its text trimmed (imguard.truncated); alerts.jsonl "
                                          "has it whole. 0 = no limit (UDP: 60000).")
    syslog_min_severity: str = setting("", "Only events at or above this severity go to syslog ('' = every "
                                           "event, allowed messages included).")
    webhook_url: str = setting("", "POST each alert as JSON to this http:// or https:// URL ('' = off).")
    webhook_timeout: float = setting(10.0, "Seconds to wait for the webhook to answer; a slower answer counts as a "
                                           "failure and the alert is retried, flagged as a possible duplicate.")
    webhook_all_events: bool = setting(False, "Also POST plain events (allowed messages), not only alerts.")
    email_smtp: str = setting("", "SMTP server host:port for alert mails ('' = off).")
    email_from: str = setting("imguard@localhost", "Sender address of alert mails.")
    email_to: list = setting([], "Recipients of alert mails (repeat the option for several).")
    email_min_severity: str = setting("high", "Only alerts at or above this severity are mailed "
                                              "(info, low, medium, high, critical).")
    email_starttls: bool = setting(False, "Use STARTTLS with the SMTP server; its certificate must verify (against "
                                          "the system's CAs or email_ca_file) and name the email_smtp host, or no "
                                          "mail is sent to it.")
    email_ca_file: str = setting("", "PEM file of the CA certificates that verify the SMTP server's certificate "
                                     "under STARTTLS, e.g. an internal CA ('' = the system's CAs).")
    dedup_window_seconds: float = setting(60.0, "Identical alerts (same rule, sender and file hash or text hash) "
                                                "within this many seconds are suppressed; the next one sent "
                                                "carries imguard.suppressed_count (0 = off).")
    queue_max_bytes: int = setting(64 * MiB, "On-disk queue per remote sink, for events it has not accepted yet. "
                                             "When full, that sink's oldest events are dropped (counted, with an "
                                             "anomaly); the local alerts.jsonl keeps them.")
    retry_max_seconds: float = setting(30.0, "Longest wait between two delivery attempts to a sink that is down "
                                             "(the wait doubles from half a second up to this).")

    def remote_sinks(self) -> list[str]:
        """Names of the remote sinks these settings turn on."""
        names = []
        if self.syslog_address:
            names.append("syslog")
        if self.webhook_url:
            names.append("webhook")
        if self.email_smtp and self.email_to:
            names.append("email")
        return names
