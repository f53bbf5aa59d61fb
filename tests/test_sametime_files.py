"""Sametime file transfers (libmeanwhile's srvc_ft.c: service 0x38, TRANSFER chunks each answered by a RECEIVED)
held by the protocol-agnostic tracker, both directions: the session on transcripts built from libmeanwhile's
structures (every rule of the framing: the gateway's RECEIVEDs, the receiver's swallowed, the rejection both ways,
the notice, the bounds), and Finch itself (libpurple's xfer over libmeanwhile) through the real `imguard run`
against the scripted server of tests/test_sametime.py: Finch sends a file (libpurple's serv_send_file, over its
D-Bus API: what its "Send File" does after the dialog) and receives one (libpurple's autoaccept plugin: what a user
clicking "Accept" does), EICAR blocked and a clean file byte-identical each way, a sentinel after each block;
tshark's `sametime` dissector and Finch's own debug log (libmeanwhile's parse of the offer) checked against
imguard's decoder, and `imguard pcap` of the captured run giving the gateway's decisions."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from imguard.files.tracker import HoldLedger
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, InspectFile, ProtocolEvent, Send
from imguard.protocols.sametime import FrameDecoder, SametimeLimits, SametimeSession, build_message
from imguard.protocols.sametime.decoder import (CHANNEL_CREATE, CHANNEL_DESTROY, CHANNEL_SEND, ENCRYPT, FT_REJECTED,
                                                FT_RECEIVED, FT_TRANSFER, SERVICE_FILE_TRANSFER, SERVICE_IM,
                                                file_offer, put_opaque, put_string, read_channel_create, read_im,
                                                read_send)
from tests.peers.payloads import random_payload
from tests.test_sametime import Checker, Finch, ScriptedServer, create, logged_in

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
FT = 5                          # the channel of a file our client (alice) sends
BOB_FT = 0x80000100             # the channel of a file bob sends


def offer(channel: int, name: str, size: int, creator: str = "") -> bytes:
    """A file-transfer CHANNEL_CREATE as libmeanwhile writes it (srvc_ft.c ft_create_chan)."""
    addtl = struct.pack(">I", 0) + put_string(name) + put_string("") + struct.pack(">IIH", size, 0, 0)
    return create(channel, SERVICE_FILE_TRANSFER, target="" if creator else "bob", addtl=addtl, creator=creator)


def chunk(channel: int, data: bytes, options: int = 0) -> bytes:
    return build_message(CHANNEL_SEND, channel, struct.pack(">H", FT_TRANSFER) + put_opaque(data), options)


def received(channel: int) -> bytes:
    return build_message(CHANNEL_SEND, channel, struct.pack(">H", FT_RECEIVED) + put_opaque(b""))


def destroy(channel: int, reason: int = 0) -> bytes:
    return build_message(CHANNEL_DESTROY, channel, struct.pack(">I", reason) + put_opaque(b""))


def accept(channel: int) -> bytes:
    return build_message(0x0006, channel, struct.pack(">IIII", SERVICE_FILE_TRANSFER, 0, 1, 0) + b"\x00"
                         + struct.pack(">HI", 0, 0))


class Transfer:
    """A session driven as a transcript: what each side sends in, what crosses out (by leg), the files inspected."""

    def __init__(self, limits: SametimeLimits = SametimeLimits(), ledger: HoldLedger | None = None):
        self.session = SametimeSession(Checker(), None, ChatContext(connection_id="c1"), limits)
        if ledger is not None:
            self.session.holds.ledger = ledger
        self.out: list = []
        self.feed(logged_in())

    def feed(self, segments, chunk_size: int = 0) -> list:
        new = []
        for from_client, data in segments:
            step = chunk_size or len(data)
            for i in range(0, len(data), step):
                new += self.session.data_received(from_client, data[i:i + step])
        self.out += new
        return new

    def inspected(self) -> list[InspectFile]:
        return [c for c in self.out if isinstance(c, InspectFile)]

    def verdict(self, action: str) -> list:
        [inspect] = self.inspected()[-1:]
        new = self.session.file_verdict(inspect.transfer_id, FileReport(inspect.name, "", len(inspect.data)),
                                         Decision(action=action))
        self.out += new
        return new


def sent(cmds, to_client: bool) -> bytes:
    return b"".join(c.data for c in cmds if isinstance(c, Send) and c.to_client == to_client)


def messages(data: bytes) -> list:
    return [m for m in FrameDecoder().feed(data) if not isinstance(m, bytes)]


def sends(data: bytes, send_type: int) -> list:
    return [m for m in messages(data) if m.type == CHANNEL_SEND and read_send(m.body)[0] == send_type]


def notices(data: bytes) -> list[str]:
    return [read_im(read_send(m.body)[1]).text for m in messages(data) if m.type == CHANNEL_SEND
            and read_send(m.body)[0] == 0x0064]


FILE = bytes(range(256)) * 80           # 20480 bytes: three chunks of 8192, 8192, 4096 (Finch's chunk size)
PIECES = [FILE[i:i + 8192] for i in range(0, len(FILE), 8192)]


# --- outbound: our client sends ------------------------------------------------------------------------------------

def test_outbound_held_acked_by_the_gateway_then_released_byte_exact():
    """Alice's chunks are held (nothing reaches the server), each but the last answered by the gateway's own
    RECEIVED so her client keeps sending; the file whole, it is inspected as sent (name, size, outbound context);
    allowed, the server gets the chunks byte-exact in order, its RECEIVEDs are swallowed but the last one's, and
    alice's own close crosses."""
    t = Transfer()
    new = t.feed([(True, offer(FT, "plan.pdf", len(FILE))), (False, accept(FT))])
    assert [e.data for e in new if isinstance(e, ProtocolEvent)] == [
        {"name": "plan.pdf", "size": len(FILE), "peer": "bob", "outbound": True}]
    for piece in PIECES:
        new = t.feed([(True, chunk(FT, piece))])
        assert sent(new, False) == b""                          # held
    assert len(sends(sent(t.out, True), FT_RECEIVED)) == 2      # the gateway's, for all but the last
    [inspect] = t.inspected()
    assert inspect.data == FILE and inspect.name == "plan.pdf" and inspect.context.origin == "client"
    assert inspect.context.sender == "alice" and inspect.context.recipients == ("bob",)
    assert inspect.context.transfer_mechanism == "sametime"
    released = sent(t.verdict(ALLOW), False)
    assert released == b"".join(chunk(FT, p) for p in PIECES)
    new = t.feed([(False, received(FT))] * 3 + [(True, destroy(FT))])
    assert sent(new, True) == received(FT)                      # the real last RECEIVED: alice closes
    assert sent(new, False) == destroy(FT)
    assert t.session.holds.held_bytes == 0


