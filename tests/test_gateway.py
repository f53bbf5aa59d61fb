"""The gateway carrier, end to end on loopback: a real embedded mitmproxy in reverse:tcp mode in front of
real local servers, carrying small test sessions that exercise each command of the session contract."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from imguard.gateway.master import Gateway
from imguard.gateway.settings import GatewaySettings
from imguard.model import ALLOW, BLOCK, Decision, FileReport, RuleMatch
from imguard.pipeline import Pipeline
from imguard.protocols.base import Close, InspectFile, Record, RelaySession, Send, StartTls, StreamSession

TIMEOUT = 10


# --- stand-ins and test sessions ----------------------------------------------------------------------------

class StubPolicy:
    def decide_file(self, report, ctx):
        return Decision(action=BLOCK, matches=[RuleMatch("unscannable", BLOCK, "high", "enforce")])


@dataclass
class StubPipeline:
    """Not the thing under test: blocks files containing b"EVIL", sleeps `delay` seconds per file."""
    delay: float = 0.0
    records: list = field(default_factory=list)
    scanned: list = field(default_factory=list)
    commits: int = 0
    policy: StubPolicy = field(default_factory=StubPolicy)

    def check_file(self, data, ctx, name="", claimed_mime="", truncated=False):
        assert threading.current_thread() is not threading.main_thread(), "check_file ran on the event loop"
        time.sleep(self.delay)
        self.scanned.append(name)
        action = BLOCK if b"EVIL" in data else ALLOW
        return FileReport(name=name, path=name, size=len(data)), Decision(action=action)

    def record(self, event):
        self.records.append(event)

    def check_unscannable(self, *args, **kw):
        """A file the gateway could not inspect takes the real Pipeline's path, recorded into `records`."""
        return Pipeline(inspector=None, policy=self.policy, alert_log=self).check_unscannable(*args, **kw)

    def write(self, event):         # as the alert log, for check_unscannable
        self.records.append(event)

    def with_direction(self, ctx):
        return ctx

    def commit(self):
        """The archive's group commit: the gateway calls it before each write towards a peer."""
        self.commits += 1


class LineSession(StreamSession):
    """A line protocol: client "STARTTLS" -> server "OK" -> StartTls; client "FILE name data" -> InspectFile;
    client "CRASH" -> raises; "QUIT" -> Close; everything else is forwarded unchanged."""

    def __init__(self, info):
        self.info = info
        self.buf = {True: b"", False: b""}
        self.starttls_asked = False
        self.tls = info.tls_on_connect
        self.held = {}

    def _lines(self, from_client, data):
        self.buf[from_client] += data
        *lines, self.buf[from_client] = self.buf[from_client].split(b"\n")
        return [line + b"\n" for line in lines]

    def data_received(self, from_client, data):
        out = []
        for line in self._lines(from_client, data):
            if from_client and line == b"STARTTLS\n":
                self.starttls_asked = True
                out.append(Send(False, line))
            elif not from_client and self.starttls_asked and line == b"OK\n":
                self.starttls_asked = False
                out += [Send(True, line), StartTls()]
            elif from_client and line.startswith(b"FILE "):
                _, name, body = line.rstrip(b"\n").split(b" ", 2)
                tid = f"t{len(self.held)}"
                self.held[tid] = line
                out.append(InspectFile(tid, body, self.info.context, name=name.decode()))
            elif from_client and line == b"CRASH\n":
                raise RuntimeError("session bug")
            elif from_client and line == b"QUIT\n":
                out.append(Close("quit"))
            else:
                out.append(Send(not from_client, line))
        return out

    def tls_started(self):
        self.tls = True
        return [Record({"event": {"kind": "event"}, "test": "tls_started"})]

    def file_verdict(self, transfer_id, report, decision):
        line = self.held.pop(transfer_id)
        if decision.blocked:
            return [Send(True, b"BLOCKED " + report.name.encode() + b"\n")]
        return [Send(False, line)]

    def connection_closed(self, from_client):
        return [Close("peer closed")]


