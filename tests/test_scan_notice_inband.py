"""Large files are not silent, in-band too: a file carried inside the chat connection itself (XMPP IBB) whose scan
takes longer than scan_notice_after_seconds is announced ("being scanned") to the person of ours who waits for it,
in that very connection, before its verdict; a quick one is not.

The connection that carries an in-band file is the one the gateway pauses while the file is inspected, so its
notice cannot wait in line like a notice from another connection: the tracker hands it out addressed to that
connection (HeldTransfer.in_band_scanning_notices, for mechanisms that opt in), and the SessionLayer tells it when
its wakeup comes while it is still paused (gateway/layer.py `_scanning_timer`), never after the verdict.

XMPP IBB end to end with real parts: slixmpp clients, a real Prosody, the real `imguard run`, one party inside
(through the gateway, on its STARTTLS and its direct-TLS listener) and one outside (straight to Prosody), both ways
round. MSNSLP in the switchboard and Sametime file channels through the embedded gateway (`imguard run`'s
Gateway) in front of the scripted servers of tests/test_legacy_gateway.py and tests/test_sametime*.py (no MSN or
Sametime server is packaged), both ways round. The scan is slowed by a real YARA rule in the gateway's signatures
that walks every byte of a file over 256 KB many times (and matches none), so a 900 kB file takes seconds and a
15 kB one milliseconds. "Before the verdict" is checked at the receiver: when the notice arrives, the receiver has
none of the file (the gateway holds every piece until the verdict); "once" after a sentinel.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest

from imguard.files.tracker import HeldTransfer
from imguard.model import FROM_CLIENT, FROM_SERVER, ChatContext
from imguard.protocols.base import InspectFile
from imguard.protocols.msnp import CommandDecoder, P2PHeader
from imguard.protocols.sametime import decoder as st
from tests.peers.conversation_rules import (payload, serving, slow_scan_extra, slow_signatures, slow_yara_rule,
                                           watched)
from tests.peers.gateway import Gateway, alert_names_file
from tests.xmpp_clients import DIRECT_TLS, STARTTLS, sha256

from test_e2e_xmpp import INBOUND, OUTBOUND, Crossing, Outside, Route, run, sentinel_after
from test_legacy_gateway import (ROOT, Inbox, TranscriptServer, assert_inbound, client_bytes, inbound_text,
                                 play_client, slp_file_in)
from test_legacy_gateway import alerts as legacy_alerts
from test_legacy_gateway import run as legacy_run
from test_msnp import ME, PEER, data_chunks, p2p_msg, slp_chunks, slp_invite, text_msg, transcript
from test_sametime import create as st_create
from test_sametime import logged_in as st_logged_in
from test_sametime_files import accept as st_accept
from test_sametime_files import chunk as st_chunk
from test_sametime_files import offer as st_offer

pytestmark = pytest.mark.timeout(180)

NOTICE_AFTER = 0.3          # seconds: the gateway's --scan-notice-after-seconds here
BEING_SCANNED = "is being scanned"
SLOW_RULE = slow_yara_rule("imguard_test_slow_inband_scan", "tests/test_scan_notice_inband.py", 24)
BIG = 900_000
SMALL = 15_000
BLOCK = 8192                # IBB block size: slixmpp accepts at most 8 KiB (its max_block_size)


# --- the tracker, without the network ----------------------------------------------------------------------

def held(origin: str, in_band: bool) -> HeldTransfer:
    ctx = ChatContext(protocol="xmpp", sender="alice@example.org", recipients=("bob@example.org/pc",), origin=origin,
                      connection_id="xmpp-1")
    return HeldTransfer("ibb:s1", ctx, sender_is_client=origin == FROM_CLIENT, kind="ibb", max_bytes=1 << 20,
                        name="big.bin", scan_notice_in_band=in_band)


@pytest.mark.parametrize("origin, words", [(FROM_CLIENT, "to bob@example.org/pc"),
                                           (FROM_SERVER, "from alice@example.org")])
def test_an_in_band_file_carries_a_notice_for_its_own_connection(origin, words):
    """Outbound: the inside sender, inbound: the inside receiver, both the client of the connection that holds the
    file: one Notify addressed to that connection, in that party's words; the mechanism's tell hook is not called
    (a notice built there would change session state for a notice mostly never sent)."""
    transfer = held(origin, in_band=True)
    transfer.append(b"x" * 10)
    (cmd,) = transfer.inspect()
    assert isinstance(cmd, InspectFile)
    (notice,) = cmd.slow_notices
    assert (notice.connection_id, notice.protocol) == ("xmpp-1", "xmpp")
    assert BEING_SCANNED in notice.text and "big.bin" in notice.text and words in notice.text


def test_an_http_like_file_that_does_not_opt_in_carries_none():
    """A file multiplexed with a connection whose client cannot be told mid-transfer (an HTTP upload: the client
    waits for its response) carries no notice."""
    transfer = held(FROM_CLIENT, in_band=False)
    transfer.append(b"x" * 10)
    (cmd,) = transfer.inspect()
    assert cmd.slow_notices == ()


# --- end to end: Prosody, slixmpp, `imguard run` -------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory, prosody):
    """`imguard run` in front of Prosody with the bundled signatures plus the slow test rule, and
    --scan-notice-after-seconds NOTICE_AFTER."""
    directory = tmp_path_factory.mktemp("imguard-slow-inband")
    extra = slow_scan_extra(directory, "zz_test_slow_inband.yar", SLOW_RULE, NOTICE_AFTER)
    yield from serving(Gateway.start(directory / "gw", prosody, extra=extra))


@pytest.fixture(params=[(INBOUND, STARTTLS), (OUTBOUND, STARTTLS), (INBOUND, DIRECT_TLS), (OUTBOUND, DIRECT_TLS)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def crossing(request, prosody, slow_gateway):
    """Both ways round, the inside party on either of the gateway's XMPP listeners (STARTTLS: the session's layer
    under TLS layers it pushed itself; direct TLS: under mitmproxy's)."""
    direction, mode = request.param
    yield from watched(slow_gateway, Crossing(direction, Route("imguard", mode, prosody, slow_gateway),
                                              Outside(prosody)))


