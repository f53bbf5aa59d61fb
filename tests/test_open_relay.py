"""No open relay (imguard/gateway/proxy_access.py): the explicit proxy listeners (regular@ = HTTP CONNECT and proxy
requests, socks5@) reach chat destinations only by default, and ask for credentials when --proxy-auth is set.

Each refusal is checked from both sides: what the client is answered (403, 407, a SOCKS5 failure) and that the
destination never saw a connection (its own accept count), plus the anomaly in the alert log. Each allowed case
carries real bytes to a real server through a real embedded gateway. The bytestream relay, a socks5 listener
too, accepts only announced stream hashes, with or without --proxy-auth.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

from imguard.files.expected import ExpectedBytestream, ExpectedTransfers, ExpectedUpload, StreamHost
from imguard.gateway.master import Gateway, GatewayError, default_factories
from imguard.gateway.proxy_access import reachable_from_outside
from imguard.gateway.settings import GatewaySettings
from imguard.model import ChatContext
from imguard.protocols.irc.dcc import remember_offer
from imguard.protocols.xmpp import socks5_hash

from test_gateway import TIMEOUT, LineSession, StubPipeline, free_port, readline, run, start_http_server
from test_gateway_dcc import ChatPipeline, offer_for, start_sender
from test_gateway_relay import start_streamhost

USER, PASSWORD = "alice", "s3cret:with:colons"


class CountingServer:
    """A line server ("echo:" + line) that counts the connections it accepted: the independent witness that a
    refused destination was never reached."""

    def __init__(self):
        self.accepted = 0

    async def start(self) -> int:
        async def handle(reader, writer):
            self.accepted += 1
            try:
                while line := await reader.readline():
                    writer.write(b"echo:" + line)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        self.server.close()


async def gateway(tmp_path, chat_port: int, modes: list[str], pipeline=None, transfers=None, factories=None,
                  **settings) -> Gateway:
    """An embedded gateway whose port map names `chat_port` (a LineSession there)."""
    s = GatewaySettings(mode=modes, ports=[f"{chat_port}=line"], **settings)
    gw = Gateway(s, pipeline or StubPipeline(), data_dir=tmp_path / "data", transfers=transfers,
                 factories=factories or {"line": LineSession})
    await gw.start()
    return gw


def anomalies(pipeline: StubPipeline, kind: str) -> list[dict]:
    return [r for r in pipeline.records if r.get("imguard", {}).get("anomaly", {}).get("kind") == kind]


def basic(user: str, password: str) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() + "\r\n"


async def connect(port: int, target: str, headers: str = ""):
    """An HTTP CONNECT through the regular@ listener: (status, reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status = int(head.split(b" ", 2)[1])
    if status != 200:           # a refusal has a body: read it, so the next request is not confused by it
        length = int(dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
                     .get(b"content-length", b"0"))
        await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return status, head, reader, writer


async def socks5(port: int, dst_port: int, auth: tuple[str, str] | None = None, offer_no_auth: bool = True):
    """A SOCKS5 connect to 127.0.0.1:dst_port: (outcome, reader, writer), outcome one of "connected",
    "refused" (a failure reply), "auth failed", "no acceptable method"."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    methods = (b"\x00" if offer_no_auth else b"") + (b"\x02" if auth else b"")
    writer.write(b"\x05" + bytes([len(methods)]) + methods)
    chosen = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    if chosen[1] == 0xFF:
        return "no acceptable method", reader, writer
    if chosen[1] == 0x02:
        user, password = auth
        writer.write(b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
        if (await asyncio.wait_for(reader.readexactly(2), TIMEOUT)) != b"\x01\x00":
            return "auth failed", reader, writer
    writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + dst_port.to_bytes(2, "big"))
    reply = await asyncio.wait_for(reader.readexactly(10), TIMEOUT)
    return ("connected" if reply[1] == 0 else "refused"), reader, writer


async def say(reader, writer, line: bytes) -> bytes:
    writer.write(line)
    return await readline(reader)


# --- destinations ----------------------------------------------------------------------------------------------

def test_connect_to_a_non_chat_port_is_refused_by_default(tmp_path):
    """CONNECT to a port that is neither in the port map nor an HTTP port: 403 naming the reason, an anomaly, and
    the destination never sees a connection. The same client's CONNECT to the chat port works."""
    async def main():
        chat, other = CountingServer(), CountingServer()
        chat_port, other_port = await chat.start(), await other.start()
        pipeline = StubPipeline()
        gw = await gateway(tmp_path, chat_port, ["regular@127.0.0.1:0"], pipeline)
        try:
            status, head, _, w = await connect(gw.port_of("regular"), f"127.0.0.1:{other_port}")
            w.close()
            assert status == 403
            [anomaly] = anomalies(pipeline, "proxy_destination_refused")
            assert f"127.0.0.1:{other_port}" in anomaly["imguard"]["anomaly"]["detail"]
            status, _, r, w = await connect(gw.port_of("regular"), f"127.0.0.1:{chat_port}")
            assert status == 200 and await say(r, w, b"hi\n") == b"echo:hi\n"
            w.write(b"FILE x.exe EVIL\n")
            assert await readline(r) == b"BLOCKED x.exe\n"          # a session carries it: inspected
            w.close()
            # the chat connection's round trips, made after the refusal, are the sentinel: no fixed wait
            assert other.accepted == 0 and chat.accepted == 1
        finally:
            await gw.stop()
            chat.close()
            other.close()
    run(main())


def test_socks5_to_a_non_chat_port_is_refused_by_default(tmp_path):
    """SOCKS5 connect to a non-chat port: a failure reply, an anomaly, no connection at the destination; to the
    chat port: connected, and the session inspects."""
    async def main():
        chat, other = CountingServer(), CountingServer()
        chat_port, other_port = await chat.start(), await other.start()
        pipeline = StubPipeline()
        gw = await gateway(tmp_path, chat_port, ["socks5@127.0.0.1:0"], pipeline)
        try:
            outcome, _, w = await socks5(gw.port_of("socks5"), other_port)
            w.close()
            assert outcome == "refused"
            assert len(anomalies(pipeline, "proxy_destination_refused")) == 1
            outcome, r, w = await socks5(gw.port_of("socks5"), chat_port)
            assert outcome == "connected"
            w.write(b"FILE a.exe EVIL\n")
            assert await readline(r) == b"BLOCKED a.exe\n"
            w.close()
            # the chat connection's round trip, made after the refusal, is the sentinel: no fixed wait
            assert other.accepted == 0 and chat.accepted == 1
        finally:
            await gw.stop()
            chat.close()
            other.close()
    run(main())


@pytest.mark.parametrize("via", ["connect", "socks5"])
def test_any_lifts_the_restriction(tmp_path, via):
    """--proxy-destinations any: the old behaviour, an unmapped port is relayed (untouched)."""
    async def main():
        chat, other = CountingServer(), CountingServer()
        chat_port, other_port = await chat.start(), await other.start()
        pipeline = StubPipeline()
        modes = [f"regular@127.0.0.1:{free_port()}", f"socks5@127.0.0.1:{free_port()}"]
        gw = await gateway(tmp_path, chat_port, modes, pipeline, proxy_destinations="any")
        try:
            if via == "connect":
                status, _, r, w = await connect(gw.port_of("regular"), f"127.0.0.1:{other_port}")
                assert status == 200
            else:
                outcome, r, w = await socks5(gw.port_of("socks5"), other_port)
                assert outcome == "connected"
            assert await say(r, w, b"SSH-2.0-x\n") == b"echo:SSH-2.0-x\n"
            w.close()
            assert other.accepted == 1 and not anomalies(pipeline, "proxy_destination_refused")
        finally:
            await gw.stop()
            chat.close()
            other.close()
    run(main())


def test_http_ports_are_chat_destinations(tmp_path):
    """An HTTP port (--http-ports: chat APIs and uploads live there) is a chat destination: CONNECT works."""
    async def main():
        chat, web = CountingServer(), CountingServer()
        chat_port, web_port = await chat.start(), await web.start()
        gw = await gateway(tmp_path, chat_port, ["regular@127.0.0.1:0"], http_ports=[web_port])
        try:
            status, _, r, w = await connect(gw.port_of("regular"), f"127.0.0.1:{web_port}")
            assert status == 200 and await say(r, w, b"ping\n") == b"echo:ping\n"
            w.close()
        finally:
            await gw.stop()
            chat.close()
            web.close()
    run(main())


def test_plain_proxy_request_to_an_announced_upload_url_is_allowed_and_others_refused(tmp_path):
    """A plain proxy PUT (http://host:port/..., no CONNECT) to a non-chat port: allowed, and scanned, when a chat
    session announced that URL as an upload slot; any other URL on that port is refused with 403 and never
    reaches the server."""
    async def main():
        srv, port, received = await start_http_server()
        pipeline = StubPipeline()
        transfers = ExpectedTransfers()
        gw = await gateway(tmp_path, 1, ["regular@127.0.0.1:0"], pipeline, transfers=transfers)
        url = f"http://127.0.0.1:{port}/upload/abc/photo.jpg"
        transfers.expect_upload(url, ExpectedUpload(url, url, "photo.jpg", 9, "image/jpeg",
                                                    ChatContext(protocol="xmpp")))

        async def put(target: str) -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port_of("regular"))
            writer.write(f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 9\r\n\r\n".encode()
                         + b"JPEG data")
            status = int((await readline(reader)).split()[1])
            writer.close()
            return status
        try:
            assert await put(f"http://127.0.0.1:{port}/elsewhere") == 403
            assert received == []
            assert await put(url) == 201
            assert received == [("PUT /upload/abc/photo.jpg HTTP/1.1", b"JPEG data")]
            assert pipeline.scanned == ["photo.jpg"]
            assert len(anomalies(pipeline, "proxy_destination_refused")) == 1
        finally:
            await gw.stop()
            srv.close()
    run(main())


