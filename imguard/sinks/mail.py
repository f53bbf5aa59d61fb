"""Alert mail: one message per alert at or above `email_min_severity`, through an SMTP server.

The subject is built from the rule, action and file or sender, with every control character turned
into a space (no header injection from a file name); the body is a short summary followed by the
event's JSON. `Message-ID` is derived from `event.id`, so a re-delivered alert has the same one and mail
clients thread or drop it; a possible duplicate also says so in `X-Imguard-Possible-Duplicate`.

With `email_starttls` the server's certificate is verified before any mail is sent (the mails carry message
text): it must chain to the system's CAs, or to `email_ca_file` when that names a PEM file, and name the host
of `email_smtp`. A server that fails the check gets nothing; the sink reports itself down and keeps the mail
queued, as for any other delivery failure.
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from imguard.alerts import severity_of
from imguard.sinks.base import DeliveryError, Sink, at_least, one_line


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return value.strip("[]"), 25
    return host.strip("[]"), int(port)


def build_message(event: dict[str, Any], sender: str, recipients: list[str]) -> EmailMessage:
    ev = event.get("event", {})
    ig = event.get("imguard", {})
    rules = event.get("rule", {}).get("id", "")
    rules = ", ".join(rules) if isinstance(rules, list) else rules
    what = (event.get("file", {}).get("name") or ig.get("anomaly", {}).get("kind")
            or ig.get("sink", {}).get("kind") or ev.get("dataset", ""))
    who = event.get("source", {}).get("user", {}).get("name", "")
    subject = f"[imguard] {severity_of(event) or 'alert'} {ev.get('action', '')}: {rules or what}"
    if who:
        subject += f" from {who}"
    if ig.get("suppressed_count"):
        subject += f" (+{ig['suppressed_count']} more)"
    msg = EmailMessage()
    msg["Subject"] = one_line(subject, 200)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    event_id = "".join(c for c in str(ev.get("id", "")) if c.isalnum())
    if event_id:
        msg["Message-ID"] = f"<{event_id}@imguard>"
        msg["X-Imguard-Event-Id"] = event_id
    if ig.get("possible_duplicate"):
        msg["X-Imguard-Possible-Duplicate"] = "1"
    lines = [f"{k}: {one_line(v, 500)}" for k, v in (
        ("time", event.get("@timestamp", "")), ("action", ev.get("action", "")),
        ("severity", severity_of(event)), ("rule", rules),
        ("protocol", event.get("network", {}).get("protocol", "")),
        ("sender", who), ("recipients", ", ".join(ig.get("context", {}).get("recipients", []))),
        ("file", event.get("file", {}).get("name", "")),
        ("sha256", event.get("file", {}).get("hash", {}).get("sha256", "")),
        ("gateway", event.get("observer", {}).get("name", ""))) if v]
    body = "\n".join(lines) + "\n\n" + json.dumps(event, indent=2, ensure_ascii=True, default=str) + "\n"
    msg.set_content(body)
    return msg


class EmailSink(Sink):
    name = "email"

    def __init__(self, smtp: str, sender: str, recipients: list[str], min_severity: str = "high",
                 starttls: bool = False, timeout: float = 30.0, ca_file: str = ""):
        if not recipients:
            raise ValueError("email: no recipients (email_to)")
        self.host, self.port = _host_port(smtp)
        self.sender = sender
        self.recipients = list(recipients)
        self.min_severity = min_severity
        self.starttls = starttls
        self.timeout = timeout
        self.ca_file = ca_file
        self.tls_context: ssl.SSLContext | None = None
        if starttls:
            try:
                self.tls_context = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"email_ca_file: cannot load CA certificates from {ca_file!r}: {e}") from None

    def accepts(self, event: dict[str, Any]) -> bool:
        return event.get("event", {}).get("kind") == "alert" and at_least(event, self.min_severity)

    def send(self, event: dict[str, Any]) -> None:
        try:
            message = build_message(event, self.sender, self.recipients)
            message.as_bytes()              # what send_message will flatten: refused here, not mid-transaction
        except (ValueError, TypeError, UnicodeError) as e:
            raise DeliveryError(f"cannot make a mail of event {event.get('event', {}).get('id', '')}: "
                                f"{type(e).__name__}: {e}", permanent=True) from e
        try:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        except (OSError, smtplib.SMTPException) as e:
            raise DeliveryError(f"cannot connect to SMTP {self.host}:{self.port}: {e}") from e
        try:
            if self.starttls:
                smtp.starttls(context=self.tls_context)    # verifies the certificate and the host name
            smtp.send_message(message)
        except ssl.SSLCertVerificationError as e:
            raise DeliveryError(f"SMTP {self.host}:{self.port}: STARTTLS refused, the server's certificate does "
                                f"not verify: {e.verify_message or e}") from e
        except smtplib.SMTPNotSupportedError as e:
            raise DeliveryError(f"SMTP {self.host}:{self.port} does not offer STARTTLS: {e}") from e
        except smtplib.SMTPResponseException as e:
            # A 5xx answer to the mail's content (DATA) or its size (552) refuses this mail for good; any other
            # refusal (a recipient or sender unknown, a 4xx) is the server's or the settings' and may pass later.
            permanent = 500 <= e.smtp_code < 600 and (isinstance(e, smtplib.SMTPDataError) or e.smtp_code == 552)
            raise DeliveryError(f"SMTP {self.host}:{self.port} refused the mail: {e.smtp_code} {e.smtp_error!r}",
                                permanent=permanent) from e
        except (OSError, smtplib.SMTPException, socket.timeout) as e:
            raise DeliveryError(f"SMTP {self.host}:{self.port}: {type(e).__name__}: {e}", ambiguous=True) from e
        finally:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()
