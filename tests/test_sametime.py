"""Sametime (the Community protocol, TCP 1533): the session on the bytes of a real client (Finch 2.14 over
libmeanwhile, tests/data/sametime/finch-session.json, see its README), checked against tshark's `sametime` dissector;
conference, mask and encrypted-channel cases built from libmeanwhile's structures; and Finch itself, driven under
tmux, logging in through the real `imguard run` (reverse mode) to a scripted server (no Sametime server is
packaged): its outbound and inbound IMs blocked with a notice in the conversation, a sentinel after each, and
`imguard pcap` of the captured run giving the gateway's decisions."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from imguard.model import ALLOW, BLOCK, MASK, ChatContext, Decision
from imguard.protocols import registry
from imguard.protocols.base import Anomaly, Close, ProtocolEvent, Send
from imguard.protocols.sametime import FrameDecoder, SametimeLimits, SametimeSession, build_message
from imguard.protocols.sametime.decoder import (CHANNEL_CREATE, CHANNEL_SEND, CONF_JOIN, CONF_MESSAGE, CONF_WELCOME,
                                                ENCRYPT, IM_MESSAGE, LOGIN, SERVICE_CONFERENCE, SERVICE_IM,
                                                Reader, file_offer, login_name, put_opaque, put_string,
                                                read_channel_create, read_im, read_send, write_im)

DATA = Path(__file__).parent / "data" / "sametime"
BLOCKED_WORD = "project-bluebird"          # tests/data/rules: a keyword block rule
MASK_WORD = "zebra-omega"


def finch_segments() -> list[tuple[bool, bytes]]:
    doc = json.loads((DATA / "finch-session.json").read_text())
    return [(side == "c", bytes.fromhex(data)) for side, data in doc["segments"]]


class Checker:
    """Policy stand-in: blocks BLOCKED_WORD, masks MASK_WORD, records what it was asked."""

    def __init__(self):
        self.asked: list[tuple[str, str, str, tuple]] = []

    def check_message(self, text, ctx):
        self.asked.append((text, ctx.origin, ctx.sender, ctx.recipients))
        if BLOCKED_WORD in text:
            return Decision(action=BLOCK)
        if MASK_WORD in text:
            return Decision(action=MASK, masked_text=text.replace(MASK_WORD, "[MASKED]"))
        return Decision(action=ALLOW)


def run(segments, checker=None, chunk: int = 0, limits=None) -> tuple[SametimeSession, list]:
    session = SametimeSession(checker or Checker(), None, ChatContext(), limits or SametimeLimits())
    out = []
    for from_client, data in segments:
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
        for piece in pieces:
            out += session.data_received(from_client, piece)
    return session, out


def sent(out, to_client: bool) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, Send) and c.to_client == to_client)


# --- Finch's bytes ------------------------------------------------------------------------------------------------

def test_finch_login_and_ims_both_ways():
    """Finch's login names alice (LOGIN, then the server's LOGIN_ACK); bob's IM to her is decided inbound
    (sender bob, recipient alice), her replies (HTML messages, entities resolved) outbound to bob; the blocked
    one is not forwarded and Finch gets an IM on that channel saying so."""
    checker = Checker()
    session, out = run(finch_segments(), checker)
    assert session.identity == "alice" and session.confirmed
    assert [e.data for e in out if isinstance(e, ProtocolEvent)] == [{"user_id": "alice"}]
    assert checker.asked == [("hello alice from bob", "server", "bob", ("alice",)),
                             ("hi bob, the project-bluebird plan", "client", "alice", ("bob",)),
                             ("lunch at noon? ünïcödé", "client", "alice", ("bob",))]
    to_server = sent(out, False)
    assert BLOCKED_WORD.encode() not in to_server and b"lunch at noon" in to_server
    [notice] = [m for m in FrameDecoder().feed(sent(out, True)) if not isinstance(m, bytes) and b"[imguard]" in m.raw]
    assert notice.type == CHANNEL_SEND and notice.channel == 4
    assert read_im(read_send(notice.body)[1]).text.startswith("[imguard] Your message to bob was blocked")


def test_finch_bytes_cross_unchanged_when_allowed_at_every_split():
    """Everything allowed: both directions cross byte-identical, whatever the segment boundaries (with RC2/128 not
    intercepted: intercepted, the channel's create and accept carry the gateway's keys, tests/test_sametime_rc2.py)."""
    segments = finch_segments()
    allow = type("Allow", (), {"check_message": lambda self, text, ctx: Decision(action=ALLOW)})()
    for chunk in (0, 1, 3, 7, 64):
        _, out = run(segments, allow, chunk, SametimeLimits(sametime_intercept_rc2_128=False))
        assert sent(out, False) == b"".join(d for c, d in segments if c), chunk
        assert sent(out, True) == b"".join(d for c, d in segments if not c), chunk


@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_the_same_decisions_at_every_split(chunk):
    checker = Checker()
    run(finch_segments(), checker, chunk)
    assert len(checker.asked) == 3


def test_tshark_reads_the_finch_session(tmp_path):
    """tshark's `sametime` dissector on the same bytes: every message's type and channel, the LOGIN's name, the
    channel ids and targets of CHANNEL_CREATE and the send types of CHANNEL_SEND are what imguard's decoder reads.
    (tshark reads no service id from these creates: it looks for it at another offset, so that field is not
    compared.)"""
    if shutil.which("tshark") is None:
        if os.environ.get("CI"):
            pytest.fail("tshark is not installed, and CI is set")
        pytest.skip("tshark is not installed")
    from tests.test_tshark_crosscheck import tshark, write_capture
    segments = finch_segments()
    frames = tshark(write_capture(tmp_path / "sametime.pcap", segments, 1533), layer="sametime")
    ours = [m for _, data in segments for m in FrameDecoder().feed(data) if not isinstance(m, bytes)]
    theirs_types = [int(v, 16) for f in frames for v in f.values("sametime.message_type")]
    assert theirs_types == [m.type for m in ours]
    assert [int(v) for f in frames for v in f.values("sametime.message_channel")] == [m.channel for m in ours]
    creates = [read_channel_create(m.body) for m in ours if m.type == CHANNEL_CREATE]
    assert [int(v) for f in frames for v in f.values("sametime.channel.id")] == [c.channel for c in creates]
    login = next(m for m in ours if m.type == LOGIN)
    texts = [v for f in frames for v in f.values("sametime.field_text")]
    assert login_name(login.body) in texts
    assert [c.target for c in creates if c.target] == [t for t in texts if t in ("alice", "bob")][-2:]
    sends = [read_send(m.body)[0] for m in ours if m.type == CHANNEL_SEND]
    assert [int(v, 16) for f in frames for v in f.values("sametime.channel.send_type")] == sends


# --- built from libmeanwhile's structures -------------------------------------------------------------------------

def login_info(user: str) -> bytes:
    return put_string(f"{user}-login") + struct.pack(">H", 0x1003) + put_string(user) + put_string(user.title()) \
        + put_string("example.com") + b"\x00"


def create(channel: int, service: int, target: str = "", addtl: bytes = b"", creator: str = "",
           mode: int = 0) -> bytes:
    body = struct.pack(">II", 0, channel) + put_string(target) + put_string("") + struct.pack(">IIII", service,
                                                                                                service, 3, 0)
    body += put_opaque(addtl) + (b"\x01" + login_info(creator) if creator else b"\x00") + struct.pack(">HI", mode, 0)
    return build_message(CHANNEL_CREATE, 0, body)


def send(channel: int, send_type: int, data: bytes, options: int = 0) -> bytes:
    return build_message(CHANNEL_SEND, channel, struct.pack(">H", send_type) + put_opaque(data), options)


def logged_in() -> list[tuple[bool, bytes]]:
    return [(True, build_message(LOGIN, 0, struct.pack(">H", 0x1700) + put_string("alice"))),
            (False, build_message(0x8001, 0, login_info("alice")))]


def test_conference_messages_both_ways():
    """A conference alice opens: her message goes to the conference (by name); the server's names a member that
    WELCOME or JOIN mapped to a user; a blocked member's message is dropped, alice told as a conference message."""
    checker = Checker()
    conf = 7
    welcome = put_string("conf-42") + put_string("Budget") + struct.pack(">II", 1, 1) + struct.pack(">I", 2) \
        + login_info("carol")
    segments = logged_in() + [
        (True, create(conf, SERVICE_CONFERENCE, addtl=put_string("conf-42") + put_string("Budget"))),
        (False, send(conf, CONF_WELCOME, welcome)),
        (False, send(conf, CONF_JOIN, struct.pack(">I", 3) + login_info("dave"))),
        (True, send(conf, CONF_MESSAGE, put_string("numbers are in"))),
        (False, send(conf, CONF_MESSAGE, struct.pack(">I", 2) + put_string("thanks"))),
        (False, send(conf, CONF_MESSAGE, struct.pack(">I", 3) + put_string(f"the {BLOCKED_WORD} launch")))]
    _, out = run(segments, checker)
    assert checker.asked == [("numbers are in", "client", "alice", ("conf-42",)),
                             ("thanks", "server", "carol", ("alice",)),
                             (f"the {BLOCKED_WORD} launch", "server", "dave", ("alice",))]
    to_client = sent(out, True)
    assert BLOCKED_WORD.encode() not in to_client and b"[imguard] A message from dave was blocked" in to_client


