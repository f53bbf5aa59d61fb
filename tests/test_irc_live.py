"""IrcSession and DccSendSession between real IRC clients and a real IRC server, through a tiny carrier.

The server is the `irc` package's own (`python -m irc.server`, no apt needed); the clients are `irc.client`
(as in the research smoke test, irc 20.5.0). The carrier here is a 100-line asyncio stand-in for the
gateway: it does what the gateway must do for IRC and DCC (see imguard/protocols/irc/dcc.py):

- run one IrcSession per client connection, with dcc_relay=(host, allocate): `allocate` opens a
  listening port on the gateway for each offer;
- on a connection to such a port: `find_offer(transfers, host, port)` -> `dcc_session(...)`, connect
  on to `offer.real_address`, carry the session's commands, answer InspectFile with a file decision;
- a `Notify` command -> recorded, and `IrcSession.notice(text)` on the IRC connection it names.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch
from imguard.protocols.base import Anomaly, Close, InspectFile, Notify, ProtocolEvent, Record, Send
from imguard.protocols.irc.dcc import dcc_session, find_offer
from imguard.protocols.irc.session import DccRelay, IrcSession
from tests.test_irc_support import Checker

import irc.client as irc_client  # noqa: E402  (the test extra; `make test` installs it)

MARKER = b"FORBIDDEN-MARKER"        # files containing it are blocked by the stand-in file policy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MiniCarrier:
    """A stand-in for the gateway's carrier, on its own event loop thread."""

    def __init__(self, server: tuple[str, int], checker):
        self.server = server
        self.checker = checker
        self.transfers = ExpectedTransfers()
        self.irc: dict[str, tuple[IrcSession, asyncio.StreamWriter]] = {}
        self.records: list[dict] = []
        self.files: list[InspectFile] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.count = 0
        self._relays: list[asyncio.Task] = []

    def start(self) -> int:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(5)

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            for task in self._relays:
                if task.done() and not task.cancelled() and task.exception() is None:
                    task.result().close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._irc_connection, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def _allocate(self, offer) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        self._relays.append(self.loop.create_task(asyncio.start_server(self._dcc_connection, sock=sock)))
        return sock.getsockname()[1]

    async def _irc_connection(self, cr, cw):
        self.count += 1
        cid = f"irc-{self.count}"
        sr, sw = await asyncio.open_connection(*self.server)
        session = IrcSession(self.checker, self.transfers, ChatContext(connection_id=cid),
                             dcc_relay=DccRelay("127.0.0.1", self._allocate))
        self.irc[cid] = (session, cw)
        await self._pump(session, cr, cw, sr, sw)

    async def _dcc_connection(self, cr, cw):
        port = cw.get_extra_info("sockname")[1]
        offer = find_offer(self.transfers, "127.0.0.1", port)
        session = dcc_session(self.checker, self.transfers, ChatContext(connection_id=f"dcc-{port}"), offer)
        if offer is None:
            await self._run(session, session.data_received(True, await cr.read(1)), cw, cw)
            return
        sr, sw = await asyncio.open_connection(*offer.real_address)
        await self._pump(session, cr, cw, sr, sw)

    def _decide_file(self, job: InspectFile) -> tuple[FileReport, Decision]:
        self.files.append(job)
        report = FileReport(name=job.name, path=job.name, size=len(job.data))
        if MARKER in job.data:
            return report, Decision(action=BLOCK, matches=[RuleMatch("no-marker", BLOCK, "high", "enforce",
                                                                     title="forbidden marker")])
        return report, Decision(action=ALLOW)

    async def _run(self, session, cmds, cw, sw) -> bool:
        """Carry out commands; False once the connection is closed."""
        for cmd in cmds:
            if isinstance(cmd, Send):
                writer = cw if cmd.to_client else sw
                if not writer.is_closing():
                    writer.write(cmd.data)
                    await writer.drain()
            elif isinstance(cmd, Record):
                self.records.append(cmd.event)
            elif isinstance(cmd, (Anomaly, ProtocolEvent)):
                self.records.append(cmd.event())
            elif isinstance(cmd, Notify):
                self.records.append(cmd.event())
                if cmd.connection_id in self.irc:
                    target, target_writer = self.irc[cmd.connection_id]
                    await self._run(target, target.notice(cmd.text), target_writer, None)
            elif isinstance(cmd, InspectFile):
                report, decision = await asyncio.to_thread(self._decide_file, cmd)
                if not await self._run(session, session.file_verdict(cmd.transfer_id, report, decision), cw, sw):
                    return False
            elif isinstance(cmd, Close):
                for w in (cw, sw):
                    if w is not None:
                        w.close()
                return False
        return True

    async def _pump(self, session, cr, cw, sr, sw):
        async def side(reader, from_client):
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    if await self._run(session, session.connection_closed(from_client), cw, sw):
                        other = sw if from_client else cw
                        other.close()
                    return
                if not await self._run(session, session.data_received(from_client, data), cw, sw):
                    return
        await asyncio.gather(side(cr, True), side(sr, False), return_exceptions=True)


NGIRCD_CONF = """[Global]
\tName = irc.localhost
\tInfo = imguard test ircd
\tListen = 127.0.0.1
\tPorts = {port}
\tPidFile = {dir}/ngircd.pid
\tServerUID = {uid}
\tServerGID = {gid}
[Limits]
\tMaxConnectionsIP = 0
\tPingTimeout = 120
[Options]
\tDNS = no
\tIdent = no
\tPAM = no
\tRequireAuthPing = no
[Channel]
\tName = #imguard
\tTopic = test channel
"""


