"""SipSession and SipDatagramHandler between a real SIP client (sipsak) and a real SIP server (Kamailio), and
the MSRP session Kamailio's answer announced, carried to a stand-in MSRP receiver. At the end, SIP MESSAGE across
the perimeter through the real `imguard run` (see "Across the perimeter" below).

The carriers here are small asyncio stand-ins for the gateway (like tests/test_irc_live.py for IRC): one
SipSession per TCP connection; for UDP one SipDatagramHandler per client address with its own upstream socket,
each Send written as one datagram; a `Notify` is recorded and carried out as `SipSession.notice(text)` on the
SIP connection it names. What Kamailio received is read from its log; what sipsak got back from its
output and exit status (0 only for a 2xx final response).

MSRP: no packaged MSRP endpoint exists on Debian 12 or PyPI (Kamailio's msrp module is a relay), so both MSRP
ends are Python sockets here: the sender writes RFC 4975 chunks, the receiver answers 200 like an endpoint. What is
real is the path: the INVITE went through sipsak -> SipSession -> Kamailio, Kamailio's 200 OK put the MSRP
session in the table, and the MSRP connection is matched to it by its destination the way the gateway must
(`find_msrp_offer(transfers, dst_host, dst_port)`; the test hands the carrier the original destination, as
SO_ORIGINAL_DST would in transparent mode).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch
from imguard.protocols.base import Anomaly, Close, InspectFile, Notify, ProtocolEvent, Record, Send
from imguard.protocols.msrp.framing import MsrpDecoder, build_response
from imguard.protocols.msrp.offer import find_msrp_offer
from imguard.protocols.msrp.session import MsrpSession
from imguard.protocols.sip.session import SipDatagramHandler, SipSession
from tests.peers.prosody import PeerError, free_ports
from tests.peers.sip_peers import MSRP_SESSION, Kamailio, SipGateway, SippUser, sipsak
from tests.test_sip_support import FROM_PATH, TO_PATH, Checker, chunk, file_chunks, load, message

MARKER = b"FORBIDDEN-MARKER"        # files containing it are blocked by the stand-in file policy


class SipCarrier:
    """TCP and UDP relays on their own event loop thread, each in front of `server`."""

    def __init__(self, server: tuple[str, int], checker):
        self.server = server
        self.checker = checker
        self.transfers = ExpectedTransfers()
        self.records: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.count = 0
        self.sip: dict[str, tuple[SipSession, asyncio.StreamWriter]] = {}     # by connection id, with its client
        self.files: list[InspectFile] = []
        self.msrp_original_dst: tuple[str, int] | None = None    # what SO_ORIGINAL_DST would say

    def start(self) -> tuple[int, int, int]:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(5)

    def add_server(self, handler, port: int) -> None:
        """Run an asyncio server (a stand-in peer) on this loop."""
        async def start():
            self._extra = await asyncio.start_server(handler, "127.0.0.1", port)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def stop(self) -> None:
        async def shutdown():
            self._tcp.close()
            self._udp.close()
            self._msrp.close()
            if hasattr(self, "_extra"):
                self._extra.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _listen(self) -> tuple[int, int, int]:
        self._tcp = await asyncio.start_server(self._tcp_connection, "127.0.0.1", 0)
        self._udp, _ = await self.loop.create_datagram_endpoint(lambda: _UdpFront(self), local_addr=("127.0.0.1", 0))
        self._msrp = await asyncio.start_server(self._msrp_connection, "127.0.0.1", 0)
        return (self._tcp.sockets[0].getsockname()[1], self._udp.get_extra_info("sockname")[1],
                self._msrp.sockets[0].getsockname()[1])

    async def _tcp_connection(self, cr, cw):
        self.count += 1
        cid = f"sip-{self.count}"
        sr, sw = await asyncio.open_connection(*self.server)
        session = SipSession(self.checker, self.transfers, ChatContext(connection_id=cid))
        self.sip[cid] = (session, cw)
        await self._pump(session, cr, cw, sr, sw)

    async def _msrp_connection(self, cr, cw):
        """A connection the gateway intercepted: its original destination names the MSRP session."""
        host, port = self.msrp_original_dst
        offer = find_msrp_offer(self.transfers, host, port)
        session = MsrpSession(self.checker, self.transfers, ChatContext(connection_id=f"msrp-{port}"), offer)
        sr, sw = await asyncio.open_connection(host, port)
        await self._pump(session, cr, cw, sr, sw)

    def _decide_file(self, job: InspectFile) -> tuple[FileReport, Decision]:
        self.files.append(job)
        report = FileReport(name=job.name, path=job.name, size=len(job.data))
        if MARKER in job.data:
            return report, Decision(action=BLOCK, matches=[RuleMatch("no-marker", BLOCK, "high", "enforce",
                                                                     title="forbidden marker")])
        return report, Decision(action=ALLOW)

    async def _pump(self, session, cr, cw, sr, sw):
        async def run(cmds) -> bool:
            for cmd in cmds:
                if isinstance(cmd, Send):
                    writer = cw if cmd.to_client else sw
                    writer.write(cmd.data)
                    await writer.drain()
                elif isinstance(cmd, Close):
                    cw.close()
                    sw.close()
                    return False
                elif isinstance(cmd, InspectFile):
                    report, decision = await asyncio.to_thread(self._decide_file, cmd)
                    if not await run(session.file_verdict(cmd.transfer_id, report, decision)):
                        return False
                elif isinstance(cmd, Notify):
                    await self._notify(cmd)
                else:
                    self.record(cmd)
            return True

        async def side(reader, from_client):
            while True:
                data = await reader.read(65536)
                if not data:
                    await run(session.connection_closed(from_client))
                    (sw if from_client else cw).close()
                    return
                if not await run(session.data_received(from_client, data)):
                    return
        await asyncio.gather(side(cr, True), side(sr, False), return_exceptions=True)


    def record(self, cmd) -> None:
        """What the carrier's recording stage keeps: a Record's event, a typed fact's (Anomaly, ProtocolEvent)."""
        if isinstance(cmd, Record):
            self.records.append(cmd.event)
        elif isinstance(cmd, (Anomaly, ProtocolEvent)):
            self.records.append(cmd.event())

    async def _notify(self, cmd: Notify) -> None:
        """A notice for the user of another connection: recorded, then told on that SIP connection (its MESSAGE
        goes to the client, if the client is still connected)."""
        self.records.append(cmd.event())
        if cmd.connection_id not in self.sip:
            return
        session, writer = self.sip[cmd.connection_id]
        for c in session.notice(cmd.text):
            if isinstance(c, Send):
                if c.to_client and not writer.is_closing():
                    writer.write(c.data)
                    await writer.drain()
            else:
                self.record(c)


