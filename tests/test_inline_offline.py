"""Same verdicts inline and offline: real end-to-end runs through imguard, captured on loopback with tcpdump and
replayed with `imguard pcap` (the CLI, as a user runs it), must give the same decisions, message by message and
file by file: the same protocol, direction, sender, recipients, action, rule ids and SHA-256 (of the file, or of
the message text) as the gateway's own alerts.jsonl of that run. Timestamps, ports and connection ids differ
between the two and are not compared.

Which bytes are replayed. The loopback capture sees both legs of every connection the gateway carries: the client
leg (client <-> gateway) and the server leg (gateway <-> server). Neither alone is what the gateway decided on: a
blocked message never reaches the leg after the gateway, and the leg before it carries the notices the gateway
wrote. The gateway's own session sees what the client sent on the client leg and what the server sent on the server
leg, so the replay does the same: it replays the client legs (a tcpdump filter on the gateway's listening ports)
and keeps their decisions on what the client sent (context origin `client`), and replays the server legs (a filter
on the real servers' ports) and keeps their decisions on what the server sent (origin `server`). Every message and
file is then decided once, from the bytes its sender sent, as inline. A side connection that carries one file (an
IRC DCC through the relay, an OSCAR OFT through the socks5 listener) is in both selections: each replay decodes the
one its offers name and keeps its decision when the file's sender is on that replay's side. Notices the gateway
recorded (a `notify` event, with its decision) are compared like decisions.

Cleartext, on purpose: a capture of TLS cannot be replayed (the replay counts it, decodes none of it), so the inside
client here logs in through imguard without TLS (Prosody allows it), and its uploads and downloads use plain HTTP
through imguard's HTTP proxy listener. The outside party logs in straight to Prosody with STARTTLS, as in
tests/test_e2e_xmpp.py: its own connection is in the server-port selection but encrypted, so the replay decides
nothing on it, as the gateway never saw it (its uploads, straight to Prosody's HTTP port, are replayed but nothing
announced them on a connection the replay can read, so they are relayed, as the gateway never saw them either).
IRC: cleartext, the outside person straight to ngIRCd (its own connection is left out by its port: the gateway never
carried it). OSCAR: the embedded gateway (as tests/test_legacy_gateway.py runs it) in front of a server playing the
BOS transcript. SIP over UDP: sipsak -> the gateway (reverse:udp) -> a real Kamailio; only outbound, because the
test Kamailio answers MESSAGEs and routes none to a user. Chat APIs over HTTP: `imguard run` in reverse mode, plain
HTTP, in front of tests/test_httpchat_gateway.py's stand-in vendor server (Slack, Matrix, Rocket.Chat's DDP socket,
Discord's zlib-stream gateway) and of a real Synapse (matrix-nio inside, the outside user straight to Synapse); the
replay reads the client legs (the gateway's port) and the server legs (the server's port) as above.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.peers.capture import Capture, tcpdump
from tests import test_e2e_irc, test_e2e_matrix, test_httpchat_gateway
from tests.peers.gateway import BUNDLED_SIGNATURES, PYTHON
from tests.test_e2e_xmpp import (BLOCKED_WORD, CLEAN, EICAR, INBOUND, OUTBOUND, Crossing, Outside, Route,
                                 sentinel_after, share_by_link, transfer, zipped)
from tests.xmpp_clients import PLAIN, sha256

pytestmark = pytest.mark.timeout(240)

DECIDED = ("imguard.message", "imguard.file")
# tests/test_e2e_irc.py's fixtures, shared: a real ngIRCd and `imguard run` in front of it, for this module.
irc_dir, ircd, irc_gateway = test_e2e_irc.irc_dir, test_e2e_irc.ircd, test_e2e_irc.irc_gateway
# tests/test_httpchat_gateway.py's stand-in vendor server behind `imguard run`, for this module.
vendor_gateway = test_httpchat_gateway.vendor_gateway
# tests/test_e2e_matrix.py's real Synapse and `imguard run` in front of it.
synapse, matrix_gateway = test_e2e_matrix.synapse, test_e2e_matrix.matrix_gateway


def needs_tcpdump() -> None:
    if tcpdump() is None:
        if os.environ.get("CI"):
            pytest.fail("tcpdump is not installed (Debian: tcpdump), and CI is set")
        pytest.skip("tcpdump is not installed (Debian: tcpdump)")


# --- decisions, normalised -------------------------------------------------------------------------------------

def decision_key(event: dict) -> tuple:
    """What a decision is compared on: (kind, protocol, direction, sender, recipients, action, rule ids, sha256)."""
    guard = event["imguard"]
    ctx = guard["context"]
    digest = event.get("file", {}).get("hash", {}).get("sha256") or guard.get("message", {}).get("sha256", "")
    rules = tuple(sorted(m["rule_id"] for m in guard["decision"].get("matches", [])))
    return (event["event"]["dataset"].split(".", 1)[1], ctx["protocol"], ctx["direction"], ctx["sender"],
            tuple(sorted(ctx["recipients"])), event["event"]["action"], rules, digest)


def decisions(events: list[dict], origin: str | None = None) -> Counter:
    """The decisions among `events` (a message or a file and what policy did), as a multiset of keys; only those
    on what `origin` sent, when given."""
    return Counter(decision_key(e) for e in events
                   if e.get("event", {}).get("dataset") in DECIDED and "decision" in e.get("imguard", {})
                   and (origin is None or e["imguard"]["context"].get("origin") == origin))


def pcap_replay(pcap: Path, out: Path, ports: list[str], rules: Path, data_dir: Path,
                options: list[str] = ()) -> list[dict]:
    """`imguard pcap FILE --out DIR` with the run's rules and signatures (and `options`, the limits the gateway ran
    with): the events it wrote to DIR/alerts.jsonl."""
    command = [str(PYTHON), "-m", "imguard", "pcap", str(pcap), "--out", str(out), "--json", "--rules", str(rules),
               "--signatures", str(BUNDLED_SIGNATURES), "--data-dir", str(data_dir), *options]
    for port in ports:
        command += ["--ports", port]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode in (0, 1), f"imguard pcap failed ({result.returncode}): {result.stderr}"
    [summary] = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    errors = [a for a in summary["anomalies"] if a["kind"] in ("session_error", "inspection_error", "unknown_command")]
    assert not errors, f"the replay of {pcap.name} hit errors: {errors}"
    path = out / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def replay_both_legs(capture: Capture, workdir: Path, client_ports: list[int], server_ports: list[int],
                     port_map: list[str], rules: Path, transport: str = "tcp") -> Counter:
    """The client legs' decisions on what the client sent plus the server legs' on what the server sent."""
    found: Counter = Counter()
    for leg, ports, origin in (("client", client_ports, "client"), ("server", server_ports, "server")):
        bpf = " or ".join(f"{transport} port {p}" for p in ports)
        pcap = capture.select(workdir / f"{leg}-legs.pcap", bpf)
        events = pcap_replay(pcap, workdir / f"replay-{leg}", port_map, rules, workdir / "replay-data")
        found += decisions(events, origin)
    return found


def settled(read_events, quiet: float = 1.0, timeout: float = 15.0) -> list[dict]:
    """The events once no new one has come for `quiet` seconds (file verdicts are written from worker threads)."""
    deadline = time.monotonic() + timeout
    events = read_events()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        later = read_events()
        if len(later) == len(events):
            return later
        events = later
    return events


def assert_same(inline: Counter, offline: Counter, what: str) -> None:
    missing, extra = inline - offline, offline - inline
    assert not missing and not extra, (
        f"{what}: the replay's decisions differ from the gateway's\n"
        f"  decided inline, not offline: {sorted(missing.elements())}\n"
        f"  decided offline, not inline: {sorted(extra.elements())}")


# --- XMPP: chat, IBB files, XEP-0363 upload and download, both ways ---------------------------------------------

@pytest.fixture
def plain_crossing(request, prosody, gateway):
    """A crossing whose inside party logs in through imguard in cleartext (see the module docstring)."""
    return lambda direction: Crossing(direction, Route("imguard", PLAIN, prosody, gateway), Outside(prosody))


@pytest.mark.parametrize("direction", [INBOUND, OUTBOUND])
def test_xmpp_verdicts_offline_are_the_verdicts_inline(tmp_path, prosody, gateway, plain_crossing, direction):
    """alice and bob on either side of the gateway (alice sends: outside in, or inside out): a chat both ways, a
    blocked keyword, EICAR by IBB (plain and zipped), a clean file by IBB, EICAR and a clean file shared by link
    (XEP-0363: inside out the PUT is decided, outside in the GET's response). Captured and replayed, every decision
    the gateway wrote is the replay's, and no other."""
    needs_tcpdump()
    gateway.check_alive()
    crossing = plain_crossing(direction)
    ports = dict(gw_c2s=gateway.c2s_port, gw_http=gateway.http_port, c2s=prosody.c2s_port, http=prosody.http_port)
    since = gateway.mark()
    bpf = " or ".join(f"tcp port {p}" for p in ports.values())
    seen: dict = {}

    async def scenario():
        async with crossing.client("alice") as alice, crossing.client("bob") as bob:
            tag = uuid.uuid4().hex[:6]
            ask, reply = f"lunch at noon? {tag}", f"yes, see you there {tag}"
            alice.send_chat(bob.jid, ask)
            assert await bob.wait_message(ask), f"bob never got {ask!r}"
            bob.send_chat(alice.jid, reply)
            assert await alice.wait_message(reply), f"alice never got {reply!r}"
            alice.send_chat(bob.jid, f"the {BLOCKED_WORD} launch is friday ({tag})")
            await sentinel_after(alice, bob, "after the blocked keyword")
            for name, data in ((f"eicar-{tag}.com", EICAR), (f"invoice-{tag}.zip", zipped(f"e-{tag}.com", EICAR)),
                               (f"numbers-{tag}.bin", CLEAN)):
                seen[name] = await transfer(crossing.route, "ibb", alice, bob, name, data)
                await sentinel_after(alice, bob, f"after {name}")
            for name, data in ((f"eicar-link-{tag}.com", EICAR), (f"numbers-link-{tag}.bin", CLEAN)):
                seen[name] = await share_by_link(alice, bob, name, data)
                await sentinel_after(alice, bob, f"after the link to {name}")

    with Capture.start(tmp_path / "xmpp.pcap", bpf) as capture:
        asyncio.run(scenario())
        inline_events = settled(lambda: gateway.alerts()[since:])
    gateway.check_alive()
    # The run did what the e2e tests check (so the comparison is over real blocks and releases).
    names = list(seen)
    assert seen[names[2]]["received"] == CLEAN and EICAR not in seen[names[0]]["received"], seen
    assert seen[names[3]]["get_status"] != 200 and seen[names[4]]["get_status"] == 200, seen
    inline = decisions(inline_events)
    actions = Counter(key[5] for key in inline.elements())
    assert actions["block"] + actions["quarantine"] >= 4 and actions["allow"] >= 5, inline   # blocks and releases
    assert {key[2] for key in inline.elements()} == {INBOUND, OUTBOUND}, inline
    offline = replay_both_legs(capture, tmp_path, [ports["gw_c2s"], ports["gw_http"]], [ports["c2s"], ports["http"]],
                               [f"{ports['gw_c2s']}=xmpp", f"{ports['c2s']}=xmpp"], gateway.directory / "rules")
    assert_same(inline, offline, f"XMPP {direction}")
    # Both clean files (IBB, and the link: outside in its download, inside out its upload) were decided, inline
    # and so offline.
    clean = [k for k in inline.elements() if k[0] == "file" and k[7] == sha256(CLEAN)]
    assert [(k[2], k[5]) for k in clean] == [(direction, "allow")] * 2, inline



# --- IRC: PRIVMSG and DCC SEND through the relay, both ways --------------------------------------------------------

@pytest.mark.parametrize("way", ["inbound", "outbound"])
def test_irc_verdicts_offline_are_the_verdicts_inline(tmp_path, ircd, irc_gateway, way):
    """Someone outside (straight to ngIRCd, cleartext) and someone inside (through imguard): a private message, one
    with the blocked keyword, EICAR and a clean file by active DCC SEND through imguard's relay. The outside
    person's own connection to ngIRCd never crossed the gateway: it is left out of the server-port selection by its
    port. The DCC data connections are in both selections: each replay decodes the one its offers name (the client
    legs: the original offer, the connection to the sender's own port; the server legs: the rewritten one, the
    connection to the relay port) and keeps it when its sender is on that replay's side."""
    needs_tcpdump()
    from tests.test_e2e_irc import Chat, Route as IrcRoute, across

    irc_gateway.check_alive()
    route = IrcRoute("imguard", False, ircd, irc_gateway)
    since = irc_gateway.mark()
    with Capture.start(tmp_path / "irc.pcap", "tcp") as capture, Chat(route) as chat:
        sender, receiver = across(chat, way)
        outside = sender if way == "inbound" else receiver
        outside_port = outside.conn.socket.getsockname()[1]
        tag = uuid.uuid4().hex[:6]
        sender.conn.privmsg(receiver.nick, f"hello {way} {tag}")
        sender.conn.privmsg(receiver.nick, f"the {BLOCKED_WORD} plan {tag}")
        chat.sentinel(sender, receiver, "after the messages")
        transfers = {}
        for name, payload in ((f"eicar-{tag}.com", EICAR), (f"numbers-{tag}.bin", CLEAN)):
            t = transfers[name] = chat.offer_file(sender, receiver, name, payload)
            assert chat.pump(lambda t=t: t.done, 20), f"the DCC of {name} did not end: {t.offer}"
            chat.sentinel(sender, receiver, f"after {name}")
    inline_events = settled(lambda: irc_gateway.alerts()[since:])      # the QUITs too
    irc_gateway.check_alive()
    eicar, clean = transfers.values()
    assert bytes(eicar.received) == b"" and bytes(clean.received) == CLEAN, "the run is not what the e2e tests check"
    assert eicar.offer["port"] in irc_gateway.dcc_ports, eicar.offer
    inline = decisions(inline_events)
    files = sorted((k[5], k[7]) for k in inline.elements() if k[0] == "file" and k[5] != "notify")
    assert files == sorted([("allow", sha256(CLEAN)), ("block", sha256(EICAR))]), inline
    offline = Counter()
    port_map = [f"{irc_gateway.port}=irc", f"{ircd.port}=irc"]
    # The DCC data connections: to the relay ports, and from the relay to each sender's own listening port. (The
    # capture takes every TCP port, since those are known only once offered; other tests' traffic on loopback is
    # left out here.)
    dcc = (f"tcp portrange {irc_gateway.dcc_ports.start}-{irc_gateway.dcc_ports.stop - 1} or "
           + " or ".join(f"tcp port {t.listen_port}" for t in transfers.values()))
    for leg, bpf, origin in (("client", f"tcp port {irc_gateway.port} or {dcc}", "client"),
                             ("server", f"(tcp port {ircd.port} and not tcp port {outside_port}) or {dcc}", "server")):
        pcap = capture.select(tmp_path / f"{leg}-legs.pcap", bpf)
        offline += decisions(pcap_replay(pcap, tmp_path / f"replay-{leg}", port_map, irc_gateway.directory / "rules",
                                         tmp_path / "replay-data"), origin)
    assert_same(inline, offline, f"IRC {way}")



# --- OSCAR: ICBMs and an OFT file transfer (a legacy protocol's side connection), both ways ---------------------

@pytest.fixture(scope="module")
def legacy_world(rules_dir, tmp_path_factory):
    """(pipeline, data dir) for the embedded gateway, as tests/test_legacy_gateway.py runs it (`imguard run`'s
    Gateway and pipeline in-process, in front of a server playing a transcript)."""
    from imguard.runtime import build_pipeline
    data = tmp_path_factory.mktemp("legacy-data")
    return build_pipeline(rules_dir, BUNDLED_SIGNATURES, data), data


@pytest.mark.parametrize("way", ["inbound", "outbound"])
def test_oscar_oft_verdicts_offline_are_the_verdicts_inline(tmp_path, legacy_world, rules_dir, way):
    """OSCAR through the embedded gateway in front of a server playing the BOS transcript: outbound our client
    sends an ICBM with the blocked keyword, an allowed one and EICAR over OFT from its own listener; inbound the
    server delivers the outside party's ICBM with the keyword and a rendezvous for EICAR from the outside party's
    listener. The OFT connection goes through the gateway's socks5 listener to the listener the rendezvous named
    (the gateway's leg to it is in both selections; the client's SOCKS5 leg is relayed by the replay, as SOCKS5 to
    an address no offer named). Decided the same offline as inline."""
    needs_tcpdump()
    from imguard.protocols.oscar import FlapDecoder, parse_oft
    from tests.test_legacy_gateway import (Inbox, TranscriptServer, bos_prefix_inbound, oft_sender, play_client,
                                           read_to_end, socks5, start_gateway)
    from tests.test_oscar import PEER as AIM_PEER
    from tests.test_oscar import incoming_im, incoming_sendfile_proposal, outgoing_im, sendfile_proposal

    pipeline, data = legacy_world
    alerts_file = data / "alerts.jsonl"

    def gateway_events() -> list[dict]:
        return [json.loads(line) for line in alerts_file.read_text().splitlines()] if alerts_file.exists() else []

    since = len(gateway_events())
    tag = uuid.uuid4().hex[:6]
    name = f"eicar-{tag}.com"
    ports: dict = {}

    async def main():
        prefix, c, s = bos_prefix_inbound()
        sender_saw: list = []
        listener = await asyncio.start_server(oft_sender(name, EICAR, sender_saw), "127.0.0.1", 0)
        ports["listener"] = listener.sockets[0].getsockname()[1]
        blocked_text, sentinel_text = f"the {BLOCKED_WORD} roadmap {tag}", f"sentinel {tag}"
        if way == "outbound":
            proposal = c.snac(0x04, 0x06, sendfile_proposal(ip=b"\x7f\x00\x00\x01", port=ports["listener"],
                                                            name=name.encode(), size=len(EICAR)))
            items = prefix + [(True, c.snac(0x04, 0x06, outgoing_im(b"CCCCCCC1", AIM_PEER, blocked_text))),
                              (True, c.snac(0x04, 0x06, outgoing_im(b"CCCCCCC2", AIM_PEER, sentinel_text))),
                              (True, proposal)]
            server_items = prefix
        else:
            proposal = s.snac(0x04, 0x07, incoming_sendfile_proposal(ip=b"\x7f\x00\x00\x01", port=ports["listener"],
                                                                     name=name.encode(), size=len(EICAR)))
            items = server_items = prefix + [
                (False, s.snac(0x04, 0x07, incoming_im(b"BBBBBBB3", AIM_PEER, blocked_text))),
                (False, s.snac(0x04, 0x07, incoming_im(b"BBBBBBB4", AIM_PEER, sentinel_text))), (False, proposal)]
        server = TranscriptServer(server_items)
        ports["server"] = await server.start()
        gw, ports["gateway"] = await start_gateway(tmp_path, pipeline, ports["server"], socks=True)
        ports["socks"] = gw.port_of("socks5")
        try:
            with Capture.start(tmp_path / "oscar.pcap", " or ".join(f"tcp port {p}" for p in ports.values())) \
                    as capture:
                reader, writer = await asyncio.open_connection("127.0.0.1", ports["gateway"])
                await play_client(reader, writer, prefix)
                inbox = Inbox(reader, FlapDecoder())
                if way == "outbound":
                    for _, frame in items[len(prefix):]:
                        writer.write(frame)
                    await server.wait_for(lambda got: got.endswith(proposal[6:]), "the rendezvous")
                    assert BLOCKED_WORD.encode() not in server.received
                else:
                    await inbox.until(lambda f: f.raw == proposal, "the proposal")
                    assert BLOCKED_WORD.encode() not in inbox.raw
                r, w = await socks5(ports["socks"], ports["listener"])
                prompt = await asyncio.wait_for(r.readexactly(256), 10)
                w.write(parse_oft(prompt).with_type(0x0202))
                assert await read_to_end(r) == b""          # the receiver gets no byte of the file
                await inbox.until(lambda f: b"imguard" in f.data and name.encode() in f.data, "the notice")
                w.close()
                writer.close()
                ports["capture"] = capture
        finally:
            await gw.stop()
            server.close()
            listener.close()

    asyncio.run(main())
    capture = ports.pop("capture")
    inline = decisions(settled(lambda: gateway_events()[since:]))
    assert sorted(k[5] for k in inline.elements() if k[0] == "message") == ["allow", "block"], inline
    assert [(k[2], k[5], k[7]) for k in inline.elements() if k[0] == "file" and k[5] != "notify"] == [
        (way, "block", sha256(EICAR))], inline
    offline = Counter()
    for leg, bpf, origin in (("client", f"tcp port {ports['gateway']} or tcp port {ports['socks']} or "
                                        f"tcp port {ports['listener']}", "client"),
                             ("server", f"tcp port {ports['server']} or tcp port {ports['listener']}", "server")):
        pcap = capture.select(tmp_path / f"{leg}-legs.pcap", bpf)
        offline += decisions(pcap_replay(pcap, tmp_path / f"replay-{leg}", [], rules_dir, tmp_path / "replay-data"),
                             origin)
    assert_same(inline, offline, f"OSCAR {way}")



# --- Yahoo: files over HTTP announced on the YMSG connection, both ways ------------------------------------------

@pytest.mark.parametrize("way", ["inbound", "outbound"])
def test_ymsg_http_file_verdicts_offline_are_the_verdicts_inline(tmp_path, legacy_world, rules_dir, way):
    """YMSG through the embedded gateway (a server playing the login transcript), its files over HTTP through the
    gateway's HTTP proxy listener. Outbound: our user offers a file peer to peer and POSTs EICAR to the host the
    offer names (the POST is matched by its token, held, refused). Inbound: files offered to our user by the relay
    method, fetched with a GET whose response is held: EICAR refused, a clean file delivered. The replay holds and
    decides the same request and response bodies."""
    needs_tcpdump()
    from tests.test_legacy_gateway import TranscriptServer, client_bytes, play_client, start_gateway
    from tests.test_ymsg import ME, PEER, SID, login_transcript, offer_packets, pkt

    pipeline, data = legacy_world
    alerts_file = data / "alerts.jsonl"

    def gateway_events() -> list[dict]:
        return [json.loads(line) for line in alerts_file.read_text().splitlines()] if alerts_file.exists() else []

    since = len(gateway_events())
    tag = uuid.uuid4().hex[:6]
    clean = f"the minutes of the meeting {tag}\n".encode() * 3

    def inbound_offer(tid: str, name: str, token: str) -> list:
        return [(False, pkt(0xDC, [("4", PEER), ("5", ME), ("265", tid), ("222", "1"), ("266", "1"), ("27", name),
                                   ("28", "68")], session=SID)),
                (True, pkt(0xDC, [("1", ME), ("5", PEER), ("265", tid), ("222", "3")], session=SID)),
                (False, pkt(0xDD, [("4", PEER), ("5", ME), ("265", tid), ("27", name), ("249", "3"),
                                   ("250", "127.0.0.1"), ("251", token)], session=SID))]

    if way == "outbound":
        items = login_transcript() + offer_packets(method="2", host="127.0.0.1", token=f"tok{tag}")
    else:
        items = (login_transcript() + inbound_offer(f"TR-BAD-{tag}", f"gift-{tag}.com", f"bad{tag}")
                 + inbound_offer(f"TR-OK-{tag}", f"notes-{tag}.txt", f"ok{tag}"))
    ports: dict = {}

    async def serve(reader, writer):
        """The other party's HTTP host: a POST is taken (201), a relay GET answered with the file."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        if length:
            await reader.readexactly(length)
        body = b"ok" if head.startswith(b"POST") else EICAR if f"bad{tag}".encode() in head else clean
        writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (b"201 Created" if length else b"200 OK", len(body)) + body)
        await writer.drain()
        writer.close()

    async def request(line: str, body: bytes = b"") -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", ports["proxy"])
        w.write(f"{line} HTTP/1.1\r\nHost: 127.0.0.1:{ports['peer']}\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        response = await asyncio.wait_for(r.read(), 10)
        w.close()
        return response

    async def main():
        peer = await asyncio.start_server(serve, "127.0.0.1", 0)
        ports["peer"] = peer.sockets[0].getsockname()[1]
        server = TranscriptServer(items)
        ports["server"] = await server.start()
        gw, ports["gateway"] = await start_gateway(tmp_path, pipeline, ports["server"], proxy=True)
        ports["proxy"] = gw.port_of("regular")
        try:
            with Capture.start(tmp_path / "ymsg.pcap", " or ".join(f"tcp port {p}" for p in ports.values())) \
                    as capture:
                reader, writer = await asyncio.open_connection("127.0.0.1", ports["gateway"])
                await play_client(reader, writer, items)
                await server.wait_for(lambda got: len(got) >= len(client_bytes(items)), "the offers")
                base = f"http://127.0.0.1:{ports['peer']}/relay"
                if way == "outbound":
                    response = await request(f"POST {base}?token=tok{tag}", EICAR)
                    assert response.startswith(b"HTTP/1.1 403"), response[:80]
                else:
                    response = await request(f"GET {base}?token=bad{tag}&sender={PEER}&recver={ME}")
                    assert response.startswith(b"HTTP/1.1 403") and EICAR not in response, response[:80]
                    notice = await asyncio.wait_for(reader.read(4096), 10)      # from "imguard", on the YMSG leg
                    assert f"gift-{tag}.com".encode() in notice, notice
                    response = await request(f"GET {base}?token=ok{tag}&sender={PEER}&recver={ME}")
                    assert response.startswith(b"HTTP/1.1 200") and response.endswith(clean), response[:80]
                writer.close()
                ports["capture"] = capture
        finally:
            await gw.stop()
            server.close()
            peer.close()

    asyncio.run(main())
    capture = ports.pop("capture")
    inline = decisions(settled(lambda: gateway_events()[since:]))
    files = sorted((k[2], k[5], k[7]) for k in inline.elements() if k[0] == "file" and k[5] != "notify")
    expected = [(way, "block", sha256(EICAR))] + ([(way, "allow", sha256(clean))] if way == "inbound" else [])
    assert files == sorted(expected), inline
    offline = Counter()
    for leg, bpf, origin in (("client", f"tcp port {ports['gateway']} or tcp port {ports['proxy']}", "client"),
                             ("server", f"tcp port {ports['server']} or tcp port {ports['peer']}", "server")):
        pcap = capture.select(tmp_path / f"{leg}-legs.pcap", bpf)
        offline += decisions(pcap_replay(pcap, tmp_path / f"replay-{leg}", [], rules_dir, tmp_path / "replay-data"),
                             origin)
    assert_same(inline, offline, f"YMSG {way}")


# --- SIP over UDP: sipsak -> imguard (reverse:udp) -> Kamailio -------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kamailio(tmp_path_factory):
    """A real Kamailio (tests/peers/sip_peers.py): MESSAGE answered 200 and logged."""
    from tests.peers.prosody import PeerError, free_ports
    from tests.peers.sip_peers import Kamailio, binary

    if binary("kamailio") is None or binary("sipsak") is None:
        if os.environ.get("CI"):
            pytest.fail("kamailio and sipsak are not installed (tools/setup.sh test), and CI is set")
        pytest.skip("kamailio and sipsak are not installed (tools/setup.sh test)")
    try:
        server = Kamailio.start(tmp_path_factory.mktemp("kamailio"), msrp_port=free_ports(1)[0])
    except PeerError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory) -> Path:
    """The bundled rules plus the test keyword rule (tests/data/rules), as the gateway fixtures use them."""
    import shutil
    rules = tmp_path_factory.mktemp("rules")
    for source in (ROOT / "rules", ROOT / "tests" / "data" / "rules"):
        for path in source.glob("*.yaml"):
            shutil.copy(path, rules / path.name)
    return rules


def test_sip_over_udp_verdicts_offline_are_the_verdicts_inline(tmp_path, kamailio, rules_dir):
    """SIP MESSAGEs over UDP, SIP's usual transport: an allowed one and one with a blocked keyword (Kamailio gets
    only the first, sipsak gets imguard's 403 for the second). The replay feeds each captured datagram to the SIP
    datagram handler of its flow, as the gateway does, and decides both MESSAGEs the same way."""
    needs_tcpdump()
    from imguard.gateway.master import Gateway as EmbeddedGateway
    from imguard.gateway.settings import GatewaySettings
    from imguard.runtime import build_pipeline
    from tests.peers.sip_peers import sipsak
    from tests.test_sip_support import message

    data = tmp_path / "gateway-data"
    pipeline = build_pipeline(rules_dir, BUNDLED_SIGNATURES, data)
    before = len(kamailio.messages())
    tag = uuid.uuid4().hex[:6]
    allowed, blocked = f"hello over udp {tag}", f"the {BLOCKED_WORD} budget {tag}"

    def local(text: str, cseq: int) -> bytes:
        return message(text, frm="<sip:alice@127.0.0.1>", to="<sip:bob@127.0.0.1>", ruri="sip:bob@127.0.0.1",
                       cseq=cseq, vias=1)

    async def main() -> int:
        settings = GatewaySettings(mode=[f"reverse:udp://127.0.0.1:{kamailio.port}@127.0.0.1:0"],
                                   listen_host="127.0.0.1",
                                   ports=list(GatewaySettings().ports) + [f"{kamailio.port}=sip"])
        gw = EmbeddedGateway(settings, pipeline, data_dir=data)
        await gw.start()
        gport = gw.port_of("reverse")
        try:
            with Capture.start(tmp_path / "sip.pcap", f"udp port {gport} or udp port {kamailio.port}") as capture:
                rc, out = await asyncio.to_thread(sipsak, local(allowed, 1), "127.0.0.1", gport, "udp")
                assert rc == 0, out
                rc, out = await asyncio.to_thread(sipsak, local(blocked, 2), "127.0.0.1", gport, "udp")
                assert rc != 0 and "SIP/2.0 403 Forbidden" in out, out
            main.capture = capture
        finally:
            await gw.stop()
        return gport

    gport = asyncio.run(main())
    assert [body for _, _, _, body in kamailio.messages()[before:]] == [allowed], kamailio.logs()
    alerts_file = data / "alerts.jsonl"
    inline = decisions(settled(lambda: [json.loads(line) for line in alerts_file.read_text().splitlines()]
                               if alerts_file.exists() else []))
    assert sorted(k[5] for k in inline.elements() if k[0] == "message") == ["allow", "block"], inline
    offline = replay_both_legs(main.capture, tmp_path, [gport], [kamailio.port],
                               [f"{gport}=sip", f"{kamailio.port}=sip"], rules_dir, transport="udp")
    assert_same(inline, offline, "SIP over UDP")


# --- chat APIs over HTTP: Slack, Matrix and Rocket.Chat's DDP WebSocket, through `imguard run` --------------------

@pytest.fixture
def chat_route(request):
    """tests/test_httpchat_gateway.py's stand-in Vendor server behind the real `imguard run` (reverse mode, plain
    HTTP), its module fixture shared: (vendor, gateway, the options the gateway runs with)."""
    from tests import test_httpchat_gateway as chat
    vendor, gw = request.getfixturevalue("vendor_gateway")
    vendor.requests.clear()
    vendor.ws_messages.clear()
    vendor.served.clear()
    vendor.ws_push.clear()
    vendor.ws_script = None
    options = ["--chat-max-upload-size", str(chat.UPLOAD_LIMIT), "--chat-max-json-depth", "32",
               "--chat-max-delivery-size", str(chat.DELIVERY_LIMIT)]
    offset = gw.log_size()
    yield vendor, gw, options
    assert not gw.crashed, gw.logs()
    assert not gw.errors_since(offset), "imguard logged errors:\n" + "\n".join(gw.errors_since(offset))


def replay_chat_legs(capture: Capture, workdir: Path, gateway_port: int, vendor_port: int, rules: Path,
                     options: list[str]) -> Counter:
    """As replay_both_legs, for HTTP (detected by its first bytes, no port map) with the gateway's chat options."""
    found: Counter = Counter()
    for leg, port, origin in (("client", gateway_port, "client"), ("server", vendor_port, "server")):
        pcap = capture.select(workdir / f"{leg}-legs.pcap", f"tcp port {port}")
        events = pcap_replay(pcap, workdir / f"replay-{leg}", [], rules, workdir / "replay-data", options)
        found += decisions(events, origin)
    return found


