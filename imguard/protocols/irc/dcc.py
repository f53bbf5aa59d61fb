"""DCC side connections: the offer table entry, and the sans-io session whose DCC SEND framing drives a
HeldTransfer (imguard.files.tracker) that holds the file until inspection and policy decide.

An IrcSession that sees `PRIVMSG bob :\\x01DCC SEND ssh.trace 167772167 59130 1320211\\x01` stores a
`DccOffer` in the shared `ExpectedTransfers` table (kind "dcc", key (host, port): the address the
receiver will connect to, i.e. the gateway's relay address when the offer was rewritten, else the
sender's real one), like Zeek's dcc-send.zeek. The carrier that sees a new TCP connection to such an
address looks the offer up (`find_offer`) and puts a `DccSendSession` on it:

    receiver (connects)  --client-->  [DccSendSession]  --server-->  sender (listens), active DCC
    sender   (connects)  --client-->  [DccSendSession]  --server-->  receiver (listens), passive DCC

Data flows sender -> receiver; the receiver answers with 4-byte big-endian running totals (ACKs). Only
that framing is here; the held file is a `HeldTransfer` (owns_connection: the connection carries this one
file; anomaly kinds dcc_too_large, dcc_receiver_gone, dcc_empty, dcc_overrun). The session appends every
byte of the sender's to it (up to the announced size minus a RESUME position, bounded by `max_held_bytes`)
and ACKs the sender itself so the transfer completes, the ACK ahead of the `InspectFile` it may cause (the
carrier pauses the connection at an InspectFile); when the announced size has arrived (or the sender
closes: truncated if short) the tracker hands the file out for inspection (mechanism "dcc"). Bytes past
the announced size are dropped (dcc_overrun, recorded once). The receiver's own ACKs are swallowed (the
sender already had ours). `file_verdict` is the tracker's verdict: allowed, the held bytes go to the
receiver; blocked, the connection closes with nothing delivered. Who is told, and the words, are the tracker's
tell rule; DCC's part (`_tell`) is the delivery: a `Notify` for the IRC connection that registered the offer,
which the carrier delivers with `IrcSession.notice()`, for the person inside (the sender of an outbound file,
the receiver of an inbound one). The outside sender of an inbound file cannot be told: a DCC SEND carries
nothing back but the receiver's ACKs (which it has had for every byte), and its IRC connection does not cross
the gateway. Once the file is
released, a close from either side closes the other (an irssi receiver waits at 100% for the sender's
close).

Both directions are the same session: the offer says who is inside. An offer our IRC user makes is
outbound (its context `origin=FROM_CLIENT`); one made *to* our user by someone on the server's side is
inbound (`origin=FROM_SERVER`, sender that person's nick!user@host): the file's context keeps the offer's,
so the pipeline's direction is the file's. Which leg of the data connection carries the file
(`sender_is_client`) is a separate fact, from active or passive DCC. DCC CHAT lines take their origin from
who wrote them (the offerer is inside when the offer was outbound).

A `warn` verdict on our sender's file (imguard/conversation.py, "Files on a side connection"): the file waits
(WARNED) for its sender's answer in the IRC chat that announced it; the sender has had every ACK, the receiver waits
(the sender's close is not passed on: `passes_close_on`); the answer, or the window's end, wakes this session
(`wake`), which releases or drops it. An outside sender's file under a warn rule is refused like a block.

DCC CHAT offers are stored the same way (kind CHAT); `DccChatSession` checks each line like a message.

What the carrier does (the gateway; tests/test_irc_live.py has a 100-line asyncio stand-in):
1. Give each IrcSession the shared table, and `dcc_relay=(gateway_host, allocate)` where `allocate(offer)`
   opens a listening port on the gateway and returns it (raise to refuse the offer).
2. On a connection to a relay port, or (transparent mode, no relay) on any new connection, *before*
   protocol detection: `offer = find_offer(transfers, dst_host, dst_port)`; `dcc_session(checker,
   transfers, ctx, offer)` picks DccSendSession/DccChatSession; connect on to `offer.real_address`.
   No offer: `dcc_session(..., None)` records a "dcc_unannounced" anomaly and closes at the first byte
   (call `.start()` to do it at once); or simply refuse the connection.
3. Carry Send/Record/Anomaly/Close; answer InspectFile with Pipeline.check_file (mechanism "dcc" in the context).
4. A `Notify` command -> record it (`Notify.event()`), find the IrcSession by its connection_id and carry
   out `session.notice(text)` on that connection (the person is told in the chat, as for messages).
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
from dataclasses import dataclass, field
from typing import Any

from imguard.conversation import ConversationSettings, side_receiver_left, wake_side_file, warn_side_file
from imguard.files.tracker import HeldTransfer, HoldState, Notice, Outcome
from imguard.model import FROM_CLIENT, FROM_SERVER, WARN, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Close, Command, Notify, Send, StreamSession
from imguard.protocols.irc.decoder import IrcLimits, decode_text, encode_text, format_ctcp, split_ctcp

DCC_KIND = "dcc"                # the ExpectedTransfers kind of DCC offers; key (host, port)
SEND = "send"
CHAT = "chat"

_ids = itertools.count(1)


def new_offer_id(prefix: str = "") -> str:
    return f"{prefix or 'dcc'}-{next(_ids)}"


@dataclass(frozen=True)
class DccOffer:
    """A DCC offer seen on an IRC connection: what the expected data connection will carry and for whom."""

    offer_id: str
    kind: str                       # SEND or CHAT
    name: str                       # the file name as offered ("" for CHAT); never used as a path
    size: int | None                # announced size (None: not given)
    sender: str                     # who sends the file (identity or nick!user@host)
    receiver: str                   # who it is offered to (a nick)
    host: str                       # the real address of the listening side
    port: int
    listener_is_sender: bool = True  # active DCC: the file's sender listens; passive (reverse) DCC: the receiver
    token: str = ""                 # passive DCC token
    relay_host: str = ""            # the gateway address the offer was rewritten to ("" = not rewritten)
    relay_port: int = 0
    position: int = 0               # DCC RESUME/ACCEPT start offset
    outbound: bool = True           # offered by the gateway's own client (False: offered to it by the server side)
    context: ChatContext = field(default_factory=ChatContext)   # sender/recipients; connection_id = the IRC one

    @property
    def key(self) -> tuple[str, int]:
        """Where the connecting side will connect: the table key."""
        return (self.relay_host, self.relay_port) if self.relay_host else (self.host, self.port)

    @property
    def real_address(self) -> tuple[str, int]:
        """Where the carrier must connect on to (the real listener), relayed or not."""
        return (self.host, self.port)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.offer_id, "kind": self.kind, "name": self.name, "size": self.size,
                "sender": self.sender, "receiver": self.receiver, "host": self.host, "port": self.port,
                "passive": not self.listener_is_sender, "token": self.token, "relay_host": self.relay_host,
                "relay_port": self.relay_port, "position": self.position, "outbound": self.outbound}


def remember_offer(transfers, offer: DccOffer, ttl: float) -> None:
    """Store the offer under the address the connecting side will use (no table, e.g. offline: nothing)."""
    if transfers is not None:
        transfers.expect(offer.key, offer, kind=DCC_KIND, ttl=ttl)


def find_offer(transfers, host: str, port: int, take: bool = True) -> DccOffer | None:
    """For the carrier: the offer behind a new connection to host:port (None: no offer announced it).
    `take` removes it (a DCC address is used once; a RESUME puts the offer back with its position)."""
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    key = (host, int(port))
    return transfers.take(key, kind=DCC_KIND) if take else transfers.get(key, kind=DCC_KIND)


class DccSendSession(StreamSession):
    """One DCC SEND data connection: the DCC framing (ACKs, the announced size, a RESUME position) driving the
    file's HeldTransfer. `offer` None: a connection no offer announced (an anomaly: closed)."""

    def __init__(self, checker, transfers, context: ChatContext, offer: DccOffer | None,
                 limits: IrcLimits = IrcLimits(), conversation: ConversationSettings | None = None):
        self.checker = checker              # unused: file decisions come back through file_verdict
        self.transfers = transfers
        self.limits = limits
        self.conversation = conversation or ConversationSettings()     # a warned file's window (warn_verdict)
        self.offer = offer
        self.context = context
        self.refused = False                # an unannounced connection, closed at its first byte
        self.transfer: HeldTransfer | None = None
        if offer is not None:
            self.sender_is_client = not offer.listener_is_sender
            file_context = offer.context.with_(
                protocol="irc", transfer_mechanism="dcc",
                client_address=context.client_address or offer.context.client_address,
                server_address=context.server_address or offer.context.server_address,
                connection_id=context.connection_id or offer.context.connection_id)
            self.transfer = HeldTransfer(
                offer.offer_id, file_context, sender_is_client=self.sender_is_client, kind="dcc",
                max_bytes=limits.max_held_bytes,
                # A size of 0 is "not given" in DCC; after a RESUME only the rest of the file comes.
                size=max(0, offer.size - offer.position) if offer.size else None,
                name=offer.name, receiver=offer.receiver, sender_name=offer.sender.split("!", 1)[0],
                owns_connection=True, tell=self._tell,
                event_data={"offer": offer.offer_id})

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        transfer = self.transfer
        if transfer is None:
            return self._unannounced(len(data))
        if self._ended or from_client != self.sender_is_client:
            return []                       # after a stop; or the receiver's ACKs (the sender already had ours)
        if transfer.state is not HoldState.RECEIVING:
            return transfer.append(data)    # after the file was whole: an overrun, dropped, recorded once
        if transfer.size is not None and transfer.size > transfer.max_bytes:
            # Announced larger than it may be held: stopped at its first byte, not after max_held_bytes of it.
            return transfer.too_large(transfer.size)
        room = len(data) if transfer.size is None else max(0, transfer.size - transfer.received)
        out = transfer.append(data[:room]) if room else []     # past max_held_bytes: cut
        if transfer.state is HoldState.RECEIVING:
            # Our ACK goes out before the InspectFile: the carrier pauses the connection there, and a sender
            # waiting for its last ACK must not wait for the scan.
            out.append(Send(to_client=self.sender_is_client, data=self._ack()))
            if transfer.complete:
                out += transfer.inspect(truncated=self.offer.position > 0)     # a resumed file is a part
        if room < len(data) and transfer.state is HoldState.INSPECTING:
            out += transfer.append(data[room:])     # past the announced size: an overrun
        return out

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        if self.transfer is None or transfer_id != self.transfer.transfer_id:
            return []
        if decision.action == WARN:
            return self._warn(report, decision)
        return self.transfer.verdict(decision)

    def _warn(self, report: FileReport, decision: Decision) -> list[Command]:
        """A warn on this file (imguard/conversation.py, "Files on a side connection"): our sender's is held
        (WARNED: the sender has had every ACK, the receiver waits) in SIDE_WARNINGS under the IRC connection that
        announced it, where the sender is told how to answer; the answer wakes this session (`wake`), as does the
        window's end. An outside sender's (nobody here can answer for it) is refused like a block."""
        return warn_side_file(self.transfer, report, decision, self.offer.context.sender, self.offer.receiver,
                              self.offer.context.connection_id, self.context.connection_id, self.conversation)

    def wake(self) -> list[Command]:
        """The sender answered in the chat, or the window ended: its warned file released or dropped."""
        if self.transfer is None or self.transfer.state is not HoldState.WARNED:
            return []
        return wake_side_file(self.transfer, self.conversation)

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self.transfer is None:
            return []
        if from_client != self.sender_is_client:
            if self.transfer.state is HoldState.WARNED:     # the receiver left while the file waited: given up
                return side_receiver_left(self.transfer, "dcc")
            return self.transfer.receiver_closed()
        return self.transfer.sender_closed(truncated=self.offer.position > 0)     # a resumed file is a part

    def start(self) -> list[Command]:
        """Optional: what to do when the connection opens, before any byte (an unannounced one is closed)."""
        if self.transfer is None:
            return self._unannounced(0)
        return []

    def passes_close_on(self, from_client: bool) -> bool:
        """Not while the file waits for its sender's answer (WARNED): the receiver must not read the sender's end
        before the file; the tracker closes it when the answer (or the window's end) settles it."""
        return self.transfer is None or self.transfer.state is not HoldState.WARNED

    # --- internals ----------------------------------------------------------------------------------

    @property
    def _ended(self) -> bool:
        """The file was stopped or given up: the tracker closed the connection, later bytes mean nothing."""
        return self.transfer is not None and not self.transfer.holding \
            and self.transfer.state is not HoldState.RELEASED

    def _ack(self) -> bytes:
        """The running total the sender waits for: 32 bits, counted from the RESUME position (and wrapping)."""
        return struct.pack(">I", (self.offer.position + self.transfer.received) & 0xFFFFFFFF)

    def _tell(self, transfer: HeldTransfer, notice: Notice) -> list[Command]:
        """A notice in DCC's terms: a NOTICE on the IRC connection that registered the offer, for the person
        inside. The outside sender is out of reach (see the module docstring)."""
        if not notice.party.inside:
            return []
        details = self.offer.to_dict()
        if notice.outcome is Outcome.BLOCKED:
            details["bytes_held"] = transfer.received
        return [Notify(self.offer.context.connection_id, "irc", notice.text, transfer.context, notice.decision,
                       (("dcc", details),))]

    def _unannounced(self, size: int) -> list[Command]:
        if self.refused:
            return []
        self.refused = True
        return [Anomaly(self.context.with_(protocol="irc", transfer_mechanism="dcc"), "dcc_unannounced",
                        "a DCC data connection that no offer announced", data={"first_bytes": size}),
                Close("unannounced DCC connection")]


