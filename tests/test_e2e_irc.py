"""IRC end to end, with real parts only: `irc` library clients, a real ngIRCd, the real `imguard run`.

Every scenario runs on four routes: straight to ngIRCd (the control: it proves the fixture, so a failure on
a gateway route is the gateway's) and through imguard (reverse:tcp in front of ngIRCd, DCC offers rewritten
to the gateway's relay ports), each in cleartext and with TLS. Through imguard the TLS clients verify
imguard's CA; the gateway verifies ngIRCd's certificate with the test CA. DCC data connections are plain
TCP on every route (as DCC is).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import struct
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

import irc.client as irc_client
import irc.connection as irc_connection

from tests.peers.folders import kept_if_failed
from tests.peers.ngircd import CHANNEL, IrcGateway, NgIrcd

pytestmark = pytest.mark.timeout(120)

# The EICAR anti-virus test file, assembled at run time so the repository holds no file a scanner flags.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
assert len(EICAR) == 68
CLEAN = b"quarterly numbers, nothing secret\n" * 400 + bytes(range(256)) * 8   # binary tail, 15.6 kB
# Blocked by the test policy in tests/data/rules (a keyword rule, as a security team would write).
BLOCKED_WORD = "project-bluebird"
BLOCKED_RULE = "test-codename-block"
BLOCKED_NOTICE = "Your message was blocked: it names a confidential project."


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- peers ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def irc_dir(request) -> Path:
    """This module's own folder for the peers' files and logs (as conftest's peers_dir, under its own prefix):
    removed when every test passed (unless IMGUARD_E2E_KEEP=1), kept for reading otherwise."""
    with kept_if_failed(request, "imguard-irc-") as directory:
        yield directory


@pytest.fixture(scope="module")
def ircd(irc_dir):
    """A real ngIRCd: cleartext and TLS (certificate of a throwaway test CA), channel #imguard."""
    server = NgIrcd.start(irc_dir / "ngircd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def irc_gateway(irc_dir, ircd):
    """The real `imguard run` in front of `ircd`, with --dcc-relay 127.0.0.1. Fails if it crashed."""
    gw = IrcGateway.start(irc_dir / "imguard", ircd)
    try:
        yield gw
    finally:
        status = gw.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


class Route:
    """How the clients reach ngIRCd in one parametrized run."""

    def __init__(self, name: str, tls: bool, ircd: NgIrcd, gateway: IrcGateway | None):
        self.name, self.tls, self.ircd, self.gateway = name, tls, ircd, gateway
        self.since = gateway.mark() if gateway else 0
        if gateway is None:
            self.port = ircd.tls_port if tls else ircd.port
            self.ca_file = ircd.ca_file
        else:
            self.port = gateway.tls_port if tls else gateway.port
            self.ca_file = gateway.ca_file

    @property
    def through_gateway(self) -> bool:
        return self.gateway is not None

    def wait_alert(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict | None:
        """An event the gateway logged during this test that satisfies `predicate`."""
        return self.gateway.wait_alert(predicate, since=self.since, timeout=timeout)

    def alerts(self) -> list[dict]:
        return self.gateway.alerts()[self.since:]

    def failure_logs(self) -> str:
        return (self.gateway.logs(40) if self.gateway else "") + "\n" + self.ircd.logs(20)

    def __repr__(self) -> str:
        return f"{self.name}-{'tls' if self.tls else 'plain'}"


@pytest.fixture(params=[("control", False), ("control", True), ("imguard", False), ("imguard", True)],
                ids=lambda p: f"{p[0]}-{'tls' if p[1] else 'plain'}")
def route(request, ircd) -> Route:
    name, tls = request.param
    gateway = request.getfixturevalue("irc_gateway") if name == "imguard" else None
    if gateway is not None:
        gateway.check_alive()
        log_offset = gateway.log_size()
    yield Route(name, tls, ircd, gateway)
    if gateway is not None:
        gateway.check_alive()
        errors = gateway.errors_since(log_offset)
        assert not errors, "imguard logged errors during the test:\n" + "\n".join(errors) + "\n" + gateway.logs()


@pytest.fixture
def gateway_route(request, ircd, irc_gateway) -> Route:
    """Through imguard, cleartext (robustness tests that need no control)."""
    irc_gateway.check_alive()
    log_offset = irc_gateway.log_size()
    yield Route("imguard", False, ircd, irc_gateway)
    irc_gateway.check_alive()
    errors = irc_gateway.errors_since(log_offset)
    assert not errors, "imguard logged errors during the test:\n" + "\n".join(errors) + "\n" + irc_gateway.logs()


# --- clients ----------------------------------------------------------------------------------------------

class Person:
    """One IRC user: an irc.client connection and everything it was told."""

    def __init__(self, nick: str, conn):
        self.nick = nick
        self.conn = conn
        self.welcomed = False
        self.joined = False
        self.disconnected = False
        self.channel: list[tuple[str, str]] = []       # (from nick, text) in CHANNEL
        self.private: list[tuple[str, str]] = []       # (from nick, text)
        self.notices: list[tuple[str, str]] = []       # (from, text), server and imguard notices
        self.offers: list[dict] = []                    # DCC SEND offers received

    def imguard_notices(self) -> list[str]:
        return [text for source, text in self.notices if source == "imguard"]

    def channel_texts(self) -> list[str]:
        return [text for _, text in self.channel]


class DccTransfer:
    """One DCC SEND. Active: the sender listens, the receiver connects. Passive (reverse, port 0 + token): the
    receiver listens and answers with its address, the sender connects to the address *it* is answered."""

    def __init__(self, name: str, payload: bytes, passive: bool = False, sender_closes_after_delivery: bool = False):
        self.name = name
        self.payload = payload
        self.passive = passive
        # As irssi: the sender keeps its connection after the last ACK and the receiver does not close when it has
        # every byte; the test closes the sender's side, and the receiver waits for that close (EOF).
        self.sender_closes_after_delivery = sender_closes_after_delivery
        self.token = uuid.uuid4().hex[:6] if passive else ""
        self.sender_conn = None         # the sender's DCCConnection (listening when active)
        self.receiver_conn = None       # the receiver's DCCConnection (listening when passive)
        self.acked = 0
        self.received = bytearray()
        self.receiver_closed = False
        self.receiver_eof = False       # the receiver's connection ended by EOF (recv gave b""), not by a reset
        self.connect_error = ""
        self.offer: dict | None = None        # the address the connecting side was given
        self.listen_port = 0                  # where the listening side really listens
        self.sender_nick = ""
        self.receiver_nick = ""

    @property
    def done(self) -> bool:
        return self.receiver_closed or self.connect_error != ""


class DccChatPair:
    """One DCC CHAT: the offerer listens, the other side connects to the address its offer names."""

    def __init__(self, receiver_nick: str):
        self.receiver_nick = receiver_nick
        self.listener = None            # the offerer's DCCConnection
        self.connector = None           # the receiver's DCCConnection
        self.listen_port = 0
        self.offer: dict | None = None
        self.offerer_connected = False
        self.lines: dict[str, list[str]] = {"offerer": [], "receiver": []}     # lines each side received
        self.connect_error = ""


class Chat:
    """The `irc` library's Reactor, driven from the test thread: `pump(until)` runs it until a condition holds."""

    def __init__(self, route: Route):
        self.route = route
        self.reactor = irc_client.Reactor()
        self.people: dict[object, Person] = {}
        self.transfers: list[DccTransfer] = []
        self.chats: list[DccChatPair] = []
        self.factory = self._factory(route.ca_file)
        # Someone outside the company: connected straight to ngIRCd, whatever the route.
        self.outside_factory = self._factory(route.ircd.ca_file)
        for name in ("welcome", "join", "pubmsg", "privmsg", "privnotice", "pubnotice", "ctcp", "disconnect",
                     "dcc_connect", "dccmsg", "dcc_disconnect"):
            self.reactor.add_global_handler(name, getattr(self, f"_on_{name}"))

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        for t in self.transfers + self.chats:
            for dcc in (getattr(t, "sender_conn", None), getattr(t, "receiver_conn", None),
                        getattr(t, "listener", None), getattr(t, "connector", None)):
                if dcc is not None and getattr(dcc, "connected", False):
                    dcc.disconnect()
        for person in self.people.values():
            if not person.disconnected:
                try:
                    person.conn.disconnect("bye")
                except Exception:
                    pass
        self.pump(lambda: False, 0.2)

    # --- driving ---

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if until():
                return True
            if time.monotonic() > deadline:
                return False
            self.reactor.process_once(0.05)

    def _factory(self, ca_file: Path):
        if not self.route.tls:
            return irc_connection.Factory()
        context = ssl.create_default_context(cafile=str(ca_file))
        return irc_connection.Factory(wrapper=lambda sock: context.wrap_socket(sock, server_hostname="localhost"))

    def person(self, base: str, join: bool = True, outside: bool = False) -> Person:
        """A new user `base_xxxx` (unique per test: the server is shared), registered and in CHANNEL. By the route
        (through imguard: inside the company), or `outside`: straight to ngIRCd, in cleartext or TLS as the route."""
        nick = f"{base}_{uuid.uuid4().hex[:4]}"
        if outside:
            port = self.route.ircd.tls_port if self.route.tls else self.route.ircd.port
            conn = self.reactor.server().connect("127.0.0.1", port, nick, connect_factory=self.outside_factory)
        else:
            conn = self.reactor.server().connect("127.0.0.1", self.route.port, nick, connect_factory=self.factory)
        person = Person(nick, conn)
        self.people[conn] = person
        assert self.pump(lambda: person.welcomed or person.disconnected, 15), (
            f"{nick} was not welcomed by the server via {self.route}\n{self.route.failure_logs()}")
        assert person.welcomed, f"{nick} was disconnected before the welcome\n{self.route.failure_logs()}"
        if join:
            conn.join(CHANNEL)
            assert self.pump(lambda: person.joined, 15), f"{nick} could not join {CHANNEL}"
        return person

    def sentinel(self, sender: Person, receiver: Person, note: str) -> None:
        """One more plain channel message, waited for: whatever the receiver would have got before it
        has arrived by then (the server keeps the order of one sender's lines)."""
        text = f"sentinel {note} {uuid.uuid4().hex[:6]}"
        sender.conn.privmsg(CHANNEL, text)
        assert self.pump(lambda: text in receiver.channel_texts(), 15), (
            f"the sentinel {text!r} did not reach {receiver.nick}; it got {receiver.channel}")

    def offer_file(self, sender: Person, receiver: Person, name: str, payload: bytes,
                   passive: bool = False, sender_closes_after_delivery: bool = False) -> DccTransfer:
        """DCC SEND. Active: the sender listens and offers; the receiver connects to whatever address the offer
        it *receives* names, takes the bytes and ACKs them; the sender closes after the last ACK (unless
        `sender_closes_after_delivery`: then neither side closes by itself, see DccTransfer). Passive: the
        sender offers port 0 and a token, the receiver listens and answers (see _on_ctcp)."""
        t = DccTransfer(name, payload, passive, sender_closes_after_delivery)
        t.sender_nick, t.receiver_nick = sender.nick, receiver.nick
        ip = irc_client.ip_quad_to_numstr("127.0.0.1")
        if passive:
            sender.conn.ctcp("DCC", receiver.nick, f"SEND {name} {ip} 0 {len(payload)} {t.token}")
        else:
            t.sender_conn = self.reactor.dcc("raw")
            t.sender_conn.listen(("127.0.0.1", 0))
            t.listen_port = t.sender_conn.localport
            sender.conn.ctcp("DCC", receiver.nick, f"SEND {name} {ip} {t.listen_port} {len(payload)}")
        self.transfers.append(t)
        return t

    def _connect(self, t: DccTransfer, host: str, port: int):
        conn = self.reactor.dcc("raw")
        try:
            conn.connect(host, port)
        except irc_client.DCCConnectionError as e:
            t.connect_error = str(e)
        return conn

    @staticmethod
    def _watch_eof(t: DccTransfer, conn) -> None:
        """Note on `t` whether the receiver's connection ends with EOF: the irc library reports an EOF and a reset
        alike (dcc_disconnect), so each read first peeks at what the socket has."""
        process_data = conn.process_data

        def peek_then_process() -> None:
            if getattr(conn, "connected", False):
                try:
                    t.receiver_eof = conn.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except OSError:         # nothing to read yet, or a reset
                    pass
            process_data()
        conn.process_data = peek_then_process

    def offer_chat(self, offerer: Person, receiver: Person) -> DccChatPair:
        """DCC CHAT: the offerer listens and offers; the receiver connects to the address it is offered."""
        pair = DccChatPair(receiver.nick)
        pair.listener = self.reactor.dcc("chat")
        pair.listener.listen(("127.0.0.1", 0))
        pair.listen_port = pair.listener.localport
        self.chats.append(pair)
        offerer.conn.ctcp("DCC", receiver.nick,
                          f"CHAT chat {irc_client.ip_quad_to_numstr('127.0.0.1')} {pair.listen_port}")
        return pair

    # --- events ---

    def _person(self, conn) -> Person | None:
        return self.people.get(conn)

    def _on_welcome(self, conn, event):
        if (p := self._person(conn)) is not None:
            p.welcomed = True

    def _on_join(self, conn, event):
        p = self._person(conn)
        if p is not None and irc_client.NickMask(event.source).nick == p.nick:
            p.joined = True

    def _on_pubmsg(self, conn, event):
        if (p := self._person(conn)) is not None:
            p.channel.append((irc_client.NickMask(event.source).nick, event.arguments[0]))

    def _on_privmsg(self, conn, event):
        if (p := self._person(conn)) is not None:
            p.private.append((irc_client.NickMask(event.source).nick, event.arguments[0]))

    def _on_privnotice(self, conn, event):
        if (p := self._person(conn)) is not None:
            source = irc_client.NickMask(event.source).nick if event.source else ""
            p.notices.append((source, event.arguments[0]))

    _on_pubnotice = _on_privnotice

    def _on_disconnect(self, conn, event):
        if (p := self._person(conn)) is not None:
            p.disconnected = True

    def _on_ctcp(self, conn, event):
        p = self._person(conn)
        if p is None or event.arguments[0] != "DCC" or len(event.arguments) < 2:
            return
        words = event.arguments[1].split()
        if len(words) >= 4 and words[0].upper() == "CHAT":
            for pair in self.chats:
                if pair.offer is None and pair.receiver_nick == p.nick:
                    pair.offer = {"host": irc_client.ip_numstr_to_quad(words[2]), "port": int(words[3])}
                    pair.connector = self.reactor.dcc("chat")
                    try:
                        pair.connector.connect(pair.offer["host"], pair.offer["port"])
                    except irc_client.DCCConnectionError as e:
                        pair.connect_error = str(e)
            return
        if len(words) < 5 or words[0].upper() != "SEND":
            return
        offer = {"name": words[1], "host": irc_client.ip_numstr_to_quad(words[2]), "port": int(words[3]),
                 "size": int(words[4]), "token": words[5] if len(words) > 5 else "",
                 "from": irc_client.NickMask(event.source).nick}
        p.offers.append(offer)
        for t in self.transfers:
            if t.name != offer["name"] or t.offer is not None:
                continue
            if not t.passive and t.receiver_nick == p.nick:
                t.offer = offer
                t.receiver_conn = self._connect(t, offer["host"], offer["port"])
                self._watch_eof(t, t.receiver_conn)
            elif t.passive and t.receiver_nick == p.nick and offer["port"] == 0 and offer["token"] == t.token:
                # The receiver of a passive offer listens and tells the sender where.
                t.receiver_conn = self.reactor.dcc("raw")
                t.receiver_conn.listen(("127.0.0.1", 0))
                t.listen_port = t.receiver_conn.localport
                conn.ctcp("DCC", offer["from"], f"SEND {t.name} {irc_client.ip_quad_to_numstr('127.0.0.1')} "
                                                f"{t.listen_port} {len(t.payload)} {t.token}")
            elif t.passive and t.sender_nick == p.nick and offer["port"] and offer["token"] == t.token:
                t.offer = offer
                t.sender_conn = self._connect(t, offer["host"], offer["port"])
                if not t.connect_error:
                    t.sender_conn.socket.sendall(t.payload)

    def _on_dcc_connect(self, conn, event):
        for pair in self.chats:
            if conn is pair.listener:
                pair.offerer_connected = True
        for t in self.transfers:
            if conn is t.sender_conn and not t.passive:
                conn.socket.sendall(t.payload)

    def _on_dccmsg(self, conn, event):
        data = event.arguments[0]
        for pair in self.chats:
            if conn is pair.listener:
                pair.lines["offerer"].append(data.decode("utf-8", "replace"))
            elif conn is pair.connector:
                pair.lines["receiver"].append(data.decode("utf-8", "replace"))
        for t in self.transfers:
            if conn is t.receiver_conn:
                t.received += data
                conn.send_bytes(struct.pack("!I", len(t.received) & 0xFFFFFFFF))
                if len(t.received) >= len(t.payload) and not t.sender_closes_after_delivery:
                    conn.disconnect()
            elif conn is t.sender_conn and len(data) >= 4:
                t.acked = struct.unpack("!I", data[-4:])[0]
                if t.acked >= len(t.payload) and not t.sender_closes_after_delivery:
                    conn.disconnect()           # as real clients do after the last ACK

    def _on_dcc_disconnect(self, conn, event):
        for t in self.transfers:
            if conn is t.receiver_conn:
                t.receiver_closed = True


# --- messages ---------------------------------------------------------------------------------------------

def test_channel_message_arrives_unchanged(route):
    """A channel message (with non-ASCII text) reaches the other user exactly as sent."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        text = f"hello channel ünïcödé ✓ <&> {uuid.uuid4().hex[:6]}"
        alice.conn.privmsg(CHANNEL, text)
        assert chat.pump(lambda: (alice.nick, text) in bob.channel, 15), (
            f"bob never got {text!r}; he got {bob.channel}\n{route.failure_logs()}")
        if route.through_gateway:
            alert = route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                     and text in str(e.get("imguard", {}).get("message")))
            assert alert, "imguard recorded no message event for the channel message"
            assert alert["event"]["action"] == "allow"
            assert alert["source"]["user"]["name"] == alice.nick


def test_blocked_keyword_never_arrives_and_sender_gets_notice(route):
    """A message with a keyword the policy blocks stays with imguard; alice gets imguard's NOTICE saying why."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        text = f"the {BLOCKED_WORD} launch date is friday"
        alice.conn.privmsg(CHANNEL, text)
        chat.sentinel(alice, bob, "after blocked keyword")
        if not route.through_gateway:
            assert text in bob.channel_texts(), "control: ngIRCd itself delivers the message"
            return
        assert not any(BLOCKED_WORD in t for t in bob.channel_texts()), f"bob saw the keyword: {bob.channel}"
        assert chat.pump(lambda: alice.imguard_notices(), 5), (
            f"alice got no NOTICE from imguard; her notices: {alice.notices}")
        assert BLOCKED_NOTICE in alice.imguard_notices(), alice.imguard_notices()
        alert = route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                 and e["event"].get("action") == "block" and BLOCKED_WORD in str(e))
        assert alert, f"no block alert in {route.gateway.alerts_file}"
        assert alert["source"]["user"]["name"] == alice.nick
        assert alert["rule"]["id"] == BLOCKED_RULE


# --- files ------------------------------------------------------------------------------------------------

def test_clean_file_by_dcc_arrives_byte_identical(route):
    """A harmless file sent by DCC SEND arrives with the same SHA-256; through imguard the receiver was sent to
    the gateway's relay port, not to the sender."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        name = f"numbers-{uuid.uuid4().hex[:6]}.bin"
        t = chat.offer_file(alice, bob, name, CLEAN)
        assert chat.pump(lambda: t.done, 20), (
            f"the transfer did not finish: offer {t.offer}, {len(t.received)} bytes\n{route.failure_logs()}")
        assert not t.connect_error, t.connect_error
        assert sha256(bytes(t.received)) == sha256(CLEAN), (
            f"bob got {len(t.received)} bytes, not the {len(CLEAN)} sent ({route})")
        if not route.through_gateway:
            assert t.offer["port"] == t.listen_port, "control: bob connects to alice herself"
            return
        assert t.offer["host"] == "127.0.0.1" and t.offer["port"] in route.gateway.dcc_ports, (
            f"the offer bob got does not point at imguard's relay: {t.offer}")
        alert = route.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha256(CLEAN))
        assert alert, "imguard recorded no file event for the clean DCC transfer"
        assert alert["event"]["action"] in ("allow", "alert"), alert["event"]
        assert alert["file"]["name"] == name
        assert not alice.imguard_notices(), f"alice was told something about a clean file: {alice.notices}"


def test_clean_file_by_dcc_ends_when_the_sender_closes_after_delivery(route):
    """The irssi case: the sender keeps its DCC connection open until the receiver has every byte, and the
    receiver does not close by itself but waits for the sender's close (irssi stays at 100% until it sees EOF).
    Through imguard the file is released while the sender's connection is still open, so the gateway must pass
    the sender's later close on: the receiver's connection sees EOF within a bounded wait, the file intact."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        name = f"waits-{uuid.uuid4().hex[:6]}.bin"
        t = chat.offer_file(alice, bob, name, CLEAN, sender_closes_after_delivery=True)
        # The sender closes once bob has it all and it read its last ACK (an unread ACK would make its close a reset).
        assert chat.pump(lambda: (len(t.received) >= len(CLEAN) and t.acked >= len(CLEAN)) or t.done, 20), (
            f"the transfer did not arrive: offer {t.offer}, {len(t.received)} bytes, acked {t.acked}\n"
            f"{route.failure_logs()}")
        assert not t.connect_error, t.connect_error
        assert not t.receiver_closed, "bob's DCC connection ended before alice closed hers"
        assert sha256(bytes(t.received)) == sha256(CLEAN), f"bob got {len(t.received)} bytes ({route})"
        t.sender_conn.disconnect()
        assert chat.pump(lambda: t.receiver_closed, 10), (
            f"alice closed her DCC connection but bob's stayed open: a receiver that waits for the sender's close "
            f"(irssi) would wait at 100% forever ({route})\n{route.failure_logs()}")
        assert t.receiver_eof, "bob's DCC connection ended with a reset, not the sender's EOF"
        assert bytes(t.received) == CLEAN
        if route.through_gateway:
            assert t.offer["port"] in route.gateway.dcc_ports, f"bob was not sent to imguard's relay: {t.offer}"
        else:
            assert t.offer["port"] == t.listen_port, "control: bob connects to alice herself"


def test_eicar_by_dcc_never_reaches_receiver(route):
    """The EICAR test file sent by DCC SEND is held and dropped: bob's data connection closes with nothing
    received, alice is told in the chat, and the alert names sender, receiver, file name, SHA-256 and rule."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        name = f"eicar-{uuid.uuid4().hex[:6]}.com"
        t = chat.offer_file(alice, bob, name, EICAR)
        assert chat.pump(lambda: t.done, 20), (
            f"the transfer did not end: offer {t.offer}, {len(t.received)} bytes\n{route.failure_logs()}")
        if not route.through_gateway:
            assert bytes(t.received) == EICAR, "control: ngIRCd and the clients deliver the file"
            return
        assert t.offer is not None and t.offer["port"] in route.gateway.dcc_ports, t.offer
        assert bytes(t.received) == b"", f"bob received {len(t.received)} bytes of the blocked file"
        assert chat.pump(lambda: any(name in n for n in alice.imguard_notices()), 10), (
            f"alice got no NOTICE naming {name}: {alice.notices}\n{route.failure_logs()}")
        alert = route.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha256(EICAR)
                                 and e["event"].get("action") in ("block", "quarantine"))
        assert alert, f"no block alert for EICAR in {route.gateway.alerts_file}\n{route.failure_logs()}"
        assert alert["source"]["user"]["name"] == alice.nick, alert.get("source")
        assert bob.nick in alert["imguard"]["context"]["recipients"], alert["imguard"]["context"]
        assert alert["file"]["name"] == name, alert["file"]
        assert alert["imguard"]["context"]["transfer_mechanism"] == "dcc"
        assert alert.get("rule", {}).get("id"), "the alert names no rule"
        notify = route.wait_alert(lambda e: (e.get("imguard", {}).get("notify") or {}).get("text", "").find(name) >= 0)
        assert notify, "no notify record for the blocked DCC file"
        chat.sentinel(alice, bob, "after blocked file")     # both IRC sessions carry on


def test_dcc_chat_line_with_blocked_keyword_is_stopped(route):
    """DCC CHAT goes through the relay too, and each line is a message: a plain line arrives, a line with the
    blocked keyword does not and its writer gets an `[imguard] ...` line on the DCC connection."""
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        pair = chat.offer_chat(alice, bob)
        assert chat.pump(lambda: pair.offerer_connected or pair.connect_error, 15), (
            f"the DCC CHAT did not connect: offer {pair.offer}\n{route.failure_logs()}")
        assert not pair.connect_error, pair.connect_error
        tag = uuid.uuid4().hex[:6]
        pair.listener.privmsg(f"hello over dcc {tag}")
        pair.listener.privmsg(f"the {BLOCKED_WORD} plan {tag}")
        pair.listener.privmsg(f"after {tag}")
        assert chat.pump(lambda: f"after {tag}" in pair.lines["receiver"], 15), (
            f"bob's DCC CHAT lines: {pair.lines['receiver']}\n{route.failure_logs()}")
        assert f"hello over dcc {tag}" in pair.lines["receiver"]
        if not route.through_gateway:
            assert pair.offer["port"] == pair.listen_port, "control: bob connects to alice herself"
            assert f"the {BLOCKED_WORD} plan {tag}" in pair.lines["receiver"], "control: the line arrives"
            return
        assert pair.offer["host"] == "127.0.0.1" and pair.offer["port"] in route.gateway.dcc_ports, pair.offer
        assert not any(BLOCKED_WORD in line for line in pair.lines["receiver"]), pair.lines["receiver"]
        assert chat.pump(lambda: any(line.startswith("[imguard]") for line in pair.lines["offerer"]), 5), (
            f"alice got no [imguard] line on the DCC CHAT: {pair.lines['offerer']}")
        alert = route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                 and e["event"].get("action") == "block" and tag in str(e))
        assert alert and alert["source"]["user"]["name"] == alice.nick, alert
        assert bob.nick in alert["imguard"]["context"]["recipients"], alert["imguard"]["context"]


@pytest.mark.parametrize("payload", ["clean", "eicar"])
def test_passive_dcc_goes_through_the_relay(route, payload):
    """Passive (reverse) DCC SEND: the receiver listens and answers the token; through imguard the answer is
    rewritten so the *sender* connects to the relay, and the file is held the same way: a clean file arrives
    byte-identical, EICAR never does and alice is told."""
    data = CLEAN if payload == "clean" else EICAR
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        name = f"passive-{payload}-{uuid.uuid4().hex[:6]}.bin"
        t = chat.offer_file(alice, bob, name, data, passive=True)
        assert chat.pump(lambda: t.done, 20), (
            f"the passive transfer did not end: answer {t.offer}, {len(t.received)} bytes\n{route.failure_logs()}")
        assert not t.connect_error, t.connect_error
        if not route.through_gateway:
            assert t.offer["port"] == t.listen_port, "control: alice connects to bob herself"
            assert bytes(t.received) == data, "control: the passive transfer delivers the file"
            return
        assert t.offer["host"] == "127.0.0.1" and t.offer["port"] in route.gateway.dcc_ports, (
            f"the answer alice got does not point at imguard's relay: {t.offer}")
        if payload == "clean":
            assert sha256(bytes(t.received)) == sha256(CLEAN), f"bob got {len(t.received)} bytes"
            return
        assert bytes(t.received) == b"", f"bob received {len(t.received)} bytes of the blocked file"
        # bob's IrcSession registers the rewritten answer first; alice's, seeing it, takes the offer as her outbound
        # file, so alice (the sender) is told (test_passive_dcc_blocked_sender_gets_notice).
        assert chat.pump(lambda: any(name in n for n in alice.imguard_notices() + bob.imguard_notices()), 10), (
            f"nobody got a NOTICE naming {name}: alice {alice.notices}, bob {bob.notices}")
        alert = route.wait_alert(lambda e: e.get("file", {}).get("name") == name
                                 and e["event"].get("action") in ("block", "quarantine"))
        assert alert, f"no block alert for the passive EICAR transfer\n{route.failure_logs()}"
        # Registered from bob's side, the offer names alice by her full mask (nick!user@host).
        assert alert["source"]["user"]["name"].split("!")[0] == alice.nick, alert["source"]
        assert bob.nick in alert["imguard"]["context"]["recipients"], alert["imguard"]["context"]
        assert alert["file"]["hash"]["sha256"] == sha256(EICAR) and alert.get("rule", {}).get("id")


def test_passive_dcc_blocked_sender_gets_notice(gateway_route):
    """The sender of a blocked passive DCC file is told, as for active DCC."""
    route = gateway_route
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        name = f"passive-notice-{uuid.uuid4().hex[:6]}.com"
        t = chat.offer_file(alice, bob, name, EICAR, passive=True)
        assert chat.pump(lambda: t.done, 20)
        assert bytes(t.received) == b""
        assert chat.pump(lambda: any(name in n for n in alice.imguard_notices()), 5), (
            f"alice got no NOTICE naming {name}; bob got {bob.imguard_notices()}")


# --- robustness -------------------------------------------------------------------------------------------

def test_malformed_lines_are_anomalies_and_other_sessions_carry_on(gateway_route):
    """eve sends a line with a NUL byte (dropped, anomaly) and then 9000 bytes without a line end (her
    connection is closed, anomaly); alice and bob keep chatting and bob never sees eve's bytes."""
    route = gateway_route
    with Chat(route) as chat:
        alice, bob, eve = chat.person("alice"), chat.person("bob"), chat.person("eve")
        marker = uuid.uuid4().hex[:8]
        eve.conn.send_raw(f"PRIVMSG {CHANNEL} :nul{marker}\x00hidden")
        chat.sentinel(eve, bob, "after the NUL line")       # eve's session carries on after a dropped line
        assert not any(marker in t for t in bob.channel_texts()), f"bob got eve's NUL line: {bob.channel}"
        nul = route.wait_alert(lambda e: (e.get("imguard", {}).get("anomaly") or {}).get("kind") == "nul_byte"
                               and marker in str(e))
        assert nul, "the NUL line was not recorded as an anomaly"
        assert nul["imguard"]["context"]["sender"] == eve.nick
        eve.conn.socket.sendall(b"PRIVMSG " + CHANNEL.encode() + b" :" + marker.encode() + b"A" * 9000)
        assert chat.pump(lambda: eve.disconnected, 10), "eve's connection was left open after an overlong line"
        long_line = route.wait_alert(lambda e: (e.get("imguard", {}).get("anomaly") or {}).get("kind")
                                     == "line_too_long" and e["imguard"]["context"]["sender"] == eve.nick)
        assert long_line, "the overlong line was not recorded as an anomaly naming eve"
        text = f"still here {uuid.uuid4().hex[:6]}"
        alice.conn.privmsg(CHANNEL, text)
        assert chat.pump(lambda: text in bob.channel_texts(), 15), "alice's message after eve's lines did not arrive"
        assert not any(marker in t for t in bob.channel_texts() if "sentinel" not in t), bob.channel


def test_unannounced_connection_to_a_relay_port_is_refused(gateway_route):
    """A connection to a DCC relay port that no offer announced gets nothing from anyone and is closed; the
    gateway records a dcc_unannounced anomaly."""
    route = gateway_route
    port = route.gateway.dcc_ports[-1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(b"\x00\x00\x00\x00")
        except OSError:
            pass
        sock.settimeout(5)
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"", f"an unannounced relay connection was answered: {data!r}"
    alert = route.wait_alert(lambda e: (e.get("imguard", {}).get("anomaly") or {}).get("kind") == "dcc_unannounced"
                             and str(port) in str(e["imguard"]["anomaly"]))
    assert alert, "no dcc_unannounced anomaly for the stray relay connection"


# --- across the perimeter: one person outside (straight to ngIRCd), one inside (through imguard) -------------

WAYS = ("inbound", "outbound")      # inbound: the sender is outside, the receiver inside; outbound: the reverse


def across(chat: Chat, way: str) -> tuple[Person, Person]:
    """(sender, receiver) for `way`: the outside one connects straight to ngIRCd, the inside one by the route."""
    sender = chat.person("alice", outside=way == "inbound")
    receiver = chat.person("bob", outside=way == "outbound")
    return sender, receiver


def assert_parties(alert: dict, way: str, sender: Person, receiver: Person) -> None:
    """The alert says the direction and names both parties: the outside sender by the mask the server gave it
    (nick!user@host), the inside one by its nick; the receiver among the recipients."""
    ctx = alert["imguard"]["context"]
    assert ctx["direction"] == way, f"direction {ctx['direction']!r}, not {way}: {ctx}"
    assert ctx["origin"] == ("server" if way == "inbound" else "client"), ctx
    assert alert["source"]["user"]["name"].split("!")[0] == sender.nick, alert["source"]
    if way == "inbound":
        assert alert["source"]["user"]["name"].startswith(sender.nick + "!"), alert["source"]
    assert receiver.nick in ctx["recipients"], ctx


def archive_rows(route: Route, person: str, predicate: Callable[[dict], bool], timeout: float = 10.0) -> list[dict]:
    """The gateway's archive searched by person (as `imguard archive search --person`): the rows that satisfy
    `predicate`, waited for (the archive's writer thread stores records within a moment)."""
    from imguard import archive

    store = archive.Archive(route.gateway.data_dir / "archive.sqlite3")
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in store.search(archive.Query(person=person)) if predicate(r)]
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)
    finally:
        store.close()


@pytest.mark.parametrize("way", WAYS)
def test_message_across_the_perimeter_is_decided_and_archived(route, way):
    """A private message between someone outside and someone inside arrives unchanged either way; imguard
    records it once, with its direction and both parties, and the archive finds it by either person."""
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        text = f"hello {way} ünïcödé ✓ {uuid.uuid4().hex[:6]}"
        sender.conn.privmsg(receiver.nick, text)
        assert chat.pump(lambda: (sender.nick, text) in receiver.private, 15), (
            f"{receiver.nick} never got {text!r}; got {receiver.private}\n{route.failure_logs()}")
        if not route.through_gateway:
            return
        alert = route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                 and text in str(e.get("imguard", {}).get("message")))
        assert alert, f"imguard recorded no message event for the {way} message\n{route.failure_logs()}"
        assert alert["event"]["action"] == "allow", alert["event"]
        assert_parties(alert, way, sender, receiver)
        assert len([e for e in route.alerts() if text in str(e.get("imguard", {}).get("message"))]) == 1, (
            "the message was recorded more than once")
        for person in (sender, receiver):
            rows = archive_rows(route, person.nick, lambda r: r["text"] == text)
            assert len(rows) == 1, f"the archive search for {person.nick} does not return the message: {rows}"
            assert rows[0]["direction"] == way and rows[0]["action"] == "allow", rows[0]


