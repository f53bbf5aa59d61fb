"""MSNP, OSCAR, YMSG and SIP through the real gateway: the embedded mitmproxy (imguard.gateway.master.Gateway, as
`imguard run` builds it) with the real pipeline (bundled rules and signatures plus tests/data/rules), in reverse:tcp
mode in front of small local servers that play the server side of the byte-exact transcripts in tests/data/legacy
(the MSN switchboards come from the real msnms capture), and of a real Kamailio for SIP.

The gateway's reverse listeners sit on unmapped ports, so each protocol is recognised by its first bytes (the
registry's signatures: `ANS `, the OSCAR server's FLAP hello, `YMSG`, `MESSAGE sip:`). File transfers on side
connections (OSCAR OFT, MSNFTP) go through the gateway's socks5 listener to the address the chat connection
announced, and are matched by that destination (registry.find_side) before any detection; with the side relay on
(the *_through_the_side_relay tests: the real `imguard run` with --dcc-relay), the MSNFTP ACCEPT or OFT proposal is
rewritten to a relay port, which the receiver connects to straight. The helpers at the end of the file are run in
network namespaces by tests/test_inline_netns.py (`python -m tests.test_legacy_gateway HELPER SPEC`).

Both directions: our client (the test's connection to the gateway) is the user inside; the scripted server's side
(and the peer listening for a side connection) is the outside party. Outbound, our client sends; inbound, the
server delivers the outside party's message, MSNSLP chunks, MSNFTP or OFT offer (whose side connection our client
opens), or Kamailio's answer announces the MSRP endpoint that sends the file. Each inbound test asserts the bytes
our client got (none of a blocked file, read up to a sentinel sent after it; a clean file byte-identical), the
notice it got in its own words, and the alert's direction and both parties (and the archive for the MSNP and
OSCAR messages and the MSNSLP files).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import socket
import struct
import uuid
from pathlib import Path

import pytest

from imguard.gateway.master import Gateway
from imguard.gateway.settings import GatewaySettings
from imguard.protocols.msnp import CommandDecoder, P2PHeader, format_command
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


class Inbox:
    """What our client reads on one connection, decoded as it comes with the protocol's own decoder (its
    `feed(bytes) -> items`): `until` reads until an item satisfies the predicate, with no fixed sleep."""

    def __init__(self, reader, decoder):
        self.reader = reader
        self.decoder = decoder
        self.items: list = []
        self.raw = bytearray()

    async def until(self, predicate, what: str):
        while True:
            found = next((item for item in self.items if predicate(item)), None)
            if found is not None:
                return found
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not data:
                raise AssertionError(f"the connection closed before {what}; got {bytes(self.raw)[-300:]!r}")
            self.raw += data
            self.items += self.decoder.feed(data)


def assert_inbound(alert: dict, sender: str, receiver: str) -> None:
    """The alert says the content came in (from the server's side, to the user behind the gateway) and names both
    parties: the outside sender and the inside receiver."""
    ctx = alert["imguard"]["context"]
    assert (ctx["direction"], ctx["origin"]) == ("inbound", "server"), ctx
    assert ctx["sender"] == sender and receiver in ctx["recipients"], ctx


def file_alerts(data: Path, mechanism: str, sha256: str) -> list[dict]:
    return [a for a in alerts(data) if a.get("imguard", {}).get("context", {}).get("transfer_mechanism") == mechanism
            and a.get("file", {}).get("hash", {}).get("sha256") == sha256]


def archived(pipeline, person: str, predicate) -> list[dict]:
    """The archive searched by person (as `imguard archive search --person`), the rows that satisfy `predicate`
    (the search waits for the archive's writer)."""
    from imguard.archive import Query

    return [r for r in pipeline.archive.search(Query(person=person)) if predicate(r)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    messages = [a for a in alerts(data)
                if a["event"]["dataset"] == "imguard.message" and a["network"]["protocol"] == "msnp"]
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
            sentinel = text_msg(600, f"sentinel {uuid.uuid4().hex[:6]}")      # sent after the EICAR chunks
            writer.write(sentinel)
            await server.wait_for(lambda got: got.endswith(sentinel), "the sentinel")
            assert bytes(server.received) == expected + client_bytes(second) + sentinel    # no EICAR chunk
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
            for _ in range(TIMEOUT * 20):
                if listened:
                    break
                await asyncio.sleep(0.05)
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


# --- MSNP inbound: the outside party (on the switchboard's side) sends to our client --------------------------

def inbound_text(body: str) -> bytes:
    """A text message the switchboard delivers to our client from PEER (the outside party)."""
    payload = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\nX-MMS-IM-Format: FN=Lucida%20Grande;"
               b" EF=; CO=C81ABB; CS=0; PF=2\r\n\r\n" + body.encode())
    return format_command("MSG", PEER, "choupi", payload=payload)


def test_msn_inbound_blocked_message_never_reaches_our_client(tmp_path, world):
    """The switchboard delivers PEER's message with the blocked keyword: our client never gets it, it gets a message
    from "imguard" saying from whom and why (in its own words, not the rule's notice for a sender), and PEER's next
    message (the sentinel) arrives byte-identical after it. The alert and the archive say inbound, PEER to us."""
    pipeline, data = world
    prefix = transcript("msnms_sb2.json")[:3]          # ANS (our client, ME), IRO (PEER), ANS OK
    text = f"the {BLOCKED_WORD} launch moved, {uuid.uuid4().hex[:6]}"
    sentinel = inbound_text(f"sentinel {uuid.uuid4().hex[:6]}")
    items = prefix + [(False, inbound_text(text)), (False, sentinel)]

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items)
        try:
            await play_client(reader, writer, prefix)
            inbox = Inbox(reader, CommandDecoder())
            last = await inbox.until(lambda c: c.raw == sentinel, "the sentinel")
            assert BLOCKED_WORD.encode() not in inbox.raw
            notice, got = inbox.items
            assert got is last and (notice.verb, notice.args[:2]) == ("MSG", ("imguard", "imguard"))
            assert notice.payload.endswith(f"A message from {PEER} was blocked by imguard: Confidential project "
                                           "codename".encode())
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())
    [alert] = [a for a in alerts(data) if text in json.dumps(a)]
    assert alert["event"]["action"] == "block" and alert["rule"]["id"] == "test-codename-block"
    assert_inbound(alert, PEER, ME)
    for person in (PEER, ME):
        assert [(r["direction"], r["action"]) for r in archived(pipeline, person, lambda r: r["text"] == text)] == [
            ("inbound", "block")]


def slp_file_in(name: str, payload: bytes, sid: int, ident: int) -> tuple[list, bytes, list[bytes]]:
    """An MSNSLP file PEER sends our client through the switchboard: (the INVITE chunks the switchboard delivers,
    our client's 200 OK, the data chunks the switchboard delivers)."""
    invite = [p2p_msg(0, h, c, 0, ME, inbound=True) for h, c in slp_chunks(slp_invite(name, len(payload), sender=PEER,
                                                                                     receiver=ME, sid=sid), ident)]
    ok_body = b"MSNSLP/1.0 200 OK\r\nTo: <msnmsgr:" + PEER.encode() + b">\r\n\r\n\x00"
    ok = p2p_msg(100 + sid % 100, P2PHeader(0, ident + 50, 0, len(ok_body), len(ok_body), 0), ok_body, 0)
    chunks = [p2p_msg(0, h, c, 2, ME, inbound=True) for h, c in data_chunks(payload, sid=sid)]
    return invite, ok, chunks


