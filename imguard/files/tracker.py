"""The held-transfer tracker: one state machine for every file that crosses the gateway.

Every transfer mechanism (IRC DCC, MSNFTP, MSNSLP, OFT, SOCKS5 bytestreams, MSRP, SIP MESSAGE bodies, XMPP
IBB, HTTP bodies in the replay) holds a file's bytes until inspection and policy decide, then releases or drops
them. What differs between them is only their framing (DCC ACKs, OFT headers, MSRP Byte-Range, IBB seq, SOCKS5
negotiation, HTTP chunking); what a held file *is* is written once, here, after Suricata's FileTransferTracker
and Zeek's files framework:

    HeldTransfer (one file)                          the mechanism (framing) drives it:
      append(payload, wire|head, offset) -> commands   bytes of the file, and the framing to release with them
      inspect(truncated)             -> InspectFile    when its framing says the file is whole
      verdict(decision)              -> commands       the one file_verdict: release, drop, tell the sender
      warn_verdict(decision, how)    -> commands       a warn on our sender's file: held for the sender's answer,
                                                       which ends it by verdict (imguard/conversation.py)
      sender_closed() / receiver_closed() -> commands  the one close rule
      cut(kind, ...) / abandon(kind, ...) -> commands  stopped by the gateway / given up by a party

    ConnectionHolds (one connection's transfers) and HoldLedger (the whole gateway or replay): the bytes
    held and the transfers in flight, bounded per connection and in total.

The state table (`TRANSITIONS`) is the whole state machine, h11 style: (state, event) -> next state; the
methods check the state before they move, and a move the table does not list is a bug (RuntimeError).

The invariants, which tests/test_held_transfer.py checks over every order of events:
- no byte of a file reaches the receiver before its verdict is allow (the tracker emits the receiver's
  Send only in `verdict`, and only for an allowed file);
- a file that is dropped, cut or abandoned gives its receiver none of its bytes;
- once a connection-per-transfer mechanism (DCC, MSNFTP, OFT, SOCKS5) has released its file, a close from
  either side closes the other (an irssi receiver waits for the sender's close to finish a DCC), gracefully:
  the released bytes arrive before the FIN (Close.graceful);
- the bytes held return to zero whenever no file is in RECEIVING, INSPECTING or WARNED;
- the bytes inspected are the bytes released: a piece placed over held bytes of another piece (MSRP Byte-Range,
  MSNSLP offsets) must carry the same bytes there, else the file is cut (`<kind>_overlap`), since which copy a
  receiver keeps is its own choice.

A mechanism says in its own protocol's terms how the receiver gets the file (`deliver`), what the receiver
gets instead when it is stopped (`refuse`) and how a notice reaches a party (`tell`: a NOTICE, a message, an
error stanza, a cancel); the tracker says *when*, *who* and *with what words*: the tell rule (`TELL_RULE`,
`HeldTransfer.notices`), from the file's direction (its context's origin: FROM_CLIENT outbound, FROM_SERVER
inbound) and how it ended:

    outbound (our user sends)   blocked, cut, allowed with a notice -> the inside sender, in a sender's words
                                (the rule's notice, else "imguard: the file 'x' from A to B was blocked (why)")
    inbound (our user receives) blocked, cut -> the outside sender (a sender's words, where its protocol lets
                                the gateway reach it) and the inside receiver, in its own words:
                                "imguard: the file 'x' from A was blocked (why)"; allowed -> nobody (a rule's
                                notice is written for a sender of ours)
    abandoned (either)          nobody (nobody is waiting)

The outside receiver of an outbound file is never told: it gets the mechanism's refusal, if any.
"""

from __future__ import annotations

import collections
import enum
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from imguard.model import FROM_CLIENT, FROM_SERVER, ChatContext, Decision
from imguard.protocols.base import Anomaly, Close, Command, InspectFile, Notify, Send, block_words
from imguard.settings import GiB, setting


class HoldState(enum.Enum):
    """Where a held file is. Only RECEIVING, INSPECTING and WARNED hold bytes; the others are final."""
    RECEIVING = "receiving"     # bytes arrive and are held; the receiver has none of them
    INSPECTING = "inspecting"   # the file is out for inspection (InspectFile); still none delivered
    WARNED = "warned"           # a `warn` verdict: held for its sender's answer (imguard/conversation.py), none
                                # delivered; the answer releases it, no answer drops it
    RELEASED = "released"       # allowed: the held bytes went to the receiver
    DROPPED = "dropped"         # blocked or quarantined: the held bytes were discarded
    TRUNCATED = "truncated"     # cut by the gateway before it was whole (over its bound, bad framing): discarded
    ABANDONED = "abandoned"     # a party gave up (the sender cancelled or sent nothing, the receiver left before
                                # the release, the connection went away): discarded