def from_imguard(client, domain: str) -> list[str]:
    """The chat messages a client got from the server's domain: imguard's notices (no person writes from there)."""
    return [m["body"] for m in client.received.messages if str(m["from"]) == domain and m["type"] != "error"]


def received_bytes(client) -> int:
    return sum(len(b) for b in client.received.ibb.values())


def test_a_slow_ibb_file_is_announced_to_the_inside_party_before_its_verdict(crossing):
    """A 900 kB file by IBB between outside and inside: the inside party (outbound: the sender, inbound: the
    receiver) gets one chat message from the server's domain saying it is being scanned, while the receiver still
    has none of it; the outside party gets nothing from imguard; then the file arrives byte-identical and is
    recorded as allowed after a scan longer than the setting, and the notice is recorded."""
    route = crossing.route

    async def scenario():
        async with crossing.client("alice") as alice, crossing.client("bob") as bob:
            inside, outside = (bob, alice) if crossing.direction == INBOUND else (alice, bob)
            domain = crossing.bare("alice").split("@", 1)[1]
            data = payload(BIG)
            name = f"big-{crossing.direction}-{uuid.uuid4().hex[:6]}.bin"
            sending = asyncio.create_task(alice.ibb_send(bob.jid, data, name=name, block_size=BLOCK, timeout=60))

            def told(_received):
                return [b for b in from_imguard(inside, domain) if BEING_SCANNED in b and name in b]
            assert await inside.wait_for(told, timeout=60), (
                f"{inside.xmpp.boundjid} was not told that {name} is being scanned: {inside.bodies()}, "
                f"sender {sending.done() and sending.result()}\n{route.gateway.logs()}")
            assert received_bytes(bob) == 0, f"bob had {received_bytes(bob)} bytes when told: not before the verdict"
            result = await sending
            assert not result.error, f"the sender failed: {result.error} {result.error_text}"
            assert await bob.wait_for(lambda r: result.sid in r.ibb_closed, timeout=30), "the stream did not end"
            assert sha256(bytes(bob.received.ibb.get(result.sid, b""))) == sha256(data), (
                f"bob got {len(bob.received.ibb.get(result.sid, b''))} of {len(data)} bytes")
            alert = await route.wait_alert(lambda e: alert_names_file(e, name)
                                           and e["event"].get("dataset") == "imguard.file"
                                           and e["event"]["action"] in ("allow", "alert"))
            assert alert, f"no allowed file event for {name}"
            assert alert["event"]["duration"] > NOTICE_AFTER * 1e9, "the scan was not slow: the test proves nothing"
            notify = await route.wait_alert(lambda e: e["event"].get("action") == "notify" and name in e["message"]
                                            and BEING_SCANNED in e["imguard"]["notify"]["text"])
            assert notify, "the notice was not recorded"
            assert notify["imguard"]["context"]["direction"] == crossing.direction
            await sentinel_after(alice, bob, "after the slow file")
            assert not from_imguard(outside, domain), f"the outside party was told: {from_imguard(outside, domain)}"
            assert len(told(None)) == 1, f"told more than once: {told(None)}"
    run(scenario())


