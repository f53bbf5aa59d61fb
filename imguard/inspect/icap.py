"""ICAP as an inspection engine: the file goes to any ICAP server (RFC 3507) as the body of an HTTP response,
by RESPMOD, and the server says whether it would let that response through.

    icap = Icap("icap://127.0.0.1:1344/avscan", timeout=20.0, max_size=25 * MiB)
    icap.scan(data, name="report.pdf")    # -> ("Win.Test.EICAR_HDB-1",) or () ; raises IcapError

This is the way to the commercial engines a company already licenses (they all speak ICAP) and to c-icap.
How the answer is read (RFC 3507 §4.6; the de-facto headers of the AV vendors, draft-stecher-icap-subid):
- `204 No Content`: the server leaves the response as it is: clean.
- `200 OK` with `X-Infection-Found: ...; Threat=<name>;`, `X-Violations-Found` (a count, then four lines per
  violation: file, name, id, disposition), `X-Virus-ID` or `X-Virus-Name`: a detection with that name.
- `200 OK` without those: the server rewrote the response. An encapsulated HTTP status that is not 2xx (a block
  page) or a body that is not the one sent is a detection ("modified by the ICAP server"); the same body back
  (a server that does not answer 204) is clean.
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
_STATUS = re.compile(r"^ICAP/1\.[01] (?P<code>\d{3})(?: (?P<reason>.*))?$")
_THREAT = re.compile(r"Threat=(?P<name>[^;]+);?", re.I)


@dataclass(frozen=True)
class IcapSettings:
    """ICAP engine (RFC 3507 RESPMOD)"""

    icap_url: str = setting(
        "", "ICAP service that scans every file beside YARA, as icap://host[:port]/service (port 1344 by default): "
            "c-icap's virus_scan, or a commercial engine's ICAP service. The file is sent as an HTTP response by "
            "RESPMOD. '' = no ICAP. A detection is an `engine` finding (policy: `engine: icap`); a server that is "
            "down, slow or answers garbage makes the file unscannable, never clean.")
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
    """An ICAP response: status, headers (lower-case names, folded lines joined by "\\n"), and the encapsulated
    HTTP response's status and body when there is one."""
    code: int
    headers: dict[str, str]
    http_status: int | None = None
    body: bytes | None = None


def parse_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "icap" or not parts.hostname:
        raise ValueError(f"icap_url {url!r}: expected icap://host[:port]/service")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"icap_url {url!r}: bad port") from None
    return parts.hostname, port, parts.path.lstrip("/") + (f"?{parts.query}" if parts.query else "")


def request(host: str, port: int, service: str, data_length: int, name: str) -> bytes:
    """The RESPMOD head: ICAP headers, the encapsulated GET and the HTTP response head of the file."""
    http_request = (f"GET /{quote(name or 'file', safe='')} HTTP/1.1\r\nHost: imguard.invalid\r\n\r\n").encode()
    http_response = (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {data_length}\r\n\r\n").encode()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    icap = (f"RESPMOD icap://{authority}/{service} ICAP/1.0\r\n"
            f"Host: {authority}\r\n"
            "User-Agent: imguard\r\n"
            "Allow: 204\r\n"
            "Connection: close\r\n"
            f"Encapsulated: req-hdr=0, res-hdr={len(http_request)}, "
            f"res-body={len(http_request) + len(http_response)}\r\n\r\n").encode()
    return icap + http_request + http_response


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


def detections(answer: Answer, sent: bytes | memoryview) -> tuple[str, ...]:
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
    if answer.http_status is not None and not 200 <= answer.http_status < 300:
        return (f"blocked by the ICAP server (HTTP {answer.http_status})",)
    if answer.body is not None and answer.body != bytes(sent):
        return ("modified by the ICAP server",)
    if answer.http_status is None and answer.body is None:
        raise IcapError(REASON_SCANNER_ERROR, "ICAP server answered 200 without a response or a detection")
    return ()


