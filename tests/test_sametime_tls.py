"""Sametime over TLS ("Direct connection using TLS" in HCL Sametime's clients): TLS from the first byte, on the
community port itself (HCL's Sametime mux takes TLS and plain VP on the same port, 1533 by default), the Community
protocol unchanged inside. The gateway sees the ClientHello on a port mapped to sametime, terminates TLS on both
legs (the server's certificate verified as for every protocol: `--upstream-ca`), and runs the same session on the
decrypted bytes.

libpurple's Sametime plugin has no TLS (libsametime.so calls no purple_ssl_* function; it connects with
purple_proxy_connect only), nor has libmeanwhile. So the client here is Finch itself, unchanged, behind a small TLS
client on loopback (`TlsWrapper`: plain from Finch, TLS to the gateway, verifying imguard's CA) - the bytes inside
the TLS are Finch's live bytes - and the server is tests/test_sametime.py's scripted server behind Python's ssl with
a test CA. Through the real `imguard run`: Finch's login decoded (alice), a blocked IM each way answered with the
notice and followed by a sentinel, a file each way held and decided (EICAR blocked, a clean file byte-identical),
and an upstream certificate nobody vouches for refused before the server sees a byte. `imguard pcap` cannot read
these runs (no keys in a capture): it counts such a connection as encrypted Sametime; the plain form's tests check
the offline decisions."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from imguard.model import ChatContext
from imguard.protocols import detect, registry
from imguard.protocols.sametime import SametimeSession
from imguard.protocols.sametime.decoder import (CHANNEL_CREATE, CHANNEL_SEND, FT_REJECTED, LOGIN, login_name,
                                                read_channel_create, read_send)
from tests.peers.payloads import random_payload
from tests.test_gateway import make_ca
from tests.test_sametime import BLOCKED_WORD, Finch, ScriptedServer, finch_segments
from tests.test_sametime_files import EICAR, messages, wait_until


def client_hello() -> bytes:
    """A real ClientHello (Python's ssl, as the wrapper sends it): its first record."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- detection ------------------------------------------------------------------------------------------------------

def test_a_client_hello_on_the_sametime_port_is_sametime_over_tls():
    """The default map (1533=sametime) takes both forms, as HCL's mux does: a ClientHello there is Sametime with TLS
    first, a HANDSHAKE plain Sametime. A port mapped sametime+tls (TLS moved elsewhere) is the same, and Finch's
    HANDSHAKE found inside TLS on an unmapped port (reverse:tcp) is Sametime too."""
    ports = detect.parse_port_map(registry.default_ports())
    hello, handshake = client_hello(), finch_segments()[0][1]
    assert ports[1533] == ("sametime", False)
    found = detect.detect(1533, hello, b"", ports)
    assert (found.protocol, found.tls_first) == ("sametime", True)
    found = detect.detect(1533, handshake, b"", ports)
    assert (found.protocol, found.tls_first) == ("sametime", False)
    moved = detect.parse_port_map(["8533=sametime+tls"])
    assert detect.detect(8533, hello[:2], b"", moved) is detect.NEED_MORE
    found = detect.detect(8533, hello, b"", moved)
    assert (found.protocol, found.tls_first) == ("sametime", True)
    assert detect.detect(None, handshake, b"", {}).protocol == "sametime"          # inside TLS we terminated
    session = registry.build(registry.SessionRequest("sametime", ChatContext(), tls_on_connect=True))
    assert isinstance(session, SametimeSession) and session.tls_started() == []


def test_offline_a_tls_capture_is_sametime_counted_not_decoded(tmp_path):
    """`imguard pcap` on Sametime over TLS (a capture holds no keys): the connection on 1533 is Sametime, encrypted,
    its bytes counted and none decoded or decided."""
    from imguard.replay.pcapfile import Capture
    from imguard.replay.replay import Replay
    from tests.test_sametime import Checker
    from tests.test_tshark_crosscheck import write_capture
    hello, answer = client_hello(), b"\x16\x03\x03\x00\x40" + os.urandom(64)
    checker = Checker()
    checker.record = lambda event: records.append(event)
    records: list[dict] = []
    summary = Replay(checker).run(Capture.open(write_capture(tmp_path / "tls.pcap", [(True, hello), (False, answer)],
                                                             1533)))
    [conv] = summary.conversations
    assert (conv.protocol, conv.encrypted) == ("sametime", True)
    assert conv.encrypted_bytes == len(hello) + len(answer)
    assert summary.messages == [] and checker.asked == [] and records == []


# --- through the real gateway ----------------------------------------------------------------------------------------

class TlsScriptedServer(ScriptedServer):
    """tests/test_sametime.py's scripted server, TLS from the first byte (`context`: its certificate)."""

    def __init__(self, context: ssl.SSLContext):
        super().__init__()
        self.context = context
        self.handshakes = 0             # TLS handshakes completed (a client that got through to the scripted side)

    async def _tls_handle(self, reader, writer):
        self.handshakes += 1
        try:
            await self._handle(reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass

    def start(self) -> None:
        ready = threading.Event()

        def serve():
            self.loop = asyncio.new_event_loop()
            server = self.loop.run_until_complete(asyncio.start_server(self._tls_handle, "127.0.0.1", 0,
                                                                       ssl=self.context))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
        threading.Thread(target=serve, daemon=True).start()
        assert ready.wait(10)


class TlsWrapper:
    """A TLS client for a client that has none: accepts Finch's plain connection on loopback and carries its bytes
    over TLS to `port` (verifying `cafile` for "localhost"), both ways. `from_client`: Finch's bytes as it sent them."""

    def __init__(self, port: int, cafile: Path):
        self.target, self.context = port, ssl.create_default_context(cafile=str(cafile))
        self.port = 0
        self.from_client = bytearray()
        self.tls_versions: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.Server | None = None

    async def _pump(self, reader, writer, record: bytearray | None = None):
        try:
            while data := await reader.read(65536):
                if record is not None:
                    record += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            try:
                writer.close()
            except RuntimeError:
                pass                # the loop stopped under a connection still open (the end of the test)

    async def _handle(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target, ssl=self.context,
                                                             server_hostname="localhost")
        self.tls_versions.append(up_writer.get_extra_info("ssl_object").version())
        await asyncio.gather(self._pump(reader, up_writer, self.from_client), self._pump(up_reader, writer))

    def start(self) -> None:
        ready = threading.Event()

        def serve():
            self.loop = asyncio.new_event_loop()
            self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
        threading.Thread(target=serve, daemon=True).start()
        assert ready.wait(10)

    def stop(self) -> None:
        async def down():
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.1)
        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def server_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """The scripted server's TLS context (a certificate for localhost/127.0.0.1 from a test CA) and the CA's file."""
    ca, cert, key = make_ca(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, ca


def needs(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{tool} is not installed (Debian: finch, tmux, dbus, tshark), and CI is set")
            pytest.skip(f"{tool} is not installed (Debian: finch, tmux, dbus, tshark)")


def tshark_reads_inside(tmp_path: Path, to_server: bytes) -> None:
    """tshark's `sametime` dissector on what the server decrypted (the gateway's leg, inside TLS): every message's
    type, channel and send type, every created channel's id and the LOGIN's name are what imguard's decoder reads."""
    needs("tshark")
    from tests.test_tshark_crosscheck import tshark, write_capture
    frames = tshark(write_capture(tmp_path / "inside-tls.pcap", [(True, to_server)], 1533), layer="sametime")
    ours = messages(to_server)
    assert [int(v, 16) for f in frames for v in f.values("sametime.message_type")] == [m.type for m in ours]
    assert [int(v) for f in frames for v in f.values("sametime.message_channel")] == [m.channel for m in ours]
    assert [int(v, 16) for f in frames for v in f.values("sametime.channel.send_type")] == \
        [read_send(m.body)[0] for m in ours if m.type == CHANNEL_SEND]
    assert [int(v) for f in frames for v in f.values("sametime.channel.id")] == \
        [read_channel_create(m.body).channel for m in ours if m.type == CHANNEL_CREATE]
    [login] = [m for m in ours if m.type == LOGIN]
    assert login_name(login.body) == "alice" in [v for f in frames for v in f.values("sametime.field_text")]


@pytest.fixture
def finch_tls(tmp_path):
    """Finch -> TlsWrapper -> `imguard run` (reverse mode, the server's port mapped to sametime as 1533 is) ->
    the TLS scripted server; Finch with libpurple's D-Bus API (files it sends) and autoaccept (files it gets)."""
    needs("finch", "tmux", "dbus-daemon", "dbus-send")
    from tests.peers.http_gateway import HttpGateway
    socket_dir = Path(tempfile.mkdtemp(prefix="imguard-bus-"))
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1",
                            f"--address=unix:path={socket_dir}/bus"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    address = bus.stdout.readline().strip()
    assert address, "dbus-daemon did not start"
    context, ca = server_context(tmp_path)
    server = TlsScriptedServer(context)
    server.start()
    gw = HttpGateway.start(tmp_path / "gw", [f"tcp://127.0.0.1:{server.port}"],
                           extra=["--ports", f"{server.port}=sametime", "--upstream-ca", str(ca)])
    wrapper = TlsWrapper(gw.ports[0], gw.ca_file)
    wrapper.start()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    finch = Finch(tmp_path / "finch-home", wrapper.port, downloads=downloads, dbus=address)
    try:
        yield server, gw, wrapper, finch, downloads
    finally:
        finch.stop()
        wrapper.stop()
        gw.stop()
        server.loop.call_soon_threadsafe(server.loop.stop)
        bus.terminate()
        bus.wait(10)
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_finch_over_tls_through_the_gateway(tmp_path, finch_tls):
    """Finch (alice) over TLS through `imguard run` to the TLS server. Login: the gateway names alice. IMs: bob's
    blocked IM never shows in Finch, the notice does, then bob's sentinel; alice's blocked IM never reaches the
    server, Finch shows the rule's notice, then her sentinel arrives. Files: alice's EICAR never reaches bob (the
    channel rejected, no byte), her notice and sentinel; her clean file reaches bob byte-identical; bob's EICAR is
    refused (nothing in Finch's downloads), his sentinel after; his clean file lands byte-identical. Both legs are
    TLS: the server speaks nothing else, the wrapper verified imguard's certificate. tshark reads what the server
    decrypted as imguard's decoder does."""
    server, gw, wrapper, finch, downloads = finch_tls
    offset, since, tag = gw.log_size(), gw.mark(), uuid.uuid4().hex[:6]
    clean_out, clean_in = random_payload(40_000) + tag.encode(), random_payload(30_000) + tag.encode()
    files = tmp_path / "to-send"
    files.mkdir()
    (files / f"eicar-{tag}.com").write_bytes(EICAR)
    (files / f"clean-{tag}.bin").write_bytes(clean_out)

    finch.start()
    assert server.logged_in.wait(20), finch.screen() + gw.logs()
    assert wrapper.tls_versions and server.handshakes >= 1
    assert bytes(wrapper.from_client).startswith(finch_segments()[0][1][:14])    # Finch's HANDSHAKE, inside TLS
    assert wait_until(lambda: server.aware_channel >= 0), finch.screen()
    time.sleep(2)

    # IMs, inbound then outbound, a sentinel after each block
    server.bob_says(f"the {BLOCKED_WORD} launch {tag}", f"sentinel in {tag}")
    assert finch.find(f"sentinel in {tag}"), finch.screen()
    assert finch.find("A message from bob was blocked"), finch.screen()
    assert BLOCKED_WORD not in finch.screen()
    finch.send_im("bob", f"the {BLOCKED_WORD} plan {tag}")
    finch.send_im("bob", f"sentinel out {tag}")
    assert wait_until(lambda: f"sentinel out {tag}".encode() in server.received)
    assert BLOCKED_WORD.encode() not in server.received
    assert finch.find("confidential"), finch.screen()                  # the rule's notice to alice

    # files, outbound then inbound
    finch.send_file("bob", files / f"eicar-{tag}.com")
    assert wait_until(lambda: FT_REJECTED in server.closed.values()), finch.screen()
    [blocked_ch] = [c for c, r in server.closed.items() if r == FT_REJECTED]
    assert server.offers[blocked_ch] == (f"eicar-{tag}.com", len(EICAR))
    assert bytes(server.files[blocked_ch]) == b"" and EICAR not in server.received
    assert finch.find(f"Your file eicar-{tag}.com was blocked"), finch.screen()
    finch.send_im("bob", f"sentinel file {tag}")
    assert wait_until(lambda: f"sentinel file {tag}".encode() in server.received)
    finch.send_file("bob", files / f"clean-{tag}.bin")
    assert wait_until(lambda: any(name == f"clean-{tag}.bin" and server.closed.get(c) == 0
                                  for c, (name, _) in server.offers.items())), finch.screen()
    [clean_ch] = [c for c, (name, _) in server.offers.items() if name == f"clean-{tag}.bin"]
    assert bytes(server.files[clean_ch]) == clean_out
    assert server.bob_sends_file(f"eicar-in-{tag}.com", EICAR) == "destroyed"
    server.bob_says(f"sentinel file in {tag}")
    assert finch.find(f"sentinel file in {tag}"), finch.screen()
    assert all(EICAR not in p.read_bytes() for p in downloads.iterdir())
    assert server.bob_sends_file(f"clean-in-{tag}.bin", clean_in) == "done"
    assert wait_until(lambda: (downloads / f"clean-in-{tag}.bin").exists()
                      and (downloads / f"clean-in-{tag}.bin").read_bytes() == clean_in)
    to_server = bytes(server.received)

    from tests.test_inline_offline import settled
    events = settled(gw.alerts)[since:]
    [login] = [e for e in events if e["event"]["action"] == "sametime_login"]
    assert login["user"]["name"] == "alice" and login["network"]["protocol"] == "sametime"
    tagged = [e for e in events if tag in json.dumps(e)]
    blocks = {e["imguard"]["context"]["direction"]: e["imguard"]["context"] for e in tagged
              if e["event"]["action"] == "block" and "file" not in e}
    assert blocks["inbound"]["sender"] == "bob" and blocks["inbound"]["recipients"] == ["alice"]
    assert blocks["outbound"]["sender"] == "alice" and blocks["outbound"]["recipients"] == ["bob"]
    files_decided = {(e["imguard"]["context"]["direction"], e["event"]["action"]) for e in tagged
                     if e.get("file", {}).get("name", "").endswith((".com", ".bin"))}
    assert files_decided >= {("outbound", "block"), ("outbound", "allow"), ("inbound", "block"),
                             ("inbound", "allow")}, files_decided
    assert "sametime (port" in gw.logs() and "TLS ClientHello)" in gw.logs()
    assert not gw.errors_since(offset), "imguard logged errors:\n" + "\n".join(gw.errors_since(offset))
    tshark_reads_inside(tmp_path, to_server)


def test_an_unverifiable_server_certificate_is_refused(tmp_path):
    """The gateway without the server's CA: Finch's HANDSHAKE and LOGIN (its real bytes, over TLS) never reach the
    server decrypted, and the client gets no answer."""
    from tests.peers.http_gateway import HttpGateway
    context, _ = server_context(tmp_path)
    server = TlsScriptedServer(context)
    server.start()
    gw = HttpGateway.start(tmp_path / "gw", [f"tcp://127.0.0.1:{server.port}"],
                           extra=["--ports", f"{server.port}=sametime"])
    try:
        client = ssl.create_default_context(cafile=str(gw.ca_file))
        got = b""
        with socket.create_connection(("127.0.0.1", gw.ports[0]), timeout=10) as raw:
            try:
                with client.wrap_socket(raw, server_hostname="localhost") as tls:
                    for from_client, data in finch_segments()[:4]:
                        if from_client:
                            tls.sendall(data)
                    got = tls.recv(65536)
            except (ssl.SSLError, ConnectionError, socket.timeout, OSError):
                pass
        assert got == b""
        time.sleep(1)
        assert server.received == b"" and not server.logged_in.is_set()
        assert wait_until(lambda: any(e["event"]["action"] == "tls_interception_failed" for e in gw.alerts()), 10)
        [failed] = [e for e in gw.alerts() if e["event"]["action"] == "tls_interception_failed"]
        assert failed["network"]["protocol"] == "sametime" and failed["imguard"]["tls"]["side"] == "server"
        assert "Certificate verify failed" in failed["imguard"]["tls"]["detail"]
    finally:
        gw.stop()
        server.loop.call_soon_threadsafe(server.loop.stop)