class HoldEvent(enum.Enum):
    APPEND = "append"
    INSPECT = "inspect"
    ALLOW = "allow"
    BLOCK = "block"
    RECEIVER_GONE = "receiver_gone"     # an allow whose receiver had already left
    WARN = "warn"                       # a warn verdict its sender can answer: held on (warn_verdict)
    CUT = "cut"
    ABANDON = "abandon"


_S, _E = HoldState, HoldEvent

TRANSITIONS: dict[tuple[HoldState, HoldEvent], HoldState] = {
    (_S.RECEIVING, _E.APPEND): _S.RECEIVING,
    (_S.RECEIVING, _E.INSPECT): _S.INSPECTING,
    (_S.RECEIVING, _E.CUT): _S.TRUNCATED,
    (_S.RECEIVING, _E.ABANDON): _S.ABANDONED,
    (_S.INSPECTING, _E.ALLOW): _S.RELEASED,
    (_S.INSPECTING, _E.BLOCK): _S.DROPPED,
    (_S.INSPECTING, _E.RECEIVER_GONE): _S.ABANDONED,
    (_S.INSPECTING, _E.ABANDON): _S.ABANDONED,
    (_S.INSPECTING, _E.WARN): _S.WARNED,
    (_S.WARNED, _E.ALLOW): _S.RELEASED,             # the sender justified it
    (_S.WARNED, _E.BLOCK): _S.DROPPED,              # no answer within the window (or a false positive kept)
    (_S.WARNED, _E.RECEIVER_GONE): _S.ABANDONED,
    (_S.WARNED, _E.ABANDON): _S.ABANDONED,
}
HOLDING = frozenset({_S.RECEIVING, _S.INSPECTING, _S.WARNED})


@dataclass(frozen=True)
class HoldSettings:
    """Held files, all connections together."""

    max_total_held_bytes: int = setting(2 * GiB, "Most file bytes held for inspection by all connections of a "
                                        "gateway together (each mechanism also bounds one file); a file that "
                                        "would pass it is stopped (fail closed) and recorded as too large.")


class HoldLedger:
    """The bytes held and the files in flight of one gateway process or one replay. Sessions run on the
    event loop, inspection in worker threads: one lock."""

    def __init__(self, max_bytes: int = HoldSettings().max_total_held_bytes):
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.in_flight = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.max_bytes and self.held_bytes + n > self.max_bytes:
                return False
            self.held_bytes += n
            return True

    def free(self, n: int) -> None:
        with self._lock:
            self.held_bytes = max(0, self.held_bytes - n)

    def opened(self, delta: int) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight + delta)


LEDGER = HoldLedger()       # the process's; `imguard run` sets its bound from HoldSettings


class ConnectionHolds:
    """The held files of one connection: their bytes together bounded by `max_bytes` (0: each file's own bound
    only), and counted into the process ledger."""

    def __init__(self, max_bytes: int = 0, ledger: HoldLedger | None = None):
        self.max_bytes = max_bytes
        self.ledger = ledger if ledger is not None else LEDGER
        self.held_bytes = 0
        self.in_flight = 0

    def reserve(self, n: int) -> bool:
        settle_orphans()
        if self.max_bytes and self.held_bytes + n > self.max_bytes:
            return False
        if not self.ledger.reserve(n):
            return False
        self.held_bytes += n
        return True

    def free(self, n: int) -> None:
        self.held_bytes = max(0, self.held_bytes - n)
        self.ledger.free(n)

    def opened(self, delta: int) -> None:
        self.in_flight = max(0, self.in_flight + delta)
        self.ledger.opened(delta)


# What one piece held as its wire alone costs beyond its bytes (the Piece, its dict slot, the bytes object's
# header): counted with it, so that a file in tiny blocks (an IBB block of one byte in a stanza of 100) is bounded
# by what it really takes, not by its bytes alone.
PIECE_OVERHEAD = 256


