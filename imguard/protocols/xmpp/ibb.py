"""XEP-0047 in-band bytestreams on one XMPP connection: the IBB framing, driving a HeldTransfer per stream.

An in-band bytestream is an `<open sid>` iq, data blocks (`<data sid seq>` with base64 text, carried by iq or,
with stanza='message', by message stanzas) and a `<close sid>` iq, all multiplexed with the chat. Only that
framing is here; the file each stream carries is a `HeldTransfer` (imguard.files.tracker: kind "ibb",
owns_connection False, bounded by `max_held_bytes` decoded bytes; the connection's files together by
`connection_bound`):

* `<open>` is forwarded at once (the receiver answers it itself, and may refuse the stream). An open without
  a sid, reusing one that is still open or held, or past `max_transfers` streams at once is refused
  (ibb_bad_open, too_many_transfers) with an error to the sender. An open that sent no block for
  `tracked_id_ttl` is forgotten (when the next open comes).
* Each block is checked (seq in order, valid base64, room under `max_held_bytes`) and appended to the stream's
  HeldTransfer: payload = the decoded block, wire = the stanza exactly as received; only the stanza is kept
  (the block is decoded from it again at inspection: `block_payload`), counted with PIECE_OVERHEAD. A data iq
  is answered by us "from" the receiver so the sender keeps going, and the receiver's real answer is swallowed
  when it comes.
  A gap, bad base64 or a file too large is `cut` (ibb_sequence_gap, ibb_bad_base64, ibb_too_large): the held
  stanzas are discarded, the receiver gets an IBB `<close>`, the sender an iq error for its block (or, for
  message blocks, a notice message).
* `<close>` is held too, as framing after the last block (no file bytes of its own), answered like a block, and ends the
  file: `sender_closed()` hands it out as `InspectFile(transfer_id='ibb:<sid>', mechanism 'ibb')`.
* The verdict is the tracker's: allowed, the held stanzas (blocks and close) go to the receiver byte-exact and
  in order in one write (the tracker's default delivery); blocked, the receiver gets an IBB `<close>` and the
  parties the tracker's tell rule names are told (the `refuse` and `tell` hooks: `_refuse` and `_tell` below;
  see Direction).
* The connection ending (closed by a side, or by the session) with streams open or files held: each is
  abandoned (transfer_abandoned, with `sid` and `bytes`, which the replay lists as truncated transfers), and
  none of it crosses (a receiver on a side still open after a half-close gets the IBB `<close>`).

XEP-0198 stream management: every stanza held and then discarded, and every stanza we write, shifts the two
sides' stanza counts; the session (`IbbHost`) keeps those counts, told through `dropped` and `inject`.

Direction: a stream's sender is either side of the connection (`from_client` at its open), and the session hands
over both: its client's own streams (outbound) and those the server delivers to its client (an outside sender's
file to the user behind the gateway: `sender_is_client=False`, context origin FROM_SERVER). For an inbound stream
the answers go to the server "from" our client, our client's own answers are swallowed, the release goes to the
client; blocked, the client gets the IBB `<close>` "from" the sender and a notice of its own, and the sender a
policy-violation error message through the server (a cut: the answer to the refused block, as outbound; the
client, if a notice was given, a notice message). An announced
file (an SI or Jingle offer with a size) whose stream closes before its first block is no file: the close crosses
(its sender gave up, or a gateway on its side stopped it).
"""

from __future__ import annotations

import base64
import binascii
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Protocol
from xml.etree import ElementTree as ET

from imguard.files.tracker import ConnectionHolds, HeldTransfer, HoldLedger, HoldState, Notice, Outcome, Party
from imguard.model import FROM_CLIENT, FROM_SERVER, ChatContext, Decision
from imguard.protocols.base import Anomaly, Command, Send
from imguard.protocols.xmpp import decoder as d
from imguard.protocols.xmpp.decoder import XmppLimits
from imguard.protocols.xmpp.offers import FileOffer, int_or_none
from imguard.protocols.xmpp.xmlutil import attr, split

NS_IBB = "http://jabber.org/protocol/ibb"

# What the sender of a refused block is told: a message block in a notice message, an iq block in an iq error.
REFUSED_NOTICE = "Your file transfer was blocked by the security policy."
REFUSED_TEXT = "in-band transfer refused by the gateway"


def connection_bound(limits: XmppLimits) -> int:
    """Bytes the held IBB files of one connection may take together: `max_transfers` x `max_held_bytes` (the
    documented budget: 16 x 16 MiB). What is counted is what is held: each block's stanza as received (its
    decoded bytes are not kept beside it: they are decoded again when the file is inspected) and PIECE_OVERHEAD
    per block. A block's stanza is about 1.4x its data in blocks of 4 KiB (base64 and markup), so fewer files of
    the largest size fit at once than `max_transfers`; one always fits (at least 2x `max_held_bytes` and a largest
    stanza), and a file in tiny blocks is cut at this bound (ibb_too_large)."""
    return max(limits.max_transfers * limits.max_held_bytes, 2 * limits.max_held_bytes + limits.max_stanza_size)