def test_msnslp_inbound_eicar_never_reaches_our_client_and_a_clean_file_arrives(tmp_path, world):
    """MSNSLP in-band, PEER sending to our client: the switchboard delivers the INVITE (it crosses), our client
    accepts, the switchboard delivers the data chunks. EICAR: our client gets none of its chunks, an SLP BYE from
    PEER and a message from "imguard" naming the file and PEER; a sentinel message after it arrives and still no
    chunk. Then a clean file arrives byte-identical (every chunk, as the switchboard sent it). The alerts say
    inbound, PEER to us; the archive has both files for both people."""
    pipeline, data = world
    prefix = transcript("msnms_sb2.json")[:3]
    tag = uuid.uuid4().hex[:6]
    bad, good = f"eicar-{tag}.com", f"notes-{tag}.txt"
    clean = b"quarterly figures, nothing secret\n" * 80
    bad_invite, bad_ok, bad_chunks = slp_file_in(bad, EICAR, 5101, 61)
    good_invite, good_ok, good_chunks = slp_file_in(good, clean, 5102, 71)
    reply = text_msg(120, "did you send something?")
    sentinel = inbound_text(f"sentinel {tag}")
    items = (prefix + [(False, m) for m in bad_invite] + [(True, bad_ok)] + [(False, m) for m in bad_chunks]
             + [(True, reply), (False, sentinel)] + [(False, m) for m in good_invite] + [(True, good_ok)]
             + [(False, m) for m in good_chunks])

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items)
        try:
            await play_client(reader, writer, prefix)
            inbox = Inbox(reader, CommandDecoder())
            for m in bad_invite:
                await inbox.until(lambda c, m=m: c.raw == m, "the INVITE")       # the INVITE crosses as it came
            writer.write(bad_ok)
            await inbox.until(lambda c: c.args[:1] == ("imguard",) and bad.encode() in c.payload, "the notice")
            assert any(c.args[:1] == (PEER,) and b"BYE MSNMSGR:" + ME.encode() in (c.payload or b"")
                       for c in inbox.items), "no SLP BYE ended our client's transfer"
            writer.write(reply)
            await inbox.until(lambda c: c.raw == sentinel, "the sentinel")
            assert not any(c.raw in bad_chunks for c in inbox.items) and b"EICAR" not in inbox.raw
            [notice] = [c for c in inbox.items if c.args[:1] == ("imguard",)]
            assert f"imguard: the file {bad!r} from {PEER} was blocked (".encode() in notice.payload, notice.payload
            start = len(inbox.items)
            for m in good_invite:
                await inbox.until(lambda c, m=m: c.raw == m, "the second INVITE")
            writer.write(good_ok)
            await inbox.until(lambda c: c.raw == good_chunks[-1], "the clean file's last chunk")
            got = [c.raw for c in inbox.items[start:] if c.raw not in good_invite]
            assert got == good_chunks                      # byte-identical, in order, nothing else
            await server.wait_for(lambda got: got.endswith(good_ok), "our client's 200 OK")
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())
    [blocked] = [a for a in file_alerts(data, "msnslp", sha(EICAR)) if a["file"]["name"] == bad]
    assert blocked["imguard"]["decision"]["action"] == "block"
    assert_inbound(blocked, PEER, ME)
    [allowed] = [a for a in file_alerts(data, "msnslp", sha(clean)) if a["file"]["name"] == good]
    assert allowed["imguard"]["decision"]["action"] == "allow"
    assert_inbound(allowed, PEER, ME)
    for person in (PEER, ME):
        rows = archived(pipeline, person, lambda r: r["file_name"] in (bad, good))
        assert sorted((r["file_name"], r["direction"], r["action"]) for r in rows) == [
            (bad, "inbound", "block"), (good, "inbound", "allow")], rows


@pytest.mark.parametrize("kind", ["eicar", "clean"])
def test_msnftp_inbound_file_held_on_our_clients_connection(tmp_path, world, kind):
    """MSNFTP with the outside party sending: the invitation comes from the switchboard side, our client accepts, and
    PEER's ACCEPT announces PEER's listener. Our client's connection to it (through the gateway's socks5 listener) is
    matched by that address; PEER's blocks are held. EICAR: our client gets MSNFTP's cancel block and nothing of the
    file, and a message from "imguard" on the switchboard naming the file and PEER; a sentinel after it arrives. A
    clean file arrives byte-identical. The alert says inbound, PEER to us."""
    from tests.test_msnp import msnftp_inbound_invitation

    pipeline, data = world
    prefix = transcript("msnms_sb2.json")[:3]
    tag = uuid.uuid4().hex[:6]
    name, payload = (f"eicar-{tag}.com", EICAR) if kind == "eicar" else (f"minutes-{tag}.txt", b"minutes\n" * 700)

    async def main():
        sender_saw = []

        async def outside_sender(reader, writer):       # PEER's MSNFTP listener: it sends the file
            assert await reader.readline() == b"VER MSNFTP\r\n"
            writer.write(b"VER MSNFTP\r\n")
            assert await reader.readline() == f"USR {ME} 8822\r\n".encode()
            writer.write(f"FIL {len(payload)}\r\n".encode())
            assert await reader.readline() == b"TFR\r\n"
            writer.write(blocks(payload))
            await writer.drain()
            sender_saw.append(await reader.readline())      # the gateway's BYE: the sender's client finishes
            writer.close()
        listener = await asyncio.start_server(outside_sender, "127.0.0.1", 0)
        sender_port = listener.sockets[0].getsockname()[1]
        invitation = msnftp_inbound_invitation(name, len(payload), "127.0.0.1", sender_port)
        sentinel = inbound_text(f"sentinel {tag}")
        reply = text_msg(130, "got it?")
        items = prefix + invitation + [(True, reply), (False, sentinel)]
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items, socks=True)
        try:
            await play_client(reader, writer, prefix + invitation)
            r, w = await socks5(gw.port_of("socks5"), sender_port)
            w.write(b"VER MSNFTP\r\n")
            assert await asyncio.wait_for(r.readline(), TIMEOUT) == b"VER MSNFTP\r\n"
            w.write(f"USR {ME} 8822\r\n".encode())
            assert await asyncio.wait_for(r.readline(), TIMEOUT) == f"FIL {len(payload)}\r\n".encode()
            w.write(b"TFR\r\n")
            got = await read_to_end(r)
            inbox = Inbox(reader, CommandDecoder())
            if kind == "eicar":
                assert got == b"\x01\x00\x00", got[:40]         # the cancel block, none of the file
                notice = await inbox.until(lambda c: c.args[:1] == ("imguard",), "the notice")
                assert f"imguard: the file {name!r} from {PEER} was blocked (".encode() in notice.payload
            else:
                assert got == blocks(payload)                   # byte-identical, then the sender's close passed on
            writer.write(reply)
            await inbox.until(lambda c: c.raw == sentinel, "the sentinel")
            assert b"EICAR" not in inbox.raw
            assert sender_saw == [b"BYE 16777989\r\n"]
            w.close()
            writer.close()
        finally:
            await gw.stop()
            server.close()
            listener.close()
    run(main())
    [alert] = [a for a in file_alerts(data, "msnftp", sha(payload)) if a["file"]["name"] == name]
    assert alert["imguard"]["decision"]["action"] == ("block" if kind == "eicar" else "allow")
    assert_inbound(alert, PEER, ME)


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


