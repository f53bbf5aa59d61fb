"""ClamAV as an inspection engine: the file goes to clamd by INSTREAM over its unix or TCP socket.

    clamd = Clamd("/run/clamav/clamd.ctl", timeout=20.0, max_size=25 * MiB)
    clamd.scan(data)        # -> ("Win.Test.EICAR_HDB-1",) or () ; raises ClamdError when clamd cannot answer

The protocol (clamd(8)): `zINSTREAM\\0`, then chunks of `<length: 4 bytes, network order><bytes>`, a zero length
to end; clamd answers `stream: OK\\0`, `stream: <name> FOUND\\0` (one record per signature with AllMatchScans) or
`<message> ERROR\\0`, and closes. Anything else, no answer in time, or no clamd at all is a ClamdError: the
inspector turns it into an `unscannable` finding, so a file clamd did not vouch for is never reported clean.
clamd unpacks archives itself, so the inspector hands it the whole file once, not each member.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from dataclasses import dataclass

from imguard.model import REASON_SCANNER_ERROR, REASON_TIMEOUT
from imguard.settings import MiB, setting

NAME = "clamav"
CHUNK = 64 * 1024                 # one INSTREAM chunk; clamd's StreamMaxLength bounds the sum, not a chunk
MAX_ANSWER = 64 * 1024            # an answer longer than this is not clamd's
_FOUND = re.compile(r"^stream: (?P<name>.+) FOUND$")


@dataclass(frozen=True)
class ClamavSettings:
    """ClamAV engine (clamd, INSTREAM)"""

    clamd_address: str = setting(
        "", "clamd that scans every file beside YARA, by INSTREAM: a unix socket path (Debian's clamav-daemon "
            "listens on /run/clamav/clamd.ctl; LocalSocket in clamd.conf) or host:port (TCPSocket, usually 3310). "
            "'' = no ClamAV. A detection is an `engine` finding (policy: `engine: clamav`); a clamd that is down, "
            "slow or answers garbage makes the file unscannable, never clean. Keep its signatures fresh with "
            "freshclam.")
    clamd_timeout: float = setting(
        20.0, "Seconds one clamd scan may take, connection to answer; past it the file is unscannable (timeout). "
              "clamd scans a few MB in well under a second with the official signatures; 20 s leaves room for "
              "large archives on a busy host and stays under the gateway's inspect_timeout (30 s), so the "
              "engine's own verdict, not the gateway's timeout fail mode, decides.")
    clamd_max_size: int = setting(
        25 * MiB, "Largest file sent to clamd, in bytes; a bigger one is unscannable (too_large) for ClamAV rather "
                  "than sent and refused. Keep it at most clamd.conf's StreamMaxLength (25 MiB by default), which "
                  "clamd enforces by dropping the stream.")


class ClamdError(Exception):
    """clamd did not give a usable verdict: `reason` is the model's unscannable reason (timeout, scanner_error)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def parse_address(address: str) -> tuple[int, str | tuple[str, int]]:
    """(socket family, address) from "/path", "unix:/path", "host:port", "tcp://host:port" or "[::1]:3310"."""
    text = address.strip()
    if text.startswith("unix:"):
        return socket.AF_UNIX, text[5:]
    if text.startswith("/"):
        return socket.AF_UNIX, text
    text = text.removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host.strip("[]") or not 0 < int(port) < 65536:
        raise ValueError(f"clamd_address: {address!r} is not a socket path, unix:/path or host:port")
    host = host.strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def check_settings(settings: ClamavSettings) -> list[str]:
    """Every problem with the ClamAV settings, as `setting: message` lines naming the value (empty when usable):
    refused at startup, not met as a traceback."""
    errors = []
    if settings.clamd_address:
        try:
            if not parse_address(settings.clamd_address)[1]:
                errors.append(f"clamd_address: {settings.clamd_address!r} names no socket path")
        except ValueError as e:
            errors.append(str(e))
    if not settings.clamd_timeout > 0:
        errors.append(f"clamd_timeout: {settings.clamd_timeout!r} must be more than 0 seconds")
    if settings.clamd_max_size <= 0:
        errors.append(f"clamd_max_size: {settings.clamd_max_size!r} must be more than 0 bytes")
    return errors


def parse_answer(answer: bytes) -> tuple[str, ...]:
    """The signature names in clamd's INSTREAM answer; () for OK. Raises ClamdError for an error or garbage."""
    try:
        text = answer.decode("utf-8")
    except UnicodeDecodeError:
        raise ClamdError(REASON_SCANNER_ERROR, f"clamd answered non-text bytes: {answer[:80]!r}") from None
    records = [r.strip() for r in re.split(r"[\0\n]", text) if r.strip()]
    if not records:
        raise ClamdError(REASON_SCANNER_ERROR, "clamd closed the connection without an answer")
    names: list[str] = []
    for record in records:
        if record == "stream: OK":
            continue
        if (found := _FOUND.match(record)) is not None:
            names.append(found["name"])
        elif record.endswith("ERROR"):
            raise ClamdError(REASON_SCANNER_ERROR, f"clamd: {record[:200]}")
        else:
            raise ClamdError(REASON_SCANNER_ERROR, f"clamd answered something else than a verdict: {record[:200]!r}")
    if names and "stream: OK" in records:
        raise ClamdError(REASON_SCANNER_ERROR, f"clamd answered both OK and FOUND: {text[:200]!r}")
    return tuple(dict.fromkeys(names))


