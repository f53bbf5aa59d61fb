"""The MSRP session (RFC 4975): every message held until it is whole and decided. Sans-io.

    session = MsrpSession(pipeline, transfers, ChatContext(...), offer=find_msrp_offer(transfers, host, port))
    session.data_received(True, b"MSRP a786hjs2 SEND\\r\\n...\\r\\n\\r\\nHey Bob\\r\\n-------a786hjs2$\\r\\n")
        -> [Send(to_client=False, data=<the same chunk>)]                                   (allow)

MSRP runs between two endpoints (directly or through relays) after a SIP INVITE/SDP exchange; either side
may send, so SENDs from both sides are handled alike. Each SEND chunk is filed under (side, Message-ID) and its
Byte-Range; nothing of a message crosses before the whole message is there (chunks may arrive out of order)
and decided:

- text (text/plain, text/html, or message/cpim wrapping them) -> `checker.check_message(text, ctx)`, protocol
  "msrp", sender/recipient from the SIP offer (else the From-Path/To-Path endpoint URIs), conversation = the SIP
  Call-ID. Allow: the chunks cross as they came, in byte order. Mask: one chunk (the last one's headers)
  with the new body and `Byte-Range: 1-N/N`. Block: nothing crosses; the sender gets `403` on the
  unanswered chunk or a REPORT `Status: 000 403`, and a notice as an MSRP SEND from the receiver's path;
- any other type (a file: RFC 5547, or an inline image) -> `InspectFile` (mechanism "msrp", name from the SDP
  file-selector, claimed type from Content-Type or the selector; `truncated` when the sender ended it with
  bytes missing). Allow: the held chunks are released in byte order, byte for byte. Block: the receiver gets
  nothing; the sender gets a REPORT (`000 403 Action-not-allowed`), an MSRP notice and a Record with
  `imguard.notify` naming the SIP connection of the offer (the carrier may also deliver it with
  SipSession.notice);
- status bodies (im-iscomposing, IMDN) and body-less SENDs cross at once.

While a chunk is held the gateway answers it `MSRP <tid> 200 OK` itself (when its Failure-Report asks for
responses), so the sender keeps going; the receiver's own responses to those transactions are swallowed later.
A `#` end line aborts the message: what was held is dropped (the receiver never saw any of it).
A receiver's failure response to a chunk the gateway had answered is swallowed and recorded ("msrp_late_failure").

Text policy applies to both directions: in MSRP the TCP client is whichever endpoint is active (by default the
SDP offerer), not necessarily the gateway's own user; the policy sees the direction from the Pipeline's classifier.

What the carrier does:
1. Give every SipSession the shared ExpectedTransfers table. A new TCP connection whose destination is in it
   (`find_msrp_offer(transfers, dst_host, dst_port)`, kind "msrp") is MSRP: put an MsrpSession on it with that
   offer; `offer.tls` (TCP/TLS/MSRP) means TLS from the first byte (tls_on_connect). Port 2855 (MSRP's
   registered port, relays) can be mapped to MSRP too: the session then finds its offer from the To-Path.
2. Carry Send/Record/Close; answer InspectFile with Pipeline.check_file (mechanism "msrp" in the context).
3. A Record whose event has `imguard.notify` (protocol "sip") -> the SipSession whose context has that
   connection_id -> carry out `session.notice(text)` (a SIP MESSAGE to the user), in addition to the in-band
   MSRP notice this session already sent.

Bad input is an anomaly, never an exception: a chunk without To-Path/From-Path/Message-ID, a bad Byte-Range,
one beyond its total or not matching the body is dropped (400 to the sender); an unframeable stream (not
MSRP, no end line within `msrp_max_chunk_size`) is closed. Held bytes are bounded (`msrp_max_held_bytes`,
`msrp_max_messages_in_reassembly`): past them the message is refused with 413 and a notice.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Any

from imguard import alerts
from imguard.model import MASK, ChatContext, Decision, FileReport
from imguard.protocols.base import Close, Command, InspectFile, OutgoingCommands, Record, limited_anomaly
from imguard.protocols.msrp.framing import (ABORTED, COMPLETE, ByteRange, MsrpChunk, MsrpDecoder, MsrpFramingError,
                                            MsrpLimits, build_report, build_response, build_send, parse_byte_range,
                                            with_body)
from imguard.protocols.msrp.offer import MSRP_KIND, MsrpOffer, path_key
from imguard.protocols.sip.message import parse_cpim, parse_content_type
from imguard.protocols.sip.text import UNCHECKED_TYPES, masked_body, message_text

_ids = itertools.count(1)
BODYLESS_METHODS = ("REPORT", "AUTH", "NICKNAME")     # RFC 4975, RFC 4976 (relays), RFC 7701: forwarded as they are



@dataclass
class _Piece:
    chunk: MsrpChunk
    start: int
    from_client: bool
    answered: bool = False


@dataclass
class _Message:
    """One MSRP message being reassembled from its chunks."""
    from_client: bool
    message_id: str
    first: MsrpChunk                         # the first chunk seen (paths, report flags)
    pieces: dict[int, _Piece] = field(default_factory=dict)     # by start byte
    content_type: str = ""                   # with parameters
    total: int | None = None
    final_end: int | None = None             # the last byte of the '$' chunk
    held: int = 0                            # raw bytes held
    refused: bool = False                    # refused (too large): later chunks are refused too
    transfer_id: str = ""

    def coverage(self) -> tuple[int, bool]:
        """(bytes contiguous from byte 1, any gap before the last piece)."""
        pos, gap = 1, False
        for start in sorted(self.pieces):
            if start > pos:
                gap = True
                continue
            pos = max(pos, start + len(self.pieces[start].chunk.body or b""))
        return pos - 1, gap

    def data(self) -> bytes:
        out = bytearray()
        for start in sorted(self.pieces):
            body = self.pieces[start].chunk.body or b""
            if start - 1 < len(out):
                body = body[len(out) - (start - 1):]
            elif start - 1 > len(out):
                continue            # a gap: what follows it is not placed (truncated)
            out += body
        return bytes(out)

    def ordered(self) -> list[_Piece]:
        return [self.pieces[s] for s in sorted(self.pieces)]


class MsrpSession:
    """One MSRP connection (StreamSession). `offer`: the SIP-announced session the carrier found for this
    connection (None: looked up from the To-Path/From-Path URIs in the table, per message)."""

    def __init__(self, checker, transfers, context: ChatContext, offer: MsrpOffer | None = None,
                 limits: MsrpLimits = MsrpLimits(), tls_on_connect: bool = False):
        self.checker = checker
        self.transfers = transfers
        self.context = context.with_(protocol="msrp")
        self.offer = offer
        self.limits = limits
        self.tls = tls_on_connect
        self._decoders = {True: MsrpDecoder(limits), False: MsrpDecoder(limits)}
        self.closed = False
        self.side_closed = {True: False, False: False}
        self.anomaly_counts: dict[str, int] = {}
        self._messages: collections.OrderedDict[tuple[bool, str], _Message] = collections.OrderedDict()
        self._inspecting: dict[str, _Message] = {}
        self._swallow: collections.OrderedDict[tuple[bool, str], str] = collections.OrderedDict()
        self.held_bytes = 0

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        out = OutgoingCommands()
        for chunk in self._decoders[from_client].feed(data):
            if isinstance(chunk, MsrpFramingError):
                self.closed = True
                self._drop_all()
                out.add(self._anomaly(chunk.kind, chunk.detail, from_client=from_client),
                        Close(f"MSRP framing error: {chunk.kind}"))
                break
            if not chunk.is_request:
                if self._swallow.pop((from_client, chunk.tid), None) is not None:
                    # The sender already had our answer (or this answers our notice). A failure here is the
                    # receiver refusing what we released: too late to tell the sender in-band; recorded.
                    if chunk.status != 200:
                        out.add(self._event("msrp_late_failure", tid=chunk.tid, status=chunk.status,
                                            comment=chunk.comment, from_client=from_client))
                    continue
                out.send(not from_client, chunk.raw)
            elif chunk.method == "SEND":
                self._send(out, from_client, chunk)
            elif chunk.method in BODYLESS_METHODS and not chunk.body:
                out.send(not from_client, chunk.raw)
            elif chunk.method in BODYLESS_METHODS:
                # Only SEND bodies are checked: text in any other request would cross unchecked.
                self._reject(out, from_client, chunk, "msrp_unexpected_body",
                             f"an MSRP {chunk.method} with a body was dropped")
            else:
                # §7.3.1: an endpoint answers an unknown method 501; forwarding it would carry an unchecked body.
                self._reject(out, from_client, chunk, "msrp_unknown_method",
                             f"unknown MSRP method {chunk.method[:20]!r} was dropped", status=501)
        return out.cmds

    def tls_started(self) -> list[Command]:
        return []       # MSRP has no STARTTLS: TCP/TLS/MSRP is TLS from the first byte (tls_on_connect)

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        msg = self._inspecting.pop(transfer_id, None)
        if msg is None or self.closed:
            return []
        out = OutgoingCommands()
        self._free(msg)
        ctx = self._ctx(msg, file=True)
        if decision.blocked:
            text = decision.notice or self._default_notice(decision, msg, "file")
            if not self.side_closed[msg.from_client]:
                self._tell_sender(out, msg, 403, text, answer_open=False)
            out.add(Record(self._notify_event(msg, ctx, text, decision)))
            return out.cmds
        if self.side_closed[not msg.from_client]:
            out.add(self._anomaly("msrp_receiver_gone", "the receiver closed before the verdict; nothing delivered",
                                  message_id=msg.message_id))
        else:
            self._release(out, msg)
        if decision.notice:
            out.add(Record(self._notify_event(msg, ctx, decision.notice, decision)))
        return out.cmds

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self.closed:
            return []
        self.side_closed[from_client] = True
        out = OutgoingCommands()
        pending = self._decoders[from_client].pending
        if pending:
            out.add(self._anomaly("msrp_incomplete_chunk", "the connection closed before the chunk's end line; "
                                  "the partial chunk was not forwarded", from_client=from_client, size=pending))
        for key, msg in list(self._messages.items()):
            if msg.from_client == from_client and msg.pieces and not msg.refused:
                # The sender is gone: what it sent is all there will be.
                del self._messages[key]
                if self._is_text(msg):
                    self._free(msg)
                    out.add(self._anomaly("msrp_incomplete_message", "the sender closed before the message was "
                                          "complete; it was not passed on", message_id=msg.message_id))
                else:
                    self._inspect(out, msg, truncated=True)
            elif msg.from_client != from_client:
                del self._messages[key]
                self._free(msg)
        return out.cmds

    # --- SEND ---------------------------------------------------------------------------------------

    def _reject(self, out: OutgoingCommands, from_client: bool, chunk: MsrpChunk, kind: str, detail: str, status: int = 400,
                **data: Any) -> None:
        out.add(self._anomaly(kind, detail, from_client=from_client, tid=chunk.tid, **data))
        if chunk.failure_report != "no" and chunk.from_path and chunk.to_path:
            out.send(from_client, build_response(chunk, status))

    def _send(self, out: OutgoingCommands, from_client: bool, chunk: MsrpChunk) -> None:
        if not chunk.to_path or not chunk.from_path or not chunk.message_id:
            self._reject(out, from_client, chunk, "msrp_bad_request", "a SEND without To-Path, From-Path or "
                         "Message-ID was dropped")
            return
        key = (from_client, chunk.message_id)
        msg = self._messages.get(key)
        body = chunk.body
        if msg is None and (body is None or (body == b"" and chunk.flag == COMPLETE)):
            out.send(not from_client, chunk.raw)        # a body-less SEND (session open, keep-alive)
            return
        if msg is None and chunk.content_type.split(";")[0] in UNCHECKED_TYPES:
            out.send(not from_client, chunk.raw)        # is-composing, delivery notifications
            return
        body = body or b""
        value = chunk.get("byte-range")
        if value:
            rng = parse_byte_range(value)
        elif msg is None and chunk.flag == COMPLETE:
            rng = ByteRange(1, len(body), len(body))        # §7.1.1: no Byte-Range = the whole message
        else:
            rng = None
        if rng is None:
            self._reject(out, from_client, chunk, "msrp_bad_byte_range", f"Byte-Range {value!r}")
            return
        last = rng.start + len(body) - 1
        if rng.total is not None and last > rng.total:
            self._reject(out, from_client, chunk, "msrp_byte_range_beyond_total",
                         f"bytes {rng.start}-{last} of a {rng.total}-byte message", status=423)
            return
        if rng.end is not None and chunk.flag == COMPLETE and rng.end != last:
            # The end line delimits the body; the range only places it (RFC 4975's own §7.3 example says
            # 1-25/25 for 23 bytes). Recorded, and the body's real length is used.
            out.add(self._anomaly("msrp_byte_range_mismatch", f"Byte-Range {value!r} but the chunk carries "
                                  f"{len(body)} bytes", from_client=from_client, tid=chunk.tid))
        if msg is None:
            if len(self._messages) >= self.limits.msrp_max_messages_in_reassembly:
                self._reject(out, from_client, chunk, "msrp_too_many_messages",
                             f"more than {self.limits.msrp_max_messages_in_reassembly} messages in reassembly",
                             status=413)
                return
            msg = self._messages[key] = _Message(from_client, chunk.message_id, chunk)
        if msg.refused:
            if chunk.failure_report != "no":
                out.send(from_client, build_response(chunk, 413))
            if chunk.flag != "+":
                self._messages.pop(key, None)
            return
        if rng.total is not None:
            if msg.total is not None and msg.total != rng.total:
                out.add(self._anomaly("msrp_byte_range_total_changed", f"total {msg.total} then {rng.total}",
                                      from_client=from_client, message_id=msg.message_id))
            msg.total = rng.total if msg.total is None else max(msg.total, rng.total)
        if chunk.get("content-type") and not msg.content_type:
            msg.content_type = chunk.get("content-type")
        if chunk.flag == ABORTED:
            self._messages.pop(key, None)
            self._free(msg)
            if chunk.failure_report == "yes":
                out.send(from_client, build_response(chunk, 200))
            out.add(self._event("msrp_aborted", message_id=msg.message_id, bytes_held=msg.held))
            return
        too_big = (msg.total is not None and msg.total > self.limits.msrp_max_held_bytes) or \
            self.held_bytes + len(chunk.raw) > self.limits.msrp_max_held_bytes
        if too_big:
            self._refuse_too_large(out, msg, chunk)
            return
        old = msg.pieces.get(rng.start)
        if old is not None:
            msg.held -= len(old.chunk.raw)
            self.held_bytes -= len(old.chunk.raw)
            out.add(self._anomaly("msrp_duplicate_chunk", f"a second chunk at byte {rng.start}; the later one kept",
                                  from_client=from_client, message_id=msg.message_id))
        piece = msg.pieces[rng.start] = _Piece(chunk, rng.start, from_client)
        msg.held += len(chunk.raw)
        self.held_bytes += len(chunk.raw)
        if chunk.flag == COMPLETE:
            msg.final_end = last
        covered, gap = msg.coverage()
        if msg.final_end is not None and covered >= msg.final_end and not gap:
            del self._messages[key]
            self._complete(out, msg, piece)
        else:
            self._answer(out, piece)

    def _answer(self, out: OutgoingCommands, piece: _Piece) -> None:
        """Our own 200 OK for a held chunk (if its Failure-Report asks for one)."""
        if not piece.answered:
            piece.answered = True
            if piece.chunk.failure_report == "yes":
                out.send(piece.from_client, build_response(piece.chunk, 200))

    # --- complete messages --------------------------------------------------------------------------

    def _kind(self, msg: _Message) -> tuple[str, str, dict[str, str], bytes]:
        """("text"/"file"/"pass", content type, params, content) of a whole message."""
        data = msg.data()
        ctype, params = parse_content_type(msg.content_type or "application/octet-stream")
        if ctype == "message/cpim":
            cpim = parse_cpim(data)
            if cpim is not None:
                inner, inner_params = cpim.content_type
                if inner in UNCHECKED_TYPES:
                    return "pass", inner, inner_params, cpim.content
                kind = "text" if message_text(inner, inner_params, b"") is not None else "file"
                return kind, inner, inner_params, cpim.content
            return "file", ctype, params, data
        if ctype in UNCHECKED_TYPES:
            return "pass", ctype, params, data
        return ("text" if message_text(ctype, params, b"") is not None else "file"), ctype, params, data

    def _is_text(self, msg: _Message) -> bool:
        ctype = parse_content_type(msg.content_type)[0]
        return ctype in ("text/plain", "text/html") or (ctype == "message/cpim" and self._kind(msg)[0] == "text")

    def _complete(self, out: OutgoingCommands, msg: _Message, last: _Piece) -> None:
        kind, ctype, params, content = self._kind(msg)
        if kind == "pass":
            self._free(msg)
            self._release(out, msg)
            return
        if kind == "file":
            self._answer(out, last)
            self._inspect(out, msg, truncated=False)
            return
        text = message_text(ctype, params, content)[0]
        ctx = self._ctx(msg)
        decision = self.checker.check_message(text, ctx)
        self._free(msg)
        if decision.blocked:
            notice = decision.notice or self._default_notice(decision, msg, "message")
            self._tell_sender(out, msg, 403, notice, answer_open=True)
        elif decision.action == MASK and decision.masked_text is not None:
            outer, outer_params = parse_content_type(msg.content_type)
            new_body, new_type = masked_body(outer, outer_params, msg.data(), decision.masked_text)
            if last.answered:
                self._swallow_tid(not msg.from_client, last.chunk.tid)
            out.send(not msg.from_client, with_body(last.chunk, new_body, new_type))
        else:
            self._release(out, msg)

    def _release(self, out: OutgoingCommands, msg: _Message) -> None:
        """The held chunks to the receiver, in byte order, byte for byte."""
        for piece in msg.ordered():
            if piece.answered:
                self._swallow_tid(not msg.from_client, piece.chunk.tid)
            out.send(not msg.from_client, piece.chunk.raw)

    def _inspect(self, out: OutgoingCommands, msg: _Message, truncated: bool) -> None:
        covered, gap = msg.coverage()
        if (msg.total is not None and covered < msg.total) or gap or msg.final_end is None:
            truncated = True
        offer = self._offer(msg.first)
        name = offer.file.name if offer is not None and offer.file is not None else ""
        _, claimed, _, data = self._kind(msg)       # the content: a message/cpim wrapper is taken off
        if claimed == "application/octet-stream" and offer is not None and offer.file is not None:
            claimed = offer.file.type
        msg.transfer_id = f"{self.context.connection_id or 'msrp'}-{msg.message_id}-{next(_ids)}"
        self._inspecting[msg.transfer_id] = msg
        out.add(InspectFile(transfer_id=msg.transfer_id, data=data, context=self._ctx(msg, file=True), name=name,
                            claimed_mime=claimed, truncated=truncated))

    def _tell_sender(self, out: OutgoingCommands, msg: _Message, status: int, text: str, answer_open: bool) -> None:
        """A refused message: the failure to its sender (a response on a chunk not yet answered, else a
        REPORT), then a notice as an MSRP SEND from the receiver's side."""
        first = msg.first
        open_pieces = [p for p in msg.ordered() if not p.answered] if answer_open else []
        for p in open_pieces:
            p.answered = True
            if p.chunk.failure_report != "no":
                out.send(msg.from_client, build_response(p.chunk, status))
        if not open_pieces and first.failure_report != "no":
            covered, _ = msg.coverage()
            out.send(msg.from_client, build_report(first, status, (1, covered or None, msg.total)))
        tid, notice = build_send(first.from_path, first.to_path, text.encode("utf-8"))
        self._swallow_tid(msg.from_client, tid)
        out.send(msg.from_client, notice)

    def _refuse_too_large(self, out: OutgoingCommands, msg: _Message, chunk: MsrpChunk) -> None:
        msg.refused = True
        self._free(msg)
        msg.pieces.clear()
        if chunk.flag != "+":
            self._messages.pop((msg.from_client, msg.message_id), None)
        limit = self.limits.msrp_max_held_bytes
        text = (f"imguard: the message {msg.message_id} is larger than {limit} bytes and could not be "
                f"inspected; it was not passed on")
        out.add(self._anomaly("msrp_too_large", text, from_client=msg.from_client, message_id=msg.message_id,
                              total=msg.total, msrp_max_held_bytes=limit))
        if chunk.failure_report != "no":
            out.send(msg.from_client, build_response(chunk, 413))
        tid, notice = build_send(chunk.from_path, chunk.to_path, text.encode("utf-8"))
        self._swallow_tid(msg.from_client, tid)
        out.send(msg.from_client, notice)

    # --- helpers ------------------------------------------------------------------------------------

    def _swallow_tid(self, side: bool, tid: str) -> None:
        self._swallow[(side, tid)] = tid
        while len(self._swallow) > self.limits.msrp_max_tracked_transactions:
            self._swallow.popitem(last=False)

    def _free(self, msg: _Message) -> None:
        self.held_bytes = max(0, self.held_bytes - msg.held)
        msg.held = 0

    def _drop_all(self) -> None:
        self._messages.clear()
        self._inspecting.clear()
        self.held_bytes = 0

    def _offer(self, chunk: MsrpChunk) -> MsrpOffer | None:
        if self.offer is not None:
            return self.offer
        if self.transfers is None:
            return None
        for uri in chunk.to_path[-1:] + chunk.from_path[-1:]:
            found = self.transfers.get(path_key(uri), kind=MSRP_KIND)
            if found is not None:
                self.offer = found
                return found
        return None

    def _ctx(self, msg: _Message, file: bool = False) -> ChatContext:
        first = msg.first
        offer = self._offer(first)
        to_last, from_last = first.to_path[-1], first.from_path[-1]
        if offer is not None:
            sender, recipient = offer.who(to_last, from_last)
            conversation = offer.call_id
        else:
            sender, recipient, conversation = from_last, to_last, ""
        ctx = self.context.with_(sender=sender, recipients=(recipient,), conversation=conversation)
        if file:
            ctx = ctx.with_(transfer_mechanism="msrp")
        return ctx

    def _default_notice(self, decision: Decision, msg: _Message, what: str) -> str:
        words = {"block": "blocked", "quarantine": "quarantined"}
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        offer = self._offer(msg.first)
        if what == "file" and offer is not None and offer.file is not None and offer.file.name:
            what = f"file {offer.file.name!r}"
        recipient = self._ctx(msg).recipients[0]
        return f"Your {what} to {recipient} was {words.get(decision.action, 'blocked')} by imguard: {why}"

    def _notify_event(self, msg: _Message, ctx: ChatContext, text: str, decision: Decision | None) -> dict:
        offer = self._offer(msg.first)
        return alerts.notify_event(offer.context.connection_id if offer else "", "sip", ctx, text, decision,
                                   msrp={"message_id": msg.message_id, "bytes": msg.coverage()[0]})

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Record | None:
        return limited_anomaly(self.anomaly_counts, self.limits.msrp_max_anomalies_per_kind, self.context,
                               kind, detail, **data)

    def _event(self, action: str, category: str = "session", ctx: ChatContext | None = None, **data: Any) -> Record:
        return Record(alerts.protocol_event("msrp", action, ctx or self.context, category, **data))