def test_mask_rewrites_the_text_and_fixes_the_lengths():
    """A masked IM (plain text and HTML): the server gets the masked text in a well-formed message."""
    for kind in ("text", "html"):
        segments = logged_in() + [(True, create(4, SERVICE_IM, target="bob")),
                                  (True, send(4, IM_MESSAGE, write_im(kind, f"code {MASK_WORD} & more")))]
        _, out = run(segments)
        [msg] = [m for m in FrameDecoder().feed(sent(out, False)) if m.type == CHANNEL_SEND]
        assert read_im(read_send(msg.body)[1]).text == "code [MASKED] & more", kind


def test_an_encrypted_channel_is_an_anomaly_and_decided_unread():
    """RC2-encrypted channel data cannot be read: one info anomaly per channel, policy asked on empty text."""
    checker = Checker()
    segments = logged_in() + [(True, create(4, SERVICE_IM, target="bob", mode=1))] + \
        [(True, send(4, IM_MESSAGE, b"\x13\x37" * 10, options=ENCRYPT))] * 2
    _, out = run(segments, checker)
    assert [a.kind for a in out if isinstance(a, Anomaly)] == ["encrypted_channel"]
    assert checker.asked == [("", "client", "alice", ("bob",))] * 2
    assert sent(out, False).count(b"\x13\x37" * 10) == 2