@pytest.mark.parametrize("via", ["socks5", "connect"])
def test_an_announced_side_transfer_is_a_chat_destination_once(tmp_path, via):
    """A DCC offer not rewritten to the relay pool announces the sender's listener: a proxied connection there is
    allowed (and carried by a DCC session that holds the file: EVIL never arrives); once the offer is used, the
    same destination is an unannounced non-chat port again, refused."""
    async def main():
        payload = b"EVIL" * 100
        pipeline = ChatPipeline()
        transfers = ExpectedTransfers()
        sender, sender_port, _ = await start_sender(payload)
        gw = Gateway(GatewaySettings(mode=[f"socks5@127.0.0.1:{free_port()}", f"regular@127.0.0.1:{free_port()}"]),
                     pipeline, data_dir=tmp_path / "data", transfers=transfers)
        await gw.start()

        async def open_to_sender():
            if via == "socks5":
                outcome, reader, writer = await socks5(gw.port_of("socks5"), sender_port)
                return outcome == "connected", reader, writer
            status, _, reader, writer = await connect(gw.port_of("regular"), f"127.0.0.1:{sender_port}")
            return status == 200, reader, writer
        try:
            remember_offer(transfers, offer_for(0, sender_port, payload=payload), 60)
            opened, reader, writer = await open_to_sender()
            assert opened
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"", "the held EVIL file arrived"
            writer.close()
            assert pipeline.scanned == ["report.bin"]
            opened, _, writer = await open_to_sender()
            writer.close()
            assert not opened and len(anomalies(pipeline, "proxy_destination_refused")) == 1
        finally:
            await gw.stop()
            sender.close()
    run(main())