def block_payload(stanza: bytes) -> bytes | None:
    """The decoded bytes of an IBB data stanza read alone (None if it cannot be: a prefix bound on the stream
    header, say). A block is held as its stanza alone only when this gives exactly the bytes its session
    decoded (`_hold`), so the bytes inspected are the bytes released."""
    try:
        for el in ET.fromstring(stanza).iter(f"{{{NS_IBB}}}data"):
            return base64.b64decode("".join((el.text or "").split()), validate=True)
    except (ET.ParseError, binascii.Error, ValueError):
        return None
    return None


class IbbHost(Protocol):
    """What the in-band bytestreams need from their XMPP session."""

    context: ChatContext
    closed: bool                # the connection is over: nothing more crosses it
    full_jid: str

    def ctx(self, **changes: Any) -> ChatContext: ...       # the connection's context, its user as sender

    def inject(self, to_client: bool, data: bytes) -> Send: ...      # a stanza of ours (XEP-0198 counts it)

    def dropped(self, n: int, from_client: bool = True) -> None: ...     # n stanzas of one side never cross

    def swallow_answer(self, iq_id: str, from_client: bool) -> None: ...   # that side's answer to iq_id: dropped

    def iq_error(self, el: ET.Element, etype: str, condition: str, message: str,
                 to_client: bool = True) -> Send: ...      # an error answering `el`, to the side that sent it

    def notice_message(self, to: str, notice: str) -> Send: ...     # a chat message to the client

    def refusal_message(self, to: str, notice: str) -> Send: ...    # an error message to `to`, through the server

    def anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly: ...


@dataclass
class IbbStream:
    """One in-band bytestream between its `<open>` and its `<close>`: the framing followed here. Its file is
    `transfer`, made at its first block or close (an open that never sends one holds nothing)."""
    sid: str
    sender: str                 # full JID of the sender
    receiver: str               # the open's 'to'
    sender_is_client: bool
    opened: float               # clock time of the open
    offer: FileOffer
    next_seq: int = 0
    held_stanzas: int = 0       # the sender's stanzas held in `transfer` (XEP-0198 counts them if discarded)
    transfer: HeldTransfer | None = None

    @property
    def transfer_id(self) -> str:
        return f"ibb:{self.sid}"