def oft_sender(name: str, payload: bytes, saw: list):
    """An OFT sender's listener, as a real client runs it: the prompt, the receiver's ack, the file in two writes,
    then the done header it gets back (the gateway's, which answers for the held file) into `saw`."""
    async def send(reader, writer):
        prompt = build_oft(0x0101, FT_COOKIE, name, len(payload), checksum=oft_checksum(payload))
        writer.write(prompt)
        ack = await reader.readexactly(len(prompt))
        assert parse_oft(ack).type == 0x0202
        half = len(payload) // 2
        writer.write(payload[:half])
        await writer.drain()
        writer.write(payload[half:])
        await writer.drain()
        saw.append(await reader.readexactly(len(prompt)))      # the done header: as long as the prompt
        writer.close()
    return send


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
        # our client's OFT listener: it sends the file
        listener = await asyncio.start_server(oft_sender("eicar.com", EICAR, received_by_sender), "127.0.0.1", 0)
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
            for _ in range(TIMEOUT * 20):
                if received_by_sender:
                    break
                await asyncio.sleep(0.05)
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


# --- OSCAR inbound: the outside party (on the BOS server's side) sends to our client --------------------------

def bos_prefix_inbound():
    """The BOS prefix (our client signs on as Alice1970), our client's Wire and a server Wire that goes on where the
    prefix's server frames stopped."""
    from tests.test_oscar import Wire

    items, c, _ = bos_transcript()
    return items[:4], c, Wire(0x5003)


def test_oscar_inbound_blocked_message_never_reaches_our_client(tmp_path, world):
    """The BOS server delivers an ICBM from the outside party with the blocked keyword: our client never gets it; it
    gets an ICBM from "imguard" saying from whom and why (in its own words), and the next incoming ICBM (the
    sentinel) crosses byte-identical (the FLAP sequence stays continuous: one frame dropped, one injected). The
    alert and the archive say inbound, the outside party to our client."""
    from tests.test_oscar import PEER as AIM_PEER, incoming_im

    pipeline, data = world
    prefix, _, s = bos_prefix_inbound()
    text = f"the {BLOCKED_WORD} roadmap {uuid.uuid4().hex[:6]}"
    blocked = s.snac(0x04, 0x07, incoming_im(b"BBBBBBB3", AIM_PEER, text))
    sentinel = s.snac(0x04, 0x07, incoming_im(b"BBBBBBB4", AIM_PEER, f"sentinel {uuid.uuid4().hex[:6]}"))
    items = prefix + [(False, blocked), (False, sentinel)]

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items)
        try:
            await play_client(reader, writer, prefix)
            inbox = Inbox(reader, FlapDecoder())
            await inbox.until(lambda f: f.raw == sentinel, "the sentinel")
            assert BLOCKED_WORD.encode() not in inbox.raw
            notice, _ = inbox.items
            assert b"\x07imguard" in notice.data
            assert f"A message from {AIM_PEER} was blocked by imguard: Confidential project codename".encode() \
                in notice.data
            assert notice.seq == FlapDecoder().feed(blocked)[0].seq       # in the dropped frame's place
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())
    [alert] = [a for a in alerts(data) if text in json.dumps(a)]
    assert alert["event"]["action"] == "block" and alert["rule"]["id"] == "test-codename-block"
    assert_inbound(alert, AIM_PEER, "Alice1970")
    assert [(r["direction"], r["action"]) for r in archived(pipeline, AIM_PEER, lambda r: r["text"] == text)] == [
        ("inbound", "block")]


@pytest.mark.parametrize("kind", ["eicar", "clean"])
def test_oft_inbound_file_from_the_outside_party(tmp_path, world, kind):
    """SendFile with the outside party sending: the rendezvous proposal comes from the BOS server's side (the offer's
    outbound is False) and announces the sender's listener; our client's OFT connection to it (through the gateway's
    socks5 listener) is matched by that address. The sender's prompt crosses, our client's ack starts the file,
    whose bytes are held (the gateway answers the sender's done itself). EICAR: our client gets nothing of it (the
    connection closes) and an ICBM from "imguard" naming the file and the sender; a sentinel ICBM after it
    arrives. A clean file arrives byte-identical. The alert says inbound, the sender to our client."""
    from tests.test_oscar import PEER as AIM_PEER, incoming_im, incoming_sendfile_proposal

    pipeline, data = world
    prefix, c, s = bos_prefix_inbound()
    tag = uuid.uuid4().hex[:6]
    name, payload = (f"eicar-{tag}.com", EICAR) if kind == "eicar" else (f"agenda-{tag}.txt", b"agenda\n" * 900)

    async def main():
        sender_saw = []
        # the outside party's OFT listener: it sends the file
        listener = await asyncio.start_server(oft_sender(name, payload, sender_saw), "127.0.0.1", 0)
        sender_port = listener.sockets[0].getsockname()[1]
        proposal = s.snac(0x04, 0x07, incoming_sendfile_proposal(ip=b"\x7f\x00\x00\x01", port=sender_port,
                                                                 name=name.encode(), size=len(payload)))
        reply = c.snac(0x04, 0x06, outgoing_im(b"CCCCCCC9", AIM_PEER, "thanks"))
        sentinel = s.snac(0x04, 0x07, incoming_im(b"BBBBBBB9", AIM_PEER, f"sentinel {tag}"))
        items = prefix + [(False, proposal), (True, reply), (False, sentinel)]
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items, socks=True)
        try:
            await play_client(reader, writer, prefix)
            inbox = Inbox(reader, FlapDecoder())
            await inbox.until(lambda f: f.raw == proposal, "the proposal")     # it crosses as it came
            r, w = await socks5(gw.port_of("socks5"), sender_port)
            prompt = await asyncio.wait_for(r.readexactly(256), TIMEOUT)
            w.write(parse_oft(prompt).with_type(0x0202))
            got = await read_to_end(r)
            if kind == "eicar":
                assert got == b"", got[:40]              # the receiver gets no byte of the file
                notice = await inbox.until(lambda f: b"\x07imguard" in f.data and name.encode() in f.data,
                                           "the notice")      # an ICBM from the screen name "imguard"
                assert f"imguard: the file {name!r} from {AIM_PEER} was blocked (".encode() in notice.data
            else:
                assert got == payload
            writer.write(reply)
            # The sentinel crosses with its data unchanged; after the injected notice its FLAP sequence is one on.
            last = await inbox.until(lambda f: f.raw[6:] == sentinel[6:], "the sentinel")
            assert last.seq == FlapDecoder().feed(sentinel)[0].seq + (kind == "eicar")
            assert b"EICAR" not in inbox.raw
            assert sender_saw and parse_oft(sender_saw[0]).type == 0x0204
            w.close()
            writer.close()
        finally:
            await gw.stop()
            server.close()
            listener.close()
    run(main())
    [alert] = [a for a in file_alerts(data, "oft", sha(payload)) if a["file"]["name"] == name]
    assert alert["imguard"]["decision"]["action"] == ("block" if kind == "eicar" else "allow")
    assert_inbound(alert, AIM_PEER, "Alice1970")


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
            sentinel = pkt(MESSAGE, [("1", "alice_1970"), ("5", "bob.smith"),
                                     ("14", f"sentinel {uuid.uuid4().hex[:6]}"), ("97", "1")], session=SID)
            writer.write(sentinel)
            await server.wait_for(lambda got: got.endswith(sentinel), "the sentinel")
            assert bytes(server.received) == client_bytes(items) + sentinel
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())