def test_bad_proxy_destinations_value_is_refused(tmp_path):
    with pytest.raises(GatewayError, match="proxy_destinations"):
        Gateway(GatewaySettings(mode=["socks5@127.0.0.1:0"], proxy_destinations="some"), StubPipeline(),
                data_dir=tmp_path / "data", factories={})


# --- authentication ---------------------------------------------------------------------------------------------

def test_connect_without_credentials_gets_407_and_with_them_works(tmp_path):
    """--proxy-auth USER:PASS: a CONNECT without credentials, or with wrong ones, gets 407 with a
    Proxy-Authenticate challenge and reaches nothing; with them, the chat port is reached and inspected."""
    async def main():
        chat = CountingServer()
        chat_port = await chat.start()
        pipeline = StubPipeline()
        gw = await gateway(tmp_path, chat_port, ["regular@127.0.0.1:0"], pipeline, proxy_auth=f"{USER}:{PASSWORD}")
        target = f"127.0.0.1:{chat_port}"
        try:
            status, head, _, w = await connect(gw.port_of("regular"), target)
            w.close()
            assert status == 407 and b"Proxy-Authenticate: Basic" in head
            status, _, _, w = await connect(gw.port_of("regular"), target, basic(USER, "wrong"))
            w.close()
            assert status == 407
            assert len(anomalies(pipeline, "proxy_auth_failed")) == 2
            assert chat.accepted == 0
            status, _, r, w = await connect(gw.port_of("regular"), target, basic(USER, PASSWORD))
            assert status == 200 and await say(r, w, b"hello\n") == b"echo:hello\n"
            w.write(b"FILE x.exe EVIL\n")
            assert await readline(r) == b"BLOCKED x.exe\n"
            w.close()
        finally:
            await gw.stop()
            chat.close()
    run(main())