def test_chat_api_verdicts_offline_are_the_verdicts_inline(tmp_path, chat_route):
    """Slack through the gateway: the inside user's clean message, one with the blocked keyword, one masked; EICAR
    and a clean file by the two-step upload (the upload URL learned from a response; sharing the blocked file id
    refused too); an inbound history (learned identity) with the outside user's blocked, masked and clean messages;
    an outside user's EICAR and clean download. Matrix: a clean and a blocked message. Rocket.Chat's DDP socket: the
    client's clean, blocked and masked sendMessage, and the server's pushed messages (blocked, masked, clean), the
    socket negotiated with permessage-deflate. Captured, each leg replayed with `imguard pcap`: every decision the
    gateway wrote is the replay's, and no other."""
    needs_tcpdump()
    import aiohttp
    from tests import test_httpchat_gateway as chat

    vendor, gw, options = chat_route
    port = gw.ports[0]
    tag = uuid.uuid4().hex[:6]
    case = chat.slack_case()
    since = gw.mark()
    with Capture.start(tmp_path / "chat.pcap", f"tcp port {port} or tcp port {vendor.port}") as capture:
        # outbound Slack messages
        for text, status in ((f"lunch at noon {tag}", 200), (f"the {chat.BLOCKED_WORD} plan {tag}", 403),
                             (f"code {chat.MASK_WORD} {tag}", 200)):
            got, _ = chat.call_json(port, "POST", "/api/chat.postMessage", {"channel": "C1", "text": text}, chat.SLACK)
            assert got == status, text
        assert not [b for b in vendor.bodies("chat.postMessage") if chat.BLOCKED_WORD.encode() in b]
        # the two-step upload: EICAR refused (and its share), a clean file through
        form = {"Content-Type": "application/x-www-form-urlencoded", **chat.SLACK}
        for data, blocked in ((chat.EICAR, True), (chat.CLEAN + tag.encode(), False)):
            _, _, body = chat.call(port, "POST", "/api/files.getUploadURLExternal",
                                   f"filename=f-{tag}.bin&length={len(data)}".encode(), form)
            slot = json.loads(body)
            path = slot["upload_url"].split(str(port), 1)[1]
            status, _, _ = chat.call(port, "POST", path, data, {"Content-Type": "application/octet-stream"})
            assert status == (403 if blocked else 200)
            status, _ = chat.call_json(port, "POST", "/api/files.completeUploadExternal",
                                       {"files": [{"id": slot["file_id"]}], "channel_id": "C1"}, chat.SLACK)
            assert status == (403 if blocked else 200)
        # inbound: who asks, then a history from the outside user, then its files
        vendor.served[case.whoami[0]] = (200, "application/json", json.dumps(case.whoami[1]).encode())
        assert chat.call(port, "GET", case.whoami[0], b"", case.headers)[0] == 200
        texts = chat.history_texts(f"the {chat.BLOCKED_WORD} launch {tag}", f"code {chat.MASK_WORD} {tag}",
                                   f"sentinel {tag}", f"my own note {tag}")
        clean_file = chat.CLEAN + b"inbound " + tag.encode()
        files = {"eicar": chat.EICAR, "clean": clean_file}
        for kind in files:
            vendor.served[case.files[kind]] = (200, "application/octet-stream", files[kind])
        vendor.served[case.history_path.split("?")[0]] = (
            200, "application/json", json.dumps(case.history(texts, list(files))).encode())
        status, _, body = chat.call(port, "GET", case.history_path, b"", case.headers)
        assert status == 200 and chat.BLOCKED_WORD not in body.decode()
        assert chat.call(port, "GET", case.files["eicar"], b"", case.headers)[0] == 403
        status, _, body = chat.call(port, "GET", case.files["clean"], b"", case.headers)
        assert status == 200 and body == clean_file
        # Matrix (the stand-in answers every call)
        matrix = {"Authorization": "Bearer matrix-inside", "Content-Type": "application/json"}
        for i, (text, status) in enumerate(((f"hello matrix {tag}", 200), (f"{chat.BLOCKED_WORD} {tag}", 403))):
            got, _, _ = chat.call(port, "PUT", f"/_matrix/client/v3/rooms/!r{tag}:x/send/m.room.message/t{tag}{i}",
                                  json.dumps({"msgtype": "m.text", "body": text}).encode(), matrix)
            assert got == status, text

        # Rocket.Chat DDP over a WebSocket with permessage-deflate, both ways
        def changed(i, text):
            return json.dumps({"msg": "changed", "collection": "stream-room-messages", "id": "id",
                               "fields": {"eventName": "GENERAL", "args": [
                                   {"_id": f"d{tag}{i}", "rid": "GENERAL", "msg": text, "u": {"_id": "rc-outsider"},
                                    "md": [{"type": "PARAGRAPH", "value": text}]}]}})
        vendor.ws_push[:] = [changed(0, f"{chat.BLOCKED_WORD} pushed {tag}"), changed(1, f"{chat.MASK_WORD} {tag}"),
                             changed(2, f"pushed sentinel {tag}")]

        async def ddp():
            def send(i, text):
                return json.dumps({"msg": "method", "method": "sendMessage", "id": str(i),
                                   "params": [{"_id": f"m{tag}{i}", "rid": "R1", "msg": text}]})
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"http://127.0.0.1:{port}/websocket", compress=15) as ws:
                    assert ws.compress, "permessage-deflate was not negotiated through the gateway"
                    await ws.send_str(json.dumps({"msg": "method", "method": "login", "id": "0",
                                                  "params": [{"resume": "resume-token"}]}))
                    assert json.loads((await ws.receive(timeout=10)).data)["result"]["id"] == chat.RC_INSIDE
                    for i, text in ((1, f"hello ddp {tag}"), (2, f"{chat.BLOCKED_WORD} ddp {tag}"),
                                    (3, f"{chat.MASK_WORD} ddp {tag}")):
                        await ws.send_str(send(i, text))
                        await ws.receive(timeout=10)           # the echo, or imguard's error for the blocked one
                    await ws.send_str(json.dumps({"msg": "sub", "id": "s1", "name": "stream-room-messages",
                                                  "params": ["GENERAL", False]}))
                    pushed = [json.loads((await ws.receive(timeout=10)).data) for _ in range(3)]
            return [p["fields"]["args"][0]["msg"] for p in pushed]
        pushed = asyncio.run(ddp())
        assert pushed[0].startswith("A message from rc-outsider was blocked") and pushed[2] == f"pushed sentinel {tag}"
        inline_events = settled(lambda: gw.alerts()[since:])
    inline = decisions(inline_events)
    actions = Counter((key[2], key[5]) for key in inline.elements())
    # outbound: 3 Slack + 2 Matrix + 3 DDP messages, 2 uploads, a refused share; inbound: 4 history + 3 pushed
    # messages and 2 downloads (the inside user's own message is not decided inbound)
    assert actions[(OUTBOUND, "block")] >= 5 and actions[(INBOUND, "block")] >= 3, inline
    assert actions[(OUTBOUND, "mask")] == 2 and actions[(INBOUND, "mask")] == 2, inline
    assert {k[1] for k in inline.elements()} == {"slack", "matrix", "rocketchat"}, inline
    offline = replay_chat_legs(capture, tmp_path, port, vendor.port, gw.directory / "rules", options)
    assert_same(inline, offline, "chat APIs")


