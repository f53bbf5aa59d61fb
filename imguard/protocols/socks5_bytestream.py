"""Socks5BytestreamSession: holds an XEP-0065 SOCKS5 bytestream until its file is scanned.

When an XmppSession relays a bytestream offer (its client's, or an outside sender's the server delivers
to its client) it registers SHA1(sid + initiator + target) with the real streamhosts in ExpectedTransfers,
and (with `bytestream_relay`) rewrites the offer so the receiving peer connects to the gateway's SOCKS5
relay instead. This session is that relay, for one data connection
(sans-io, the StreamSession contract of imguard.protocols.base; "client" = the peer that connected
to the relay, "server" = the real streamhost). Only the SOCKS5 negotiation is written here; the file
itself is one HeldTransfer (imguard.files.tracker) that this session drives.

Two ways in, depending on who speaks SOCKS5 to the connecting peer:

1. The session does (a plain TCP listener carrier, `dst_hash=None`):
       client: 05 01 00                 -> session answers 05 00 itself (only "no authentication")
       client: 05 01 00 03 28 <hash> 00 00 (CONNECT, ATYP=domain, 40 hex chars, port 0)
                                        -> the hash is looked up: unknown -> anomaly
                                           `unexpected_bytestream`, Close; known ->
                                           ConnectUpstream(host, port) for the first real streamhost
       carrier: session.upstream_connected()  (or upstream_failed(): the next streamhost is tried)
   then the session replays the greeting and the CONNECT to the streamhost, consumes its method
   reply and hands its CONNECT reply to the client.
2. The carrier did the client's SOCKS5 handshake (mitmproxy's socks5 mode, where the CONNECT
   target is the hash; the carrier calls `transfers.lookup_bytestream(hash)` to pick the upstream):
   construct with `dst_hash=...` once the upstream is connected and call `upstream_connected()`;
   the session replays greeting and CONNECT upstream and consumes both replies.

Data phase: the connection carries one file, so it drives one HeldTransfer (owns_connection=True,
kind "socks5", transfer_id 's5b:<hash>:<n>', name, size and type from the SI/Jingle offer, context of
the XMPP connection that announced it). The sender is the side whose bytes arrive first (the file
flows from the initiator to the target: client->server when the initiator connected to us,
server->client when the target did); the receiver's bytes are dropped. The file goes out for
inspection when the announced size has arrived or the sender closes; the tracker releases it on
allow (and passes a close from either side on after that), or on block discards it and closes the
connection. Who is told and the words are the tracker's tell rule; the delivery here is a Notify for the
XMPP connection that announced the bytestream (the carrier calls XmppSession.notice there), for the person
inside: the sender of its own offer, or, for an offer that connection was delivered (origin FROM_SERVER: an
outside sender's file to our user, who is the receiver), the receiver (the file's context, hence the alert,
says inbound). The outside sender is not told: a bytestream carries no text, and its XMPP connection does
not cross the gateway (it only sees the stream closed). More bytes
than `max_held_bytes` cut the file (`socks5_too_large`, fail closed); bytes from the sender once the file
was complete close the connection (`socks5_more_than_announced`). With a mediated proxy65 streamhost the proxy holds the
initiator's last bytes until the initiator closes, so "sender closed" is the normal end of a transfer.
A `warn` verdict on our sender's file waits for the sender's answer in the XMPP chat that announced it, as a DCC file
does (imguard/conversation.py, "Files on a side connection": `wake`, `passes_close_on`).

Not done: UDP mode, username/password authentication towards the streamhost, Jingle S5B
(XEP-0260) candidate-used/activate bookkeeping.
"""

from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass
from typing import Any

from imguard.conversation import ConversationSettings, side_receiver_left, wake_side_file, warn_side_file
from imguard.files.expected import ExpectedBytestream, ExpectedTransfers
from imguard.files.tracker import HeldTransfer, HoldState, Notice
from imguard.model import WARN, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Close, Command, ConnectUpstream, Notify, Send, StreamSession
from imguard.settings import MiB, setting

_HASH = re.compile(r"^[0-9a-f]{40}$")
_ids = itertools.count(1)


@dataclass(frozen=True)
class Socks5Limits:
    """SOCKS5 bytestream relay limits."""

    max_held_bytes: int = setting(64 * MiB, "Largest bytestream file held for scanning; a larger transfer is "
                                  "closed (fail closed) and recorded as too large.")
    max_handshake_bytes: int = setting(600, "Most bytes of a SOCKS5 greeting or request before it must be "
                                       "complete (a CONNECT with a 40-byte hash is 47 bytes).")


