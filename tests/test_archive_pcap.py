"""`imguard archive export --pcap`: what a running gateway archived, written as a capture, opened by tshark.

A real ngIRCd, `irc` library clients and the real `imguard run` fill a data folder; the real `imguard archive
export --pcap` command writes the conversation (by participant and time) and the blocked transfer (by SHA-256 and by
record id); tshark, an independent decoder, must read the capture as IRC with the archived texts and the transfer's
bytes, find nothing wrong with its TCP, and the export must be an `archive_export` event.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import unescape

import pytest

from tests.peers.ngircd import CHANNEL
from tests.test_e2e_irc import EICAR, Chat, Route, irc_dir, irc_gateway, ircd  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(180)


def _tshark() -> str:
    path = shutil.which("tshark")
    assert path, "tshark is not installed (tools/setup.sh installs it)"
    return path


def tshark_fields(capture: Path, display_filter: str, *fields: str) -> list[list[str]]:
    command = [_tshark(), "-r", str(capture), "-Y", display_filter, "-T", "fields", "-E", "occurrence=a",
               "-E", "aggregator=|"]
    for field in fields:
        command += ["-e", field]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def export(data_dir: Path, out: Path, *selectors: str) -> Path:
    result = subprocess.run([sys.executable, "-m", "imguard", "archive", "export", "--pcap", "--data-dir",
                             str(data_dir), "--out", str(out), *selectors], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    [capture] = out.glob("*.pcapng")
    return capture


def archived(data_dir: Path, *selectors: str) -> list[dict]:
    """The records as `imguard archive search` gives them: the source the capture is checked against."""
    result = subprocess.run([sys.executable, "-m", "imguard", "archive", "search", "--data-dir", str(data_dir),
                             *selectors], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def wait_archived(data_dir: Path, predicate, *selectors: str) -> list[dict]:
    deadline = time.monotonic() + 15
    while True:         # the gateway's writer thread stores records within a moment
        records = archived(data_dir, *selectors)
        if predicate(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def replayed_transfers(capture: Path, data_dir: Path) -> list[dict]:
    """The capture through `imguard pcap`: the round trip decides the rebuilt transfer as the gateway did."""
    result = subprocess.run([sys.executable, "-m", "imguard", "pcap", str(capture), "--json", "--data-dir",
                             str(data_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout.splitlines()[0])["transfers"]


def tcp_is_clean(capture: Path) -> None:
    """tshark checks the checksums and the TCP sequence analysis: no frame is flagged."""
    flagged = subprocess.run([_tshark(), "-r", str(capture), "-o", "tcp.check_checksum:TRUE", "-o",
                              "ip.check_checksum:TRUE", "-Y", "tcp.analysis.flags || tcp.checksum.status == 0 || "
                              "ip.checksum.status == 0 || _ws.malformed"], capture_output=True, text=True, timeout=60)
    assert flagged.returncode == 0 and not flagged.stdout.strip(), flagged.stdout + flagged.stderr


def test_a_gateway_conversation_and_its_blocked_transfer_open_in_tshark(ircd, irc_gateway, tmp_path):  # noqa: F811
    route = Route("imguard", False, ircd, irc_gateway)
    direct = f"the quarterly plan {uuid.uuid4().hex[:6]}"
    channel = f"hello channel {uuid.uuid4().hex[:6]}"
    name = f"eicar-{uuid.uuid4().hex[:6]}.com"
    start = datetime.datetime.now(datetime.timezone.utc).isoformat()
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        alice.conn.privmsg(bob.nick, direct)
        assert chat.pump(lambda: (alice.nick, direct) in bob.private, 15), route.failure_logs()
        alice.conn.privmsg(CHANNEL, channel)
        assert chat.pump(lambda: channel in bob.channel_texts(), 15), route.failure_logs()
        transfer = chat.offer_file(alice, bob, name, EICAR)
        assert chat.pump(lambda: transfer.done, 20), route.failure_logs()
        assert bytes(transfer.received) == b""
        chat.sentinel(alice, bob, "after the blocked file")
    data_dir = irc_gateway.data_dir
    eicar = hashlib.sha256(EICAR).hexdigest()
    records = wait_archived(data_dir, lambda rs: {direct, channel} <= {r.get("text") for r in rs}
                            and any(r.get("sha256") == eicar for r in rs), "--person", alice.nick, "--since", start)
    texts = [r.get("text") for r in records]
    assert direct in texts and channel in texts and any(r.get("sha256") == eicar for r in records), records

    # the conversation: alice's records since the test began, as archived on both people's connections
    capture = export(data_dir, tmp_path / "conversation", "--person", alice.nick, "--since", start)
    tcp_is_clean(capture)
    sent = tshark_fields(capture, "irc.request.command == \"PRIVMSG\"", "irc.request.command_parameter",
                         "irc.request.trailer", "tcp.srcport")
    relayed = tshark_fields(capture, "irc.response.command == \"PRIVMSG\"", "irc.response.prefix",
                            "irc.response.command_parameter", "irc.response.trailer")
    # what alice's client sent, decoded by tshark, is what the archive holds for her outbound records
    outbound = [r for r in records if r["direction"] == "outbound" and r["kind"] == "message"]
    said = [r for r in outbound if r["recipients"] or r["conversation"]]
    assert sorted((row[0], row[1]) for row in sent if "DCC" not in row[1]) == sorted(
        (CHANNEL if r.get("conversation") == CHANNEL else bob.nick, r["text"]) for r in said)
    # a text without a target (alice's QUIT reason, "bye") is written as her QUIT
    quits = tshark_fields(capture, "irc.request.command == \"QUIT\"", "irc.request.trailer", "tcp.srcport")
    alice_port = int(said[0]["client_address"].rpartition(":")[2])
    assert [row[0] for row in quits if int(row[1]) == alice_port] == [
        r["text"] for r in outbound if r not in said and r["sender"] == alice.nick] or ["imguard archive export"]
    client_ports = {int(r["client_address"].rpartition(":")[2]) for r in said}
    assert {int(row[2]) for row in sent} <= client_ports, (sent, said)
    # what reached bob (inbound on his connection) comes from the server with alice's prefix
    inbound = [r for r in records if r["direction"] == "inbound" and r["kind"] == "message"]
    assert inbound, records
    assert sorted(row[2] for row in relayed if "DCC" not in row[2]) == sorted(r["text"] for r in inbound)
    assert all(row[0].split("!")[0] == alice.nick for row in relayed)
    # the DCC offer of the blocked file is decoded as CTCP, and every frame says it is synthetic
    assert any(f"DCC SEND {name}" in row[1] for row in sent), sent
    comments = tshark_fields(capture, "frame", "frame.comment")
    assert comments and all("synthetic" in row[0] for row in comments), comments[:5]

    # the blocked transfer, by its hash: the offer and a DCC data connection carrying the quarantined bytes
    transfer_capture = export(data_dir, tmp_path / "transfer", "--sha256", eicar)
    tcp_is_clean(transfer_capture)
    offers = tshark_fields(transfer_capture, "irc", "irc.request.trailer", "irc.response.trailer")
    offer = next(field for row in offers for field in row if f"DCC SEND {name}" in field)
    port = int(offer.strip("\x01").split()[-2])
    payload = tshark_fields(transfer_capture, f"tcp.srcport == {port} && tcp.len > 0", "tcp.payload")
    assert bytes.fromhex("".join(row[0].replace(":", "") for row in payload)) == EICAR
    [again] = replayed_transfers(transfer_capture, tmp_path / "replay")
    assert (again["sha256"], again["name"], again["mechanism"], again["action"]) == (eicar, name, "dcc", "block")

    # the same transfer by its record id: one record, the same bytes
    file_record = next(r for r in records if r.get("sha256") == eicar)
    one = export(data_dir, tmp_path / "one", "--event-id", str(file_record["id"]))
    payload = tshark_fields(one, "tcp.len > 0 && !irc", "tcp.payload")
    assert bytes.fromhex("".join(row[0].replace(":", "") for row in payload)).startswith(EICAR)

    # each export is an event
    events = [e for e in irc_gateway.alerts() if e.get("event", {}).get("action") == "archive_export"]
    exports = [e["imguard"]["archive"]["export"] for e in events]
    assert [x["format"] for x in exports][-3:] == ["pcap"] * 3
    assert exports[-3]["documents"] == 1 and exports[-3]["messages"] >= 4 and exports[-2]["attached"] >= 1
    assert exports[-1]["event_id"] == str(file_record["id"])


def test_a_gateway_xmpp_chat_and_its_blocked_ibb_transfer_open_in_tshark(prosody, gateway, tmp_path):
    """The same through a real Prosody and slixmpp clients: tshark decodes the capture's `<message>` stanzas with
    the archived parties and bodies, and the blocked file as an in-band bytestream carrying its bytes."""
    import asyncio

    from tests.test_e2e_xmpp import STARTTLS, Route as XmppRoute, error_text, sentinel_after

    route = XmppRoute("imguard", STARTTLS, prosody, gateway)
    body = f"hello bob <&> ünïcödé {uuid.uuid4().hex[:6]}"
    name = f"eicar-{uuid.uuid4().hex[:6]}.com"
    start = datetime.datetime.now(datetime.timezone.utc).isoformat()

    async def scenario():
        async with route.client("alice") as alice, route.client("bob") as bob:
            alice.send_chat(bob.jid, body)
            assert await bob.wait_message(body), f"bob never got {body!r}"
            result = await alice.ibb_send(bob.jid, EICAR, name=name)
            notice = await alice.wait_for(lambda r: [m for m in r.messages
                                                     if name in (m["body"] or "") + error_text(m)], timeout=5)
            assert notice or result.error, "alice was not told her file was blocked"
            await sentinel_after(alice, bob, "after the blocked file")
            assert EICAR not in bytes(b"".join(bob.received.ibb.values()))
    asyncio.run(scenario())
    alice_jid = route.bare("alice")
    eicar = hashlib.sha256(EICAR).hexdigest()
    records = wait_archived(gateway.data_dir, lambda rs: body in {r.get("text") for r in rs}
                            and any(r.get("sha256") == eicar for r in rs), "--person", alice_jid, "--since", start)
    messages = [r for r in records if r["kind"] == "message" and r.get("text") == body]
    assert messages and any(r.get("sha256") == eicar for r in records), records

    capture = export(gateway.data_dir, tmp_path / "conversation", "--person", alice_jid, "--since", start)
    tcp_is_clean(capture)
    stanzas = tshark_fields(capture, "xmpp.message", "xmpp.from", "xmpp.to", "xmpp.type", "xml.cdata")
    # tshark shows a body's character data as it is on the wire, entities not expanded
    decoded = [(row[0], row[1], row[2], unescape(row[3])) for row in stanzas if unescape(row[3]) == body]
    assert sorted(decoded) == sorted((r["sender"], r["recipients"].split()[0], "chat", body) for r in messages)

    transfer_capture = export(gateway.data_dir, tmp_path / "transfer", "--sha256", eicar)
    tcp_is_clean(transfer_capture)
    assert tshark_fields(transfer_capture, "xmpp.ibb.open", "frame.number")
    data = tshark_fields(transfer_capture, "xmpp.ibb.data", "xml.cdata")
    import base64
    blocks = [base64.b64decode(row[0]) for row in data]
    assert blocks and all(block == EICAR for block in blocks)      # one copy per archived file record
    again = replayed_transfers(transfer_capture, tmp_path / "replay")
    assert again and {(t["sha256"], t["mechanism"], t["action"]) for t in again} == {(eicar, "ibb", "block")}


def test_what_the_capture_rebuilds_and_what_it_leaves_out(tmp_path):
    """Records written by the archive itself (no gateway): a room message, a multi-line IRC text, an IPv6 client, a
    record of a protocol without a rebuild (counted as skipped), one record by its uid, and --event-id refused for
    the document formats."""
    from imguard.archive import Archive
    from imguard.model import ChatContext, Decision

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = Archive(data_dir / "archive.sqlite3")
    room = "team@conference.example.com"
    alice = ChatContext(protocol="xmpp", direction="outbound", sender="alice@example.com/phone", recipients=(room,),
                        conversation=room, client_address="[2001:db8::10]:40001", connection_id="c1")
    store.add_message("to the room <&>", alice, Decision())
    irc = ChatContext(protocol="irc", direction="inbound", sender="bob!b@example.net", recipients=("alice",),
                      client_address="192.0.2.77:40002", connection_id="c2")
    store.add_message("first line\nsecond line", irc, Decision())
    store.add_message("over oscar", ChatContext(protocol="oscar", direction="outbound", sender="alice",
                                                recipients=("bob",), client_address="192.0.2.78:40003"), Decision())
    store.close()

    capture = export(data_dir, tmp_path / "all", "--since", "2000-01-01")
    tcp_is_clean(capture)
    [stanza] = tshark_fields(capture, "xmpp.message", "ipv6.src", "xmpp.type", "xmpp.to", "xml.cdata")
    assert (stanza[0], stanza[1], stanza[2], unescape(stanza[3])) == ("2001:db8::10", "groupchat", room,
                                                                      "to the room <&>")
    lines = tshark_fields(capture, "irc.response", "ip.dst", "irc.response.prefix", "irc.response.trailer")
    assert lines == [["192.0.2.77", "bob!b@example.net|bob!b@example.net", "first line|second line"]]
    events = [json.loads(line) for line in (data_dir / "alerts.jsonl").read_text().splitlines()]
    export_event = events[-1]["imguard"]["archive"]["export"]
    assert (export_event["messages"], export_event["skipped"], export_event["sessions"]) == (2, 1, 2)

    import sqlite3
    database = sqlite3.connect(data_dir / "archive.sqlite3")
    [(uid,)] = database.execute("SELECT uid FROM records WHERE protocol = 'irc'").fetchall()
    database.close()
    one = export(data_dir, tmp_path / "one", "--event-id", uid)
    assert not tshark_fields(one, "xmpp", "frame.number")
    assert len(tshark_fields(one, "irc.response", "frame.number")) == 1
    refused = subprocess.run([sys.executable, "-m", "imguard", "archive", "export", "--format", "eml", "--event-id",
                              uid, "--data-dir", str(data_dir), "--out", str(tmp_path / "eml")], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "--pcap only" in refused.stderr