class _UdpFront(asyncio.DatagramProtocol):
    """The client-facing UDP socket: one handler and one upstream socket per client address."""

    def __init__(self, carrier: SipCarrier):
        self.carrier = carrier
        self.peers: dict[tuple, tuple[SipDatagramHandler, asyncio.DatagramTransport]] = {}

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        asyncio.ensure_future(self._from_client(data, addr))

    async def _from_client(self, data, addr):
        c = self.carrier
        if addr not in self.peers:
            handler = SipDatagramHandler(c.checker, c.transfers, ChatContext(connection_id=f"udp-{addr[1]}"))
            upstream, _ = await c.loop.create_datagram_endpoint(lambda: _UdpBack(self, addr),
                                                               remote_addr=c.server)
            self.peers[addr] = (handler, upstream)
        handler, _ = self.peers[addr]
        self.run(addr, handler.datagram_received(True, data))

    def run(self, addr, cmds):
        _, upstream = self.peers[addr]
        for cmd in cmds:
            if isinstance(cmd, Send):
                if cmd.to_client:
                    self.transport.sendto(cmd.data, addr)
                else:
                    upstream.sendto(cmd.data)
            else:
                self.carrier.record(cmd)


class _UdpBack(asyncio.DatagramProtocol):
    def __init__(self, front: _UdpFront, addr):
        self.front = front
        self.addr = addr

    def datagram_received(self, data, _):
        handler, _ = self.front.peers[self.addr]
        self.front.run(self.addr, handler.datagram_received(False, data))


class MsrpReceiver:
    """A stand-in MSRP endpoint: keeps every byte it receives, answers each SEND 200 (RFC 4975 §7.2)."""

    def __init__(self):
        self.received = bytearray()

    async def __call__(self, reader, writer):
        decoder = MsrpDecoder()
        while data := await reader.read(65536):
            self.received += data
            for item in decoder.feed(data):
                if getattr(item, "method", "") == "SEND" and item.failure_report == "yes":
                    writer.write(build_response(item, 200))
        writer.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    [msrp_port] = free_ports(1)
    try:
        server = Kamailio.start(tmp_path_factory.mktemp("kamailio"), msrp_port=msrp_port)
    except PeerError as e:
        pytest.fail(str(e))
    checker = Checker(block=("secret plan",), mask={"hunter2": "*******"})
    carrier = SipCarrier(("127.0.0.1", server.port), checker)
    ports = carrier.start()
    receiver = MsrpReceiver()
    carrier.add_server(receiver, msrp_port)
    carrier.msrp_original_dst = ("127.0.0.1", msrp_port)
    try:
        yield server, carrier, ports, receiver
    finally:
        carrier.stop()
        server.stop()