class RelayState(enum.Enum):
    """Where the SOCKS5 negotiation is. In DATA the file's own state is its HeldTransfer's."""
    GREETING = "greeting"             # the client's method offer (session-handshake mode)
    REQUEST = "request"               # the client's CONNECT <hash>
    WAIT_UPSTREAM = "wait_upstream"   # the carrier is connecting to the streamhost
    UP_METHOD = "up_method"           # the streamhost's method choice
    UP_REPLY = "up_reply"             # the streamhost's CONNECT reply
    DATA = "data"                     # the file flows, held by the session's HeldTransfer
    DONE = "done"                     # the connection was closed


_HANDSHAKE = (RelayState.GREETING, RelayState.REQUEST, RelayState.UP_METHOD, RelayState.UP_REPLY)


def connect_request(dst_hash: str) -> bytes:
    h = dst_hash.encode("ascii")
    return b"\x05\x01\x00\x03" + bytes([len(h)]) + h + b"\x00\x00"


class Socks5BytestreamSession(StreamSession):
    """One relayed bytestream connection. `stream_hash` given: the carrier did the client's SOCKS5 handshake
    and is connected to the streamhost (`streamhost`, informational); call start(). Not given: the session
    speaks SOCKS5 to the client and asks for the upstream with ConnectUpstream."""

    def __init__(self, transfers: ExpectedTransfers, context: ChatContext, checker: Any = None,
                 stream_hash: str | None = None, streamhost: tuple[str, int] | None = None,
                 limits: Socks5Limits = Socks5Limits(), conversation: ConversationSettings | None = None):
        self.transfers = transfers
        self.conversation = conversation or ConversationSettings()     # a warned file's window (_warn)
        self.checker = checker            # unused: files go out as InspectFile; kept for a uniform factory
        self.context = context.with_(protocol=context.protocol or "xmpp", transfer_mechanism="socks5")
        self.limits = limits
        self.streamhost = streamhost
        self.offer: ExpectedBytestream | None = None
        self.dst_hash = stream_hash.lower() if stream_hash else None
        self._client_handshake = stream_hash is None
        self.state = RelayState.GREETING if stream_hash is None else RelayState.WAIT_UPSTREAM
        if self.dst_hash:
            self.offer = transfers.lookup_bytestream(self.dst_hash)
        self._buf = {True: bytearray(), False: bytearray()}      # handshake bytes not yet parsed, per side
        self._candidates: list = []
        self.transfer: HeldTransfer | None = None                 # the file, from its first byte on

    def start(self) -> list[Command]:
        """Carrier-handshake mode: the upstream is connected, replay the SOCKS5 handshake to it."""
        return self.upstream_connected()

    # --- contract ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        try:
            out: list[Command] = []
            if self.state is RelayState.WAIT_UPSTREAM and not self._client_handshake:
                out = self.start()                           # the carrier did not call start(): do it now
            return self._ends_on_close(out + self._data(from_client, data))
        except Exception as e:                               # never raise into the carrier
            return self._abort("internal_error", f"{type(e).__name__}: {e}")

    def tls_started(self) -> list[Command]:
        return []

    def upstream_connected(self) -> list[Command]:
        """The carrier connected to the streamhost: replay the SOCKS5 handshake upstream."""
        if self.state is not RelayState.WAIT_UPSTREAM:
            return []
        if self.offer is None:
            return self._abort("unexpected_bytestream", f"no bytestream offer for hash {self.dst_hash!r}",
                               dst_hash=self.dst_hash)
        self.state = RelayState.UP_METHOD
        return [Send(to_client=False, data=b"\x05\x01\x00")]

    def upstream_failed(self) -> list[Command]:
        """The streamhost could not be reached: try the next one, or give up."""
        if self.state is not RelayState.WAIT_UPSTREAM or not self._candidates:
            return self._abort("bytestream_upstream_failed", "no offered streamhost could be reached",
                               reply=b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00")
        sh = self._candidates.pop(0)
        return [ConnectUpstream(sh.host, sh.port, sh.jid)]

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        if self.transfer is None or transfer_id != self.transfer.transfer_id:
            return []
        if decision.action == WARN and self.offer is not None:
            # our sender's file waits for the answer in the XMPP chat that announced it (imguard/conversation.py,
            # "Files on a side connection"); an outside sender's is refused like a block
            return self._ends_on_close(warn_side_file(
                self.transfer, report, decision, self.offer.context.sender, self.offer.target,
                self.offer.context.connection_id, self.context.connection_id, self.conversation))
        return self._ends_on_close(self.transfer.verdict(decision))

    def wake(self) -> list[Command]:
        """The sender answered in the chat, or the window ended: the warned file released or dropped."""
        if self.transfer is None or self.transfer.state is not HoldState.WARNED:
            return []
        return self._ends_on_close(wake_side_file(self.transfer, self.conversation))

    def passes_close_on(self, from_client: bool) -> bool:
        """Not while the file waits for its sender's answer (WARNED): the receiver must not read the sender's end
        before the file; the tracker closes it when the answer (or the window's end) settles it."""
        return self.transfer is None or self.transfer.state is not HoldState.WARNED

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self.state is RelayState.DONE:
            return []
        transfer = self.transfer
        if transfer is None:                                 # in the handshake, or no byte of a file yet
            self.state = RelayState.DONE
            return [Close("peer closed")]
        # The tracker's close rule: the sender's close ends the file (inspected now, or passed on after the
        # release); the receiver's is passed on after the release, and before it the file is still decided.
        if from_client != transfer.sender_is_client and transfer.state is HoldState.WARNED:
            return self._ends_on_close(side_receiver_left(transfer, "socks5"))    # nobody left to deliver to
        closed = transfer.sender_closed() if from_client == transfer.sender_is_client else transfer.receiver_closed()
        return self._ends_on_close(closed)

    # --- handshake -----------------------------------------------------------------------------

    def _data(self, from_client: bool, data: bytes) -> list[Command]:
        if self.state is RelayState.DATA:
            return self._file_bytes(from_client, data)
        if self.state is RelayState.DONE:
            return []
        buf = self._buf[from_client]
        buf += data
        out: list[Command] = []
        while True:
            before = self.state
            if from_client and self.state is RelayState.GREETING:
                out += self._greeting(buf)
            elif from_client and self.state is RelayState.REQUEST:
                out += self._request(buf)
            elif not from_client and self.state is RelayState.UP_METHOD:
                out += self._up_method(buf)
            elif not from_client and self.state is RelayState.UP_REPLY:
                out += self._up_reply(buf)
            if self.state is before or self.state is RelayState.DONE:
                break
        if self.state in _HANDSHAKE and len(self._buf[from_client]) > self.limits.max_handshake_bytes:
            return out + self._abort("socks5_bad_handshake", "an oversized SOCKS5 handshake")
        if self.state is RelayState.DATA:                    # bytes that followed the handshake
            for side in (not from_client, from_client):     # the other side's were buffered first
                rest, self._buf[side] = bytes(self._buf[side]), bytearray()
                if rest:
                    out += self._file_bytes(side, rest)
        return out

    def _greeting(self, buf: bytearray) -> list[Command]:
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return []
        if buf[0] != 5:
            return self._abort("socks5_bad_handshake", f"SOCKS version {buf[0]}, expected 5")
        methods = bytes(buf[2:2 + buf[1]])
        del buf[:2 + len(methods)]
        if 0 not in methods:
            return self._abort("socks5_bad_handshake", "the client does not offer 'no authentication' "
                               "(XEP-0065 requires it)", reply=b"\x05\xff")
        self.state = RelayState.REQUEST
        return [Send(to_client=True, data=b"\x05\x00")]

    def _request(self, buf: bytearray) -> list[Command]:
        if len(buf) < 5:
            return []
        if buf[0] != 5 or buf[1] != 1 or buf[3] != 3:
            return self._abort("socks5_bad_handshake", "not a CONNECT to a domain name (XEP-0065 §5.3.2)",
                               reply=b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00")
        end = 5 + buf[4] + 2
        if len(buf) < end:
            return []
        dst = bytes(buf[5:end - 2]).decode("ascii", "replace").lower()
        port = int.from_bytes(buf[end - 2:end], "big")
        del buf[:end]
        self.dst_hash = dst
        out: list[Command] = []
        if not _HASH.match(dst) or port != 0:
            out.append(self._anomaly("socks5_bad_handshake", "a CONNECT whose address is not a 40-hex hash "
                                     "with port 0", dst=dst, port=port))
        self.offer = self.transfers.lookup_bytestream(dst) if _HASH.match(dst) else None
        if self.offer is None or not self.offer.streamhosts:
            return out + self._abort("unexpected_bytestream", "a SOCKS5 bytestream that no XMPP offer "
                                     "announced", dst_hash=dst, reply=b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
        self.state = RelayState.WAIT_UPSTREAM
        self._candidates = list(self.offer.streamhosts[1:])
        sh = self.offer.streamhosts[0]
        return out + [ConnectUpstream(sh.host, sh.port, sh.jid)]

    def _up_method(self, buf: bytearray) -> list[Command]:
        if len(buf) < 2:
            return []
        if bytes(buf[:2]) != b"\x05\x00":
            return self._abort("socks5_bad_handshake", f"the streamhost refused: {bytes(buf[:2]).hex()}")
        del buf[:2]
        self.state = RelayState.UP_REPLY
        return [Send(to_client=False, data=connect_request(self.dst_hash or ""))]

    def _up_reply(self, buf: bytearray) -> list[Command]:
        if len(buf) < 5:
            return []
        atyp = buf[3]
        length = {1: 4 + 4 + 2, 4: 4 + 16 + 2, 3: 5 + buf[4] + 2}.get(atyp)
        if length is None:
            return self._abort("socks5_bad_handshake", f"the streamhost replied with ATYP {atyp}")
        if len(buf) < length:
            return []
        reply = bytes(buf[:length])
        del buf[:length]
        if reply[1] != 0:
            return self._abort("bytestream_upstream_failed", f"the streamhost answered CONNECT with {reply[1]}",
                               reply=reply if self._client_handshake else b"")
        self.state = RelayState.DATA
        return [Send(to_client=True, data=reply)] if self._client_handshake else []

    # --- data: one HeldTransfer ----------------------------------------------------------------

    def _file_bytes(self, from_client: bool, data: bytes) -> list[Command]:
        if not data:
            return []
        if self.transfer is None:
            self.transfer = self._held_transfer(sender_is_client=from_client)
        transfer = self.transfer
        if from_client != transfer.sender_is_client:
            return []                                        # the receiver has nothing to say; dropped
        if transfer.state is not HoldState.RECEIVING:
            # The file was complete (out for inspection or released): the tracker would drop these as an overrun,
            # but a bytestream carries one file of the announced size, so more is a reason to end it.
            return self._abort("socks5_more_than_announced", "bytes after the announced size; closed")
        out = transfer.append(data)
        if transfer.complete:
            out += transfer.inspect()
        return out

    def _held_transfer(self, sender_is_client: bool) -> HeldTransfer:
        offer = self.offer
        return HeldTransfer(
            f"s5b:{self.dst_hash}:{next(_ids)}", self._file_context(), sender_is_client=sender_is_client,
            kind="socks5", max_bytes=self.limits.max_held_bytes, size=offer.size if offer else None,
            name=offer.name if offer else "", claimed_mime=offer.content_type if offer else "",
            owns_connection=True, tell=self._tell)

    def _tell(self, transfer: HeldTransfer, notice: Notice) -> list[Command]:
        """A notice in XMPP's terms: a Notify for the XMPP connection that announced the bytestream, for the
        person inside. The outside sender is out of reach (see the module docstring)."""
        if self.offer is None or not notice.party.inside:
            return []
        return [Notify(self.offer.context.connection_id, "xmpp", notice.text, transfer.context, notice.decision,
                       details=(("file", {"name": self.offer.name}),))]

    # --- helpers -------------------------------------------------------------------------------

    def _file_context(self) -> ChatContext:
        # the file is the offer's: sender, receivers and addresses of the XMPP connection that announced it
        return self.offer.context.with_(transfer_mechanism="socks5") if self.offer else self.context

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly:
        return Anomaly(self._file_context(), kind, detail, data=data)

    def _ends_on_close(self, out: list[Command]) -> list[Command]:
        """A Close (the tracker's or ours) ends the connection: nothing more to relay or decide."""
        if any(isinstance(c, Close) for c in out):
            self.state = RelayState.DONE
        return out

    def _abort(self, kind: str, detail: str, reply: bytes = b"", **data: Any) -> list[Command]:
        self.state = RelayState.DONE
        if self.transfer is not None and self.transfer.holding:
            return self.transfer.abandon(kind, detail, **data)  # its held bytes discarded; anomaly and Close
        out: list[Command] = [self._anomaly(kind, detail, **data)]
        if reply:
            out.append(Send(to_client=True, data=reply))
        return out + [Close(kind)]