def test_a_quick_ibb_file_is_not_announced(crossing):
    """A 15 kB file scans in milliseconds: it arrives, and nobody is told anything (checked after a sentinel)."""
    route = crossing.route

    async def scenario():
        async with crossing.client("alice") as alice, crossing.client("bob") as bob:
            domain = crossing.bare("alice").split("@", 1)[1]
            data = payload(SMALL)
            name = f"small-{crossing.direction}-{uuid.uuid4().hex[:6]}.bin"
            result = await alice.ibb_send(bob.jid, data, name=name, block_size=BLOCK)
            assert not result.error, f"the sender failed: {result.error} {result.error_text}"
            assert await bob.wait_for(lambda r: result.sid in r.ibb_closed, timeout=30), "the stream did not end"
            assert sha256(bytes(bob.received.ibb.get(result.sid, b""))) == sha256(data)
            alert = await route.wait_alert(lambda e: alert_names_file(e, name)
                                           and e["event"].get("dataset") == "imguard.file"
                                           and e["event"]["action"] in ("allow", "alert"))
            assert alert and alert["event"]["duration"] < NOTICE_AFTER * 1e9, alert and alert["event"]
            await sentinel_after(alice, bob, "after the quick file")
            assert not from_imguard(alice, domain) and not from_imguard(bob, domain), (
                f"someone was told about a quick file: {from_imguard(alice, domain)} {from_imguard(bob, domain)}")
    run(scenario())


# --- MSNSLP (MSN P2P) in the switchboard: the embedded gateway, scripted switchboard transcripts ---------------

@pytest.fixture(scope="module")
def slow_world(tmp_path_factory):
    """(pipeline, data dir): the bundled rules plus the test rules, the bundled signatures plus the slow rule."""
    from imguard.runtime import build_pipeline

    rules = tmp_path_factory.mktemp("rules")
    for source in (ROOT / "rules", ROOT / "tests" / "data" / "rules"):
        for path in source.glob("*.yaml"):
            shutil.copy(path, rules / path.name)
    signatures = slow_signatures(tmp_path_factory.mktemp("signatures"), "zz_test_slow_inband.yar", SLOW_RULE)
    data = tmp_path_factory.mktemp("data")
    return build_pipeline(rules, signatures, data), data


async def slow_switchboard(tmp: Path, pipeline, items):
    """The scripted switchboard (`items`), the embedded gateway in front of it in reverse:tcp mode with
    scan_notice_after_seconds NOTICE_AFTER, and our client's connection to the gateway."""
    from imguard.gateway.master import Gateway as EmbeddedGateway
    from imguard.gateway.settings import GatewaySettings

    server = TranscriptServer(items)
    port = await server.start()
    gw = EmbeddedGateway(GatewaySettings(mode=[f"reverse:tcp://127.0.0.1:{port}@127.0.0.1:0"], listen_host="127.0.0.1",
                                         scan_notice_after_seconds=NOTICE_AFTER), pipeline, data_dir=tmp / "gateway")
    await gw.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port_of("reverse"))
    return server, gw, reader, writer


def being_scanned(name: str):
    return lambda c: c.args[:1] == ("imguard",) and BEING_SCANNED.encode() in (c.payload or b"") \
        and name.encode() in (c.payload or b"")


def slow_file_alerts(data: Path, name: str) -> tuple[dict | None, dict | None]:
    """The file's decision event and its "being scanned" notify event."""
    events = legacy_alerts(data)
    decided = next((a for a in events if a.get("file", {}).get("name") == name
                    and a["event"].get("dataset") == "imguard.file" and a["event"]["action"] != "notify"), None)
    told = next((a for a in events if a["event"].get("action") == "notify"
                 and BEING_SCANNED in a["imguard"]["notify"]["text"] and name in a["message"]), None)
    return decided, told


def slow_and_told(data: Path, name: str) -> dict:
    """The file's decision event, after a scan slower than the setting; its notice was recorded."""
    decided, told = slow_file_alerts(data, name)
    assert decided and decided["event"]["action"] in ("allow", "alert"), decided
    assert decided["event"]["duration"] > NOTICE_AFTER * 1e9, "the scan was not slow: the test proves nothing"
    assert told, "the notice was not recorded"
    return decided