@pytest.mark.parametrize("way", WAYS)
def test_blocked_keyword_across_the_perimeter_never_arrives(route, way):
    """A message with the blocked keyword never reaches the receiver, either way (a sentinel after it arrives and
    it still has not). Inbound, the inside receiver gets imguard's NOTICE saying from whom and why; outbound, the
    inside sender gets the rule's notice. The alert has the direction and both parties."""
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        text = f"the {BLOCKED_WORD} plan {uuid.uuid4().hex[:6]}"
        sender.conn.privmsg(receiver.nick, text)
        chat.sentinel(sender, receiver, f"after blocked {way} keyword")
        if not route.through_gateway:
            assert (sender.nick, text) in receiver.private, "control: ngIRCd itself delivers the message"
            return
        assert not any(BLOCKED_WORD in t for _, t in receiver.private + receiver.channel + receiver.notices), (
            f"{receiver.nick} saw the keyword: {receiver.private} {receiver.notices}")
        if way == "inbound":
            told = [n for n in receiver.imguard_notices() if sender.nick in n and "blocked" in n]
            assert told, f"the inside receiver got no NOTICE from imguard: {receiver.notices}"
            assert "Confidential project codename" in told[0] and BLOCKED_WORD not in told[0], told
        else:
            assert chat.pump(lambda: BLOCKED_NOTICE in sender.imguard_notices(), 5), (
                f"the inside sender got no NOTICE: {sender.notices}")
        alert = route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                 and e["event"].get("action") == "block" and text in str(e))
        assert alert, f"no block alert in {route.gateway.alerts_file}\n{route.failure_logs()}"
        assert alert["rule"]["id"] == BLOCKED_RULE
        assert_parties(alert, way, sender, receiver)
        rows = archive_rows(route, receiver.nick, lambda r: r["text"] == text)
        assert [r["action"] for r in rows] == ["block"], rows
        chat.sentinel(sender, receiver, "a second sentinel")
        assert not any(BLOCKED_WORD in t for _, t in receiver.private), "the blocked message arrived late"


