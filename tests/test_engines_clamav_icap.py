"""ClamAV (clamd, INSTREAM) and ICAP (RFC 3507 RESPMOD) as inspection engines beside YARA, with real servers.

The peers are real: Debian's clamd (/usr/sbin/clamd), started here with a generated clamd.conf and a signature
database built here in ClamAV's own formats (this machine cannot download one: `.hdb` md5:size:name for a test
file, `.ndb` hex patterns for EICAR and a test string), and Debian's c-icap with c-icap-modules' virus_scan
service, which asks that clamd. Through the real `imguard run` in front of a real ngIRCd (tests/peers/ngircd.py) a
file only the test database names is blocked by DCC in both directions, a clean file passes, and with the engine
stopped a clean file is blocked as unscannable; for ClamAV and for ICAP alike. `clamscan` and `c-icap-client`, other
clients of the same servers, say independently what our clients should get.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from imguard.inspect import InspectLimits, Inspector, load_signatures
from imguard.inspect.clamav import Clamd, ClamdError, parse_answer
from imguard.inspect.icap import Icap, IcapError, parse_url
from imguard.model import ENGINE_MATCH, UNSCANNABLE, FileReport, Finding
from imguard.policy import PolicyError, load_policy
from tests.peers.folders import kept_if_failed
from tests.peers.ngircd import IrcGateway, NgIrcd
from tests.peers.prosody import free_ports, stop_process, wait_for_port
from tests.test_e2e_irc import CLEAN, EICAR, WAYS, Chat, Route, across, sha256

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
CLAMD = "/usr/sbin/clamd"
C_ICAP = shutil.which("c-icap") or "/usr/bin/c-icap"
C_ICAP_MODULES = next(iter(sorted(glob.glob("/usr/lib/*/c_icap/virus_scan.so"))), "")

# A harmless file that only the test database names (by its MD5 and size, .hdb): no YARA rule matches it.
ENGINE_ONLY = b"imguard engine test: harmless bytes that only the test ClamAV database names\n" * 40 + bytes(range(256))
ENGINE_ONLY_NAME = "Imguard.Test.EngineOnly"
PATTERN = b"IMGUARD-ENGINE-TEST-PATTERN-5e1f0c"        # .ndb: anywhere in a file
PATTERN_NAME = "Imguard.Test.Pattern"
EICAR_NAME = "Imguard.Test.Eicar"


def _found(name: str) -> str:
    return f"{name}.UNOFFICIAL"        # clamd's suffix for a signature from a database that is not signed


def write_database(directory: Path) -> None:
    """The test signatures in ClamAV's formats: an MD5 hash signature (.hdb: md5:size:name) and two body
    signatures (.ndb: name:target type:offset:hex), one for EICAR and one for a test pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "imguard-test.hdb").write_text(
        f"{hashlib.md5(ENGINE_ONLY).hexdigest()}:{len(ENGINE_ONLY)}:{ENGINE_ONLY_NAME}\n")
    (directory / "imguard-test.ndb").write_text(f"{EICAR_NAME}:0:*:{EICAR[:48].hex()}\n"
                                                f"{PATTERN_NAME}:0:*:{PATTERN.hex()}\n")


# --- peers ------------------------------------------------------------------------------------------------

