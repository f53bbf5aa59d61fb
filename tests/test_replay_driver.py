"""The replay driver with scripted sessions and a recording pipeline: how each command is carried out,
how gaps, closes and session failures reach a session, and that one broken connection leaves the others
alone. (The real sessions are exercised on real captures in test_replay_e2e.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field

from imguard.model import BLOCK, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Close, InspectFile, Record, Send, StartTls, StreamSession
from imguard.replay.pcapfile import Capture
from imguard.replay.replay import Replay, ReplaySettings
from test_replay_builders import stream_capture


@dataclass
class RecordingPipeline:
    """Stands in for imguard.pipeline.Pipeline: no YARA, no policy; blocks files whose name says so."""
    files: list = field(default_factory=list)
    records: list = field(default_factory=list)

    def check_message(self, text: str, ctx: ChatContext) -> Decision:
        return Decision(action=BLOCK if "secret" in text else "allow")

    def check_file(self, data, ctx, name="", claimed_mime="", truncated=False):
        self.files.append((data, name, truncated))
        report = FileReport(name, name, len(data), sha256="00" * 32, mime="application/octet-stream")
        return report, Decision(action=BLOCK if "bad" in name else "allow")

    def record(self, event: dict) -> None:
        self.records.append(event)

    def with_direction(self, ctx: ChatContext) -> ChatContext:
        return ctx


class Scripted(StreamSession):
    """A session that logs every call and answers data with a script: data -> list of commands."""

    def __init__(self, script=None):
        self.calls: list[tuple] = []
        self.script = script or (lambda from_client, data: [Send(not from_client, data)])

    def data_received(self, from_client, data):
        self.calls.append(("data", from_client, data))
        return self.script(from_client, data)

    def tls_started(self):
        return []

    def file_verdict(self, transfer_id, report, decision):
        self.calls.append(("verdict", transfer_id, decision.action))
        return [Send(False, b"released")] if not decision.blocked else [Close("blocked")]

    def connection_closed(self, from_client):
        self.calls.append(("closed", from_client))
        return []


def replay(data: bytes, session, port: int = 5222, pipeline=None):
    pipeline = pipeline or RecordingPipeline()
    sessions = []

    def factory(request):
        sessions.append(request)
        return session

    r = Replay(pipeline, ReplaySettings(ports=[f"{port}=chat"]), factories={"chat": factory}, keep_forwarded=True)
    return r, r.run(Capture(data, "<test>")), pipeline, sessions


def test_session_gets_both_directions_in_order_and_the_close():
    session = Scripted()
    r, summary, _, [request] = replay(stream_capture([(False, b"hello client"), (True, b"hi server")]), session)
    assert session.calls == [("data", False, b"hello client"), ("data", True, b"hi server"),
                             ("closed", True), ("closed", False)]
    assert request.context.connection_id == "C1" and request.context.client_address == "192.0.2.10:40001"
    assert r.forwarded(1) == {True: b"hello client", False: b"hi server"}
    [c] = summary.conversations
    assert (c.protocol, c.detected_by, c.forwarded_to_client, c.forwarded_to_server) == (
        "chat", "port 5222, server spoke first", 12, 9)


def test_inspect_file_goes_through_the_pipeline_and_back():
    """InspectFile: the pipeline inspects it now, the session gets the verdict, and the transfer is listed."""
    def script(from_client, data):
        return [InspectFile("t1", data, ChatContext(sender="alice", transfer_mechanism="test"), name=data.decode(),
                            truncated=True)]
    session = Scripted(script)
    r, summary, pipeline, _ = replay(stream_capture([(True, b"bad.exe")]), session)
    assert pipeline.files == [(b"bad.exe", "bad.exe", True)]
    assert ("verdict", "t1", "block") in session.calls
    [t] = summary.transfers
    assert (t.name, t.size, t.action, t.truncated, t.sender, t.mechanism) == ("bad.exe", 7, "block", True, "alice",
                                                                             "test")
    assert summary.conversations[0].session_closed == "blocked" and summary.blocked


def test_messages_checked_by_the_session_are_listed():
    """A session's check_message calls reach the pipeline and are listed with their action."""
    def script(from_client, data):
        decision = request_holder[0].checker.check_message(data.decode(), ChatContext(sender="bob", recipients=("x",)))
        return [] if decision.blocked else [Send(not from_client, data)]
    request_holder = []
    session = Scripted(script)
    pipeline = RecordingPipeline()

    def factory(request):
        request_holder.append(request)
        return session
    r = Replay(pipeline, ReplaySettings(ports=["5222=chat"]), factories={"chat": factory}, keep_forwarded=True)
    summary = r.run(Capture(stream_capture([(True, b"the secret plan"), (True, b"lunch")])))
    assert [(m.sender, m.recipients, m.text, m.action) for m in summary.messages] == [
        ("bob", ["x"], "the secret plan", "block"), ("bob", ["x"], "lunch", "allow")]
    assert r.forwarded(1)[False] == b"lunch"                  # the blocked text must NOT reach the server