@dataclass
class Piece:
    """Part of a held file: `payload` is file bytes from `offset`; what crosses for them on release is `wire`
    when the framing re-encodes them (an IBB stanza's base64), else `head` + payload (an MSNFTP block's header,
    held once); `after` is framing that followed it with no file bytes of its own (an IBB close, an HTTP chunk's
    CRLF); `tag` the mechanism's own note (MSRP: its chunk). `length` is set when the payload is not kept (a
    transfer with `payload_of`: the file bytes are derived from `wire` again when the file is inspected): the
    payload's length, and `payload` is empty."""
    offset: int
    payload: bytes | bytearray
    wire: bytes | None = None
    tag: Any = None
    head: bytes = b""
    after: bytes = b""
    length: int | None = None

    @property
    def nbytes(self) -> int:
        """File bytes this piece stands for."""
        return len(self.payload) if self.length is None else self.length

    @property
    def size(self) -> int:
        """Bytes held for it (and, for a piece held as its wire alone, PIECE_OVERHEAD)."""
        return len(self.payload) + len(self.head) + len(self.after) + (len(self.wire) if self.wire is not None else 0) \
            + (PIECE_OVERHEAD if self.length is not None else 0)

    @property
    def released(self) -> bytes:
        """The bytes that cross for this piece."""
        body = self.wire if self.wire is not None else self.head + bytes(self.payload)
        return body + self.after


class Party(enum.Enum):
    """Who a notice about a held file is for."""
    INSIDE_SENDER = "inside_sender"         # our user sent it (outbound)
    INSIDE_RECEIVER = "inside_receiver"     # our user was to receive it (inbound)
    OUTSIDE_SENDER = "outside_sender"       # the other party sent it to our user (inbound): told where it can be

    @property
    def inside(self) -> bool:
        """The user behind the gateway, whose own connection (or the one that announced the file) crosses it."""
        return self is not Party.OUTSIDE_SENDER


class Outcome(enum.Enum):
    """How a held file ended, as far as telling goes (an abandoned file tells nobody: it is not here)."""
    BLOCKED = "blocked"     # its verdict dropped it (block, quarantine)
    CUT = "cut"             # the gateway stopped it before it was whole (too large, framing), with a notice
    NOTICED = "noticed"     # allowed (or its receiver had gone), and its decision carries a notice
    SCANNING = "scanning"   # not ended: its inspection is taking a while (said only if it does: `scanning_notices`)
    WARNED = "warned"       # not ended: held for its sender's answer (`warn_verdict`), the sender told how to answer


# The tell rule: (the file's origin, how it ended) -> who is told, in this order (the sender's answer first).
TELL_RULE: dict[tuple[str, Outcome], tuple[Party, ...]] = {
    (FROM_CLIENT, Outcome.BLOCKED): (Party.INSIDE_SENDER,),
    (FROM_CLIENT, Outcome.CUT): (Party.INSIDE_SENDER,),
    (FROM_CLIENT, Outcome.NOTICED): (Party.INSIDE_SENDER,),
    (FROM_SERVER, Outcome.BLOCKED): (Party.OUTSIDE_SENDER, Party.INSIDE_RECEIVER),
    (FROM_SERVER, Outcome.CUT): (Party.OUTSIDE_SENDER, Party.INSIDE_RECEIVER),
    (FROM_SERVER, Outcome.NOTICED): (),     # a rule's notice is written for a sender of ours
    # A slow scan: the people of ours who wait for it (an outside sender's only reach would be a refusal).
    (FROM_CLIENT, Outcome.SCANNING): (Party.INSIDE_SENDER,),
    (FROM_SERVER, Outcome.SCANNING): (Party.INSIDE_RECEIVER,),
    # A warned file waits for its sender's answer: only a sender of ours can give one (an outside sender's file under
    # a warn rule gets the verdict, refused like a block).
    (FROM_CLIENT, Outcome.WARNED): (Party.INSIDE_SENDER,),
}


@dataclass(frozen=True)
class Notice:
    """One party to tell about a held file, and the words: the mechanism's `tell` hook delivers it in its
    protocol (or returns nothing where its protocol cannot reach that party)."""
    party: Party
    text: str
    outcome: Outcome
    decision: Decision | None = None        # None for a cut


def inbound_text(name: str, sender: str, decision: Decision) -> str:
    """What the inside receiver of a stopped inbound file is told, in its own terms (a rule's notice is written
    for a sender): "imguard: the file 'x' from A was blocked (why)"."""
    action, why = block_words(decision)
    the_file = f"the file {name!r}" if name else "a file"
    return f"imguard: {the_file}{' from ' + sender if sender else ''} was {action} ({why})"


Deliver = Callable[["HeldTransfer", list[Piece]], list[Command]]
Refuse = Callable[["HeldTransfer"], list[Command]]
Tell = Callable[["HeldTransfer", Notice], list[Command]]