def test_outbound_blocked_never_reaches_the_receiver_and_the_sender_is_told():
    """EICAR from alice: the server never gets a byte of it; the gateway destroys the channel towards both
    (libmeanwhile's "rejected"), and alice gets an IM from [imguard] on an IM channel the gateway opens to her (none is
    open with bob); whatever either side sends on that channel afterwards is dropped."""
    t = Transfer()
    t.feed([(True, offer(FT, "eicar.com", len(EICAR))), (False, accept(FT)), (True, chunk(FT, EICAR))])
    assert sends(sent(t.out, True), FT_RECEIVED) == []          # one chunk: the last, not acked
    new = t.verdict(BLOCK)
    to_server, to_client = sent(t.out, False), sent(new, True)
    assert EICAR not in to_server
    assert sent(new, False) == destroy(FT, FT_REJECTED)
    msgs = messages(to_client)
    assert msgs[0].raw == destroy(FT, FT_REJECTED)
    gateway_im = read_channel_create(msgs[1].body)
    assert gateway_im.service == SERVICE_IM and gateway_im.creator.user_id == "imguard"
    assert gateway_im.target == "alice"
    [text] = notices(to_client)
    assert text.startswith("[imguard] ") and "eicar.com" in text and "blocked" in text
    late = t.feed([(True, chunk(FT, EICAR)), (False, received(FT)), (True, destroy(FT)),
                   (True, accept(gateway_im.channel)), (True, build_message(CHANNEL_SEND, gateway_im.channel, b"x"))])
    assert sent(late, False) == b"" and sent(late, True) == b""