def test_ymsg_inbound_blocked_message_never_reaches_our_client(tmp_path, world):
    """The server delivers a message from the outside party with the blocked keyword: our client never gets it, it
    gets a MESSAGE from "imguard" saying from whom and why (in its own words), and the next message (the sentinel)
    arrives byte-identical. The alert says inbound, the outside party to our client."""
    from tests.test_ymsg import ME as Y_ME, PEER as Y_PEER

    pipeline, data = world
    items = login_transcript()
    text = f"about {BLOCKED_WORD} {uuid.uuid4().hex[:6]}"

    def incoming(body: str) -> bytes:
        return pkt(MESSAGE, [("5", Y_ME), ("4", Y_PEER), ("14", body), ("97", "1"), ("63", ";0"), ("64", "0")],
                   status=1, session=SID)

    sentinel = incoming(f"sentinel {uuid.uuid4().hex[:6]}")
    server_items = items + [(False, incoming(text)), (False, sentinel)]

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items, server_items)
        try:
            await play_client(reader, writer, items)
            inbox = Inbox(reader, PacketDecoder())
            await inbox.until(lambda p: p.raw == sentinel, "the sentinel")
            assert BLOCKED_WORD.encode() not in inbox.raw
            notice, _ = inbox.items
            assert notice.text("4") == "imguard"
            assert notice.text("14") == f"A message from {Y_PEER} was blocked by imguard: Confidential project codename"
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())
    [alert] = [a for a in alerts(data) if text in json.dumps(a)]
    assert alert["event"]["action"] == "block"
    assert_inbound(alert, Y_PEER, Y_ME)


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


def test_sip_inbound_message_blocked_before_our_user(tmp_path, world):
    """A MESSAGE the proxy delivers to our user (inbound; a scripted proxy, since the test Kamailio only answers):
    our user registers through the gateway, then the proxy delivers bob's MESSAGE with the blocked keyword and a
    sentinel. Our user never gets the first, gets a notice MESSAGE from imguard saying from whom and why, then the
    sentinel byte-identical; the proxy (for bob) gets the 403 with imguard's Warning. The alert says inbound."""
    from imguard.protocols.sip.message import SipStreamDecoder
    from tests.test_sip_support import message, sip

    pipeline, data = world
    tag = uuid.uuid4().hex[:6]
    register = sip("REGISTER sip:127.0.0.1 SIP/2.0", [("Via", "SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK-r1"),
                                                     ("From", "<sip:alice@127.0.0.1>;tag=1"),
                                                     ("To", "<sip:alice@127.0.0.1>"), ("Call-ID", f"reg-{tag}"),
                                                     ("CSeq", "1 REGISTER"),
                                                     ("Contact", "<sip:alice@127.0.0.1:5099;transport=tcp>")])
    ok = sip("SIP/2.0 200 OK", [("Via", "SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK-r1"),
                                ("From", "<sip:alice@127.0.0.1>;tag=1"), ("To", "<sip:alice@127.0.0.1>;tag=k"),
                                ("Call-ID", f"reg-{tag}"), ("CSeq", "1 REGISTER")])
    text = f"the {BLOCKED_WORD} budget {tag}"

    def delivered(body: str, cseq: int) -> bytes:
        return message(body, frm="<sip:bob@b.example>", to="<sip:alice@127.0.0.1>",
                       ruri="sip:alice@127.0.0.1:5099;transport=tcp", cseq=cseq, vias=2)

    blocked, sentinel = delivered(text, 7), delivered(f"sentinel {tag}", 8)
    items = [(True, register), (False, ok), (False, blocked), (False, sentinel)]

    async def main():
        server, gw, reader, writer = await through_gateway(tmp_path, pipeline, items)
        try:
            writer.write(register)
            inbox = Inbox(reader, SipStreamDecoder())
            await inbox.until(lambda m: m.raw == sentinel, "the sentinel")
            assert BLOCKED_WORD.encode() not in inbox.raw
            got_ok, notice, _ = inbox.items
            assert got_ok.raw == ok and notice.method == "MESSAGE" and "imguard" in notice.get("from")
            assert notice.body == (b"A message from sip:bob@b.example was blocked by imguard: Confidential project "
                                   b"codename")
            await server.wait_for(lambda got: b"SIP/2.0 403" in got, "the 403 for bob")
            [refusal] = [m for m in SipStreamDecoder().feed(bytes(server.received)) if not m.is_request]
            assert refusal.status == 403 and "399 imguard" in refusal.get("warning")
            assert refusal.call_id == "asd88asd77a-7@10.0.0.7"
            writer.close()
        finally:
            await gw.stop()
            server.close()
    run(main())
    [alert] = [a for a in alerts(data) if text in json.dumps(a)]
    assert alert["event"]["action"] == "block" and alert["rule"]["id"] == "test-codename-block"
    assert_inbound(alert, "sip:bob@b.example", "sip:alice@127.0.0.1")


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
    from tests.test_sip_support import chunk, file_chunks, load

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
            tag = uuid.uuid4().hex[:6]
            sentinel = chunk(f"s{tag}", f"sentinel {tag}".encode(), to_path=to_path, message_id=f"s-{tag}")
            w.write(sentinel)                               # after the verdict: it arrives after any file byte would
            for _ in range(TIMEOUT * 20):
                if sentinel in receiver.received:
                    break
                await asyncio.sleep(0.05)
            assert sentinel in receiver.received, bytes(receiver.received)[-300:]
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


class RemoteParty:
    """The other party's MSRP endpoint where Kamailio's answer says it listens: it answers each SEND 200
    (RFC 4975 §7.2), keeps what it receives (decoded), and the test writes what it sends through `writer`."""

    def __init__(self):
        self.chunks: list = []
        self.received = bytearray()
        self.writer = None

    async def __call__(self, reader, writer):
        from imguard.protocols.msrp.framing import MsrpDecoder, build_response

        self.writer = writer
        decoder = MsrpDecoder()
        while data := await reader.read(65536):
            self.received += data
            for chunk in decoder.feed(data):
                self.chunks.append(chunk)
                if getattr(chunk, "method", "") == "SEND" and chunk.failure_report == "yes":
                    writer.write(build_response(chunk, 200))
        writer.close()

    async def wait_for(self, predicate, what: str):
        for _ in range(TIMEOUT * 20):
            found = next((c for c in self.chunks if predicate(c)), None)
            if found is not None:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"the remote party never got {what}; it got {bytes(self.received)[-300:]!r}")


def pull_invite(name: str, call_id: str) -> bytes:
    """RFC 5547 §8.2's other way round: alice (our user) asks bob (outside, b.example) for a file, `a=recvonly`; so
    bob sends and alice receives."""
    import re

    from tests.test_sip_support import load

    raw = (load("rfc5547_invite.sip").replace(b"a=sendonly", b"a=recvonly")
           .replace(b"bob@example.com", b"bob@b.example")
           .replace(b'name:"My cool picture.jpg"', f'name:"{name}"'.encode())
           .replace(b"a84b4c76e66710", call_id.encode()))
    head, _, body = raw.partition(b"\r\n\r\n")
    return re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head) + b"\r\n\r\n" + body