def local_message(text: str, cseq: int) -> bytes:
    return message(text, frm="<sip:alice@127.0.0.1>", to="<sip:bob@127.0.0.1>", ruri="sip:bob@127.0.0.1",
                   cseq=cseq, vias=1)


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_live_message_allow_mask_block(world, transport):
    """sipsak -> carrier -> Kamailio: an allowed MESSAGE arrives as sent, a masked one with the password starred
    (and a Content-Length Kamailio accepts), a blocked one never arrives and sipsak gets imguard's 403 with the
    Warning header (exit status non-zero)."""
    server, carrier, (tcp_port, udp_port, _), _ = world
    port = tcp_port if transport == "tcp" else udp_port
    base = 10 if transport == "tcp" else 20
    before = len(server.messages())
    rc, out = sipsak(local_message(f"hello over {transport}", base + 1), "127.0.0.1", port, transport)
    assert rc == 0, out
    rc, out = sipsak(local_message("the password is hunter2", base + 2), "127.0.0.1", port, transport)
    assert rc == 0, out
    rc, out = sipsak(local_message("the secret plan", base + 3), "127.0.0.1", port, transport)
    assert rc != 0 and "SIP/2.0 403 Forbidden" in out, out
    assert 'Warning: 399 imguard "Your message to sip:bob@127.0.0.1 was blocked by imguard: no secret plan"' in out
    got = [body for _, _, _, body in server.messages()[before:]]
    assert got == [f"hello over {transport}", "the password is *******"], server.logs()


def invite(world):
    """The RFC 5547 INVITE through the carrier to Kamailio, once per module; the offer it registered."""
    server, carrier, (tcp_port, _, _), _ = world
    offer = find_msrp_offer(carrier.transfers, "127.0.0.1", server.msrp_port)
    if offer is None:
        rc, out = sipsak(load("rfc5547_invite.sip"), "127.0.0.1", tcp_port, "tcp")
        assert rc == 0 and server.invites() >= 1, out
        offer = find_msrp_offer(carrier.transfers, "127.0.0.1", server.msrp_port)
    return offer


def test_live_invite_registers_the_msrp_session(world):
    """Kamailio's real 200 OK answers the INVITE with an MSRP path: the offer is in the table under the offerer's
    path and, after the answer, under Kamailio's 127.0.0.1:<msrp_port>."""
    server = world[0]
    offer = invite(world)
    assert offer is not None
    assert offer.answer_path == (f"msrp://127.0.0.1:{server.msrp_port}/{MSRP_SESSION};tcp",)
    assert (offer.file.name, offer.file.size, offer.offerer) == ("My cool picture.jpg", 32349, "sip:alice@example.com")
    assert offer.context.connection_id in world[1].sip


def send_file(world, payload: bytes, message_id: str, expect: int, timeout: float = 10.0,
              sentinel: bytes | None = None) -> list:
    """Alice's side: connect (to the carrier, as if to the answer's address), send `payload` in 1000-byte chunks,
    collect what comes back until `expect` chunks arrived (and a moment more, to see nothing extra comes). Then,
    on the same connection, `sentinel` (a chunk sent after the verdict) is sent and waited for at the receiver:
    any byte of the file that was going to cross has crossed before it."""
    server, carrier, (_, _, msrp_port), receiver = world
    to_path = f"msrp://127.0.0.1:{server.msrp_port}/{MSRP_SESSION};tcp"
    chunks = [raw.replace(b"To-Path: msrp://bobpc.example.com:8888/9di4ea;tcp", f"To-Path: {to_path}".encode())
              for _, raw in file_chunks(payload, 1000, message_id=message_id, tid_prefix=message_id)]
    got = []
    decoder = MsrpDecoder()
    with socket.create_connection(("127.0.0.1", msrp_port), timeout=timeout) as sock:
        for raw in chunks:
            sock.sendall(raw)
        deadline = time.monotonic() + timeout
        sock.settimeout(0.3)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                if len(got) >= expect:
                    break
                continue
            if not data:
                break
            got += decoder.feed(data)
        if sentinel is not None:
            sock.sendall(sentinel)
            while sentinel not in receiver.received:
                assert time.monotonic() < deadline + timeout, "the sentinel never reached the receiver"
                time.sleep(0.05)
    return got, b"".join(chunks)


def test_live_msrp_file_allowed(world):
    """The file crosses only after the verdict: the receiver gets every chunk byte for byte, alice gets exactly one
    200 per chunk (ours; the receiver's own 200s are swallowed), and the inspected file carries the SDP's name."""
    server, carrier, _, receiver = world
    invite(world)
    payload = bytes(range(256)) * 20
    before = len(receiver.received)
    got, sent = send_file(world, payload, "okfile", expect=6)
    assert sorted(c.tid for c in got) == [f"okfile{i:04d}" for i in range(6)]
    assert all(c.status == 200 for c in got)
    deadline = time.monotonic() + 5
    while len(receiver.received) - before < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bytes(receiver.received[before:]) == sent
    job = carrier.files[-1]
    assert (job.data, job.name, job.context.sender, job.context.recipients) == (
        payload, "My cool picture.jpg", "sip:alice@example.com", ("sip:bob@example.com",))


