"""ICAP REQMOD and Preview (RFC 3507 4.8, 4.5), the OPTIONS cache, and what --explain says about every engine.

The peers are the real ones of tests/test_engines_clamav_icap.py (its fixtures and classes, imported): Debian's
clamd with the test database, and Debian's c-icap with virus_scan (asking that clamd) and its bundled `echo`
service. c-icap's access log is the independent witness of the method used and of each OPTIONS request; a capture
of the loopback traffic decoded by tshark's ICAP dissector is the witness of the bytes imguard sends (the
Encapsulated offsets against the HTTP heads tshark finds, the preview, `0; ieof`, `100 Continue`, and how much of
a file was sent). What c-icap cannot be made to do (a short Options-TTL, 100 Continue after ieof, a service
without REQMOD) is shown by a small ICAP responder here, a second witness only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imguard.inspect import InspectLimits
from imguard.inspect.icap import Icap, IcapError, parse_url, request
from tests.peers.prosody import free_ports, stop_process
from tests import test_engines_clamav_icap as engines
from tests.test_engines_clamav_icap import (C_ICAP, C_ICAP_MODULES, ENGINE_ONLY, ENGINE_ONLY_NAME, PATTERN,
                                            PATTERN_NAME, IcapPeer, _build_daily, _found, _gateway, _inspect, _require,
                                            _rule_ids, _send, _unscannable)
from tests.test_e2e_irc import CLEAN, WAYS, Chat, Route, across, sha256

pytestmark = pytest.mark.timeout(180)

# The peers' fixtures of tests/test_engines_clamav_icap.py, reused (pytest finds them by these names).
engines_dir, clamd, ircd = engines.engines_dir, engines.clamd, engines.ircd

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
DB_VERSION = 4242              # the daily database built for the explain test; clamd's VERSION names it
# A PNG head: c-icap's virus_scan is not set to scan images (virus_scan.ScanFileTypes in IcapPeer's config), and
# says so with a 204 right after the preview, before the rest of the file is sent.
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(200_000)


@pytest.fixture(scope="module")
def cicap(engines_dir, clamd):
    """c-icap as tests/test_engines_clamav_icap.py configures it, plus its bundled `echo` service."""
    _require(C_ICAP, "c-icap")
    _require(C_ICAP_MODULES, "libc-icap-mod-virus-scan")
    peer = IcapPeer(engines_dir / "c-icap-reqmod", clamd)
    peer.config.write_text(peer.config.read_text() + "Service echo srv_echo.so\n")
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


def _url(peer: IcapPeer, service: str) -> str:
    return f"icap://127.0.0.1:{peer.port}/{service}"


def _access(peer: IcapPeer) -> list[str]:
    """c-icap's access log, one "METHOD service status" per request (c-icap writes it as it answers)."""
    path = peer.directory / "access.log"
    lines = path.read_text().splitlines() if path.exists() else []
    fields = [line.split()[-3:] for line in lines if line.strip()]
    return [f"{method} {service.split('?')[0]} {status}" for method, service, status in fields]     # alias: its name