def test_msrp_file_sent_by_the_remote_party_to_our_user(tmp_path, world, kamailio):
    """A file the remote party sends to our user: alice's RFC 5547 INVITE asks for it (recvonly) through the gateway
    to Kamailio, whose real 200 OK announces bob's MSRP path; alice's MSRP connection to it (through the gateway's
    socks5 listener) is matched by that destination. Bob's EICAR chunks are held and decided inbound: alice gets
    none of them, only an MSRP notice from bob's path in her own words; bob gets the REPORT 403. Bob's sentinel text
    after it arrives; then bob's clean file arrives byte-identical, chunk for chunk. The alerts say inbound, bob to
    alice."""
    from tests.peers.sip_peers import MSRP_SESSION, sipsak
    from tests.test_sip_support import FROM_PATH, TO_PATH, chunk, file_chunks

    from imguard.protocols.msrp.framing import MsrpDecoder

    pipeline, data = world
    tag = uuid.uuid4().hex[:6]
    name = f"pulled-{tag}.jpg"
    alice, bob = FROM_PATH, f"msrp://127.0.0.1:{kamailio.msrp_port}/{MSRP_SESSION};tcp"
    clean = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(range(256)) * 16 \
        + b"\xff\xd9"                           # a JPEG, as the file-selector says

    def from_bob(raw: bytes) -> bytes:
        return (raw.replace(f"From-Path: {FROM_PATH}".encode(), f"From-Path: {bob}".encode())
                .replace(f"To-Path: {TO_PATH}".encode(), f"To-Path: {alice}".encode()))

    bad_chunks = [from_bob(raw) for _, raw in file_chunks(EICAR, 40, message_id=f"evil-{tag}", tid_prefix="e")]
    good_chunks = [from_bob(raw) for _, raw in file_chunks(clean, 1000, message_id=f"good-{tag}", tid_prefix="g")]
    sentinel = chunk("s1", f"sentinel {tag}".encode(), to_path=alice, from_path=bob, message_id=f"s-{tag}")

    async def main():
        remote = RemoteParty()
        listener = await asyncio.start_server(remote, "127.0.0.1", kamailio.msrp_port)
        gw, gport = await start_gateway(tmp_path, pipeline, kamailio.port, socks=True)
        try:
            rc, out = await asyncio.to_thread(sipsak, pull_invite(name, f"pull-{tag}"), "127.0.0.1", gport, "tcp")
            assert rc == 0, out
            r, w = await socks5(gw.port_of("socks5"), kamailio.msrp_port)
            w.write(chunk("a0", None, to_path=bob, from_path=alice, message_id=f"open-{tag}"))   # alice binds it
            await remote.wait_for(lambda c: c.get("message-id") == f"open-{tag}", "alice's first SEND")
            inbox = Inbox(r, MsrpDecoder())
            for raw in bad_chunks:
                remote.writer.write(raw)
            report = await remote.wait_for(lambda c: getattr(c, "method", "") == "REPORT", "the REPORT")
            assert report.get("status") == "000 403 Action-not-allowed"
            told = await inbox.until(lambda c: getattr(c, "method", "") == "SEND" and b"imguard" in (c.body or b""),
                                     "alice's notice")
            assert told.body.startswith(f"imguard: the file {name!r} from sip:bob@b.example was blocked (".encode())
            assert told.to_path == [alice] and told.from_path == [bob]
            remote.writer.write(sentinel)
            await inbox.until(lambda c: c.raw == sentinel, "bob's sentinel")
            assert b"X5O!" not in inbox.raw and not any(c.raw in bad_chunks for c in inbox.items)
            start = len(inbox.items)
            for raw in good_chunks:
                remote.writer.write(raw)
            await inbox.until(lambda c: c.raw == good_chunks[-1], "the clean file's last chunk")
            assert [c.raw for c in inbox.items[start:]] == good_chunks      # byte-identical, in order
            w.close()
        finally:
            await gw.stop()
            listener.close()
    run(main())
    [blocked] = [a for a in file_alerts(data, "msrp", sha(EICAR)) if a["file"]["name"] == name]
    assert blocked["imguard"]["decision"]["action"] == "block"
    assert_inbound(blocked, "sip:bob@b.example", "sip:alice@example.com")
    [allowed] = [a for a in file_alerts(data, "msrp", sha(clean)) if a["file"]["name"] == name]
    assert allowed["imguard"]["decision"]["action"] == "allow"
    assert_inbound(allowed, "sip:bob@b.example", "sip:alice@example.com")


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


# --- MSNFTP and OFT through the side relay: offers rewritten to the gateway's relay ports ---------------------
# The real `imguard run` (tests/peers/http_gateway.py runs it, reverse:tcp in front of the scripted server) with
# `--dcc-relay 127.0.0.1 --dcc-relay-ports` (what transparent mode turns on by itself at --listen-host): the
# address in every MSNFTP ACCEPT and OFT proposal crossing it, either way, becomes 127.0.0.1:<relay port>; the
# receiver connects there (straight, no proxy: as a transparent deployment's clients do) and the gateway connects
# on to the real listener.

def free_port_range(n: int = 3) -> tuple[int, int]:
    """n consecutive ports free on loopback, below the ephemeral range."""
    import random

    for _ in range(200):
        first = random.randrange(21000, 32000 - n)
        try:
            socks = []
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return first, first + n - 1
    raise RuntimeError("no free port range")


class RelayGateway:
    """`imguard run` in front of a TranscriptServer with the side relay on; `relay` is the relay port range."""

    def __init__(self, tmp: Path, server_port: int, protocol: str):
        from tests.peers.http_gateway import HttpGateway
        from tests.peers.prosody import wait_for_port

        self.relay = free_port_range()
        self.run = HttpGateway.start(tmp / "imguard", [f"tcp://127.0.0.1:{server_port}"], extra=[
            "--ports", f"{server_port}={protocol}", "--dcc-relay", "127.0.0.1",
            "--dcc-relay-ports", f"{self.relay[0]}-{self.relay[1]}"])
        for port in range(self.relay[0], self.relay[1] + 1):
            wait_for_port(port, TIMEOUT, self.run.process, what="the relay port")
        self.port = self.run.ports[0]

    def relayed(self, ip: str, port: int) -> bool:
        return ip == "127.0.0.1" and self.relay[0] <= port <= self.relay[1]

    def stop(self) -> None:
        self.run.stop()


def accept_address(raw: bytes, cookie: str) -> tuple[str, int, bytes]:
    """(IP-Address, Port, the whole ACCEPT body) of the MSNFTP ACCEPT for `cookie` found in `raw` (MSNP bytes)."""
    from imguard.protocols.msnp import parse_invitation

    for cmd in CommandDecoder().feed(raw):
        if cmd.payload and f"Invitation-Cookie: {cookie}".encode() in cmd.payload and b"IP-Address" in cmd.payload:
            body = cmd.payload.split(b"\r\n\r\n", 1)[1]
            [(ip, port)] = parse_invitation(body).addresses
            return ip, port, body
    raise AssertionError(f"no ACCEPT with an address for cookie {cookie} in {raw[-400:]!r}")


