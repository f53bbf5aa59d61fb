"""A peer's close crosses the gateway as the peer made it, in both directions, for every protocol the session
layer carries (imguard/gateway/layer.py, SessionLayer._pass_close_on):

- a FIN (close, or shutdown(SHUT_WR)) reaches the other peer at once as a FIN, and only as a half-close: the
  other direction keeps flowing until that peer closes too;
- a reset (SO_LINGER 0) reaches the other peer as a reset.

Each protocol with scripted peers on real sockets, each direction, FIN and reset; then with real peers, as a
user sees it: a client behind `imguard run` (a plain socket, and WeeChat) is told at once when ngIRCd goes away
(before, it stayed "connected" and WeeChat never reconnected), and ngIRCd sees a client behind the gateway
leave (its QUIT reaches another user, an independent witness). Side connections carrying a held file (DCC,
SOCKS5 bytestream, MSNFTP, OFT, MSRP) close by the tracker's rule (imguard/files/tracker.py), tested with them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest

from imguard.gateway.master import Gateway, default_factories
from imguard.gateway.settings import GatewaySettings
from imguard.protocols.base import Send, StreamSession
from tests.peers.folders import kept_if_failed
from tests.test_gateway import StubPipeline, free_port

LEGACY = Path(__file__).parent / "data" / "legacy"
PROMPT = 2.0            # "at once": a close must be seen within this many seconds
TIMEOUT = 10.0


def transcript(name: str) -> tuple[list[bytes], list[bytes]]:
    """(client segments, server segments) of a stored legacy transcript."""
    segments = json.loads((LEGACY / name).read_text())["segments"]
    return ([t.encode("latin-1") for side, t in segments if side == "c"],
            [t.encode("latin-1") for side, t in segments if side == "s"])


def _units() -> dict[str, tuple[bytes, bytes, bytes]]:
    """protocol -> (server's opening, a client unit, a server unit): real openings from the stored transcripts
    where there are, so each session takes them as its protocol and forwards them."""
    msn_c, msn_s = transcript("msnms_sb2.json")
    oscar_c, oscar_s = transcript("oscar_login.json")
    ymsg_c, ymsg_s = transcript("ymsg_session.json")
    sip_request = (b"OPTIONS sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-1\r\n"
                   b"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: close-test\r\n"
                   b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    sip_response = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-1\r\n"
                    b"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>;tag=2\r\n"
                    b"Call-ID: close-test\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    xmpp_client = (b"<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' "
                   b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
    xmpp_server = (b"<?xml version='1.0'?><stream:stream from='example.com' id='s1' xmlns='jabber:client' "
                   b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
    return {
        "irc": (b"", b"PING :close-test\r\n", b":srv PONG srv :close-test\r\n"),
        "xmpp": (b"", xmpp_client, xmpp_server),
        "msnp": (b"", msn_c[0], msn_s[0]),
        "oscar": (oscar_s[0], oscar_c[0], b"*\x05\x00\x02\x00\x00"),      # the server's FLAP hello first
        "ymsg": (b"", ymsg_c[0], ymsg_s[0]),
        "sip": (b"", sip_request, sip_response),
    }


UNITS = _units()


# --- scripted peers on real sockets -----------------------------------------------------------------------------

def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), as a crashed peer or a firewall does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = PROMPT) -> tuple[bytes, str]:
    """What the peer sent before it closed, and how it closed: "fin" or "reset" ("open" if neither came within
    `timeout` seconds)."""
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
            if not chunk:
                return got, "fin"
            got += chunk
    except ConnectionResetError:
        return got, "reset"
    except asyncio.TimeoutError:
        return got, "open"


async def read_exactly(reader: asyncio.StreamReader, data: bytes) -> bytes:
    return await asyncio.wait_for(reader.readexactly(len(data)), TIMEOUT)


class Server:
    """One scripted server: accepts one connection, hands its streams to the test."""

    def __init__(self):
        self.accepted: asyncio.Queue = asyncio.Queue()

    async def start(self) -> int:
        async def handle(reader, writer):
            await self.accepted.put((reader, writer))
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def connection(self):
        return await asyncio.wait_for(self.accepted.get(), TIMEOUT)

    def close(self) -> None:
        self.server.close()


async def socks5_open(port: int, dst_port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await read_exactly(reader, b"..") == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + dst_port.to_bytes(2, "big"))
    assert (await read_exactly(reader, b"." * 10))[:2] == b"\x05\x00"
    return reader, writer


async def connect_open(port: int, dst_port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT 127.0.0.1:{dst_port} HTTP/1.1\r\nHost: 127.0.0.1:{dst_port}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def carried(tmp_path: Path, protocol: str, route: str, scenario):
    """A gateway carrying `protocol` (its real session, by the port map) between a test client and a scripted
    server, the opening exchanged both ways; then `scenario(client, server, units)` runs."""
    opening, unit_c, unit_s = UNITS[protocol]
    server = Server()
    port = await server.start()
    listen = free_port()
    mode = {"reverse": f"reverse:tcp://127.0.0.1:{port}@127.0.0.1:{listen}", "socks5": f"socks5@127.0.0.1:{listen}",
            "connect": f"regular@127.0.0.1:{listen}"}[route]
    pipeline = StubPipeline()
    settings = GatewaySettings(mode=[mode], ports=[f"{port}={protocol}"])
    gw = Gateway(settings, pipeline, data_dir=tmp_path / "data", transfers=None,
                 factories=default_factories(pipeline, None))
    await gw.start()
    try:
        if route == "reverse":
            client = await asyncio.open_connection("127.0.0.1", listen)
        elif route == "socks5":
            client = await socks5_open(listen, port)
        else:
            client = await connect_open(listen, port)
        upstream = await server.connection()
        if opening:
            upstream[1].write(opening)
            assert await read_exactly(client[0], opening) == opening
        client[1].write(unit_c)
        assert await read_exactly(upstream[0], unit_c) == unit_c, f"{protocol}: the client's unit did not cross"
        upstream[1].write(unit_s)
        assert await read_exactly(client[0], unit_s) == unit_s, f"{protocol}: the server's unit did not cross"
        await scenario(client, upstream, (unit_c, unit_s))
        assert not [r for r in pipeline.records if r.get("imguard", {}).get("anomaly", {}).get("kind")
                    == "session_error"], pipeline.records
    finally:
        await gw.stop()
        server.close()


async def half_close_by(closer, other, closer_unit: bytes, other_unit: bytes) -> None:
    """`closer` shuts its sending side: `other` reads EOF at once; `other` can still send to `closer`, then
    closes, and `closer` reads that and EOF."""
    closer[1].write_eof()
    got, how = await read_until_closed(other[0])
    assert (got, how) == (b"", "fin"), f"the half-close did not arrive as a FIN within {PROMPT} s: {how}"
    other[1].write(other_unit)
    await other[1].drain()
    assert await read_exactly(closer[0], other_unit) == other_unit, "the other direction stopped at the half-close"
    other[1].close()
    got, how = await read_until_closed(closer[0])
    assert (got, how) == (b"", "fin")


async def reset_by(resetter, other) -> None:
    reset(resetter[1])
    got, how = await read_until_closed(other[0])
    assert how == "reset", f"the reset arrived as {how!r}"


PROTOCOLS = sorted(UNITS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_half_close_reaches_the_server_and_the_server_still_talks(tmp_path, protocol):
    """The client shuts down its sending side: the server reads EOF at once, and what the server sends after it
    still reaches the client (a half-close, not a close)."""
    async def scenario(client, server, units):
        await half_close_by(client, server, units[0], units[1])
    asyncio.run(carried(tmp_path, protocol, "reverse", scenario))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_half_close_reaches_the_client_and_the_client_still_talks(tmp_path, protocol):
    """The server shuts down its sending side (a server going away sends its FIN): the client reads EOF at once,
    and the client's later data still reaches the server."""
    async def scenario(client, server, units):
        await half_close_by(server, client, units[1], units[0])
    asyncio.run(carried(tmp_path, protocol, "reverse", scenario))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_reset_reaches_the_server_as_a_reset(tmp_path, protocol):
    """A client that resets its connection: the server's read fails with ECONNRESET."""
    async def scenario(client, server, units):
        await reset_by(client, server)
    asyncio.run(carried(tmp_path, protocol, "reverse", scenario))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_reset_reaches_the_client_as_a_reset(tmp_path, protocol):
    """A server that resets the connection: the client's read fails with ECONNRESET."""
    async def scenario(client, server, units):
        await reset_by(server, client)
    asyncio.run(carried(tmp_path, protocol, "reverse", scenario))


@pytest.mark.parametrize("direction", ["client", "server"])
def test_half_close_through_the_socks5_listener(tmp_path, direction):
    """Through the explicit socks5@ listener the half-close is passed on as one too, either way."""
    async def scenario(client, server, units):
        if direction == "client":
            await half_close_by(client, server, units[0], units[1])
        else:
            await half_close_by(server, client, units[1], units[0])
    asyncio.run(carried(tmp_path, "irc", "socks5", scenario))


@pytest.mark.parametrize("direction", ["client", "server"])
def test_close_through_an_http_connect_tunnel_arrives_at_once(tmp_path, direction):
    """Through the regular@ listener (HTTP CONNECT) mitmproxy closes a tunnel whole when one side closes (it
    has no half-close there): the other peer still reads EOF at once, never a connection left hanging."""
    async def scenario(client, server, units):
        closer, other = (client, server) if direction == "client" else (server, client)
        closer[1].write_eof()
        got, how = await read_until_closed(other[0])
        assert (got, how) == (b"", "fin")
    asyncio.run(carried(tmp_path, "irc", "connect", scenario))


def test_raw_relay_after_a_session_failure_passes_the_half_close_on(tmp_path):
    """Fail mode parse=open: once a session failed, the rest is relayed as bytes, and closes still cross as the
    peer made them."""
    async def main():
        server = Server()
        port = await server.start()
        listen = free_port()
        pipeline = StubPipeline()

        class Failing:
            def data_received(self, from_client, data):
                raise RuntimeError("decoder bug")

            def data_received_steps(self, from_client, data):
                yield self.data_received(from_client, data)

            def start(self):
                return []

            def connection_closed(self, from_client):
                raise AssertionError("a raw relay has no session to tell")
        settings = GatewaySettings(mode=[f"reverse:tcp://127.0.0.1:{port}@127.0.0.1:{listen}"],
                                   ports=[f"{port}=irc"], fail_mode=["irc:parse=open"])
        gw = Gateway(settings, pipeline, data_dir=tmp_path / "data", transfers=None,
                     factories={"irc": lambda info: Failing()})
        await gw.start()
        try:
            client = await asyncio.open_connection("127.0.0.1", listen)
            upstream = await server.connection()
            client[1].write(b"hello\r\n")
            assert await read_exactly(upstream[0], b"hello\r\n") == b"hello\r\n"
            await half_close_by(client, upstream, b"", b"still here\r\n")
        finally:
            await gw.stop()
            server.close()
    asyncio.run(main())


class AnsweringSession(StreamSession):
    """Forwards every read, and answers each server read itself with b"ack\n" (as an XMPP session bounces an
    error to a sender on the server's side): a write of the session's own towards a leg that may be
    half-closed."""

    def data_received(self, from_client, data):
        return [Send(not from_client, data)] + ([] if from_client else [Send(False, b"ack\n")])

    def data_received_steps(self, from_client, data):
        yield self.data_received(from_client, data)

    def start(self):
        return []

    def connection_closed(self, from_client):
        return []


def test_session_writes_towards_a_half_closed_leg_are_dropped_not_a_crash(tmp_path):
    """After the client's FIN the gateway has half-closed the server leg: what the session still sends that way
    is dropped (nothing can follow a FIN), the server's data still reaches the client, and mitmproxy's command
    loop does not fail (it would on a write after write_eof)."""
    async def main():
        server = Server()
        port = await server.start()
        listen = free_port()
        settings = GatewaySettings(mode=[f"reverse:tcp://127.0.0.1:{port}@127.0.0.1:{listen}"], ports=[f"{port}=irc"])
        gw = Gateway(settings, StubPipeline(), data_dir=tmp_path / "data", transfers=None,
                     factories={"irc": lambda info: AnsweringSession()})
        await gw.start()
        try:
            client = await asyncio.open_connection("127.0.0.1", listen)
            upstream = await server.connection()
            upstream[1].write(b"hello\n")
            assert await read_exactly(client[0], b"hello\n") == b"hello\n"
            assert await read_exactly(upstream[0], b"ack\n") == b"ack\n"
            client[1].write_eof()
            assert await read_until_closed(upstream[0]) == (b"", "fin")
            upstream[1].write(b"after\n")
            assert await read_exactly(client[0], b"after\n") == b"after\n"
            upstream[1].write(b"again\n")
            assert await read_exactly(client[0], b"again\n") == b"again\n"
            upstream[1].close()
            assert await read_until_closed(client[0]) == (b"", "fin")
        finally:
            await gw.stop()
            server.close()
    with LogRecords() as records:
        asyncio.run(main())
    assert not [r for r in records if "crashed" in r.getMessage()], [r.getMessage() for r in records]


class LogRecords(logging.Handler):
    """The log records emitted while it is installed (mitmproxy logs "mitmproxy has crashed!" on a failed
    command)."""

    def __enter__(self) -> list:
        self.records: list = []
        logging.getLogger().addHandler(self)
        return self.records

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)

    def emit(self, record) -> None:
        self.records.append(record)


