"""Replaying whole captures through the real sessions, inspector and policy (the test policy in
tests/data/replay/rules), with each capture's summary compared to its baseline in tests/data/replay/
(Zeek btest style). Regenerate the baselines after an intended change with

    IMGUARD_UPDATE_BASELINES=1 .venv/bin/python -m pytest tests/test_replay_e2e.py

and read the diff before committing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imguard.replay.pcapfile import Capture
from imguard.replay.replay import Replay
from imguard.replay.summary import ReplaySummary
from test_replay_builders import ACK, FIN, PSH, SYN, ether, ipv4, pcap, tcp

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "replay"
PCAPS = HERE / "data" / "captures"      # part of the project: see its README
UPDATE = os.environ.get("IMGUARD_UPDATE_BASELINES") == "1"
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")

# Every capture that has a baseline (test_every_capture_has_a_baseline checks the converse): a missing capture
# fails its test, it is never skipped.
ALL_CAPTURES = sorted(p.name[:-len(".json")].replace("__", "/") for p in DATA.glob("*__*.pcap*.json")
                      if not p.name.startswith("constructed__"))

# The file Zeek's irc-dcc-send.pcapng carries (ssh.trace, itself a pcap). Its SHA-256 was computed two
# ways: from our reassembly, and from `tshark -z follow,tcp,raw,1` (test_dcc_stream_matches_tshark
# recomputes the second whenever tshark is installed).
SSH_TRACE_SHA256 = "566c4819a8130d65d29076930bd46dde5c2595a4a8be4a380857feb5b430ec6e"
EICAR_SHA256 = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from imguard.runtime import build_pipeline

    return build_pipeline(DATA / "rules", DATA / "signatures", tmp_path_factory.mktemp("data"), write_alerts=False)


def replay(pipeline, source, **kwargs) -> tuple[Replay, ReplaySummary]:
    r = Replay(pipeline, **kwargs)
    capture = Capture.open(source) if isinstance(source, Path) else Capture(source, "<constructed>")
    return r, r.run(capture)


def normalized(summary: ReplaySummary, name: str) -> dict:
    """The summary as the baseline keeps it: findings and session anomalies by kind only (their wording
    belongs to other modules), timestamps to the microsecond."""
    d = summary.to_dict()
    d["capture"] = name
    for t in d["transfers"]:
        t["findings"] = sorted({f.split(":", 1)[0] for f in t["findings"]})
        t["ts"] = round(t["ts"], 6)
    for m in d["messages"]:
        m["ts"] = round(m["ts"], 6)
    for a in d["anomalies"]:
        a["ts"] = round(a["ts"], 6)
        if a["source"] == "session":
            a["detail"] = ""
    return d


def check_baseline(summary: ReplaySummary, name: str) -> None:
    path = DATA / (name.replace("/", "__") + ".json")
    got = normalized(summary, name)
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"no baseline {path.name}: run with IMGUARD_UPDATE_BASELINES=1 to create it")
        path.write_text(json.dumps({"_": "Do not edit. IMGUARD_UPDATE_BASELINES=1 pytest tests/test_replay_e2e.py "
                                         "regenerates it.", **got}, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(path.read_text())
    want.pop("_", None)
    assert json.loads(json.dumps(got)) == want, f"{name} differs from its baseline {path.name}"


@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_capture_matches_baseline(pipeline, name):
    """Every shared capture replays without an error and gives the summary in its baseline."""
    _, summary = replay(pipeline, PCAPS / name)
    assert not [a for a in summary.anomalies if a.kind in ("session_error", "inspection_error", "unknown_command")]
    check_baseline(summary, name)


def test_every_capture_has_a_baseline():
    """The captures in tests/data/captures/ and the baselines are the same set, so no capture goes unreplayed
    and no baseline is left without its capture (the README lists 14)."""
    assert sorted(str(p.relative_to(PCAPS)) for p in PCAPS.glob("*/*.pcap*")) == ALL_CAPTURES
    assert len(ALL_CAPTURES) == 14


# --- facts, asserted on their own ----------------------------------------------------------------------

def test_zeek_dcc_send_file(pipeline):
    """Zeek's DCC SEND: the offer on the IRC connection announces the data connection, whose 1,320,211 bytes
    are the file, inspected whole (a pcap by its true type) and allowed by the test policy."""
    _, summary = replay(pipeline, PCAPS / "zeek/irc-dcc-send.pcapng")
    assert [(c.protocol, c.detected_by.split(" offer")[0]) for c in summary.conversations] == [
        ("irc", "port 6667"), ("dcc", "DCC SEND"), ("dcc-chat", "DCC CHAT")]
    [t] = summary.transfers
    assert (t.name, t.size, t.sha256, t.mechanism, t.truncated, t.action) == (
        "ssh.trace", 1_320_211, SSH_TRACE_SHA256, "dcc", False, "allow")
    assert t.mime == "application/vnd.tcpdump.pcap"
    assert [m.text for m in summary.messages][:4] == ["hi, i'm chatting for some packets", "more packets",
                                                      "more packets!", "even more packets!"]
    # tim2 is the capture's client (his lines outbound); tim1's channel lines reach him from the server (inbound)
    assert {(m.sender, m.direction) for m in summary.messages} == {("tim2", "outbound"),
                                                                   ("tim1!tim@10.0.0.22", "inbound")}


@needs_tshark
def test_dcc_stream_matches_tshark():
    """tshark's own reassembly of the DCC data connection has the same bytes as the file we inspected."""
    out = subprocess.run(["tshark", "-r", str(PCAPS / "zeek/irc-dcc-send.pcapng"), "-q", "-z", "follow,tcp,raw,1"],
                         capture_output=True, text=True, check=True).stdout
    server = b"".join(bytes.fromhex(line.strip()) for line in out.splitlines() if line.startswith("\t"))
    assert len(server) == 1_320_211
    assert hashlib.sha256(server).hexdigest() == SSH_TRACE_SHA256


