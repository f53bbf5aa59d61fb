"""STARTTLS plaintext injection (CVE-2011-0411 class) through the real `imguard run`.

A scripted XMPP server on loopback answers <starttls/> with <proceed/> and, in the same write, a stanza of its own;
a scripted client pipelines an <auth> after its <starttls/>. Neither may cross into the TLS session: the client,
once in TLS, must see only the server's new stream header; the server's TLS handshake must succeed (plaintext
carried in would be read as a broken TLS record) and must read no <auth>. The gateway records both as
starttls_injection. The session-level cases are in test_xmpp_session.py and test_irc_session.py.

And STARTTLS stripping: a client that logs in without the STARTTLS the server offers. With the fail mode `downgrade`
closed (the default) its <auth>, the credentials in the clear, must not reach the server.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
import types

import pytest

from tests.peers.gateway import Gateway
from tests.peers.prosody import free_ports, make_certificates

CLIENT_HEADER = (b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
                 b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
SERVER_HEADER = (b"<?xml version='1.0'?><stream:stream from='localhost' id='s1' version='1.0' "
                 b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
FEATURES = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
            b"</stream:features>")
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
INJECTED = b"<message from='bank@localhost' to='alice@localhost'><body>INJECTED call +1 555 0100</body></message>"
AUTH = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHNlY3JldA==</auth>"
TIMEOUT = 10.0


def read_until(sock, marker: bytes, got: bytes = b"") -> bytes:
    while marker not in got:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before {marker!r}; got {got!r}")
        got += chunk
    return got


class ScriptedServer(threading.Thread):
    """One XMPP connection: features with STARTTLS, <proceed/> plus INJECTED in one write, then TLS; inside TLS it
    answers the client's new header with its own. Records what it read in plaintext and in TLS, and how TLS went."""

    def __init__(self, certs):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(certs.cert_file, certs.key_file)
        self.plaintext = b""
        self.in_tls = b""
        self.error: BaseException | None = None

    def run(self):
        try:
            while True:                 # the gateway's start-up probe connects and closes first
                conn, _ = self.listener.accept()
                conn.settimeout(TIMEOUT)
                try:
                    self.plaintext = read_until(conn, b"<stream:stream")
                    break
                except AssertionError:
                    conn.close()
            conn.sendall(SERVER_HEADER + FEATURES)
            self.plaintext = read_until(conn, b"<starttls", self.plaintext)
            conn.sendall(PROCEED + INJECTED)                 # one write: the injection rides with <proceed/>
            with self.tls.wrap_socket(conn, server_side=True) as tls:
                self.in_tls = read_until(tls, b"<stream:stream")
                tls.sendall(SERVER_HEADER)
                try:
                    while chunk := tls.recv(65536):
                        self.in_tls += chunk
                except (TimeoutError, OSError):
                    pass
        except BaseException as e:          # reported by the test
            self.error = e
        finally:
            self.listener.close()


@pytest.fixture
def setup(tmp_path):
    certs = make_certificates(tmp_path / "certs", names=("localhost",))
    server = ScriptedServer(certs)
    server.start()
    upstream = types.SimpleNamespace(c2s_port=server.port, tls_port=free_ports(1)[0], ca_file=certs.ca_file)
    gateway = Gateway.start(tmp_path / "gw", upstream)
    try:
        yield server, gateway
    finally:
        gateway.stop()


def test_plaintext_after_proceed_and_after_starttls_never_enters_tls(setup):
    """Both injections are discarded by the gateway and recorded; the TLS session carries only real TLS data."""
    server, gateway = setup
    with socket.create_connection(("127.0.0.1", gateway.c2s_port), timeout=TIMEOUT) as raw:
        raw.sendall(CLIENT_HEADER)
        read_until(raw, b"</stream:features>")
        raw.sendall(STARTTLS + AUTH)                          # one write: the auth pipelined after <starttls/>
        before_tls = read_until(raw, b"<proceed")
        context = ssl.create_default_context(cafile=str(gateway.ca_file))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(CLIENT_HEADER)
            got = read_until(tls, b"<stream:stream")       # the sentinel: the server's new header, inside TLS
            tls.settimeout(1.0)
            try:
                got += tls.recv(65536)
            except (TimeoutError, OSError):
                pass
    server.join(TIMEOUT)
    assert server.error is None, f"the scripted server failed (plaintext carried into TLS?): {server.error!r}"
    assert b"INJECTED" not in before_tls + got, "bytes after <proceed/> reached the client"
    assert got.startswith(SERVER_HEADER[:20]) or SERVER_HEADER in got
    assert b"<auth" not in server.plaintext + server.in_tls, "the pipelined <auth> reached the server"
    assert server.in_tls.startswith(CLIENT_HEADER)

    def injection(from_client: bool):
        return lambda e: (e["imguard"].get("anomaly", {}).get("kind") == "starttls_injection"
                          and e["imguard"]["anomaly"].get("from_client") == from_client)
    assert asyncio.run(gateway.wait_alert(injection(True))), "the client's injection was not recorded"
    assert asyncio.run(gateway.wait_alert(injection(False))), "the server's injection was not recorded"


