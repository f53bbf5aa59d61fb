"""Offline replay: a capture's TCP streams through the same sessions and pipeline as the inline gateway.

    replay = Replay(pipeline)
    summary = replay.run(Capture.open("chat.pcap"))
    summary.messages, summary.transfers, summary.conversations, summary.anomalies

For every reassembled connection the replay picks the protocol with the gateway's own detector
(imguard.protocols.detect: port map, then first bytes); a connection announced by a control channel
(an IRC DCC offer, an MSNFTP invitation, an OSCAR SendFile rendezvous, an SDP MSRP offer: registered in
the ExpectedTransfers table under (address, port), looked up with imguard.protocols.registry.find_side)
gets the session for that data connection. Sessions are built by the same registry as the gateway's.
It then carries out the session's commands the way the gateway does, only synchronously and without
sockets:

    Send             counted as bytes that would have crossed (and kept, with keep_forwarded)
    InspectFile      pipeline.check_file(...) now, then session.file_verdict(...)
    Record           pipeline.record(...), and kept for the summary
    Notify           recorded, and session.notice(text) on the connection it names
    ConnectUpstream  the capture's server is that upstream: session.upstream_connected() at once
    Wake             for another connection, now: its session.wake(); a timer is not kept (the next traffic)
    StartTls         the connection is encrypted from here: later bytes are counted, not decoded
    Close            the session ended the connection: later bytes are counted as not forwarded

Time is the capture's: the ExpectedTransfers table and the sessions' clocks read the timestamp of
the packet being replayed, so entries expire as they would have inline.

A capture gap (bytes the capture lacks, see reassembly) is what an inline gateway never sees, so
the StreamSession contract has no word for it: the replay ends that side at the gap. The session is
told `connection_closed(from_client)` for it (a half-close), so a file
that side was sending comes out as an InspectFile (the DCC, SOCKS5 and HTTP sessions inspect what
they hold when the sender closes early), which the replay marks truncated=True, or is reported
abandoned (XMPP IBB), which the replay lists as a truncated transfer; a `capture_gap` anomaly says
where. The other side goes on being decoded; the rest of the gapped side is counted, not decoded
(resynchronising inside XML or a file is guesswork). The end of the capture ends both sides the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from imguard.protocols import detect as det
from imguard.model import ChatContext, Decision, FileReport
from imguard.protocols import registry
from imguard.protocols.base import (FACTS, Anomaly, Close, ConnectUpstream, InspectFile, MessageDecision, Notify,
                                    Record, Send, StartTls, StreamSession, Wake)
from imguard.protocols.registry import SessionRequest
from imguard.replay.pcapfile import Capture, UdpDatagram
from imguard.replay.reassembly import (Connection, Reassembler, ReassemblySettings, StreamClosed, StreamData,
                                       StreamGap, StreamOpened)
from imguard.replay.summary import Anomaly as AnomalyRow
from imguard.replay.summary import Conversation, Message, ReplaySummary, Transfer
from imguard.settings import setting

# The gateway's default port map (the registry's) plus ports the sample captures use for IRC (8000: freenode's
# alternate).
DEFAULT_PORTS = registry.default_ports() + ["8000=irc"]


@dataclass(frozen=True)
class ReplaySettings:
    """Offline replay."""

    ports: list = setting(
        list(DEFAULT_PORTS),
        "Destination port to protocol, PORT=PROTO ('+tls': TLS from the first byte), as for the gateway; other "
        "ports are recognised by their first bytes")
    max_message_text: int = setting(
        4096, "Characters of a message's text kept in the summary; the alert log has the whole text")


# --- sessions ---------------------------------------------------------------------------------------

SessionFactory = Callable[[SessionRequest], Any]     # SessionRequest: imguard.protocols.registry's, shared


def default_factories(chat: Any = None) -> dict[str, SessionFactory]:
    """Every protocol of the registry (built as the gateway builds them, minus the relays: a capture is observed,
    not rewritten), plus the replay's own HTTP session (the gateway uses mitmproxy's HTTP layer), which hands chat
    API calls to `chat`, the replay's chat-API carrier (imguard/chatapi.py; None: chat APIs are not decoded)."""
    factories: dict[str, SessionFactory] = {name: registry.build for name in registry.PROTOCOLS}
    from imguard.replay.http import HttpLimits, HttpUploadSession
    factories["http"] = lambda r: HttpUploadSession(transfers=r.transfers, context=r.context,
                                                    limits=r.limit(HttpLimits), chat=chat)
    return factories


