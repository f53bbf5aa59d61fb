"""Real SIP peers for the SIP tests: a Kamailio server, the sipsak client and SIPp user agents (Debian `kamailio`,
`sipsak`, `sip-tester`), and `imguard run` in front of the Kamailio.

    server = Kamailio.start(workdir)            # TCP and UDP on one free port, in the foreground
    server.messages()                           # [(from, to, content type, body)] it received
    rc, output = sipsak(raw_request, "127.0.0.1", port, transport="tcp")
    carol = SippUser.start(workdir, "carol", "127.0.0.1", port, "udp")    # registered, answers every MESSAGE
    carol.wait_registered(server); carol.received()                       # the MESSAGE requests it got, in order
    gw = SipGateway.start(workdir, server)      # reverse:tcp and reverse:udp to Kamailio; gw.port(transport)
    server.stop()

Kamailio runs a small route: REGISTER -> saved in its location table (in memory) with the source address the
request came from (nathelper's fix_nated_register: the contact is reached back through the connection or UDP
flow it registered over, as behind a NAT, so a user registered through the gateway gets its requests through the
gateway); MESSAGE -> logged (`IMGUARD-MESSAGE ... body=[...]`), then relayed statefully (tm) to the registered
contact of its Request-URI, whose final response goes back to the sender, or answered 200 by Kamailio itself when
nobody is registered under it; INVITE -> answered 200 with a fixed SDP answer offering MSRP at
msrp://127.0.0.1:<msrp_port>/kam123;tcp (`msrp_port`: where the test's MSRP receiver listens); anything else 501.
sipsak sends a request read from a file (`-f`, "shoot" mode; it adds its own Via on top) and waits for the
final response: exit status 0 for 2xx, non-zero otherwise; `-vv` prints the response it got. (`sipsak -M`,
its MESSAGE mode, crashes on this Debian 12 build with a NULL dereference after a hostname lookup, so
the shoot mode is used.)
SippUser is SIPp running tests/data/sip/register.xml (REGISTER, refreshed every 5 s until it is stopped) with
tests/data/sip/answer_message.xml as its out-of-call scenario (any MESSAGE that is not part of the registration's
call is answered 200); what it received is read from SIPp's own message trace (`-trace_msg`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers.gateway import BUNDLED_RULES, BUNDLED_SIGNATURES, PYTHON, TEST_RULES, ImguardRun
from tests.peers.prosody import PeerError, free_ports, stop_process, wait_for_port

MSRP_SESSION = "kam123"         # the session id of the MSRP path in Kamailio's SDP answer
_SDP = ("v=0\\r\\no=kam 1 1 IN IP4 127.0.0.1\\r\\ns=-\\r\\nc=IN IP4 127.0.0.1\\r\\nt=0 0\\r\\n"
        "m=message {msrp_port} TCP/MSRP *\\r\\na=recvonly\\r\\na=accept-types:*\\r\\n"
        "a=path:msrp://127.0.0.1:{msrp_port}/" + MSRP_SESSION + ";tcp\\r\\n")

CONFIG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
tcp_children=1
listen=tcp:127.0.0.1:{port}
listen=udp:127.0.0.1:{port}
mpath="{mpath}"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "textops.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "nathelper.so"
modparam("nathelper", "received_avp", "$avp(RECEIVED)")
modparam("registrar", "received_avp", "$avp(RECEIVED)")
request_route {{
    if (is_method("REGISTER")) {{
        fix_nated_register();
        if (!save("location")) {{
            sl_reply_error();
            exit;
        }}
        xlog("L_ERR", "IMGUARD-REGISTER aor=[$tu] contact=[$ct] received=[$pr:$si:$sp]\\n");
        exit;
    }}
    if (is_method("MESSAGE")) {{
        xlog("L_ERR", "IMGUARD-MESSAGE from=[$fu] to=[$tu] ct=[$cT] body=[$rb]\\n");
        if (lookup("location")) {{
            xlog("L_ERR", "IMGUARD-RELAY to=[$ru] via=[$du]\\n");
            t_relay();
            exit;
        }}
        sl_send_reply("200", "OK");
        exit;
    }}
    if (is_method("INVITE")) {{
        xlog("L_ERR", "IMGUARD-INVITE from=[$fu] to=[$tu]\\n");
        set_reply_body("{sdp}", "application/sdp");
        sl_send_reply("200", "OK");
        exit;
    }}
    if (is_method("ACK")) {{
        exit;
    }}
    sl_send_reply("501", "Not Implemented");
}}
"""

MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/kamailio/modules", "/usr/lib/aarch64-linux-gnu/kamailio/modules",
               "/usr/lib/kamailio/modules")
_LOG = re.compile(r"IMGUARD-MESSAGE from=\[(.*?)\] to=\[(.*?)\] ct=\[(.*?)\] body=\[(.*?)\]$", re.S | re.M)
_REGISTERED = re.compile(r"IMGUARD-REGISTER aor=\[(.*?)\] contact=\[(.*?)\] received=\[(.*?)\]$", re.M)


