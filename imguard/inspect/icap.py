"""ICAP as an inspection engine: the file goes to any ICAP server (RFC 3507) as the body of an HTTP response
(RESPMOD, a download) or of an HTTP POST (REQMOD, an upload), and the server says whether it would let it through.

    icap = Icap("icap://127.0.0.1:1344/avscan", timeout=20.0, max_size=25 * MiB, method="reqmod", preview=True)
    icap.scan(data, name="report.pdf")    # -> ("Win.Test.EICAR_HDB-1",) or () ; raises IcapError
    icap.check(data, name="report.pdf")   # -> (names, "icap: 204 no modification from icap://...") for --explain

With `preview` the service's OPTIONS (RFC 3507 4.10) is asked first and kept for its `Options-TTL`; when it
advertises `Preview: n` the request carries the first n bytes only (4.5), ended by `0; ieof` when that is the whole
file. The server then answers `100 Continue` (the rest follows, then its verdict) or its verdict at once: a
`204` there is clean without the rest being sent (c-icap's virus_scan does that for a type it is not set to scan).

This is the way to the commercial engines a company already licenses (they all speak ICAP) and to c-icap.
How the answer is read (RFC 3507 §4.6; the de-facto headers of the AV vendors, draft-stecher-icap-subid):
- `204 No Content`: the server leaves the response (or request) as it is: clean.
- `200 OK` with `X-Infection-Found: ...; Threat=<name>;`, `X-Violations-Found` (a count, then four lines per
  violation: file, name, id, disposition), `X-Virus-ID` or `X-Virus-Name`: a detection with that name.
- `200 OK` without those: the server rewrote the response. An encapsulated HTTP status that is not 2xx (a block
  page) or a body that is not the one sent is a detection ("modified by the ICAP server"); the same body back
  (a server that does not answer 204) is clean. In REQMOD an HTTP response in place of the request (any status:
  the upload would not go on) is a detection, and a request whose body is not the one sent is "modified".
- anything else (a 4xx/5xx status, garbage, no answer in time, nobody listening) is an IcapError, which the
  inspector makes an `unscannable` finding: never clean.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from imguard.model import REASON_SCANNER_ERROR, REASON_TIMEOUT
from imguard.settings import MiB, setting

NAME = "icap"
DEFAULT_PORT = 1344
MAX_HEAD = 64 * 1024             # ICAP headers plus the encapsulated HTTP headers of the answer
CHUNK = 64 * 1024
METHODS = ("respmod", "reqmod")
_STATUS = re.compile(r"^ICAP/1\.[01] (?P<code>\d{3})(?: (?P<reason>.*))?$")
_THREAT = re.compile(r"Threat=(?P<name>[^;]+);?", re.I)


@dataclass(frozen=True)
class IcapSettings:
    """ICAP engine (RFC 3507 RESPMOD or REQMOD)"""

    icap_url: str = setting(
        "", "ICAP service that scans every file beside YARA, as icap://host[:port]/service (port 1344 by default): "
            "c-icap's virus_scan, or a commercial engine's ICAP service. The file is sent as icap_method says. "
            "'' = no ICAP. A detection is an `engine` finding (policy: `engine: icap`); a server that is "
            "down, slow or answers garbage makes the file unscannable, never clean.")
    icap_method: str = setting(
        "respmod", "How the file goes to the ICAP service: `respmod` (RFC 3507 4.9: as the body of an HTTP "
                   "response, a download: what antivirus services scan) or `reqmod` (4.8: as the body of an HTTP "
                   "POST, an upload: what a DLP service inspects). The service must list it in its OPTIONS "
                   "`Methods`; in REQMOD an HTTP response in place of the upload is a detection.")
    icap_preview: bool = setting(
        True, "Ask the service's OPTIONS first (kept for its Options-TTL) and, when it advertises `Preview: n`, send "
              "the first n bytes before the rest (RFC 3507 4.5): the service answers `100 Continue` (the rest "
              "follows) or its verdict at once, a `204` then meaning clean without the rest being sent (the service "
              "vouches for the file: c-icap's virus_scan does so for a type outside its ScanFileTypes, which it "
              "passes unscanned without a preview too). A service that does not answer OPTIONS makes the file "
              "unscannable. Off: no OPTIONS, the whole file in one request.")
    icap_timeout: float = setting(
        20.0, "Seconds one ICAP scan may take, connection to answer; past it the file is unscannable (timeout). "
              "Keep it under the gateway's inspect_timeout (30 s), so the engine's own verdict, not the gateway's "
              "timeout fail mode, decides.")
    icap_max_size: int = setting(
        25 * MiB, "Largest file sent to the ICAP server, in bytes; a bigger one is unscannable (too_large) for ICAP. "
                  "Match the server's own limit (c-icap virus_scan.MaxObjectSize): a server that passes what it "
                  "did not scan would otherwise vouch for it.")


class IcapError(Exception):
    """The ICAP server did not give a usable verdict: `reason` is the model's unscannable reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Answer:
    """An ICAP response: status, headers (lower-case names, folded lines joined by "\\n"), the encapsulated
    HTTP response's status, and the encapsulated body (of the response, or of the request in REQMOD); `request`
    when it encapsulates an HTTP request (REQMOD: the upload, perhaps rewritten)."""
    code: int
    headers: dict[str, str]
    http_status: int | None = None
    body: bytes | None = None
    request: bool = False