class StrippedServer(ScriptedServer):
    """Offers STARTTLS, then records whatever the client sends in plaintext until the client closes."""

    def run(self):
        try:
            while True:
                conn, _ = self.listener.accept()
                conn.settimeout(TIMEOUT)
                try:
                    self.plaintext = read_until(conn, b"<stream:stream")
                    break
                except AssertionError:
                    conn.close()
            conn.sendall(SERVER_HEADER + FEATURES)
            try:
                while chunk := conn.recv(65536):
                    self.plaintext += chunk
            except OSError:
                pass
        except BaseException as e:
            self.error = e
        finally:
            self.listener.close()


def test_stripped_plaintext_login_is_refused_with_the_fail_mode_closed(tmp_path):
    """The client ignores the STARTTLS offer and sends <auth> in plaintext: the server must NOT receive it; the
    client gets a SASL failure with <encryption-required/>; a <presence/> sent after it (the sentinel)
    still reaches the server, so the connection itself was carried."""
    certs = make_certificates(tmp_path / "certs", names=("localhost",))
    server = StrippedServer(certs)
    server.start()
    upstream = types.SimpleNamespace(c2s_port=server.port, tls_port=free_ports(1)[0], ca_file=certs.ca_file)
    gateway = Gateway.start(tmp_path / "gw", upstream)
    try:
        with socket.create_connection(("127.0.0.1", gateway.c2s_port), timeout=TIMEOUT) as raw:
            raw.sendall(CLIENT_HEADER)
            read_until(raw, b"</stream:features>")
            raw.sendall(AUTH)
            answer = read_until(raw, b"</failure>")
            raw.sendall(b"<presence/>")
            deadline = time.monotonic() + TIMEOUT
            while b"<presence/>" not in server.plaintext and time.monotonic() < deadline:
                time.sleep(0.05)
        server.join(TIMEOUT)
        assert b"<presence/>" in server.plaintext, "the sentinel did not reach the server"
        assert b"<auth" not in server.plaintext, "the plaintext credentials reached the server"
        assert b"encryption-required" in answer
        alert = asyncio.run(gateway.wait_alert(lambda e: e["imguard"].get("anomaly", {}).get("kind")
                                               == "starttls_stripping"))
        assert alert and alert["imguard"]["anomaly"]["severity"] == "high"
    finally:
        gateway.stop()


def test_the_carrier_drops_plaintext_a_session_returns_after_starttls(tmp_path):
    """The carrier's own guard (imguard/gateway/layer.py), for any session: a naive line session forwards what
    followed the server's "OK" in the same read after its StartTls; the gateway must NOT write it inside the new
    TLS session, and records starttls_injection. The client's next line still crosses (the sentinel)."""
    from tests.test_gateway import StubPipeline, make_ca, readline, run, start_gateway

    ca_path, cert_path, key_path = make_ca(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)

    async def handle(reader, writer):
        try:
            while line := await reader.readline():
                if line == b"STARTTLS\n":
                    writer.write(b"OK\nINJECTED\n")          # one write: the injection rides with the answer
                    await writer.drain()
                    await writer.start_tls(server_ctx)
                    continue
                writer.write(b"echo:" + line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        pipeline = StubPipeline()
        gw, gport = await start_gateway(tmp_path, srv.sockets[0].getsockname()[1], pipeline, upstream_ca=str(ca_path))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"STARTTLS\n")
            assert await readline(reader) == b"OK\n"
            client_ctx = ssl.create_default_context(cafile=str(tmp_path / "data" / "ca" / "mitmproxy-ca-cert.pem"))
            await asyncio.wait_for(writer.start_tls(client_ctx, server_hostname="localhost"), TIMEOUT)
            writer.write(b"sentinel\n")
            assert await readline(reader) == b"echo:sentinel\n", "INJECTED was written inside TLS"
            assert any(r.get("imguard", {}).get("anomaly", {}).get("kind") == "starttls_injection"
                       for r in pipeline.records)
            writer.close()
        finally:
            await gw.stop()
            srv.close()
    run(main())
