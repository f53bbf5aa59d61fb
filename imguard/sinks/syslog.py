"""Syslog (RFC 5424) over UDP (RFC 5426), TCP with octet-counting framing (RFC 6587 3.4.1), TLS (RFC 5425: the
same framing inside TLS; the receiver's certificate must verify, against the system's CAs or `ca_file`, and name
the host of the address) or a unix socket.

    <PRI>1 TIMESTAMP HOSTNAME imguard PROCID MSGID [imguard@32473 k="v" ...] {"@timestamp": ... the JSON}

PRI is facility * 8 + a syslog severity derived from the event's (critical -> 2 crit, high -> 3 err,
medium -> 4 warning, low -> 5 notice, info and plain events -> 6 info). MSGID is the event's type
(message, file, anomaly, tls, policy, sink). The structured data repeats the few fields a syslog
operator filters on; the MSG is the whole event as JSON.

Encoding (RFC 5424 6): the header is printable US-ASCII; structured-data values are UTF-8 (a sender
`jörg@example.de` stays as it is); the MSG is MSG-UTF8, the byte order mark then the event's JSON line as
alerts.jsonl has it (UTF-8). A lone surrogate (text decoded with surrogateescape) is written `\\udcXX` in the
JSON and `?` in structured data, so every record is valid UTF-8.

No log injection: the JSON has every control character (and U+0085, U+2028, U+2029) escaped, so a chat
message with newlines, NULs or a fake "<13>1 ..." header stays inside one string of one record. Header
fields are restricted to printable ASCII without spaces, and structured-data values have `"`, `\\` and `]`
escaped as RFC 5424 6.3.3 requires and control characters written as \\uXXXX. Over TCP the octet count
frames the record, so even a raw newline could not split it.

Size: a record longer than `max_bytes` (the syslog_max_bytes setting; rsyslog's default maxMessageSize is
8 KB, and a longer record is cut there) or than a datagram may be is made to fit, still valid JSON: the
inspection report (imguard.report) goes first, then the message text is trimmed, then the event keeps
only its key fields; `imguard.truncated` says so. The whole event is in alerts.jsonl.

32473 is the private enterprise number IANA reserves for documentation (RFC 5612); a site with its own
number can change SD_ID.
"""

from __future__ import annotations

import copy
import datetime
import errno
import os
import re
import select
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from imguard import alerts
from imguard.sinks.base import DeliveryError, Sink, at_least

SD_ID = "imguard@32473"
FACILITIES = {name: code for code, name in enumerate(
    ["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp",
     "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
     "local7"])}
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5, "info": 6}
UDP_LIMIT = 60000
BOM = b"\xef\xbb\xbf"          # RFC 5424 6.4: MSG-UTF8 starts with the byte order mark
MIN_RECORD = 480               # RFC 5424 6.1: every receiver takes at least 480 octets
# What a record that must shrink to its key fields keeps (top level, then event.*).
_KEY_SECTIONS = ("@timestamp", "ecs", "event", "observer", "rule", "file", "source", "destination", "user",
                 "network", "url")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)$")