@dataclass(frozen=True)
class Options:
    """What a service's OPTIONS answer (RFC 3507 4.10.2) tells a client: its methods, the preview size it wants
    (None: no preview), its ISTag, and until when (time.monotonic()) the answer holds (Options-TTL)."""
    methods: tuple[str, ...]
    preview: int | None
    istag: str
    expires: float


def parse_url(url: str) -> tuple[str, int, str]:
    try:
        parts = urlsplit(url.strip())
        port = parts.port or DEFAULT_PORT
    except ValueError:      # a port out of range or not a number, a malformed [IPv6] host
        raise ValueError(f"icap_url: {url!r} is not icap://host[:port]/service (a bad host or port)") from None
    if parts.scheme.lower() != "icap" or not parts.hostname:
        raise ValueError(f"icap_url: {url!r} is not icap://host[:port]/service")
    return parts.hostname, port, parts.path.lstrip("/") + (f"?{parts.query}" if parts.query else "")


def check_settings(settings: IcapSettings) -> list[str]:
    """Every problem with the ICAP settings, as `setting: message` lines naming the value (empty when usable): refused
    at startup (`imguard run`, `imguard scan`...), not met as a traceback, nor on the first file."""
    errors = []
    if settings.icap_url:
        try:
            parse_url(settings.icap_url)
        except ValueError as e:
            errors.append(str(e))
    if str(settings.icap_method).lower() not in METHODS:
        errors.append(f"icap_method: {settings.icap_method!r} is not one of {', '.join(METHODS)}")
    if not settings.icap_timeout > 0:
        errors.append(f"icap_timeout: {settings.icap_timeout!r} must be more than 0 seconds")
    if settings.icap_max_size <= 0:
        errors.append(f"icap_max_size: {settings.icap_max_size!r} must be more than 0 bytes")
    return errors


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request(host: str, port: int, service: str, data_length: int, name: str, method: str = "respmod",
            preview: int | None = None) -> bytes:
    """The request head: ICAP headers, then for RESPMOD the encapsulated GET and the HTTP response head of the
    file, for REQMOD the head of an HTTP POST of the file; `Preview: n` when the body starts with a preview."""
    target = f"/{quote(name or 'file', safe='')}"
    length = (f"Content-Type: application/octet-stream\r\nContent-Length: {data_length}\r\n\r\n")
    if method == "reqmod":
        http = f"POST {target} HTTP/1.1\r\nHost: imguard.invalid\r\n{length}".encode()
        offsets = f"req-hdr=0, req-body={len(http)}"
    else:
        http_request = f"GET {target} HTTP/1.1\r\nHost: imguard.invalid\r\n\r\n".encode()
        http = http_request + f"HTTP/1.1 200 OK\r\n{length}".encode()
        offsets = f"req-hdr=0, res-hdr={len(http_request)}, res-body={len(http)}"
    authority = _authority(host, port)
    icap = (f"{method.upper()} icap://{authority}/{service} ICAP/1.0\r\n"
            f"Host: {authority}\r\n"
            "User-Agent: imguard\r\n"
            "Allow: 204\r\n"
            + (f"Preview: {preview}\r\n" if preview is not None else "") +
            "Connection: close\r\n"
            f"Encapsulated: {offsets}\r\n\r\n").encode()
    return icap + http


