"""Large DCC SEND files through the real `imguard run` (--dcc-relay) in front of a real ngIRCd, driven by the
`irc` library's clients (tests/test_e2e_irc.py's Chat).

While it holds a file, the gateway ACKs the sender itself (DCC's 32-bit running totals), so the sender sees
every byte acknowledged and closes at once, as mIRC, irssi and WeeChat do; the gateway still has the whole
file to deliver to the receiver after that close. These tests send files far larger than the socket buffers
(1.5 MB and 8 MB) in both directions, with a fast and a slow receiver, and check that the receiver gets every
byte (SHA-256 against the payload the test made) and sees the end of the file as an EOF; and that EICAR inside
a big file is still held back from the receiver.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import pytest

from imguard.files.tracker import HeldTransfer
from imguard.model import FROM_SERVER, ChatContext, Decision
from imguard.protocols.base import Close, InspectFile, Send
from tests.peers.payloads import random_payload
from tests.test_e2e_irc import EICAR, Chat, Route
from tests.test_e2e_irc import irc_dir, irc_gateway, ircd  # noqa: F401  (the module fixtures: this module gets its own
# ngIRCd and gateway, as test_e2e_irc.py has them)
from tests.test_real_irc_client import Pair, weechat_binary

pytestmark = pytest.mark.timeout(180)

MB = 1_000_000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, eicar_at: int | None = None) -> bytes:
    """`size` bytes that do not compress (a real archive or video would not) and that libmagic types as data,
    EICAR at `eicar_at` if given."""
    data = bytearray(random_payload(size))
    if eicar_at is not None:
        data[eicar_at:eicar_at + len(EICAR)] = EICAR
    return bytes(data)


@pytest.fixture
def route(ircd, irc_gateway) -> Route:  # noqa: F811 - the imported fixtures
    irc_gateway.check_alive()
    log_offset = irc_gateway.log_size()
    yield Route("imguard", False, ircd, irc_gateway)
    irc_gateway.check_alive()
    errors = irc_gateway.errors_since(log_offset)
    assert not errors, "imguard logged errors during the test:\n" + "\n".join(errors) + "\n" + irc_gateway.logs()


class BigChat(Chat):
    """Chat whose sender writes from a thread (a file larger than the socket buffers must not block the reactor
    that reads its ACKs) and whose receiver may read slowly: `read_delay` seconds before each 16 kB read."""

    def __init__(self, route: Route, read_delay: float = 0.0):
        super().__init__(route)
        self.read_delay = read_delay
        self.senders: list[threading.Thread] = []
        self.sender_closed_at: dict[str, float] = {}

    def _watch_eof(self, t, conn) -> None:
        Chat._watch_eof(t, conn)
        if self.read_delay:
            process_data = conn.process_data

            def slowly() -> None:
                time.sleep(self.read_delay)
                process_data()
            conn.process_data = slowly

    def _on_dcc_connect(self, conn, event):
        for pair in self.chats:
            if conn is pair.listener:
                pair.offerer_connected = True
        for t in self.transfers:
            if conn is t.sender_conn and not t.passive:
                sender = threading.Thread(target=conn.socket.sendall, args=(t.payload,), daemon=True)
                sender.start()
                self.senders.append(sender)

    def _on_dccmsg(self, conn, event):
        super()._on_dccmsg(conn, event)
        for t in self.transfers:
            if conn is t.sender_conn and t.acked >= len(t.payload) and t.name not in self.sender_closed_at:
                # Chat closed the sender right after it read the ACK of the last byte (as mIRC/irssi/WeeChat do).
                self.sender_closed_at[t.name] = time.monotonic()


def send_file(route: Route, size: int, inbound: bool, read_delay: float = 0.0, eicar_at: int | None = None):
    """One DCC SEND of `size` bytes across the gateway: inbound (an outside sender straight on ngIRCd, the receiver
    inside through imguard) or outbound (the reverse). Returns (chat, transfer, data, sender, receiver)."""
    data = payload(size, eicar_at)
    chat = BigChat(route, read_delay)
    alice = chat.person("alice", outside=inbound)
    bob = chat.person("bob", outside=not inbound)
    name = f"big-{uuid.uuid4().hex[:6]}.bin"
    t = chat.offer_file(alice, bob, name, data)
    return chat, t, data, alice, bob


@pytest.mark.parametrize("inbound", [True, False], ids=["inbound", "outbound"])
@pytest.mark.parametrize("size", [int(1.5 * MB), 8 * MB], ids=["1.5MB", "8MB"])
def test_big_file_arrives_whole_when_the_sender_closes_after_its_last_ack(route, size, inbound):
    """The sender closes as soon as it has read the ACK of its last byte (which the gateway sends while it holds the
    file): the receiver still gets every byte, byte-identical, and then EOF (not a reset)."""
    chat, t, data, alice, bob = send_file(route, size, inbound)
    with chat:
        assert chat.pump(lambda: t.done, 90), (
            f"the transfer did not finish: offer {t.offer}, {len(t.received)} of {size} bytes, acked {t.acked}\n"
            f"{route.failure_logs()}")
        assert not t.connect_error, t.connect_error
        assert t.offer["port"] in route.gateway.dcc_ports, f"the receiver was not sent to the relay: {t.offer}"
        assert t.acked == size, f"the sender saw {t.acked} of {size} bytes acknowledged"
        assert t.name in chat.sender_closed_at, "the sender did not close after its last ACK"
        assert len(t.received) == size and sha256(bytes(t.received)) == sha256(data), (
            f"{bob.nick} got {len(t.received)} of {size} bytes after the sender closed\n{route.failure_logs()}")
        alert = route.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha256(data))
        assert alert and alert["event"]["action"] in ("allow", "alert"), alert


@pytest.mark.parametrize("inbound", [True, False], ids=["inbound", "outbound"])
def test_big_file_reaches_a_slow_receiver_whole(route, inbound):
    """A receiver that reads slower than the sender writes: the sender has its last ACK (and closes) long before the
    receiver has the file; the gateway keeps delivering at the receiver's pace until the last byte, then EOF."""
    size = int(1.5 * MB)
    chat, t, data, alice, bob = send_file(route, size, inbound, read_delay=0.01)
    with chat:
        assert chat.pump(lambda: t.done, 120), (
            f"the transfer did not finish: {len(t.received)} of {size} bytes, acked {t.acked}\n{route.failure_logs()}")
        assert not t.connect_error, t.connect_error
        assert t.name in chat.sender_closed_at, "the sender did not close after its last ACK"
        assert len(t.received) == size and sha256(bytes(t.received)) == sha256(data), (
            f"the slow receiver got {len(t.received)} of {size} bytes\n{route.failure_logs()}")