def limits_classes() -> list[tuple[str, type, str]]:
    """(key, class, title) of every per-connection limits class the replay's sessions take: the registry's (the
    gateway's options, so a capture is decided with the limits the gateway ran with), and HTTP uploads'."""
    from imguard.chatapi import ChatApiSettings
    from imguard.replay.http import HttpLimits
    return registry.limits_classes() + [("http", HttpLimits, "HTTP uploads in captures"),
                                        ("chat", ChatApiSettings, "Chat APIs over HTTP, as the gateway's")]


def socks5_connect_target(data: bytes) -> str | None:
    """The domain name of a SOCKS5 client's CONNECT (after its greeting), "" if it is not a CONNECT to a
    domain name, None while incomplete. XEP-0065 puts the stream hash there."""
    if len(data) < 2 or len(data) < 2 + data[1]:
        return None
    req = data[2 + data[1]:]
    if len(req) < 5:
        return None
    if req[0] != 5 or req[1] != 1 or req[3] != 3:
        return ""
    if len(req) < 5 + req[4]:
        return None
    return req[5:5 + req[4]].decode("ascii", "replace").lower()


# --- the replay -------------------------------------------------------------------------------------

class _Flow:
    """The replay's state for one connection."""

    __slots__ = ("conn", "summary", "session", "pending", "client_bytes", "server_bytes", "decided", "tls_first",
                 "encrypted", "closed", "ended", "forwarded", "expected", "context", "socks5")

    def __init__(self, conn: Connection, summary: Conversation):
        self.conn = conn
        self.summary = summary
        self.session: Any = None
        self.pending: list[tuple[bool, bytes]] = []
        self.client_bytes = bytearray()
        self.server_bytes = bytearray()
        self.decided = False
        self.tls_first = False
        self.encrypted = False
        self.closed = False              # the session closed the connection, or both sides ended
        self.ended: set[bool] = set()    # sides (from_client) that closed or were cut by a capture gap
        self.forwarded: dict[bool, bytearray] | None = None
        self.expected: Any = None
        self.context: ChatContext | None = None
        self.socks5 = False


class _ObservingChecker:
    """The pipeline as a session sees it, with every message decision also noted for the summary."""

    def __init__(self, replay: "Replay", flow: _Flow):
        self._replay, self._flow = replay, flow

    def check_message(self, text: str, ctx: ChatContext) -> Decision:
        decision = self._replay.pipeline.check_message(text, ctx)
        self._replay._note_message(self._flow, text, ctx, decision)
        return decision

    def __getattr__(self, name: str) -> Any:
        return getattr(self._replay.pipeline, name)


class _CarrierChecker(_ObservingChecker):
    """The pipeline as the chat carrier sees it: a message decision noted for the summary on the connection its
    context names (the carrier serves every HTTP connection of the replay)."""

    def __init__(self, replay: "Replay"):
        super().__init__(replay, None)

    def check_message(self, text: str, ctx: ChatContext) -> Decision:
        decision = self._replay.pipeline.check_message(text, ctx)
        flow = self._replay._by_name.get(ctx.connection_id)
        if flow is not None:
            self._replay._note_message(flow, text, ctx, decision)
        return decision