class SteppingSession(LineSession):
    """LineSession with data_received_steps: one step per line. A line "WAIT" is decided only once the
    upstream server (a thread with a blocking socket, see test_decided_lines_go_out_before_the_rest) has
    received every line before it, or after 3 s; it records which."""

    def data_received_steps(self, from_client, data):
        for line in self._lines(from_client, data):
            if from_client and line == b"WAIT\n":
                arrived = SteppingSession.upstream.wait_for(b"first\n", 3.0)
                SteppingSession.waits.append(arrived)
            yield [Send(not from_client, line)]

    def data_received(self, from_client, data):
        return [cmd for step in self.data_received_steps(from_client, data) for cmd in step]


class ThreadServer:
    """An upstream on a plain blocking socket in its own thread: it sees bytes while the event loop is busy."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.cond = threading.Condition()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            while data := conn.recv(65536):
                with self.cond:
                    self.received += data
                    self.cond.notify_all()

    def wait_for(self, text: bytes, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: text in self.received, timeout)


# --- local servers -------------------------------------------------------------------------------------------

def make_ca(tmp: Path):
    """A test CA and a server certificate for localhost/127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test upstream CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = tmp / "upstream-ca.pem", tmp / "server.pem", tmp / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


async def start_line_server(tls_ctx: ssl.SSLContext | None = None, greeting: bytes = b""):
    """Echoes lines back prefixed with "echo:"; answers "STARTTLS" with "OK" and upgrades to TLS."""
    async def handle(reader, writer):
        try:
            if greeting:
                writer.write(greeting)
            while line := await reader.readline():
                if line == b"STARTTLS\n" and tls_ctx is not None:
                    writer.write(b"OK\n")
                    await writer.drain()
                    await writer.start_tls(tls_ctx)
                    continue
                writer.write(b"echo:" + line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def start_raw_echo():
    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_gateway(tmp: Path, upstream_port: int, pipeline=None, factories=None, **settings):
    listen = settings.pop("listen_port", 0)
    modes = settings.pop("mode", [f"reverse:tcp://127.0.0.1:{upstream_port}@127.0.0.1:{listen}"])
    s = GatewaySettings(mode=modes, ports=settings.pop("ports", [f"{upstream_port}=line"]), **settings)
    if factories is None:
        factories = {"line": LineSession, "relay": lambda i: RelaySession()}
    gw = Gateway(s, pipeline or StubPipeline(), data_dir=tmp / "data", factories=factories, transfers=None)
    await gw.start()
    return gw, gw.listen_addrs[0][1][1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 3))


async def closed_by_peer(reader) -> bool:
    """True once the peer has closed (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    except ConnectionResetError:
        return True


async def readline(reader):
    return await asyncio.wait_for(reader.readline(), TIMEOUT)


# --- tests ---------------------------------------------------------------------------------------------------

def test_relay_session_carries_bytes_exactly(tmp_path):
    """A RelaySession forwards every byte unchanged in both directions, in any chunking."""
    async def main():
        echo, port = await start_raw_echo()
        gw, gport = await start_gateway(tmp_path, port, ports=[f"{port}=relay"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            payload = bytes(range(256)) * 4096 + b"\x00\xff tail"        # 1 MiB of every byte value
            writer.write(payload)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
            assert got == payload
            writer.close()
        finally:
            await gw.stop()
            echo.close()
    run(main())


def test_decided_lines_go_out_before_the_rest_of_the_read(tmp_path, monkeypatch):
    """A session with data_received_steps: what is decided is forwarded while the rest of the same read is
    still being checked (FORWARD_AFTER 0 here: at once), so the server works in parallel with the gateway."""
    from imguard.gateway import layer
    monkeypatch.setattr(layer, "FORWARD_AFTER", 0.0)
    upstream = ThreadServer()
    SteppingSession.upstream, SteppingSession.waits = upstream, []

    async def main():
        gw, gport = await start_gateway(tmp_path, upstream.port, factories={"line": SteppingSession})
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"first\nWAIT\nlast\n")        # one write: one read at the gateway
            await writer.drain()
            await asyncio.to_thread(upstream.wait_for, b"last\n", TIMEOUT)
            writer.close()
        finally:
            await gw.stop()
    run(main())
    assert upstream.received == b"first\nWAIT\nlast\n"
    assert SteppingSession.waits == [True], "the first line was held until the whole read was checked"


class NagleServer:
    """An upstream that, like Prosody, leaves Nagle's algorithm on, in a thread on a blocking socket: it sends
    what it is told and reports how many of its segments the gateway's kernel has not acknowledged yet."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conn: socket.socket | None = None
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.conn, _ = self.sock.accept()
        self.accepted.set()

    def unacked(self) -> int:
        """tcpi_unacked of struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then rto, ato, snd_mss, rcv_mss."""
        info = self.conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, 24)[0]