@pytest.mark.parametrize("inbound", [True, False], ids=["inbound", "outbound"])
def test_eicar_inside_a_big_file_is_still_blocked(route, inbound):
    """EICAR 1 MB into a 1.5 MB file: the receiver gets none of it, the block is recorded; the IRC connections
    carry on (a sentinel message arrives)."""
    size = int(1.5 * MB)
    chat, t, data, alice, bob = send_file(route, size, inbound, eicar_at=MB)
    with chat:
        assert chat.pump(lambda: t.done, 90), (
            f"the transfer did not end: {len(t.received)} bytes, acked {t.acked}\n{route.failure_logs()}")
        assert t.offer["port"] in route.gateway.dcc_ports, t.offer
        assert bytes(t.received) == b"", f"the receiver got {len(t.received)} bytes of a file holding EICAR"
        alert = route.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha256(data)
                                 and e["event"].get("action") in ("block", "quarantine"))
        assert alert, f"no block alert for the big file holding EICAR\n{route.failure_logs()}"
        inside = bob if inbound else alice
        assert chat.pump(lambda: any(t.name in n for n in inside.imguard_notices()), 15), (
            f"{inside.nick} (inside) was not told: {inside.notices}")
        chat.sentinel(alice, bob, "after the blocked big file")


@pytest.mark.parametrize("way", ["inbound", "outbound"])
@pytest.mark.parametrize("size", [int(1.5 * MB), 8 * MB], ids=["1.5MB", "8MB"])
def test_big_file_by_weechat_dcc_lands_whole(ircd, irc_gateway, tmp_path, way, size):  # noqa: F811
    """WeeChat's own xfer on both ends (`/dcc send`; its sender closes once it has the ACK of the last byte, which the
    gateway gives while it holds the file): the receiving WeeChat ends the transfer OK and the file it stored has the
    SHA-256 of the one sent."""
    weechat_binary()
    data = payload(size)
    with Pair(tmp_path, ircd, irc_gateway, way) as pair:
        path = pair.file("big", data, ".bin")
        pair.sender.send_file(pair.receiver, path)
        result = pair.receiver.transfer_result(path.name, pair.sender, timeout=90)
        landed = pair.receiver.received(path.name, pair.sender)
        got = landed.read_bytes() if landed.exists() else b""
        assert result == "OK", f"the receiver's xfer ended {result!r} with {len(got)} of {size} bytes\n{pair.failure()}"
        assert len(got) == size and sha256(got) == sha256(data), f"{len(got)} of {size} bytes landed"
        alert = irc_gateway.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha256(data),
                                   since=pair.since)
        assert alert and alert["imguard"]["context"]["direction"] == way, alert


# --- the close rule, without the network --------------------------------------------------------------------

def held_file(data: bytes) -> HeldTransfer:
    ctx = ChatContext(protocol="irc", sender="alice", recipients=("bob",), origin=FROM_SERVER, connection_id="irc-1")
    t = HeldTransfer("t", ctx, sender_is_client=False, kind="dcc", max_bytes=len(data), size=len(data),
                     owns_connection=True)
    assert t.append(data) == [] and isinstance(t.inspect()[0], InspectFile)
    return t


@pytest.mark.parametrize("closes", ["sender-before-verdict", "sender-after-release", "receiver-after-release"])
def test_a_close_after_the_release_is_graceful(closes):
    """The close that follows a release lets the released bytes arrive first (Close.graceful: the gateway half-closes
    and reads on until the peer closes); a stopped file's close is not (nothing of it is on its way)."""
    data = b"x" * 1000
    t = held_file(data)
    if closes == "sender-before-verdict":
        assert t.sender_closed() == []
        out = t.verdict(Decision(action="allow"))
    else:
        assert t.verdict(Decision(action="allow")) == [Send(to_client=True, data=data)]
        out = t.sender_closed() if closes == "sender-after-release" else t.receiver_closed()
    close = out[-1]
    assert isinstance(close, Close) and close.graceful, out
    blocked = held_file(data)
    out = blocked.verdict(Decision(action="block"))
    assert isinstance(out[-1], Close) and not out[-1].graceful, out