def test_bad_input_is_an_anomaly_never_a_crash():
    """A length past the limit closes with an anomaly; an IM that does not parse from our client is dropped; one
    from the server passes with an anomaly; a connection cut mid-message leaves a truncated_message anomaly."""
    limits = SametimeLimits(sametime_max_message_size=1000)
    session = SametimeSession(Checker(), None, ChatContext(), limits)
    out = session.data_received(True, struct.pack(">I", 5000) + b"\x00" * 20)
    assert [a.kind for a in out if isinstance(a, Anomaly)] == ["message_too_large"]
    assert any(isinstance(c, Close) for c in out)
    session, out = run(logged_in() + [(True, create(4, SERVICE_IM, target="bob")),
                                      (True, send(4, IM_MESSAGE, struct.pack(">I", 1) + b"\xff\xff")),
                                      (False, send(4, IM_MESSAGE, struct.pack(">I", 1) + b"\xff\xff"))])
    assert [a.kind for a in out if isinstance(a, Anomaly)] == ["bad_structure", "bad_structure"]
    assert b"\xff\xff" not in sent(out, False) and b"\xff\xff" in sent(out, True)
    session.data_received(True, send(4, IM_MESSAGE, write_im("text", "cut"))[:-2])
    assert [a.kind for a in session.connection_closed(True)] == ["truncated_message"]


def test_registered_on_port_1533_and_found_by_its_handshake():
    """Port 1533 by default; elsewhere Finch's HANDSHAKE is recognised (waiting for more while a prefix fits)."""
    from imguard.protocols import detect
    assert "1533=sametime" in registry.default_ports()
    assert isinstance(registry.build(registry.SessionRequest("sametime", ChatContext())), SametimeSession)
    handshake = finch_segments()[0][1]
    assert detect.sniff(handshake) == "sametime"
    assert all(detect.sniff(handshake[:n]) == detect.NEED_MORE for n in range(1, 14))
    assert detect.sniff(b"\x00\x00\x00\x22\x00\x01" + handshake[6:]) != "sametime"       # a LOGIN first: not it


