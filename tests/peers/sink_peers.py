"""Real receivers for the event sinks, started and stopped by the tests themselves.

    with HttpReceiver() as hook:          # http.server in a thread; hook.url, hook.events
        hook.mode = "fail" | "slow" | "ok"; hook.down(); hook.up()
    with SyslogReceiver() as syslog:      # a UDP and a TCP (octet-counting) socket server; .records
    with SyslogReceiver(tls_dir=d) as s:  # ... and a TLS one (RFC 5425); s.tls_address, s.ca_file
    with Rsyslog.start(workdir) as rs:    # the real rsyslogd (Debian): UDP, TCP and TLS inputs; rs.received()
    with SmtpReceiver() as smtp:          # aiosmtpd; smtp.address, smtp.messages
    with PostgresServer.start(workdir) as pg:   # initdb + postgres on a unix socket; pg.dsn

Each binds a free port on 127.0.0.1 (PostgreSQL: a unix socket only, no TCP), so tests can run in
parallel with anything else on the machine.

Run as a module, this file is also the child process of the SIGKILL test:

    python -m tests.peers.sink_peers burst DATA_DIR WEBHOOK_URL SYSLOG_ADDRESS SMTP_ADDRESS COUNT
"""

from __future__ import annotations

import email
import email.policy
import http.server
import json
import os
import pwd
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --- HTTP: the webhook receiver -----------------------------------------------------------------------

class HttpReceiver:
    """Answers POSTs: mode "ok" (204, the event is kept), "fail" (503, not kept), "slow" (keeps the event,
    then waits `delay` seconds before answering: the sender times out). down() closes the port, up()
    opens it again on the same port. An event for which `refuse(event)` is true is answered 422 and not kept,
    as a SIEM's endpoint answers a body it will never take (`refused` counts them)."""

    def __init__(self, port: int = 0, delay: float = 3.0):
        self.port = port or free_port()
        self.mode = "ok"
        self.delay = delay
        self.events: list[dict] = []
        self.headers: list[dict] = []
        self.requests = 0
        self.refuse = lambda event: False
        self.refused = 0
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> "HttpReceiver":
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):   # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests += 1
                    mode = receiver.mode
                if mode == "fail":
                    self.send_response(503)
                    self.end_headers()
                    return
                event = json.loads(body)
                if receiver.refuse(event):
                    with receiver._lock:
                        receiver.refused += 1
                    self.send_response(422)
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.events.append(event)
                    receiver.headers.append(dict(self.headers))
                if mode == "slow":
                    time.sleep(receiver.delay)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def ids(self) -> list[str]:
        with self._lock:
            return [e["event"]["id"] for e in self.events]

    def __enter__(self) -> "HttpReceiver":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


# --- syslog: UDP and TCP receivers ---------------------------------------------------------------