async def gateway_server_socket(gw):
    """The gateway's socket towards the upstream, from mitmproxy's connection handler (as tcp_socket finds it),
    once its connection is open."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for handler in gw.master.addons.get("proxyserver").connections.values():
            for conn, io in handler.transports.items():
                if conn is not handler.client and io.writer is not None:
                    return io.writer.get_extra_info("socket")
        await asyncio.sleep(0.01)
    raise AssertionError("the gateway never opened its upstream connection")


@pytest.mark.platform_skip
@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's")
def test_reads_are_acknowledged_at_once(tmp_path):
    """quick_ack: a line from a server that leaves Nagle on is acknowledged by the gateway when it is read, even
    when the gateway's kernel had put that leg in delayed-ACK mode (as after an interactive login): the server's
    next small write need not wait up to 40 ms for it. Checked on the server's own socket, by the kernel's count
    of unacknowledged segments once the line has reached the client (it crossed the gateway after the read)."""
    upstream = NagleServer()

    async def main():
        gw, gport = await start_gateway(tmp_path, upstream.port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"hello\n")
            await writer.drain()
            assert await asyncio.to_thread(upstream.accepted.wait, TIMEOUT)
            # delayed-ACK ("pingpong") mode on the gateway's upstream leg: what an interactive exchange leaves
            leg = await gateway_server_socket(gw)
            leg.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            assert leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
            upstream.conn.sendall(b"news\n")
            assert await readline(reader) == b"news\n"
            assert upstream.unacked() == 0, "the gateway left the server's segment unacknowledged"
            writer.close()
        finally:
            await gw.stop()
            if upstream.conn is not None:
                upstream.conn.close()
    run(main())


def test_send_and_close_commands(tmp_path):
    """Lines go through the session both ways; QUIT makes the session Close both legs."""
    pipeline = StubPipeline()

    async def main():
        srv, port = await start_line_server()
        gw, gport = await start_gateway(tmp_path, port, pipeline)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"hel")
            await writer.drain()
            writer.write(b"lo\n")
            assert await readline(reader) == b"echo:hello\n"
            assert pipeline.commits >= 2        # before the line went up, and before its echo came down
            writer.write(b"QUIT\n")
            assert await closed_by_peer(reader)    # closed by the gateway
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_starttls_upgrades_both_legs(tmp_path):
    """After StartTls the client handshakes with a certificate from imguard's CA, the server leg is TLS
    (verified against the private upstream CA), tls_started() is called, and lines still flow."""
    ca_path, cert_path, key_path = make_ca(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)

    async def main():
        srv, port = await start_line_server(server_ctx)
        pipeline = StubPipeline()
        gw, gport = await start_gateway(tmp_path, port, pipeline, upstream_ca=str(ca_path))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"plain\n")
            assert await readline(reader) == b"echo:plain\n"
            writer.write(b"STARTTLS\n")
            assert await readline(reader) == b"OK\n"
            client_ctx = ssl.create_default_context(cafile=str(tmp_path / "data" / "ca" / "mitmproxy-ca-cert.pem"))
            await asyncio.wait_for(writer.start_tls(client_ctx, server_hostname="localhost"), TIMEOUT)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der)
            assert "imguard" in cert.issuer.rfc4514_string()
            writer.write(b"secret\n")
            assert await readline(reader) == b"echo:secret\n"
            assert any(r.get("test") == "tls_started" for r in pipeline.records)
            writer.close()
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_starttls_refuses_unverifiable_upstream(tmp_path):
    """Without the private CA the upstream certificate fails verification: the client never gets a session."""
    ca_path, cert_path, key_path = make_ca(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)

    async def main():
        srv, port = await start_line_server(server_ctx)
        gw, gport = await start_gateway(tmp_path, port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"STARTTLS\n")
            assert await readline(reader) == b"OK\n"
            client_ctx = ssl.create_default_context(cafile=str(tmp_path / "data" / "ca" / "mitmproxy-ca-cert.pem"))
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, OSError)):
                await asyncio.wait_for(writer.start_tls(client_ctx, server_hostname="localhost"), TIMEOUT)
                writer.write(b"secret\n")
                line = await readline(reader)
                if not line:
                    raise ConnectionError("closed")
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_no_verify_upstream_is_per_host(tmp_path):
    """A host named in no_verify_upstream is accepted with a certificate nobody can verify."""
    ca_path, cert_path, key_path = make_ca(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)

    async def main():
        srv, port = await start_line_server(server_ctx)
        gw, gport = await start_gateway(tmp_path, port, no_verify_upstream=["localhost"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"STARTTLS\n")
            assert await readline(reader) == b"OK\n"
            client_ctx = ssl.create_default_context(cafile=str(tmp_path / "data" / "ca" / "mitmproxy-ca-cert.pem"))
            await asyncio.wait_for(writer.start_tls(client_ctx, server_hostname="localhost"), TIMEOUT)
            writer.write(b"x\n")
            assert await readline(reader) == b"echo:x\n"
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_inspect_file_verdicts_in_a_thread(tmp_path):
    """InspectFile runs check_file off the event loop; block -> the session's notice, allow -> forwarded."""
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline()
        gw, gport = await start_gateway(tmp_path, port, pipeline)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"FILE good.txt hello\n")
            assert await readline(reader) == b"echo:FILE good.txt hello\n"
            writer.write(b"FILE bad.exe EVIL\n")
            assert await readline(reader) == b"BLOCKED bad.exe\n"
            assert pipeline.scanned == ["good.txt", "bad.exe"]
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_slow_scan_does_not_stall_other_connections(tmp_path):
    """While one connection's file is being scanned (the scan held until the test releases it), another
    connection's lines round-trip: all 20 before the scan ends. No clock: what is asserted is the order."""
    async def main():
        srv, port = await start_line_server()
        release = threading.Event()

        class HeldScan(StubPipeline):
            def check_file(self, *args, **kw):     # the scan ends when the test says so, not after a delay
                assert release.wait(TIMEOUT), "the scan was never released"
                return super().check_file(*args, **kw)

        gw, gport = await start_gateway(tmp_path, port, HeldScan())
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", gport)
            r2, w2 = await asyncio.open_connection("127.0.0.1", gport)
            w1.write(b"FILE slow.bin data\n")
            await w1.drain()
            while gw.inspection.pending == 0:       # the scan has started
                await asyncio.sleep(0.01)
            for i in range(20):
                w2.write(b"ping %d\n" % i)
                assert await readline(r2) == b"echo:ping %d\n" % i
            assert gw.inspection.pending == 1       # all 20 answered while the scan still ran: none waited for it
            release.set()
            assert await readline(r1) == b"echo:FILE slow.bin data\n"
        finally:
            release.set()
            await gw.stop()
            srv.close()
    run(main())


