"""The SOCKS5 bytestream relay (XEP-0065): a connection to the gateway's socks5 listener whose destination is a
stream hash is sent to the real streamhost announced for that hash, the SOCKS5 handshake is replayed upstream by
Socks5BytestreamSession, and the file is held until inspection decides."""

from __future__ import annotations

import asyncio

from imguard.files.expected import ExpectedBytestream, ExpectedTransfers, StreamHost
from imguard.gateway.master import Gateway, default_factories
from imguard.gateway.settings import GatewaySettings
from imguard.model import ChatContext
from imguard.protocols.xmpp import socks5_hash

from test_gateway import TIMEOUT, StubPipeline, free_port, run


async def start_streamhost(payload: bytes):
    """A direct streamhost (the initiator): SOCKS5 server side, then sends `payload` and closes."""
    seen = []

    async def handle(reader, writer):
        greeting = await reader.readexactly(3)
        writer.write(b"\x05\x00")
        head = await reader.readexactly(5)
        rest = await reader.readexactly(head[4] + 2)
        seen.append((greeting, head + rest))
        writer.write(b"\x05\x00\x00\x03" + head[4:] + rest)
        writer.write(payload)
        await writer.drain()
        writer.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], seen


async def socks5_connect(port: int, dst: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x03" + bytes([len(dst)]) + dst.encode() + b"\x00\x00")
    reply = await asyncio.wait_for(reader.readexactly(10), TIMEOUT)
    return reader, writer, reply


async def relay_transfer(tmp_path, payload: bytes, announce: bool = True):
    transfers = ExpectedTransfers()
    pipeline = StubPipeline()
    srv, sh_port, seen = await start_streamhost(payload)
    dst = socks5_hash("sid1", "alice@example.com/a", "bob@example.com/b")
    if announce:
        transfers.expect_bytestream(dst, ExpectedBytestream(
            dst, "sid1", "alice@example.com/a", "bob@example.com/b",
            (StreamHost("alice@example.com/a", "127.0.0.1", sh_port),), ChatContext(protocol="xmpp"),
            name="photo.jpg", size=len(payload)))
    relay_port = free_port()
    relay = ("127.0.0.1", relay_port)
    s = GatewaySettings(mode=[f"socks5@127.0.0.1:{relay_port}"], bytestream_relay=f"127.0.0.1:{relay_port}")
    gw = Gateway(s, pipeline, data_dir=tmp_path / "data", transfers=transfers,
                 factories=default_factories(pipeline, transfers, relay))
    await gw.start()
    try:
        reader, writer, reply = await socks5_connect(relay_port, dst)
        received = b""
        try:
            received = await asyncio.wait_for(reader.read(), TIMEOUT)
        except ConnectionResetError:
            pass
        return reply, received, seen, pipeline
    finally:
        await gw.stop()
        srv.close()


def test_bytestream_clean_file_is_released(tmp_path):
    """The streamhost sees the replayed handshake with the same hash; the clean file reaches the target after
    inspection."""
    async def main():
        payload = b"\xff\xd8\xff clean jpeg bytes" * 100
        reply, received, seen, pipeline = await relay_transfer(tmp_path, payload)
        assert reply[:2] == b"\x05\x00"
        dst = socks5_hash("sid1", "alice@example.com/a", "bob@example.com/b").encode()
        assert seen == [(b"\x05\x01\x00", b"\x05\x01\x00\x03\x28" + dst + b"\x00\x00")]
        assert received == payload
        assert len(pipeline.scanned) == 1
    run(main())


def test_bytestream_blocked_file_never_arrives(tmp_path):
    """A file the policy blocks is not released: the target gets nothing and the connection is closed."""
    async def main():
        reply, received, seen, pipeline = await relay_transfer(tmp_path, b"MZ EVIL payload")
        assert received == b""
        assert len(pipeline.scanned) == 1
    run(main())


def test_bytestream_unknown_hash_is_refused(tmp_path):
    """A relay connection for a hash nobody announced gets a SOCKS5 failure and an anomaly."""
    async def main():
        reply, received, seen, pipeline = await relay_transfer(tmp_path, b"x", announce=False)
        assert reply[1] != 0
        assert seen == []
        kinds = [r["imguard"]["anomaly"]["kind"] for r in pipeline.records if "anomaly" in r.get("imguard", {})]
        assert "unknown_bytestream" in kinds
    run(main())