def test_outbound_notice_goes_to_the_open_conversation_with_the_receiver():
    """An IM channel with bob is open: the notice comes there, as the blocked-message notice does."""
    t = Transfer()
    t.feed([(True, create(4, SERVICE_IM, target="bob")), (True, offer(FT, "eicar.com", len(EICAR))),
            (False, accept(FT)), (True, chunk(FT, EICAR))])
    new = t.verdict(BLOCK)
    [notice] = [m for m in messages(sent(new, True)) if m.type == CHANNEL_SEND]
    assert notice.channel == 4 and not any(m.type == CHANNEL_CREATE for m in messages(sent(new, True)))


# --- inbound: the server's side sends to our client ------------------------------------------------------------------

def test_inbound_held_the_gateway_acks_the_outside_sender_then_releases():
    """Bob's chunks to alice: held, the gateway answers bob (towards the server) for all but the last; allowed, alice
    gets them byte-exact and her RECEIVEDs are swallowed but the last one's; bob's close follows."""
    t = Transfer()
    t.feed([(False, offer(BOB_FT, "notes.txt", len(FILE), creator="bob")), (True, accept(BOB_FT))])
    for piece in PIECES:
        assert sent(t.feed([(False, chunk(BOB_FT, piece))]), True) == b""
    assert len(sends(sent(t.out, False), FT_RECEIVED)) == 2
    [inspect] = t.inspected()
    assert inspect.data == FILE and inspect.context.origin == "server" and inspect.context.sender == "bob"
    assert inspect.context.recipients == ("alice",)
    assert sent(t.verdict(ALLOW), True) == b"".join(chunk(BOB_FT, p) for p in PIECES)
    new = t.feed([(True, received(BOB_FT))] * 3)
    assert sent(new, False) == received(BOB_FT)
    assert sent(t.feed([(False, destroy(BOB_FT))]), True) == destroy(BOB_FT)


def test_inbound_blocked_the_receiver_gets_nothing_and_both_are_answered():
    """EICAR from bob: alice gets none of it, the channel destroyed towards both, and alice an IM in her own words
    ("the file ... from bob was blocked"); bob's late close is dropped."""
    t = Transfer()
    t.feed([(False, offer(BOB_FT, "eicar.com", len(EICAR), creator="bob")), (True, accept(BOB_FT)),
            (False, chunk(BOB_FT, EICAR))])
    new = t.verdict(BLOCK)
    assert EICAR not in sent(t.out, True)
    assert sent(new, False) == destroy(BOB_FT, FT_REJECTED)
    assert messages(sent(new, True))[0].raw == destroy(BOB_FT, FT_REJECTED)
    [text] = notices(sent(new, True))
    assert "the file 'eicar.com' from bob was blocked" in text
    assert sent(t.feed([(False, destroy(BOB_FT))]), True) == b""


# --- bounds and bad input -------------------------------------------------------------------------------------------

def test_the_same_at_every_split():
    """Whatever the read boundaries, the same file is inspected and the same bytes released."""
    segments = [(True, offer(FT, "plan.pdf", len(FILE))), (False, accept(FT))] + [(True, chunk(FT, p)) for p in PIECES]
    for size in (1, 5, 1000):
        t = Transfer()
        t.feed(segments, size)
        assert [i.data for i in t.inspected()] == [FILE], size
        assert sent(t.verdict(ALLOW), False) == b"".join(chunk(FT, p) for p in PIECES), size


def test_an_offer_past_the_bound_is_cut_at_its_first_chunk():
    t = Transfer(SametimeLimits(sametime_max_held_bytes=10_000))
    t.feed([(True, offer(FT, "big.iso", 50_000)), (False, accept(FT)), (True, chunk(FT, PIECES[0]))])
    assert [a.kind for a in t.out if isinstance(a, Anomaly)] == ["sametime_ft_too_large"]
    assert not t.inspected() and PIECES[0] not in sent(t.out, False)
    assert sent(t.out, False).endswith(destroy(FT, FT_REJECTED))
    assert any("larger than" in n for n in notices(sent(t.out, True)))


def test_the_gateway_hold_limit_cuts_fail_closed():
    """The process's ledger full: the file is stopped, not passed."""
    t = Transfer(ledger=HoldLedger(max_bytes=1000))
    t.feed([(True, offer(FT, "plan.pdf", len(FILE))), (False, accept(FT)), (True, chunk(FT, PIECES[0]))])
    assert [a.kind for a in t.out if isinstance(a, Anomaly)] == ["sametime_ft_too_large"]
    assert PIECES[0] not in sent(t.out, False)