def test_eicar_over_dcc_is_blocked_and_never_reaches_the_receiver(pipeline):
    """The EICAR file sent by DCC is blocked by the malware rule: none of its bytes would have reached
    the receiver, and the sender is told on its IRC connection."""
    r, summary = replay(pipeline, PCAPS / "generated/irc_dcc_send.pcap", keep_forwarded=True)
    [t] = summary.transfers
    assert (t.name, t.size, t.action, t.rules, t.mechanism) == ("eicar.com", 6800, "block", ["test-malware"], "dcc")
    # Both people's IRC connections are in the capture; the offer as bob's connection saw it came last, so the
    # sender is named by the server's prefix for alice.
    assert t.sender.split("!")[0] == "alice" and t.recipients == ["bob"]
    dcc = next(c for c in summary.conversations if c.protocol == "dcc")
    assert dcc.bytes_from_server == 6800 and dcc.forwarded_to_client == 0       # must NOT reach the receiver
    assert r.forwarded(dcc.conn)[True] == b""
    # The notice goes to the IRC connection whose offer the DCC connection matched: both alice's and bob's
    # connections registered one (same address and port), bob's last.
    notices = r.forwarded(1)[True] + r.forwarded(2)[True]
    assert b":imguard NOTICE" in notices and b"eicar.com" in notices
    assert summary.blocked


