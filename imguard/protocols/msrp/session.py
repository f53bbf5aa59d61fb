"""The MSRP session (RFC 4975): every message held until it is whole and decided. Sans-io.

    session = MsrpSession(pipeline, transfers, ChatContext(...), offer=find_msrp_offer(transfers, host, port))
    session.data_received(True, b"MSRP a786hjs2 SEND\\r\\n...\\r\\n\\r\\nHey Bob\\r\\n-------a786hjs2$\\r\\n")
        -> [Send(to_client=False, data=<the same chunk>)]                                   (allow)

MSRP runs between two endpoints (directly or through relays) after a SIP INVITE/SDP exchange; either side
may send, so SENDs from both sides are handled alike. This module keeps only MSRP's framing (chunks, Byte-Range,
Message-ID, end flags, transaction responses); each message being reassembled drives one HeldTransfer
(imguard/files/tracker.py, kind "msrp", not owning the connection: messages are multiplexed on it), which holds
its chunks, says what state the message is in and when its bytes may cross. Each SEND chunk is filed under
(side, Message-ID) and placed in its message's tracker by its Byte-Range start, held once (the piece's payload: the
chunk's body; its head: the start line and headers before it; its tag: the end line after it and whether the
gateway answered the chunk), so that it is released byte for byte. Nothing of a message crosses before the whole
message is there (chunks may arrive out of order) and decided:

- text (text/plain, text/html, or message/cpim wrapping them) -> `checker.check_message(text, ctx)`, protocol
  "msrp", sender/recipient from the SIP offer (else the From-Path/To-Path endpoint URIs), conversation = the SIP
  Call-ID. Allow: the chunks cross as they came, in byte order. Mask: one chunk (the headers of the chunk that
  completed the message) with the new body and `Byte-Range: 1-N/N`. Block: nothing crosses; the sender gets
  `403` on the unanswered chunk or a REPORT `Status: 000 403`, and a notice as an MSRP SEND from the
  receiver's path ("Your message to ... was blocked by imguard: ..."); inbound (see below), the receiver, our
  user, also gets a notice from the sender's path ("A message from ... was blocked by imguard: ...");
- any other type (a file: RFC 5547, or an inline image) -> `InspectFile` (mechanism "msrp", name from the SDP
  file-selector, claimed type from Content-Type or the selector, a message/cpim wrapper taken off; `truncated`
  when the sender ended it with bytes missing). Allow: the held chunks are released in byte order, byte for
  byte. Block: the receiver gets nothing; the sender gets a REPORT (`000 403 Action-not-allowed`), an MSRP
  notice (the tracker's text unless the decision has its own) and a `Notify` naming the SIP connection of the
  offer (the carrier delivers it with SipSession.notice);
- status bodies (im-iscomposing, IMDN) and body-less SENDs cross at once; a status body that came in a message
  of several chunks (or wrapped in message/cpim) is released whole, unchecked.

Why text goes through the tracker's inspect() and verdict() too: a text is held, bounded and released exactly
like a file, and the tracker's only way from holding to released or dropped is inspect -> verdict (its other
exits, cut and abandon, record an anomaly). So a whole text is taken out of the tracker with `inspect()`, whose
InspectFile is not handed to the carrier: its bytes are checked here, inline, with check_message, and the
decision goes to `verdict()` like a file's. The tracker's hooks then do MSRP's part: `deliver` releases the
chunks (or, for a masked text, the one rewritten chunk), `tell` answers the sender. One path, one set of states
for every message; no InspectFile is ever emitted for a text.

While a chunk is held the gateway answers it `MSRP <tid> 200 OK` itself (when its Failure-Report asks for
responses), so the sender keeps going; the receiver's own responses to those transactions are swallowed later.
A `#` end line aborts the message: the tracker abandons it (the receiver never saw any of it), recorded as the
protocol event "msrp_aborted". A receiver's failure response to a chunk the gateway had answered is swallowed
and recorded ("msrp_late_failure"). A side that closes (TCP: it stops sending) ends what it was sending: the
tracker's sender_closed (a file is inspected as truncated; a text is abandoned, "msrp_incomplete_message").
For the files sent to it, it is a receiver gone (the tracker's receiver_closed): a file is still decided, never
delivered ("msrp_receiver_gone"); messages on their way to it are still reassembled and decided, and a whole,
allowed text still crosses (the carrier passes the close on as a half-close, and a half-closed side can still read).

Both directions: in MSRP the TCP client is whichever endpoint is active (by default the SDP offerer), not
necessarily the gateway's own user, so who is inside comes from the SIP offer: `offer.outbound` says whether the
gateway's user made it, and what the other party sends (a file it pushes to our user, or one our user pulled with
`a=recvonly`) has origin server: inbound unless the zones say its sender is inside. A stopped inbound file or text
is explained to our user, its receiver, in its own words by an MSRP SEND from the sender's path ("imguard: the
file ... from <sender> was blocked (<rule>)"), and the Notify for the SIP connection says the same; the outside
sender still gets the REPORT and its notice. An allowed inbound file tells nobody.

What the carrier does:
1. Give every SipSession the shared ExpectedTransfers table. A new TCP connection whose destination is in it
   (`find_msrp_offer(transfers, dst_host, dst_port)`, kind "msrp") is MSRP: put an MsrpSession on it with that
   offer; `offer.tls` (TCP/TLS/MSRP) means TLS from the first byte (tls_on_connect). Port 2855 (MSRP's
   registered port, relays) can be mapped to MSRP too: the session then finds its offer from the To-Path.
2. Carry Send/Close, record Anomaly/ProtocolEvent; answer InspectFile with Pipeline.check_file (mechanism
   "msrp" in the context).
3. A `Notify` (protocol "sip") -> record it and carry out `session.notice(text)` on the SipSession whose context
   has that connection_id (a SIP MESSAGE to the user), in addition to the in-band MSRP notice this session sent.

Bad input is an anomaly, never an exception: a chunk without To-Path/From-Path/Message-ID, a bad Byte-Range,
one beyond its total or not matching the body is dropped (400 to the sender); an unframeable stream (not
MSRP, no end line within `msrp_max_chunk_size`) is closed, and the messages it held are dropped with it. Held
bytes are bounded per message and per connection (`msrp_max_held_bytes`: the connection's ConnectionHolds;
`msrp_max_messages_in_reassembly`) and by the gateway's hold ledger: past them (an announced total says so at
once) the message is cut (the tracker's TRUNCATED: "msrp_too_large"), its chunks are refused with 413 and the
sender gets a notice.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from imguard.files.tracker import ConnectionHolds, HeldTransfer, HoldState, Notice, Outcome, Party, Piece
from imguard.model import FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.protocols.base import (Anomaly, Close, Command, InspectFile, Notify, OutgoingCommands, ProtocolEvent, Send,
                                    StreamSession, block_words, limited_anomaly)
from imguard.protocols.msrp.framing import (ABORTED, COMPLETE, CONTINUED, ByteRange, MsrpChunk, MsrpDecoder,
                                            MsrpFramingError, MsrpLimits, build_report, build_response, build_send,
                                            parse_byte_range, with_body)
from imguard.protocols.msrp.offer import MSRP_KIND, MsrpOffer, path_key
from imguard.protocols.sip.message import parse_cpim, parse_content_type
from imguard.protocols.sip.text import UNCHECKED_TYPES, masked_body, message_text

_ids = itertools.count(1)
BODYLESS_METHODS = ("REPORT", "AUTH", "NICKNAME")     # RFC 4975, RFC 4976 (relays), RFC 7701: forwarded as they are


@dataclass
class _Chunk:
    """A held chunk's framing, the tag of its piece in the tracker. The chunk is held once: its body is the
    piece's payload, the bytes before the body (start line, headers, blank line) the piece's head, and `tail`
    (the end line, tens of bytes) rides here; it is released byte for byte as head + body + tail. `chunk` is
    the chunk without its body (raw = its head): what a response, a REPORT or a masked rewrite needs.
    `answered`: the gateway answered it itself (then the receiver's own response to it is swallowed)."""
    chunk: MsrpChunk
    tail: bytes
    answered: bool = False

    @classmethod
    def of(cls, chunk: MsrpChunk) -> _Chunk:
        if chunk.body is None:                  # no body section: all of it is head
            return cls(chunk, b"")
        start = len(chunk.head()) + 2           # after the blank line
        head, tail = chunk.raw[:start], chunk.raw[start + len(chunk.body):]
        return cls(dataclasses.replace(chunk, raw=head, body=b""), tail)

    @property
    def head(self) -> bytes:
        return self.chunk.raw


@dataclass
class _Message:
    """One MSRP message: its framing facts. Its bytes, its state and its byte accounting are its tracker's."""
    first: MsrpChunk                         # the first chunk seen, without its body (paths, report flags)
    content_type: str = ""                   # with parameters
    final_end: int | None = None             # the last byte of the '$' chunk
    kind: str = ""                           # once whole (or ended): "text", "file" or "pass" (a status body)
    completing: _Chunk | None = None         # the chunk that made it whole (a masked text is rewritten on it)
    tracker: HeldTransfer = field(init=False)

    @property
    def from_client(self) -> bool:
        return self.tracker.sender_is_client

    @property
    def message_id(self) -> str:
        return self.first.message_id

    @property
    def refused(self) -> bool:
        """Cut (too large): its later chunks are refused too."""
        return self.tracker.state is HoldState.TRUNCATED

    @property
    def whole(self) -> bool:
        """The '$' chunk has come and every byte up to it, with no piece beyond a gap."""
        t = self.tracker
        return self.final_end is not None and t.contiguous >= self.final_end and max(t.pieces) <= t.contiguous


class MsrpSession(StreamSession):
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
        self.holds = ConnectionHolds(max_bytes=limits.msrp_max_held_bytes)
        self._messages: collections.OrderedDict[tuple[bool, str], _Message] = collections.OrderedDict()
        self._held: dict[str, _Message] = {}        # every message whose tracker still holds, by transfer_id
        self._swallow: collections.OrderedDict[tuple[bool, str], str] = collections.OrderedDict()

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        out = OutgoingCommands()
        for chunk in self._decoders[from_client].feed(data):
            if isinstance(chunk, MsrpFramingError):
                self.closed = True
                out.add(self._anomaly(chunk.kind, detail=chunk.detail, from_client=from_client))
                self._drop_all(out)
                out.add(Close(f"MSRP framing error: {chunk.kind}"))
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
        msg = self._held.get(transfer_id)
        if msg is None:
            return []
        out = OutgoingCommands()
        self._carry(out, msg, msg.tracker.verdict(decision))
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
            if msg.from_client != from_client:
                continue
            # The sender is gone: what it sent is all there will be.
            del self._messages[key]
            if msg.refused:
                continue
            if self._is_text(msg):
                self._carry(out, msg, msg.tracker.abandon(
                    "msrp_incomplete_message", "the sender closed before the message was complete; it was not "
                    "passed on"))
            else:
                [job] = msg.tracker.inspect(truncated=True)     # the sender left before it was whole
                _, ctype, _, content = self._kind(msg, job.data)
                out.add(self._file_job(msg, job, ctype, content))
        for msg in list(self._held.values()):
            if msg.tracker.sender_is_client == from_client:
                self._carry(out, msg, msg.tracker.sender_closed())
            elif msg.kind == "file":
                self._carry(out, msg, msg.tracker.receiver_closed())
        return out.cmds

    # --- SEND ---------------------------------------------------------------------------------------

    def _reject(self, out: OutgoingCommands, from_client: bool, chunk: MsrpChunk, kind: str, detail: str,
                status: int = 400, **data: Any) -> None:
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
        note = _Chunk.of(chunk)
        if msg is None:
            if len(self._messages) >= self.limits.msrp_max_messages_in_reassembly:
                self._reject(out, from_client, chunk, "msrp_too_many_messages",
                             f"more than {self.limits.msrp_max_messages_in_reassembly} messages in reassembly",
                             status=413)
                return
            msg = self._messages[key] = self._new_message(from_client, note.chunk)
        t = msg.tracker
        if msg.refused:
            self._refuse_chunk(out, msg, chunk)
            return
        if rng.total is not None:
            if t.size is not None and t.size != rng.total:
                out.add(self._anomaly("msrp_byte_range_total_changed", f"total {t.size} then {rng.total}",
                                      from_client=from_client, message_id=msg.message_id))
            t.size = rng.total if t.size is None else max(t.size, rng.total)
        if chunk.get("content-type") and not msg.content_type:
            msg.content_type = chunk.get("content-type")
        if chunk.flag == ABORTED:
            self._messages.pop(key, None)
            if chunk.failure_report == "yes":
                out.send(from_client, build_response(chunk, 200))
            self._abort(out, msg)
            return
        offset = rng.start - 1
        if self._too_large(msg, offset, body, note):
            limit = self.limits.msrp_max_held_bytes
            text = (f"imguard: the message {msg.message_id} is larger than {limit} bytes and could not be "
                    f"inspected; it was not passed on")
            cmds = t.cut("msrp_too_large", text, notice=text, from_client=from_client, total=t.size,
                         msrp_max_held_bytes=limit)
        else:
            if offset in t.pieces:
                out.add(self._anomaly("msrp_duplicate_chunk", f"a second chunk at byte {rng.start}; the later one "
                                      "kept", from_client=from_client, message_id=msg.message_id))
            cmds = t.append(body, offset=offset, tag=note, head=note.head)
        if msg.refused:     # cut here, or by the gateway's hold ledger inside append
            self._refuse_chunk(out, msg, chunk)
            self._carry(out, msg, cmds)
            return
        self._carry(out, msg, cmds)
        if chunk.flag == COMPLETE:
            msg.final_end = last
        if msg.whole:
            del self._messages[key]
            self._complete(out, msg, note)
        else:
            self._answer(out, msg, note)

    def _new_message(self, from_client: bool, first: MsrpChunk) -> _Message:
        msg = _Message(first)
        msg.tracker = HeldTransfer(
            f"{self.context.connection_id or 'msrp'}-{first.message_id}-{next(_ids)}", self._ctx(first),
            sender_is_client=from_client, kind="msrp", max_bytes=self.limits.msrp_max_held_bytes,
            holds=self.holds, deliver=lambda transfer, pieces: self._deliver(msg, pieces),
            tell=lambda transfer, notice: self._tell(msg, notice),
            event_data={"message_id": first.message_id})
        self._held[msg.tracker.transfer_id] = msg
        return msg

    def _too_large(self, msg: _Message, offset: int, body: bytes, note: _Chunk) -> bool:
        """Would holding this chunk pass the bound? The announced total says so before any byte is held; else the
        connection's held bytes with it, as the tracker counts them (its head and body). Checked here rather than
        left to the tracker's own cut so that the sender is refused in MSRP's terms, the same way for both."""
        t = msg.tracker
        if t.size is not None and t.size > t.max_bytes:
            return True
        replaced = t.pieces.get(offset)
        grow = len(note.head) + len(body) - (replaced.size if replaced is not None else 0)
        return self.holds.held_bytes + grow > self.holds.max_bytes

    def _refuse_chunk(self, out: OutgoingCommands, msg: _Message, chunk: MsrpChunk) -> None:
        """A chunk of a message that was cut: 413, and the message forgotten at its last chunk."""
        if chunk.failure_report != "no":
            out.send(msg.from_client, build_response(chunk, 413))
        if chunk.flag != CONTINUED:
            self._messages.pop((msg.from_client, msg.message_id), None)

    def _abort(self, out: OutgoingCommands, msg: _Message) -> None:
        """`#`: the sender gave the message up. The tracker abandons it; what users see stays the protocol event
        "msrp_aborted" (an abort is the sender's right, not an anomaly)."""
        held = sum(p.size + len(p.tag.tail) for p in msg.tracker.pieces.values())     # the chunks' bytes
        cmds = msg.tracker.abandon("msrp_aborted", "the sender aborted the message")
        self._carry(out, msg, _without_anomaly(cmds, "msrp_aborted"))
        out.add(self._event("msrp_aborted", message_id=msg.message_id, bytes_held=held))

    def _answer(self, out: OutgoingCommands, msg: _Message, note: _Chunk) -> None:
        """Our own 200 OK for a held chunk (if its Failure-Report asks for one)."""
        if not note.answered:
            note.answered = True
            if note.chunk.failure_report == "yes":
                out.send(msg.from_client, build_response(note.chunk, 200))

    # --- complete messages --------------------------------------------------------------------------

    def _kind(self, msg: _Message, data: bytes) -> tuple[str, str, dict[str, str], bytes]:
        """("text"/"file"/"pass", content type, params, content) of a message's bytes."""
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
        return ctype in ("text/plain", "text/html") or (
            ctype == "message/cpim" and self._kind(msg, msg.tracker.data())[0] == "text")

    def _complete(self, out: OutgoingCommands, msg: _Message, completing: _Chunk) -> None:
        """The whole message out of the tracker's hands (inspect): a file to the carrier, a text decided here."""
        msg.completing = completing
        [job] = msg.tracker.inspect()
        msg.kind, ctype, params, content = self._kind(msg, job.data)
        if msg.kind == "file":
            self._answer(out, msg, completing)
            out.add(self._file_job(msg, job, ctype, content))
            return
        # A text (or a status body) is inspected inline: the InspectFile is not for the carrier (see the module
        # docstring); the decision goes to the tracker's verdict like a file's.
        self._place(msg, self._ctx(msg.first))
        if msg.kind == "pass":
            decision = Decision()       # status bodies cross unchecked
        else:
            decision = self.checker.check_message(message_text(ctype, params, content)[0], msg.tracker.context)
        self._carry(out, msg, msg.tracker.verdict(decision))

    def _file_job(self, msg: _Message, job: InspectFile, ctype: str, content: bytes) -> InspectFile:
        """The tracker's InspectFile for a file (or what the sender sent of it), as the carrier gets it: a
        message/cpim wrapper taken off, named and typed from the SDP file-selector, in the file's context.
        Truncated by MSRP's own account: short of the announced total, or ended before it was whole (the
        tracker's own flag also counts chunks that overlap, which a resending MSRP sender legitimately does)."""
        t = msg.tracker
        msg.kind = "file"
        offer = self._offer(msg.first)
        selector = offer.file if offer is not None else None
        self._place(msg, self._ctx(msg.first, file=True))
        t.name = selector.name if selector is not None else ""
        t.claimed_mime = selector.type if ctype == "application/octet-stream" and selector is not None else ctype
        if self.side_closed[t.receiver_is_client]:
            t.receiver_closed()         # its receiver left before it was whole: decided, never delivered
        truncated = not msg.whole or (t.size is not None and t.contiguous < t.size)
        return dataclasses.replace(job, data=content, context=t.context, name=t.name, claimed_mime=t.claimed_mime,
                                   truncated=truncated)

    # --- the tracker's hooks: how MSRP releases a message and tells its sender ------------------------

    def _deliver(self, msg: _Message, pieces: list[Piece]) -> list[Command]:
        """The held chunks to the receiver in byte order, byte for byte (the receiver's responses to the ones we
        answered are swallowed); a masked text instead as one chunk with the new body."""
        receiver = msg.tracker.receiver_is_client
        decision = msg.tracker.decision
        if msg.kind == "text" and decision is not None and decision.action == MASK and decision.masked_text is not None:
            outer, outer_params = parse_content_type(msg.content_type)
            new_body, new_type = masked_body(outer, outer_params, msg.tracker.data(), decision.masked_text)
            completing = msg.completing
            if completing.answered:
                self._swallow_tid(receiver, completing.chunk.tid)
            return [Send(to_client=receiver, data=with_body(completing.chunk, new_body, new_type))]
        for piece in pieces:
            if piece.tag.answered:
                self._swallow_tid(receiver, piece.tag.chunk.tid)
        return [Send(to_client=receiver, data=b"".join(piece.head + bytes(piece.payload) + piece.tag.tail
                                                       for piece in pieces))]

    def _tell(self, msg: _Message, notice: Notice) -> list[Command]:
        """A notice in MSRP's terms (who is told, and a file's words, are the tracker's tell rule). The sender, on
        either side: a cut message the notice (its chunk got 413); a blocked text 403 on its unanswered chunks
        (else a REPORT) and a notice; a blocked file a REPORT and a notice while its sender is there. The
        receiver, who is ours: an MSRP SEND in the session where the message would have arrived (a text in a
        message's words). The person inside, for a file, also a Notify for its SIP connection (an allowed file
        with a notice: only that)."""
        out = OutgoingCommands()
        t, decision, text = msg.tracker, notice.decision, notice.text
        if notice.party is Party.INSIDE_RECEIVER:
            blocked_text = msg.kind != "file" and decision is not None
            if blocked_text:
                action, why = block_words(decision)
                text = f"A message from {t.context.sender} was {action} by imguard: {why}"
            if blocked_text or not self.side_closed[t.receiver_is_client]:
                self._notice_receiver(out, msg, text)
        elif notice.outcome is Outcome.CUT:
            self._notice(out, msg, text)
        elif msg.kind != "file":
            if notice.outcome is Outcome.BLOCKED:
                self._refuse_to_sender(out, msg, answer_open=True)
                self._notice(out, msg, decision.notice or self._message_notice(msg, decision))
        elif notice.outcome is Outcome.BLOCKED and not t.sender_gone:
            self._refuse_to_sender(out, msg, answer_open=False)
            self._notice(out, msg, text)
        if msg.kind == "file" and decision is not None and notice.party.inside:
            offer = self._offer(msg.first)
            out.add(Notify(connection_id=offer.context.connection_id if offer is not None else "", protocol="sip",
                           text=text, context=t.context, decision=decision,
                           details=(("msrp", {"message_id": msg.message_id, "bytes": t.received}),)))
        return out.cmds

    def _refuse_to_sender(self, out: OutgoingCommands, msg: _Message, answer_open: bool) -> None:
        """403 on the chunks not answered yet (`answer_open`), else a REPORT for the message."""
        t = msg.tracker
        open_chunks = [p.tag for p in t.ordered() if not p.tag.answered] if answer_open else []
        for note in open_chunks:
            note.answered = True
            if note.chunk.failure_report != "no":
                out.send(msg.from_client, build_response(note.chunk, 403))
        if not open_chunks and msg.first.failure_report != "no":
            out.send(msg.from_client, build_report(msg.first, 403, (1, t.contiguous or None, t.size)))

    def _notice(self, out: OutgoingCommands, msg: _Message, text: str) -> None:
        """A notice to the sender as an MSRP SEND from the receiver's path (its response is swallowed)."""
        tid, notice = build_send(msg.first.from_path, msg.first.to_path, text.encode("utf-8"))
        self._swallow_tid(msg.from_client, tid)
        out.send(msg.from_client, notice)

    def _notice_receiver(self, out: OutgoingCommands, msg: _Message, text: str) -> None:
        """A notice to the receiver as an MSRP SEND from the sender's path, in the session where the stopped message
        would have arrived (no reports asked for: nothing comes back)."""
        _, notice = build_send(msg.first.to_path, msg.first.from_path, text.encode("utf-8"))
        out.send(not msg.from_client, notice)

    def _message_notice(self, msg: _Message, decision: Decision) -> str:
        action, why = block_words(decision)
        return f"Your message to {msg.tracker.context.recipients[0]} was {action} by imguard: {why}"

    # --- helpers ------------------------------------------------------------------------------------

    def _carry(self, out: OutgoingCommands, msg: _Message, cmds: list[Command]) -> None:
        """The tracker's commands, its anomalies under this connection's per-kind cap (a peer repeating one
        malformation must not flood the alert log); a message whose tracker no longer holds is forgotten."""
        for cmd in cmds:
            if isinstance(cmd, Anomaly):
                seen = self.anomaly_counts[cmd.kind] = self.anomaly_counts.get(cmd.kind, 0) + 1
                if seen > self.limits.msrp_max_anomalies_per_kind:
                    continue
                if seen == self.limits.msrp_max_anomalies_per_kind:
                    cmd = dataclasses.replace(cmd, data={**cmd.data, "further_suppressed": True})
            out.add(cmd)
        if not msg.tracker.holding:
            self._held.pop(msg.tracker.transfer_id, None)

    def _drop_all(self, out: OutgoingCommands) -> None:
        """The connection is closed on a framing error: every held message goes with it. The framing error's
        anomaly explains it, so the tracker's own records of these abandons are not added."""
        for msg in list(self._held.values()):
            self._carry(out, msg, _without_anomaly(msg.tracker.abandon("msrp_connection_closed", "the connection "
                                                                       "was closed on a framing error"),
                                                   "msrp_connection_closed"))
        self._messages.clear()

    def _swallow_tid(self, side: bool, tid: str) -> None:
        self._swallow[(side, tid)] = tid
        while len(self._swallow) > self.limits.msrp_max_tracked_transactions:
            self._swallow.popitem(last=False)

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

    def _ctx(self, first: MsrpChunk, file: bool = False) -> ChatContext:
        offer = self._offer(first)
        to_last, from_last = first.to_path[-1], first.from_path[-1]
        origin = ""
        if offer is not None:
            sender, recipient = offer.who(to_last, from_last)
            conversation = offer.call_id
            # The offer says which party is the gateway's own user: what that party sends comes from inside.
            origin = FROM_CLIENT if (sender == offer.offerer) == offer.outbound else FROM_SERVER
        else:
            sender, recipient, conversation = from_last, to_last, ""
        ctx = self.context.with_(sender=sender, recipients=(recipient,), conversation=conversation, origin=origin)
        if file:
            ctx = ctx.with_(transfer_mechanism="msrp")
        return ctx

    @staticmethod
    def _place(msg: _Message, ctx: ChatContext) -> None:
        """The message's context once it is whole (the SIP offer may have been found since its first chunk)."""
        msg.tracker.context = ctx
        msg.tracker.receiver = ", ".join(ctx.recipients)

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly | None:
        return limited_anomaly(self.anomaly_counts, self.limits.msrp_max_anomalies_per_kind, self.context,
                               kind, detail, **data)

    def _event(self, action: str, category: str = "session", ctx: ChatContext | None = None,
               **data: Any) -> ProtocolEvent:
        return ProtocolEvent("msrp", action, ctx or self.context, category, data)


def _without_anomaly(cmds: list[Command], kind: str) -> list[Command]:
    """The tracker's commands without its anomaly of `kind` (where MSRP records the event its own way)."""
    return [c for c in cmds if not (isinstance(c, Anomaly) and c.kind == kind)]