def test_more_than_announced_an_encrypted_chunk_and_the_wrong_direction_are_stopped():
    t = Transfer()
    t.feed([(True, offer(FT, "a.txt", 10)), (False, accept(FT)), (True, chunk(FT, b"x" * 11))])
    assert [a.kind for a in t.out if isinstance(a, Anomaly)] == ["sametime_ft_bad_chunk"]
    t = Transfer()
    t.feed([(True, offer(FT, "a.txt", 10)), (False, accept(FT)), (True, chunk(FT, b"\x13" * 10, ENCRYPT))])
    assert [a.kind for a in t.out if isinstance(a, Anomaly)] == ["sametime_ft_encrypted"]
    assert b"\x13" * 10 not in sent(t.out, False)
    t = Transfer()
    t.feed([(True, offer(FT, "a.txt", 10)), (False, accept(FT)), (False, chunk(FT, b"y" * 10))])
    assert [a.kind for a in t.out if isinstance(a, Anomaly)] == ["sametime_ft_wrong_direction"]
    assert b"y" * 10 not in sent(t.out, True)


def test_the_sender_giving_up_abandons_and_its_close_crosses():
    """Alice closes after one chunk of three: nothing was forwarded, her close crosses, nobody is told; her leg closing
    mid-file does the same."""
    t = Transfer()
    t.feed([(True, offer(FT, "plan.pdf", len(FILE))), (False, accept(FT)), (True, chunk(FT, PIECES[0]))])
    new = t.feed([(True, destroy(FT, 0x80000000))])
    assert [a.kind for a in new if isinstance(a, Anomaly)] == ["sametime_ft_incomplete"]
    assert sent(new, False) == destroy(FT, 0x80000000) and PIECES[0] not in sent(t.out, False)
    assert t.session.holds.held_bytes == 0
    t = Transfer()
    t.feed([(False, offer(BOB_FT, "n.txt", len(FILE), creator="bob")), (True, accept(BOB_FT)),
            (False, chunk(BOB_FT, PIECES[0]))])
    assert [a.kind for a in t.session.connection_closed(False)] == ["sametime_ft_incomplete"]
    assert t.session.holds.held_bytes == 0


def test_more_files_at_once_than_allowed_are_stopped():
    """Past sametime_max_transfers held at once, the next file is stopped at its first chunk (fail closed)."""
    t = Transfer(SametimeLimits(sametime_max_transfers=1))
    t.feed([(True, offer(FT, "a.bin", len(FILE))), (False, accept(FT)), (True, chunk(FT, PIECES[0])),
            (True, offer(FT + 1, "b.bin", len(FILE))), (False, accept(FT + 1)), (True, chunk(FT + 1, PIECES[0]))])
    assert [a.kind for a in t.out if isinstance(a, Anomaly)] == ["sametime_ft_too_many"]
    assert sent(t.out, False).endswith(destroy(FT + 1, FT_REJECTED)) and PIECES[0] not in sent(t.out, False)


def test_the_receiver_leaving_before_the_verdict_gets_nothing():
    """Bob's side destroys the channel while alice's file is inspected: allowed, nothing is delivered (an anomaly)."""
    t = Transfer()
    t.feed([(True, offer(FT, "a.txt", 10)), (False, accept(FT)), (True, chunk(FT, b"z" * 10)),
            (False, destroy(FT, FT_REJECTED))])
    assert sent(t.out, True).endswith(destroy(FT, FT_REJECTED))      # bob's close reaches alice
    new = t.verdict(ALLOW)
    assert [a.kind for a in new if isinstance(a, Anomaly)] == ["sametime_ft_receiver_gone"]
    assert b"z" * 10 not in sent(t.out, False)


def test_the_offer_parses_as_libmeanwhile_writes_it():
    """file_offer reads srvc_ft.c's addtl (an unknown uint32 first)."""
    addtl = struct.pack(">I", 0) + put_string("r\u00e9sum\u00e9.txt") + put_string("for you") + \
        struct.pack(">IIH", 1234, 0, 0)
    assert file_offer(addtl) == ("r\u00e9sum\u00e9.txt", 1234)


# --- Finch through the real gateway ----------------------------------------------------------------------------------