@pytest.mark.parametrize("mode", ["active", "passive"])
@pytest.mark.parametrize("way", WAYS)
def test_eicar_by_dcc_across_the_perimeter_never_reaches_the_receiver(route, way, mode):
    """EICAR by DCC SEND between outside and inside, active and passive: the data connection goes through
    imguard's relay whichever side is inside, and the receiver gets none of the file. The alert says the
    direction and names both parties; the inside person is told in the chat (inbound: the receiver)."""
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        name = f"eicar-{way}-{mode}-{uuid.uuid4().hex[:6]}.com"
        t = chat.offer_file(sender, receiver, name, EICAR, passive=mode == "passive")
        assert chat.pump(lambda: t.done, 20), (
            f"the transfer did not end: offer {t.offer}, {len(t.received)} bytes\n{route.failure_logs()}")
        if not route.through_gateway:
            assert bytes(t.received) == EICAR, "control: ngIRCd and the clients deliver the file"
            return
        assert t.offer is not None and t.offer["host"] == "127.0.0.1" and t.offer["port"] in route.gateway.dcc_ports, (
            f"the connecting side was not sent to imguard's relay: {t.offer}")
        assert bytes(t.received) == b"", f"{receiver.nick} received {len(t.received)} bytes of the blocked file"
        alert = route.wait_alert(lambda e: e.get("file", {}).get("name") == name
                                 and e["event"].get("action") in ("block", "quarantine"))
        assert alert, f"no block alert for EICAR in {route.gateway.alerts_file}\n{route.failure_logs()}"
        assert alert["file"]["hash"]["sha256"] == sha256(EICAR) and alert.get("rule", {}).get("id"), alert
        assert alert["imguard"]["context"]["transfer_mechanism"] == "dcc"
        assert_parties(alert, way, sender, receiver)
        inside = receiver if way == "inbound" else sender
        assert chat.pump(lambda: any(name in n for n in inside.imguard_notices()), 10), (
            f"{inside.nick} (inside) got no NOTICE naming {name}: {inside.notices}\n{route.failure_logs()}")
        outside = sender if way == "inbound" else receiver
        rows = archive_rows(route, outside.nick, lambda r: r["sha256"] == sha256(EICAR) and r["file_name"] == name)
        assert [(r["direction"], r["action"]) for r in rows] == [(way, alert["event"]["action"])], rows
        chat.sentinel(sender, receiver, "after blocked file")
        assert bytes(t.received) == b"", "bytes of the blocked file arrived late"