def test_live_msrp_file_blocked(world):
    """Blocked: the receiver gets nothing; alice gets a REPORT 403 and a notice; a Notify names her SIP connection,
    whose session tells her with a SIP MESSAGE too."""
    server, carrier, _, receiver = world
    offer = invite(world)
    payload = b"x" * 2500 + MARKER + b"y" * 2500
    before = len(receiver.received)
    to_path = f"msrp://127.0.0.1:{server.msrp_port}/{MSRP_SESSION};tcp"
    sentinel = chunk("sentinel1", b"sentinel after the blocked file", to_path=to_path, message_id="sentinel-1")
    got, _ = send_file(world, payload, "badfile", expect=8, sentinel=sentinel)
    statuses = [c.status for c in got if not c.method]
    report, notice = [c for c in got if c.method]
    assert statuses == [200] * 6
    assert report.method == "REPORT" and report.get("status") == "000 403 Action-not-allowed"
    assert notice.method == "SEND" and b"forbidden marker" in notice.body and notice.to_path == [FROM_PATH]
    assert bytes(receiver.received[before:]) == sentinel        # the sentinel, and nothing of the file before it
    [note] = [e for e in carrier.records if e.get("imguard", {}).get("notify")]
    assert note["imguard"]["notify"]["connection_id"] == offer.context.connection_id
    assert "My cool picture.jpg" in note["imguard"]["notify"]["text"] and notice.body.decode() == \
        note["imguard"]["notify"]["text"]
    told = [e for e in carrier.records if e["event"].get("action") == "sip_notice"]
    assert told and told[-1]["imguard"]["sip"]["text"] == note["imguard"]["notify"]["text"]


# --- Across the perimeter: the real `imguard run` in front of Kamailio ----------------------------------------
#
# Kamailio is the registrar and proxy (tests/peers/sip_peers.py): it relays a MESSAGE to the contact registered
# for its Request-URI, over the connection or UDP flow the contact registered on. Per transport, carol is inside:
# her user agent (SIPp) registers through `imguard run` (reverse:tcp / reverse:udp to Kamailio), so what Kamailio
# delivers to her crosses the gateway. dave is outside: his SIPp registers straight to Kamailio. Each one sends
# with sipsak: carol through the gateway, dave straight to Kamailio. sipsak's exit status is the final response
# Kamailio relayed back, so a 0 for a MESSAGE means the receiver's user agent answered it: it got the message.
# What a receiver got is read from SIPp's own trace; what Kamailio received from its log.

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
BLOCKED_WORD = "project-bluebird"           # tests/data/rules/90-test-keywords.yaml
BLOCKED_RULE = "test-codename-block"
BLOCKED_TITLE = "Confidential project codename"
BLOCKED_NOTICE = "Your message was blocked: it names a confidential project."
MALWARE_RULE = "malware"                    # rules/ (bundled): a signature match blocks the file
NOTICE_FROM = "sip:imguard@imguard.invalid"         # the From of the gateway's notice MESSAGE (SipSession.notice)
TRANSPORTS = ("tcp", "udp")
WAYS = ("inbound", "outbound")      # inbound: dave (outside) sends to carol (inside); outbound: the reverse


@dataclass
class Person:
    name: str
    agent: SippUser
    send_port: int          # where their sipsak sends: the gateway for carol, Kamailio for dave

    @property
    def uri(self) -> str:
        return f"sip:{self.name}@127.0.0.1"


@dataclass
class Perimeter:
    server: Kamailio
    gateway: SipGateway
    people: dict[tuple[str, str], Person]         # by (transport, "inside" or "outside")

    def failure_logs(self, *people: Person) -> str:
        return "\n".join([self.gateway.logs(40), self.server.logs(), *(p.agent.logs() for p in people)])


@pytest.fixture(scope="module")
def perimeter(tmp_path_factory):
    agents = []
    server = gateway = None
    try:
        server = Kamailio.start(tmp_path_factory.mktemp("kamailio-perimeter"), msrp_port=free_ports(1)[0])
        gateway = SipGateway.start(tmp_path_factory.mktemp("imguard-sip"), server)
        people = {}
        for transport in TRANSPORTS:
            for where, name, port in (("inside", f"carol-{transport}", gateway.port(transport)),
                                      ("outside", f"dave-{transport}", server.port)):
                agent = SippUser.start(tmp_path_factory.mktemp(f"sipp-{name}"), name, "127.0.0.1", port, transport)
                agents.append(agent)
                agent.wait_registered(server)
                people[transport, where] = Person(name, agent, port)
        yield Perimeter(server, gateway, people)
    except PeerError as e:
        pytest.fail(f"{e}\n{gateway.logs() if gateway else ''}")
    finally:
        for agent in agents:
            agent.stop()
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.stop()