@pytest.mark.parametrize("kind", ["eicar", "clean"])
def test_msnftp_outbound_through_the_side_relay(tmp_path, world, kind):
    """Our client (inside) sends over MSNFTP: its ACCEPT names its own listener; the switchboard gets it rewritten
    to the gateway's relay (no other address), and the outside receiver's straight connection there is carried
    to our client's listener, the file held. EICAR: the receiver gets the cancel block and no byte of it, our client
    an "imguard" message naming the file; the next message (the sentinel) reaches the switchboard. Clean: the
    blocks arrive byte-identical."""
    pipeline, _ = world
    prefix = transcript("msnms_sb2.json")[:3]
    tag = uuid.uuid4().hex[:6]
    name, payload = (f"eicar-{tag}.com", EICAR) if kind == "eicar" else (f"notes-{tag}.txt", b"meeting notes\n" * 400)

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
            listened.append(await reader.readline())       # the gateway's BYE (or nothing: the file was stopped)
            writer.close()
        listener = await asyncio.start_server(sender, "127.0.0.1", 0)
        sender_port = listener.sockets[0].getsockname()[1]
        invitation = msnftp_invitation(name, len(payload), "127.0.0.1", sender_port)
        server = TranscriptServer(prefix + invitation)
        gw = RelayGateway(tmp_path, await server.start(), "msnp")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            await play_client(reader, writer, prefix + invitation)
            await server.wait_for(lambda got: b"AuthCookie: 9911" in got, "the ACCEPT")
            ip, port, body = accept_address(bytes(server.received), "3141")
            assert gw.relayed(ip, port) and port != sender_port, body
            assert b"Internal" not in body and b"PortX" not in body
            r, w = await asyncio.open_connection(ip, port)          # the outside receiver, straight to the relay
            w.write(b"VER MSNFTP\r\n")
            assert await asyncio.wait_for(r.readline(), TIMEOUT) == b"VER MSNFTP\r\n"
            w.write(f"USR {PEER} 9911\r\n".encode())
            assert await asyncio.wait_for(r.readline(), TIMEOUT) == f"FIL {len(payload)}\r\n".encode()
            w.write(b"TFR\r\n")
            inbox = Inbox(reader, CommandDecoder())
            if kind == "eicar":
                assert await read_to_end(r) == b"\x01\x00\x00"          # the cancel block, none of the file
                notice = await inbox.until(lambda c: c.args[:1] == ("imguard",), "the notice")
                assert name.encode() in notice.payload and b"blocked" in notice.payload
            else:
                assert await asyncio.wait_for(r.readexactly(len(blocks(payload))), TIMEOUT) == blocks(payload)
                w.write(b"BYE 16777989\r\n")
            sentinel = text_msg(150, f"sentinel {tag}")
            writer.write(sentinel)
            await server.wait_for(lambda got: got.endswith(sentinel), "the sentinel")
            assert b"EICAR" not in bytes(server.received)
            w.close()
            writer.close()
        finally:
            gw.stop()
            server.close()
            listener.close()
        return gw
    gw = run(main())
    [alert] = [a for a in file_alerts(gw.run.data_dir, "msnftp", sha(payload)) if a["file"]["name"] == name]
    assert alert["imguard"]["decision"]["action"] == ("block" if kind == "eicar" else "allow")
    assert alert["imguard"]["context"]["direction"] == "outbound"


@pytest.mark.parametrize("kind", ["eicar", "clean"])
def test_msnftp_inbound_through_the_side_relay(tmp_path, world, kind):
    """The outside party sends over MSNFTP: its ACCEPT (from the switchboard) names its listener; our client gets it
    rewritten to the relay and connects there straight; the gateway carries it to the outside listener and holds
    the file. EICAR: our client gets the cancel block and a notice, then the sentinel; clean: byte-identical."""
    from tests.test_msnp import msnftp_inbound_invitation

    pipeline, _ = world
    prefix = transcript("msnms_sb2.json")[:3]
    tag = uuid.uuid4().hex[:6]
    name, payload = (f"eicar-{tag}.com", EICAR) if kind == "eicar" else (f"minutes-{tag}.txt", b"minutes\n" * 700)

    async def main():
        sender_saw = []

        async def outside_sender(reader, writer):       # PEER's MSNFTP listener: it sends the file
            assert await reader.readline() == b"VER MSNFTP\r\n"
            writer.write(b"VER MSNFTP\r\n")
            assert await reader.readline() == f"USR {ME} 8822\r\n".encode()
            writer.write(f"FIL {len(payload)}\r\n".encode())
            assert await reader.readline() == b"TFR\r\n"
            writer.write(blocks(payload))
            await writer.drain()
            sender_saw.append(await reader.readline())
            writer.close()
        listener = await asyncio.start_server(outside_sender, "127.0.0.1", 0)
        sender_port = listener.sockets[0].getsockname()[1]
        invitation = msnftp_inbound_invitation(name, len(payload), "127.0.0.1", sender_port)
        sentinel = inbound_text(f"sentinel {tag}")
        reply = text_msg(130, "got it?")
        server = TranscriptServer(prefix + invitation + [(True, reply), (False, sentinel)])
        gw = RelayGateway(tmp_path, await server.start(), "msnp")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            await play_client(reader, writer, prefix + invitation[:2])
            inbox = Inbox(reader, CommandDecoder())
            await inbox.until(lambda c: c.payload and b"AuthCookie: 8822" in c.payload, "the ACCEPT")
            ip, port, body = accept_address(bytes(inbox.raw), "2718")
            assert gw.relayed(ip, port) and port != sender_port, body
            r, w = await asyncio.open_connection(ip, port)          # our client, straight to the relay
            w.write(b"VER MSNFTP\r\n")
            assert await asyncio.wait_for(r.readline(), TIMEOUT) == b"VER MSNFTP\r\n"
            w.write(f"USR {ME} 8822\r\n".encode())
            assert await asyncio.wait_for(r.readline(), TIMEOUT) == f"FIL {len(payload)}\r\n".encode()
            w.write(b"TFR\r\n")
            got = await read_to_end(r)
            if kind == "eicar":
                assert got == b"\x01\x00\x00", got[:40]
                notice = await inbox.until(lambda c: c.args[:1] == ("imguard",), "the notice")
                assert f"imguard: the file {name!r} from {PEER} was blocked (".encode() in notice.payload
            else:
                assert got == blocks(payload)
            writer.write(reply)
            await inbox.until(lambda c: c.raw == sentinel, "the sentinel")
            assert b"EICAR" not in inbox.raw
            assert sender_saw == [b"BYE 16777989\r\n"]
            w.close()
            writer.close()
        finally:
            gw.stop()
            server.close()
            listener.close()
        return gw
    gw = run(main())
    [alert] = [a for a in file_alerts(gw.run.data_dir, "msnftp", sha(payload)) if a["file"]["name"] == name]
    assert alert["imguard"]["decision"]["action"] == ("block" if kind == "eicar" else "allow")
    assert_inbound(alert, PEER, ME)


def proposal_address(frame_bytes: bytes) -> tuple[str, int, dict]:
    """(client IP, port, TLVs) of the SendFile proposal in the ICBM FLAPs `frame_bytes`, read with struct only."""
    for flap in FlapDecoder().feed(frame_bytes):
        data = flap.data
        if len(data) < 10 or data[:4] not in (b"\x00\x04\x00\x06", b"\x00\x04\x00\x07"):
            continue
        at = 10 + 8
        if struct.unpack_from(">H", data, at)[0] != 2:
            continue
        at += 2
        at += 1 + data[at]                                          # screen name
        if data[:4] == b"\x00\x04\x00\x07":                     # incoming: warning level, user info TLVs
            count = struct.unpack_from(">H", data, at + 2)[0]
            at += 4
            for _ in range(count):
                at += 4 + struct.unpack_from(">H", data, at + 2)[0]
        tlvs = {}
        while at + 4 <= len(data):
            t, n = struct.unpack_from(">HH", data, at)
            tlvs[t] = data[at + 4:at + 4 + n]
            at += 4 + n
        rv = tlvs[0x0005]
        inner, at = {}, 26
        while at + 4 <= len(rv):
            t, n = struct.unpack_from(">HH", rv, at)
            inner[t] = rv[at + 4:at + 4 + n]
            at += 4 + n
        return ".".join(str(b) for b in inner[0x0003]), struct.unpack(">H", inner[0x0005])[0], inner
    raise AssertionError("no SendFile proposal")