# --- Finch through the real gateway -------------------------------------------------------------------------------

class ScriptedServer:
    """The server's side of a Sametime session, scripted: answers the handshake, login and channel creates (no
    encryption), records the client's messages, and plays bob's IMs to alice on request. File transfers, as bob's
    client would do them (libmeanwhile's srvc_ft.c): a file alice offers is accepted, its chunks kept
    (`files[channel]`) and each answered with a RECEIVED; a file bob sends (`bob_sends_file`) waits for alice's
    accept, then goes chunk by chunk, each after the RECEIVED of the one before, and bob closes the channel after
    the last one's."""

    BOB = 0x80000001
    FT_SERVICE = 0x00000038
    AWARE_SERVICE = 0x00000011

    def __init__(self):
        self.port = 0
        self.received = bytearray()
        self.writer = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.logged_in = threading.Event()
        self.files: dict[int, bytearray] = {}       # a file alice sends: its channel -> the bytes bob got
        self.offers: dict[int, tuple[str, int]] = {}        # its channel -> (name, size) of alice's CHANNEL_CREATE
        self.closed: dict[int, int] = {}            # channel -> the reason alice's CHANNEL_DESTROY gave
        self.received_acks: dict[int, int] = {}     # a file bob sends: its channel -> RECEIVEDs alice sent
        self._ft_events: dict[int, asyncio.Queue] = {}
        self._next_channel = 0x80000100
        self.aware_channel = -1

    @staticmethod
    def _msg(type_: int, channel: int, body: bytes) -> bytes:
        data = struct.pack(">HHI", type_, 0, channel) + body
        return struct.pack(">I", len(data)) + data

    async def _handle(self, reader, writer):
        self.writer = writer
        buf = b""
        while data := await reader.read(65536):
            self.received += data
            buf += data
            while buf:
                if buf[0] & 0x80:
                    buf = buf[1:]
                    continue
                if len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                    break
                n = struct.unpack(">I", buf[:4])[0]
                m, buf = buf[4:4 + n], buf[4 + n:]
                type_ = struct.unpack(">H", m[:2])[0]
                channel = struct.unpack(">I", m[4:8])[0]
                self.on_message(type_, channel, m)
                if type_ == 0x0004 and struct.unpack(">H", m[8:10])[0] == 0x0068 and channel == self.aware_channel:
                    # the client watches its buddies (AWARE_ADD): bob can receive files (OPT_GOT_SET of the
                    # attribute FILE_TRANSFER, 6, true), which libpurple checks before it sends one
                    got_set = struct.pack(">IH", 0, 0x0002) + put_string("bob") + put_string("") \
                        + struct.pack(">IIII", 0, 1, 0, 6) + put_opaque(struct.pack(">I", 1))
                    writer.write(send(channel, 0x0259, got_set))
                elif type_ == 0x0004 and struct.unpack(">H", m[8:10])[0] == 0x0001 and channel in self.files:
                    self.files[channel] += m[14:]           # a chunk of alice's file: bob's client answers
                    writer.write(send(channel, 0x0002, b""))
                elif type_ == 0x0004 and struct.unpack(">H", m[8:10])[0] == 0x0002 and channel in self._ft_events:
                    self.received_acks[channel] = self.received_acks.get(channel, 0) + 1
                    self._ft_events[channel].put_nowait("received")
                elif type_ == 0x0006 and channel in self._ft_events:
                    self._ft_events[channel].put_nowait("accept")
                elif type_ == 0x0003:
                    self.closed[channel] = struct.unpack(">I", m[8:12])[0]
                    if channel in self._ft_events:
                        self._ft_events[channel].put_nowait("destroy")
                elif type_ == 0x0000:
                    writer.write(self._msg(0x8000, 0, struct.pack(">HHIII", 0x1e, 0x1d, 0x7f000001, 0, 0)))
                elif type_ == 0x0001:
                    writer.write(self._msg(0x8001, 0, login_info("alice") + struct.pack(">HIHI", 0, 0, 0x20, 0)
                                           + put_string("")))
                    self.logged_in.set()
                elif type_ == 0x0002:
                    channel = struct.unpack(">I", m[12:16])[0]
                    rest = m[16:]
                    for _ in range(2):
                        rest = rest[2 + struct.unpack(">H", rest[:2])[0]:]
                    service, ptype, pver = struct.unpack(">III", rest[:12])
                    if service == self.AWARE_SERVICE:
                        self.aware_channel = channel
                    if service == self.FT_SERVICE:
                        self.files[channel] = bytearray()
                        addtl = Reader(rest[16:]).opaque()
                        self.offers[channel] = file_offer(addtl)
                    writer.write(self._msg(0x0006, channel, struct.pack(">IIII", service, ptype, pver, 0)
                                           + self.accept_encrypt(channel, service)))
            await writer.drain()

    def on_message(self, type_: int, channel: int, message: bytes) -> None:
        """Each of the client's messages (header and body), before the script answers it: a subclass's hook."""

    def accept_encrypt(self, channel: int, service: int) -> bytes:
        """The end of the accept of a channel the client opens: no acceptor, no encryption (a subclass's hook)."""
        return b"\x00" + struct.pack(">HI", 0, 0)

    def start(self) -> None:
        ready = threading.Event()

        def serve():
            self.loop = asyncio.new_event_loop()
            server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
        threading.Thread(target=serve, daemon=True).start()
        assert ready.wait(10)

    def bob_sends_file(self, name: str, data: bytes, chunk: int = 8192, timeout: float = 30.0) -> str:
        """Bob offers alice a file; as his client would, each chunk after the RECEIVED of the one before, and the
        channel closed after the last one's. Returns how it ended: "done", or "destroyed" (alice's side, or the
        gateway, destroyed the channel), or "timeout"."""
        channel = self._next_channel
        self._next_channel += 1

        async def play() -> str:
            events = self._ft_events[channel] = asyncio.Queue()
            addtl = struct.pack(">I", 0) + put_string(name) + put_string("") + struct.pack(">IIH", len(data), 0, 0)
            body = struct.pack(">II", 0, channel) + put_string("alice") + put_string("") \
                + struct.pack(">IIII", self.FT_SERVICE, 0, 1, 0) + put_opaque(addtl) + b"\x01" + login_info("bob") \
                + struct.pack(">HI", 0, 0)
            self.writer.write(build_message(CHANNEL_CREATE, 0, body))
            await self.writer.drain()
            if await events.get() != "accept":
                return "destroyed"
            pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
            for piece in pieces:
                self.writer.write(send(channel, 0x0001, piece))
                await self.writer.drain()
                if await events.get() != "received":
                    return "destroyed"
            self.writer.write(build_message(0x0003, channel, struct.pack(">I", 0) + put_opaque(b"")))
            await self.writer.drain()
            return "done"

        async def bounded() -> str:
            try:
                return await asyncio.wait_for(play(), timeout)
            except asyncio.TimeoutError:
                return "timeout"
        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result(timeout + 5)

    def bob_says(self, *texts: str) -> None:
        """Bob opens an IM channel to alice (the first time) and sends `texts`."""
        async def play():
            if not getattr(self, "_bob_open", False):
                self._bob_open = True
                self.writer.write(create(self.BOB, SERVICE_IM, target="alice",
                                         addtl=struct.pack(">II", 1, 1), creator="bob"))
                await self.writer.drain()
                await asyncio.sleep(0.5)
            for text in texts:
                self.writer.write(send(self.BOB, IM_MESSAGE, write_im("text", text)))
            await self.writer.drain()
        asyncio.run_coroutine_threadsafe(play(), self.loop).result(10)