class Replay:
    """Replays one capture through detection, sessions and the pipeline; `run()` returns the summary."""

    def __init__(self, pipeline: Any, settings: ReplaySettings | None = None,
                 reassembly: ReassemblySettings | None = None,
                 factories: dict[str, SessionFactory] | None = None, transfers: Any = None,
                 on_file: Callable[[bytes, Transfer], None] | None = None, keep_forwarded: bool = False,
                 limits: Iterable[Any] = ()):
        self.pipeline = pipeline
        self.settings = settings or ReplaySettings()
        self.port_map = det.parse_port_map(self.settings.ports)
        self.reassembly = reassembly or ReassemblySettings()
        self.limits = {type(given): given for given in limits}     # limits class -> the sessions' limits
        self.now = 0.0
        if transfers is None:
            from imguard.files.expected import ExpectedTransfers
            transfers = ExpectedTransfers(clock=self.clock)
        self.transfers = transfers
        # The chat-API carrier of this replay (one, as one gateway process has one): its token table, blocked
        # references and remembered verdicts span the capture's HTTP connections.
        from imguard.chatapi import ChatApiCarrier, ChatApiSettings
        self.chat = ChatApiCarrier(_CarrierChecker(self), transfers=self.transfers,
                                   settings=self.limits.get(ChatApiSettings))
        self.factories = default_factories(self.chat) if factories is None else factories
        self.on_file = on_file
        self.keep_forwarded = keep_forwarded    # keep the bytes sessions would have let through (tests)
        self._flows: dict[int, _Flow] = {}
        self._by_name: dict[str, _Flow] = {}
        self.summary = ReplaySummary("")

    def clock(self) -> float:
        """The capture's time: the timestamp of the packet being replayed."""
        return self.now

    # --- driving ------------------------------------------------------------------------------------

    def run(self, capture: Capture) -> ReplaySummary:
        return self.run_segments(capture, capture.packets())

    def run_segments(self, capture: Capture, segments: Iterable[Any]) -> ReplaySummary:
        """Replay TCP segments (and UDP datagrams) decoded by `capture` (from its file, or live from `imguard
        sniff`)."""
        self.summary = ReplaySummary(capture.name)
        self._flows, self._by_name, self._datagram_flows = {}, {}, {}
        self._reassembler = reassembler = Reassembler(self.reassembly, service_ports=self.port_map.keys())
        handle, feed = self.handle, reassembler.feed
        for packet in segments:
            if type(packet) is UdpDatagram:
                self.now = packet.ts or self.now
                self._datagram(packet)
                continue
            for event in feed(packet):
                handle(event)
        for event in reassembler.finish():
            handle(event)
        self.summary.stats = capture.stats.to_dict()
        for w in capture.warnings:
            self.summary.anomalies.append(AnomalyRow(0, 0.0, "capture", w.kind, str(w)))
        for conn in reassembler.connections:
            if conn.overlap_conflicts:
                self._anomaly(conn.id, conn.last_ts, "reassembly", "overlap_conflict",
                              f"{conn.overlap_conflicts} retransmitted segments carried different bytes than the "
                              "first copy (the first copy was kept)")
        self.summary.anomalies.sort(key=lambda a: (a.conn == 0, a.ts, a.conn))
        return self.summary

    def handle(self, event: Any) -> None:
        self.now = event.ts or self.now
        if isinstance(event, StreamData):
            self._data(self._flows[event.conn.id], event.from_client, event.data)
        elif isinstance(event, StreamOpened):
            self._opened(event.conn)
        elif isinstance(event, StreamGap):
            self._gap(self._flows[event.conn.id], event.from_client, event.length)
        elif isinstance(event, StreamClosed):
            self._closed(self._flows[event.conn.id], event.reason)

    # --- UDP: SIP's usual transport ----------------------------------------------------------------------

    def _datagram(self, d: UdpDatagram) -> None:
        """A datagram to or from a port the map gives to SIP goes to the SIP datagram handler of its flow (one per
        client address and server, as the gateway's UDP connections), one datagram one event, as the gateway
        delivers it. Other UDP is counted in the capture's stats only (the gateway leaves it to mitmproxy)."""
        if self.port_map.get(d.dport, ("", False))[0] == "sip":
            client, server, from_client = (d.src, d.sport), (d.dst, d.dport), True
        elif self.port_map.get(d.sport, ("", False))[0] == "sip":
            client, server, from_client = (d.dst, d.dport), (d.src, d.sport), False
        else:
            return
        flow = self._datagram_flows.get((client, server))
        if flow is None:
            conn = self._reassembler.datagram_flow(client, server, d.ts)
            self._opened(conn)
            flow = self._datagram_flows[(client, server)] = self._flows[conn.id]
            if not flow.decided:
                self._decide(flow, det.Detection("sip-udp", reason=f"UDP port {server[1]}"))
        flow.conn.last_ts = d.ts
        flow.conn.packets += 1
        if d.missing:
            self._anomaly(flow.conn.id, self.now, "capture", "datagram_cut",
                          f"the capture kept {len(d.payload)} of the datagram's {len(d.payload) + d.missing} bytes; "
                          "it is not decoded")
            flow.summary.undecoded_bytes += len(d.payload)
            return
        self._data(flow, from_client, d.payload)

    # --- connection life ----------------------------------------------------------------------------

    def _opened(self, conn: Connection) -> None:
        summary = Conversation(conn.id, conn.client_address, conn.server_address, midstream=conn.midstream)
        self.summary.conversations.append(summary)
        flow = _Flow(conn, summary)
        if self.keep_forwarded:
            flow.forwarded = {True: bytearray(), False: bytearray()}
        self._flows[conn.id] = flow
        self._by_name[conn.name] = flow
        flow.context = ChatContext(client_address=conn.client_address, server_address=conn.server_address,
                                   connection_id=conn.name)
        # A data connection a control channel announced (an IRC DCC offer, an MSNFTP invitation, an OFT
        # rendezvous, an SDP MSRP offer named this address and port).
        found = registry.find_side(self.transfers, conn.server[0], conn.server[1])
        if found is not None:
            side, flow.expected = found
            protocol, reason = side.protocol, side.what
            if side.protocol == "dcc":
                kind = getattr(flow.expected, "kind", "send")
                protocol = "dcc" if kind == "send" else f"dcc-{kind}"    # DCC CHAT: not decoded offline yet
                reason = f"DCC {kind.upper()} offer"
            self._decide(flow, det.Detection(protocol, tls_first=side.tls_first(flow.expected), reason=reason))

    def _data(self, flow: _Flow, from_client: bool, data: bytes) -> None:
        s = flow.summary
        if from_client:
            s.bytes_from_client += len(data)
        else:
            s.bytes_from_server += len(data)
        if flow.encrypted:
            s.encrypted_bytes += len(data)
            return
        if flow.closed or from_client in flow.ended:
            s.undecoded_bytes += len(data)
            return
        if not flow.decided:
            flow.pending.append((from_client, data))
            (flow.client_bytes if from_client else flow.server_bytes).extend(data)
            found = self._detect(flow)
            if found is not det.NEED_MORE:
                self._decide(flow, found)
            return
        self._feed(flow, from_client, data)

    def _detect(self, flow: _Flow, final: str = "") -> det.Detection | None:
        """The gateway's detector on what the connection sent so far. `final`: no more bytes will come
        before a decision is needed (a gap, the end): undecided is then UNKNOWN, for that reason."""
        if flow.socks5:
            found = self._socks5(flow)
        else:
            found = det.detect(flow.conn.server[1], bytes(flow.client_bytes), bytes(flow.server_bytes),
                               self.port_map)
            if found is not det.NEED_MORE and found.protocol == det.SOCKS5:
                flow.socks5 = True          # a SOCKS5 greeting: wait for the CONNECT to know what it is
                found = self._socks5(flow)
        if found is det.NEED_MORE and final:
            found = det.Detection(det.UNKNOWN, reason=final)
        return found

    def _socks5(self, flow: _Flow) -> det.Detection | None:
        """A SOCKS5 connection is an XEP-0065 bytestream when its CONNECT names a hash an XMPP offer
        registered (the gateway sees these on its relay listener); any other SOCKS5 is relayed."""
        target = socks5_connect_target(bytes(flow.client_bytes))
        if target is None:
            return det.NEED_MORE
        lookup = getattr(self.transfers, "lookup_bytestream", None)
        if target and lookup is not None and lookup(target) is not None:
            return det.Detection("bytestream", reason="SOCKS5 CONNECT to an announced bytestream hash")
        return det.Detection(det.SOCKS5, reason="SOCKS5, not an announced bytestream")

    def _decide(self, flow: _Flow, found: det.Detection) -> None:
        flow.decided = True
        s = flow.summary
        s.protocol = found.protocol
        s.detected_by = found.reason
        pending, flow.pending = flow.pending, []
        flow.client_bytes = flow.server_bytes = bytearray()
        if found.tls_first or found.protocol == det.TLS:
            flow.encrypted = s.encrypted = True
            s.encrypted_bytes += sum(len(d) for _, d in pending)
            return
        factory = self.factories.get(found.protocol)
        if factory is None:
            # Nothing decodes this protocol: the gateway relays it untouched, so everything crosses.
            flow.session = _Relay()
        else:
            context = registry.context_for(found.protocol, flow.context)
            request = SessionRequest(found.protocol, context, found.tls_first, _ObservingChecker(self, flow),
                                     self.transfers, self.clock, limits=self.limits, expected=flow.expected)
            try:
                flow.session = factory(request)
            except Exception as e:      # a session that cannot start must not stop the replay
                self._anomaly(flow.conn.id, self.now, "replay", "session_error",
                              f"{found.protocol} session could not start: {type(e).__name__}: {e}")
                flow.session = _Relay()
        for from_client, data in pending:
            if flow.closed or flow.encrypted:
                if flow.encrypted:
                    s.encrypted_bytes += len(data)
                else:
                    s.undecoded_bytes += len(data)
                continue
            self._feed(flow, from_client, data)

    def _feed(self, flow: _Flow, from_client: bool, data: bytes) -> None:
        self._call(flow, lambda: flow.session.data_received(from_client, data))

    def _gap(self, flow: _Flow, from_client: bool, length: int) -> None:
        s = flow.summary
        s.gaps += 1
        s.gap_bytes += length
        side = "client" if from_client else "server"
        if flow.encrypted or flow.closed or from_client in flow.ended:
            self._anomaly(flow.conn.id, self.now, "reassembly", "capture_gap",
                          f"the capture lacks {length} bytes from the {side}")
            return
        if not flow.decided:
            self._decide(flow, self._detect(flow, final="a capture gap before the protocol was known"))
            if flow.encrypted or flow.closed:
                return
        self._anomaly(flow.conn.id, self.now, "reassembly", "capture_gap",
                      f"the capture lacks {length} bytes from the {side}; the rest of what the {side} sent is "
                      "not decoded")
        # The session cannot be told of a gap: to it, this side ends here (a half-close), so a file this side
        # was sending comes out as a truncated InspectFile, or is reported abandoned. The other side goes on.
        self._end_side(flow, from_client, truncated=True)

    def _closed(self, flow: _Flow, reason: str) -> None:
        flow.summary.closed_by = reason
        if not flow.decided:
            self._decide(flow, self._detect(flow, final="closed before the protocol was known"))
        first = flow.conn.closed_by_client if flow.conn.closed_by_client is not None else True
        for from_client in (first, not first):      # the side that closed first is told first
            self._end_side(flow, from_client, truncated=reason == "end of capture")
        # The connection is over: let its session (and whatever it still holds) go, so memory follows the
        # open connections, not the capture's length.
        flow.closed, flow.session, flow.pending = True, None, []

    def _end_side(self, flow: _Flow, from_client: bool, truncated: bool) -> None:
        """Tell the session that one side is done (closed, or cut by a capture gap)."""
        if flow.closed or flow.encrypted or flow.session is None or from_client in flow.ended:
            return
        flow.ended.add(from_client)
        commands = self._safe(flow, lambda: flow.session.connection_closed(from_client))
        if truncated:
            # A file that comes out because this side was cut (a gap, the end of the capture) is truncated,
            # whether or not the session knew its size.
            commands = [dataclasses.replace(c, truncated=True) if isinstance(c, InspectFile) else c
                        for c in commands]
        self._execute(flow, commands, abandoned_truncated=truncated)
        if len(flow.ended) == 2:
            flow.closed = True

    # --- commands -----------------------------------------------------------------------------------

    def _call(self, flow: _Flow, call: Callable[[], list]) -> None:
        self._execute(flow, self._safe(flow, call))

    def _safe(self, flow: _Flow, call: Callable[[], list]) -> list:
        try:
            return list(call() or [])
        except Exception as e:          # a session bug is an anomaly of this connection, not a crash
            self._anomaly(flow.conn.id, self.now, "replay", "session_error", f"{type(e).__name__}: {e}")
            flow.closed = True
            return []

    def _execute(self, flow: _Flow, commands: list, abandoned_truncated: bool = False) -> None:
        s = flow.summary
        for cmd in commands:
            if isinstance(cmd, Send):
                if cmd.to_client:
                    s.forwarded_to_client += len(cmd.data)
                else:
                    s.forwarded_to_server += len(cmd.data)
                if flow.forwarded is not None:
                    flow.forwarded[cmd.to_client].extend(cmd.data)
            elif isinstance(cmd, InspectFile):
                self._inspect(flow, cmd)
            elif isinstance(cmd, Record):
                self._record(flow, cmd.event)
            elif isinstance(cmd, Anomaly):
                self._session_anomaly(flow, cmd, abandoned_truncated)
            elif isinstance(cmd, MessageDecision):
                self._record_fact(cmd)
                self._note_message(flow, cmd.text or "", cmd.context, cmd.decision)
            elif isinstance(cmd, FACTS):
                self._record_fact(cmd)
            elif isinstance(cmd, StartTls):
                flow.encrypted = s.encrypted = True
            elif isinstance(cmd, Close):
                flow.closed = True
                s.session_closed = cmd.reason or "closed"
            elif isinstance(cmd, Notify):
                self._notify(flow, cmd)
            elif isinstance(cmd, ConnectUpstream):
                # The capture's server is the upstream the session asks for: it is connected already.
                self._call(flow, flow.session.upstream_connected)
            elif isinstance(cmd, Wake):
                # Another connection's news now (a warned DCC file answered in the chat); a timer is not kept: a
                # session's deadline is met at its next traffic, in capture time.
                target = self._by_name.get(cmd.connection_id) if cmd.connection_id and cmd.after <= 0 else None
                if target is not None and not target.closed:
                    self._call(target, target.session.wake)
            else:
                self._anomaly(flow.conn.id, self.now, "replay", "unknown_command",
                              f"the session returned {type(cmd).__name__}, which the replay does not carry out")

    def _inspect(self, flow: _Flow, cmd: InspectFile) -> None:
        ctx = cmd.context
        try:
            report, decision = self.pipeline.check_file(cmd.data, ctx, name=cmd.name, claimed_mime=cmd.claimed_mime,
                                                        truncated=cmd.truncated)
        except Exception as e:
            self._anomaly(flow.conn.id, self.now, "replay", "inspection_error", f"{type(e).__name__}: {e}")
            return
        transfer = Transfer(
            conn=flow.conn.id, ts=self.now, mechanism=ctx.transfer_mechanism, name=cmd.name, size=len(cmd.data),
            sha256=report.sha256 or hashlib.sha256(cmd.data).hexdigest(), mime=report.mime,
            claimed_mime=cmd.claimed_mime, action=decision.action, rules=list(decision.rule_ids),
            truncated=cmd.truncated, sender=ctx.sender, recipients=list(ctx.recipients),
            findings=[f"{f.kind}: {f.detail}" for f in report.all_findings()])
        self.summary.transfers.append(transfer)
        if self.on_file is not None:
            self.on_file(cmd.data, transfer)
        # Told even after a gap closed it: the session may have more to say (a notice, a record).
        commands = self._safe(flow, lambda: flow.session.file_verdict(cmd.transfer_id, report, decision))
        self._execute(flow, commands)

    def _notify(self, flow: _Flow, cmd: Notify) -> None:
        """A notice for a person on another connection (a DCC file blocked: told on the IRC connection the offer
        came from): recorded, and delivered the way the gateway does, through that session's notice()."""
        self._record_fact(cmd)
        target = self._by_name.get(cmd.connection_id)
        if target is not None and not target.closed:
            self._call(target, lambda: target.session.notice(cmd.text) or [])

    def _record(self, flow: _Flow, event: dict) -> None:
        """A Record: an event built whole (a carrier's or a test's), written as it is."""
        self.pipeline.record(event)

    def _record_fact(self, fact) -> None:
        """A session's fact, recorded as the gateway records it: with the direction its context has for decisions."""
        self.pipeline.record(fact.event(self.pipeline.with_direction(fact.context)))

    def _session_anomaly(self, flow: _Flow, cmd: Anomaly, abandoned_truncated: bool = False) -> None:
        self._record_fact(cmd)
        self._anomaly(flow.conn.id, self.now, "session", cmd.kind, cmd.detail)
        if cmd.kind == "transfer_abandoned" and abandoned_truncated:
            # Held by the session when the capture ran out or had a gap: truncated, never inspected.
            ctx, data = cmd.context, cmd.data
            self.summary.transfers.append(Transfer(
                conn=flow.conn.id, ts=self.now, mechanism=ctx.transfer_mechanism or "ibb",
                name=str(data.get("name", data.get("sid", ""))), size=int(data.get("bytes", 0) or 0),
                sha256="", mime="", claimed_mime="", action="", rules=[], truncated=True,
                sender=ctx.sender, recipients=list(ctx.recipients),
                detail="the capture ends or has a gap inside the transfer; the session held it and could "
                       "not release it for inspection"))

    def _note_message(self, flow: _Flow, text: str, ctx: ChatContext, decision: Decision,
                      rules: list[str] | None = None) -> None:
        ctx = self.pipeline.with_direction(ctx)         # as the decision saw it (topology, then zones)
        limit = self.settings.max_message_text
        self.summary.messages.append(Message(
            conn=flow.conn.id, ts=self.now, protocol=ctx.protocol, sender=ctx.sender,
            recipients=list(ctx.recipients), conversation=ctx.conversation,
            text=text if len(text) <= limit else text[:limit] + "…", action=decision.action,
            rules=rules if rules is not None else list(decision.rule_ids), direction=ctx.direction))

    def _anomaly(self, conn: int, ts: float, source: str, kind: str, detail: str) -> None:
        self.summary.anomalies.append(AnomalyRow(conn, ts, source, kind, detail))

    def forwarded(self, conn_id: int) -> dict[bool, bytes]:
        """What the sessions would have let through on a connection (with keep_forwarded): to_client -> bytes."""
        flow = self._flows[conn_id]
        return {k: bytes(v) for k, v in (flow.forwarded or {}).items()}


class _Relay(StreamSession):
    """An undecoded connection: everything crosses (as the gateway relays what it does not decode)."""

    def data_received(self, from_client: bool, data: bytes) -> list:
        return [Send(to_client=not from_client, data=data)]

    def tls_started(self) -> list:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list:
        return []

    def connection_closed(self, from_client: bool) -> list:
        return []