def test_session_exception_closes_only_its_connection(tmp_path):
    """A session that raises is recorded as an anomaly and its connection closed; others carry on."""
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline()
        gw, gport = await start_gateway(tmp_path, port, pipeline)
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", gport)
            r2, w2 = await asyncio.open_connection("127.0.0.1", gport)
            w2.write(b"a\n")
            assert await readline(r2) == b"echo:a\n"
            w1.write(b"CRASH\n")
            assert await closed_by_peer(r1)
            w2.write(b"b\n")
            assert await readline(r2) == b"echo:b\n"
            kinds = [r["imguard"]["anomaly"]["kind"] for r in pipeline.records if "anomaly" in r.get("imguard", {})]
            assert kinds == ["session_error"]
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_self_connect_is_refused(tmp_path):
    """A listener whose destination is the gateway itself (here 127.0.0.2, which mitmproxy's own loop guard
    does not recognise with a wildcard listener) is refused with an anomaly instead of looping."""
    async def main():
        port = free_port()
        pipeline = StubPipeline()
        s = GatewaySettings(mode=[f"reverse:tcp://127.0.0.2:{port}@{port}"], ports=[], listen_host="")
        gw = Gateway(s, pipeline, data_dir=tmp_path / "data", factories={}, transfers=None)
        await gw.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello\n")
            assert await closed_by_peer(reader)
            await asyncio.sleep(0.1)
            assert gw.addon.stats["self_connect"] == 1
            kinds = [r["imguard"]["anomaly"]["kind"] for r in pipeline.records if "anomaly" in r.get("imguard", {})]
            assert kinds == ["self_connect"]
        finally:
            await gw.stop()
    run(main())


