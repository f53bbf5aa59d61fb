"""Syslog (RFC 5424) over UDP (RFC 5426), TCP with octet-counting framing (RFC 6587 3.4.1) or a unix socket.

    <PRI>1 TIMESTAMP HOSTNAME imguard PROCID MSGID [imguard@32473 k="v" ...] {"@timestamp": ... the JSON}

PRI is facility * 8 + a syslog severity derived from the event's (critical -> 2 crit, high -> 3 err,
medium -> 4 warning, low -> 5 notice, info and plain events -> 6 info). MSGID is the event's type
(message, file, anomaly, tls, policy, sink). The structured data repeats the few fields a syslog
operator filters on; the MSG is the whole event as ASCII JSON.

No log injection: the JSON is encoded with every control character and every non-ASCII character
escaped, so a chat message with newlines, NULs or a fake "<13>1 ..." header stays inside one string of
one record. Header fields are restricted to printable ASCII without spaces, and structured-data values
have `"`, `\\` and `]` escaped as RFC 5424 6.3.3 requires and control characters written as \\uXXXX.
Over TCP the octet count frames the record, so even a raw newline could not split it.

32473 is the private enterprise number IANA reserves for documentation (RFC 5612); a site with its own
number can change SD_ID.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import select
import socket
from typing import Any
from urllib.parse import urlsplit

from imguard.sinks.base import DeliveryError, Sink, at_least

SD_ID = "imguard@32473"
FACILITIES = {name: code for code, name in enumerate(
    ["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp",
     "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
     "local7"])}
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5, "info": 6}
UDP_LIMIT = 60000
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)$")


def _header_field(value: Any, limit: int) -> str:
    text = "".join(c for c in str(value) if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def _sd_name(value: str) -> str:
    return "".join(c for c in value if 33 <= ord(c) <= 126 and c not in '= ]"')[:32] or "x"


def _sd_value(value: Any, limit: int = 256) -> str:
    out = []
    for c in str(value)[:limit]:
        if c in '"\\]':
            out.append("\\" + c)
        elif ord(c) < 32 or 0x7f <= ord(c) < 0xa0 or c in "\u2028\u2029":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def _structured_data(event: dict[str, Any]) -> str:
    ev = event.get("event", {})
    ig = event.get("imguard", {})
    rules = event.get("rule", {}).get("id", "")
    params = {
        "id": ev.get("id", ""), "kind": ev.get("kind", ""), "action": ev.get("action", ""),
        "severity": ev.get("severity_name", ""),
        "rule": ",".join(rules) if isinstance(rules, list) else rules,
        "protocol": event.get("network", {}).get("protocol", ""),
        "sender": event.get("source", {}).get("user", {}).get("name", ""),
        "sha256": event.get("file", {}).get("hash", {}).get("sha256", ""),
        "instance": event.get("observer", {}).get("name", ""),
    }
    if ig.get("possible_duplicate"):
        params["possible_duplicate"] = "true"
    if ig.get("suppressed_count"):
        params["suppressed_count"] = ig["suppressed_count"]
    body = " ".join(f'{_sd_name(k)}="{_sd_value(v)}"' for k, v in params.items() if v not in ("", None))
    return f"[{SD_ID} {body}]" if body else "-"


def format_5424(event: dict[str, Any], facility: int = FACILITIES["local0"], procid: int | None = None,
                limit: int = 0) -> bytes:
    """One RFC 5424 record (without framing) for an event."""
    ev = event.get("event", {})
    sev = SYSLOG_SEVERITY.get(ev.get("severity_name", ""), 4 if ev.get("kind") == "alert" else 6)
    timestamp = str(event.get("@timestamp", ""))
    if not _TIMESTAMP.match(timestamp):
        timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
    hostname = _header_field(event.get("observer", {}).get("hostname", "") or socket.gethostname(), 255)
    msgid = _header_field(str(ev.get("dataset", "")).removeprefix("imguard."), 32)
    header = (f"<{facility * 8 + sev}>1 {timestamp} {hostname} imguard "
              f"{procid if procid is not None else os.getpid()} {msgid} {_structured_data(event)} ")
    msg = json.dumps(event, separators=(",", ":"), ensure_ascii=True, default=str)
    record = (header + msg).encode("ascii")
    if limit and len(record) > limit:
        # Too large for one datagram: the bulky inspection report goes first, then the text is cut.
        slim = json.loads(msg)
        slim.get("imguard", {}).pop("report", None)
        slim.setdefault("imguard", {})["truncated"] = True
        record = (header + json.dumps(slim, separators=(",", ":"), ensure_ascii=True)).encode("ascii")[:limit]
    return record


def parse_address(address: str) -> tuple[str, Any]:
    """("udp", (host, port)) | ("tcp", (host, port)) | ("unix", path). Raises ValueError with the reason."""
    parts = urlsplit(address)
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ValueError(f"syslog address {address!r}: unix:///path expected")
        return "unix", path
    if parts.scheme not in ("udp", "tcp") or not parts.hostname or not parts.port:
        raise ValueError(f"syslog address {address!r}: expected udp://host:port, tcp://host:port or unix:///path")
    return parts.scheme, (parts.hostname, parts.port)


class SyslogSink(Sink):
    name = "syslog"

    def __init__(self, address: str, facility: str = "local0", min_severity: str = "", timeout: float = 10.0):
        self.transport, self.target = parse_address(address)
        if facility not in FACILITIES:
            raise ValueError(f"syslog facility {facility!r}: one of {', '.join(FACILITIES)} expected")
        self.facility = FACILITIES[facility]
        self.min_severity = min_severity
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._stream = self.transport == "tcp"

    def accepts(self, event: dict[str, Any]) -> bool:
        return at_least(event, self.min_severity)

    def _connect(self) -> socket.socket:
        if self.transport == "unix":
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(self.timeout)
                sock.connect(self.target)
                self._stream = False
            except OSError as e:
                sock.close()
                if e.errno != errno.EPROTOTYPE:
                    raise
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.target)
                self._stream = True
            return sock
        if self.transport == "udp":
            family = socket.getaddrinfo(*self.target, type=socket.SOCK_DGRAM)[0][0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect(self.target)
            return sock
        return socket.create_connection(self.target, timeout=self.timeout)

    def _peer_closed(self) -> bool:
        """A stream receiver that restarted closed our connection: detect it before writing into the void."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            return bool(readable) and self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def send(self, event: dict[str, Any]) -> None:
        if self._sock is not None and self._stream and self._peer_closed():
            self.close()
        try:
            if self._sock is None:
                self._sock = self._connect()
        except OSError as e:
            self.close()
            raise DeliveryError(f"cannot connect to syslog {self.target}: {e}") from e
        record = format_5424(event, self.facility, limit=0 if self._stream else UDP_LIMIT)
        try:
            if self._stream:
                self._sock.sendall(b"%d " % len(record) + record)
            else:
                self._sock.send(record)
        except OSError as e:
            self.close()
            # A refused datagram (ICMP port unreachable) was not taken; a cut stream may have been.
            raise DeliveryError(f"syslog {self.target}: {e}",
                                ambiguous=self._stream and not isinstance(e, ConnectionRefusedError)) from e

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