def start_server(kind: str, tmp_path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "ngircd":
        binary = shutil.which("ngircd", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")
        if binary is None:
            pytest.fail("ngircd is not installed: tools/setup.sh test installs it")
        conf = tmp_path / "ngircd.conf"
        conf.write_text(NGIRCD_CONF.format(port=port, dir=tmp_path, uid=os.getuid(), gid=os.getgid()))
        cmd = [binary, "-n", "-f", str(conf)]
    else:
        cmd = [sys.executable, "-m", "irc.server", "-a", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, port
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"{kind} did not start on port {port}")
            time.sleep(0.05)


@pytest.fixture(params=["irc.server", "ngircd"])
def irc_world(request, tmp_path):
    """A real IRC server (the irc package's, or ngIRCd when installed) and the carrier in front of it."""
    server, port = start_server(request.param, tmp_path)
    checker = Checker(block=("secret plan",), mask={"hunter2": "*******"})
    carrier = MiniCarrier(("127.0.0.1", port), checker)
    proxy_port = carrier.start()
    try:
        yield carrier, proxy_port
    finally:
        carrier.stop()
        server.kill()
        server.wait(5)


def run_clients(proxy_port: int, payload: bytes, timeout: float = 15.0) -> dict:
    """alice and bob join #imguard through the carrier; alice says three things and offers `payload` by DCC."""
    r = irc_client.Reactor()
    state = {"joined": set(), "chan": [], "bob_priv": [], "alice_notices": [], "recv": bytearray(),
             "done": False, "size": None}
    alice = r.server().connect("127.0.0.1", proxy_port, "alice")
    bob = r.server().connect("127.0.0.1", proxy_port, "bob")
    for c in (alice, bob):
        c.join("#imguard")

    def on_join(conn, e):
        if irc_client.NickMask(e.source).nick == conn.get_nickname():
            state["joined"].add(conn.get_nickname())
        if state["joined"] == {"alice", "bob"} and "sent" not in state:
            state["sent"] = True
            alice.privmsg("#imguard", "hello channel")
            alice.privmsg("#imguard", "the password is hunter2")
            alice.privmsg("bob", "the secret plan")
            sender = r.dcc("raw")
            sender.listen(("127.0.0.1", 0))
            state["sender"] = sender
            alice.ctcp("DCC", "bob", f"SEND report.bin {irc_client.ip_quad_to_numstr(sender.localaddress)} "
                                     f"{sender.localport} {len(payload)}")

    def on_pubmsg(conn, e):
        if conn is bob:
            state["chan"].append(e.arguments[0])

    def on_privmsg(conn, e):
        if conn is bob:
            state["bob_priv"].append(e.arguments[0])

    def on_privnotice(conn, e):
        if conn is alice and e.source and e.source.startswith("imguard"):
            state["alice_notices"].append(e.arguments[0])

    def on_ctcp(conn, e):
        if conn is bob and e.arguments[0] == "DCC":
            _, _, ipnum, port, size = e.arguments[1].split()
            state["offer"] = (irc_client.ip_numstr_to_quad(ipnum), int(port))
            state["size"] = int(size)
            state["receiver"] = r.dcc("raw")
            state["receiver"].connect(*state["offer"])

    def on_dcc_connect(conn, e):
        if conn is state.get("sender"):
            conn.send_bytes(payload)

    def on_dccmsg(conn, e):
        if conn is state.get("receiver"):
            state["recv"] += e.arguments[0]
            conn.send_bytes(struct.pack("!I", len(state["recv"])))
            if len(state["recv"]) >= state["size"]:
                conn.disconnect()
                state["done"] = True

    for name, handler in [("join", on_join), ("pubmsg", on_pubmsg), ("privmsg", on_privmsg),
                          ("privnotice", on_privnotice), ("ctcp", on_ctcp), ("dcc_connect", on_dcc_connect),
                          ("dccmsg", on_dccmsg)]:
        r.add_global_handler(name, handler)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (state["done"] or (MARKER in payload and state["alice_notices"]
                                                               and len(state["alice_notices"]) >= 2)):
        r.process_once(0.05)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        r.process_once(0.05)
    for c in (alice, bob):
        c.disconnect()
    return state


def test_live_messages_and_dcc_allowed(irc_world):
    """Through the carrier: the channel message arrives, the password is masked, the secret plan never reaches bob
    (alice gets imguard's NOTICE), and bob receives the DCC file only via the gateway's relay port."""
    carrier, proxy_port = irc_world
    payload = bytes(range(256)) * 200
    state = run_clients(proxy_port, payload)
    assert state["chan"] == ["hello channel", "the password is *******"]
    assert state["bob_priv"] == []
    assert "Your message to bob was blocked by imguard: no secret plan" in state["alice_notices"]
    assert state["offer"][1] != state["sender"].localport           # bob was sent to the relay
    assert bytes(state["recv"]) == payload
    [job] = carrier.files
    assert (job.name, job.context.sender, job.context.recipients) == ("report.bin", "alice", ("bob",))


def test_live_dcc_blocked_notifies_the_sender(irc_world):
    """A blocked DCC file: bob's data connection closes with nothing received; alice gets a NOTICE on her IRC
    connection, injected by the carrier from the DCC session's Notify command."""
    carrier, proxy_port = irc_world
    payload = b"x" * 5000 + MARKER + b"y" * 5000
    state = run_clients(proxy_port, payload)
    assert bytes(state["recv"]) == b""
    assert any("report.bin" in n and "forbidden marker" in n for n in state["alice_notices"]), state["alice_notices"]
    assert [e for e in carrier.records if e.get("imguard", {}).get("notify")]