def binary(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")


class Kamailio:
    def __init__(self, workdir: Path, port: int, process: subprocess.Popen, msrp_port: int = 0):
        self.workdir = workdir
        self.port = port
        self.msrp_port = msrp_port
        self.process = process
        self.log = workdir / "kamailio.log"

    @classmethod
    def start(cls, workdir: Path | None = None, timeout: float = 10.0, msrp_port: int = 2855) -> "Kamailio":
        exe = binary("kamailio")
        if exe is None:
            raise PeerError("kamailio is not installed: tools/setup.sh test installs it (apt: kamailio)")
        mpath = next((d for d in MODULE_DIRS if Path(d, "sl.so").exists()), None)
        if mpath is None:
            raise PeerError("kamailio modules (sl.so) not found")
        workdir = Path(workdir or tempfile.mkdtemp(prefix="imguard-kamailio-"))
        workdir.mkdir(parents=True, exist_ok=True)
        [port] = free_ports(1)
        cfg = workdir / "kamailio.cfg"
        cfg.write_text(CONFIG.format(port=port, mpath=mpath + "/", sdp=_SDP.format(msrp_port=msrp_port)))
        log = open(workdir / "kamailio.log", "wb")
        process = subprocess.Popen([exe, "-f", str(cfg), "-DD", "-E", "-w", str(workdir)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        server = cls(workdir, port, process, msrp_port)
        deadline = time.monotonic() + timeout
        while "Listening on" not in server.logs() or not server._accepting():
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise PeerError(f"kamailio did not start on port {port}:\n{server.logs()}")
            time.sleep(0.05)
        return server

    def _accepting(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def messages(self) -> list[tuple[str, str, str, str]]:
        """(from URI, to URI, content type, body) of every MESSAGE Kamailio received, in order."""
        return _LOG.findall(self.logs(full=True))

    def registrations(self) -> list[tuple[str, str, str]]:
        """(address of record, Contact, "transport:ip:port" it came from) of every REGISTER Kamailio saved."""
        return _REGISTERED.findall(self.logs(full=True))

    def invites(self) -> int:
        return self.logs(full=True).count("IMGUARD-INVITE")

    def logs(self, full: bool = False) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return text if full else text[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def sipsak(request: bytes, host: str, port: int, transport: str = "tcp", timeout: float = 15.0,
           workdir: Path | None = None) -> tuple[int, str]:
    """Send `request` with sipsak (shoot mode) and wait for its final response: (exit status, -vv output)."""
    exe = binary("sipsak")
    if exe is None:
        raise PeerError("sipsak is not installed: tools/setup.sh test installs it (apt: sipsak)")
    with tempfile.NamedTemporaryFile("wb", suffix=".sip", dir=workdir, delete=False) as f:
        f.write(request)
        path = f.name
    try:
        # -H: the host name sipsak puts in its Via (no DNS lookup); -D 1: the smallest INVITE timeout factor on
        # UDP, so a lost reply fails fast.
        done = subprocess.run([exe, "-f", path, "-s", f"sip:bob@{host}:{port}", f"--transport={transport}",
                               "-H", "127.0.0.1", "-D", "1", "-vv"], capture_output=True, timeout=timeout)
    finally:
        os.unlink(path)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


SCENARIOS = Path(__file__).resolve().parents[1] / "data" / "sip"
# One entry of SIPp's -trace_msg file: a line of dashes and a time, then "TCP message received [N] bytes :" or
# "TCP message sent (N bytes):", an empty line and the N bytes of the message.
_TRACE_ENTRY = re.compile(rb"^-{47} [^\n]*\n(UDP|TCP) message (received|sent) "
                          rb"(?:\[(\d+)\] bytes :|\((\d+) bytes\):)\n\n", re.M)


@dataclass
class SipRequest:
    """A request as the user agent received it (parsed here, not by imguard's decoder)."""
    method: str
    uri: str
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str:
        return next((v for n, v in self.headers if n.lower() == name.lower()), "")


def parse_request(raw: bytes) -> SipRequest | None:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    start = lines[0].split(" ")
    if len(start) != 3 or start[2] != "SIP/2.0":
        return None         # a response
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    return SipRequest(start[0], start[1], headers, body)


class SippUser:
    """A SIPp user agent registered as `name` at host:port (over `transport`), answering every MESSAGE 200."""

    def __init__(self, name: str, process: subprocess.Popen, trace: Path, log: Path):
        self.name = name
        self.process = process
        self.trace = trace
        self.log = log

    @classmethod
    def start(cls, workdir: Path, name: str, host: str, port: int, transport: str = "tcp") -> "SippUser":
        exe = binary("sipp")
        if exe is None:
            raise PeerError("sipp is not installed: tools/setup.sh test installs it (apt: sip-tester)")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        trace, log = workdir / f"sipp-{name}-messages.log", workdir / f"sipp-{name}.log"
        [local_port] = free_ports(1)
        out = open(log, "wb")
        # -m 1: the one registration call (it refreshes itself until SIPp is stopped); -trace_msg: every message
        # sent and received, written as it happens.
        process = subprocess.Popen([exe, "-sf", str(SCENARIOS / "register.xml"),
                                    "-oocsf", str(SCENARIOS / "answer_message.xml"),
                                    "-t", "t1" if transport == "tcp" else "u1", "-i", "127.0.0.1",
                                    "-p", str(local_port), "-s", name, "-m", "1",
                                    "-nostdin", "-trace_msg", "-message_file", str(trace),
                                    f"{host}:{port}"], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
        out.close()
        return cls(name, process, trace, log)

    def entries(self) -> list[tuple[str, bytes]]:
        """("received" or "sent", the raw message) of SIPp's message trace, in order."""
        data = self.trace.read_bytes() if self.trace.exists() else b""
        entries = []
        for m in _TRACE_ENTRY.finditer(data):
            size = int(m.group(3) or m.group(4))
            raw = data[m.end():m.end() + size]
            if len(raw) == size:        # not one SIPp is still writing
                entries.append((m.group(2).decode(), raw))
        return entries

    def received(self, method: str = "MESSAGE") -> list[SipRequest]:
        """The requests of `method` SIPp received, in order."""
        requests = (parse_request(raw) for way, raw in self.entries() if way == "received")
        return [r for r in requests if r is not None and r.method == method]

    def wait_registered(self, server: Kamailio, timeout: float = 10.0) -> None:
        """Until SIPp got the 200 to its REGISTER and Kamailio saved the contact."""
        deadline = time.monotonic() + timeout
        while not (any(way == "received" and raw.startswith(b"SIP/2.0 200") for way, raw in self.entries())
                   and any(aor.startswith(f"sip:{self.name}@") for aor, _, _ in server.registrations())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise PeerError(f"sipp {self.name} did not register (status {self.process.poll()}):\n"
                                f"{self.logs()}\n{server.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        trace = self.trace.read_text(errors="replace") if self.trace.exists() else ""
        return f"--- {self.log} ---\n{text[-2000:]}\n--- {self.trace} ---\n{trace[-4000:]}"

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class SipGateway(ImguardRun):
    """The real `imguard run` in front of a Kamailio: reverse:tcp and reverse:udp to its port (mapped to sip), a
    socks5 listener for the MSRP connections (matched to the SDP that announced them by their destination), the
    bundled rules plus tests/data/rules."""

    directory: Path
    server: Kamailio
    tcp_port: int
    udp_port: int
    socks5_port: int
    command: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    stopped: bool = False

    @classmethod
    def start(cls, directory: Path, server: Kamailio, extra: list[str] | None = None,
              timeout: float = 30.0) -> "SipGateway":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tcp_port, udp_port, socks5_port = free_ports(3)
        gw = cls(directory, server, tcp_port, udp_port, socks5_port)
        gw.data_dir.mkdir(parents=True, exist_ok=True)
        rules = directory / "rules"
        rules.mkdir(exist_ok=True)
        for source in (BUNDLED_RULES, TEST_RULES):
            for path in sorted(source.glob("*.yaml")):
                shutil.copy(path, rules / path.name)
        gw.command = [str(PYTHON), "-m", "imguard", "run",
                      "--listen-host", "127.0.0.1",
                      "--mode", f"reverse:tcp://127.0.0.1:{server.port}@{tcp_port}",
                      "--mode", f"reverse:udp://127.0.0.1:{server.port}@{udp_port}",
                      "--mode", f"socks5@{socks5_port}",
                      "--ports", f"{server.port}=sip",        # Kamailio's port is random: say it speaks SIP
                      "--data-dir", str(gw.data_dir),
                      "--rules", str(rules),
                      "--signatures", str(BUNDLED_SIGNATURES),
                      *(extra or [])]
        out = open(gw.log_file, "wb")
        gw.process = subprocess.Popen(gw.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=directory,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()
        try:
            # The UDP listener cannot be probed by connecting: the banner is printed once every listener is bound.
            deadline = time.monotonic() + timeout
            while "imguard gateway running" not in (gw.log_file.read_text(errors="replace")):
                if gw.process.poll() is not None or time.monotonic() > deadline:
                    raise PeerError("imguard run did not print its banner")
                time.sleep(0.05)
            for port in (tcp_port, socks5_port):
                wait_for_port(port, timeout, gw.process, what="imguard run")
        except BaseException as e:
            gw.stop()
            raise PeerError(f"imguard run did not start: {' '.join(gw.command)}\n{gw.logs()}") from e
        return gw

    def port(self, transport: str) -> int:
        return self.tcp_port if transport == "tcp" else self.udp_port

    def socks5(self, host: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection to host:port through the gateway's socks5 listener (RFC 1928 CONNECT, no auth)."""
        sock = socket.create_connection(("127.0.0.1", self.socks5_port), timeout=timeout)
        sock.sendall(b"\x05\x01\x00")
        if _read_exactly(sock, 2) != b"\x05\x00":
            raise PeerError("the gateway's socks5 listener refused the greeting")
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
        reply = _read_exactly(sock, 10)
        if reply[:2] != b"\x05\x00":
            raise PeerError(f"socks5 CONNECT to {host}:{port} failed: {reply!r}")
        return sock


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise PeerError("the connection closed")
        data += part
    return data