def test_idle_timeout_setting_is_applied(tmp_path):
    """tcp_timeout is ours, not mitmproxy's 600 s: with 1 s an idle connection is cut, with the default it lives."""
    async def main():
        srv, port = await start_line_server()
        gw, gport = await start_gateway(tmp_path, port, tcp_timeout=1)
        try:
            assert gw.master.options.tcp_timeout == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"x\n")
            assert await readline(reader) == b"echo:x\n"
            t0 = time.monotonic()
            assert await closed_by_peer(reader)
            assert 0.8 < time.monotonic() - t0 < 5
        finally:
            await gw.stop()
            srv.close()
        gw2, _ = await start_gateway(tmp_path, port)
        try:
            assert gw2.master.options.tcp_timeout == GatewaySettings().tcp_timeout > 600
        finally:
            await gw2.stop()
    run(main())


def test_tls_first_connection(tmp_path):
    """A client that opens with a ClientHello on a '+tls' port gets TLS with imguard's CA at once; the session
    is built with tls_on_connect=True and sees the decrypted lines."""
    ca_path, cert_path, key_path = make_ca(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    built = []

    def factory(info):
        built.append(info)
        return LineSession(info)

    async def main():
        async def handle(reader, writer):
            while line := await reader.readline():
                writer.write(b"tls-echo:" + line)
            writer.close()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        gw, gport = await start_gateway(tmp_path, port, ports=[f"{port}=line+tls"], upstream_ca=str(ca_path),
                                        factories={"line": factory})
        try:
            client_ctx = ssl.create_default_context(cafile=str(tmp_path / "data" / "ca" / "mitmproxy-ca-cert.pem"))
            reader, writer = await asyncio.open_connection("127.0.0.1", gport, ssl=client_ctx,
                                                           server_hostname="localhost")
            writer.write(b"hi\n")
            assert await readline(reader) == b"tls-echo:hi\n"
            assert [(i.protocol, i.tls_on_connect) for i in built] == [("line", True)]
            issuer = x509.load_der_x509_certificate(
                writer.get_extra_info("ssl_object").getpeercert(binary_form=True)).issuer.rfc4514_string()
            assert "imguard" in issuer
        finally:
            await gw.stop()
            srv.close()
    run(main())


# --- HTTP uploads --------------------------------------------------------------------------------------------

async def start_http_server():
    """Accepts PUT/POST, stores bodies, answers 201."""
    received = []

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received.append((lines[0], body))
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], received


async def http_put(port: int, path: str, body: bytes, headers: str = ""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"PUT {path} HTTP/1.1\r\nHost: upload.example\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode()
                 + body)
    status = await readline(reader)
    writer.close()
    return int(status.split()[1])


class StubTransfers:
    def __init__(self):
        self.expected = {}
        self.blocked = {}

    def take_upload(self, url):
        return self.expected.pop(url, None)

    def mark_blocked_url(self, url, reason):
        self.blocked[url] = reason

    def blocked_url_reason(self, url):
        return self.blocked.get(url)


@dataclass
class Slot:
    get_url: str
    name: str = "report.pdf"
    content_type: str = "application/pdf"


