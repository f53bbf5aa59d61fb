"""MSNFTP: the direct file-transfer connection of an accepted `text/x-msmsgsinvite` invitation, held
until inspection and policy decide. Sans-io.

The MsnpSession that sees the ACCEPT with `IP-Address`/`Port`/`AuthCookie` stores an `MsnftpOffer` in
the shared ExpectedTransfers table (kind "msnftp", key (ip, port)). The carrier that sees a new TCP
connection to such an address looks it up (`find_msnftp_offer`) and puts a `DirectMsnftpSession` on it:

    receiver                                   sender (listens, normally)
      VER MSNFTP\\r\\n              ->
                                   <-          VER MSNFTP\\r\\n
      USR <passport> <AuthCookie>\\r\\n ->
                                   <-          FIL <size>\\r\\n
      TFR\\r\\n                     ->
                                   <-          [0x00 len_lo len_hi] + data, ... (each block <= 2045 bytes;
                                               first byte 0x01 = the sender cancels)
      BYE 16777989\\r\\n            ->          (the receiver got everything)

The session keeps only the framing; the file itself is one `HeldTransfer` (imguard.files.tracker) per
connection, made at TFR (kind "msnftp", the FIL size, bounded by `msnp_max_held_bytes`), which says when the
held bytes are released or dropped and what a close does. The lines cross as they come. After TFR each of
the sender's blocks is appended to the HeldTransfer: its data is the file, the whole raw block (header and
data) is what crosses on release, so an allowed file reaches the receiver byte-exact. When the last byte of
the FIL size is in, the session answers the sender itself with `BYE 16777989` so its client finishes (the
receiver's own BYE is swallowed later), then returns the tracker's
`InspectFile(transfer_id="msnftp:<offer>")` (the BYE comes first: a gateway pauses the connection at an
InspectFile). `file_verdict` is the tracker's verdict. What the tracker is told in MSNFTP's terms: the
receiver is refused with a cancel block (0x01 0x00 0x00); who is told and the words are the tracker's tell
rule, delivered here (`_tell`): the person inside (the sender of an outbound file; the receiver of an inbound
one: the invitation came from the switchboard's side, `offer.outbound` False, origin server) with a `Notify`
for the switchboard that carried the invitation (its `MsnpSession.notice(text)`); the outside sender of an
inbound file with MSNFTP's receiver cancel (`CCL`) when the file is cut before it is whole. A blocked file's
sender had our BYE already (it comes with the last byte, before the verdict): nothing on this connection can
take it back, and its switchboard is not one a side connection's Notify reaches. Which leg sends the file comes from the
offer too (the listener is the sender unless Sender-Connect), so both directions are the same code. A FIL
over the bound, a transfer that runs past it, or blocks the session cannot follow cut the file; a sender's
cancel block abandons it (msnftp_cancelled), and so does the receiver leaving before the file is whole (the
sender must not get a BYE saying it arrived). The sender closing early gives a truncated inspection; `USR`
with another AuthCookie than the invitation's is an anomaly (the real sender refuses it; we let it do so).
`offer` None: an unannounced connection, closed at once.

What the carrier does: on a new connection to (ip, port), `offer = find_msnftp_offer(transfers, ip,
port)`; `DirectMsnftpSession(checker, transfers, ctx, offer)`; carry Send/Anomaly/Notify/Close; answer
InspectFile with Pipeline.check_file.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from imguard.files.tracker import ConnectionHolds, HeldTransfer, HoldState, Notice, Party
from imguard.model import FROM_CLIENT, FROM_SERVER, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Close, Command, Notify, Send, StreamSession
from imguard.protocols.framing import is_number
from imguard.protocols.msnp.decoder import MsnpLimits
from imguard.protocols.msnp.session import MSNFTP_KIND, MsnftpOffer

CANCEL_BLOCK = b"\x01\x00\x00"
BYE_OK = b"BYE 16777989\r\n"
CANCEL_LINE = b"CCL\r\n"                 # the receiver cancels (to the sender)
MAX_LINE = 1024


def find_msnftp_offer(transfers, host: str, port: int) -> MsnftpOffer | None:
    """For the carrier: the accepted invitation behind a new connection to host:port (left in place:
    an offer registers several addresses, and the receiver may try each)."""
    if transfers is None:
        return None
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return transfers.get((host, int(port)), kind=MSNFTP_KIND)


class DirectMsnftpSession(StreamSession):
    """One MSNFTP data connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, offer: MsnftpOffer | None,
                 limits: MsnpLimits = MsnpLimits()):
        self.checker = checker
        self.transfers = transfers
        self.context = context
        self.offer = offer
        self.limits = limits
        self.closed = False                 # this session has ended the connection (returned a Close)
        self.receiver_is_client = offer.listener_is_sender if offer is not None else True
        self._lines = {True: bytearray(), False: bytearray()}
        self.announced_size: int | None = None  # from FIL
        self._blocks = bytearray()          # unparsed block bytes from the sender
        self.answered_sender = False        # we sent the sender its BYE (the receiver's own is swallowed)
        # The file, from TFR on: the sender's bytes are blocks once it exists.
        self.transfer: HeldTransfer | None = None
        self.transfer_id = f"msnftp:{offer.offer_id}" if offer is not None else ""
        if offer is not None:
            self.file_context = offer.context.with_(
                protocol="msnp", transfer_mechanism="msnftp", origin=FROM_CLIENT if offer.outbound else FROM_SERVER,
                client_address=context.client_address or offer.context.client_address,
                server_address=context.server_address or offer.context.server_address,
                connection_id=context.connection_id or offer.context.connection_id)
        else:
            self.file_context = context.with_(protocol="msnp", transfer_mechanism="msnftp")

    def start(self) -> list[Command]:
        """Optional: what to do when the connection opens (an unannounced one is closed at once)."""
        return self._unannounced(0) if self.offer is None else []

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        if self.offer is None:
            return self._unannounced(len(data))
        if from_client == self.receiver_is_client:
            return self._ended(self._from_receiver(data))
        return self._ended(self._from_sender(data))

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        if self.transfer is None or transfer_id != self.transfer.transfer_id:
            return []
        return self._ended(self.transfer.verdict(decision))

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self.closed or self.offer is None:
            return []
        transfer = self.transfer
        if transfer is None:                # still in the lines: no file yet
            return self._ended([Close("MSNFTP peer closed")])
        if from_client != self.receiver_is_client:
            return self._ended(transfer.sender_closed())
        out = transfer.receiver_closed()
        if transfer.state is HoldState.RECEIVING:
            # Before the file is whole the receiver's leaving ends it: holding on would end in our BYE telling
            # the sender a file arrived that nobody received.
            out += transfer.abandon("msnftp_receiver_gone", "the receiver closed before the file was whole; "
                                    "nothing delivered")
        return self._ended(out)

    # --- receiver -> sender: lines -----------------------------------------------------------------

    def _from_receiver(self, data: bytes) -> list[Command]:
        out: list[Command] = []
        forward = bytearray()
        buf = self._lines[True]
        buf += data
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_LINE:
                    return out + self._fail("line_too_long", "an MSNFTP line over 1024 bytes", "MSNFTP line too long")
                break
            line = bytes(buf[:end + 1])
            del buf[:end + 1]
            words = line.decode("utf-8", "replace").split()
            verb = words[0].upper() if words else ""
            if verb == "USR" and len(words) >= 3 and self.offer.auth_cookie and words[2] != self.offer.auth_cookie:
                out.append(self._anomaly("msnftp_bad_cookie", "USR with another AuthCookie than the invitation's",
                                         passport=words[1]))
            if verb == "TFR" and self.transfer is None:
                self.transfer = self._hold()
            if verb == "BYE" and self.answered_sender:
                continue                    # the sender had our BYE already
            if verb == "CCL" and self.transfer is not None and self.transfer.state is HoldState.INSPECTING:
                continue
            forward += line
        if forward:
            out.insert(0, Send(to_client=not self.receiver_is_client, data=bytes(forward)))
        return out

    # --- sender -> receiver: lines, then blocks ----------------------------------------------------

    def _from_sender(self, data: bytes) -> list[Command]:
        if self.transfer is None:
            return self._sender_lines(data)
        transfer = self.transfer
        if transfer.state is not HoldState.RECEIVING:
            return transfer.append(data)    # after the file was complete: an overrun, dropped
        out: list[Command] = []
        self._blocks += data
        while len(self._blocks) >= 3:
            kind, length = self._blocks[0], self._blocks[1] | (self._blocks[2] << 8)
            if kind == 1:
                return out + transfer.abandon("msnftp_cancelled", "the sender cancelled the transfer")
            if kind != 0:
                return out + transfer.cut("msnftp_bad_block", f"a data block with header byte {kind}")
            if len(self._blocks) < 3 + length:
                break
            block = bytes(self._blocks[:3 + length])
            del self._blocks[:3 + length]
            out += transfer.append(block[3:], head=block[:3])     # the header held once, with its bytes
            if transfer.state is not HoldState.RECEIVING:
                return out                  # cut: too large to hold
            if transfer.size is not None and transfer.received > transfer.size:
                out.append(self._anomaly("msnftp_overrun", f"{transfer.received - transfer.size} bytes past FIL "
                                         f"{transfer.size}"))
            if transfer.complete:
                self.answered_sender = True
                out.append(Send(to_client=not self.receiver_is_client, data=BYE_OK))
                out += transfer.inspect()
                if self._blocks:            # nothing may follow the last block
                    out += transfer.append(bytes(self._blocks))
                    self._blocks.clear()
                break
        return out

    def _sender_lines(self, data: bytes) -> list[Command]:
        out: list[Command] = []
        buf = self._lines[False]
        buf += data
        forward = bytearray()
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_LINE:
                    return self._fail("line_too_long", "an MSNFTP line over 1024 bytes", "MSNFTP line too long")
                break
            line = bytes(buf[:end + 1])
            del buf[:end + 1]
            words = line.decode("utf-8", "replace").split()
            if words and words[0].upper() == "FIL":
                size = int(words[1]) if len(words) >= 2 and is_number(words[1]) else None
                if size is None:
                    return [self._anomaly("msnftp_bad_size", f"FIL {line[:40]!r}"), Close("MSNFTP bad FIL")]
                if self.offer.size is not None and size != self.offer.size:
                    out.append(self._anomaly("msnftp_size_mismatch", f"FIL {size}, the invitation said "
                                             f"{self.offer.size}"))
                self.announced_size = size
                if size > self.limits.msnp_max_held_bytes:
                    return out + self._refuse_announced(size)
            forward += line
        if forward:
            out.insert(0, Send(to_client=self.receiver_is_client, data=bytes(forward)))
        return out

    # --- the held file, in MSNFTP's terms -----------------------------------------------------------

    def _hold(self) -> HeldTransfer:
        # One file per connection (owns_connection): a stopped file ends the connection, and after the
        # release a close from either side is passed on. Each piece is held twice (its data for inspection,
        # its raw block for the release), and both count towards the holds, so the file's own bound
        # (max_bytes, payload only) is the only per-connection bound.
        return HeldTransfer(self.transfer_id, self.file_context, sender_is_client=not self.receiver_is_client,
                            kind="msnftp", max_bytes=self.limits.msnp_max_held_bytes, size=self.announced_size,
                            name=self.offer.name, receiver=self.offer.receiver, sender_name=self.offer.sender,
                            owns_connection=True, holds=ConnectionHolds(), refuse=self._cancel_receiver,
                            tell=self._tell,
                            event_data={"offer": self.offer.offer_id})

    def _cancel_receiver(self, transfer: HeldTransfer) -> list[Command]:
        """What the receiver gets instead of a stopped file: MSNFTP's cancel block (if it is still there)."""
        return [] if transfer.receiver_gone else [Send(to_client=self.receiver_is_client, data=CANCEL_BLOCK)]

    def _tell(self, transfer: HeldTransfer, notice: Notice) -> list[Command]:
        """A notice in MSNFTP's terms: for the person inside, a Notify for the switchboard that carried the
        invitation; for the outside sender, the receiver's cancel while it still waits for our BYE."""
        if notice.party is Party.OUTSIDE_SENDER:
            if self.answered_sender or transfer.sender_gone:
                return []
            return [Send(to_client=not self.receiver_is_client, data=CANCEL_LINE)]
        return [Notify(self.offer.context.connection_id, "msnp", notice.text, self.file_context, notice.decision,
                       (("msnftp", self.offer.to_dict()),))]

    def _refuse_announced(self, size: int) -> list[Command]:
        """A FIL over the bound: the file is cut before its first byte (the FIL does not cross)."""
        self.transfer = self._hold()
        return self.transfer.too_large(size)

    def _fail(self, kind: str, detail: str, reason: str) -> list[Command]:
        """Framing the session cannot follow ends the connection; a file being held ends with it."""
        transfer = self.transfer
        if transfer is not None and transfer.state is HoldState.RECEIVING:
            return transfer.cut(kind, detail)
        if transfer is not None and transfer.state is HoldState.INSPECTING:
            return transfer.abandon(kind, detail)
        return [self._anomaly(kind, detail), Close(reason)]

    # --- internals ----------------------------------------------------------------------------------

    def _ended(self, cmds: list[Command]) -> list[Command]:
        """The commands, noting whether they end the connection."""
        if any(isinstance(c, Close) for c in cmds):
            self.closed = True
        return cmds

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly:
        if self.offer is not None:
            data.setdefault("offer", self.offer.offer_id)
        return Anomaly(self.file_context, kind, detail, data=data)

    def _unannounced(self, size: int) -> list[Command]:
        self.closed = True
        return [Anomaly(self.file_context, "msnftp_unannounced",
                        "an MSNFTP data connection that no invitation announced", data={"first_bytes": size}),
                Close("unannounced MSNFTP connection")]