def test_xmpp_messages_and_http_upload(pipeline):
    """XMPP: the chat message with sender, recipient and text; the EICAR upload announced by XEP-0363 is
    blocked on its HTTP connection, and the later message sharing its download URL is blocked too. Both sides of
    the conversation are decided: alice's connection sends (outbound: bob is not in the test zones), bob's
    receives (inbound)."""
    _, summary = replay(pipeline, PCAPS / "generated/xmpp_plain_httpupload.pcap")
    hello, link, hello_in, link_in = summary.messages
    assert (hello.sender, hello.recipients, hello.text, hello.action) == (
        "alice@localhost", ["bob@localhost"], "hello bob (plain chat)", "allow")
    assert link.action == "block" and link.text.endswith("/eicar.com")
    assert [(m.conn, m.direction) for m in summary.messages] == [(1, "outbound"), (1, "outbound"), (2, "inbound"),
                                                                 (2, "inbound")]
    assert (hello_in.text, hello_in.action, link_in.action) == (hello.text, "allow", "block")
    [t] = summary.transfers
    assert (t.name, t.size, t.sha256, t.mechanism, t.action, t.sender) == (
        "eicar.com", 68, EICAR_SHA256, "xep-0363", "block", "alice@localhost")
    assert [c.protocol for c in summary.conversations] == ["xmpp", "xmpp", "http", "http"]
    assert any(a.kind == "blocked_download" for a in summary.anomalies)


def test_ibb_and_socks5_transfers(pipeline):
    """The same EICAR payload by IBB (in the XMPP stream) and by SOCKS5 (both legs through proxy65): blocked
    each time. The IBB file is decided on both XMPP connections: leaving alice's and coming in on bob's (the
    capture was recorded without a gateway, so bob's copy is what would have reached him)."""
    _, summary = replay(pipeline, PCAPS / "generated/xmpp_plain_ibb_socks5.pcap")
    assert sorted((t.mechanism, t.conn, t.size, t.action) for t in summary.transfers) == [
        ("ibb", 1, 13600, "block"), ("ibb", 2, 13600, "block"), ("socks5", 3, 13600, "block"),
        ("socks5", 4, 13600, "block")]
    assert len({t.sha256 for t in summary.transfers}) == 1
    assert [c.protocol for c in summary.conversations] == ["xmpp", "xmpp", "bytestream", "bytestream"]


@pytest.mark.parametrize("name", ["zeek/xmpp-starttls.pcap", "zeek/irc-starttls.pcap"])
def test_starttls_stops_decoding(pipeline, name):
    """After STARTTLS the bytes are TLS: counted as encrypted, not decoded, no anomaly about them."""
    _, summary = replay(pipeline, PCAPS / name)
    [c] = summary.conversations
    assert c.encrypted and c.encrypted_bytes > 1000
    assert not [a for a in summary.anomalies if a.source == "session" and "xml" in a.kind]


def test_gaps_in_a_real_capture_are_reported(pipeline):
    """nDPI's jabber.pcap lacks segments (tshark: 'previous segment not captured'): each gap is an
    anomaly with its size, and the connection's gap bytes add up."""
    _, summary = replay(pipeline, PCAPS / "ndpi/jabber.pcap")
    gapped = {c.conn: c for c in summary.conversations if c.gaps}
    assert sorted(gapped) == [4, 6]
    assert {a.conn for a in summary.anomalies if a.kind == "capture_gap"} == {4, 6}


# --- constructed from real captures: gaps inside held files --------------------------------------------