def across(perimeter: Perimeter, transport: str, way: str) -> tuple[Person, Person]:
    inside, outside = perimeter.people[transport, "inside"], perimeter.people[transport, "outside"]
    return (outside, inside) if way == "inbound" else (inside, outside)


_cseq = iter(range(1000, 10**6))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send(sender: Person, receiver: Person, text: str | bytes, transport: str,
         content_type: str = "text/plain;charset=UTF-8") -> tuple[int, str]:
    """sender's sipsak: a MESSAGE to receiver's address of record, and the final response it got."""
    raw = message(text, content_type, frm=f"<{sender.uri}>", to=f"<{receiver.uri}>", ruri=receiver.uri,
                  cseq=next(_cseq), vias=1)
    return sipsak(raw, "127.0.0.1", sender.send_port, transport)


def got_from(receiver: Person, sender: Person, tag: str) -> list[bytes]:
    """The bodies of the MESSAGEs from `sender` that carry `tag`, as the receiver's user agent got them."""
    return [r.body for r in receiver.agent.received() if sender.uri in r.get("from") and tag.encode() in r.body]


def notices(receiver: Person) -> list[str]:
    return [r.body.decode() for r in receiver.agent.received() if NOTICE_FROM in r.get("from")]


def message_alert(perimeter: Perimeter, action: str, text: str) -> dict | None:
    return asyncio.run(perimeter.gateway.wait_alert(
        lambda e: e.get("event", {}).get("dataset") == "imguard.message" and e["event"].get("action") == action
        and text in str(e.get("imguard", {}).get("message"))))


def file_decisions(perimeter: Perimeter, since: int, last: str) -> list[dict]:
    """The file decisions logged after the first `since` events, once the one for sha256 `last` is written (the
    offer and notice events of the file dataset are left out)."""
    def decision(e: dict) -> bool:
        return e.get("event", {}).get("dataset") == "imguard.file" and "file" in e
    asyncio.run(perimeter.gateway.wait_alert(lambda e: decision(e) and e["file"]["hash"]["sha256"] == last, since))
    return [e for e in perimeter.gateway.alerts()[since:] if decision(e)]


def assert_parties(alert: dict, way: str, sender: Person, receiver: Person) -> None:
    """The alert says the direction (from the topology: the party on the client side of the gateway is inside) and
    names both parties."""
    ctx = alert["imguard"]["context"]
    assert (ctx["direction"], ctx["origin"]) == (way, "server" if way == "inbound" else "client"), ctx
    assert ctx["protocol"] == "sip" and ctx["sender"] == sender.uri and receiver.uri in ctx["recipients"], ctx