# --- real peers: ngIRCd and WeeChat ---------------------------------------------------------------------------

@pytest.fixture
def peer_dir(request):
    with kept_if_failed(request, "imguard-close-") as directory:
        yield directory


@pytest.fixture
def irc_pair(peer_dir):
    """A real ngIRCd and the real `imguard run` in front of it, both this test's own (the test stops ngIRCd)."""
    from tests.peers.ngircd import IrcGateway, NgIrcd
    ircd = NgIrcd.start(peer_dir / "ngircd")
    gw = None
    try:
        gw = IrcGateway.start(peer_dir / "imguard", ircd)
        yield ircd, gw
    finally:
        if gw is not None:
            gw.stop()
        ircd.stop()


def irc_register(port: int, nick: str, tls_ca: Path | None = None) -> socket.socket:
    """A registered IRC client on a plain socket (TLS verified against `tls_ca` when given), joined to #imguard."""
    import ssl
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if tls_ca is not None:
        ctx = ssl.create_default_context(cafile=str(tls_ca))
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
    sock.sendall(f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n".encode())
    irc_wait(sock, b" 001 ")
    sock.sendall(b"JOIN #imguard\r\n")
    irc_wait(sock, b" 366 ")
    return sock


def irc_wait(sock: socket.socket, text: bytes, timeout: float = TIMEOUT) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while text not in got:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before {text!r}: {got!r}")
        for line in chunk.split(b"\r\n"):
            if line.startswith(b"PING "):
                sock.sendall(b"PONG " + line[5:] + b"\r\n")
        got += chunk
    return got


def sock_closed(sock: socket.socket, timeout: float = PROMPT) -> str:
    """How `sock`'s peer closed within `timeout` seconds: "fin", "reset" or "open"."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return "fin"
    except ConnectionResetError:
        return "reset"
    except (socket.timeout, TimeoutError):
        return "open"
    except OSError as e:                # an SSL socket reports the peer's FIN without close_notify as an error
        return "fin" if "EOF" in str(e) else f"error {e}"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_ngircd_stopping_is_seen_at_once_by_a_client_behind_imguard(irc_pair, tls):
    """The chat server goes away: a client behind imguard reads EOF at once, as a client straight to ngIRCd does
    (the control), so it can reconnect (irssi and WeeChat stayed "connected" before)."""
    ircd, gw = irc_pair
    inside = irc_register(gw.tls_port if tls else gw.port, "inside", gw.ca_file if tls else None)
    control = irc_register(ircd.tls_port if tls else ircd.port, "control", ircd.ca_file if tls else None)
    ircd.stop()
    assert sock_closed(control) == "fin"
    assert sock_closed(inside) == "fin", f"the client behind imguard was not told within {PROMPT} s"
    gw.check_alive()


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_client_behind_imguard_leaving_is_seen_by_ngircd(irc_pair, how):
    """A client behind imguard drops its connection without QUIT (closed, or reset): ngIRCd notices at once, and
    a witness in the channel (straight to ngIRCd) sees its QUIT. (ngIRCd gives one reason, "Client closed
    connection", for both: that the reset stays a reset is checked with the scripted peers above.)"""
    ircd, gw = irc_pair
    witness = irc_register(ircd.port, "witness")
    leaver = irc_register(gw.port, "leaver")
    irc_wait(witness, b":leaver!")                  # its JOIN
    if how == "reset":
        leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    leaver.close()
    started = time.monotonic()
    seen = irc_wait(witness, b" QUIT ")
    assert time.monotonic() - started < PROMPT
    quit_line = next(line for line in seen.split(b"\r\n") if b" QUIT " in line)
    assert quit_line.startswith(b":leaver!") and b"Client closed connection" in quit_line, quit_line
    gw.check_alive()


def weechat_connects(log: Path) -> int:
    """How many times WeeChat has started connecting to a server (its core log says so each time)."""
    return log.read_text(errors="replace").count("irc: connecting to server") if log.exists() else 0


def test_weechat_behind_imguard_reconnects_when_ngircd_goes_away(irc_pair, peer_dir):
    """The user's view: WeeChat (headless) connected through imguard. When ngIRCd stops, WeeChat learns it at once
    and starts reconnecting (autoreconnect_delay 1 s), as it does straight to a server; before the fix it stayed
    "connected" and never reconnected."""
    binary = shutil.which("weechat-headless")
    if binary is None:
        message = "weechat-headless is not installed: run `tools/setup.sh test`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import signal
    import subprocess
    ircd, gw = irc_pair
    home = peer_dir / "weechat"
    home.mkdir()
    commands = ";".join([
        "/set irc.server_default.autoreconnect_delay 1", f"/server add gw 127.0.0.1/{gw.port} -notls",
        "/set irc.server.gw.nicks wuser", "/set irc.server.gw.autojoin #imguard", "/connect gw"])
    witness = irc_register(ircd.port, "witness")
    process = subprocess.Popen([binary, "-d", str(home), "-r", commands], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        irc_wait(witness, b":wuser!")                   # WeeChat is registered and in the channel, through imguard
        log = home / "weechat.log"
        assert weechat_connects(log) == 1
        ircd.stop()
        deadline = time.monotonic() + PROMPT + 1.0      # told at once, then the 1 s reconnect delay
        while weechat_connects(log) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert weechat_connects(log) >= 2, "WeeChat behind imguard did not notice that ngIRCd went away"
        gw.check_alive()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
