"""MSNP, OSCAR, YMSG and SIP through the real gateway: the embedded mitmproxy (imguard.gateway.master.Gateway, as
`imguard run` builds it) with the real pipeline (bundled rules and signatures plus tests/data/rules), in reverse:tcp
mode in front of small local servers that play the server side of the byte-exact transcripts in tests/data/legacy
(the MSN switchboards come from the real msnms capture), and of a real Kamailio for SIP.

The gateway's reverse listeners sit on unmapped ports, so each protocol is recognised by its first bytes (the
registry's signatures: `ANS `, the OSCAR server's FLAP hello, `YMSG`, `MESSAGE sip:`). File transfers on side
connections (OSCAR OFT, MSNFTP) go through the gateway's socks5 listener to the address the chat connection
announced, and are matched by that destination (registry.find_side) before any detection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import struct
from pathlib import Path

import pytest

from imguard.gateway.master import Gateway
from imguard.gateway.settings import GatewaySettings
from imguard.protocols.msnp import CommandDecoder, P2PHeader
from imguard.protocols.oscar import FlapDecoder, build_oft, oft_checksum, parse_oft
from imguard.protocols.ymsg import MESSAGE, PacketDecoder
from tests.test_msnp import (ME, PEER, blocks, data_chunks, msnftp_invitation, p2p_msg, slp_chunks, slp_invite,
                             text_msg, transcript)
from tests.test_oscar import FT_COOKIE, bos_transcript, outgoing_im, sendfile_proposal
from tests.test_ymsg import SID, login_transcript, message_transcript, pkt

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 10
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
BLOCKED_WORD = "project-bluebird"           # tests/data/rules/90-test-keywords.yaml blocks it


# --- the real pipeline and gateway --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(pipeline, data dir): the bundled rules plus the test keyword rule, the bundled signatures."""
    from imguard.runtime import build_pipeline

    rules = tmp_path_factory.mktemp("rules")
    for source in (ROOT / "rules", ROOT / "tests" / "data" / "rules"):
        for path in source.glob("*.yaml"):
            shutil.copy(path, rules / path.name)
    data = tmp_path_factory.mktemp("data")
    return build_pipeline(rules, ROOT / "signatures", data), data


def alerts(data: Path) -> list[dict]:
    path = data / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def start_gateway(tmp: Path, pipeline, upstream_port: int, socks: bool = False,
                        proxy: bool = False) -> tuple[Gateway, int]:
    """The gateway in reverse:tcp mode in front of 127.0.0.1:upstream_port, with a socks5 listener (side
    connections) and a regular HTTP proxy listener (uploads) when asked."""
    modes = [f"reverse:tcp://127.0.0.1:{upstream_port}@127.0.0.1:0"]
    modes += [f"socks5@127.0.0.1:{free_port()}"] if socks else []
    modes += [f"regular@127.0.0.1:{free_port()}"] if proxy else []
    gw = Gateway(GatewaySettings(mode=modes, listen_host="127.0.0.1"), pipeline, data_dir=tmp / "gateway")
    await gw.start()
    return gw, gw.port_of("reverse")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 4))


class TranscriptServer:
    """Plays the server side of `items` ([(from_client, bytes)]): each server write goes out once the client bytes
    before it in the transcript have arrived; everything received is kept (`received`)."""

    def __init__(self, items):
        self.items = items
        self.received = bytearray()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader, writer):
        needed = 0
        try:
            for from_client, data in self.items:
                if from_client:
                    needed += len(data)
                    continue
                while len(self.received) < needed:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    self.received += chunk
                writer.write(data)
                await writer.drain()
            while chunk := await reader.read(65536):
                self.received += chunk
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def wait_for(self, predicate, what: str) -> None:
        for _ in range(TIMEOUT * 20):
            if predicate(bytes(self.received)):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the server never got {what}; it got {bytes(self.received)[-300:]!r}")

    def close(self):
        if self.server is not None:
            self.server.close()


async def play_client(reader, writer, items) -> None:
    """The client side of `items`, in lockstep: write its segments, and read each server segment, which must
    arrive byte for byte."""
    for from_client, data in items:
        if from_client:
            writer.write(data)
            await writer.drain()
        else:
            got = await asyncio.wait_for(reader.readexactly(len(data)), TIMEOUT)
            assert got == data