# --- Matrix against a real Synapse, through `imguard run` over plain HTTP --------------------------------------

def test_matrix_synapse_verdicts_offline_are_the_verdicts_inline(tmp_path, synapse, matrix_gateway):
    """A real Synapse behind `imguard run` (tests/test_e2e_matrix.py's fixtures), its inside user (bob, matrix-nio)
    through imguard in cleartext, the outside user (alice) straight to Synapse, who never syncs (so nothing the
    gateway did not carry is decided on her connections). Inbound: alice's blocked, clean and file-sharing messages
    in bob's syncs, her EICAR and clean files downloaded by bob. Outbound: bob's blocked and clean messages and his
    EICAR upload. Captured and replayed: the same decisions."""
    needs_tcpdump()
    import io

    import nio
    from tests.test_e2e_matrix import Route as MatrixRoute
    from tests.test_e2e_matrix import body_is, sync_until

    gw = matrix_gateway
    offset = gw.log_size()
    port = gw.ports[0]
    tag = uuid.uuid4().hex[:6]
    since = gw.mark()

    async def scenario():
        alice = await MatrixRoute("outside", synapse, None).client("alice")
        user = f"bob-{tag}"
        bob = nio.AsyncClient(f"http://127.0.0.1:{port}", user)
        assert isinstance(await bob.register(user, f"{user}-password-1"), nio.RegisterResponse)
        try:
            created = await alice.room_create(invite=[bob.user_id])
            assert isinstance(await bob.join(created.room_id), nio.JoinResponse)
            room = created.room_id
            assert isinstance(await bob.sync(timeout=0), nio.SyncResponse)
            sentinel = f"sentinel {tag}"
            for text in (f"the {BLOCKED_WORD} launch {tag}", f"hello from outside {tag}"):
                await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": text})
            shared = {}
            for name, data in ((f"eicar-{tag}.com", EICAR), (f"numbers-{tag}.bin", CLEAN)):
                up, _ = await alice.upload(io.BytesIO(data), content_type="application/octet-stream",
                                           filename=name, filesize=len(data))
                assert isinstance(up, nio.UploadResponse), up
                await alice.room_send(room, "m.room.message", {"msgtype": "m.file", "body": name,
                                                              "url": up.content_uri})
                shared[name] = up.content_uri
            await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": sentinel})
            seen = await sync_until(bob, room, body_is(sentinel))
            assert BLOCKED_WORD not in json.dumps(seen)
            eicar, clean = shared.values()
            assert isinstance(await bob.download(eicar), nio.DownloadError)
            got = await bob.download(clean)
            assert isinstance(got, nio.DownloadResponse) and got.body == CLEAN
            refused = await bob.room_send(room, "m.room.message",
                                          {"msgtype": "m.text", "body": f"{BLOCKED_WORD} {tag}"})
            assert not isinstance(refused, nio.RoomSendResponse), refused
            sent = await bob.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"reply {tag}"})
            assert isinstance(sent, nio.RoomSendResponse), sent
            up, _ = await bob.upload(io.BytesIO(EICAR), content_type="application/octet-stream",
                                     filename=f"out-{tag}.com", filesize=len(EICAR))
            assert not isinstance(up, nio.UploadResponse), up
        finally:
            await alice.close()
            await bob.close()

    with Capture.start(tmp_path / "matrix.pcap", f"tcp port {port} or tcp port {synapse.port}") as capture:
        asyncio.run(scenario())
        inline_events = settled(lambda: gw.alerts()[since:])
    assert not gw.crashed and not gw.errors_since(offset), gw.logs()
    inline = decisions(inline_events)
    actions = Counter((key[0], key[2], key[5]) for key in inline.elements())
    assert actions[("message", INBOUND, "block")] == 1 and actions[("message", INBOUND, "allow")] >= 4, inline
    assert actions[("file", INBOUND, "block")] == 1 and actions[("file", INBOUND, "allow")] == 1, inline
    assert actions[("message", OUTBOUND, "block")] == 1 and actions[("file", OUTBOUND, "block")] == 1, inline
    offline = replay_chat_legs(capture, tmp_path, port, synapse.port, gw.directory / "rules", [])
    assert_same(inline, offline, "Matrix (Synapse)")