def test_a_slow_msnslp_file_of_our_sender_is_announced_before_it_reaches_the_switchboard(tmp_path, slow_world):
    """Outbound: our client sends a 900 kB file by MSNSLP in the switchboard. The gateway ACKs its chunks and holds
    them; our client gets one message from "imguard" saying the file is being scanned while the switchboard still
    has none of its chunks; then every chunk reaches the switchboard byte-identical, in order."""
    pipeline, data = slow_world
    prefix = transcript("msnms_sb2.json")[:3]
    name = f"big-out-{uuid.uuid4().hex[:6]}.bin"
    big = payload(BIG)
    invite = [(True, p2p_msg(200 + i, h, c, 0)) for i, (h, c) in enumerate(slp_chunks(slp_invite(name, len(big)), 77))]
    ok = b"MSNSLP/1.0 200 OK\r\nTo: <msnmsgr:" + ME.encode() + b">\r\n\r\n\x00"
    accepted = [(False, p2p_msg(0, P2PHeader(0, 78, 0, len(ok), len(ok), 0), ok, 0, ME, inbound=True))]
    chunks = [p2p_msg(300 + i, h, c, 2) for i, (h, c) in enumerate(data_chunks(big))]
    sentinel, back = text_msg(5000, f"sentinel {uuid.uuid4().hex[:6]}"), inbound_text(f"back {uuid.uuid4().hex[:6]}")
    before = client_bytes(prefix + invite)

    async def main():
        server, gw, reader, writer = await slow_switchboard(
            tmp_path, pipeline, prefix + invite + accepted + [(True, m) for m in chunks] + [(True, sentinel),
                                                                                              (False, back)])
        try:
            await play_client(reader, writer, prefix + invite + accepted)
            for m in chunks:
                writer.write(m)
            await writer.drain()
            inbox = Inbox(reader, CommandDecoder())
            await inbox.until(being_scanned(name), "the being-scanned notice")
            assert bytes(server.received) == before, "the switchboard had chunks of the file at the notice"
            await server.wait_for(lambda got: len(got) >= len(before) + sum(map(len, chunks)), "the file")
            assert bytes(server.received) == before + b"".join(chunks)
            writer.write(sentinel)
            await inbox.until(lambda c: c.raw == back, "the switchboard's answer to the sentinel")
            assert len([c for c in inbox.items if being_scanned(name)(c)]) == 1, "told more than once"
            writer.close()
        finally:
            await gw.stop()
            server.close()
    legacy_run(main())
    decided = slow_and_told(data, name)
    assert decided["imguard"]["context"]["direction"] == "outbound"


def test_a_slow_msnslp_file_to_our_receiver_is_announced_before_any_chunk(tmp_path, slow_world):
    """Inbound: the switchboard delivers PEER's 900 kB file to our client. The gateway holds the chunks; our client
    gets one message from "imguard" saying the file from PEER is being scanned before any chunk of it, then every
    chunk byte-identical and in order."""
    pipeline, data = slow_world
    prefix = transcript("msnms_sb2.json")[:3]
    name = f"big-in-{uuid.uuid4().hex[:6]}.bin"
    big = payload(BIG)
    invite, ok, chunks = slp_file_in(name, big, 5201, 81)
    reply, sentinel = text_msg(120, "got it?"), inbound_text(f"sentinel {uuid.uuid4().hex[:6]}")
    items = (prefix + [(False, m) for m in invite] + [(True, ok)] + [(False, m) for m in chunks]
             + [(True, reply), (False, sentinel)])

    async def main():
        server, gw, reader, writer = await slow_switchboard(tmp_path, pipeline, items)
        try:
            await play_client(reader, writer, prefix)
            inbox = Inbox(reader, CommandDecoder())
            for m in invite:
                await inbox.until(lambda c, m=m: c.raw == m, "the INVITE")
            writer.write(ok)
            notice = await inbox.until(being_scanned(name), "the being-scanned notice")
            assert f"from {PEER}".encode() in notice.payload, notice.payload
            assert not any(c.raw in chunks for c in inbox.items), "a chunk of the file arrived before the notice"
            await inbox.until(lambda c: c.raw == chunks[-1], "the file's last chunk")
            assert [c.raw for c in inbox.items if c.raw in chunks] == chunks      # byte-identical, in order
            writer.write(reply)
            await inbox.until(lambda c: c.raw == sentinel, "the sentinel")
            assert len([c for c in inbox.items if being_scanned(name)(c)]) == 1, "told more than once"
            writer.close()
        finally:
            await gw.stop()
            server.close()
    legacy_run(main())
    decided = slow_and_told(data, name)
    assert_inbound(decided, PEER, ME)