class Clamd:
    """A clamd reached at `address`; one connection per scan (clamd closes it after INSTREAM). Thread-safe."""

    name = NAME

    def __init__(self, address: str, timeout: float = 20.0, max_size: int = 25 * MiB) -> None:
        self.address, self.timeout, self.max_size = address, timeout, max_size
        self._family, self._target = parse_address(address)
        self._version: tuple[float, str] | None = None       # (time.monotonic(), VERSION): for check()'s words

    @classmethod
    def from_settings(cls, settings: ClamavSettings) -> "Clamd | None":
        """The clamd the settings name (None: no clamd_address); raises runtime.ConfigError naming each bad setting."""
        if errors := check_settings(settings):
            from imguard.runtime import ConfigError
            raise ConfigError(errors)
        if not settings.clamd_address:
            return None
        return cls(settings.clamd_address, settings.clamd_timeout, settings.clamd_max_size)

    def describe(self) -> str:
        return f"clamd at {self.address}"

    def scan(self, data: bytes | memoryview, name: str = "") -> tuple[str, ...]:
        deadline = time.monotonic() + self.timeout
        view = memoryview(data)
        try:
            with self._connect(deadline) as sock:
                try:
                    self._send(sock, b"zINSTREAM\0", deadline)
                    for start in range(0, len(view), CHUNK):
                        piece = view[start:start + CHUNK]
                        self._send(sock, struct.pack(">I", len(piece)), deadline)
                        self._send(sock, piece, deadline)
                    self._send(sock, struct.pack(">I", 0), deadline)
                except (BrokenPipeError, ConnectionResetError):
                    pass      # clamd stops reading past StreamMaxLength and says so: read its answer
                return parse_answer(self._receive(sock, deadline))
        except TimeoutError:
            raise ClamdError(REASON_TIMEOUT, f"{self.describe()} gave no verdict within {self.timeout} s") from None
        except OSError as exc:
            raise ClamdError(REASON_SCANNER_ERROR, f"{self.describe()}: {exc.strerror or exc}") from None

    def check(self, data: bytes | memoryview, name: str = "") -> tuple[tuple[str, ...], str]:
        """The detection names and one sentence on the verdict, naming the database version (VERSION, asked at
        most once a minute; a failure to ask does not change the verdict)."""
        names = self.scan(data, name)
        known = self._version
        if known is None or time.monotonic() - known[0] > 60:
            try:
                self.state_tag()
            except ClamdError:
                pass
            known = self._version
        version = known[1] if known is not None else "version unknown"
        if names:
            return names, f"clamav: {', '.join(names)} found by {self.describe()} ({version})"
        return names, f"clamav: scanned clean by {self.describe()} ({version})"

    def version(self, timeout: float | None = None) -> str:
        """clamd's `VERSION` answer ("ClamAV 1.4.6/27000/..."): the engine and database versions."""
        deadline = time.monotonic() + (self.timeout if timeout is None else min(self.timeout, timeout))
        try:
            with self._connect(deadline) as sock:
                self._send(sock, b"zVERSION\0", deadline)
                text = self._receive(sock, deadline).decode("utf-8", "replace").strip("\0\n ")
                self._version = (time.monotonic(), text)
                return text
        except OSError as exc:
            raise ClamdError(REASON_SCANNER_ERROR, f"{self.describe()}: {exc.strerror or exc}") from None

    def state_tag(self, timeout: float = 2.0) -> str:
        """What changes when clamd's signatures change (the verdict cache's check): its VERSION answer, which
        carries the database version and date. Asked with a short timeout: an engine that does not answer leaves
        the tag as it was (its scans fail anyway, and a failed scan is not cached)."""
        return self.version(timeout)      # not by changing self.timeout: scans run on other threads

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(self._target)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _send(sock: socket.socket, data: bytes | memoryview, deadline: float) -> None:
        sock.settimeout(_left(deadline))
        sock.sendall(data)

    @staticmethod
    def _receive(sock: socket.socket, deadline: float) -> bytes:
        answer = bytearray()
        while len(answer) <= MAX_ANSWER:
            sock.settimeout(_left(deadline))
            chunk = sock.recv(4096)
            if not chunk:
                return bytes(answer)
            answer += chunk
        raise ClamdError(REASON_SCANNER_ERROR, f"clamd's answer is longer than {MAX_ANSWER} bytes")


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