class DccChatSession(StreamSession):
    """One DCC CHAT connection: CRLF/LF text lines straight between two people, so each line goes through
    `checker.check_message` like a PRIVMSG. Allowed lines cross byte for byte; masked lines are rewritten;
    a blocked line is dropped and its writer gets an `[imguard] ...` line (there is no server to send a
    NOTICE from). `offer` None: an unannounced connection (anomaly, closed)."""

    def __init__(self, checker, transfers, context: ChatContext, offer: DccOffer | None,
                 limits: IrcLimits = IrcLimits()):
        self.checker = checker
        self.transfers = transfers
        self.context = context
        self.offer = offer
        self.limits = limits
        self.closed = False
        self._buf = {True: bytearray(), False: bytearray()}
        if offer is not None:
            offerer_is_client = not offer.listener_is_sender
            self._who = {offerer_is_client: offer.sender, not offerer_is_client: offer.receiver}
            # Which side of the gateway each writer is on: the offerer is our IRC user when the offer was outbound.
            inside, outside = (FROM_CLIENT, FROM_SERVER) if offer.outbound else (FROM_SERVER, FROM_CLIENT)
            self._origin = {offerer_is_client: inside, not offerer_is_client: outside}
            self.chat_context = offer.context.with_(
                protocol="irc", transfer_mechanism="",
                client_address=context.client_address or offer.context.client_address,
                server_address=context.server_address or offer.context.server_address,
                connection_id=context.connection_id or offer.context.connection_id)

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        if self.offer is None:
            self.closed = True
            return [Anomaly(self.context.with_(protocol="irc"), "dcc_unannounced",
                            "a DCC data connection that no offer announced", data={"first_bytes": len(data)}),
                    Close("unannounced DCC connection")]
        buf = self._buf[from_client]
        buf += data
        out: list[Command] = []
        forward = bytearray()
        limit = self.limits.max_line_length
        while True:
            end = buf.find(b"\n", 0, limit)
            if end < 0:
                if len(buf) >= limit:
                    self.closed = True
                    if forward:
                        out.append(Send(to_client=not from_client, data=bytes(forward)))
                    out += [Anomaly(self.chat_context, "line_too_long", f"a DCC CHAT line over {limit} bytes",
                                    data={"from_client": from_client}), Close("DCC CHAT line too long")]
                    return out
                break
            raw = bytes(buf[:end + 1])
            del buf[:end + 1]
            replacement, extra = self._line(from_client, raw)
            forward += replacement
            if extra:
                if forward:
                    out.append(Send(to_client=not from_client, data=bytes(forward)))
                    forward = bytearray()
                out += extra
        if forward:
            out.append(Send(to_client=not from_client, data=bytes(forward)))
        return out

    def start(self) -> list[Command]:
        """Optional: what to do when the connection opens, before any byte (an unannounced one is closed)."""
        if self.offer is None:
            return self.data_received(True, b"")
        return []

    def _line(self, from_client: bool, raw: bytes) -> tuple[bytes, list[Command]]:
        ending = b"\r\n" if raw.endswith(b"\r\n") else b"\n"
        text, encoding = decode_text(raw[:-len(ending)])
        plain, ctcps = split_ctcp(text)
        check = " ".join(p for p in [plain] + [c.args for c in ctcps if c.verb == "ACTION"] if p)
        if not check.strip():
            return raw, []
        sender = self._who[from_client]
        other = self._who[not from_client]
        decision = self.checker.check_message(check, self.chat_context.with_(
            sender=sender, recipients=(other,), origin=self._origin[from_client]))
        if decision.blocked:
            why = decision.notice or ("your message was blocked by imguard: "
                                      + ("; ".join(m.title or m.rule_id for m in decision.matches) or "policy"))
            return b"", [Send(to_client=from_client, data=encode_text("[imguard] " + why) + ending)]
        if decision.action == "mask" and decision.masked_text is not None:
            new = decision.masked_text
            if not plain and len(ctcps) == 1 and ctcps[0].verb == "ACTION":
                new = format_ctcp("ACTION", new)
            return encode_text(new, encoding) + ending, []
        return raw, []

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        return []

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self.offer is not None and self._buf[from_client] and not self.closed:
            size = len(self._buf[from_client])
            self._buf[from_client].clear()
            return [Anomaly(self.chat_context, "incomplete_line", "a DCC CHAT line without its end was not forwarded",
                            data={"from_client": from_client, "size": size})]
        return []


def dcc_session(checker, transfers, context: ChatContext, offer: DccOffer | None,
                limits: IrcLimits = IrcLimits(), conversation: ConversationSettings | None = None):
    """The session for a new DCC data connection: by the offer's kind (None: unannounced, closed)."""
    if offer is not None and offer.kind == CHAT:
        return DccChatSession(checker, transfers, context, offer, limits)
    return DccSendSession(checker, transfers, context, offer, limits, conversation)