def test_authenticated_client_is_still_held_to_chat_destinations(tmp_path):
    """Credentials do not open the relay: an authenticated CONNECT to a non-chat port is still refused."""
    async def main():
        chat, other = CountingServer(), CountingServer()
        chat_port, other_port = await chat.start(), await other.start()
        gw = await gateway(tmp_path, chat_port, ["regular@127.0.0.1:0"], proxy_auth=f"{USER}:{PASSWORD}")
        try:
            status, _, _, w = await connect(gw.port_of("regular"), f"127.0.0.1:{other_port}", basic(USER, PASSWORD))
            w.close()
            assert status == 403 and other.accepted == 0
        finally:
            await gw.stop()
            chat.close()
            other.close()
    run(main())


def test_socks5_requires_username_password_when_auth_is_set(tmp_path):
    """--proxy-auth: a SOCKS5 client offering no authentication gets 'no acceptable method'; wrong credentials
    get the RFC 1929 failure; the right ones connect to the chat port."""
    async def main():
        chat = CountingServer()
        chat_port = await chat.start()
        pipeline = StubPipeline()
        gw = await gateway(tmp_path, chat_port, ["socks5@127.0.0.1:0"], pipeline, proxy_auth=f"{USER}:{PASSWORD}")
        try:
            outcome, _, w = await socks5(gw.port_of("socks5"), chat_port)
            w.close()
            assert outcome == "no acceptable method"
            outcome, _, w = await socks5(gw.port_of("socks5"), chat_port, auth=(USER, "wrong"))
            w.close()
            assert outcome == "auth failed"
            assert len(anomalies(pipeline, "proxy_auth_failed")) == 1
            assert chat.accepted == 0
            outcome, r, w = await socks5(gw.port_of("socks5"), chat_port, auth=(USER, PASSWORD), offer_no_auth=False)
            assert outcome == "connected" and await say(r, w, b"hello\n") == b"echo:hello\n"
            w.close()
        finally:
            await gw.stop()
            chat.close()
    run(main())


def test_htpasswd_file_credentials(tmp_path):
    """--proxy-auth @FILE: an Apache htpasswd file ({SHA} entry here) decides."""
    async def main():
        chat = CountingServer()
        chat_port = await chat.start()
        digest = base64.b64encode(hashlib.sha1(b"pw-from-file").digest()).decode()
        (tmp_path / "htpasswd").write_text(f"bob:{{SHA}}{digest}\n")
        gw = await gateway(tmp_path, chat_port, ["regular@127.0.0.1:0"], proxy_auth=f"@{tmp_path / 'htpasswd'}")
        try:
            status, _, _, w = await connect(gw.port_of("regular"), f"127.0.0.1:{chat_port}", basic("bob", "nope"))
            w.close()
            assert status == 407
            status, _, r, w = await connect(gw.port_of("regular"), f"127.0.0.1:{chat_port}",
                                            basic("bob", "pw-from-file"))
            assert status == 200 and await say(r, w, b"x\n") == b"echo:x\n"
            w.close()
        finally:
            await gw.stop()
            chat.close()
    run(main())


