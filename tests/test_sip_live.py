"""SipSession and SipDatagramHandler between a real SIP client (sipsak) and a real SIP server (Kamailio), and
the MSRP session Kamailio's answer announced, carried to a stand-in MSRP receiver.

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
import threading

import pytest

import socket
import time

from imguard.files.expected import ExpectedTransfers
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch
from imguard.protocols.base import Anomaly, Close, InspectFile, Notify, ProtocolEvent, Record, Send
from imguard.protocols.msrp.framing import MsrpDecoder, build_response
from imguard.protocols.msrp.offer import find_msrp_offer
from imguard.protocols.msrp.session import MsrpSession
from imguard.protocols.sip.session import SipDatagramHandler, SipSession
from tests.peers.prosody import PeerError, free_ports
from tests.peers.sip_peers import MSRP_SESSION, Kamailio, sipsak
from tests.test_sip_support import FROM_PATH, Checker, file_chunks, load, message

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
            for chunk in decoder.feed(data):
                if getattr(chunk, "method", "") == "SEND" and chunk.failure_report == "yes":
                    writer.write(build_response(chunk, 200))
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


def send_file(world, payload: bytes, message_id: str, expect: int, timeout: float = 10.0) -> list:
    """Alice's side: connect (to the carrier, as if to the answer's address), send `payload` in 1000-byte chunks,
    collect what comes back until `expect` chunks arrived (and a moment more, to see nothing extra comes)."""
    server, carrier, (_, _, msrp_port), _ = world
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
    got, _ = send_file(world, payload, "badfile", expect=8)
    statuses = [c.status for c in got if not c.method]
    report, notice = [c for c in got if c.method]
    assert statuses == [200] * 6
    assert report.method == "REPORT" and report.get("status") == "000 403 Action-not-allowed"
    assert notice.method == "SEND" and b"forbidden marker" in notice.body and notice.to_path == [FROM_PATH]
    time.sleep(0.3)
    assert len(receiver.received) == before
    [note] = [e for e in carrier.records if e.get("imguard", {}).get("notify")]
    assert note["imguard"]["notify"]["connection_id"] == offer.context.connection_id
    assert "My cool picture.jpg" in note["imguard"]["notify"]["text"] and notice.body.decode() == \
        note["imguard"]["notify"]["text"]
    told = [e for e in carrier.records if e["event"].get("action") == "sip_notice"]
    assert told and told[-1]["imguard"]["sip"]["text"] == note["imguard"]["notify"]["text"]
