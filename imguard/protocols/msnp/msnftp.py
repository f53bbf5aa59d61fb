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

The lines cross as they come. After TFR the sender's blocks are held (never forwarded) up to the FIL
size, bounded by `msnp_max_held_bytes`; when the last byte is in, the session returns
`InspectFile(transfer_id="msnftp:<offer>", mechanism "msnftp")` and answers the sender itself with
`BYE 16777989` so its client finishes (the receiver's own BYE is swallowed later). Allowed: the held
blocks go to the receiver byte-exact. Blocked: the receiver gets a cancel block (0x01 0x00 0x00) and the
connection closes; a Record with `imguard.notify` (connection_id of the switchboard that carried the
invitation, text) asks the carrier to call `MsnpSession.notice(text)` there. The sender closing early
gives a truncated inspection; `USR` with another AuthCookie than the invitation's is an anomaly (the
real sender refuses it; we let it do so). `offer` None: an unannounced connection, closed at once.

What the carrier does: on a new connection to (ip, port), `offer = find_msnftp_offer(transfers, ip,
port)`; `DirectMsnftpSession(checker, transfers, ctx, offer)`; carry Send/Record/Close; answer
InspectFile with Pipeline.check_file; route a Record with `imguard.notify` to the MsnpSession whose
`context.connection_id` is `notify.connection_id` (`session.notice(text)`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from imguard import alerts
from imguard.model import ChatContext, Decision, FileReport
from imguard.protocols.base import Close, Command, InspectFile, Record, Send, block_words
from imguard.protocols.msnp.decoder import MsnpLimits
from imguard.protocols.msnp.session import MSNFTP_KIND, MsnftpOffer

CANCEL_BLOCK = b"\x01\x00\x00"
BYE_OK = b"BYE 16777989\r\n"
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


class DirectMsnftpSession:
    """One MSNFTP data connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, offer: MsnftpOffer | None,
                 limits: MsnpLimits = MsnpLimits()):
        self.checker = checker
        self.transfers = transfers
        self.context = context
        self.offer = offer
        self.limits = limits
        self.closed = False
        self.receiver_is_client = offer.listener_is_sender if offer is not None else True
        self._lines = {True: bytearray(), False: bytearray()}
        self.size: int | None = None        # from FIL
        self.streaming = False              # TFR seen: the sender's bytes are blocks now
        self._blocks = bytearray()          # unparsed block bytes from the sender
        self.held: list[bytes] = []         # raw blocks, for byte-exact release
        self.data = bytearray()
        self.state = "lines"                # lines, receiving, inspecting, released, dropped
        self.answered = False               # we sent the sender its BYE
        self.sender_closed = False
        self.receiver_closed = False
        self.transfer_id = f"msnftp:{offer.offer_id}" if offer is not None else ""
        if offer is not None:
            self.file_context = offer.context.with_(
                protocol="msnp", transfer_mechanism="msnftp",
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
            return self._from_receiver(data)
        return self._from_sender(data)

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        if transfer_id != self.transfer_id or self.state != "inspecting" or self.closed:
            return []
        held, self.held, self.data = self.held, [], bytearray()
        if decision.blocked:
            self.state = "dropped"
            self.closed = True
            action, why = block_words(decision)
            text = decision.notice or (f"The file {self.offer.name!r} from {self.offer.sender} to "
                                       f"{self.offer.receiver} was {action} by imguard: {why}")
            return [Send(to_client=self.receiver_is_client, data=CANCEL_BLOCK),
                    Record(alerts.notify_event(self.offer.context.connection_id, "msnp", self.file_context, text, decision,
                                        msnftp=self.offer.to_dict())),
                    Close(f"MSNFTP file {decision.action}")]
        self.state = "released"
        if self.receiver_closed:
            self.closed = True
            return [self._anomaly("msnftp_receiver_gone", "the receiver closed before the verdict; nothing "
                                  "delivered"), Close("MSNFTP receiver gone")]
        out: list[Command] = [Send(to_client=self.receiver_is_client, data=b"".join(held))]
        if decision.notice:
            out.append(Record(alerts.notify_event(self.offer.context.connection_id, "msnp", self.file_context, decision.notice,
                                           decision, msnftp=self.offer.to_dict())))
        if self.sender_closed:
            self.closed = True
            out.append(Close("MSNFTP transfer done"))
        return out

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self.closed or self.offer is None:
            return []
        if from_client != self.receiver_is_client:
            self.sender_closed = True
            if self.state == "receiving":
                if not self.data:
                    self.closed = True
                    return [self._anomaly("msnftp_empty", "the sender closed before sending any data"),
                            Close("empty MSNFTP transfer")]
                return self._inspect(truncated=True)
        if from_client == self.receiver_is_client:
            self.receiver_closed = True
        if self.state == "inspecting":
            return []                       # the verdict decides what the receiver gets, then closes
        self.closed = True
        return [Close("MSNFTP peer closed")]

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
                    self.closed = True
                    return out + [self._anomaly("line_too_long", "an MSNFTP line over 1024 bytes"),
                                  Close("MSNFTP line too long")]
                break
            line = bytes(buf[:end + 1])
            del buf[:end + 1]
            words = line.decode("utf-8", "replace").split()
            verb = words[0].upper() if words else ""
            if verb == "USR" and len(words) >= 3 and self.offer.auth_cookie and words[2] != self.offer.auth_cookie:
                out.append(self._anomaly("msnftp_bad_cookie", "USR with another AuthCookie than the invitation's",
                                         passport=words[1]))
            if verb == "TFR":
                self.streaming = True
                self.state = "receiving"
            if verb == "BYE" and self.answered:
                continue                    # the sender had our BYE already
            if verb == "CCL" and self.state == "inspecting":
                continue
            forward += line
        if forward:
            out.insert(0, Send(to_client=not self.receiver_is_client, data=bytes(forward)))
        return out

    # --- sender -> receiver: lines, then blocks ----------------------------------------------------

    def _from_sender(self, data: bytes) -> list[Command]:
        out: list[Command] = []
        if not self.streaming:
            buf = self._lines[False]
            buf += data
            forward = bytearray()
            while True:
                end = buf.find(b"\n")
                if end < 0:
                    if len(buf) > MAX_LINE:
                        self.closed = True
                        return [self._anomaly("line_too_long", "an MSNFTP line over 1024 bytes"),
                                Close("MSNFTP line too long")]
                    break
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                words = line.decode("utf-8", "replace").split()
                if words and words[0].upper() == "FIL":
                    size = int(words[1]) if len(words) >= 2 and words[1].isdigit() else None
                    if size is None:
                        self.closed = True
                        return [self._anomaly("msnftp_bad_size", f"FIL {line[:40]!r}"), Close("MSNFTP bad FIL")]
                    if self.offer.size is not None and size != self.offer.size:
                        out.append(self._anomaly("msnftp_size_mismatch", f"FIL {size}, the invitation said "
                                                 f"{self.offer.size}"))
                    if size > self.limits.msnp_max_held_bytes:
                        return out + self._too_large(size)
                    self.size = size
                forward += line
            if forward:
                out.insert(0, Send(to_client=self.receiver_is_client, data=bytes(forward)))
            return [c for c in out if c is not None]
        if self.state != "receiving":
            if data:
                out.append(self._anomaly("msnftp_overrun", f"{len(data)} bytes from the sender after the file "
                                         "was complete; dropped"))
            return [c for c in out if c is not None]
        self._blocks += data
        while len(self._blocks) >= 3:
            kind, length = self._blocks[0], self._blocks[1] | (self._blocks[2] << 8)
            if kind == 1:
                self.state = "dropped"
                self.closed = True
                out += [self._anomaly("msnftp_cancelled", "the sender cancelled the transfer",
                                      bytes_held=len(self.data)),
                        Send(to_client=self.receiver_is_client, data=CANCEL_BLOCK), Close("MSNFTP cancelled")]
                return out
            if kind != 0:
                self.closed = True
                return out + [self._anomaly("msnftp_bad_block", f"a data block with header byte {kind}"),
                              Close("MSNFTP bad block")]
            if len(self._blocks) < 3 + length:
                break
            block = bytes(self._blocks[:3 + length])
            del self._blocks[:3 + length]
            self.held.append(block)
            self.data += block[3:]
            if self.size is not None and len(self.data) > self.size:
                out.append(self._anomaly("msnftp_overrun", f"{len(self.data) - self.size} bytes past FIL {self.size}"))
            if len(self.data) > self.limits.msnp_max_held_bytes:
                return out + self._too_large(len(self.data))
            if self.size is not None and len(self.data) >= self.size:
                self.answered = True
                out.append(Send(to_client=not self.receiver_is_client, data=BYE_OK))
                out += self._inspect(truncated=False)
                if self._blocks:
                    out.append(self._anomaly("msnftp_overrun", f"{len(self._blocks)} bytes after the last block; "
                                             "dropped"))
                    self._blocks.clear()
                break
        return [c for c in out if c is not None]

    # --- internals ----------------------------------------------------------------------------------

    def _inspect(self, truncated: bool) -> list[Command]:
        self.state = "inspecting"
        return [InspectFile(transfer_id=self.transfer_id, data=bytes(self.data), context=self.file_context,
                            name=self.offer.name, truncated=truncated)]

    def _too_large(self, total: int) -> list[Command]:
        self.closed = True
        self.state = "dropped"
        self.held, self.data = [], bytearray()
        text = (f"imguard: the file {self.offer.name!r} to {self.offer.receiver} was stopped: it is larger than "
                f"{self.limits.msnp_max_held_bytes} bytes and could not be inspected")
        return [self._anomaly("msnftp_too_large", text, bytes_seen=total),
                Send(to_client=self.receiver_is_client, data=CANCEL_BLOCK),
                Record(alerts.notify_event(self.offer.context.connection_id, "msnp", self.file_context, text,
                                    msnftp=self.offer.to_dict())),
                Close("MSNFTP file too large to inspect")]

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Record:
        if self.offer is not None:
            data.setdefault("offer", self.offer.offer_id)
        return Record(alerts.anomaly_event(self.file_context, kind, detail, **data))

    def _unannounced(self, size: int) -> list[Command]:
        self.closed = True
        return [Record(alerts.anomaly_event(self.file_context, "msnftp_unannounced",
                                            "an MSNFTP data connection that no invitation announced",
                                            first_bytes=size)), Close("unannounced MSNFTP connection")]