@pytest.mark.parametrize("kind", ["eicar", "clean"])
def test_oft_outbound_through_the_side_relay(tmp_path, world, kind):
    """Our client (inside) sends over OFT: its SendFile proposal names its listener; the BOS server gets it with the
    client IP, port and their check TLVs rewritten to the relay, and the outside receiver's straight connection
    there is carried to our client's listener, the file held. EICAR: the receiver gets the prompt and no byte of the
    file, our client an ICBM from "imguard" naming it, and our client's next ICBM (the sentinel) reaches the server.
    Clean: byte-identical."""
    pipeline, _ = world
    prefix, c = bos_prefix()
    tag = uuid.uuid4().hex[:6]
    name, payload = (f"eicar-{tag}.com", EICAR) if kind == "eicar" else (f"agenda-{tag}.txt", b"agenda\n" * 900)

    async def main():
        sender_saw = []
        listener = await asyncio.start_server(oft_sender(name, payload, sender_saw), "127.0.0.1", 0)
        sender_port = listener.sockets[0].getsockname()[1]
        server = TranscriptServer(prefix)
        gw = RelayGateway(tmp_path, await server.start(), "oscar")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            await play_client(reader, writer, prefix)
            proposal = c.snac(0x04, 0x06, sendfile_proposal(ip=b"\x7f\x00\x00\x01", port=sender_port,
                                                            name=name.encode(), size=len(payload)))
            writer.write(proposal)
            sent = len(client_bytes(prefix))
            await server.wait_for(lambda got: len(got) >= sent + len(proposal), "the proposal")
            ip, port, rv = proposal_address(bytes(server.received)[sent:])
            assert gw.relayed(ip, port) and port != sender_port
            assert rv[0x0016] == bytes(b ^ 0xFF for b in rv[0x0003])
            assert struct.unpack(">H", rv[0x0017])[0] == port ^ 0xFFFF
            r, w = await asyncio.open_connection(ip, port)          # the outside receiver, straight to the relay
            prompt = await asyncio.wait_for(r.readexactly(256), TIMEOUT)
            w.write(parse_oft(prompt).with_type(0x0202))
            got = await read_to_end(r)
            inbox = Inbox(reader, FlapDecoder())
            if kind == "eicar":
                assert got == b"", got[:40]
                await inbox.until(lambda f: b"imguard" in f.data and name.encode() in f.data, "the notice")
            else:
                assert got == payload
            sentinel = c.snac(0x04, 0x06, outgoing_im(b"CCCCCCC8", PEER, f"sentinel {tag}"))
            writer.write(sentinel)
            await server.wait_for(lambda got: got.endswith(sentinel[6:]), "the sentinel")
            assert b"EICAR" not in bytes(server.received)
            assert sender_saw and parse_oft(sender_saw[0]).type == 0x0204
            w.close()
            writer.close()
        finally:
            gw.stop()
            server.close()
            listener.close()
        return gw
    gw = run(main())
    [alert] = [a for a in file_alerts(gw.run.data_dir, "oft", sha(payload)) if a["file"]["name"] == name]
    assert alert["imguard"]["decision"]["action"] == ("block" if kind == "eicar" else "allow")
    assert alert["imguard"]["context"]["direction"] == "outbound"


@pytest.mark.parametrize("kind", ["eicar", "clean"])
def test_oft_inbound_through_the_side_relay(tmp_path, world, kind):
    """The outside party sends over OFT: the proposal from the BOS server names its listener; our client gets it
    rewritten to the relay and connects there straight; the gateway carries it to the outside listener and holds
    the file. EICAR: our client gets no byte of it, a notice, then the sentinel; clean: byte-identical."""
    from tests.test_oscar import PEER as AIM_PEER, incoming_im, incoming_sendfile_proposal

    pipeline, _ = world
    prefix, c, s = bos_prefix_inbound()
    tag = uuid.uuid4().hex[:6]
    name, payload = (f"eicar-{tag}.com", EICAR) if kind == "eicar" else (f"agenda-{tag}.txt", b"agenda\n" * 900)

    async def main():
        sender_saw = []
        listener = await asyncio.start_server(oft_sender(name, payload, sender_saw), "127.0.0.1", 0)
        sender_port = listener.sockets[0].getsockname()[1]
        proposal = s.snac(0x04, 0x07, incoming_sendfile_proposal(ip=b"\x7f\x00\x00\x01", port=sender_port,
                                                                 name=name.encode(), size=len(payload)))
        reply = c.snac(0x04, 0x06, outgoing_im(b"CCCCCCC9", AIM_PEER, "thanks"))
        sentinel = s.snac(0x04, 0x07, incoming_im(b"BBBBBBB9", AIM_PEER, f"sentinel {tag}"))
        server = TranscriptServer(prefix + [(False, proposal), (True, reply), (False, sentinel)])
        gw = RelayGateway(tmp_path, await server.start(), "oscar")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            await play_client(reader, writer, prefix)
            inbox = Inbox(reader, FlapDecoder())
            got_proposal = await inbox.until(lambda f: f.raw[6:16] == proposal[6:16] and len(f.raw) == len(proposal),
                                             "the proposal")
            ip, port, rv = proposal_address(got_proposal.raw)
            assert gw.relayed(ip, port) and port != sender_port
            r, w = await asyncio.open_connection(ip, port)          # our client, straight to the relay
            prompt = await asyncio.wait_for(r.readexactly(256), TIMEOUT)
            w.write(parse_oft(prompt).with_type(0x0202))
            got = await read_to_end(r)
            if kind == "eicar":
                assert got == b"", got[:40]
                notice = await inbox.until(lambda f: b"\x07imguard" in f.data and name.encode() in f.data,
                                           "the notice")
                assert f"imguard: the file {name!r} from {AIM_PEER} was blocked (".encode() in notice.data
            else:
                assert got == payload
            writer.write(reply)
            await inbox.until(lambda f: f.raw[6:] == sentinel[6:], "the sentinel")
            assert b"EICAR" not in inbox.raw
            assert sender_saw and parse_oft(sender_saw[0]).type == 0x0204
            w.close()
            writer.close()
        finally:
            gw.stop()
            server.close()
            listener.close()
        return gw
    gw = run(main())
    [alert] = [a for a in file_alerts(gw.run.data_dir, "oft", sha(payload)) if a["file"]["name"] == name]
    assert alert["imguard"]["decision"]["action"] == ("block" if kind == "eicar" else "allow")
    assert_inbound(alert, AIM_PEER, "Alice1970")


# --- MSNFTP through the relay across a real perimeter (tests/test_inline_netns.py runs these in namespaces) -----

def _msnftp_file(spec: dict) -> tuple[str, bytes]:
    return ((f"eicar-{spec['tag']}.com", EICAR) if spec["kind"] == "eicar"
            else (f"minutes-{spec['tag']}.txt", b"minutes\n" * 700))


def _msnftp_outside_items(spec: dict) -> tuple[list, bytes, bytes]:
    from tests.test_msnp import msnftp_inbound_invitation

    name, payload = _msnftp_file(spec)
    invitation = msnftp_inbound_invitation(name, len(payload), spec["host"], spec["ftp_port"])
    return (transcript("msnms_sb2.json")[:3] + invitation, text_msg(130, "got it?"),
            inbound_text(f"sentinel {spec['tag']}"))