@pytest.fixture
def finch_files(tmp_path):
    for tool in ("finch", "tmux", "dbus-daemon", "dbus-send"):
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{tool} is not installed (Debian: finch, tmux, dbus), and CI is set")
            pytest.skip(f"{tool} is not installed (Debian: finch, tmux, dbus)")
    from tests.peers.http_gateway import HttpGateway
    socket_dir = Path(tempfile.mkdtemp(prefix="imguard-bus-"))       # short: a socket path has 108 bytes
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1",
                            f"--address=unix:path={socket_dir}/bus"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    address = bus.stdout.readline().strip()
    assert address, "dbus-daemon did not start"
    server = ScriptedServer()
    server.start()
    gw = HttpGateway.start(tmp_path / "gw", [f"tcp://127.0.0.1:{server.port}"],
                           extra=["--ports", f"{server.port}=sametime"])
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    finch = Finch(tmp_path / "finch-home", gw.ports[0], downloads=downloads, dbus=address)
    try:
        yield server, gw, finch, downloads
    finally:
        finch.stop()
        gw.stop()
        server.loop.call_soon_threadsafe(server.loop.stop)
        bus.terminate()
        bus.wait(10)
        shutil.rmtree(socket_dir, ignore_errors=True)


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_finch_files_through_the_gateway_both_ways_and_offline(tmp_path, finch_files):
    """Finch (alice) through `imguard run`. Outbound: her EICAR never reaches bob (the server gets the channel's
    rejection, no byte), Finch shows the notice, her sentinel IM arrives after; her clean file reaches bob
    byte-identical. Inbound: bob's EICAR never reaches Finch's download folder, bob's client gets the rejection, Finch
    shows the notice and bob's sentinel after; bob's clean file lands byte-identical. The offers read by tshark and
    by Finch's own log (libmeanwhile) are what imguard read; `imguard pcap` of the run gives the same decisions."""
    from tests.peers.capture import Capture
    from tests.test_inline_offline import assert_same, decisions, needs_tcpdump, replay_both_legs, settled
    needs_tcpdump()
    server, gw, finch, downloads = finch_files
    offset, since, tag = gw.log_size(), gw.mark(), uuid.uuid4().hex[:6]
    clean_out = random_payload(40_000) + tag.encode()
    clean_in = random_payload(30_000) + tag.encode()
    files = tmp_path / "to-send"
    files.mkdir()
    (files / f"eicar-{tag}.com").write_bytes(EICAR)
    (files / f"clean-{tag}.bin").write_bytes(clean_out)
    ports = [f"{gw.ports[0]}=sametime", f"{server.port}=sametime"]
    with Capture.start(tmp_path / "sametime.pcap", f"tcp port {gw.ports[0]} or tcp port {server.port}") as capture:
        finch.start()
        assert server.logged_in.wait(20), finch.screen()
        assert wait_until(lambda: server.aware_channel >= 0), finch.screen()
        time.sleep(2)                                   # the aware service: bob can receive files

        # outbound EICAR: blocked, bob's side gets the rejection and no byte; alice's notice; her sentinel after
        finch.send_file("bob", files / f"eicar-{tag}.com")
        assert wait_until(lambda: FT_REJECTED in server.closed.values()), finch.screen()
        [blocked_ch] = [c for c, r in server.closed.items() if r == FT_REJECTED]
        assert server.offers[blocked_ch] == (f"eicar-{tag}.com", len(EICAR))
        assert bytes(server.files[blocked_ch]) == b"" and EICAR not in server.received
        assert finch.find(f"Your file eicar-{tag}.com was blocked"), finch.screen()
        finch.send_im("bob", f"sentinel out {tag}")
        assert wait_until(lambda: f"sentinel out {tag}".encode() in server.received)

        # outbound clean: byte-identical at bob's, closed by alice herself (success) after bob's last RECEIVED
        finch.send_file("bob", files / f"clean-{tag}.bin")
        assert wait_until(lambda: any(name == f"clean-{tag}.bin" and server.closed.get(c) == 0
                                      for c, (name, _) in server.offers.items())), finch.screen()
        [clean_ch] = [c for c, (name, _) in server.offers.items() if name == f"clean-{tag}.bin"]
        assert bytes(server.files[clean_ch]) == clean_out

        # inbound EICAR: bob's client sees the channel destroyed; nothing of it in Finch's downloads; bob's sentinel
        assert server.bob_sends_file(f"eicar-in-{tag}.com", EICAR) == "destroyed"
        server.bob_says(f"sentinel in {tag}")
        assert finch.find(f"sentinel in {tag}"), finch.screen()
        assert finch.find(f"'eicar-in-{tag}.com'"), finch.screen()          # the notice (its window is narrow)
        assert all(EICAR not in p.read_bytes() for p in downloads.iterdir())

        # inbound clean: lands byte-identical
        assert server.bob_sends_file(f"clean-in-{tag}.bin", clean_in) == "done"
        assert wait_until(lambda: (downloads / f"clean-in-{tag}.bin").exists()
                          and (downloads / f"clean-in-{tag}.bin").read_bytes() == clean_in)
        time.sleep(1)
        to_server = bytes(server.received)          # what the capture holds (Finch goes on: keepalives, presence)
    events = [e for e in settled(gw.alerts)[since:] if tag in json.dumps(e)]
    files_decided = {(e["imguard"]["context"]["direction"], e["event"]["action"]) for e in events
                     if e.get("file", {}).get("name", "").endswith((".com", ".bin"))}
    assert files_decided >= {("outbound", "block"), ("outbound", "allow"), ("inbound", "block"),
                             ("inbound", "allow")}, files_decided
    inline = decisions(events)
    offline = replay_both_legs(capture, tmp_path, [gw.ports[0]], [server.port], ports, gw.directory / "rules")
    assert_same(inline, offline, "Sametime files")
    assert not gw.errors_since(offset), "imguard logged errors:\n" + "\n".join(gw.errors_since(offset))
    crosscheck(tmp_path, capture, server, to_server, finch, events,
               [files / f"eicar-{tag}.com", files / f"clean-{tag}.bin"])