class SyslogReceiver:
    """Keeps every record received over UDP (one per datagram) and TCP (RFC 6587 octet counting) in
    `records` (bytes, without the framing). A TCP stream whose framing is broken is kept whole in
    `framing_errors`. With `tls_dir`, also a TLS listener (RFC 5425, the same framing) whose certificate, for
    `tls_names`, is signed by a throwaway CA (`ca_file`)."""

    def __init__(self, tcp_port: int = 0, tls_dir: Path | None = None,
                 tls_names: tuple[tuple[str, ...], tuple[str, ...]] = (("localhost",), ("127.0.0.1",))):
        self.records: list[bytes] = []
        self.framing_errors: list[bytes] = []
        self._lock = threading.Lock()
        receiver = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self):
                with receiver._lock:
                    receiver.records.append(self.request[0])

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self):
                buffer = b""
                while True:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        break
                    buffer += chunk
                    while True:
                        m = re.match(rb"([1-9][0-9]{0,8}) ", buffer)
                        if not m:
                            if buffer and not re.match(rb"[0-9]{0,9}$", buffer):
                                with receiver._lock:
                                    receiver.framing_errors.append(buffer)
                                buffer = b""
                            break
                        length = int(m.group(1))
                        if len(buffer) < m.end() + length:
                            break
                        with receiver._lock:
                            receiver.records.append(buffer[m.end():m.end() + length])
                        buffer = buffer[m.end() + length:]

        class TcpServer(socketserver.ThreadingTCPServer):
            allow_reuse_address = True

        self._udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
        self._tcp = TcpServer(("127.0.0.1", tcp_port), Tcp)
        self._tcp.daemon_threads = self._udp.daemon_threads = True
        self.udp_port = self._udp.server_address[1]
        self.tcp_port = self._tcp.server_address[1]
        self._servers = [self._udp, self._tcp]
        self.ca_file: Path | None = None
        self.tls_port = 0
        if tls_dir is not None:
            import ssl

            from tests.peers.prosody import make_certificates
            certs = make_certificates(Path(tls_dir), names=tls_names[0], ips=tls_names[1])
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(certs.cert_file, certs.key_file)
            self.ca_file = certs.ca_file

            class TlsServer(TcpServer):
                def get_request(self):
                    sock, address = self.socket.accept()
                    sock.settimeout(10)
                    try:
                        return context.wrap_socket(sock, server_side=True), address
                    except (OSError, ssl.SSLError):
                        sock.close()
                        raise

            tls = TlsServer(("127.0.0.1", 0), Tcp)
            tls.daemon_threads = True
            self.tls_port = tls.server_address[1]
            self._servers.append(tls)
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self._servers]
        for t in self._threads:
            t.start()

    @property
    def udp_address(self) -> str:
        return f"udp://127.0.0.1:{self.udp_port}"

    @property
    def tcp_address(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def tls_address(self) -> str:
        return f"tls://localhost:{self.tls_port}"

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "SyslogReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- syslog: the real rsyslogd ----------------------------------------------------------------------

RSYSLOG_CONF = """
global(workDirectory="{work}" defaultNetstreamDriverCAFile="{ca}" defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imudp")
module(load="imtcp" streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imtcp" name="tls" address="127.0.0.1" port="{tls}")
module(load="imptcp")
input(type="imptcp" address="127.0.0.1" port="{tcp}" supportOctetCountedFraming="on")
template(name="fields" type="list" option.jsonf="on") {{
    property(outname="pri" name="pri" format="jsonf")
    property(outname="hostname" name="hostname" format="jsonf")
    property(outname="app" name="app-name" format="jsonf")
    property(outname="procid" name="procid" format="jsonf")
    property(outname="msgid" name="msgid" format="jsonf")
    property(outname="sd" name="structured-data" format="jsonf")
    property(outname="msg" name="msg" format="jsonf")
    property(outname="input" name="inputname" format="jsonf")
}}
*.* action(type="omfile" file="{out}" template="fields")
"""


def rsyslogd_bin() -> str | None:
    return shutil.which("rsyslogd") or next((p for p in ("/usr/sbin/rsyslogd",) if Path(p).exists()), None)


class Rsyslog:
    """The real rsyslogd (Debian's rsyslog, rsyslog-openssl for TLS) in the foreground, with its own config in
    `directory`: UDP (imudp), TCP with octet counting (imptcp) and TLS (imtcp, ossl driver, RFC 5425) on free
    loopback ports, every record written as one JSON object per line (hostname, app, procid, msgid, sd, msg and
    the input) to `out`. Its default maxMessageSize (8 KB) is left as shipped. `received()` reads them."""

    def __init__(self, directory: Path, binary: str):
        self.directory = directory
        self.binary = binary
        self.out = directory / "out.jsonl"
        self.udp_port, self.tcp_port, self.tls_port = free_port(), free_port(), free_port()
        from tests.peers.prosody import make_certificates
        self.certs = make_certificates(directory / "tls", names=("localhost",), ips=("127.0.0.1",))
        self.ca_file = self.certs.ca_file
        self.process: subprocess.Popen | None = None

    @classmethod
    def start(cls, directory: Path | None = None) -> "Rsyslog":
        binary = rsyslogd_bin()
        if binary is None:
            raise RuntimeError("rsyslogd is not installed (apt-get install rsyslog rsyslog-openssl)")
        server = cls(Path(directory or tempfile.mkdtemp(prefix="imguard-rsyslog-")), binary)
        (server.directory / "work").mkdir(parents=True, exist_ok=True)
        conf = server.directory / "rsyslog.conf"
        conf.write_text(RSYSLOG_CONF.format(work=server.directory / "work", ca=server.certs.ca_file,
                                            cert=server.certs.cert_file, key=server.certs.key_file,
                                            udp=server.udp_port, tcp=server.tcp_port, tls=server.tls_port,
                                            out=server.out))
        check = subprocess.run([binary, "-N1", "-f", str(conf)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"rsyslogd refuses its config: {check.stdout}{check.stderr}")
        server.log = server.directory / "rsyslogd.log"
        with open(server.log, "wb") as log:
            server.process = subprocess.Popen([binary, "-n", "-f", str(conf), "-i", str(server.directory / "pid")],
                                              stdout=log, stderr=subprocess.STDOUT)
        if not wait_until(lambda: all(_listening(port) for port in (server.tcp_port, server.tls_port)), 15):
            server.stop()
            raise RuntimeError(f"rsyslogd did not open its ports:\n{server.logs()}")
        return server

    @property
    def udp_address(self) -> str:
        return f"udp://127.0.0.1:{self.udp_port}"

    @property
    def tcp_address(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def tls_address(self) -> str:
        return f"tls://localhost:{self.tls_port}"

    def received(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text(encoding="utf-8").splitlines() if line.strip()]

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> "Rsyslog":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --- SMTP: aiosmtpd --------------------------------------------------------------------------------

class SmtpReceiver:
    """A real SMTP server (aiosmtpd) on a free port; `messages` are the parsed mails received. With `tls_dir`
    it offers STARTTLS with a certificate for 127.0.0.1 and localhost from a throwaway CA (`ca_file`, made in
    that folder) and takes no mail before it (`require_starttls`); `tls_names` are the certificate's (DNS names,
    IP addresses). A mail for which `refuse(message)` is true is answered 554 after DATA (content refused)."""

    def __init__(self, port: int = 0, tls_dir: Path | None = None,
                 tls_names: tuple[tuple[str, ...], tuple[str, ...]] = (("localhost",), ("127.0.0.1",))):
        try:
            from aiosmtpd.controller import Controller
        except ImportError:
            raise RuntimeError("aiosmtpd is not installed: run `tools/setup.sh test` (the [test] extras)") from None

        receiver = self
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.refuse = lambda message: False
        self.refused = 0

        class Handler:
            async def handle_DATA(self, server, session, envelope):   # noqa: N802 - aiosmtpd's naming
                message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
                if receiver.refuse(message):
                    receiver.refused += 1
                    return "554 5.6.0 message content refused"
                receiver.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
                receiver.messages.append(message)
                return "250 OK"

        self.port = port or free_port()
        self.ca_file: Path | None = None
        tls: dict = {}
        if tls_dir is not None:
            import ssl

            from tests.peers.prosody import make_certificates
            certs = make_certificates(Path(tls_dir), names=tls_names[0], ips=tls_names[1])
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(certs.cert_file, certs.key_file)
            self.ca_file = certs.ca_file
            tls = dict(tls_context=context, require_starttls=True)
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **tls)
        self._controller.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._controller.stop()

    def __enter__(self) -> "SmtpReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- PostgreSQL ----------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """The folder of initdb and postgres (Debian keeps them in /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


class PostgresServer:
    """A throwaway PostgreSQL cluster: initdb into a fresh folder, postgres listening only on a unix
    socket in it, trust authentication, database `imguard`. PostgreSQL refuses to run as root, so when
    the tests run as root the cluster belongs to (and runs as) the `postgres` user, or `nobody`."""

    def __init__(self, directory: Path, bindir: Path, port: int, user: str | None):
        self.directory, self.bindir, self.port, self.user = directory, bindir, port, user
        self.process: subprocess.Popen | None = None

    @property
    def socket_dir(self) -> Path:
        return self.directory / "sock"

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} dbname=imguard user=imguard"

    def _as_user(self) -> dict:
        """Popen arguments that run the program as the cluster's user (directly, so signals reach it)."""
        if not self.user:
            return {"cwd": self.directory}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "cwd": self.directory}

    @classmethod
    def start(cls, directory: Path | None = None) -> "PostgresServer":
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL's initdb and postgres are not installed: run `tools/setup.sh test` "
                               "(installs Debian's postgresql)")
        user = None
        if os.geteuid() == 0:
            for candidate in ("postgres", "nobody"):
                try:
                    pwd.getpwnam(candidate)
                    user = candidate
                    break
                except KeyError:
                    continue
        # Our own folder under /tmp: pytest's tmp_path is 0700 root's, which the postgres user cannot enter.
        directory = Path(tempfile.mkdtemp(prefix="imguard-pg-", dir=str(directory) if directory else None))
        (directory / "sock").mkdir()
        if user:
            entry = pwd.getpwnam(user)
            for path in (directory, directory / "sock"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        server = cls(directory, bindir, free_port(), user)
        init = subprocess.run([str(bindir / "initdb"), "-D", str(directory / "data"), "-A", "trust",
                               "-U", "imguard", "-E", "UTF8", "--no-sync", "--locale=C"],
                              capture_output=True, text=True, **server._as_user())
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        server.launch()
        created = None
        for _ in range(50):
            created = subprocess.run([str(bindir / "createdb"), "-h", str(directory / "sock"), "-p", str(server.port),
                                      "-U", "imguard", "imguard"], capture_output=True, text=True)
            if created.returncode == 0:
                break
            time.sleep(0.1)
        if created.returncode != 0:
            server.stop()
            raise RuntimeError(f"createdb failed: {created.stderr}\n{server.logs()}")
        return server

    def launch(self) -> None:
        """Start postgres on the cluster (again, after halt()) and wait until it accepts connections."""
        log = open(self.directory / "postgres.log", "ab")
        self.process = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.directory / "data"), "-k", str(self.socket_dir),
             "-p", str(self.port), "-c", "listen_addresses=", "-c", "fsync=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_user())
        log.close()
        ready = lambda: subprocess.run(  # noqa: E731
            [str(self.bindir / "pg_isready"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", "imguard",
             "-d", "postgres"], capture_output=True).returncode == 0
        if (not wait_until(lambda: self.process.poll() is not None or ready(), 30, 0.1)
                or self.process.poll() is not None):
            self.halt()
            raise RuntimeError(f"postgres did not start:\n{self.logs()}")

    def halt(self) -> None:
        """Stop the server (fast shutdown), keeping its data: launch() brings it back."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def logs(self) -> str:
        try:
            return (self.directory / "postgres.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the SIGKILL child --------------------------------------------------------------------------

def burst(data_dir: str, webhook_url: str, syslog_address: str, smtp_address: str, count: int) -> None:
    """Write `count` distinct alerts through an EventBus whose sinks are all down, as fast as it can; the
    test kills this process in the middle."""
    from imguard import alerts
    from imguard.model import BLOCK, ChatContext, Decision, FileReport, RuleMatch
    from imguard.sinks import SinkSettings, build_sinks

    bus = build_sinks(SinkSettings(webhook_url=webhook_url, webhook_timeout=1.0, syslog_address=syslog_address,
                                   email_smtp=smtp_address, email_to=["soc@corp.example"],
                                   dedup_window_seconds=0, retry_max_seconds=0.2), Path(data_dir), instance="child")
    ctx = ChatContext(protocol="xmpp", sender="mallory@corp.example", recipients=("bob@ext.example",))
    decision = Decision(action=BLOCK, matches=[RuleMatch("block-malware", BLOCK, "critical", "enforce")])
    print("ready", flush=True)
    for n in range(count):
        report = FileReport(name=f"evil-{n}.exe", path=f"evil-{n}.exe", size=n, sha256=f"{n:064x}")
        bus.write(alerts.file_event(report, ctx, decision))
    print("done", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "burst":
        burst(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        sys.exit(__doc__)