async def msnftp_outside_party(spec: dict) -> None:
    """The outside party (server side): the switchboard at host:port offering our client a file over MSNFTP, and
    its MSNFTP listener at host:ftp_port that sends it. Serves until killed."""
    name, payload = _msnftp_file(spec)
    items, reply, sentinel = _msnftp_outside_items(spec)
    switchboard = TranscriptServer(items + [(True, reply), (False, sentinel)])

    async def sender(reader, writer):
        try:
            assert await reader.readline() == b"VER MSNFTP\r\n"
            writer.write(b"VER MSNFTP\r\n")
            assert await reader.readline() == f"USR {ME} 8822\r\n".encode()
            writer.write(f"FIL {len(payload)}\r\n".encode())
            assert await reader.readline() == b"TFR\r\n"
            writer.write(blocks(payload))
            await writer.drain()
            await reader.readline()
        finally:
            writer.close()
    sb = await asyncio.start_server(switchboard.handle, spec["host"], spec["port"])
    ftp = await asyncio.start_server(sender, spec["host"], spec["ftp_port"])
    print("listening", flush=True)
    async with sb, ftp:
        await asyncio.gather(sb.serve_forever(), ftp.serve_forever())


async def msnftp_inside_receiver(spec: dict) -> dict:
    """Our client (inside): joins the switchboard, accepts the file, reads the ACCEPT as it arrives (the address
    it names), connects there, receives; then replies and waits for the sentinel. Returns what it saw."""
    name, payload = _msnftp_file(spec)
    items, reply, sentinel = _msnftp_outside_items(spec)
    out: dict = {"name": name, "sent_sha256": sha(blocks(payload))}
    reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
    try:
        await play_client(reader, writer, items[:-1])
        inbox = Inbox(reader, CommandDecoder())
        await inbox.until(lambda c: c.payload and b"AuthCookie: 8822" in c.payload, "the ACCEPT")
        ip, port, _ = accept_address(bytes(inbox.raw), "2718")
        out["accept_address"] = [ip, port]
        r, w = await asyncio.open_connection(ip, port)
        w.write(b"VER MSNFTP\r\n")
        await asyncio.wait_for(r.readline(), TIMEOUT)
        w.write(f"USR {ME} 8822\r\n".encode())
        out["fil"] = (await asyncio.wait_for(r.readline(), TIMEOUT)).decode()
        w.write(b"TFR\r\n")
        got = await read_to_end(r)
        out["received_sha256"], out["received_head"] = sha(got), got[:8].hex()
        if spec["kind"] == "eicar":
            notice = await inbox.until(lambda c: c.args[:1] == ("imguard",), "the notice")
            out["notice"] = notice.payload.decode(errors="replace")
        writer.write(reply)
        await inbox.until(lambda c: c.raw == sentinel, "the sentinel")
        out["sentinel_arrived"] = True
        out["eicar_reached_client"] = b"EICAR" in inbox.raw or b"EICAR" in got
        w.close()
    finally:
        writer.close()
    return out


def _msnftp_inside_items(spec: dict) -> list:
    name, payload = _msnftp_file(spec)
    return transcript("msnms_sb2.json")[:3] + msnftp_invitation(name, len(payload), spec["client_host"],
                                                                spec["ftp_port"])


async def msnftp_outside_receiver(spec: dict) -> None:
    """The outside party (server side) receiving our client's file: the switchboard at host:port; when our client's
    ACCEPT arrives (as the gateway rewrote it) it connects to the address it names as the MSNFTP receiver, then
    waits for the sentinel message. What it saw goes to spec["result"] (JSON); then it exits."""
    name, payload = _msnftp_file(spec)
    items = _msnftp_inside_items(spec)
    switchboard = TranscriptServer(items)
    sb = await asyncio.start_server(switchboard.handle, spec["host"], spec["port"])
    print("listening", flush=True)
    out: dict = {"name": name, "sent_sha256": sha(blocks(payload))}
    async with sb:
        await switchboard.wait_for(lambda got: b"AuthCookie: 9911" in got, "the ACCEPT")
        ip, port, body = accept_address(bytes(switchboard.received), "3141")
        out["accept_address"], out["accept_body"] = [ip, port], body.decode(errors="replace")
        r, w = await asyncio.open_connection(ip, port)
        w.write(b"VER MSNFTP\r\n")
        await asyncio.wait_for(r.readline(), TIMEOUT)
        w.write(f"USR {PEER} 9911\r\n".encode())
        out["fil"] = (await asyncio.wait_for(r.readline(), TIMEOUT)).decode()
        w.write(b"TFR\r\n")
        got = b""
        if spec["kind"] == "eicar":
            got = await read_to_end(r)
        else:
            got = await asyncio.wait_for(r.readexactly(len(blocks(payload))), TIMEOUT)
            w.write(b"BYE 16777989\r\n")
        out["received_sha256"], out["received_head"] = sha(got), got[:8].hex()
        sentinel = f"sentinel {spec['tag']}".encode()
        await switchboard.wait_for(lambda got: sentinel in got, "the sentinel")
        out["sentinel_arrived"] = True
        out["eicar_reached_server"] = b"EICAR" in bytes(switchboard.received) or b"EICAR" in got
        w.close()
    Path(spec["result"]).write_text(json.dumps(out))


async def msnftp_inside_sender(spec: dict) -> dict:
    """Our client (inside) sending a file over MSNFTP: its listener at client_host:ftp_port, the invitation and its
    ACCEPT naming that listener; then (EICAR) the notice, or (clean) the gateway's BYE; then the sentinel."""
    name, payload = _msnftp_file(spec)
    items = _msnftp_inside_items(spec)
    done = asyncio.Event()
    out: dict = {}

    async def sender(reader, writer):
        try:
            await reader.readline()
            writer.write(b"VER MSNFTP\r\n")
            await reader.readline()
            writer.write(f"FIL {len(payload)}\r\n".encode())
            await reader.readline()
            writer.write(blocks(payload))
            await writer.drain()
            out["listener_got"] = (await reader.readline()).decode()
        finally:
            writer.close()
            done.set()
    listener = await asyncio.start_server(sender, spec["client_host"], spec["ftp_port"])
    reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
    try:
        await play_client(reader, writer, items)
        if spec["kind"] == "eicar":
            notice = await Inbox(reader, CommandDecoder()).until(lambda c: c.args[:1] == ("imguard",), "the notice")
            out["notice"] = notice.payload.decode(errors="replace")
        await asyncio.wait_for(done.wait(), TIMEOUT)
        writer.write(text_msg(150, f"sentinel {spec['tag']}"))
        await writer.drain()            # the outside party waits for it
    finally:
        writer.close()
        listener.close()
    return out


if __name__ == "__main__":
    import sys

    _spec = json.loads(sys.argv[2])
    if sys.argv[1] == "msnftp-outside-party":
        asyncio.run(msnftp_outside_party(_spec))
    elif sys.argv[1] == "msnftp-inside-receiver":
        print(json.dumps(asyncio.run(msnftp_inside_receiver(_spec))))
    elif sys.argv[1] == "msnftp-outside-receiver":
        asyncio.run(msnftp_outside_receiver(_spec))
    elif sys.argv[1] == "msnftp-inside-sender":
        print(json.dumps(asyncio.run(msnftp_inside_sender(_spec))))
    else:
        raise SystemExit(f"unknown helper {sys.argv[1]}")