def crosscheck(tmp_path: Path, capture, server: ScriptedServer, to_server: bytes, finch: Finch,
               events: list[dict], given: list[Path]) -> None:
    """tshark's `sametime` dissector on what the gateway sent the server (alice's offers and chunks, its own
    RECEIVEDs to bob, its rejections): every message's type, channel and send type, and every created channel's id,
    are what imguard's decoder reads in the bytes the server got. tshark has no fields for a file offer's name and
    size: those of bob's offers are checked against Finch's own log of libmeanwhile's parse, those of alice's
    against the files Finch was given."""
    if shutil.which("tshark") is None:
        if os.environ.get("CI"):
            pytest.fail("tshark is not installed, and CI is set")
        pytest.skip("tshark is not installed")
    from tests.test_tshark_crosscheck import tshark
    pcap = capture.select(tmp_path / "to-server.pcap", f"tcp dst port {server.port}")
    frames = tshark(pcap, f"tcp.port=={server.port},sametime", layer="sametime")
    ours = messages(to_server)
    assert [int(v, 16) for f in frames for v in f.values("sametime.message_type")] == [m.type for m in ours]
    assert [int(v) for f in frames for v in f.values("sametime.message_channel")] == [m.channel for m in ours]
    assert [int(v, 16) for f in frames for v in f.values("sametime.channel.send_type")] == \
        [read_send(m.body)[0] for m in ours if m.type == CHANNEL_SEND]
    assert [int(v) for f in frames for v in f.values("sametime.channel.id")] == \
        [read_channel_create(m.body).channel for m in ours if m.type == CHANNEL_CREATE]
    assert {FT_TRANSFER, FT_RECEIVED} <= {read_send(m.body)[0] for m in ours if m.type == CHANNEL_SEND}
    offers = [e["imguard"]["sametime"] for e in events if e["event"]["action"] == "sametime_file_offer"]
    log = (finch.home / "finch.err").read_text(errors="replace")
    lines = log.splitlines()
    theirs = [(f.split("file: ")[1].strip(), int(z.split("size: ")[1])) for f, z in
              zip(lines, lines[1:], strict=False) if "sametime:  file: " in f and "sametime:  size: " in z]
    assert len(theirs) == 2 and [(o["name"], o["size"]) for o in offers if not o["outbound"]] == theirs
    assert [(o["name"], o["size"]) for o in offers if o["outbound"]] == [(p.name, p.stat().st_size) for p in given]