def test_listeners_other_machines_reach_are_named_for_the_warning():
    """Without --proxy-auth, `imguard run` warns about an explicit listener on any address but loopback."""
    addresses = [("127.0.0.1", 1080), ("::1", 1080, 0, 0), ("0.0.0.0", 8080), ("::", 8080, 0, 0),
                 ("192.0.2.7", 1080), ("localhost", 1)]
    assert reachable_from_outside(addresses) == [("0.0.0.0", 8080), ("::", 8080, 0, 0), ("192.0.2.7", 1080)]


def test_loopback_listeners_raise_no_warning(tmp_path, caplog):
    """The default loopback listeners start without the warning (it names exposed listeners only)."""
    async def main():
        gw = Gateway(GatewaySettings(mode=[f"socks5@127.0.0.1:{free_port()}"]), StubPipeline(),
                     data_dir=tmp_path / "data", factories={})
        await gw.start()
        await gw.stop()
    run(main())
    assert not [r for r in caplog.records if "without --proxy-auth" in r.getMessage()]


def test_bad_proxy_auth_is_refused_at_start(tmp_path):
    async def main():
        for spec in ("nocolon", f"@{tmp_path / 'missing'}"):
            gw = Gateway(GatewaySettings(mode=["socks5@127.0.0.1:0"], proxy_auth=spec), StubPipeline(),
                         data_dir=tmp_path / "data", factories={})
            with pytest.raises(GatewayError, match="proxy_auth"):
                await gw.start()
    run(main())


# --- the bytestream relay ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "proxy-auth-set"])
def test_bytestream_relay_takes_announced_hashes_only_and_never_asks_for_credentials(tmp_path, auth):
    """The relay listener (a socks5 listener) relays an announced stream hash without credentials, even with
    --proxy-auth set (XEP-0065 clients never authenticate), and refuses an unannounced hash and a plain
    destination (a chat port): it is no proxy."""
    async def main():
        chat = CountingServer()
        chat_port = await chat.start()
        payload = b"\xff\xd8\xff clean jpeg" * 50
        srv, sh_port, seen = await start_streamhost(payload)
        transfers = ExpectedTransfers()
        pipeline = StubPipeline()
        dst = socks5_hash("sid1", "alice@example.com/a", "bob@example.com/b")
        transfers.expect_bytestream(dst, ExpectedBytestream(
            dst, "sid1", "alice@example.com/a", "bob@example.com/b",
            (StreamHost("alice@example.com/a", "127.0.0.1", sh_port),), ChatContext(protocol="xmpp"),
            name="photo.jpg", size=len(payload)))
        port = free_port()
        relay = ("127.0.0.1", port)
        s = GatewaySettings(mode=[f"socks5@127.0.0.1:{port}"], bytestream_relay=f"127.0.0.1:{port}",
                            ports=[f"{chat_port}=line"], proxy_auth=f"{USER}:{PASSWORD}" if auth else "")
        gw = Gateway(s, pipeline, data_dir=tmp_path / "data", transfers=transfers,
                     factories=default_factories(pipeline, transfers, relay))
        await gw.start()

        async def relay_connect(host: bytes, dst_port: int = 0):
            reader, writer = await asyncio.open_connection(*relay)
            writer.write(b"\x05\x01\x00")
            assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\x05\x00"
            writer.write(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + dst_port.to_bytes(2, "big"))
            return await asyncio.wait_for(reader.readexactly(10), TIMEOUT), reader, writer
        try:
            reply, reader, writer = await relay_connect(dst.encode())
            assert reply[1] == 0
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == payload
            writer.close()
            unknown = socks5_hash("sid2", "mallory@example.com/m", "bob@example.com/b")
            reply, _, writer = await relay_connect(unknown.encode())
            writer.close()
            assert reply[1] != 0
            reply, _, writer = await relay_connect(b"127.0.0.1", chat_port)     # a chat port: still no proxy
            writer.close()
            assert reply[1] != 0
            assert len(seen) == 1 and chat.accepted == 0
            assert len(anomalies(pipeline, "unknown_bytestream")) == 2
        finally:
            await gw.stop()
            srv.close()
            chat.close()
    run(main())