class Icap:
    """An ICAP service; one connection per scan (Connection: close). Thread-safe."""

    name = NAME

    def __init__(self, url: str, timeout: float = 20.0, max_size: int = 25 * MiB) -> None:
        self.url, self.timeout, self.max_size = url, timeout, max_size
        self.host, self.port, self.service = parse_url(url)

    @classmethod
    def from_settings(cls, settings: IcapSettings) -> "Icap | None":
        if not settings.icap_url:
            return None
        return cls(settings.icap_url, settings.icap_timeout, settings.icap_max_size)

    def describe(self) -> str:
        return f"ICAP {self.url}"

    def scan(self, data: bytes | memoryview, name: str = "") -> tuple[str, ...]:
        deadline = time.monotonic() + self.timeout
        try:
            return detections(self._exchange(data, name, deadline), data)
        except TimeoutError:
            raise IcapError(REASON_TIMEOUT, f"{self.describe()} gave no verdict within {self.timeout} s") from None
        except OSError as exc:
            raise IcapError(REASON_SCANNER_ERROR, f"{self.describe()}: {exc.strerror or exc}") from None

    def state_tag(self, timeout: float = 2.0) -> str:
        """The service's ISTag (RFC 3507 4.7: it changes whenever the service's answers may change, e.g. a new
        signature database), from an OPTIONS request with a short timeout: the verdict cache's check."""
        deadline = time.monotonic() + min(self.timeout, timeout)
        authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        head = (f"OPTIONS icap://{authority}/{self.service} ICAP/1.0\r\nHost: {authority}\r\n"
                "User-Agent: imguard\r\nConnection: close\r\nEncapsulated: null-body=0\r\n\r\n").encode()
        try:
            with socket.create_connection((self.host, self.port), timeout=_left(deadline)) as sock:
                sock.settimeout(_left(deadline))
                sock.sendall(head)
                buffer = bytearray()
                while b"\r\n\r\n" not in buffer and self._fill(sock, buffer, deadline, MAX_HEAD):
                    pass
        except TimeoutError:
            raise IcapError(REASON_TIMEOUT, f"{self.describe()} did not answer OPTIONS") from None
        except OSError as exc:
            raise IcapError(REASON_SCANNER_ERROR, f"{self.describe()}: {exc.strerror or exc}") from None
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            raise IcapError(REASON_SCANNER_ERROR, "ICAP OPTIONS answer has no end of headers")
        code, headers = parse_head(bytes(buffer[:end]))
        if code != 200:
            raise IcapError(REASON_SCANNER_ERROR, f"ICAP OPTIONS answered {code}")
        return headers.get("istag", "")

    def _exchange(self, data: bytes | memoryview, name: str, deadline: float) -> Answer:
        view = memoryview(data)
        with socket.create_connection((self.host, self.port), timeout=_left(deadline)) as sock:
            try:
                sock.settimeout(_left(deadline))
                sock.sendall(request(self.host, self.port, self.service, len(view), name))
                for start in range(0, len(view), CHUNK):
                    piece = view[start:start + CHUNK]
                    sock.settimeout(_left(deadline))
                    sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")     # one copy of CHUNK at most
                sock.settimeout(_left(deadline))
                sock.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass        # a server may answer (and close) before it has read everything: read what it says
            return self._read_answer(sock, deadline, len(view))

    def _read_answer(self, sock: socket.socket, deadline: float, sent: int) -> Answer:
        buffer = bytearray()
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
        if "res-body" in offsets:      # read to the last chunk, whether or not the server then closes
            while True:
                if buffer.endswith(b"0\r\n\r\n") and len(buffer) >= start + offsets["res-body"] + 5:
                    try:
                        body = dechunk(bytes(buffer[start + offsets["res-body"]:]), limit)
                        break
                    except IcapError:
                        pass     # a chunk's data ended like the last chunk: read on
                if not self._fill(sock, buffer, deadline, limit):
                    body = dechunk(bytes(buffer[start + offsets["res-body"]:]), limit)
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
        return Answer(code, headers, http_status, body)

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