AUTOACCEPT = "/usr/lib/x86_64-linux-gnu/purple-2/autoaccept.so"


class Finch:
    """Finch (libpurple's Sametime plugin) under tmux, with its own HOME: logs in as alice to `port`. With
    `downloads`, libpurple's own autoaccept plugin takes every file offered into that folder (what a user clicking
    "Accept" does, without the file dialog); with `dbus` (a session bus address), Finch serves libpurple's D-Bus
    API there, through which `send_file` has it send a file (what its "Send File" menu does, after the dialog)."""

    def __init__(self, home: Path, port: int, downloads: Path | None = None, dbus: str = ""):
        self.home, self.name = home, f"imguard-finch-{uuid.uuid4().hex[:6]}"
        self.dbus = dbus
        purple = home / ".purple"
        purple.mkdir(parents=True)
        if dbus or downloads is not None:
            # bob on alice's buddy list (libpurple sends files only to a buddy), his files accepted by autoaccept
            (purple / "blist.xml").write_text("""<?xml version='1.0' encoding='UTF-8' ?>
<purple version='1.0'><blist><group name='Buddies'><contact><setting name='autoaccept' type='int'>1</setting>
<buddy account='alice' proto='prpl-meanwhile'><name>bob</name></buddy></contact></group></blist>
<privacy></privacy></purple>""")
        if downloads is not None:
            (purple / "prefs.xml").write_text(f"""<?xml version='1.0' encoding='UTF-8' ?>
<pref version='1' name='/'><pref name='finch'><pref name='plugins'><pref name='loaded' type='pathlist'>
<item value='{AUTOACCEPT}'/></pref></pref></pref><pref name='plugins'><pref name='core'>
<pref name='core-plugin_pack-autoaccept'><pref name='path' type='string' value='{downloads}'/>
<pref name='stranger' type='int' value='1'/><pref name='notify' type='bool' value='0'/>
<pref name='newdir' type='bool' value='0'/><pref name='escape_filenames' type='bool' value='0'/>
</pref></pref></pref></pref>""")
        (purple / "accounts.xml").write_text(f"""<?xml version='1.0' encoding='UTF-8' ?>
<account version='1.0'><account><protocol>prpl-meanwhile</protocol><name>alice</name><password>pw</password>
<settings><setting name='server' type='string'>127.0.0.1</setting><setting name='port' type='int'>{port}</setting>
</settings><settings ui='gnt-purple'><setting name='auto-login' type='bool'>1</setting></settings></account>
</account>""")

    def start(self) -> None:
        bus = f"DBUS_SESSION_BUS_ADDRESS={self.dbus} " if self.dbus else ""
        debug = " -d" if self.dbus else ""         # libpurple's debug log (libmeanwhile's view) to finch.err
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "200", "-y", "50",
                        f"HOME={self.home} {bus}exec finch{debug} 2>{self.home}/finch.err"], check=True)

    def purple(self, method: str, *args: str) -> str:
        """Call libpurple's D-Bus API (im.pidgin.purple.PurpleInterface.<method>) in this Finch; its reply's value."""
        out = subprocess.run(["dbus-send", "--print-reply=literal", "--dest=im.pidgin.purple.PurpleService",
                              "/im/pidgin/purple/PurpleObject", f"im.pidgin.purple.PurpleInterface.{method}", *args],
                             capture_output=True, text=True, timeout=10, env={**os.environ,
                                                                              "DBUS_SESSION_BUS_ADDRESS": self.dbus})
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split()[-1] if out.stdout.strip() else ""

    def send_im(self, who: str, text: str) -> None:
        """Alice sends `text` to `who` (libpurple's serv_send_im), whatever window Finch has in front."""
        account = self.purple("PurpleAccountsFindConnected", "string:alice", "string:prpl-meanwhile")
        gc = self.purple("PurpleAccountGetConnection", f"int32:{account}")
        self.purple("ServSendIm", f"int32:{gc}", f"string:{who}", f"string:{text}", "int32:0")

    def send_file(self, who: str, path: Path) -> None:
        """Alice sends `path` to `who`: libpurple's serv_send_file on her connection (no dialog: the file is given)."""
        account = self.purple("PurpleAccountsFindConnected", "string:alice", "string:prpl-meanwhile")
        gc = self.purple("PurpleAccountGetConnection", f"int32:{account}")
        self.purple("ServSendFile", f"int32:{gc}", f"string:{who}", f"string:{path}")

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *(["-l"] if literal else []), *keys], check=True)

    def wait_screen(self, text: str, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.screen():
                return True
            time.sleep(0.2)
        return False

    def find(self, text: str, timeout: float = 15.0) -> bool:
        """`text` on the screen, in whichever window: the windows are brought to the front in turn (M-n)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _ in range(8):
                if text in self.screen():
                    return True
                self.keys("M-n")
                time.sleep(0.2)
        return False

    def say(self, text: str) -> None:
        """Type `text` into the conversation window and send it (switching windows until it lands there)."""
        marker = "zz" + uuid.uuid4().hex[:4]
        for _ in range(3):
            self.keys(marker, literal=True)
            if self.wait_screen(marker, 2):
                break
            self.keys("M-n")
        self.keys(*["BSpace"] * len(marker))
        self.keys(text, literal=True)
        self.keys("Enter")

    def stop(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def finch_world(tmp_path):
    for tool in ("finch", "tmux"):
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{tool} is not installed (Debian: finch, tmux), and CI is set")
            pytest.skip(f"{tool} is not installed (Debian: finch, tmux)")
    from tests.peers.http_gateway import HttpGateway
    server = ScriptedServer()
    server.start()
    gw = HttpGateway.start(tmp_path / "gw", [f"tcp://127.0.0.1:{server.port}"],
                           extra=["--ports", f"{server.port}=sametime"])
    finch = Finch(tmp_path / "finch-home", gw.ports[0])
    try:
        yield server, gw, finch
    finally:
        finch.stop()
        gw.stop()
        server.loop.call_soon_threadsafe(server.loop.stop)


def test_finch_through_the_gateway_both_ways_and_offline(tmp_path, finch_world):
    """Finch logs in as alice through `imguard run`. Inbound: bob's blocked IM never shows in Finch, the notice does,
    and bob's sentinel after it. Outbound: alice's blocked reply never reaches the server, Finch shows the rule's
    notice, and her sentinel arrives. The alerts name alice and bob and the direction; `imguard pcap` of the
    captured run (client leg and server leg) gives the same decisions."""
    from tests.peers.capture import Capture
    from tests.test_inline_offline import assert_same, decisions, needs_tcpdump, replay_both_legs, settled
    needs_tcpdump()
    server, gw, finch = finch_world
    offset = gw.log_size()
    tag = uuid.uuid4().hex[:6]
    since = gw.mark()
    ports = [f"{gw.ports[0]}=sametime", f"{server.port}=sametime"]
    with Capture.start(tmp_path / "sametime.pcap", f"tcp port {gw.ports[0]} or tcp port {server.port}") as capture:
        finch.start()
        assert server.logged_in.wait(20), finch.screen()
        time.sleep(1)
        server.bob_says(f"the {BLOCKED_WORD} launch {tag}", f"sentinel in {tag}")
        assert finch.wait_screen(tag), finch.screen()          # the sentinel (the window is narrow: its tag)
        screen = finch.screen()
        assert BLOCKED_WORD not in screen and "A message from bob was blocked" in screen, screen
        finch.say(f"the {BLOCKED_WORD} plan {tag}")
        assert finch.wait_screen("confidential"), finch.screen()       # the rule's notice
        finch.say(f"sentinel out {tag}")
        deadline = time.monotonic() + 15
        while f"sentinel out {tag}".encode() not in server.received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"sentinel out {tag}".encode() in server.received
        assert BLOCKED_WORD.encode() not in server.received
    events = [e for e in settled(gw.alerts)[since:] if tag in json.dumps(e)]
    blocks = {e["imguard"]["context"]["direction"]: e["imguard"]["context"] for e in events
              if e["event"]["action"] == "block"}
    assert blocks["inbound"]["sender"] == "bob" and blocks["inbound"]["recipients"] == ["alice"]
    assert blocks["outbound"]["sender"] == "alice" and blocks["outbound"]["recipients"] == ["bob"]
    inline = decisions(events)
    assert sum(inline.values()) == 4, inline
    offline = replay_both_legs(capture, tmp_path, [gw.ports[0]], [server.port], ports, gw.directory / "rules")
    assert_same(inline, offline, "Sametime")
    assert not gw.errors_since(offset), "imguard logged errors:\n" + "\n".join(gw.errors_since(offset))
