"""The webhook: each event as one HTTP POST of its JSON; any 2xx answer means delivered.

Headers: `Content-Type: application/json`, `X-Imguard-Event-Id` (the event's `event.id`, the same on a
re-delivery, so a receiver can drop duplicates) and `X-Imguard-Possible-Duplicate: 1` on a re-delivery
that may repeat one the receiver already has. The request goes straight to the URL's host: proxy
variables in the gateway's environment are ignored (they could name the gateway itself).

Credentials in the URL (`https://user:secret@host/path`) are sent as `Authorization: Basic`, never in the
request line, and never appear in what imguard says about the sink: its errors, and so the `sink_down` events
that go to alerts.jsonl and every other sink, name the host and port alone (`where`).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.parse
from typing import Any

from imguard.sinks.base import DeliveryError, Sink

# Answers that refuse the event itself: retrying the same body gets the same answer.
PERMANENT_STATUSES = frozenset({400, 413, 415, 422})


class WebhookSink(Sink):
    name = "webhook"

    def __init__(self, url: str, timeout: float = 10.0, all_events: bool = False,
                 ssl_context: ssl.SSLContext | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook URL {redact(url)!r}: an http:// or https:// URL expected")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"webhook URL {redact(url)!r}: the port is not a number") from None
        self.authorization = ""
        if parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            self.authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.where = f"{host}:{port}" if port else host        # how messages name it: no credentials
        self.url = redact(url)
        self.parts = parts
        self.timeout = timeout
        self.all_events = all_events
        self.ssl_context = ssl_context or (ssl.create_default_context() if parts.scheme == "https" else None)

    def accepts(self, event: dict[str, Any]) -> bool:
        return self.all_events or event.get("event", {}).get("kind") == "alert"

    def send(self, event: dict[str, Any]) -> None:
        try:
            body = json.dumps(event, separators=(",", ":"), default=str).encode()
        except (ValueError, TypeError, UnicodeError) as e:
            raise DeliveryError(f"cannot encode event {event.get('event', {}).get('id', '')} as JSON: {e}",
                                permanent=True) from e
        path = self.parts.path or "/"
        if self.parts.query:
            path += "?" + self.parts.query
        if self.parts.scheme == "https":
            conn = http.client.HTTPSConnection(self.parts.hostname, self.parts.port, timeout=self.timeout,
                                               context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json", "User-Agent": "imguard",
                   "X-Imguard-Event-Id": str(event.get("event", {}).get("id", ""))}
        if event.get("imguard", {}).get("possible_duplicate"):
            headers["X-Imguard-Possible-Duplicate"] = "1"
        if self.authorization:
            headers["Authorization"] = self.authorization
        sent = False
        try:
            try:
                conn.connect()
            except OSError as e:
                raise DeliveryError(f"cannot connect to the webhook {self.where}: {e}") from e
            try:
                conn.request("POST", path, body=body, headers=headers)
                sent = True
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as e:
                raise DeliveryError(f"webhook {self.where}: {type(e).__name__}: {e}", ambiguous=sent) from e
            if not 200 <= response.status < 300:
                # 400, 413, 415, 422: the receiver refuses this event's content, and will again: dead letter.
                # Anything else (401, 404, 429, 5xx) is the receiver's or the settings' state: retried.
                raise DeliveryError(f"webhook {self.where} answered {response.status} {response.reason}",
                                    permanent=response.status in PERMANENT_STATUSES)
        finally:
            conn.close()


def redact(url: str) -> str:
    """The URL with any user and password in it replaced by `***`."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
