"""The server leg's TLS, through a real `imguard run`: an upstream certificate that does not verify is an
`imguard.tls` alert (side server, severity medium, docs/events.md), not a low `server_unreachable`; and the
certificates the gateway presents are signed by imguard's own CA only, never with the leaked eMudhra
intermediate the mitmproxy wheel can sign with (options `emudhra`, `emudhra_old`).

The upstream is a real TLS server (Python's ssl) on loopback, its certificate issued by a test CA the gateway is
given (`--upstream-ca`) or not."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from imguard.gateway.master import Gateway as InProcessGateway
from imguard.gateway.settings import GatewaySettings
from tests.peers.gateway import PYTHON, ImguardRun
from tests.peers.prosody import PeerError, free_ports, wait_for_port
from tests.test_gateway import LineSession, StubPipeline, make_ca

TIMEOUT = 15.0
STREAM = (b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams'>")


@dataclass
class DirectTlsRun(ImguardRun):
    """`imguard run` in front of one direct-TLS XMPP port (`--ports N=xmpp+tls`)."""
    directory: Path
    port: int = 0
    process: subprocess.Popen | None = None
    stopped: bool = False

    @classmethod
    def start(cls, directory: Path, upstream_port: int, upstream_ca: Path | None) -> "DirectTlsRun":
        directory.mkdir(parents=True, exist_ok=True)
        (port,) = free_ports(1)
        run = cls(directory, port)
        run.data_dir.mkdir(parents=True, exist_ok=True)
        command = [str(PYTHON), "-m", "imguard", "run", "--listen-host", "127.0.0.1",
                   "--mode", f"reverse:tcp://127.0.0.1:{upstream_port}@{port}",
                   "--ports", f"{upstream_port}=xmpp+tls", "--data-dir", str(run.data_dir),
                   *(["--upstream-ca", str(upstream_ca)] if upstream_ca else [])]
        with open(run.log_file, "wb") as out:
            run.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=directory,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for_port(port, 30, run.process, what="imguard run")
            result = subprocess.run([str(PYTHON), "-m", "imguard", "ca", "--data-dir", str(run.data_dir),
                                     "--export", str(run.ca_file)], capture_output=True, timeout=30)
            assert result.returncode == 0, result.stderr
        except BaseException as e:
            run.stop()
            raise PeerError(f"imguard run did not start\n{run.logs()}") from e
        return run


async def _tls_server(cert: Path, key: Path, received: list[bytes]):
    """A direct-TLS server that answers a stream header with its own."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def handle(reader, writer):
        try:
            data = await reader.read(4096)
            received.append(data)
            writer.write(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                         b"from='localhost' id='s1' version='1.0'>")
            await writer.drain()
            await reader.read()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def _client(run: DirectTlsRun) -> tuple[bytes, x509.Certificate]:
    """Connect through the gateway verifying imguard's CA (and only it); what the server answered, and the
    certificate the gateway presented."""
    ctx = ssl.create_default_context(cafile=str(run.ca_file))
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", run.port, ssl=ctx, server_hostname="localhost"), TIMEOUT)
    cert = x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    writer.write(STREAM)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(4096), TIMEOUT)
    except (ConnectionError, ssl.SSLError):
        answer = b""
    writer.close()
    return answer, cert


def _imguard_ca(run: DirectTlsRun) -> x509.Certificate:
    return x509.load_pem_x509_certificate(run.ca_file.read_bytes())


def test_untrusted_upstream_certificate_is_a_medium_server_side_tls_alert(tmp_path):
    ca, cert, key = make_ca(tmp_path)
    received: list[bytes] = []

    async def main():
        server, port = await _tls_server(cert, key, received)
        run = DirectTlsRun.start(tmp_path / "untrusted", port, upstream_ca=None)     # the test CA is not trusted
        try:
            answer, _ = await _client(run)
            assert b"<stream:stream" not in answer          # nothing crossed from the unverified server
            event = await run.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.tls",
                                         timeout=TIMEOUT)
            run.check_alive()
            assert event is not None, f"no imguard.tls event: {run.alerts()}\n{run.logs()}"
            assert event["imguard"]["tls"]["side"] == "server"
            assert event["imguard"]["severity"] == "medium" and event["event"]["severity"] == 3
            assert "verify" in event["imguard"]["tls"]["detail"].lower()
            assert not [e for e in run.alerts() if e.get("imguard", {}).get("anomaly", {}).get("kind")
                        == "server_unreachable"]
        finally:
            run.stop()
            server.close()
    asyncio.run(main())
    assert received == []       # the gateway sent the server nothing over the unverified connection


def test_trusted_upstream_carries_the_stream_and_records_no_tls_failure(tmp_path):
    """The control: the same server, its CA given to the gateway, carries the stream; so the alert above is the
    certificate's doing. And the certificate the client is shown verifies against imguard's CA alone."""
    ca, cert, key = make_ca(tmp_path)
    received: list[bytes] = []

    async def main():
        server, port = await _tls_server(cert, key, received)
        run = DirectTlsRun.start(tmp_path / "trusted", port, upstream_ca=ca)
        try:
            answer, shown = await _client(run)
            assert b"<stream:stream" in answer
            assert shown.issuer == _imguard_ca(run).subject
            assert "emudhra" not in shown.issuer.rfc4514_string().lower()
            run.check_alive()
            assert not [e for e in run.alerts() if e.get("event", {}).get("dataset") == "imguard.tls"]
        finally:
            run.stop()
            server.close()
    asyncio.run(main())
    assert received and received[0].startswith(b"<?xml")


def test_compromised_intermediate_options_are_off_in_a_running_gateway(tmp_path):
    """The installed mitmproxy has `emudhra` / `emudhra_old` (sign with a publicly known intermediate key): in a
    running gateway they are off, and the certificate store signs with imguard's own CA key."""
    from mitmproxy import certs

    async def main():
        s = GatewaySettings(mode=["reverse:tcp://127.0.0.1:9@127.0.0.1:0"], ports=["9=line"])
        gw = InProcessGateway(s, StubPipeline(), data_dir=tmp_path / "data", factories={"line": LineSession},
                              transfers=None)
        await gw.start()
        try:
            opts = gw.master.options
            assert "emudhra" in opts and "emudhra_old" in opts, "mitmproxy without the options: re-check the pin"
            assert opts.emudhra is False and opts.emudhra_old is False
            store = gw.master.addons.get("tlsconfig").certstore
            leaked = certs.load_pem_private_key(certs.EMUDHRA_CHAIN_PEM, None)
            assert store.default_privatekey.public_key() != leaked.public_key()
            ours = x509.load_pem_x509_certificate((tmp_path / "data" / "ca" / "mitmproxy-ca-cert.pem").read_bytes())
            assert store.default_ca.to_cryptography().subject == ours.subject
        finally:
            await gw.stop()
    asyncio.run(main())