async def through_gateway(tmp, pipeline, items, server_items=None, socks=False, proxy=False):
    server = TranscriptServer(items if server_items is None else server_items)
    port = await server.start()
    gw, gport = await start_gateway(tmp, pipeline, port, socks, proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", gport)
    return server, gw, reader, writer


def client_bytes(items) -> bytes:
    return b"".join(d for fc, d in items if fc)


async def play_whole_transcript(server, reader, writer, items) -> None:
    """play_client, then wait until the server has every byte the client sent and check they crossed unchanged."""
    await play_client(reader, writer, items)
    await server.wait_for(lambda got: len(got) >= len(client_bytes(items)), "the whole transcript")
    assert bytes(server.received) == client_bytes(items)


async def read_flap(reader) -> bytes:
    head = await asyncio.wait_for(reader.readexactly(6), TIMEOUT)
    return head + await asyncio.wait_for(reader.readexactly(struct.unpack(">H", head[4:6])[0]), TIMEOUT)


async def socks5(port: int, target_port: int):
    """A connection through the gateway's socks5 listener to 127.0.0.1:target_port (a peer's listener)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target_port.to_bytes(2, "big"))
    assert (await asyncio.wait_for(reader.readexactly(10), TIMEOUT))[:2] == b"\x05\x00"
    return reader, writer


async def read_to_end(reader) -> bytes:
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
            out += chunk
    except ConnectionResetError:
        pass
    return out


# --- MSNP ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["msnms_sb2.json", "msnms_sb3.json", "msnms_sb5.json"])
def test_msn_capture_crosses_the_gateway_byte_exact(tmp_path, world, name):
    """A real MSN switchboard (msnms.pcap): every message, typing notice and command crosses the gateway unchanged
    in both directions, recognised as MSNP by its first bytes; the messages are checked (decisions logged)."""
    pipeline, data = world
    items = transcript(name)

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items)
        try:
            await play_whole_transcript(server, reader, writer, items)
            assert gw.addon.stats["sessions"] == 1
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())
    # Both sides of the conversation are decided and recorded, each with its direction from the topology: what our
    # client sent is outbound, what the switchboard delivered to it inbound (the capture's people are not in the
    # test zones, so no zone says otherwise).
    messages = [a for a in alerts(data) if a["event"]["category"] == ["message"] and a["network"]["protocol"] == "msnp"]
    directions = {(m["imguard"]["context"]["origin"], m["imguard"]["context"]["direction"]) for m in messages}
    assert directions == {("client", "outbound"), ("server", "inbound")}, directions


def test_msn_blocked_message_never_reaches_the_server(tmp_path, world):
    """A message with the blocked keyword must NOT reach the switchboard: our client gets the gateway's notice as a
    message from "imguard" and a NAK for its transaction; the next message arrives byte-identical."""
    pipeline, data = world
    prefix = transcript("msnms_sb2.json")[:3]          # ANS, IRO, ANS OK
    blocked = text_msg(95, f"the {BLOCKED_WORD} launch is friday")
    allowed = text_msg(96, "see you at lunch")

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, prefix)
        try:
            await play_client(reader, writer, prefix)
            writer.write(blocked)
            back = await asyncio.wait_for(reader.readuntil(b"NAK 95\r\n"), TIMEOUT)
            notice, nak = CommandDecoder().feed(back)
            assert (notice.verb, notice.args[:2]) == ("MSG", ("imguard", "imguard")) and nak.args == ("95",)
            assert b"confidential project" in notice.payload
            writer.write(allowed)
            await server.wait_for(lambda got: got.endswith(allowed), "the allowed message")
            assert bytes(server.received) == client_bytes(prefix) + allowed
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())
    decisions = [a for a in alerts(data) if "test-codename-block" in json.dumps(a) and "msnp" in json.dumps(a)]
    assert decisions, "no alert for the blocked MSN message"


def test_msnslp_file_in_band_allowed_and_eicar_blocked(tmp_path, world):
    """MSNSLP over the switchboard: a clean file's chunks are held (ACKed by the gateway), inspected and then reach
    the switchboard byte-identical; EICAR's chunks never reach it, our client gets the SLP BYE and a notice naming
    the file, and the alert names it."""
    pipeline, data = world
    prefix = transcript("msnms_sb2.json")[:3]

    def offer(name: str, payload: bytes, ident: int, trid: int):
        chunks = slp_chunks(slp_invite(name, len(payload)), ident)
        invite = [(True, p2p_msg(trid + i, h, c, 0)) for i, (h, c) in enumerate(chunks)]
        ok = b"MSNSLP/1.0 200 OK\r\nTo: <msnmsgr:" + ME.encode() + b">\r\n\r\n\x00"
        return invite + [(False, p2p_msg(0, P2PHeader(0, ident + 1, 0, len(ok), len(ok), 0), ok, 0, ME, inbound=True))]

    clean = b"quarterly figures, nothing secret\n" * 80
    first, second = offer("notes.txt", clean, 77, 200), offer("eicar.com", EICAR, 88, 400)
    clean_msgs = [p2p_msg(300 + i, h, c, 2) for i, (h, c) in enumerate(data_chunks(clean))]
    eicar_msgs = [p2p_msg(500 + i, h, c, 2) for i, (h, c) in enumerate(data_chunks(EICAR))]

    async def main():
        server_items = prefix + first + [(True, m) for m in clean_msgs] + second
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, prefix, server_items)
        try:
            await play_client(reader, writer, prefix + first)
            for m in clean_msgs:
                writer.write(m)
            last = len(clean_msgs) - 1
            acks = await asyncio.wait_for(reader.readuntil(f"ACK {300 + last}\r\n".encode()), TIMEOUT)
            assert acks == b"".join(f"ACK {300 + i}\r\n".encode() for i in range(len(clean_msgs)))
            expected = client_bytes(prefix + first) + b"".join(clean_msgs)
            await server.wait_for(lambda got: len(got) >= len(expected), "the clean file")
            assert bytes(server.received) == expected
            await play_client(reader, writer, second)
            for m in eicar_msgs:
                writer.write(m)
            back = b""
            while b"eicar.com" not in back:
                back += await asyncio.wait_for(reader.read(65536), TIMEOUT)
            commands = CommandDecoder().feed(back)
            assert any(c.verb == "MSG" and b"BYE MSNMSGR:" in (c.payload or b"") for c in commands)
            assert any(c.args[:1] == ("imguard",) and b"eicar.com" in (c.payload or b"") for c in commands)
            await asyncio.sleep(0.3)
            assert bytes(server.received) == expected + client_bytes(second)     # no EICAR chunk
            assert b"EICAR" not in server.received
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())
    [alert] = [a for a in alerts(data) if a.get("file", {}).get("name") == "eicar.com"
               and a.get("imguard", {}).get("context", {}).get("transfer_mechanism") == "msnslp"]
    assert alert["imguard"]["decision"]["action"] == "block"
    assert alert["imguard"]["context"]["direction"] == "outbound"     # our client sent it


def test_msnftp_side_connection_is_held_and_released(tmp_path, world, caplog):
    """MSNFTP: our client's ACCEPT announces its listener on the switchboard; the peer's connection to it (through
    the gateway's socks5 listener) is matched by that address, the file is held until inspected, and then reaches
    the receiver byte-identical."""
    pipeline, _ = world
    caplog.set_level(logging.INFO, logger="imguard.gateway")
    prefix = transcript("msnms_sb2.json")[:3]
    payload = b"meeting notes\n" * 400

    async def main():
        listened = []

        async def sender(reader, writer):         # our client's MSNFTP listener (it sends the file)
            assert await reader.readline() == b"VER MSNFTP\r\n"
            writer.write(b"VER MSNFTP\r\n")
            assert await reader.readline() == f"USR {PEER} 9911\r\n".encode()
            writer.write(f"FIL {len(payload)}\r\n".encode())
            assert await reader.readline() == b"TFR\r\n"
            writer.write(blocks(payload))
            await writer.drain()
            listened.append(await reader.readline())       # the gateway's BYE (the receiver's is swallowed)
            writer.close()
        listener = await asyncio.start_server(sender, "127.0.0.1", 0)
        sender_port = listener.sockets[0].getsockname()[1]
        invitation = msnftp_invitation("notes.txt", len(payload), "127.0.0.1", sender_port)
        items = prefix + invitation
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items, socks=True)
        try:
            await play_client(reader, writer, items)
            await server.wait_for(lambda got: got.endswith(invitation[-1][1]), "the ACCEPT")
            r, w = await socks5(gw.port_of("socks5"), sender_port)
            w.write(b"VER MSNFTP\r\n")
            assert await asyncio.wait_for(r.readline(), TIMEOUT) == b"VER MSNFTP\r\n"
            w.write(f"USR {PEER} 9911\r\n".encode())
            assert await asyncio.wait_for(r.readline(), TIMEOUT) == f"FIL {len(payload)}\r\n".encode()
            w.write(b"TFR\r\n")
            got = await asyncio.wait_for(r.readexactly(len(blocks(payload))), TIMEOUT)
            assert got == blocks(payload)
            w.write(b"BYE 16777989\r\n")
            await asyncio.sleep(0.2)
            assert listened == [b"BYE 16777989\r\n"]
            assert gw.addon.stats["sessions"] == 2          # the switchboard and the MSNFTP connection
            assert f"127.0.0.1:{sender_port}: msnftp for MSNFTP invitation" in caplog.text
            w.close()
            writer.close()
        finally:
            await gw.stop()
            server.close()
            listener.close()
    run(main())


# --- OSCAR --------------------------------------------------------------------------------------------------

def test_oscar_bos_crosses_the_gateway_byte_exact(tmp_path, world):
    """The OSCAR BOS transcript: recognised by the server's FLAP hello (the server speaks first), every frame crosses
    unchanged both ways, the HTML and UCS-2 messages are checked."""
    pipeline, _ = world
    items, _, _ = bos_transcript()

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items)
        try:
            await play_whole_transcript(server, reader, writer, items)
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())


def bos_prefix():
    items, c, s = bos_transcript()
    return items[:4], c                     # hello, cookie sign-on, (01,03), self info "Alice1970"


def test_oscar_blocked_message_and_eicar_over_oft(tmp_path, world):
    """OSCAR: a blocked ICBM never reaches the BOS server (the client gets an ICBM from "imguard"; the next one goes
    on with a continuous FLAP sequence). Then a SendFile rendezvous announces our client's listener; the peer's OFT
    connection to it (through the gateway's socks5 listener) is matched by that address: the EICAR file is held,
    never reaches the receiver, our client is told on its BOS connection, and the alert names the file."""
    pipeline, data = world
    prefix, c = bos_prefix()

    async def main():
        received_by_sender = []

        async def sender(reader, writer):         # our client's OFT listener: it sends the file
            prompt = build_oft(0x0101, FT_COOKIE, "eicar.com", len(EICAR), checksum=oft_checksum(EICAR))
            writer.write(prompt)
            ack = await reader.readexactly(len(prompt))
            assert parse_oft(ack).type == 0x0202
            half = len(EICAR) // 2
            writer.write(EICAR[:half])
            await writer.drain()
            writer.write(EICAR[half:])
            await writer.drain()
            received_by_sender.append(await reader.read(65536))     # the gateway's done header
            writer.close()
        listener = await asyncio.start_server(sender, "127.0.0.1", 0)
        sender_port = listener.sockets[0].getsockname()[1]
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, prefix, socks=True)
        try:
            await play_client(reader, writer, prefix)
            writer.write(c.snac(0x04, 0x06, outgoing_im(b"CCCCCCC1", PEER, f"the {BLOCKED_WORD} roadmap")))
            notice = FlapDecoder().feed(await read_flap(reader))[0]
            assert b"imguard" in notice.data and b"blocked" in notice.data
            allowed = c.snac(0x04, 0x06, outgoing_im(b"CCCCCCC2", PEER, "lunch?"))
            writer.write(allowed)
            await server.wait_for(lambda got: b"lunch?" in got, "the allowed ICBM")
            assert BLOCKED_WORD.encode() not in server.received
            [fwd] = FlapDecoder().feed(bytes(server.received)[len(client_bytes(prefix)):])
            assert fwd.raw[6:] == allowed[6:] and fwd.seq == c.seq - 2      # renumbered: one frame was dropped

            proposal = c.snac(0x04, 0x06, sendfile_proposal(ip=b"\x7f\x00\x00\x01", port=sender_port,
                                                            name=b"eicar.com", size=len(EICAR)))
            writer.write(proposal)
            await server.wait_for(lambda got: got.endswith(proposal[6:]), "the rendezvous")
            r, w = await socks5(gw.port_of("socks5"), sender_port)
            prompt = await asyncio.wait_for(r.readexactly(256), TIMEOUT)
            w.write(parse_oft(prompt).with_type(0x0202))
            assert await read_to_end(r) == b""          # the receiver must NOT get any byte of the file
            frames = []
            while not any(b"eicar.com" in f.data for f in frames):
                frames += FlapDecoder().feed(await read_flap(reader))
            assert any(b"imguard" in f.data for f in frames)
            await asyncio.sleep(0.2)
            assert received_by_sender and parse_oft(received_by_sender[0]).type == 0x0204
            writer.close()
        finally:
            await gw.stop()
            server.close()
            listener.close()
    run(main())
    [alert] = [a for a in alerts(data) if a.get("file", {}).get("name") == "eicar.com"
               and a.get("imguard", {}).get("context", {}).get("transfer_mechanism") == "oft"]
    assert alert["imguard"]["decision"]["action"] == "block"
    assert any("test-codename-block" in json.dumps(a) and "oscar" in json.dumps(a) for a in alerts(data))


# --- YMSG ---------------------------------------------------------------------------------------------------

def test_ymsg_session_crosses_and_blocked_message_is_stopped(tmp_path, world):
    """YMSG: the login and messages cross byte-exact (recognised by "YMSG"); a blocked message never reaches the
    server and our client gets a MESSAGE from "imguard"."""
    pipeline, data = world
    items = login_transcript() + message_transcript()
    blocked = pkt(MESSAGE, [("1", "alice_1970"), ("5", "bob.smith"), ("14", f"about {BLOCKED_WORD}"), ("97", "1")],
                  session=SID)

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items)
        try:
            await play_whole_transcript(server, reader, writer, items)
            writer.write(blocked)
            head = await asyncio.wait_for(reader.readexactly(20), TIMEOUT)
            body = await asyncio.wait_for(reader.readexactly(struct.unpack(">H", head[8:10])[0]), TIMEOUT)
            [notice] = PacketDecoder().feed(head + body)
            assert notice.text("4") == "imguard" and "blocked" in notice.text("14")
            await asyncio.sleep(0.3)
            assert bytes(server.received) == client_bytes(items)
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())


def test_ymsg_peer_to_peer_upload_is_scanned_by_the_http_side(tmp_path, world):
    """YMSG 15 peer to peer (249 = 2: the sender POSTs the file to the host the 0xDD names): the offer on the YMSG
    connection registers the transfer; the POST through the gateway's HTTP proxy listener is matched to it by its
    token (find_ymsg_transfer), held and scanned: EICAR gets 403 and never reaches the receiving host, and the
    alert names the offered file and its sender."""
    from tests.test_gateway import start_http_server
    from tests.test_ymsg import offer_packets

    pipeline, data = world
    items = login_transcript() + offer_packets(method="2", host="127.0.0.1", token="tok123")

    async def main():
        receiver, receiver_port, received = await start_http_server()
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items, proxy=True)
        try:
            await play_client(reader, writer, items)
            await server.wait_for(lambda got: len(got) >= len(client_bytes(items)), "the offer")
            r, w = await asyncio.open_connection("127.0.0.1", gw.port_of("regular"))
            url = f"http://127.0.0.1:{receiver_port}/relay?token=tok123"
            w.write(f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1:{receiver_port}\r\nContent-Length: {len(EICAR)}\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + EICAR)
            status = await asyncio.wait_for(r.readline(), TIMEOUT)
            assert status.startswith(b"HTTP/1.1 403"), status
            assert received == []
            w.close()
            writer.close()
        finally:
            await gw.stop()
            server.close()
            receiver.close()
    run(main())
    [alert] = [a for a in alerts(data) if a.get("file", {}).get("name") == "report.exe"
               and a.get("imguard", {}).get("context", {}).get("transfer_mechanism") == "ymsg_p2p"]
    assert alert["imguard"]["decision"]["action"] == "block"
    assert alert["imguard"]["context"]["sender"] == "alice_1970"


def test_ymsg_download_announced_to_our_user_is_scanned(tmp_path, world):
    """A file offered *to* our Yahoo user (relay method): the GET of the announced relay URL through the
    gateway is the file's way in. Its response is held and scanned: EICAR becomes a 403, the alert names the
    offered file, and our user is told on the YMSG connection; a clean file arrives byte-identical."""
    from tests.test_ymsg import ME, PEER, SID, pkt

    pipeline, data = world

    def offer(tid: str, name: str, token: str) -> list:
        return [(False, pkt(0xDC, [("4", PEER), ("5", ME), ("265", tid), ("222", "1"), ("266", "1"), ("27", name),
                                   ("28", "68")], session=SID)),
                (True, pkt(0xDC, [("1", ME), ("5", PEER), ("265", tid), ("222", "3")], session=SID)),
                (False, pkt(0xDD, [("4", PEER), ("5", ME), ("265", tid), ("27", name), ("249", "3"),
                                   ("250", "127.0.0.1"), ("251", token)], session=SID))]

    items = login_transcript() + offer("TR-BAD", "gift.com", "tokbad") + offer("TR-OK", "notes.txt", "tokok")
    clean = b"the minutes of the meeting, nothing else\n" * 3

    async def serve(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        body = EICAR if b"tokbad" in head else clean
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    async def get(gw, port: int, token: str) -> tuple[bytes, bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port_of("regular"))
        url = f"http://127.0.0.1:{port}/relay?token={token}&sender={PEER}&recver={ME}"
        w.write(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(r.read(), TIMEOUT)
        w.close()
        head, _, body = response.partition(b"\r\n\r\n")
        return head, body

    async def main():
        relay = await asyncio.start_server(serve, "127.0.0.1", 0)
        relay_port = relay.sockets[0].getsockname()[1]
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items, proxy=True)
        try:
            await play_client(reader, writer, items)
            head, body = await get(gw, relay_port, "tokbad")
            assert head.startswith(b"HTTP/1.1 403") and EICAR not in body, head
            notice = await asyncio.wait_for(reader.read(4096), TIMEOUT)     # the YMSG notice from "imguard"
            assert b"imguard" in notice and b"gift.com" in notice, notice
            head, body = await get(gw, relay_port, "tokok")
            assert head.startswith(b"HTTP/1.1 200") and body == clean, head
            writer.close()
        finally:
            await gw.stop()
            server.close()
            relay.close()
    run(main())
    [alert] = [a for a in alerts(data) if a.get("file", {}).get("name") == "gift.com"]
    assert alert["imguard"]["decision"]["action"] == "block"
    assert alert["imguard"]["context"]["transfer_mechanism"] == "download"
    assert alert["imguard"]["context"]["sender"] == PEER
    assert alert["imguard"]["context"]["direction"] == "inbound"      # a file coming in to our user


# --- SIP to a real Kamailio ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kamailio(tmp_path_factory):
    """A real Kamailio (tests/peers/sip_peers.py) whose INVITE answers offer MSRP at 127.0.0.1:<msrp_port>."""
    from tests.peers.prosody import PeerError
    from tests.peers.sip_peers import Kamailio, binary

    if binary("kamailio") is None or binary("sipsak") is None:
        pytest.skip("kamailio and sipsak are not installed (tools/setup.sh test)")
    try:
        server = Kamailio.start(tmp_path_factory.mktemp("kamailio"), msrp_port=free_port())
    except PeerError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


def test_sip_message_through_the_gateway_to_kamailio(tmp_path, world, kamailio):
    """sipsak -> the gateway (reverse:tcp, recognised by "MESSAGE sip:") -> Kamailio: the allowed MESSAGE arrives
    as sent; the blocked one never arrives and sipsak gets imguard's 403 with the notice in a Warning header."""
    from tests.peers.sip_peers import sipsak
    from tests.test_sip_support import message

    pipeline, _ = world
    before = len(kamailio.messages())

    def local(text: str, cseq: int) -> bytes:
        return message(text, frm="<sip:alice@127.0.0.1>", to="<sip:bob@127.0.0.1>", ruri="sip:bob@127.0.0.1",
                       cseq=cseq, vias=1)

    async def main():
        gw, gport = await start_gateway(tmp_path, pipeline, kamailio.port)
        try:
            rc, out = await asyncio.to_thread(sipsak, local("hello through imguard", 1), "127.0.0.1", gport, "tcp")
            assert rc == 0, out
            rc, out = await asyncio.to_thread(sipsak, local(f"the {BLOCKED_WORD} budget", 2), "127.0.0.1", gport,
                                              "tcp")
            assert rc != 0 and "SIP/2.0 403 Forbidden" in out and "Warning: 399 imguard" in out, out
            assert "confidential project" in out
        finally:
            await gw.stop()
    run(main())
    assert [body for _, _, _, body in kamailio.messages()[before:]] == ["hello through imguard"], kamailio.logs()


def test_msrp_file_announced_by_kamailio_is_matched_and_eicar_blocked(tmp_path, world, kamailio, caplog):
    """The RFC 5547 INVITE goes through the gateway to Kamailio, whose real 200 OK announces its MSRP path: the
    gateway's SIP session puts the MSRP session in the table. Alice's MSRP connection to that address (through the
    gateway's socks5 listener) is matched by its destination and gets an MsrpSession: the EICAR file, sent in
    chunks, never reaches the receiver; alice gets the 403 REPORT, and the alert names the SDP's file."""
    from tests.peers.sip_peers import MSRP_SESSION, sipsak
    from tests.test_sip_live import MsrpReceiver
    from tests.test_sip_support import file_chunks, load

    from imguard.protocols.msrp.framing import MsrpDecoder

    pipeline, data = world
    caplog.set_level(logging.INFO, logger="imguard.gateway")

    async def main():
        receiver = MsrpReceiver()
        listener = await asyncio.start_server(receiver, "127.0.0.1", kamailio.msrp_port)
        gw, gport = await start_gateway(tmp_path, pipeline, kamailio.port, socks=True)
        try:
            rc, out = await asyncio.to_thread(sipsak, load("rfc5547_invite.sip"), "127.0.0.1", gport, "tcp")
            assert rc == 0 and kamailio.invites() >= 1, out
            to_path = f"msrp://127.0.0.1:{kamailio.msrp_port}/{MSRP_SESSION};tcp"
            chunks = [raw.replace(b"To-Path: msrp://bobpc.example.com:8888/9di4ea;tcp", f"To-Path: {to_path}".encode())
                      for _, raw in file_chunks(EICAR, 40, message_id="eicar1", tid_prefix="e")]
            r, w = await socks5(gw.port_of("socks5"), kamailio.msrp_port)
            for raw in chunks:
                w.write(raw)
            got, decoder = [], MsrpDecoder()
            while not any(getattr(c, "method", "") == "REPORT" for c in got):
                got += decoder.feed(await asyncio.wait_for(r.read(65536), TIMEOUT))
            [report] = [c for c in got if getattr(c, "method", "") == "REPORT"]
            assert b"403" in report.raw
            await asyncio.sleep(0.3)
            assert b"EICAR" not in receiver.received and b"X5O!" not in receiver.received
            w.close()
        finally:
            await gw.stop()
            listener.close()
    run(main())
    [alert] = [a for a in alerts(data) if a.get("imguard", {}).get("context", {}).get("transfer_mechanism") == "msrp"
               and a.get("file", {}).get("name") == "My cool picture.jpg"]
    assert alert["imguard"]["decision"]["action"] == "block"
    assert f"127.0.0.1:{kamailio.msrp_port}: msrp for SDP MSRP offer" in caplog.text    # by destination


def test_sip_message_over_udp_through_the_gateway_to_kamailio(tmp_path, world, kamailio):
    """SIP's usual transport: sipsak -> the gateway (reverse:udp, the port mapped to sip) -> Kamailio over UDP.
    The allowed MESSAGE arrives as sent; the blocked one never arrives and sipsak gets imguard's 403."""
    from tests.peers.sip_peers import sipsak
    from tests.test_sip_support import message

    pipeline, _ = world
    before = len(kamailio.messages())

    def local(text: str, cseq: int) -> bytes:
        return message(text, frm="<sip:alice@127.0.0.1>", to="<sip:bob@127.0.0.1>", ruri="sip:bob@127.0.0.1",
                       cseq=cseq, vias=1)

    async def main():
        settings = GatewaySettings(mode=[f"reverse:udp://127.0.0.1:{kamailio.port}@127.0.0.1:0"],
                                   listen_host="127.0.0.1",
                                   ports=list(GatewaySettings().ports) + [f"{kamailio.port}=sip"])
        gw = Gateway(settings, pipeline, data_dir=tmp_path / "gateway")
        await gw.start()
        gport = gw.port_of("reverse")
        try:
            rc, out = await asyncio.to_thread(sipsak, local("hello over udp", 1), "127.0.0.1", gport, "udp")
            assert rc == 0, out
            rc, out = await asyncio.to_thread(sipsak, local(f"the {BLOCKED_WORD} budget", 2), "127.0.0.1", gport,
                                              "udp")
            assert rc != 0 and "SIP/2.0 403 Forbidden" in out and "Warning: 399 imguard" in out, out
        finally:
            await gw.stop()
    run(main())
    assert [body for _, _, _, body in kamailio.messages()[before:]] == ["hello over udp"], kamailio.logs()