@pytest.mark.parametrize("mode", ["active", "passive"])
@pytest.mark.parametrize("way", WAYS)
def test_clean_file_by_dcc_across_the_perimeter_arrives_byte_identical(route, way, mode):
    """A harmless file by DCC SEND between outside and inside, active and passive, arrives byte-identical,
    through imguard's relay, and is recorded as allowed with its direction and both parties."""
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        name = f"numbers-{way}-{mode}-{uuid.uuid4().hex[:6]}.bin"
        t = chat.offer_file(sender, receiver, name, CLEAN, passive=mode == "passive")
        assert chat.pump(lambda: t.done, 20), (
            f"the transfer did not finish: offer {t.offer}, {len(t.received)} bytes\n{route.failure_logs()}")
        assert not t.connect_error, t.connect_error
        assert sha256(bytes(t.received)) == sha256(CLEAN), (
            f"{receiver.nick} got {len(t.received)} bytes, not the {len(CLEAN)} sent ({route})")
        if not route.through_gateway:
            assert t.offer["port"] == t.listen_port, "control: the peers connect to each other"
            return
        assert t.offer["host"] == "127.0.0.1" and t.offer["port"] in route.gateway.dcc_ports, (
            f"the connecting side was not sent to imguard's relay: {t.offer}")
        alert = route.wait_alert(lambda e: e.get("file", {}).get("name") == name)
        assert alert, f"imguard recorded no file event for the clean DCC transfer\n{route.failure_logs()}"
        assert alert["event"]["action"] in ("allow", "alert"), alert["event"]
        assert alert["file"]["hash"]["sha256"] == sha256(CLEAN)
        assert_parties(alert, way, sender, receiver)
        assert not sender.imguard_notices() and not receiver.imguard_notices(), "someone was told about a clean file"