def _log_after(peer: IcapPeer, before: int, count: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(_access(peer)) < before + count and time.monotonic() < deadline:
        time.sleep(0.05)
    return _access(peer)[before:]


# --- the capture: dumpcap on loopback, decoded by tshark's ICAP dissector --------------------------------------

class Capture:
    """dumpcap on `lo` for one TCP port, from start to stop; `pdml()` is tshark's decoding as ICAP."""

    def __init__(self, directory: Path, port: int):
        self.port, self.path = port, directory / f"icap-{port}-{uuid.uuid4().hex[:6]}.pcapng"
        dumpcap = shutil.which("dumpcap") or "/usr/bin/dumpcap"
        _require(dumpcap, "tshark (dumpcap)")
        self.process = subprocess.Popen([dumpcap, "-i", "lo", "-f", f"tcp port {port}", "-w", str(self.path)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        seen = ""
        while "File:" not in seen:          # dumpcap says where it writes once the capture runs
            line = self.process.stderr.readline()
            if not line:
                raise AssertionError(f"dumpcap did not start: {seen}")
            seen += line

    def stop(self) -> None:
        time.sleep(0.3)                     # the last segments reach the ring before dumpcap is told to stop
        stop_process(self.process)
        self.process.stderr.close()

    def pdml(self) -> ET.Element:
        result = subprocess.run(["tshark", "-r", str(self.path), "-d", f"tcp.port=={self.port},icap", "-T", "pdml"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return ET.fromstring(result.stdout)

    def client_streams(self) -> list[bytes]:
        """What the client sent on each connection to the ICAP port, in order, as tshark reads the segments."""
        result = subprocess.run(["tshark", "-r", str(self.path), "-Y", f"tcp.dstport=={self.port} && tcp.len > 0",
                                 "-T", "fields", "-e", "tcp.stream", "-e", "tcp.payload"],
                                capture_output=True, text=True, timeout=60)
        streams: dict[int, bytes] = {}
        for line in result.stdout.splitlines():
            stream, payload = line.split("\t")
            streams[int(stream)] = streams.get(int(stream), b"") + bytes.fromhex(payload.replace(":", ""))
        return [streams[key] for key in sorted(streams)]


def _icap_messages(pdml: ET.Element) -> list[dict]:
    """Each ICAP message tshark decoded: its first line, its Encapsulated offsets, where its head ends, and the HTTP
    messages tshark found after it (position and size)."""
    messages = []
    for packet in pdml.iter("packet"):
        for icap in packet.iter("proto"):
            if icap.get("name") != "icap":
                continue
            fields = [f for f in icap if f.tag == "field"]
            first = next((f.get("show", "") for f in fields if f.get("show", "").startswith("ICAP/") or
                          " icap://" in f.get("show", "")), "")
            offsets, head_end = {}, None
            for f in fields:
                show = f.get("show", "")
                if show.startswith("Encapsulated:"):
                    value = show.split(":", 1)[1].replace("\\r\\n", "")      # PDML shows CRLF as text
                    offsets = {k.strip(): int(v) for k, v in (part.split("=") for part in value.split(","))}
                if show == "\\r\\n" and head_end is None:
                    head_end = int(f.get("pos")) + int(f.get("size"))
            http = [(int(p.get("pos")), int(p.get("size"))) for p in icap.iter("proto") if p.get("name") == "http"]
            messages.append({"first": first, "offsets": offsets, "head_end": head_end, "http": http})
    return messages


def _check_offsets(message: dict, method: str) -> None:
    """The Encapsulated offsets imguard wrote are where tshark, parsing the HTTP heads itself, finds them."""
    offsets, http, start = message["offsets"], message["http"], message["head_end"]
    assert http and http[0][0] == start, f"the HTTP head does not start where the ICAP head ends: {message}"
    if method == "reqmod":
        assert set(offsets) == {"req-hdr", "req-body"} and offsets["req-hdr"] == 0, offsets
        assert http[0][1] == offsets["req-body"], f"tshark's POST head is {http[0][1]} bytes: {offsets}"
    else:
        assert set(offsets) == {"req-hdr", "res-hdr", "res-body"} and offsets["req-hdr"] == 0, offsets
        assert len(http) == 2, message
        assert http[1][0] - start == offsets["res-hdr"], f"tshark's response head is at {http[1][0] - start}"
        assert http[1][0] + http[1][1] - start == offsets["res-body"], f"tshark's heads end elsewhere: {message}"


# --- REQMOD against the real c-icap ----------------------------------------------------------------------------

@pytest.mark.parametrize("preview", [False, True], ids=["whole", "preview"])
def test_reqmod_names_what_the_service_names(cicap, preview):
    """REQMOD (the file as an HTTP POST body) to c-icap's virus_scan: the hash signature, and the test pattern
    200 kB in (after any preview), are named; a clean file is clean. c-icap's log says each was a REQMOD; c-icap's
    own client (c-icap-client -req) agrees on the detection."""
    engine = Icap(_url(cicap, "avscan"), timeout=20, method="reqmod", preview=preview)
    before = len(_access(cicap))
    assert engine.scan(ENGINE_ONLY, "a.bin") == (_found(ENGINE_ONLY_NAME),)
    assert engine.scan(os.urandom(200_000) + PATTERN, "b.bin") == (_found(PATTERN_NAME),)
    names, words = engine.check(CLEAN, "numbers.bin")
    assert names == () and words.startswith("icap: 204 no modification from " + _url(cicap, "avscan")), words
    log = _log_after(cicap, before, 3 + preview)
    assert [line for line in log if not line.startswith("OPTIONS")] == [
        "REQMOD avscan 200", "REQMOD avscan 200", "REQMOD avscan 204"], log
    assert sum(line.startswith("OPTIONS") for line in log) == (1 if preview else 0), log


def test_independent_client_agrees_on_reqmod(cicap, tmp_path):
    target = tmp_path / "engine-only.bin"
    target.write_bytes(ENGINE_ONLY)
    result = subprocess.run(["c-icap-client", "-i", "127.0.0.1", "-p", str(cicap.port), "-s", "avscan", "-f",
                             str(target), "-req", "http://example.test/upload", "-v"],
                            capture_output=True, text=True, timeout=60)
    assert f"Threat={_found(ENGINE_ONLY_NAME)}" in result.stdout + result.stderr, result.stdout + result.stderr
    assert Icap(_url(cicap, "avscan"), method="reqmod").scan(ENGINE_ONLY) == (_found(ENGINE_ONLY_NAME),)


@pytest.mark.parametrize("method", ["respmod", "reqmod"])
def test_echo_service_hands_the_file_back_unchanged(cicap, method):
    """c-icap's echo service answers 200 with the request or response it got (the same body): clean, in either
    method. With a preview, echo (a demo) answers every other request with 204 at the end of the preview and the
    next by asking for the rest and echoing it: two scans in a row give one of each, both clean."""
    unchanged = (f"icap: 200 with the file unchanged from {_url(cicap, 'echo')} ({method.upper()}, "
                 "ISTag \"CI0001-XXXXXXXXX\")")
    assert Icap(_url(cicap, "echo"), method=method).check(CLEAN, "n.bin") == ((), unchanged)
    engine = Icap(_url(cicap, "echo"), method=method, preview=True)
    outcomes = {engine.check(CLEAN, "n.bin") for _ in range(2)}
    early = f"icap: 204 no modification from {_url(cicap, 'echo')} ({method.upper()}, ISTag \"CI0001-XXXXXXXXX\") " \
            f"after a 1024-byte preview: the service did not ask for the other {len(CLEAN) - 1024} bytes"
    assert outcomes == {((), unchanged), ((), early)}, outcomes


# --- Preview on the wire: tshark's reading of what imguard sent ---------------------------------------------------

@pytest.mark.parametrize("method", ["respmod", "reqmod"])
def test_preview_on_the_wire(cicap, tmp_path, method):
    """Captured and decoded by tshark, for each method: OPTIONS first (once: cached), then the request with
    `Preview: 1024` whose Encapsulated offsets are where tshark finds the HTTP heads. A clean text file (scanned by
    virus_scan): 100 Continue, then the rest, then 204: the whole file went. A PNG of 200 kB (a type virus_scan is
    not set to scan): 204 right after the preview, and the client sent about the preview, not the file. A file
    smaller than the preview: the preview ends with `0; ieof` and no 100 Continue comes."""
    engine = Icap(_url(cicap, "avscan"), timeout=20, method=method, preview=True)
    capture = Capture(tmp_path, cicap.port)
    try:
        clean = engine.check(CLEAN, "numbers.txt")
        png = engine.check(PNG, "picture.png")
        small = engine.check(b"a short note\n", "note.txt")
    finally:
        capture.stop()
    assert clean[0] == () and "preview" not in clean[1], clean
    assert png[0] == () and png[1].endswith(f"after a 1024-byte preview: the service did not ask for the other "
                                            f"{len(PNG) - 1024} bytes"), png
    assert small[0] == () and "preview" not in small[1], small
    messages = _icap_messages(capture.pdml())
    firsts = [m["first"] for m in messages]
    requests = [m for m in messages if m["first"].startswith(method.upper() + " ")]
    assert sum(f.startswith("OPTIONS ") for f in firsts) == 1, firsts
    assert len(requests) == 3, firsts
    for message in requests:
        _check_offsets(message, method)
    assert sum("100 Continue" in f for f in firsts) == 1, f"one 100 Continue (the clean file's): {firsts}"
    options, clean_sent, png_sent, small_sent = capture.client_streams()
    assert options.startswith(b"OPTIONS ") and options.endswith(b"Encapsulated: null-body=0\r\n\r\n")
    for sent in (clean_sent, png_sent, small_sent):
        assert sent.startswith(method.upper().encode() + b" ") and b"\r\nPreview: 1024\r\n" in sent, sent[:300]
    assert len(clean_sent) > len(CLEAN) and clean_sent.endswith(b"\r\n0\r\n\r\n"), "after 100 Continue: all"
    assert len(png_sent) < 1024 + 600 and png_sent.endswith(b"\r\n400\r\n" + PNG[:1024] + b"\r\n0\r\n\r\n"), (
        f"the PNG: {len(png_sent)} bytes sent, the preview only")
    assert small_sent.endswith(b"\r\nd\r\na short note\n\r\n0; ieof\r\n\r\n"), small_sent[-60:]


def test_options_are_asked_once_per_ttl_of_the_real_service(cicap):
    """c-icap's Options-TTL is 3600 s: ten scans, one OPTIONS in its log; a new engine (a reload) asks again;
    state_tag (the verdict cache's check) asks too and gives the ISTag the scans report."""
    engine = Icap(_url(cicap, "avscan"), method="reqmod", preview=True)
    before = len(_access(cicap))
    for _ in range(10):
        assert engine.scan(CLEAN, "n.bin") == ()
    log = _log_after(cicap, before, 11)
    assert log.count("OPTIONS avscan 200") == 1 and log.count("REQMOD avscan 204") == 10, log
    assert engine.state_tag().startswith('"CI0001-')
    assert _log_after(cicap, before, 12)[-1] == "OPTIONS avscan 200"


# --- a small ICAP responder: what c-icap cannot be made to show ---------------------------------------------------

class Responder:
    """An ICAP server on loopback with a given OPTIONS answer; after a REQMOD/RESPMOD head and its preview it
    answers `after_preview` (a whole ICAP answer, or b"100" for 100 Continue then `final`). Records requests."""

    def __init__(self, options: bytes, after_preview: bytes = b"100",
                 final: bytes = b"ICAP/1.0 204 No Content\r\nISTag: \"r1\"\r\n\r\n"):
        self.options, self.after_preview, self.final = options, after_preview, final
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"icap://127.0.0.1:{self.sock.getsockname()[1]}/svc"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self._one(conn)
                except OSError:
                    pass

    def _one(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        self.requests.append(data.split(b"\r\n", 1)[0])
        if data.startswith(b"OPTIONS"):
            conn.sendall(self.options)
            return
        while not (data.endswith(b"\r\n0\r\n\r\n") or data.endswith(b"0; ieof\r\n\r\n")
                   or data.endswith(b"\r\n\r\n0\r\n\r\n")):
            data += conn.recv(65536)
        if self.after_preview != b"100":
            conn.sendall(self.after_preview)
            return
        conn.sendall(b"ICAP/1.0 100 Continue\r\n\r\n")
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                return
            rest += chunk
        conn.sendall(self.final)

    def close(self) -> None:
        self.sock.close()


def _options(headers: str) -> bytes:
    return f"ICAP/1.0 200 OK\r\nISTag: \"r1\"\r\n{headers}Encapsulated: null-body=0\r\n\r\n".encode()


def test_options_ttl_expires_and_is_asked_again():
    """Options-TTL: 1: a scan within the second uses the cached answer, one after it asks OPTIONS again."""
    responder = Responder(_options("Methods: REQMOD\r\nPreview: 10\r\nOptions-TTL: 1\r\n"))
    try:
        engine = Icap(responder.url, timeout=5, method="reqmod", preview=True)
        for _ in range(2):
            assert engine.scan(b"x" * 100) == ()
        time.sleep(1.1)
        assert engine.scan(b"x" * 100) == ()
        assert [r.split(b" ")[0] for r in responder.requests] == [b"OPTIONS", b"REQMOD", b"REQMOD", b"OPTIONS",
                                                                  b"REQMOD"], responder.requests
    finally:
        responder.close()


@pytest.mark.parametrize("case", ["no-reqmod", "options-404", "continue-after-ieof", "bad-preview"])
def test_a_service_without_a_usable_answer_leaves_the_file_unscannable(case):
    """A service that does not offer REQMOD, answers OPTIONS with an error or a malformed Preview, or asks for more
    after the client said the preview was the whole file: the file is unscannable (scanner_error), never clean,
    through the Inspector with the settings (icap_method reqmod, icap_preview on)."""
    options = {"no-reqmod": _options("Methods: RESPMOD\r\nPreview: 10\r\n"),
               "options-404": b"ICAP/1.0 404 Service not found\r\n\r\n",
               "continue-after-ieof": _options("Methods: REQMOD\r\nPreview: 4096\r\n"),
               "bad-preview": _options("Methods: REQMOD\r\nPreview: lots\r\n")}[case]
    responder = Responder(options, after_preview=b"100", final=b"ICAP/1.0 100 Continue\r\n\r\n")
    try:
        limits = InspectLimits(icap_url=responder.url, icap_method="reqmod", icap_timeout=3)
        report = _inspect(limits, b"short clean text\n" * 10)
        assert _unscannable(report) == [("icap", "scanner_error")], report.findings
        assert [v["verdict"] for v in report.engine_verdicts] == ["unscannable"], report.engine_verdicts
    finally:
        responder.close()


def test_a_verdict_at_the_end_of_the_preview_is_read():
    """A detection answered right after the preview (not 100 Continue) is the verdict; the rest is not sent."""
    found = (b"ICAP/1.0 200 OK\r\nISTag: \"r1\"\r\nX-Infection-Found: Type=0; Resolution=2; Threat=Early.Test;\r\n"
             b"Encapsulated: res-hdr=0, null-body=19\r\n\r\nHTTP/1.1 403 No\r\n\r\n")
    responder = Responder(_options("Methods: RESPMOD, REQMOD\r\nPreview: 16\r\n"), after_preview=found)
    try:
        names, words = Icap(responder.url, timeout=3, method="reqmod", preview=True).check(b"y" * 5000, "f.bin")
        assert names == ("Early.Test",) and "1 detection(s)" in words, words
    finally:
        responder.close()


def test_request_heads_and_settings():
    """The REQMOD head is a POST of the file's length; an unknown method is refused when the engine is made."""
    head = request("127.0.0.1", 1344, "svc", 12, "a b.bin", "reqmod", preview=0).decode()
    assert head.startswith("REQMOD icap://127.0.0.1:1344/svc ICAP/1.0\r\n") and "Preview: 0\r\n" in head
    http = head.split("\r\n\r\n", 1)[1]
    assert http.startswith("POST /a%20b.bin HTTP/1.1\r\n") and "Content-Length: 12\r\n" in http
    assert f"Encapsulated: req-hdr=0, req-body={len(http)}\r\n" in head
    with pytest.raises(ValueError, match="icap_method"):
        Icap("icap://127.0.0.1/x", method="options")
    assert parse_url("icap://[::1]/svc") == ("::1", 1344, "svc")
    with pytest.raises(IcapError):
        Icap(f"icap://127.0.0.1:{free_ports(1)[0]}/x", timeout=2, method="reqmod", preview=True).scan(b"x")


# --- --explain and the alert: what every engine said, clean included -----------------------------------------------

@pytest.fixture(scope="module")
def dated_clamd(clamd):
    """The same clamd with a daily database of version DB_VERSION (sigtool-built, as freshclam delivers one),
    reloaded: its VERSION names the database, as with the official signatures."""
    _require(shutil.which("sigtool") or "/usr/bin/sigtool", "clamav")
    _build_daily(clamd.directory / "db", DB_VERSION, "Test.Daily:0:*:5a5a5a5a5a5a5a5a5a5a5a5a\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(clamd.socket_path))
        s.sendall(b"zRELOAD\0")
        assert s.recv(64).startswith(b"RELOADING")
    deadline = time.monotonic() + 60
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(clamd.socket_path))
            s.sendall(b"zVERSION\0")
            version = s.recv(256).decode().strip("\0\n")
        if f"/{DB_VERSION}/" in version:
            return clamd, version
        assert time.monotonic() < deadline, f"clamd did not load the daily database: {version}"
        time.sleep(0.2)


def test_scan_explain_says_what_each_engine_answered(dated_clamd, cicap, tmp_path):
    """`imguard scan --explain` with both engines (ICAP by REQMOD with preview): a clean file gets one line per
    engine saying it scanned clean, with clamd's database version (as sigtool reads it from the database file)
    and c-icap's 204; a detected file gets the engines' detections in the same lines; `--json` carries them in
    the report's engine_verdicts."""
    clamd, version = dated_clamd
    info = subprocess.run(["sigtool", "--info", str(clamd.directory / "db" / "daily.cud")], capture_output=True,
                          text=True, timeout=60).stdout
    assert f"Version: {DB_VERSION}" in info, info
    clean, detected = tmp_path / "numbers.bin", tmp_path / "engine-only.bin"
    clean.write_bytes(CLEAN)
    detected.write_bytes(ENGINE_ONLY)
    command = [str(PYTHON), "-m", "imguard", "scan", "--data-dir", str(tmp_path / "data"), "--clamd-address",
               str(clamd.socket_path), "--icap-url", _url(cicap, "avscan"), "--icap-method", "reqmod", "--explain"]
    before = len(_access(cicap))
    result = subprocess.run(command + [str(clean)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"  engine   clamav: scanned clean by clamd at {clamd.socket_path} ({version})"
            in result.stdout), result.stdout
    assert f"  engine   icap: 204 no modification from {_url(cicap, 'avscan')} (REQMOD, ISTag" in result.stdout
    assert "REQMOD avscan 204" in _log_after(cicap, before, 2), "c-icap's log: the 204 the explanation quotes"
    result = subprocess.run(command + [str(detected)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    name = _found(ENGINE_ONLY_NAME)
    assert f"  engine   clamav: {name} found by clamd at {clamd.socket_path} ({version})" in result.stdout
    assert f"  engine   icap: 200 with 1 detection(s) from {_url(cicap, 'avscan')} (REQMOD" in result.stdout
    assert "decision BLOCK  rules: malware-engine" in result.stdout, result.stdout
    result = subprocess.run(command[:-1] + ["--json", str(clean)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    verdicts = json.loads(result.stdout.splitlines()[-1])["report"]["engine_verdicts"]
    assert [(v["engine"], v["verdict"]) for v in verdicts] == [("clamav", "clean"), ("icap", "clean")], verdicts


def test_explain_says_which_engine_gave_no_verdict(dated_clamd, tmp_path):
    """An engine that is down is said to have given no verdict, beside the one that scanned clean."""
    clamd, version = dated_clamd
    target = tmp_path / "numbers.bin"
    target.write_bytes(CLEAN)
    result = subprocess.run([str(PYTHON), "-m", "imguard", "scan", "--data-dir", str(tmp_path / "data"),
                             "--clamd-address", str(clamd.socket_path), "--icap-url",
                             f"icap://127.0.0.1:{free_ports(1)[0]}/avscan", "--icap-method", "reqmod", "--explain",
                             str(target)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"  engine   clamav: scanned clean by clamd at {clamd.socket_path} ({version})" in result.stdout
    assert "  engine   icap: no verdict (scanner_error): ICAP icap://127.0.0.1:" in result.stdout, result.stdout


# --- through the real gateway: REQMOD with preview, IRC DCC across ngIRCd ---------------------------------------

@pytest.fixture(scope="module")
def reqmod_gateway(engines_dir, ircd, cicap):
    """`imguard run` with ICAP by REQMOD (preview on: the default) to c-icap's virus_scan, itself asking clamd."""
    yield from _gateway(engines_dir / "gw-icap-reqmod", ircd, ["--icap-url", _url(cicap, "avscan"),
                                                                "--icap-method", "reqmod", "--icap-timeout", "5"])


@pytest.fixture
def reqmod_route(reqmod_gateway, ircd, clamd, cicap):
    for peer in (clamd, cicap):
        if peer.process is None:
            peer.start()
    reqmod_gateway.check_alive()
    offset = reqmod_gateway.log_size()
    yield Route("imguard", False, ircd, reqmod_gateway)
    reqmod_gateway.check_alive()
    errors = reqmod_gateway.errors_since(offset)
    assert not errors, "imguard logged errors during the test:\n" + "\n".join(errors)


@pytest.mark.parametrize("way", WAYS)
def test_reqmod_blocks_the_detection_and_passes_the_clean_file(reqmod_route, cicap, way):
    """By DCC between outside and inside: a file only the engine's database names is blocked (nothing arrives,
    the inside person is told, rule malware-engine), a clean file arrives byte-identical; both alerts say what the ICAP
    service answered, by REQMOD, and c-icap's log has those REQMODs."""
    route = reqmod_route
    before = len(_access(cicap))
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        blocked = f"pattern-reqmod-{way}-{uuid.uuid4().hex[:6]}.txt"
        # the test pattern (.ndb) in bytes new to the verdict cache, so c-icap is asked each time
        t = _send(chat, route, sender, receiver, blocked, b"notes " + PATTERN + uuid.uuid4().hex.encode() + b"\n")
        assert bytes(t.received) == b"", f"{receiver.nick} received {len(t.received)} bytes of the blocked file"
        alert = route.wait_alert(lambda e: e.get("file", {}).get("name") == blocked)
        assert alert and alert["event"]["action"] == "block" and "malware-engine" in _rule_ids(alert), alert
        assert alert["imguard"]["engines"] == [{"engine": "icap", "signature": _found(PATTERN_NAME)}]
        [verdict] = alert["imguard"]["report"]["engine_verdicts"]
        assert verdict["verdict"] == "detected" and "(REQMOD" in verdict["detail"], verdict
        inside = receiver if way == "inbound" else sender
        assert chat.pump(lambda: any(blocked in n for n in inside.imguard_notices()), 10), inside.notices
        chat.sentinel(sender, receiver, "after the REQMOD block")
        assert bytes(t.received) == b"", "bytes of the blocked file arrived late"
        clean = f"numbers-reqmod-{way}-{uuid.uuid4().hex[:6]}.bin"
        payload = CLEAN + uuid.uuid4().bytes
        t2 = _send(chat, route, sender, receiver, clean, payload)
        assert sha256(bytes(t2.received)) == sha256(payload), f"{receiver.nick} got {len(t2.received)} bytes"
        alert = route.wait_alert(lambda e: e.get("file", {}).get("name") == clean)
        assert alert and alert["event"]["action"] == "allow", alert and alert["event"]
        [verdict] = alert["imguard"]["report"]["engine_verdicts"]
        assert verdict == {"engine": "icap", "verdict": "clean", "detail": verdict["detail"]}
        assert verdict["detail"].startswith(f"icap: 204 no modification from {_url(cicap, 'avscan')} (REQMOD")
    log = _log_after(cicap, before, 2)
    assert "REQMOD avscan 200" in log and "REQMOD avscan 204" in log, log