def _header_field(value: Any, limit: int) -> str:
    text = "".join(c for c in str(value) if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def _sd_name(value: str) -> str:
    return "".join(c for c in value if 33 <= ord(c) <= 126 and c not in '= ]"')[:32] or "x"


def _sd_value(value: Any, limit: int = 256) -> str:
    out = []
    # UTF-8 (RFC 5424 6.3.3); a lone surrogate, which UTF-8 cannot carry, becomes "?".
    text = str(value)[:limit].encode("utf-8", "replace").decode("utf-8")
    for c in text:
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
        "severity": alerts.severity_of(event),
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


def _json(event: dict[str, Any]) -> bytes:
    return alerts.encode(event).rstrip(b"\n")


def _json_length(text: str) -> int:
    return len(alerts.encode({"": text}))


def _trim_text(value: str, excess: int) -> str:
    """`value` cut so that its JSON form is at least `excess` bytes shorter, with "..." after it."""
    target = _json_length(value) - excess - 8
    keep = value
    while keep and (length := _json_length(keep)) > target:
        keep = keep[:min(len(keep) - 1, len(keep) * max(target, 0) // length)]
    return keep + "..."


def _fitted(event: dict[str, Any], room: int) -> bytes:
    """The event's JSON within `room` bytes, still one valid JSON object (see the module's doc)."""
    slim = copy.deepcopy(event)
    slim.setdefault("imguard", {}).pop("report", None)
    slim["imguard"]["truncated"] = True
    msg = _json(slim)
    texts = [(slim["imguard"].get("message"), "text"), (slim, "message"), (slim["imguard"].get("notify"), "text")]
    for holder, key in texts:
        if len(msg) <= room:
            return msg
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key]:
            holder[key] = _trim_text(holder[key], len(msg) - room)
            msg = _json(slim)
    if len(msg) <= room:
        return msg
    key = {name: slim[name] for name in _KEY_SECTIONS if name in slim}
    key["imguard"] = {"truncated": True, "severity": alerts.severity_of(event)}
    msg = _json(key)
    if len(msg) <= room:
        return msg
    ev = event.get("event", {})
    return _json({"@timestamp": event.get("@timestamp", ""), "event": {
        name: ev[name] for name in ("id", "kind", "dataset", "action") if name in ev and len(str(ev[name])) < 64},
        "imguard": {"truncated": True}})


def format_5424(event: dict[str, Any], facility: int = FACILITIES["local0"], procid: int | None = None,
                limit: int = 0) -> bytes:
    """One RFC 5424 record (without framing) for an event, at most `limit` bytes (0: any size; never less
    than MIN_RECORD). UTF-8: header US-ASCII, structured data UTF-8, MSG the BOM and the event's JSON."""
    ev = event.get("event", {})
    sev = SYSLOG_SEVERITY.get(alerts.severity_of(event), 4 if ev.get("kind") == "alert" else 6)
    timestamp = str(event.get("@timestamp", ""))
    if not _TIMESTAMP.match(timestamp):
        timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
    hostname = _header_field(event.get("observer", {}).get("hostname", "") or socket.gethostname(), 255)
    msgid = _header_field(str(ev.get("dataset", "")).removeprefix("imguard."), 32)
    head = (f"<{facility * 8 + sev}>1 {timestamp} {hostname} imguard "
            f"{procid if procid is not None else os.getpid()} {msgid} ").encode("ascii")
    data = _structured_data(event).encode("utf-8")
    msg = _json(event)
    if limit:
        limit = max(limit, MIN_RECORD)
        if len(head) + len(data) + 1 + len(BOM) + len(msg) > limit:
            if len(head) + len(data) > limit // 2:            # very long names in the structured data
                data = f"[{SD_ID} id=\"{_sd_value(ev.get('id', ''))}\" truncated=\"true\"]".encode("utf-8")
            msg = _fitted(event, limit - len(head) - len(data) - 1 - len(BOM))
    return head + data + b" " + BOM + msg


def parse_address(address: str) -> tuple[str, Any]:
    """("udp" | "tcp" | "tls", (host, port)) | ("unix", path). Raises ValueError with the reason."""
    parts = urlsplit(address)
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ValueError(f"syslog address {address!r}: unix:///path expected")
        return "unix", path
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("udp", "tcp", "tls") or not parts.hostname or not port:
        raise ValueError(f"syslog address {address!r}: expected udp://host:port, tcp://host:port, tls://host:port "
                         "or unix:///path")
    return parts.scheme, (parts.hostname, parts.port)


class SyslogSink(Sink):
    name = "syslog"

    def __init__(self, address: str, facility: str = "local0", min_severity: str = "", timeout: float = 10.0,
                 max_bytes: int = 0, ca_file: str = ""):
        self.transport, self.target = parse_address(address)
        self.max_bytes = max_bytes
        self.tls_context: ssl.SSLContext | None = None
        if ca_file and self.transport != "tls":
            raise ValueError("syslog_ca_file: only used with a tls:// syslog address")
        if self.transport == "tls":
            try:
                self.tls_context = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"syslog_ca_file: cannot load CA certificates from {ca_file!r}: {e}") from None
        if facility not in FACILITIES:
            raise ValueError(f"syslog facility {facility!r}: one of {', '.join(FACILITIES)} expected")
        self.facility = FACILITIES[facility]
        self.min_severity = min_severity
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._stream = self.transport in ("tcp", "tls")

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
        sock = socket.create_connection(self.target, timeout=self.timeout)
        if self.tls_context is None:
            return sock
        try:
            # Verifies the chain and that the certificate names the address's host (RFC 5425 5.2).
            return self.tls_context.wrap_socket(sock, server_hostname=self.target[0])
        except BaseException:
            sock.close()
            raise

    def _peer_closed(self) -> bool:
        """A stream receiver that restarted closed our connection: detect it before writing into the void."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if readable and self.tls_context is not None:
                return True             # a syslog receiver sends nothing: over TLS, readable is its close_notify
            return bool(readable) and self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def send(self, event: dict[str, Any]) -> None:
        if self._sock is not None and self._stream and self._peer_closed():
            self.close()
        try:
            if self._sock is None:
                self._sock = self._connect()
        except ssl.SSLCertVerificationError as e:
            self.close()
            raise DeliveryError(f"syslog {self.target}: the receiver's certificate does not verify: "
                                f"{e.verify_message or e}") from e
        except OSError as e:
            self.close()
            raise DeliveryError(f"cannot connect to syslog {self.target}: {e}") from e
        limit = self.max_bytes if self._stream else min(self.max_bytes or UDP_LIMIT, UDP_LIMIT)
        try:
            record = format_5424(event, self.facility, limit=limit)
        except (ValueError, TypeError, UnicodeError, RecursionError) as e:
            # This event cannot be made a record, now or ever: not a reason to stop the feed (dead letter).
            raise DeliveryError(f"cannot format event {event.get('event', {}).get('id', '')} for syslog: "
                                f"{type(e).__name__}: {e}", permanent=True) from e
        try:
            if self._stream:
                self._sock.sendall(b"%d " % len(record) + record)
            else:
                self._sock.send(record)
        except OSError as e:
            self.close()
            if e.errno == errno.EMSGSIZE:        # a datagram larger than the socket takes: so will it stay
                raise DeliveryError(f"syslog {self.target}: a record of {len(record)} bytes: {e}",
                                    permanent=True) from e
            # A refused datagram (ICMP port unreachable) was not taken; a cut stream may have been.
            raise DeliveryError(f"syslog {self.target}: {e}",
                                ambiguous=self._stream and not isinstance(e, ConnectionRefusedError)) from e

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