class ClamdPeer:
    """The real clamd, in the foreground, on a unix socket and on a loopback TCP port, with the test database."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.socket_path = directory / "clamd.sock"
        self.tcp_port = free_ports(1)[0]
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)
        write_database(directory / "db")
        (directory / "tmp").mkdir(exist_ok=True)
        self.config = directory / "clamd.conf"
        self.config.write_text(f"Foreground yes\nLocalSocket {self.socket_path}\nTCPSocket {self.tcp_port}\n"
                               f"TCPAddr 127.0.0.1\nDatabaseDirectory {directory / 'db'}\n"
                               f"TemporaryDirectory {directory / 'tmp'}\nLogFile {directory / 'clamd.log'}\n"
                               "LogVerbose yes\n")

    def start(self, timeout: float = 60.0) -> "ClamdPeer":
        out = open(self.directory / "clamd.out", "ab")
        self.process = subprocess.Popen([CLAMD, "-c", str(self.config)], stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while not self.answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"clamd did not start:\n{self.logs()}")
            time.sleep(0.1)
        return self

    def answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.socket_path))
                s.sendall(b"zPING\0")
                return s.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in
                         (self.directory / "clamd.out", self.directory / "clamd.log") if p.exists())


class IcapPeer:
    """The real c-icap, with c-icap-modules' virus_scan service asking `clamd` (clamd_mod) on its unix socket."""

    def __init__(self, directory: Path, clamd: ClamdPeer):
        self.directory = directory
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen | None = None
        modules = Path(C_ICAP_MODULES).parent
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "c-icap.conf"
        self.config.write_text(
            f"PidFile {directory / 'c-icap.pid'}\nCommandsSocket {directory / 'c-icap.ctl'}\n"
            f"Port 127.0.0.1:{self.port}\nTmpDir {directory}\nServerLog {directory / 'server.log'}\n"
            f"AccessLog {directory / 'access.log'}\nDebugLevel 1\nStartServers 1\nMaxServers 2\n"
            "MinSpareThreads 2\nMaxSpareThreads 4\nThreadsPerChild 4\nTimeout 30\n"
            f"ModulesDir {modules}\nServicesDir {modules}\nTemplateDir /usr/share/c_icap/templates/\n"
            "LoadMagicFile /etc/c-icap/c-icap.magic\n"
            f"Module common clamd_mod.so\nclamd_mod.ClamdSocket {clamd.socket_path}\n"
            "Service antivirus_module virus_scan.so\n"
            "ServiceAlias avscan virus_scan?allow204=on&sizelimit=off&mode=simple\n"
            "virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GIF JPEG MSOFFICE\n"
            "virus_scan.DefaultEngine clamd\nvirus_scan.MaxObjectSize 25M\n")

    @property
    def url(self) -> str:
        return f"icap://127.0.0.1:{self.port}/avscan"

    def start(self, timeout: float = 30.0) -> "IcapPeer":
        out = open(self.directory / "c-icap.out", "ab")
        self.process = subprocess.Popen([C_ICAP, "-N", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        wait_for_port(self.port, timeout, self.process, what="c-icap")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in
                         (self.directory / "c-icap.out", self.directory / "server.log") if p.exists())


def _require(path: str, package: str) -> None:
    if not path or not Path(path).exists():
        pytest.skip(f"{path or package} is not installed: run `tools/setup.sh test` (Debian's {package})")


@pytest.fixture(scope="module")
def engines_dir(request):
    with kept_if_failed(request, "imguard-engines-") as directory:
        yield directory


@pytest.fixture(scope="module")
def clamd(engines_dir):
    _require(CLAMD, "clamav-daemon")
    peer = ClamdPeer(engines_dir / "clamd").start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def icap(engines_dir, clamd):
    _require(C_ICAP, "c-icap")
    _require(C_ICAP_MODULES, "libc-icap-mod-virus-scan")
    peer = IcapPeer(engines_dir / "c-icap", clamd).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def running(clamd, icap):
    """Both servers up at the start and at the end of the test (a test may stop one)."""
    for peer in (clamd, icap):
        if peer.process is None:
            peer.start()
    yield clamd, icap
    for peer in (clamd, icap):
        if peer.process is None:
            peer.start()


# --- the engines, against the real servers ---------------------------------------------------------------

def test_independent_clients_agree_on_the_test_database(running, tmp_path):
    """clamscan (ClamAV's own scanner, reading the database itself) and c-icap-client (c-icap's own client) name
    the test files as the engines should, and pass the clean one: the peers are proven before imguard is judged."""
    clamd, icap = running
    files = {"engine-only.bin": (ENGINE_ONLY, ENGINE_ONLY_NAME), "eicar.com": (EICAR, EICAR_NAME),
             "pattern.txt": (b"notes " + PATTERN + b" end\n", PATTERN_NAME), "clean.bin": (CLEAN, None)}
    for name, (data, expected) in files.items():
        (tmp_path / name).write_bytes(data)
        result = subprocess.run(["clamscan", "--no-summary", "-d", str(clamd.directory / "db"), str(tmp_path / name)],
                                capture_output=True, text=True, timeout=60)
        if expected:
            assert result.returncode == 1 and f"{_found(expected)} FOUND" in result.stdout, result.stdout
        else:
            assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout
    result = subprocess.run(["c-icap-client", "-i", "127.0.0.1", "-p", str(icap.port), "-s", "avscan", "-f",
                             str(tmp_path / "engine-only.bin"), "-resp", "http://example.test/f", "-v"],
                            capture_output=True, text=True, timeout=60)
    assert f"Threat={_found(ENGINE_ONLY_NAME)}" in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_clamd_names_what_its_database_names(running, transport):
    """INSTREAM over the unix socket and over TCP: the hash signature, the EICAR pattern and the test pattern
    inside a larger file (several 64 KiB chunks) are named; a clean file is ()."""
    clamd, _ = running
    address = str(clamd.socket_path) if transport == "unix" else f"127.0.0.1:{clamd.tcp_port}"
    engine = Clamd(address, timeout=20)
    assert engine.scan(ENGINE_ONLY) == (_found(ENGINE_ONLY_NAME),)
    assert engine.scan(EICAR) == (_found(EICAR_NAME),)
    assert engine.scan(os.urandom(300_000) + PATTERN + os.urandom(1000)) == (_found(PATTERN_NAME),)
    assert engine.scan(CLEAN) == ()
    assert engine.version().startswith("ClamAV ")


def test_icap_names_what_the_service_names(running):
    """RESPMOD to c-icap's virus_scan: its X-Infection-Found threat is the detection; a clean file is its 204."""
    _, icap = running
    engine = Icap(icap.url, timeout=20)
    assert engine.scan(ENGINE_ONLY, "a.bin") == (_found(ENGINE_ONLY_NAME),)
    assert engine.scan(os.urandom(200_000) + PATTERN, "b.bin") == (_found(PATTERN_NAME),)
    assert engine.scan(CLEAN, "numbers.bin") == ()


def _inspect(limits: InspectLimits, data: bytes, name: str = "f.bin") -> FileReport:
    inspector = Inspector(load_signatures(ROOT / "signatures"), limits)
    try:
        return inspector.inspect(data, name=name)
    finally:
        inspector.close()


def _engine_findings(report: FileReport) -> list[tuple[str, str]]:
    return [(f.data["engine"], f.data["signature"]) for f in report.findings if f.kind == ENGINE_MATCH]


def _unscannable(report: FileReport) -> list[tuple[str, str]]:
    return [(f.data.get("engine", ""), f.data["reason"]) for f in report.findings if f.kind == UNSCANNABLE]


def test_inspector_reports_both_engines_in_one_report(running):
    """Both engines on: each detection is its own `engine` finding in the report YARA's findings are in."""
    clamd, icap = running
    limits = InspectLimits(clamd_address=str(clamd.socket_path), icap_url=icap.url)
    report = _inspect(limits, EICAR, "eicar.com")
    assert sorted(_engine_findings(report)) == [("clamav", _found(EICAR_NAME)), ("icap", _found(EICAR_NAME))]
    assert any(f.kind == "yara" for f in report.findings), "YARA's own EICAR rule is in the same report"
    clean = _inspect(limits, CLEAN)
    assert _engine_findings(clean) == [] and _unscannable(clean) == []


class _Garbage:
    """A listener that answers `reply` to whatever it is sent (b"" : accept and say nothing until closed)."""

    def __init__(self, family: int, address, reply: bytes):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(8)
        self.address = self.sock.getsockname()
        self.reply, self.held = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.reply:
                conn.recv(65536)
                conn.sendall(self.reply)
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("case", ["down", "garbage", "timeout", "too_large"])
def test_an_engine_without_a_verdict_makes_the_file_unscannable(tmp_path, case):
    """An engine that is down, answers garbage, does not answer in time, or is not sent a file over its size limit
    leaves the file unscannable, with the engine's name and the reason; never clean (and never an exception)."""
    servers = []
    try:
        if case == "down":
            clamd_address, port = str(tmp_path / "nobody.sock"), free_ports(1)[0]
        else:
            reply = {"garbage": b"HELLO there\0", "timeout": b"", "too_large": b"stream: OK\0"}[case]
            unix = _Garbage(socket.AF_UNIX, str(tmp_path / "clamd.sock"), reply)
            icap_reply = {"garbage": b"HTTP/1.1 200 OK\r\n\r\n", "timeout": b"",
                          "too_large": b"ICAP/1.0 204 No Content\r\n\r\n"}[case]
            tcp = _Garbage(socket.AF_INET, ("127.0.0.1", 0), icap_reply)
            servers = [unix, tcp]
            clamd_address, port = unix.address, tcp.address[1]
        limits = InspectLimits(clamd_address=clamd_address, clamd_timeout=1.0, icap_url=f"icap://127.0.0.1:{port}/av",
                               icap_timeout=1.0, **({"clamd_max_size": 100, "icap_max_size": 100}
                                                    if case == "too_large" else {}))
        started = time.monotonic()
        report = _inspect(limits, CLEAN)
        reason = {"down": "scanner_error", "garbage": "scanner_error", "timeout": "timeout",
                  "too_large": "too_large"}[case]
        assert sorted(_unscannable(report)) == [("clamav", reason), ("icap", reason)], report.findings
        assert _engine_findings(report) == []
        assert time.monotonic() - started < 5, "the two engines time out in parallel, each within its timeout"
    finally:
        for server in servers:
            server.close()


def test_clamd_answers_are_read_strictly():
    assert parse_answer(b"stream: OK\0") == ()
    assert parse_answer(b"stream: Eicar-Signature FOUND\0") == ("Eicar-Signature",)
    assert parse_answer(b"stream: A FOUND\0stream: B FOUND\0") == ("A", "B")       # AllMatchScans
    for bad in (b"", b"INSTREAM size limit exceeded. ERROR\0", b"stream: maybe\0", b"\xff\xfe",
                b"stream: OK\0stream: A FOUND\0"):
        with pytest.raises(ClamdError):
            parse_answer(bad)
    with pytest.raises(ValueError):
        Clamd("localhost")
    with pytest.raises(ValueError):
        parse_url("http://127.0.0.1/avscan")
    assert parse_url("icap://127.0.0.1/avscan?mode=simple") == ("127.0.0.1", 1344, "avscan?mode=simple")
    with pytest.raises(IcapError):
        Icap(f"icap://127.0.0.1:{free_ports(1)[0]}/x", timeout=2).scan(b"x")


def _icap_200(headers: str, http_head: bytes, body: bytes | None) -> bytes:
    """An ICAP 200 answer encapsulating `http_head` and (chunked) `body`, as a server writes it."""
    encapsulated = f"res-hdr=0, {'res-body' if body is not None else 'null-body'}={len(http_head)}"
    chunked = (b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n") if body else (b"0\r\n\r\n" if body == b"" else b"")
    return (f"ICAP/1.0 200 OK\r\nISTag: \"x\"\r\n{headers}Encapsulated: {encapsulated}\r\n\r\n").encode() \
        + http_head + chunked


@pytest.mark.parametrize("case", ["violations", "virus-id", "block-page", "same-body", "rewritten", "error-status"])
def test_icap_answers_other_servers_give(case):
    """The answers ICAP servers other than c-icap give, over a socket that stays open after the answer (keep-alive):
    X-Violations-Found with its folded lines, X-Virus-ID, a block page (HTTP 403), the file sent back unchanged
    (clean), a rewritten body, and an ICAP error status (no verdict)."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    answers = {
        "violations": _icap_200("X-Violations-Found: 1\r\n\tf.bin\r\n\tW97M.Test\r\n\t1\r\n\t0\r\n",
                                b"HTTP/1.1 403 Forbidden\r\n\r\n", None),
        "virus-id": _icap_200("X-Virus-ID: EICAR Test String\r\n", b"HTTP/1.1 403 Forbidden\r\n\r\n", b"blocked"),
        "block-page": _icap_200("", b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\n\r\n", b"<h1>no</h1>"),
        "same-body": _icap_200("", ok, b"hello"),
        "rewritten": _icap_200("", ok, b"HELLO"),
        "error-status": b"ICAP/1.0 500 Server Error\r\nISTag: \"x\"\r\n\r\n",
    }
    expected = {"violations": ("W97M.Test",), "virus-id": ("EICAR Test String",),
                "block-page": ("blocked by the ICAP server (HTTP 403)",), "same-body": (),
                "rewritten": ("modified by the ICAP server",)}
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    held = []

    def serve():
        conn, _ = server.accept()
        held.append(conn)
        received = b""
        while not received.endswith(b"0\r\n\r\n"):
            received += conn.recv(65536)
        conn.sendall(answers[case])          # and keeps the connection open

    threading.Thread(target=serve, daemon=True).start()
    try:
        engine = Icap(f"icap://127.0.0.1:{server.getsockname()[1]}/scan", timeout=3)
        if case == "error-status":
            with pytest.raises(IcapError, match="500"):
                engine.scan(b"hello", "f.bin")
        else:
            assert engine.scan(b"hello", "f.bin") == expected[case]
    finally:
        server.close()
        for conn in held:
            conn.close()


# --- policy: the engine conditions and the bundled rule ---------------------------------------------------

def _decide(policy, findings: list[Finding]):
    from imguard.model import ChatContext
    report = FileReport(name="f.bin", path="f.bin", size=10, findings=findings)
    return policy.decide_file(report, ChatContext(protocol="irc", direction="internal"))


def test_bundled_policy_blocks_an_engine_detection_as_malware():
    """`engine: "*"` in the bundled rules: a ClamAV or ICAP detection is blocked as malware in any direction."""
    policy = load_policy(ROOT / "rules")
    for engine in ("clamav", "icap"):
        decision = _decide(policy, [Finding(ENGINE_MATCH, "x", "", {"engine": engine, "signature": "Win.Test.A"})])
        assert decision.action == "block" and "malware-engine" in decision.rule_ids, decision.rule_ids
    assert _decide(policy, []).action == "allow"


def test_engine_conditions_match_engine_and_signature(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "rules:\n"
        "  - {id: by-clamav, title: t, severity: high, action: block, applies_to: file, match: {engine: clamav}}\n"
        "  - {id: eicar-anywhere, title: t, severity: low, action: alert, applies_to: file,\n"
        "     match: {engine_signature: '*eicar*'}}\n")
    policy = load_policy(tmp_path)
    icap_eicar = Finding(ENGINE_MATCH, "x", "", {"engine": "icap", "signature": "Win.Test.EICAR_HDB-1"})
    clamav_other = Finding(ENGINE_MATCH, "x", "", {"engine": "clamav", "signature": "Doc.Dropper.Agent"})
    assert _decide(policy, [icap_eicar]).rule_ids == ["eicar-anywhere"]
    assert _decide(policy, [clamav_other]).rule_ids == ["by-clamav"]
    (tmp_path / "r.yaml").write_text(
        "rules:\n  - {id: x, title: t, severity: high, action: block, applies_to: file, match: {engine: sophos}}\n")
    with pytest.raises(PolicyError, match="sophos"):
        load_policy(tmp_path)


def test_scan_explain_shows_the_engine_and_the_rule(running, tmp_path):
    """`imguard scan --explain` with both engines: the findings name the engine and its signature, the decision
    names the rule; `--json` carries them too."""
    clamd, icap = running
    target = tmp_path / "engine-only.bin"
    target.write_bytes(ENGINE_ONLY)
    command = [str(PYTHON), "-m", "imguard", "scan", "--data-dir", str(tmp_path / "data"), "--clamd-address",
               str(clamd.socket_path), "--icap-url", icap.url, "--explain", str(target)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"finding  engine: clamav detection {_found(ENGINE_ONLY_NAME)}" in result.stdout, result.stdout
    assert f"finding  engine: icap detection {_found(ENGINE_ONLY_NAME)}" in result.stdout, result.stdout
    assert "decision BLOCK  rules: malware-engine" in result.stdout, result.stdout
    assert "finding  yara" not in result.stdout, "only the engines know this file"
    result = subprocess.run(command[:-2] + ["--json", str(target)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    findings = json.loads(result.stdout.splitlines()[-1])["report"]["findings"]
    assert {(f["data"]["engine"], f["data"]["signature"]) for f in findings if f["kind"] == "engine"} == {
        ("clamav", _found(ENGINE_ONLY_NAME)), ("icap", _found(ENGINE_ONLY_NAME))}


# --- through the real gateway: IRC DCC across ngIRCd --------------------------------------------------------

@pytest.fixture(scope="module")
def ircd(engines_dir):
    server = NgIrcd.start(engines_dir / "ngircd")
    try:
        yield server
    finally:
        server.stop()


def _gateway(directory: Path, ircd: NgIrcd, extra: list[str]):
    # The bundled rules' hash lists (rules/hashlists/) beside the rule files IrcGateway copies into its rules folder.
    if (ROOT / "rules" / "hashlists").is_dir():
        shutil.copytree(ROOT / "rules" / "hashlists", directory / "rules" / "hashlists", dirs_exist_ok=True)
    gw = IrcGateway.start(directory, ircd, extra=extra)
    try:
        yield gw
    finally:
        status = gw.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


@pytest.fixture(scope="module")
def clamav_gateway(engines_dir, ircd, clamd):
    """`imguard run` with ClamAV only (`--clamd-address`, over clamd's TCP socket)."""
    yield from _gateway(engines_dir / "gw-clamav", ircd,
                        ["--clamd-address", f"127.0.0.1:{clamd.tcp_port}", "--clamd-timeout", "5"])


@pytest.fixture(scope="module")
def icap_gateway(engines_dir, ircd, icap):
    """`imguard run` with ICAP only (`--icap-url`): c-icap's virus_scan, itself asking clamd."""
    yield from _gateway(engines_dir / "gw-icap", ircd, ["--icap-url", icap.url, "--icap-timeout", "5"])


@pytest.fixture(params=["clamav", "icap"])
def engine_route(request, running, ircd):
    gateway = request.getfixturevalue(f"{request.param}_gateway")
    gateway.check_alive()
    offset = gateway.log_size()
    yield request.param, Route("imguard", False, ircd, gateway)
    gateway.check_alive()
    errors = gateway.errors_since(offset)
    assert not errors, "imguard logged errors during the test:\n" + "\n".join(errors) + "\n" + gateway.logs()


def _rule_ids(alert: dict) -> list[str]:
    ids = alert.get("rule", {}).get("id", [])
    return [ids] if isinstance(ids, str) else list(ids)


def _send(chat: Chat, route: Route, sender, receiver, name: str, payload: bytes):
    t = chat.offer_file(sender, receiver, name, payload)
    assert chat.pump(lambda: t.done, 30), (
        f"the transfer did not end: offer {t.offer}, {len(t.received)} bytes\n{route.failure_logs()}")
    assert t.offer is not None and t.offer["port"] in route.gateway.dcc_ports, f"not through the relay: {t.offer}"
    return t


@pytest.mark.parametrize("way", WAYS)
def test_engine_detection_is_blocked_through_the_gateway(engine_route, way):
    """A file only the engine's database names (no YARA rule matches it), sent by DCC between outside and inside:
    the receiver gets none of it, the inside person is told, the alert names the engine, its signature and the
    bundled rule malware-engine, category malware."""
    engine, route = engine_route
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        name = f"engine-only-{engine}-{way}-{uuid.uuid4().hex[:6]}.bin"
        t = _send(chat, route, sender, receiver, name, ENGINE_ONLY)
        assert bytes(t.received) == b"", f"{receiver.nick} received {len(t.received)} bytes of the blocked file"
        alert = route.wait_alert(lambda e: e.get("file", {}).get("name") == name)
        assert alert, f"no file event for {name}\n{route.failure_logs()}"
        assert alert["event"]["action"] == "block" and "malware-engine" in _rule_ids(alert), alert.get("rule")
        assert alert["imguard"]["engines"] == [{"engine": engine, "signature": _found(ENGINE_ONLY_NAME)}]
        assert "yara" not in alert["imguard"] and "malware" in alert["event"]["category"], alert["event"]
        assert alert["file"]["hash"]["sha256"] == sha256(ENGINE_ONLY)
        assert alert["imguard"]["context"]["direction"] == way
        inside = receiver if way == "inbound" else sender
        assert chat.pump(lambda: any(name in n for n in inside.imguard_notices()), 10), (
            f"{inside.nick} (inside) got no NOTICE naming {name}: {inside.notices}")
        chat.sentinel(sender, receiver, "after the engine's block")
        assert bytes(t.received) == b"", "bytes of the blocked file arrived late"


@pytest.mark.parametrize("way", WAYS)
def test_clean_file_passes_the_engine(engine_route, way):
    """A clean file through the gateway with the engine on arrives byte-identical and is allowed, with no
    engine finding and nothing unscannable."""
    engine, route = engine_route
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        name = f"numbers-{engine}-{way}-{uuid.uuid4().hex[:6]}.bin"
        t = _send(chat, route, sender, receiver, name, CLEAN)
        assert sha256(bytes(t.received)) == sha256(CLEAN), f"{receiver.nick} got {len(t.received)} bytes"
        alert = route.wait_alert(lambda e: e.get("file", {}).get("name") == name)
        assert alert and alert["event"]["action"] == "allow", alert and alert["event"]
        assert "engines" not in alert["imguard"]
        assert not [f for f in alert["imguard"]["report"]["findings"] if f["kind"] == "unscannable"]


@pytest.mark.parametrize("way", WAYS)
def test_engine_down_blocks_as_unscannable_then_recovers(engine_route, running, way):
    """The engine's server stopped: a clean file is blocked as unscannable (rule unscannable-file), the report
    says which engine failed, the inside person is told, and nothing arrives; started again, the same file passes
    (an unscannable verdict for a reason that may pass is not kept by the verdict cache)."""
    engine, route = engine_route
    clamd, icap = running
    peer = clamd if engine == "clamav" else icap
    peer.stop()
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        name = f"unscanned-{engine}-{way}-{uuid.uuid4().hex[:6]}.bin"
        payload = CLEAN + uuid.uuid4().bytes
        t = _send(chat, route, sender, receiver, name, payload)
        assert bytes(t.received) == b"", f"{receiver.nick} received {len(t.received)} bytes of an unscanned file"
        alert = route.wait_alert(lambda e: e.get("file", {}).get("name") == name)
        assert alert and alert["event"]["action"] == "block", alert and alert["event"]
        assert _rule_ids(alert) == ["unscannable-file"], alert["rule"]
        failed = [f for f in alert["imguard"]["report"]["findings"] if f["kind"] == "unscannable"]
        assert [(f["data"]["engine"], f["data"]["reason"]) for f in failed] == [(engine, "scanner_error")], failed
        assert alert["imguard"]["context"]["direction"] == way
        inside = receiver if way == "inbound" else sender
        assert chat.pump(lambda: any(name in n for n in inside.imguard_notices()), 10), (
            f"{inside.nick} (inside) got no NOTICE naming {name}: {inside.notices}")
        chat.sentinel(sender, receiver, "after the unscanned file")
        peer.start()
        again = f"numbers-again-{engine}-{uuid.uuid4().hex[:6]}.bin"
        t2 = _send(chat, route, sender, receiver, again, payload)
        assert bytes(t2.received) == payload, "the engine is back: the file passes"


# --- the verdict cache and a signature update without a reload ---------------------------------------------------

def _build_daily(directory: Path, version: int, signatures: str) -> None:
    """A daily database as freshclam delivers it (a CVD), but unsigned (.cud, built with ClamAV's own sigtool):
    clamd's VERSION then names its version, as it names the real daily.cvd's."""
    build = directory.parent / f"daily-{version}"
    build.mkdir(parents=True, exist_ok=True)
    (build / "daily.ndb").write_text(signatures)
    (build / "COPYING").write_text("imguard test database\n")
    result = subprocess.run(["sigtool", "--build=daily.cud", "--unsigned", f"--cvd-version={version}",
                             f"--datadir={build}", "--no-cdiff"], cwd=build, input="imguard-test\n", text=True,
                            capture_output=True, timeout=60)
    assert (build / "daily.cud").exists(), result.stdout + result.stderr
    shutil.copy(build / "daily.cud", directory / "daily.cud")


def test_a_freshclam_update_empties_the_verdict_cache(tmp_path):
    """A file scanned clean is cached; the database is updated in place (a new daily version, clamd reloads, as
    after freshclam) and names it: the next transfer of the same bytes is scanned again and detected, because the
    cache asked clamd's VERSION and saw the new database version. With the recheck off, the stale clean verdict
    is served: the check is what makes the difference."""
    _require(CLAMD, "clamav-daemon")
    _require(shutil.which("sigtool") or "/usr/bin/sigtool", "clamav")
    peer = ClamdPeer(tmp_path / "clamd")
    _build_daily(peer.directory / "db", 100, "Test.Daily:0:*:5a5a5a5a5a5a5a5a5a5a5a5a\n")
    peer.start()
    try:
        engine = Clamd(str(peer.socket_path))
        assert "/100/" in engine.state_tag()
        data = b"a file the first database does not name: " + b"imguard-late-signature" * 20
        inspectors = {recheck: Inspector(load_signatures(ROOT / "signatures"),
                                         InspectLimits(clamd_address=str(peer.socket_path),
                                                       verdict_cache_recheck_seconds=recheck))
                      for recheck in (0.001, 0.0)}
        for inspector in inspectors.values():
            assert _engine_findings(inspector.inspect(data, name="late.bin")) == []
            assert _engine_findings(inspector.inspect(data, name="late.bin")) == []
            assert inspector.cache.stats.hits == 1
        _build_daily(peer.directory / "db", 101, "Test.Daily:0:*:5a5a5a5a5a5a5a5a5a5a5a5a\n"
                     "Test.Late:0:*:" + b"imguard-late-signature".hex() + "\n")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(peer.socket_path))
            s.sendall(b"zRELOAD\0")
            assert s.recv(64).startswith(b"RELOADING")
        deadline = time.monotonic() + 60
        while "/101/" not in engine.state_tag():
            assert time.monotonic() < deadline, "clamd did not load the new database"
            time.sleep(0.2)
        time.sleep(0.01)
        updated = inspectors[0.001]
        assert _engine_findings(updated.inspect(data, name="late.bin")) == [("clamav", "Test.Late.UNOFFICIAL")]
        assert updated.cache.stats.invalidations == 1
        stale = inspectors[0.0]
        assert _engine_findings(stale.inspect(data, name="late.bin")) == []
    finally:
        peer.stop()