def test_http_upload_announced_is_scanned(tmp_path):
    """A PUT to a URL a chat session announced is buffered and scanned: EVIL -> 403 and the GET URL is marked
    blocked (nothing reached the server); clean -> forwarded; a later GET of the blocked URL -> 403."""
    async def main():
        srv, port, received = await start_http_server()
        pipeline = StubPipeline()
        transfers = StubTransfers()
        s = GatewaySettings(mode=[f"reverse:tcp://127.0.0.1:{port}@127.0.0.1:0"], ports=[])
        gw = Gateway(s, pipeline, data_dir=tmp_path / "data", factories={}, transfers=transfers)
        await gw.start()
        gport = gw.port_of("reverse")
        try:
            transfers.expected["http://upload.example/up/1/bad.pdf"] = Slot("https://upload.example/get/1/bad.pdf")
            assert await http_put(gport, "/up/1/bad.pdf", b"%PDF EVIL") == 403
            assert transfers.blocked == {"https://upload.example/get/1/bad.pdf": "block"}
            assert received == []
            transfers.expected["http://upload.example/up/2/ok.pdf"] = Slot("https://upload.example/get/2/ok.pdf")
            assert await http_put(gport, "/up/2/ok.pdf", b"%PDF fine") == 201
            assert received == [("PUT /up/2/ok.pdf HTTP/1.1", b"%PDF fine")]
            assert pipeline.scanned == ["report.pdf", "report.pdf"]
            # not announced and not in upload_paths: passed without a scan
            assert await http_put(gport, "/other", b"EVIL") == 201
            assert len(pipeline.scanned) == 2
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_http_upload_paths_and_size_limit(tmp_path):
    """A configured upload path is scanned too; above max_upload_size policy decides (here: block) -> 413."""
    async def main():
        srv, port, received = await start_http_server()
        pipeline = StubPipeline()
        s = GatewaySettings(mode=[f"reverse:tcp://127.0.0.1:{port}@127.0.0.1:0"], ports=[],
                            upload_paths=[r"/api/files"], max_upload_size=1000)
        gw = Gateway(s, pipeline, data_dir=tmp_path / "data", factories={}, transfers=None)
        await gw.start()
        gport = gw.port_of("reverse")
        try:
            assert await http_put(gport, "/api/files/x", b"EVIL") == 403
            assert await http_put(gport, "/api/files/y", b"a" * 2000) == 413
            assert received == []
            assert await http_put(gport, "/api/files/z", b"a" * 999) == 201
            assert any(r.get("file", {}).get("size") == 2000 for r in pipeline.records)   # the too-large alert
        finally:
            await gw.stop()
            srv.close()
    run(main())


# --- explicit proxy modes: the README default (regular + socks5) ----------------------------------------------

def test_regular_proxy_connect_to_chat_port(tmp_path):
    """A client using the gateway as an HTTP proxy (CONNECT host:port) to a mapped chat port gets a session,
    exactly as in reverse mode."""
    async def main():
        srv, port = await start_line_server()
        gw, _ = await start_gateway(tmp_path, port, mode=["regular@127.0.0.1:0"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port_of("regular"))
            writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert (await readline(reader)).startswith(b"HTTP/1.1 200")
            while await readline(reader) != b"\r\n":
                pass
            writer.write(b"FILE x.exe EVIL\n")
            assert await readline(reader) == b"BLOCKED x.exe\n"
            writer.write(b"hi\n")
            assert await readline(reader) == b"echo:hi\n"
            assert gw.addon.stats["sessions"] == 1
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_socks5_proxy_to_chat_port_and_unknown_port(tmp_path):
    """Through the socks5 listener: a mapped port gets a session; with --proxy-destinations any, an unmapped,
    unrecognised protocol is relayed untouched with no session (lowest cost). (By default an unmapped port is
    refused: tests/test_open_relay.py.)"""
    async def main():
        srv, port = await start_line_server()
        echo, echo_port = await start_raw_echo()
        gw, _ = await start_gateway(tmp_path, port, mode=["socks5@127.0.0.1:0"], proxy_destinations="any")
        try:
            async def via_socks(dst_port):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port_of("socks5"))
                writer.write(b"\x05\x01\x00")
                assert await reader.readexactly(2) == b"\x05\x00"
                writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + dst_port.to_bytes(2, "big"))
                assert (await reader.readexactly(10))[:2] == b"\x05\x00"
                return reader, writer
            r1, w1 = await via_socks(port)
            w1.write(b"FILE a.exe EVIL\n")
            assert await readline(r1) == b"BLOCKED a.exe\n"
            r2, w2 = await via_socks(echo_port)
            w2.write(b"SSH-2.0-test\r\n")
            assert await readline(r2) == b"SSH-2.0-test\r\n"
            assert gw.addon.stats["sessions"] == 1 and gw.addon.stats["relayed"] == 1
        finally:
            await gw.stop()
            srv.close()
            echo.close()
    run(main())