class HeldTransfer:
    """One file held between its sender and its receiver on one connection (see the module docstring).

    `sender_is_client`: which leg of this connection sends the file (either side of the gateway).
    `owns_connection`: the connection carries this one file (DCC, MSNFTP, OFT, SOCKS5): a final state closes
    it, and after the release a close from either side closes the other. False for files multiplexed with
    chat (IBB, MSRP, HTTP), whose framing ends them.
    `kind`: the prefix of its anomaly kinds ("dcc" -> dcc_too_large, dcc_receiver_gone, dcc_empty, dcc_overrun).
    `sender_name`: the sender as its receiver knows it (a nick, a bare JID), for the receiver's notice; default
    the context's sender.
    `scan_notice_in_band`: a file multiplexed with chat whose inside party is this connection's own client (IBB,
    MSNSLP, Sametime channels): told "being scanned" on this connection (`in_band_scanning_notices`).
    `payload_of`: the file bytes of a piece, derived again from its wire (IBB: the stanza's base64). Given, a
    piece appended with `rederive=True` (the mechanism checked that `payload_of(wire)` gives its payload) is
    held as its wire alone (one copy, not the decoded bytes beside it), and decoded when the file is inspected.
    """

    def __init__(self, transfer_id: str, context: ChatContext, *, sender_is_client: bool, kind: str,
                 max_bytes: int, size: int | None = None, name: str = "", claimed_mime: str = "",
                 receiver: str = "", sender_name: str = "", owns_connection: bool = False,
                 holds: ConnectionHolds | None = None,
                 deliver: Deliver | None = None, refuse: Refuse | None = None, tell: Tell | None = None,
                 event_data: dict[str, Any] | None = None, payload_of: Callable[[bytes], bytes] | None = None,
                 scan_notice_in_band: bool = False):
        self.transfer_id = transfer_id
        self.context = context
        self.sender_is_client = sender_is_client
        self.kind = kind
        self.max_bytes = max_bytes
        self.size = size                    # announced size of the file, if the framing knows it
        self.name = name
        self.claimed_mime = claimed_mime
        self.receiver = receiver or ", ".join(context.recipients)
        self._sender_name = sender_name
        self.owns_connection = owns_connection
        self.scan_notice_in_band = scan_notice_in_band     # see in_band_scanning_notices
        self.holds = holds if holds is not None else ConnectionHolds()
        self._deliver = deliver or _send_to_receiver
        self._refuse = refuse or (lambda transfer: [])
        self._tell = tell or (lambda transfer, notice: [])
        self.event_data = dict(event_data or {})
        self._payload_of = payload_of
        self.state = HoldState.RECEIVING
        self.pieces: dict[int, Piece] = {}  # by offset
        self.lead = b""                     # framing before the first piece (an HTTP request's head)
        self._end = 0                       # where the last piece ends: the next offset of a plain stream
        self._tail: Piece | None = None     # the piece that ends at _end
        self._in_order = True               # every piece was placed at _end: no gap, contiguous == _end
        self.received = 0                   # payload bytes appended (duplicates counted once)
        self.truncated = False              # inspected with bytes missing
        self.sender_gone = False
        self.receiver_gone = False
        self.overrun = 0                    # payload bytes that arrived after the file was complete
        self.decision: Decision | None = None
        self.holds.opened(+1)
        # A session dropped with its connection, without a final event (a carrier that never reported the close):
        # what this transfer still holds is given back after it is collected, so the gateway's totals stay true.
        self._account = _Account()
        self._finalizer = weakref.finalize(self, _ORPHANS.append, (self.holds, self._account))

    def __repr__(self) -> str:
        return f"HeldTransfer({self.transfer_id!r}, {self.state.value}, {self.received} bytes)"

    # --- facts --------------------------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        """Payload and wire bytes held now, as reserved in `holds`."""
        return self._account.bytes

    @held_bytes.setter
    def held_bytes(self, value: int) -> None:
        self._account.bytes = value

    @property
    def receiver_is_client(self) -> bool:
        return not self.sender_is_client

    @property
    def sender_name(self) -> str:
        return self._sender_name or self.context.sender

    @property
    def inbound(self) -> bool:
        """Sent to the user behind the gateway from the other side (context origin FROM_SERVER); an origin not
        known (`imguard scan`) counts as outbound."""
        return self.context.origin == FROM_SERVER

    @property
    def holding(self) -> bool:
        return self.state in HOLDING

    @property
    def contiguous(self) -> int:
        """Payload bytes in order from the first, up to the first gap."""
        if self._in_order:
            return self._end
        pos = 0
        for offset in sorted(self.pieces):
            if offset > pos:
                break
            pos = max(pos, offset + self.pieces[offset].nbytes)
        return pos

    @property
    def complete(self) -> bool:
        """The announced size has arrived without a gap."""
        return self.size is not None and self.contiguous >= self.size

    @property
    def room(self) -> int:
        """Payload bytes that may still be appended before the file's own bound."""
        return max(0, self.max_bytes - self.received)

    def data(self) -> bytes:
        """The file as held: the payloads in offset order, up to the first gap."""
        if len(self.pieces) == 1 and 0 in self.pieces and self.pieces[0].length is None:
            return bytes(self.pieces[0].payload)    # a plain stream: one copy, not two (bytearray, then bytes)
        out = bytearray()
        for offset in sorted(self.pieces):
            payload = self._payload(self.pieces[offset])
            if offset > len(out):
                break
            out += payload[len(out) - offset:]
        return bytes(out)

    def _payload(self, piece: Piece) -> bytes | bytearray:
        """A piece's file bytes: held, or derived again from its wire (`payload_of`)."""
        if piece.length is None:
            return piece.payload
        return (self._payload_of(piece.wire) or b"")[:piece.length] if piece.length else b""

    def ordered(self) -> list[Piece]:
        return [self.pieces[o] for o in sorted(self.pieces)]

    # --- events -------------------------------------------------------------------------------------

    def append(self, payload: bytes, wire: bytes | None = None, offset: int | None = None, tag: Any = None,
               head: bytes = b"", after: bytes = b"", rederive: bool = False) -> list[Command]:
        """Hold file bytes and the framing that carries them (`wire`, or `head` before them: see Piece). `offset`
        places them (default: after the last); a second piece at the same offset replaces the first (a
        retransmission). `after`: framing that ends this piece (an MSRP end line), held with it wherever it is
        placed. Framing without file bytes (no payload, no offset) follows the last piece. Past the
        file's or the connection's bound the file is cut (fail closed). After the file was complete, bytes are an
        overrun: dropped, recorded once."""
        if self.state is not HoldState.RECEIVING:
            return self._overrun(len(payload))
        framing_only = not payload and offset is None and tag is None
        if offset is None:
            offset = self._end
        old = None if framing_only else self.pieces.get(offset)
        if payload and offset < self._end:
            clash = self._overlap(offset, payload)
            if clash is not None:
                text = (f"imguard: the file {self.name!r} was blocked: its pieces overlap with different content, "
                        "so what was inspected may not be what the receiver assembles")
                return self.cut(f"{self.kind}_overlap", f"bytes {clash[0]}-{clash[1] - 1} arrived twice with "
                                "different content", notice=text, receiver_notice=text, start=clash[0],
                                end=clash[1])
        grow = len(payload) - (old.nbytes if old is not None else 0)
        if self.received + grow > self.max_bytes:
            return self.too_large(self.received + grow)
        length = len(payload) if rederive and self._payload_of is not None and wire is not None \
            and not framing_only else None
        if length is not None:
            payload = b""               # held as its wire alone: decoded again when the file is inspected
        size = len(payload) + len(head) + len(after) + (len(wire) if wire is not None else 0) \
            + (PIECE_OVERHEAD if length is not None else 0)
        freed = old.size if old is not None else 0
        if size > freed and not self.holds.reserve(size - freed):
            return self.too_large(self.received + grow, reason="connection or gateway hold limit")
        if size < freed:
            self.holds.free(freed - size)
        self.held_bytes += size - freed
        self.received += grow
        framing = head + (wire if wire is not None else b"") + after
        tail = self._tail
        if framing_only:
            if tail is None:
                self.lead += framing
            else:
                tail.after += framing
            return []
        if old is not None:             # a retransmission replaces the piece with its framing
            self.pieces[offset] = Piece(offset, payload, wire, tag, head, after, length)
            self._in_order = False      # its length may differ: contiguity is worked out from the pieces
            if old is tail:
                self._tail = self.pieces[offset]
        elif tail is not None and offset == self._end and wire is None and tag is None and not head and not after \
                and tail.wire is None and tail.tag is None and not tail.after:
            if not isinstance(tail.payload, bytearray):
                tail.payload = bytearray(tail.payload)
            tail.payload += payload     # one growing buffer for a plain stream, not a piece per read
        else:
            self.pieces[offset] = Piece(offset, payload, wire, tag, head, after, length)
            if offset != self._end:
                self._in_order = False
        end = offset + (len(payload) if length is None else length)
        if end >= self._end:
            self._end, self._tail = end, self.pieces.get(offset, tail)
        return []

    def _overlap(self, offset: int, payload: bytes) -> tuple[int, int] | None:
        """The first range [start, end) where `payload` at `offset` overlaps a held piece at another offset with
        different bytes, else None. (MSRP Byte-Range and MSNSLP offsets can overlap: the receiver writes both, and
        which copy it keeps is its own choice, so the bytes inspected and the bytes it assembles could differ.)"""
        end = offset + len(payload)
        for start, piece in self.pieces.items():
            stop = start + piece.nbytes
            if start == offset or stop <= offset or start >= end:
                continue
            lo, hi = max(start, offset), min(stop, end)
            if self._payload(piece)[lo - start:hi - start] != payload[lo - offset:hi - offset]:
                return lo, hi
        return None

    def inspect(self, truncated: bool = False) -> list[Command]:
        """The file is whole (or is all there will be): hand it out for inspection. Truncated when asked, when
        bytes are missing before the announced size, or when there is a gap."""
        if self.state is not HoldState.RECEIVING:
            return []
        data = self.data()
        furthest = max((offset + p.nbytes for offset, p in self.pieces.items()), default=0)
        self.truncated = truncated or len(data) < furthest or (self.size is not None and len(data) < self.size)
        if len(self.pieces) == 1:
            only = self.ordered()[0]        # held once: the inspected bytes are the ones released
            if only.wire is None and len(only.payload) == len(data):
                only.payload = data
        self._move(HoldEvent.INSPECT)
        return [InspectFile(transfer_id=self.transfer_id, data=data, context=self.context, name=self.name,
                            claimed_mime=self.claimed_mime, truncated=self.truncated,
                            slow_notices=self.scanning_notices())]

    def warn_verdict(self, decision: Decision, instructions: str) -> list[Command]:
        """A `warn` verdict on a file of our sender (outbound): held on (WARNED), nothing delivered, the sender told
        the decision's notice and `instructions` (how to answer: imguard/conversation.py). The sender's answer ends
        it by `verdict`: an allowing decision releases it, the warn decision (no answer in time) drops it. Any other
        file gets the verdict itself (a warn counts as blocked)."""
        if self.state is not HoldState.INSPECTING:
            return []
        if self.inbound:
            return self.verdict(decision)
        self.decision = decision
        self._move(HoldEvent.WARN)
        _, why = block_words(decision)
        text = (decision.notice or self._notice_text("held", why)) + instructions
        return self._tell_all([Notice(party, text, Outcome.WARNED, decision)
                               for party in TELL_RULE[(FROM_CLIENT, Outcome.WARNED)]])

    def verdict(self, decision: Decision) -> list[Command]:
        """The one file_verdict: allowed -> the held bytes to the receiver (or, if it left, nothing and an
        anomaly); blocked -> discarded, the receiver refused, the sender told. Then the close rule. (Also the end
        of a WARNED file: see warn_verdict.)"""
        if self.state is not HoldState.INSPECTING and self.state is not HoldState.WARNED:
            return []
        self.decision = decision
        out: list[Command] = []
        if decision.blocked:
            self._move(HoldEvent.BLOCK)
            out += self._refuse(self) + self._tell_all(self.notices(Outcome.BLOCKED, decision))
            self._free()
            return out + self._close_connection(f"{self.kind} file {decision.action}")
        if self.receiver_gone:
            self._move(HoldEvent.RECEIVER_GONE)
            self._free()
            out.append(self._anomaly(f"{self.kind}_receiver_gone",
                                     "the receiver closed before the verdict; nothing delivered"))
            out += self._tell_all(self.notices(Outcome.NOTICED, decision))
            return out + self._close_connection(f"{self.kind} receiver gone")
        self._move(HoldEvent.ALLOW)
        out += self._deliver(self, self.ordered())
        self._free()
        out += self._tell_all(self.notices(Outcome.NOTICED, decision))
        if self.sender_gone:
            out += self._close_connection(f"{self.kind} transfer done", graceful=True)
        return out

    def sender_closed(self, truncated: bool = False) -> list[Command]:
        """The sender ended the file (closed its connection, or its framing's end). Receiving: what came is all
        there will be, inspected (truncated if short of its announced size, or when the framing says so, as for a
        resumed file); nothing came: abandoned. Released: the close is passed on to the receiver."""
        self.sender_gone = True
        if self.state is HoldState.RECEIVING:
            if not self.pieces and not self.lead:
                return self.abandon(f"{self.kind}_empty", "the sender closed before sending any data")
            return self.inspect(truncated=truncated)
        if self.state is HoldState.RELEASED:
            return self._close_connection(f"{self.kind} transfer done", graceful=True)
        return []

    def receiver_closed(self) -> list[Command]:
        """The receiver left. Before the verdict the file is still inspected (the sender's attempt is recorded
        and decided); released: the close is passed on to the sender."""
        self.receiver_gone = True
        if self.state is HoldState.RELEASED:
            return self._close_connection(f"{self.kind} receiver closed", graceful=True)
        return []

    def too_large(self, total: int, **data: Any) -> list[Command]:
        """Cut because it cannot be held whole: `total` bytes (held, or announced) against `max_bytes`, or the
        connection's or gateway's bound. Whom the tell rule names is told it could not be inspected."""
        text = self._too_large_text(total, self.receiver, "to")
        return self.cut(f"{self.kind}_too_large", text, notice=text,
                        receiver_notice=self._too_large_text(total, self.sender_name, "from"),
                        bytes_seen=total, max_held_bytes=self.max_bytes, **data)

    def cut(self, kind: str, detail: str, notice: str | None = None, receiver_notice: str | None = None,
            **data: Any) -> list[Command]:
        """The gateway stops the file before it is whole (too large to hold, framing it cannot follow): fail
        closed. The held bytes are discarded, the receiver refused; with a `notice`, the tell rule says who is
        told (the inside receiver of an inbound file `receiver_notice`, if given)."""
        if self.state is not HoldState.RECEIVING:
            return []
        self._move(HoldEvent.CUT)
        out: list[Command] = [self._anomaly(kind, detail, **data)]
        out += self._refuse(self)       # before the pieces go: a refusal may need to know what was held
        self._free()
        if notice:
            out += self._tell_all(self.notices(Outcome.CUT, text=notice, receiver_text=receiver_notice or notice))
        return out + self._close_connection(kind)

    def abandon(self, kind: str, detail: str, **data: Any) -> list[Command]:
        """A party gives the file up before its verdict (the sender cancels or sent nothing, the connection is
        gone): discarded, the receiver refused, recorded; nobody is told."""
        if self.state not in HOLDING:
            return []
        self._move(HoldEvent.ABANDON)
        out: list[Command] = [self._anomaly(kind, detail, bytes_held=self.received, **data)]
        out += self._refuse(self)
        self._free()
        return out + self._close_connection(kind)

    # --- the tell rule -----------------------------------------------------------------------------

    def notices(self, outcome: Outcome, decision: Decision | None = None, text: str = "",
                receiver_text: str = "") -> list[Notice]:
        """Who is told that this file ended so, and with what words (TELL_RULE): a sender in a sender's words
        (the decision's notice, else the tracker's; for a cut, `text`), the inside receiver in its own
        (`inbound_text`; for a cut, `receiver_text`). Nobody for an allowed file whose decision has no notice."""
        if outcome is Outcome.NOTICED and (decision is None or not decision.notice):
            return []
        if decision is not None:
            action, why = block_words(decision)
            text = decision.notice or self._notice_text(action, why)
            receiver_text = inbound_text(self.name, self.sender_name, decision)
        origin = FROM_SERVER if self.inbound else FROM_CLIENT
        return [Notice(party, receiver_text if party is Party.INSIDE_RECEIVER else text, outcome, decision)
                for party in TELL_RULE[(origin, outcome)]]

    def scanning_notices(self) -> tuple[Notify, ...]:
        """What the people of ours waiting for this file are told if its inspection takes a while ("being
        scanned"), handed out with its InspectFile for the carrier to deliver then (the gateway: after
        scan_notice_after_seconds) or never. Only for a file on a connection of its own (DCC, MSNFTP, OFT,
        SOCKS5), whose notices are Notify commands for the chat connection: that connection is not the one
        paused while the file is inspected, and such a notice changes no session state. A file multiplexed with
        chat: `in_band_scanning_notices`."""
        if not self.owns_connection:
            return self.in_band_scanning_notices()
        text, receiver_text = self._scanning_words()
        notices = self.notices(Outcome.SCANNING, text=text, receiver_text=receiver_text)
        return tuple(c for c in self._tell_all(notices) if isinstance(c, Notify))

    def in_band_scanning_notices(self) -> tuple[Notify, ...]:
        """The "being scanned" notices of a file multiplexed with chat, for the gateway to deliver on the connection
        that holds it (its context's connection_id) while the scan pauses it: a Notify per party of ours the tell
        rule names, which the carrier tells through that session's notice() (a chat message in its protocol) after
        scan_notice_after_seconds, and never once the verdict is in. Not built through the mechanism's `tell`
        hook: that would change session state (XEP-0198 counts) for a notice that is mostly never sent. Only
        where the mechanism says its client is the one to tell (`scan_notice_in_band`); not an HTTP upload, whose
        client waits for its response and cannot be told anything in the middle of its request."""
        if not self.scan_notice_in_band or not self.context.connection_id:
            return ()
        text, receiver_text = self._scanning_words()
        words = {Party.INSIDE_SENDER: text, Party.INSIDE_RECEIVER: receiver_text}
        origin = FROM_SERVER if self.inbound else FROM_CLIENT
        return tuple(Notify(self.context.connection_id, self.context.protocol, words[party], self.context)
                     for party in TELL_RULE[(origin, Outcome.SCANNING)] if party in words)

    def _scanning_words(self) -> tuple[str, str]:
        """The "being scanned" words: a sender's, and a receiver's."""
        to = f" to {self.receiver}" if self.receiver else ""
        sender = f" from {self.sender_name}" if self.sender_name else ""
        return (f"imguard: {self._the_file}{to} is being scanned; it is delivered when the scan is done",
                f"imguard: {self._the_file}{sender} is being scanned; it arrives when the scan is done")

    def _tell_all(self, notices: list[Notice]) -> list[Command]:
        out: list[Command] = []
        for notice in notices:
            out += self._tell(self, notice)
        return out

    # --- internals ----------------------------------------------------------------------------------

    def _move(self, event: HoldEvent) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise RuntimeError(f"{self!r}: {event.value} is not allowed in {self.state.value}")
        self.state = new
        if new not in HOLDING:
            self.holds.opened(-1)
            self._account.open = False
            self._finalizer.detach()        # settled here: nothing left for the collector to give back

    def _free(self) -> None:
        self.holds.free(self.held_bytes)
        self.held_bytes = 0
        self.pieces = {}
        self.lead = b""
        self._tail = None

    def _close_connection(self, reason: str, graceful: bool = False) -> list[Command]:
        """The close rule's Close. `graceful` after a release: the held bytes just sent to the receiver (megabytes,
        still in the socket buffers) arrive before its FIN; an abrupt close could reset them away."""
        return [Close(reason, graceful=graceful)] if self.owns_connection else []

    def _overrun(self, n: int) -> list[Command]:
        if not n:
            return []
        self.overrun += n
        if self.overrun > n:            # recorded once per file; later bytes are dropped quietly
            return []
        return [self._anomaly(f"{self.kind}_overrun", f"{n} bytes after the file was complete were dropped",
                              size=self.size)]

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly:
        return Anomaly(self.context, kind, detail, data={**self.event_data, **data})

    def _notice_text(self, action: str, why: str) -> str:
        sender = self.context.sender
        return (f"imguard: {self._the_file}{' from ' + sender if sender else ''}"
                f"{' to ' + self.receiver if self.receiver else ''} was {action} ({why})")

    def _too_large_text(self, total: int, party: str, word: str) -> str:
        """The too-large notice: `word` "to" with the receiver for a sender, "from" with the sender for a receiver."""
        return (f"imguard: {self._the_file}{f' {word} ' + party if party else ''} was stopped: "
                f"it is larger than {self.max_bytes} bytes and could not be inspected")

    @property
    def _the_file(self) -> str:
        return f"the file {self.name!r}" if self.name else "a file"


@dataclass
class _Account:
    """What one transfer holds in its ConnectionHolds: shared with its finalizer."""
    bytes: int = 0
    open: bool = True


# Transfers collected while they still held bytes. A finalizer runs inside whatever code the collector
# interrupted, perhaps inside the ledger's lock: it only appends here (atomic), and the accounts are settled at
# the next reservation, outside any lock.
_ORPHANS: collections.deque[tuple[ConnectionHolds, _Account]] = collections.deque()


def settle_orphans() -> None:
    """Give back what collected transfers still held (see _ORPHANS)."""
    while _ORPHANS:
        try:
            holds, account = _ORPHANS.popleft()
        except IndexError:
            return
        if account.bytes:
            holds.free(account.bytes)
            account.bytes = 0
        if account.open:
            account.open = False
            holds.opened(-1)


def _send_to_receiver(transfer: HeldTransfer, pieces: Iterable[Piece]) -> list[Command]:
    """The default delivery: the held bytes with their framing, in order, in one write to the receiver's leg."""
    data = transfer.lead + b"".join(p.released for p in pieces)
    return [Send(to_client=transfer.receiver_is_client, data=data)] if data else []