def test_gap_ends_that_side():
    """The side with the gap is closed for the session at the gap; the other side goes on."""
    session = Scripted()
    items = [(True, b"one"), (True, b"lost!", "lost"), (False, b"reply"), (True, b"three")]
    _, summary, _, _ = replay(stream_capture(items), session)
    assert session.calls == [("data", True, b"one"), ("closed", True), ("data", False, b"reply"), ("closed", False)]
    c = summary.conversations[0]
    assert c.undecoded_bytes == 5 and c.bytes_from_client == 8


def test_start_tls_and_close_stop_decoding():
    session = Scripted(lambda fc, data: [StartTls()] if data == b"STARTTLS" else [Send(not fc, data)])
    _, summary, _, _ = replay(stream_capture([(True, b"STARTTLS"), (True, b"\x16\x03\x01tls"), (False, b"tls")]),
                              session)
    assert [c for c in session.calls if c[0] == "data"] == [("data", True, b"STARTTLS")]
    c = summary.conversations[0]
    assert c.encrypted and c.encrypted_bytes == 9

    session = Scripted(lambda fc, data: [Close("bye")])
    _, summary, _, _ = replay(stream_capture([(True, b"quit"), (True, b"after")]), session)
    assert summary.conversations[0].undecoded_bytes == 5 and summary.conversations[0].session_closed == "bye"


def test_a_failing_session_is_an_anomaly_not_a_crash():
    def script(from_client, data):
        raise RuntimeError("boom")
    _, summary, _, _ = replay(stream_capture([(True, b"x"), (True, b"y")]), Scripted(script))
    assert [(a.kind, a.detail) for a in summary.anomalies] == [("session_error", "RuntimeError: boom")]
    assert summary.conversations[0].undecoded_bytes == 1


def test_records_are_written_and_their_anomalies_listed():
    """A session's Record is written as it is; its Anomaly fact becomes an anomaly event and a summary line."""
    event = {"event": {"category": ["session"]}, "imguard": {}}
    odd = Anomaly(ChatContext(protocol="line"), "odd", "very odd", data={"seen": 1})
    _, summary, pipeline, _ = replay(stream_capture([(True, b"x")]), Scripted(lambda fc, d: [Record(event), odd]))
    assert pipeline.records[0] == event
    assert pipeline.records[1]["imguard"]["anomaly"] == {"kind": "odd", "detail": "very odd", "seen": 1}
    assert [(a.source, a.kind, a.detail) for a in summary.anomalies] == [("session", "odd", "very odd")]


def test_facts_are_recorded_with_the_direction_decisions_see():
    """An anomaly is recorded with its context as the pipeline derives it (topology, then zones), like decisions."""
    class Directing(RecordingPipeline):
        def with_direction(self, ctx):
            return ctx.with_(direction="inbound" if ctx.origin == "server" else "outbound")

    odd = Anomaly(ChatContext(protocol="line", origin="server"), "odd", "very odd")
    pipeline = Directing()
    replay(stream_capture([(True, b"x")]), Scripted(lambda fc, d: [odd]), pipeline=pipeline)
    [event] = pipeline.records
    assert event["imguard"]["context"]["direction"] == "inbound"


def test_unknown_protocol_is_relayed_whole():
    """A port nobody decodes and first bytes nobody recognises: counted as crossing untouched."""
    r, summary, _, sessions = replay(stream_capture([(True, b"\x00\x01binary")], port=9999), Scripted())
    assert sessions == [] and summary.conversations[0].protocol == ""
    assert r.forwarded(1)[False] == b"\x00\x01binary"


def test_sip_over_udp_datagrams_reach_the_sip_handler_of_their_flow():
    """UDP to a port mapped to SIP: each datagram goes, as one event, to the SIP datagram handler of its flow (one
    per client address), as the gateway delivers them; both MESSAGEs are decided, the secret one blocked."""
    from test_replay_builders import ether, ipv4, pcap

    def message(text: str, cseq: int) -> bytes:
        body = text.encode()
        return (f"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:4000;branch=z9hG4bK-{cseq}\r\n"
                f"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c{cseq}\r\n"
                f"CSeq: {cseq} MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

    def datagram(src, dst, payload):
        from scapy.layers.inet import UDP
        from scapy.packet import Raw
        return ether(ipv4(src[0], dst[0], bytes(UDP(sport=src[1], dport=dst[1], chksum=0) / Raw(payload)), proto=17))

    alice, bob_client, server = ("10.0.0.1", 4000), ("10.0.0.3", 4001), ("10.0.0.2", 5060)
    frames = [(1.0, datagram(alice, server, message("hello", 1))),
              (2.0, datagram(bob_client, server, message("the secret plan", 2))),
              (3.0, datagram(alice, ("10.0.0.2", 9999), b"not sip, not mapped"))]
    pipeline = RecordingPipeline()
    summary = Replay(pipeline).run(Capture(pcap(frames)))
    assert [(c.protocol, c.client, c.server) for c in summary.conversations] == [
        ("sip-udp", "10.0.0.1:4000", "10.0.0.2:5060"), ("sip-udp", "10.0.0.3:4001", "10.0.0.2:5060")]
    assert [(m.text, m.action, m.sender) for m in summary.messages] == [
        ("hello", "allow", "sip:alice@example.com"), ("the secret plan", BLOCK, "sip:alice@example.com")]
    assert summary.stats["udp"] == 3