def parse_options(code: int, headers: dict[str, str], now: float) -> Options:
    """The OPTIONS answer as Options; raises IcapError for an error status or a malformed Preview/Options-TTL."""
    if code != 200:
        raise IcapError(REASON_SCANNER_ERROR, f"ICAP OPTIONS answered {code}")
    methods = tuple(m.strip().lower() for m in headers.get("methods", "").replace("\n", ",").split(",") if m.strip())
    numbers = {}
    for key in ("preview", "options-ttl"):
        text = headers.get(key, "").strip()
        if text and not text.isdigit():
            raise IcapError(REASON_SCANNER_ERROR, f"ICAP OPTIONS answer has a malformed {key} header: {text[:40]!r}")
        numbers[key] = int(text) if text else None
    ttl = numbers["options-ttl"]
    return Options(methods, numbers["preview"], headers.get("istag", ""),
                   now + ttl if ttl is not None else float("inf"))     # no Options-TTL: it does not expire


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    try:
        text = head.decode("iso-8859-1")
    except UnicodeDecodeError:      # pragma: no cover (latin-1 decodes every byte)
        raise IcapError(REASON_SCANNER_ERROR, "ICAP answer is not text") from None
    lines = text.split("\r\n")
    status = _STATUS.match(lines[0])
    if status is None:
        raise IcapError(REASON_SCANNER_ERROR, f"not an ICAP answer: {lines[0][:120]!r}")
    headers: dict[str, str] = {}
    last = ""
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and last:                  # a folded line continues the header before it
            headers[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise IcapError(REASON_SCANNER_ERROR, f"ICAP answer has a malformed header: {line[:120]!r}")
        last = key.strip().lower()
        headers[last] = (headers[last] + "\n" if last in headers else "") + value.strip()
    return int(status["code"]), headers


def encapsulated(value: str) -> dict[str, int]:
    """`Encapsulated: res-hdr=0, res-body=137` as {"res-hdr": 0, "res-body": 137}."""
    offsets = {}
    for part in value.split(","):
        key, sep, number = part.strip().partition("=")
        if not sep or not number.strip().isdigit():
            raise IcapError(REASON_SCANNER_ERROR, f"ICAP answer has a malformed Encapsulated header: {value!r}")
        offsets[key.strip().lower()] = int(number)
    return offsets


def dechunk(data: bytes, limit: int) -> bytes:
    """An ICAP body (always chunked, RFC 3507 §4.4.1), whole; raises IcapError when it is cut or malformed."""
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise IcapError(REASON_SCANNER_ERROR, "ICAP answer body is cut short")
        size_text = data[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise IcapError(REASON_SCANNER_ERROR, f"ICAP answer has a malformed chunk size {size_text[:20]!r}") \
                from None
        if size == 0:
            return bytes(out)
        start = end + 2
        if start + size > len(data) or len(out) + size > limit:
            raise IcapError(REASON_SCANNER_ERROR, "ICAP answer body is cut short or too long")
        out += data[start:start + size]
        pos = start + size + 2


def detections(answer: Answer, sent: bytes | memoryview, method: str = "respmod") -> tuple[str, ...]:
    """The names the server gives for what it found; () when it lets the file through."""
    if answer.code == 204:
        return ()
    if answer.code != 200:
        raise IcapError(REASON_SCANNER_ERROR, f"ICAP server answered {answer.code}: no verdict")
    names: list[str] = []
    headers = answer.headers
    if "x-infection-found" in headers:
        names += [m["name"].strip() for m in _THREAT.finditer(headers["x-infection-found"])]
    if "x-violations-found" in headers:
        lines = headers["x-violations-found"].split("\n")
        names += [lines[i].strip() for i in range(2, len(lines), 4)]     # count, then file, NAME, id, disposition
    for key in ("x-virus-id", "x-virus-name"):
        if key in headers:
            names.append(headers[key].strip())
    names = [n for n in names if n]
    if names:
        return tuple(dict.fromkeys(names))
    if any(key in headers for key in ("x-infection-found", "x-violations-found", "x-virus-id", "x-virus-name")):
        return ("ICAP detection without a name",)
    if method == "reqmod" and answer.http_status is not None:     # an answer in place of the upload
        return (f"blocked by the ICAP server (HTTP {answer.http_status} in place of the upload)",)
    if answer.http_status is not None and not 200 <= answer.http_status < 300:
        return (f"blocked by the ICAP server (HTTP {answer.http_status})",)
    if answer.body is not None and answer.body != bytes(sent):
        return ("modified by the ICAP server",)
    if answer.request and answer.body is None and len(sent):
        return ("modified by the ICAP server",)              # the upload went on without its body
    if answer.http_status is None and answer.body is None and not answer.request:
        raise IcapError(REASON_SCANNER_ERROR, "ICAP server answered 200 without a response or a detection")
    return ()


class Icap:
    """An ICAP service; one connection per scan (Connection: close). Thread-safe (the OPTIONS cache is swapped
    whole)."""

    name = NAME

    def __init__(self, url: str, timeout: float = 20.0, max_size: int = 25 * MiB, *, method: str = "respmod",
                 preview: bool = False) -> None:
        """`preview`: ask OPTIONS (cached for its Options-TTL) and send the preview it asks for; the icap_preview
        setting turns it on by default, the bare class (a server that speaks no OPTIONS, in a test) does not."""
        if method.lower() not in METHODS:
            raise ValueError(f"icap_method {method!r}: expected one of {', '.join(METHODS)}")
        self.url, self.timeout, self.max_size = url, timeout, max_size
        self.method, self.preview = method.lower(), preview
        self.host, self.port, self.service = parse_url(url)
        self._options: Options | None = None

    @classmethod
    def from_settings(cls, settings: IcapSettings) -> "Icap | None":
        """The service the settings name (None: no icap_url); raises runtime.ConfigError naming each bad setting."""
        if errors := check_settings(settings):
            from imguard.runtime import ConfigError
            raise ConfigError(errors)
        if not settings.icap_url:
            return None
        return cls(settings.icap_url, settings.icap_timeout, settings.icap_max_size,
                   method=settings.icap_method, preview=settings.icap_preview)

    def describe(self) -> str:
        return f"ICAP {self.url} ({self.method.upper()}{', preview' if self.preview else ''})"

    def scan(self, data: bytes | memoryview, name: str = "") -> tuple[str, ...]:
        return self.check(data, name)[0]

    def check(self, data: bytes | memoryview, name: str = "") -> tuple[tuple[str, ...], str]:
        """The detection names and one sentence on what the service answered (for --explain and the report)."""
        deadline = time.monotonic() + self.timeout
        try:
            options = self.options(deadline) if self.preview else None
            answer, sent = self._exchange(data, name, deadline, options)
            names = detections(answer, data, self.method)
        except TimeoutError:
            raise IcapError(REASON_TIMEOUT, f"{self.describe()} gave no verdict within {self.timeout} s") from None
        except OSError as exc:
            raise IcapError(REASON_SCANNER_ERROR, f"{self.describe()}: {exc.strerror or exc}") from None
        tag = answer.headers.get("istag", "")
        where = f"from {self.url} ({self.method.upper()}{', ISTag ' + tag if tag else ''})"
        if names:
            return names, f"icap: {answer.code} with {len(names)} detection(s) {where}: {', '.join(names)}"
        if answer.code == 204 and sent < len(data):
            return names, (f"icap: 204 no modification {where} after a {sent}-byte preview: the service did not ask "
                           f"for the other {len(data) - sent} bytes")
        if answer.code == 204:
            return names, f"icap: 204 no modification {where}"
        return names, f"icap: 200 with the file unchanged {where}"

    def options(self, deadline: float) -> Options:
        """The service's OPTIONS, from the cache while its Options-TTL lasts, else asked now (within `deadline`)."""
        cached = self._options
        if cached is not None and time.monotonic() < cached.expires:
            return cached
        code, headers = self._ask_options(deadline)
        options = parse_options(code, headers, time.monotonic())
        if options.methods and self.method not in options.methods:
            raise IcapError(REASON_SCANNER_ERROR, f"{self.describe()}: the service offers "
                            f"{', '.join(m.upper() for m in options.methods)}, not {self.method.upper()}")
        self._options = options
        return options

    def state_tag(self, timeout: float = 2.0) -> str:
        """The service's ISTag (RFC 3507 4.7: it changes whenever the service's answers may change, e.g. a new
        signature database), from an OPTIONS request with a short timeout: the verdict cache's check. The answer
        also refreshes the OPTIONS cache."""
        deadline = time.monotonic() + min(self.timeout, timeout)
        try:
            code, headers = self._ask_options(deadline)
        except TimeoutError:
            raise IcapError(REASON_TIMEOUT, f"{self.describe()} did not answer OPTIONS") from None
        except OSError as exc:
            raise IcapError(REASON_SCANNER_ERROR, f"{self.describe()}: {exc.strerror or exc}") from None
        options = parse_options(code, headers, time.monotonic())
        if self.preview and (not options.methods or self.method in options.methods):
            self._options = options
        return options.istag

    def _ask_options(self, deadline: float) -> tuple[int, dict[str, str]]:
        authority = _authority(self.host, self.port)
        head = (f"OPTIONS icap://{authority}/{self.service} ICAP/1.0\r\nHost: {authority}\r\n"
                "User-Agent: imguard\r\nConnection: close\r\nEncapsulated: null-body=0\r\n\r\n").encode()
        with socket.create_connection((self.host, self.port), timeout=_left(deadline)) as sock:
            sock.settimeout(_left(deadline))
            sock.sendall(head)
            buffer = bytearray()
            while b"\r\n\r\n" not in buffer and self._fill(sock, buffer, deadline, MAX_HEAD):
                pass
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            raise IcapError(REASON_SCANNER_ERROR, "ICAP OPTIONS answer has no end of headers")
        return parse_head(bytes(buffer[:end]))

    def _exchange(self, data: bytes | memoryview, name: str, deadline: float,
                  options: Options | None) -> tuple[Answer, int]:
        """The answer, and how many bytes of the file were sent (less than all after a preview and a verdict)."""
        view = memoryview(data)
        preview = options.preview if options is not None else None
        first = len(view) if preview is None else min(preview, len(view))
        buffer = bytearray()
        with socket.create_connection((self.host, self.port), timeout=_left(deadline)) as sock:
            # Without it the last small segment waits for the server's delayed ACK (Nagle): +40 ms after a preview.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._send(sock, request(self.host, self.port, self.service, len(view), name, self.method, preview),
                           deadline)
                if preview is None:
                    self._send_chunks(sock, view, b"0\r\n\r\n", deadline)
                elif first == len(view):
                    self._send_chunks(sock, view, b"0; ieof\r\n\r\n", deadline)     # the preview is the whole file
                else:
                    self._send_chunks(sock, view[:first], b"0\r\n\r\n", deadline)
                    while b"\r\n\r\n" not in buffer and self._fill(sock, buffer, deadline, MAX_HEAD):
                        pass
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0 or parse_head(bytes(buffer[:end]))[0] != 100:
                        return self._read_answer(sock, deadline, len(view), buffer), first   # a verdict at once
                    del buffer[:end + 4]
                    self._send_chunks(sock, view[first:], b"0\r\n\r\n", deadline)
                    first = len(view)
            except (BrokenPipeError, ConnectionResetError):
                pass        # a server may answer (and close) before it has read everything: read what it says
            answer = self._read_answer(sock, deadline, len(view), buffer)
        if answer.code == 100:
            raise IcapError(REASON_SCANNER_ERROR, "ICAP server answered 100 Continue after the end of the file")
        return answer, first

    @staticmethod
    def _send(sock: socket.socket, data: bytes | memoryview, deadline: float) -> None:
        sock.settimeout(_left(deadline))
        sock.sendall(data)

    def _send_chunks(self, sock: socket.socket, view: memoryview, end: bytes, deadline: float) -> None:
        """`view` as ICAP chunks, then `end` (the last chunk) with the last of them: one copy of CHUNK at most."""
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            last = start + CHUNK >= len(view)
            self._send(sock, b"%x\r\n" % len(piece) + piece + b"\r\n" + (end if last else b""), deadline)
        if not len(view):
            self._send(sock, end, deadline)

    def _read_answer(self, sock: socket.socket, deadline: float, sent: int, buffer: bytearray) -> Answer:
        limit = MAX_HEAD + sent * 2 + 1024        # a rewritten body may be a block page or the file itself
        while b"\r\n\r\n" not in buffer:
            if not self._fill(sock, buffer, deadline, MAX_HEAD):
                break
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            raise IcapError(REASON_SCANNER_ERROR, "ICAP server closed the connection without an answer"
                            if not buffer else f"ICAP answer has no end of headers: {bytes(buffer[:80])!r}")
        code, headers = parse_head(bytes(buffer[:end]))
        if code != 200 or "encapsulated" not in headers:
            return Answer(code, headers)
        offsets = encapsulated(headers["encapsulated"])
        start = end + 4
        body = None
        body_key = next((key for key in ("res-body", "req-body") if key in offsets), None)
        if body_key is not None:      # read to the last chunk, whether or not the server then closes
            while True:
                if buffer.endswith(b"0\r\n\r\n") and len(buffer) >= start + offsets[body_key] + 5:
                    try:
                        body = dechunk(bytes(buffer[start + offsets[body_key]:]), limit)
                        break
                    except IcapError:
                        pass     # a chunk's data ended like the last chunk: read on
                if not self._fill(sock, buffer, deadline, limit):
                    body = dechunk(bytes(buffer[start + offsets[body_key]:]), limit)
                    break
        else:
            need = start + max(offsets.values(), default=0)
            while len(buffer) < need and self._fill(sock, buffer, deadline, limit):
                pass
        rest = bytes(buffer[start:])
        http_status = None
        if "res-hdr" in offsets:
            head = rest[offsets["res-hdr"]:]
            first = head.split(b"\r\n", 1)[0].split(b" ")
            if len(first) < 2 or not first[0].startswith(b"HTTP/") or not first[1].isdigit():
                raise IcapError(REASON_SCANNER_ERROR, f"ICAP answer encapsulates no HTTP response: {head[:80]!r}")
            http_status = int(first[1])
        return Answer(code, headers, http_status, body, request="req-hdr" in offsets and "res-hdr" not in offsets)

    @staticmethod
    def _fill(sock: socket.socket, buffer: bytearray, deadline: float, limit: int) -> bool:
        if len(buffer) > limit:
            raise IcapError(REASON_SCANNER_ERROR, f"ICAP answer is longer than {limit} bytes")
        sock.settimeout(_left(deadline))
        chunk = sock.recv(CHUNK)
        buffer += chunk
        return bool(chunk)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