def test_inspection_queue_full_is_unscannable_not_a_pass(tmp_path):
    """With inspect_queue=1 and a slow scan in progress, a second file is not scanned: policy decides on an
    'unscannable (limit)' report (the stand-in policy blocks it) instead of letting it through."""
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline(delay=1.5)
        gw, gport = await start_gateway(tmp_path, port, pipeline, inspect_queue=1)
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", gport)
            r2, w2 = await asyncio.open_connection("127.0.0.1", gport)
            w1.write(b"FILE slow.txt fine\n")
            await w1.drain()
            await asyncio.sleep(0.3)
            w2.write(b"FILE second.txt fine\n")
            assert await readline(r2) == b"BLOCKED second.txt\n"
            assert await readline(r1) == b"echo:FILE slow.txt fine\n"
            assert pipeline.scanned == ["slow.txt"]
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_flood_while_inspecting_closes_the_connection(tmp_path):
    """Bytes that pile up while a slow scan holds the connection are bounded by max_queued_bytes: past it the
    connection is closed with an anomaly instead of growing memory."""
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline(delay=2.0)
        gw, gport = await start_gateway(tmp_path, port, pipeline, max_queued_bytes=100_000)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"FILE slow.bin data\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            try:
                for _ in range(50):
                    writer.write(b"x" * 10_000 + b"\n")
                    await writer.drain()
            except ConnectionError:
                pass
            assert await closed_by_peer(reader)
            kinds = [r["imguard"]["anomaly"]["kind"] for r in pipeline.records if "anomaly" in r.get("imguard", {})]
            assert kinds == ["flood_during_inspection"]
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_https_upload_through_connect_is_intercepted_and_scanned(tmp_path):
    """An HTTPS upload through the explicit proxy (CONNECT to an HTTP port) is decrypted with a certificate from
    imguard's CA, scanned, and blocked with 403 before reaching the server."""
    ca_path, cert_path, key_path = make_ca(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)

    async def main():
        received = []

        async def handle(reader, writer):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([header.split(b":")[1] for header in head.split(b"\r\n")
                              if header.lower().startswith(b"content-length")][0])
                received.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            writer.close()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        pipeline = StubPipeline()
        s = GatewaySettings(mode=["regular@127.0.0.1:0"], ports=[], http_ports=[port], upload_paths=["/upload/"],
                            upstream_ca=str(ca_path))
        gw = Gateway(s, pipeline, data_dir=tmp_path / "data", factories={}, transfers=None)
        await gw.start()
        try:
            async def put(body):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port_of("regular"))
                writer.write(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
                while await readline(reader) != b"\r\n":
                    pass
                client_ctx = ssl.create_default_context(cafile=str(tmp_path / "data" / "ca" / "mitmproxy-ca-cert.pem"))
                await asyncio.wait_for(writer.start_tls(client_ctx, server_hostname="localhost"), TIMEOUT)
                issuer = x509.load_der_x509_certificate(
                    writer.get_extra_info("ssl_object").getpeercert(binary_form=True)).issuer.rfc4514_string()
                assert "imguard" in issuer
                writer.write(f"PUT /upload/f.bin HTTP/1.1\r\nHost: localhost:{port}\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                status = await readline(reader)
                writer.close()
                return int(status.split()[1])
            assert await put(b"MZ EVIL") == 403
            assert received == []
            assert await put(b"fine") == 201
            assert received == [b"fine"]
            assert pipeline.scanned == ["f.bin", "f.bin"]
        finally:
            await gw.stop()
            srv.close()
    run(main())