def archive_rows(perimeter: Perimeter, person: str, predicate, count: int = 1, timeout: float = 10.0) -> list[dict]:
    """The gateway's archive searched by person (as `imguard archive search --person`): the rows that satisfy
    `predicate`, waited for until `count` are there (the archive's writer thread stores records within a moment)."""
    from imguard import archive

    store = archive.Archive(perimeter.gateway.data_dir / "archive.sqlite3")
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = sorted((r for r in store.search(archive.Query(person=person)) if predicate(r)),
                          key=lambda r: r["id"])
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)
    finally:
        store.close()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_message_across_the_perimeter(perimeter, transport, way):
    """A clean MESSAGE arrives byte for byte; one with the blocked keyword never reaches the receiver (a sentinel
    after it arrives, and still nothing late), and its sender gets imguard's 403 with the rule's notice relayed
    by Kamailio. Inbound, the inside receiver is told by a notice MESSAGE from imguard, saying from whom and why
    (and not the words it stopped). The alerts say the direction and name both parties; the archive finds both
    messages by either person."""
    sender, receiver = across(perimeter, transport, way)
    tag = uuid.uuid4().hex[:8]
    clean, blocked, sentinel = (f"hello {way} over {transport}, ünïcödé ✓ {tag}", f"the {BLOCKED_WORD} plan {tag}",
                                f"sentinel after the block {tag}")
    logs = lambda: perimeter.failure_logs(sender, receiver)     # noqa: E731

    rc, out = send(sender, receiver, clean, transport)
    assert rc == 0, f"{out}\n{logs()}"
    assert got_from(receiver, sender, tag) == [clean.encode()], logs()

    told_before = len(notices(receiver))
    rc, out = send(sender, receiver, blocked, transport)
    assert rc != 0 and "SIP/2.0 403 Forbidden" in out, f"{out}\n{logs()}"
    assert f'Warning: 399 imguard "{BLOCKED_NOTICE}"' in out, out
    rc, out = send(sender, receiver, sentinel, transport)
    assert rc == 0, f"the sentinel did not arrive: {out}\n{logs()}"
    assert got_from(receiver, sender, tag) == [clean.encode(), sentinel.encode()], logs()
    assert not any(BLOCKED_WORD.encode() in r.body for r in receiver.agent.received()), "the receiver saw it"

    # Independent of imguard: what Kamailio itself received. Inbound, the blocked MESSAGE reached Kamailio (it is
    # outside) and stopped at the gateway; outbound, it never left the gateway.
    at_kamailio = [body for _, _, _, body in perimeter.server.messages() if tag in body]
    assert at_kamailio == ([clean, blocked, sentinel] if way == "inbound" else [clean, sentinel]), at_kamailio

    told = notices(receiver)[told_before:]
    if way == "inbound":
        assert len(told) == 1, f"the inside receiver got no notice from imguard: {told}\n{logs()}"
        assert told[0] == f"A message from {sender.uri} was blocked by imguard: {BLOCKED_TITLE}", told
    else:
        assert told == [], "the outside receiver was told about a message it was never sent"

    alert = message_alert(perimeter, "block", blocked)
    assert alert, f"no block alert for {blocked!r}\n{logs()}"
    assert alert["rule"]["id"] == BLOCKED_RULE, alert["rule"]
    assert_parties(alert, way, sender, receiver)
    alert = message_alert(perimeter, "allow", clean)
    assert alert, f"no allow record for {clean!r}"
    assert_parties(alert, way, sender, receiver)

    for person in (sender, receiver):
        rows = archive_rows(perimeter, person.name, lambda r: tag in (r.get("text") or ""), count=3)
        assert [(r["text"], r["action"], r["direction"], r["sender"]) for r in rows] == [
            (clean, "allow", way, sender.uri), (blocked, "block", way, sender.uri),
            (sentinel, "allow", way, sender.uri)], rows


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_archive_holds_both_sides_of_the_conversation(perimeter, transport):
    """dave (outside) asks, carol (inside) answers: both arrive, and the archive, searched for carol, holds the
    question she received (inbound) and the answer she sent (outbound), in order."""
    carol, dave = perimeter.people[transport, "inside"], perimeter.people[transport, "outside"]
    tag = uuid.uuid4().hex[:8]
    question, answer = f"are you coming, carol? {tag}", f"yes, on my way {tag}"
    rc, out = send(dave, carol, question, transport)
    assert rc == 0, out
    rc, out = send(carol, dave, answer, transport)
    assert rc == 0, out
    assert got_from(carol, dave, tag) == [question.encode()] and got_from(dave, carol, tag) == [answer.encode()]
    rows = archive_rows(perimeter, carol.name, lambda r: tag in (r.get("text") or ""), count=2)
    assert [(r["text"], r["direction"], r["sender"]) for r in rows] == [
        (question, "inbound", dave.uri), (answer, "outbound", carol.uri)], rows


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_file_in_a_message_across_the_perimeter(perimeter, transport, way):
    """A MESSAGE whose body is a file (RFC 3428 allows any MIME type) is held and scanned before the receiver gets a
    byte: a clean one arrives byte for byte with its type; EICAR never reaches the receiver (a sentinel after it
    arrives), its sender gets imguard's 403 with the reason, and inbound the inside receiver is told by a notice
    MESSAGE. The file alert says the direction and names both parties; the archive holds the transfer.
    (sipsak sends a request as a C string, so a body with NUL bytes, such as a zip, cannot be sent with it.)"""
    sender, receiver = across(perimeter, transport, way)
    tag = uuid.uuid4().hex[:8]
    clean = f"date,item,amount\n2026-12-06,{tag},42\n".encode()
    logs = lambda: perimeter.failure_logs(sender, receiver)     # noqa: E731
    mark = perimeter.gateway.mark()
    rc, out = send(sender, receiver, clean, transport, "text/csv")
    assert rc == 0, f"{out}\n{logs()}"
    [got] = [r for r in receiver.agent.received() if sender.uri in r.get("from") and tag.encode() in r.body]
    assert (got.body, got.get("content-type")) == (clean, "text/csv"), got

    told_before = len(notices(receiver))
    at_kamailio = len(perimeter.server.messages())
    rc, refusal = send(sender, receiver, EICAR, transport, "application/octet-stream")
    assert rc != 0 and "SIP/2.0 403 Forbidden" in refusal, f"{refusal}\n{logs()}"
    sentinel = f"sentinel after the file {tag}"
    rc, out = send(sender, receiver, sentinel, transport)
    assert rc == 0, f"the sentinel did not arrive: {out}\n{logs()}"
    assert got_from(receiver, sender, tag)[-1] == sentinel.encode(), logs()
    assert not any(b"EICAR" in r.body for r in receiver.agent.received()), "the receiver got EICAR"
    eicar_at_kamailio = ["EICAR" in body for _, _, _, body in perimeter.server.messages()[at_kamailio:]]
    assert eicar_at_kamailio == ([True, False] if way == "inbound" else [False]), eicar_at_kamailio
    assert 'Warning: 399 imguard "Your file' in refusal and "matched a malware signature" in refusal, refusal
    told = notices(receiver)[told_before:]
    if way == "inbound":
        assert told == [f"imguard: a file from {sender.uri} was blocked (Malware signature match)"], (
            f"the inside receiver was not told: {told}\n{logs()}")
    else:
        assert told == [], "the outside receiver was told about a file it was never sent"

    files = file_decisions(perimeter, mark, last=sha256(EICAR))
    assert [(e["event"]["action"], e["file"]["hash"]["sha256"], e.get("rule", {}).get("id")) for e in files] == [
        ("allow", sha256(clean), None), ("block", sha256(EICAR), MALWARE_RULE)], files
    for alert in files:
        assert alert["imguard"]["context"]["transfer_mechanism"] == "sip-message", alert["imguard"]["context"]
        assert_parties(alert, way, sender, receiver)
    for person in (sender, receiver):
        rows = archive_rows(perimeter, person.name, lambda r: r["kind"] == "file" and r["direction"] == way and (
            r["sha256"] in (sha256(clean), sha256(EICAR))), count=2)
        assert [(r["sha256"], r["action"], r["mechanism"], r["sender"]) for r in rows] == [
            (sha256(clean), "allow", "sip-message", sender.uri), (sha256(EICAR), "block", "sip-message", sender.uri)
        ], rows