# --- Sametime file channels: the embedded gateway, a scripted community server --------------------------------

async def slow_community(tmp: Path, pipeline, items):
    """The scripted Sametime community server (`items`), the embedded gateway in front of it (its port mapped to
    sametime), scan_notice_after_seconds NOTICE_AFTER, and our client's connection to the gateway."""
    from imguard.gateway.master import Gateway as EmbeddedGateway
    from imguard.gateway.settings import GatewaySettings

    server = TranscriptServer(items)
    port = await server.start()
    gw = EmbeddedGateway(GatewaySettings(mode=[f"reverse:tcp://127.0.0.1:{port}@127.0.0.1:0"], listen_host="127.0.0.1",
                                         ports=[f"{port}=sametime"], scan_notice_after_seconds=NOTICE_AFTER),
                         pipeline, data_dir=tmp / "gateway")
    await gw.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port_of("reverse"))
    return server, gw, reader, writer


def sametime_told(name: str):
    """An IM from the gateway saying the file `name` is being scanned."""
    def match(item) -> bool:
        if not isinstance(item, st.Message) or item.type != st.CHANNEL_SEND:
            return False
        send_type, data = st.read_send(item.body)
        im = st.read_im(data) if send_type == st.IM_MESSAGE else None
        return im is not None and BEING_SCANNED in im.text and name in im.text
    return match


@pytest.mark.parametrize("direction", [OUTBOUND, INBOUND])
def test_a_slow_sametime_file_is_announced_to_our_user_before_its_verdict(tmp_path, slow_world, direction):
    """A 900 kB file on a Sametime file-transfer channel, our client (alice) sending it or receiving it from bob,
    with an IM channel open between them: the gateway answers the sender's chunks and holds them; alice gets one IM
    saying the file is being scanned while the receiver still has none of its chunks; then every chunk arrives
    byte-identical and in order."""
    pipeline, data = slow_world
    name = f"big-{direction}-{uuid.uuid4().hex[:6]}.bin"
    big = payload(BIG)
    pieces = [big[i:i + 8192] for i in range(0, len(big), 8192)]        # Finch's chunk size
    im = [(True, st_create(4, st.SERVICE_IM, target="bob"))]
    if direction == OUTBOUND:
        channel, to_server = 5, True
        opening = [(True, st_offer(5, name, len(big))), (False, st_accept(5))]
    else:
        channel, to_server = 0x80000100, False
        opening = [(False, st_offer(channel, name, len(big), creator="bob")), (True, st_accept(channel))]
    chunks = [st_chunk(channel, p) for p in pieces]
    items = st_logged_in() + im + opening + [(to_server, c) for c in chunks]

    async def main():
        server, gw, reader, writer = await slow_community(tmp_path, pipeline, items)
        try:
            await play_client(reader, writer, [(fc, d) for fc, d in st_logged_in() + im + opening if fc])
            inbox = Inbox(reader, st.FrameDecoder())
            before = client_bytes(st_logged_in() + im + opening)
            if to_server:
                for c in chunks:
                    writer.write(c)
                await writer.drain()
            await inbox.until(sametime_told(name), "the being-scanned IM")
            if to_server:
                assert bytes(server.received) == before, "the server had chunks of the file at the notice"
                await server.wait_for(lambda got: len(got) >= len(before) + sum(map(len, chunks)), "the file")
                assert bytes(server.received) == before + b"".join(chunks)
            else:
                def raw(m) -> bytes:
                    return m.raw if isinstance(m, st.Message) else b""
                assert not any(raw(m) in chunks for m in inbox.items), "a chunk came before the notice"
                await inbox.until(lambda m: raw(m) == chunks[-1], "the file's last chunk")
                assert [raw(m) for m in inbox.items if raw(m) in chunks] == chunks
            assert len([m for m in inbox.items if sametime_told(name)(m)]) == 1, "told more than once"
            writer.close()
        finally:
            await gw.stop()
            server.close()
    legacy_run(main())
    decided = slow_and_told(data, name)
    assert decided["imguard"]["context"]["direction"] == direction