def test_discord_zlib_stream_verdicts_offline_are_the_verdicts_inline(tmp_path, chat_route):
    """Discord's gateway socket with compress=zlib-stream (one zlib stream for the connection, a payload split over
    two WebSocket messages), as tests/test_httpchat_gateway.py's stand-in plays it: the outside user's blocked,
    sentinel, masked and clean MESSAGE_CREATEs, and the inside user's own. The replay reads the server's stream
    with the same codec (one inflater per socket) and decides the same messages."""
    needs_tcpdump()
    import zlib

    import aiohttp
    from tests import test_httpchat_gateway as chat

    vendor, gw, options = chat_route
    port = gw.ports[0]
    tag = uuid.uuid4().hex[:6]
    outside, inside = "8800111", "8800222"
    blocked, sentinel, masked, clean, own = chat.pushed_texts(tag)
    pushes = [chat.discord_message(i, tag, who, text) for i, (who, text) in enumerate(
        [(outside, blocked), (outside, sentinel), (outside, masked), (outside, clean), (inside, own)])]
    vendor.ws_script = chat.discord_script(pushes, inside, [])
    since = gw.mark()

    async def client() -> list[dict]:
        inflater, buffer, got = zlib.decompressobj(), bytearray(), []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{port}/?v=10&encoding=json&compress=zlib-stream",
                                          headers={"Host": "gateway.discord.gg"}, max_msg_size=0) as ws:
                await ws.send_str(json.dumps({"op": 2, "d": {"token": "discord-ws-token", "intents": 33281,
                                                             "properties": {"os": "linux", "browser": "test"}}}))
                while len(got) < 7:         # HELLO, READY, the five pushes
                    buffer.extend((await ws.receive(timeout=10)).data)
                    if buffer[-4:] == b"\x00\x00\xff\xff":
                        got.append(json.loads(inflater.decompress(bytes(buffer))))
                        buffer.clear()
        return got

    with Capture.start(tmp_path / "discord.pcap", f"tcp port {port} or tcp port {vendor.port}") as capture:
        got = asyncio.run(client())
        inline_events = settled(lambda: gw.alerts()[since:])
    contents = [g["d"]["content"] for g in got[2:]]
    assert contents[0].startswith(f"A message from {outside} was blocked by imguard:"), contents
    assert contents[1:] == [sentinel, f"code [REDACTED:keyword] {tag}", clean, own], contents
    inline = decisions(inline_events)
    assert sorted(k[5] for k in inline.elements()) == ["allow", "allow", "block", "mask"], inline
    offline = replay_chat_legs(capture, tmp_path, port, vendor.port, gw.directory / "rules", options)
    assert_same(inline, offline, "Discord zlib-stream")