# --- MSRP across the perimeter -------------------------------------------------------------------------------
#
# carol's RFC 5547 INVITE goes through `imguard run` to Kamailio, whose own 200 OK answers for dave with an MSRP path
# at 127.0.0.1:<msrp_port> (tests/peers/sip_peers.py). carol's MSRP connection to it goes through the gateway's
# socks5 listener and is matched to the offer by that destination. Both MSRP ends are sockets here (no MSRP
# endpoint is packaged for Debian 12 or PyPI); each answers a SEND 200 as an endpoint does (RFC 4975 §7.2).


class MsrpEnd:
    """One end of an MSRP connection: what it received, decoded as it comes; it answers each SEND 200."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.decoder = MsrpDecoder()
        self.items: list = []
        self.raw = bytearray()

    def until(self, predicate, what: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            found = next((c for c in self.items if predicate(c)), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"never got {what}; got {bytes(self.raw)[-600:]!r}")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise AssertionError(f"the connection closed before {what}; got {bytes(self.raw)[-600:]!r}")
            self.raw += data
            for c in self.decoder.feed(data):
                self.items.append(c)
                if getattr(c, "method", "") == "SEND" and c.failure_report == "yes":
                    self.sock.sendall(build_response(c, 200))

    def send(self, *chunks: bytes) -> None:
        for raw in chunks:
            self.sock.sendall(raw)


def msrp_invite(carol: Person, dave: Person, name: str, call_id: str, pull: bool) -> bytes:
    """The RFC 5547 offer, from carol to dave: push (a=sendonly, carol sends `name`) or pull (a=recvonly, carol asks
    dave for it)."""
    import re

    raw = (load("rfc5547_invite.sip").replace(b"sip:bob@example.com", dave.uri.encode())
           .replace(b"sip:alice@example.com", carol.uri.encode())
           .replace(b'name:"My cool picture.jpg"', f'name:"{name}"'.encode())
           .replace(b"a84b4c76e66710", call_id.encode()))
    if pull:
        raw = raw.replace(b"a=sendonly", b"a=recvonly")
    head, _, body = raw.partition(b"\r\n\r\n")
    return re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head) + b"\r\n\r\n" + body


def retarget(raw: bytes, to_path: str, from_path: str) -> bytes:
    return (raw.replace(f"To-Path: {TO_PATH}".encode(), f"To-Path: {to_path}".encode())
            .replace(f"From-Path: {FROM_PATH}".encode(), f"From-Path: {from_path}".encode()))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_msrp_file_across_the_perimeter(perimeter, transport, way):
    """An MSRP file between carol (inside) and dave (outside), either way: inbound, carol's INVITE asks for it
    (a=recvonly) and dave sends; outbound, carol offers it (a=sendonly) and sends. EICAR's chunks are held: the
    receiver gets none of them (a sentinel chunk after them arrives), the sender gets the REPORT 403, and whichever
    of them is carol gets an MSRP notice in her own words. Then a clean file arrives byte for byte, chunk for chunk.
    The file alerts say the direction and name both parties; the archive holds both transfers for either person."""
    carol, dave = perimeter.people[transport, "inside"], perimeter.people[transport, "outside"]
    sender, receiver = (dave, carol) if way == "inbound" else (carol, dave)
    tag = uuid.uuid4().hex[:8]
    name = f"picture-{way}-{transport}-{tag}.jpg"
    carol_path = FROM_PATH
    dave_path = f"msrp://127.0.0.1:{perimeter.server.msrp_port}/{MSRP_SESSION};tcp"
    to_path, from_path = (carol_path, dave_path) if way == "inbound" else (dave_path, carol_path)
    clean = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + tag.encode() + bytes(range(256)) * 8 + b"\xff\xd9"
    bad = [retarget(raw, to_path, from_path) for _, raw in file_chunks(EICAR, 40, message_id=f"evil-{tag}",
                                                                       tid_prefix="e")]
    good = [retarget(raw, to_path, from_path) for _, raw in file_chunks(clean, 1000, message_id=f"good-{tag}",
                                                                        tid_prefix="g")]
    sentinel = chunk("s1", f"sentinel {tag}".encode(), to_path=to_path, from_path=from_path, message_id=f"s-{tag}")
    mark = perimeter.gateway.mark()

    with socket.create_server(("127.0.0.1", perimeter.server.msrp_port)) as listener:
        rc, out = sipsak(msrp_invite(carol, dave, name, f"msrp-{tag}", pull=way == "inbound"), "127.0.0.1",
                         carol.send_port, transport)
        assert rc == 0, f"{out}\n{perimeter.failure_logs()}"
        listener.settimeout(10)
        with perimeter.gateway.socks5("127.0.0.1", perimeter.server.msrp_port) as carol_sock:
            dave_sock, _ = listener.accept()
            with dave_sock:
                ends = {"carol": MsrpEnd(carol_sock), "dave": MsrpEnd(dave_sock)}
                sending, receiving = (ends["dave"], ends["carol"]) if way == "inbound" else (ends["carol"],
                                                                                             ends["dave"])
                # carol binds the connection with her first SEND (RFC 4975 §5.4), then the file goes
                ends["carol"].send(chunk("a0", None, to_path=dave_path, from_path=carol_path, message_id=f"o-{tag}"))
                ends["dave"].until(lambda c: c.get("message-id") == f"o-{tag}", "carol's first SEND")
                sending.send(*bad)
                report = sending.until(lambda c: getattr(c, "method", "") == "REPORT", "the REPORT for EICAR")
                assert report.get("status") == "000 403 Action-not-allowed", report.raw
                told = ends["carol"].until(lambda c: getattr(c, "method", "") == "SEND" and c.body
                                           and name.encode() in c.body, "carol's notice")
                if way == "inbound":        # the inside receiver, in her own words
                    assert told.body.decode().startswith(f"imguard: the file {name!r} from {dave.uri} was blocked "
                                                         "(Malware signature match"), told.body
                else:                       # the inside sender: the rule's notice
                    assert told.body.decode() == f"Your file {name} was blocked: it matched a malware signature."
                assert told.from_path == [dave_path] and told.to_path == [carol_path], told.raw
                sending.send(sentinel)
                receiving.until(lambda c: c.raw == sentinel, "the sentinel after EICAR")
                assert b"X5O!" not in receiving.raw, "the receiver got part of EICAR"
                start = len(receiving.items)
                sending.send(*good)
                receiving.until(lambda c: c.raw == good[-1], "the clean file's last chunk")
                assert [c.raw for c in receiving.items[start:] if getattr(c, "method", "") == "SEND"] == good
                assert b"X5O!" not in receiving.raw

    files = file_decisions(perimeter, mark, last=sha256(clean))
    assert [(e["event"]["action"], e["file"]["hash"]["sha256"], e["file"]["name"]) for e in files] == [
        ("block", sha256(EICAR), name), ("allow", sha256(clean), name)], files
    for alert in files:
        assert alert["imguard"]["context"]["transfer_mechanism"] == "msrp", alert["imguard"]["context"]
        ctx = alert["imguard"]["context"]
        assert ctx["direction"] == way and ctx["sender"] == sender.uri and receiver.uri in ctx["recipients"], ctx
    for person in (sender, receiver):
        rows = archive_rows(perimeter, person.name, lambda r: r["kind"] == "file" and r.get("file_name") == name,
                            count=2)
        assert [(r["sha256"], r["action"], r["direction"], r["sender"]) for r in rows] == [
            (sha256(EICAR), "block", way, sender.uri), (sha256(clean), "allow", way, sender.uri)], rows