class InBandBytestreams:
    """The in-band bytestreams of one XMPP connection (see the module docstring). The session hands it the IBB
    stanzas (`open`, `data`, `close`), the verdicts (`verdict`) and the end of the connection
    (`connection_closed`); each returns the commands to carry out."""

    def __init__(self, host: IbbHost, limits: XmppLimits, offers: Callable[[str], FileOffer],
                 clock: Callable[[], float], ledger: HoldLedger | None = None):
        self.host = host
        self.limits = limits
        self._offers = offers
        self._clock = clock
        self.holds = ConnectionHolds(max_bytes=connection_bound(limits), ledger=ledger)
        self.streams: dict[str, IbbStream] = {}     # sid -> stream between its open and its close
        self.files: dict[str, IbbStream] = {}       # transfer_id -> stream whose file is held (receiving/inspecting)
        self._ids = itertools.count(1)

    # --- the IBB stanzas ----------------------------------------------------------------------------

    def open(self, st: d.Stanza, op: ET.Element, from_client: bool = True) -> list[Command]:
        el = st.element
        sid = op.get("sid", "")
        now = self._clock()
        for old_sid, old in list(self.streams.items()):     # forget opens that never sent data
            if old.transfer is None and now - old.opened > self.limits.tracked_id_ttl:
                del self.streams[old_sid]
        if not sid or sid in self.streams or f"ibb:{sid}" in self.files:
            self.host.dropped(1, from_client)
            return [self.host.anomaly("ibb_bad_open", "an IBB open without a sid or reusing one", sid=sid),
                    self.host.iq_error(el, "cancel", "not-acceptable", "in-band transfer refused", from_client)]
        if self._in_use() >= self.limits.max_transfers:
            self.host.dropped(1, from_client)
            return [self.host.anomaly("too_many_transfers", "more simultaneous in-band transfers than "
                                      "max_transfers", sid=sid, max_transfers=self.limits.max_transfers),
                    self.host.iq_error(el, "wait", "resource-constraint", "too many file transfers at once",
                                       from_client)]
        sender = el.get("from") or (self.host.full_jid if from_client else "")
        self.streams[sid] = IbbStream(sid=sid, sender=sender, receiver=el.get("to", ""), sender_is_client=from_client,
                                      opened=now, offer=self._offers(sid))
        return [Send(to_client=not from_client, data=st.raw)]

    def data(self, st: d.Stanza, data_el: ET.Element, from_client: bool = True) -> list[Command]:
        el = st.element
        is_iq = split(el.tag)[1] == "iq"
        sid = data_el.get("sid", "")
        stream = self.streams.get(sid)
        if stream is None or stream.sender_is_client != from_client:
            out: list[Command] = [self.host.anomaly("ibb_unknown_sid", "IBB data for a bytestream that was not "
                                                    "opened on this connection; dropped", sid=sid)]
            self.host.dropped(1, from_client)
            if is_iq:
                out.append(self.host.iq_error(el, "cancel", "item-not-found", "unknown in-band bytestream",
                                              from_client))
            return out
        transfer = self._file(stream)
        seq = int_or_none(data_el.get("seq"))
        if seq != stream.next_seq:
            return self._cut(stream, el, "ibb_sequence_gap",
                             f"IBB block seq={data_el.get('seq')!r}, expected {stream.next_seq}", "unexpected-request")
        try:
            block = base64.b64decode("".join((data_el.text or "").split()), validate=True)
        except (binascii.Error, ValueError):
            return self._cut(stream, el, "ibb_bad_base64", f"IBB block seq={seq} is not valid base64", "bad-request")
        if len(block) > transfer.room:
            return self._cut(stream, el, "ibb_too_large", f"the in-band transfer exceeds max_held_bytes="
                             f"{self.limits.max_held_bytes}; refused", "not-acceptable", reason="too_large")
        out = self._hold(stream, block, st.raw)
        if transfer.state is not HoldState.RECEIVING:     # cut by the tracker: over the connection's bound
            return out + self._refused(stream, el, "not-acceptable")
        stream.next_seq = (seq + 1) % 65536
        if is_iq:
            out.append(self._answer(el, stream))
        return out

    def close(self, st: d.Stanza, close: ET.Element, from_client: bool = True) -> list[Command]:
        stream = self.streams.get(close.get("sid", ""))
        if stream is None or stream.sender_is_client != from_client:
            return [Send(to_client=not from_client, data=st.raw)]      # closing something we never held: harmless
        del self.streams[stream.sid]
        if stream.transfer is None and stream.offer.size:
            # An announced file closed before its first block: the sender gave it up (or a gateway on its side
            # stopped it and closed the stream): no file, nothing to hold.
            return [Send(to_client=not from_client, data=st.raw)]
        transfer = self._file(stream)
        # The close is released with the blocks, after them: held as the file's last piece, with no payload.
        out = self._hold(stream, b"", st.raw)
        if transfer.state is not HoldState.RECEIVING:
            return out + self._refused(stream, st.element, "not-acceptable")
        out.append(self._answer(st.element, stream))
        return out + transfer.sender_closed()

    # --- verdicts and the end of the connection -----------------------------------------------------

    def verdict(self, transfer_id: str, decision: Decision, warn: str | None = None) -> list[Command]:
        """The file's verdict (the tracker's); with `warn` (how to answer: imguard/conversation.py), a warn that
        holds our sender's file for the answer, which ends it by a second verdict."""
        stream = self.files.get(transfer_id)
        if stream is None or self.host.closed:
            return []
        out = stream.transfer.verdict(decision) if warn is None else stream.transfer.warn_verdict(decision, warn)
        if not stream.transfer.holding:
            del self.files[transfer_id]
        return out

    def connection_closed(self) -> list[Command]:
        """Every stream still open and every file still held is abandoned (a receiver on a side still open after
        a half-close gets the IBB <close>; once the host is closed nothing is sent). The streams open are
        receiving; the files held whose stream is not open are inspecting."""
        out: list[Command] = []
        for stream in [*self.streams.values(), *(s for s in self.files.values() if s.sid not in self.streams)]:
            transfer = self._file(stream)
            out += transfer.abandon("transfer_abandoned", "the connection closed while an in-band transfer was "
                                    "held; nothing was released", bytes=transfer.received)
        self.streams.clear()
        self.files.clear()
        return out

    # --- the stream's HeldTransfer ------------------------------------------------------------------

    def _file(self, stream: IbbStream) -> HeldTransfer:
        if stream.transfer is None:
            receivers = (stream.receiver,) if stream.receiver else ()
            if stream.sender_is_client:
                context = self.host.ctx(recipients=receivers, transfer_mechanism="ibb", origin=FROM_CLIENT)
            else:
                context = self.host.context.with_(sender=stream.sender.split("/", 1)[0], recipients=receivers,
                                                  transfer_mechanism="ibb", origin=FROM_SERVER)
            stream.transfer = HeldTransfer(
                stream.transfer_id, context, sender_is_client=stream.sender_is_client, kind="ibb",
                max_bytes=self.limits.max_held_bytes, size=stream.offer.size, name=stream.offer.name,
                claimed_mime=stream.offer.content_type, receiver=stream.receiver, holds=self.holds,
                refuse=lambda transfer: self._refuse(stream),
                tell=lambda transfer, notice: self._tell(stream, notice),
                event_data={"sid": stream.sid}, payload_of=block_payload,
                scan_notice_in_band=True)       # our client is told "being scanned" here, a chat message
            self.files[stream.transfer_id] = stream
        return stream.transfer

    def _hold(self, stream: IbbStream, payload: bytes, stanza: bytes) -> list[Command]:
        """Append one stanza to the file: its decoded bytes, and itself to release for them. Blocks arrive in
        order, so each goes at the end (an empty block, or the close, is framing that keeps its place)."""
        transfer = stream.transfer
        out = transfer.append(payload, stanza, rederive=bool(payload) and block_payload(stanza) == payload)
        if transfer.state is HoldState.RECEIVING:
            stream.held_stanzas += 1
        return out

    def _cut(self, stream: IbbStream, el: ET.Element, kind: str, detail: str, condition: str,
             **data: Any) -> list[Command]:
        """The gateway stops the file at this block (fail closed)."""
        return stream.transfer.cut(kind, detail, **data) + self._refused(stream, el, condition)

    def _refused(self, stream: IbbStream, el: ET.Element, condition: str) -> list[Command]:
        """After a cut: the stream is over and the refused stanza crosses neither. The sender is told in the terms
        of that stanza: an iq gets an error (which a client shows next to the transfer), a message block a notice
        message."""
        self.streams.pop(stream.sid, None)
        self.files.pop(stream.transfer_id, None)
        self.host.dropped(1, stream.sender_is_client)
        if split(el.tag)[1] == "iq":
            return [self.host.iq_error(el, "cancel", condition, REFUSED_TEXT, stream.sender_is_client)]
        if stream.sender_is_client:
            return [self.host.notice_message(stream.sender, REFUSED_NOTICE)]
        return [self.host.refusal_message(stream.sender, REFUSED_NOTICE)] if stream.sender else []

    # --- the tracker's hooks: the receiver refused, the sender told ---------------------------------

    def _refuse(self, stream: IbbStream) -> list[Command]:
        """A stopped file: its held stanzas are discarded, and the receiver, which saw the open, gets an IBB
        close of its stream (its answer is ours to drop)."""
        if self.host.closed:
            return []
        self.host.dropped(stream.held_stanzas, stream.sender_is_client)
        stream.held_stanzas = 0
        receiver_is_client = not stream.sender_is_client
        iq_id = f"imguard-{next(self._ids)}"
        self.host.swallow_answer(iq_id, from_client=receiver_is_client)
        xml = (f"<iq type='set' id={attr(iq_id)}"
               + (f" from={attr(stream.sender)}" if receiver_is_client and stream.sender else "")
               + (f" to={attr(stream.receiver)}" if stream.receiver else "")
               + f"><close xmlns='{NS_IBB}' sid={attr(stream.sid)}/></iq>")
        return [self.host.inject(receiver_is_client, xml.encode("utf-8"))]

    def _tell(self, stream: IbbStream, notice: Notice) -> list[Command]:
        """A notice in XMPP's terms: our client (the sender of its own stream, or the receiver of one the server
        delivered, which got an IBB close) a chat message; the outside sender a policy-violation error message
        through the server. A sender's cut is explained by the answer to the refused stanza instead
        (`_refused`)."""
        if notice.party is Party.INSIDE_RECEIVER:
            return [self.host.notice_message(stream.receiver or self.host.full_jid, notice.text)]
        if notice.outcome is Outcome.CUT:
            return []
        if notice.party is Party.INSIDE_SENDER:
            return [self.host.notice_message(stream.sender, notice.text)]
        return [self.host.refusal_message(stream.sender, notice.text)] if stream.sender else []

    # --- building blocks ----------------------------------------------------------------------------

    def _answer(self, el: ET.Element, stream: IbbStream) -> Send:
        """Answer the sender's iq as the receiver would (it has not got it yet), and drop the real answer."""
        iq_id = el.get("id", "")
        self.host.swallow_answer(iq_id, from_client=not stream.sender_is_client)
        xml = (f"<iq type='result' id={attr(iq_id)}" + (f" from={attr(stream.receiver)}" if stream.receiver else "")
               + (f" to={attr(stream.sender)}" if stream.sender else "") + "/>")
        return self.host.inject(stream.sender_is_client, xml.encode("utf-8"))

    def _in_use(self) -> int:
        """Streams open, and files held for inspection after their stream closed."""
        return len(self.streams) + sum(1 for s in self.files.values() if s.sid not in self.streams)