def rewrite(path: Path, keep=lambda frame, segment: True, split: tuple[int, int] | None = None) -> bytes:
    """The capture as a new pcap with only the frames keep(number, segment) accepts; split=(frame, n) first
    cuts that frame's TCP payload into n segments, numbered frame.1 .. frame.n for `keep` (as floats)."""
    capture = Capture.open(path)
    records, linktype = [], None
    for frame in capture.frames():
        linktype = frame.linktype
        segment = capture.decode_tcp(frame)
        if split is not None and frame.number == split[0]:
            size = -(-len(segment.payload) // split[1])
            for i in range(split[1]):
                piece = segment.payload[i * size:(i + 1) * size]
                data = ether(ipv4(segment.src, segment.dst, tcp(segment.sport, segment.dport, segment.seq + i * size,
                                                                segment.ack, segment.flags, piece)))
                if keep(frame.number + (i + 1) / 10, segment):
                    records.append((frame.ts, data))
        elif keep(frame.number, segment):
            records.append((frame.ts, frame.data, frame.wire_length))
    return pcap(records, linktype=linktype)


def _dcc_data_frame(path: Path) -> int:
    [frame] = [s.frame for s in Capture.open(path).tcp_segments() if s.sport == 16800 and s.payload]
    return frame        # loopback: the whole 6,800-byte file in one segment


def test_gap_inside_a_dcc_file_makes_it_truncated_not_dropped(pipeline):
    """A segment of the DCC file missing from the capture: the file is still inspected, marked truncated
    (Suricata: a file cut by a gap is truncated, not dropped), and still blocked for its EICAR content."""
    path = PCAPS / "generated/irc_dcc_send.pcap"
    frame = _dcc_data_frame(path)
    _, summary = replay(pipeline, rewrite(path, lambda n, s: n != frame + 0.2, split=(frame, 4)))
    [t] = summary.transfers
    assert t.truncated and t.size == 1700 and t.name == "eicar.com"      # the bytes before the gap
    assert t.action == "block" and set(t.rules) == {"test-malware", "test-truncated"}
    assert [(a.conn, a.kind) for a in summary.anomalies if a.source == "reassembly"] == [(3, "capture_gap")]
    check_baseline(summary, "constructed/irc_dcc_send-gap")


def test_capture_ending_inside_a_dcc_file(pipeline):
    """The capture stops mid-transfer: what was held is inspected as a truncated file."""
    path = PCAPS / "generated/irc_dcc_send.pcap"
    frame = _dcc_data_frame(path)
    _, summary = replay(pipeline, rewrite(path, lambda n, s: n <= frame + 0.2, split=(frame, 4)))
    [t] = summary.transfers
    assert t.truncated and t.size == 3400 and "test-truncated" in t.rules


def test_gap_inside_an_ibb_transfer(pipeline):
    """A gap in the XMPP stream while the session holds an IBB transfer: the session cannot go on, and the
    transfer is listed truncated (never inspected: the session held the bytes)."""
    path = PCAPS / "generated/xmpp_plain_ibb_socks5.pcap"
    ibb = [s.frame for s in Capture.open(path).tcp_segments() if s.dport == 15222 and b"<data" in s.payload]
    _, summary = replay(pipeline, rewrite(path, lambda n, s: n != ibb[1]))
    t, bobs, *bytestreams = summary.transfers       # alice's, cut by the gap; bob's whole copy, coming in
    assert (t.mechanism, t.truncated, t.action, t.sender) == ("ibb", True, "", "alice@localhost")
    assert (bobs.mechanism, bobs.truncated, bobs.action, bobs.conn) == ("ibb", False, "block", 2)
    # Alice's session stopped at the gap, before her bytestream offer; bob's connection still delivers it to him, so
    # it is known there (an inbound offer) and both proxy65 legs are held and blocked.
    assert sorted((b.mechanism, b.action, b.sender) for b in bytestreams) == [
        ("socks5", "block", "alice@localhost")] * 2
    assert [c.protocol for c in summary.conversations] == ["xmpp", "xmpp", "bytestream", "bytestream"]


# --- constructed from scratch -------------------------------------------------------------------------------

def irc_capture(lines_from_client: list[bytes]) -> bytes:
    """A client on 192.0.2.10 talking IRC to 192.0.2.20:6667, with a handshake and a FIN handshake."""
    c, s = ("192.0.2.10", 40001), ("192.0.2.20", 6667)

    def packet(from_client, seq, ack, flags, payload=b""):
        (src, sp), (dst, dp) = (c, s) if from_client else (s, c)
        return ether(ipv4(src, dst, tcp(sp, dp, seq, ack, flags, payload)))

    cseq, sseq, t = 100, 900, 1_700_000_000.0
    frames = [packet(True, cseq, 0, SYN), packet(False, sseq, cseq + 1, SYN | ACK),
              packet(True, cseq + 1, sseq + 1, ACK)]
    cseq, sseq = cseq + 1, sseq + 1
    welcome = b":irc.example 001 carol :Welcome\r\n"
    for i, line in enumerate(lines_from_client):
        frames.append(packet(True, cseq, sseq, ACK | PSH, line))
        cseq += len(line)
        if i == 1:
            frames.append(packet(False, sseq, cseq, ACK | PSH, welcome))
            sseq += len(welcome)
    frames += [packet(True, cseq, sseq, FIN | ACK), packet(False, sseq, cseq + 1, FIN | ACK),
               packet(True, cseq + 1, sseq + 1, ACK)]
    return pcap([(t + i / 10, f) for i, f in enumerate(frames)])


def test_blocked_message_never_reaches_the_server(pipeline):
    """A message with a forbidden keyword is blocked: its text must NOT reach the server; the next one does."""
    data = irc_capture([b"NICK carol\r\n", b"USER carol 0 * :Carol\r\n",
                        b"PRIVMSG #ops :this is classified\r\n", b"PRIVMSG #ops :lunch?\r\n"])
    r, summary = replay(pipeline, data, keep_forwarded=True)
    assert [(m.sender, m.recipients, m.text, m.action, m.rules) for m in summary.messages] == [
        ("carol", ["#ops"], "this is classified", "block", ["test-keyword"]),
        ("carol", ["#ops"], "lunch?", "allow", [])]
    to_server = r.forwarded(1)[False]
    assert b"classified" not in to_server and b"PRIVMSG #ops :lunch?\r\n" in to_server
    assert b"NOTICE carol" in r.forwarded(1)[True]
    assert summary.blocked


@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_damaged_captures_replay_without_errors(pipeline, name):
    """Each capture cut short and with bytes overwritten at random, replayed through the real sessions: partial
    results and anomalies, never an exception, and no session or inspection error."""
    import random

    from imguard.replay.pcapfile import CaptureLimits

    rng = random.Random(name)
    original = (PCAPS / name).read_bytes()
    for _ in range(5):
        data = bytearray(original[:rng.randrange(24, len(original))])
        for _ in range(rng.randrange(0, 30)):
            data[rng.randrange(24, len(data))] = rng.randrange(256)
        summary = Replay(pipeline).run(Capture(bytes(data), name, CaptureLimits(max_record_bytes=1 << 20)))
        errors = [a for a in summary.anomalies if a.kind in ("session_error", "inspection_error", "unknown_command")]
        assert not errors, errors


def test_gap_inside_a_socks5_bytestream(pipeline):
    """A segment of the initiator's SOCKS5 upload missing: that copy is inspected truncated (the bytes before
    the gap), the proxy's complete copy to the target is not."""
    path = PCAPS / "generated/xmpp_plain_ibb_socks5.pcap"
    [frame] = [s.frame for s in Capture.open(path).tcp_segments() if s.dport == 15000 and len(s.payload) == 13600]
    _, summary = replay(pipeline, rewrite(path, lambda n, s: n != frame + 0.3, split=(frame, 4)))
    socks5 = sorted((t.size, t.truncated, t.action) for t in summary.transfers if t.mechanism == "socks5")
    assert socks5 == [(6800, True, "block"), (13600, False, "block")]


def test_msn_messages_with_the_default_port_map(pipeline):
    """nDPI's msnms.pcap (MSN Messenger, 2005) with the default port map: every connection to 1863 is MSNP, and
    its switchboard messages come out with sender, recipient and text, both directions, accents decoded."""
    _, summary = replay(pipeline, PCAPS / "ndpi/msnms.pcap")
    assert {c.protocol for c in summary.conversations} == {"msnp"}
    me, peer = "jujurius@msn.com", "cecile260992@hotmail.com"
    messages = [(m.sender, m.recipients, m.text) for m in summary.messages]
    assert len(messages) == 34 and all(m.protocol == "msnp" and m.action == "allow" for m in summary.messages)
    assert (peer, [me], "je te comprend") in messages
    assert (me, [peer], "tien jyce est au tel avec damien") in messages
    assert (peer, [me], "kan on le voyai avec tania, il étai pareil qu'avec toi kan on sortai") in messages
    assert not summary.anomalies
