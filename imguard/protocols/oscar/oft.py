"""OFT (OSCAR File Transfer): the peer connection of a SendFile rendezvous, held until inspection and
policy decide. Sans-io.

An OscarSession that sees a SendFile proposal stores an `OftOffer` in the shared ExpectedTransfers
table (kind "oft", keys: the cookie in hex, and (ip, port) for each announced address). The carrier
that sees a new TCP connection to such an address (or to the AOL proxy named in the offer) puts an
`OftSession` on it; `offer` may be None, in which case the session finds the offer by the cookie of
the first OFT header (or AOL proxy frame) and closes the connection if none announced it.

    sender                                  receiver          (either may be the TCP client:
      OFT2 0x0101 prompt (cookie, size, name) ->               stage 1 the receiver connects,
                                  <- OFT2 0x0202 ack           stage 2 the sender connects,
      <size bytes of file data>               ->               stage 3 both connect to the proxy)
                                  <- OFT2 0x0204 done
      (next prompt for the next file, or close)

The side that sends the prompt is the sender. The session keeps only the framing (headers, proxy frames,
which done header is ours); each file is its own `HeldTransfer` (imguard.files.tracker), made when the
receiver's ack (or resume ack) starts the file's bytes (kind "oft", the prompt's size, bounded by
`oscar_max_held_bytes`), which says when the held bytes are released or dropped and what a close does. The
sender's `size` bytes are appended to it (never forwarded); when the last one is in, the session answers the
sender itself with the done header (the prompt with type 0x0204, bytes received = size, received checksum =
the sender's checksum) so its client finishes, then returns the tracker's
`InspectFile(transfer_id="oft:<offer>:<n>")` (the done header first: a gateway pauses the connection at an
InspectFile); the receiver's own done is swallowed later. `file_verdict` is the tracker's verdict: allowed,
the held bytes go to the receiver; blocked, the connection closes (the receiver has nothing). Who is told and
the words are the tracker's tell rule; OFT's part (`_tell`) is the delivery: a `Notify` for the BOS connection
that carried the rendezvous (its `OscarSession.notice(text)`) for the person inside (the sender of an outbound
file; the receiver of an inbound one: the proposal came from the server's side, `offer.outbound` False, origin
server). The outside sender of an inbound file cannot be told: OFT's headers (prompt, ack, done, resume) have
no cancel, the done header for a whole file went before the verdict, and the rendezvous cancel belongs to the
BOS connection, which a side connection's Notify does not address. The prompt says which side sends, so both
directions are the same code. A prompt over the bound
cuts its file before a byte; the receiver leaving before a file is whole abandons it (the sender must not
get a done header saying it arrived). Several files: each prompt starts the next; the sender's bytes that
arrive while a file is being inspected wait in the buffer. AOL proxy frames (length (2) | 0x044A | type (2)
| ...) before the OFT headers cross unchanged. A resumed transfer (0x0205/0x0106/0x0207) is inspected as
truncated: only the part after the resume offset passed the gateway.

What the carrier does: on a new connection to (ip, port) for which `find_oft_offer(transfers,
host=ip, port=port)` is not None (or to the AOL proxy), `OftSession(checker, transfers, ctx, offer)`;
carry Send/Record/Anomaly/Notify/Close; answer InspectFile with Pipeline.check_file.
"""

from __future__ import annotations

import struct
from typing import Any

from imguard.files.tracker import ConnectionHolds, HeldTransfer, HoldState, Notice
from imguard.model import FROM_CLIENT, FROM_SERVER, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Close, Command, Notify, Send, StreamSession
from imguard.protocols.oscar.decoder import (OFT_ACK, OFT_DONE, OFT_PROMPT, OFT_RESUME, OFT_RESUME_ACK,
                                             PROXY_VERSION, OftHeader, OscarError, OscarLimits, parse_oft)
from imguard.protocols.oscar.session import OftOffer, find_oft_offer

MAX_OFT_HEADER = 8192


class OftSession(StreamSession):
    """One OFT connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, offer: OftOffer | None = None,
                 limits: OscarLimits = OscarLimits()):
        self.checker = checker
        self.transfers = transfers
        self.context = context
        self.offer = offer
        self.limits = limits
        self.closed = False                 # this session has ended the connection (returned a Close)
        self._buf = {True: bytearray(), False: bytearray()}
        self.sender_is_client: bool | None = None
        self.prompt: OftHeader | None = None
        self.file_index = 0
        self.resume_offset = 0
        self.dones_owed = 0                 # receiver's done headers to swallow (we answered the sender)
        # The current file, from its ack until the next prompt (None: between files, or none yet).
        self.transfer: HeldTransfer | None = None
        self.holds = ConnectionHolds()      # the files of this connection, one at a time

    def _file_context(self) -> ChatContext:
        base = self.offer.context if self.offer is not None else ChatContext()
        origin = "" if self.offer is None else FROM_CLIENT if self.offer.outbound else FROM_SERVER
        return base.with_(protocol="oscar", transfer_mechanism="oft", origin=origin,
                          client_address=self.context.client_address or base.client_address,
                          server_address=self.context.server_address or base.server_address,
                          connection_id=self.context.connection_id or base.connection_id)

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        self._buf[from_client] += data
        out: list[Command] = []
        self._process(out, from_client)
        return out

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        transfer = self.transfer
        if transfer is None or transfer_id != transfer.transfer_id:
            return []
        out: list[Command] = []
        self._add(out, transfer.verdict(decision))
        if transfer.state is HoldState.RELEASED:
            self._process(out, self.sender_is_client)   # the next file's prompt may be waiting in the buffer
        return out

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self.closed:
            return []
        transfer = self.transfer
        out: list[Command] = []
        if transfer is None:                            # no file under way
            self._add(out, [Close("OFT peer closed")])
        elif from_client == self.sender_is_client:
            self._add(out, transfer.sender_closed())
        else:
            self._add(out, transfer.receiver_closed())
            if transfer.state is HoldState.RECEIVING:
                # Before the file is whole the receiver's leaving ends it: holding on would end in our done
                # header telling the sender a file arrived that nobody received.
                self._add(out, transfer.abandon("oft_receiver_gone", "the receiver closed before the file was "
                                                "whole; nothing delivered"))
        return out

    # --- frames -------------------------------------------------------------------------------------

    def _process(self, out: list[Command], side: bool) -> None:
        buf = self._buf[side]
        while buf and not self.closed:
            transfer = self.transfer
            if side == self.sender_is_client and transfer is not None and transfer.holding:
                if transfer.state is HoldState.INSPECTING:
                    return                              # the next file waits for this one's verdict
                take = min(transfer.size - transfer.received, len(buf))
                self._add(out, transfer.append(bytes(buf[:take])))
                del buf[:take]
                if transfer.state is HoldState.RECEIVING and transfer.received >= transfer.size:
                    self._complete(out)
                continue
            if len(buf) < 6:
                return
            if buf[:3] == b"OFT":
                length = struct.unpack_from(">H", buf, 4)[0]
                if not 192 <= length <= MAX_OFT_HEADER:
                    out += self._fatal("bad_oft_header", f"an OFT header length of {length}")
                    return
                if len(buf) < length:
                    return
                raw = bytes(buf[:length])
                del buf[:length]
                try:
                    header = parse_oft(raw)
                except OscarError as e:
                    out += self._fatal(e.kind, e.detail)
                    return
                self._header(out, side, header)
            elif struct.unpack_from(">H", buf, 2)[0] == PROXY_VERSION:
                length = struct.unpack_from(">H", buf, 0)[0] + 2
                if length > MAX_OFT_HEADER:
                    out += self._fatal("bad_proxy_frame", f"an AOL proxy frame of {length} bytes")
                    return
                if len(buf) < length:
                    return
                frame = bytes(buf[:length])
                del buf[:length]
                self._proxy_frame(out, frame)
                if not self.closed:
                    out.append(Send(to_client=not side, data=frame))
            else:
                out += self._fatal("bad_oft_header", f"{bytes(buf[:8])!r} where an OFT header was expected")
                return

    def _proxy_frame(self, out: list[Command], frame: bytes) -> None:
        """Init-send (2) and init-recv (4) frames name the cookie: find the offer before any file byte."""
        ftype = struct.unpack_from(">H", frame, 4)[0]
        if ftype not in (2, 4) or self.offer is not None or len(frame) < 13:
            return
        n = frame[12]
        pos = 13 + n + (2 if ftype == 4 else 0)
        cookie = frame[pos:pos + 8]
        if len(cookie) == 8:
            self.offer = find_oft_offer(self.transfers, cookie=cookie)
            if self.offer is None:
                out += self._unannounced()

    def _header(self, out: list[Command], side: bool, h: OftHeader) -> None:
        if self.offer is None or self.offer.cookie != h.cookie.hex():
            found = find_oft_offer(self.transfers, cookie=h.cookie)
            if found is None:
                out += self._unannounced()
                return
            self.offer = found
        forward = True
        if h.type == OFT_PROMPT:
            if self.sender_is_client is None:
                self.sender_is_client = side
            if side != self.sender_is_client:
                out.append(self._anomaly("oft_unexpected", "a prompt from the receiving side"))
            else:
                self.prompt = h
                self.file_index += 1
                self.resume_offset = 0
                self.transfer = None                    # the previous file was released: this one is next
                if h.size > self.limits.oscar_max_held_bytes:
                    out += self._refuse_announced(h)
                    return
        elif h.type == OFT_ACK and side != self.sender_is_client and self.prompt is not None:
            out.append(Send(to_client=not side, data=h.raw))
            self._start_data(out, 0)
            return
        elif h.type == OFT_RESUME and side != self.sender_is_client:
            self.resume_offset = min(h.bytes_received, self.prompt.size if self.prompt else 0)
        elif h.type == OFT_RESUME_ACK and side != self.sender_is_client and self.prompt is not None:
            out.append(Send(to_client=not side, data=h.raw))
            self._start_data(out, self.resume_offset)
            return
        elif h.type == OFT_DONE and side != self.sender_is_client and self.dones_owed:
            self.dones_owed -= 1
            forward = False                             # the sender had ours
        if forward:
            out.append(Send(to_client=not side, data=h.raw))

    def _start_data(self, out: list[Command], offset: int) -> None:
        """The receiver's ack: the prompt's file (from `offset`, resumed) comes now, held. A second ack for the
        same prompt starts nothing."""
        if self.transfer is None:
            self.transfer = self._hold(self.prompt, size=self.prompt.size - offset)
            if self.transfer.size <= 0:
                self._complete(out)
        self._process(out, self.sender_is_client)

    def _complete(self, out: list[Command]) -> None:
        prompt = self.prompt
        done = prompt.with_type(OFT_DONE, bytes_received=prompt.size, received_checksum=prompt.checksum)
        out.append(Send(to_client=self.sender_is_client, data=done))
        self.dones_owed += 1
        out += self.transfer.inspect(truncated=self.resume_offset > 0)

    # --- the held file, in OFT's terms --------------------------------------------------------------

    def _hold(self, prompt: OftHeader, size: int) -> HeldTransfer:
        # owns_connection=True although the connection may carry several files: its close rule is the
        # connection's. A file stopped in any way (blocked, cut, abandoned) ends the connection, as a blocked
        # file always has: the receiver has nothing, the sender learns it through the notice. A released file
        # closes nothing by itself (only when a side has closed), so the next prompt can follow; until then a
        # close from either side is passed on. `size` is what crosses this connection (after a resume offset).
        return HeldTransfer(f"oft:{self.offer.offer_id}:{self.file_index}", self._file_context(),
                            sender_is_client=bool(self.sender_is_client), kind="oft",
                            max_bytes=self.limits.oscar_max_held_bytes, size=size,
                            name=prompt.name or self.offer.name, receiver=self.offer.receiver,
                            sender_name=self.offer.sender, owns_connection=True, holds=self.holds, tell=self._tell,
                            event_data={"offer": self.offer.offer_id})

    def _tell(self, transfer: HeldTransfer, notice: Notice) -> list[Command]:
        """A notice in OFT's terms: a Notify for the BOS connection that carried the rendezvous, for the person
        inside. The outside sender is out of reach (see the module docstring)."""
        if not notice.party.inside:
            return []
        return [Notify(self.offer.context.connection_id, "oscar", notice.text, transfer.context, notice.decision,
                       (("oft", self.offer.to_dict()),))]

    def _refuse_announced(self, prompt: OftHeader) -> list[Command]:
        """A prompt over the bound: its file is cut before its first byte (the prompt does not cross)."""
        self.transfer = self._hold(prompt, size=prompt.size)
        return self._ended(self.transfer.too_large(prompt.size, size=prompt.size))

    # --- internals ----------------------------------------------------------------------------------

    def _add(self, out: list[Command], cmds: list[Command]) -> None:
        out += self._ended(cmds)

    def _ended(self, cmds: list[Command]) -> list[Command]:
        """The commands, noting whether they end the connection."""
        if any(isinstance(c, Close) for c in cmds):
            self.closed = True
        return cmds

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly:
        if self.offer is not None:
            data.setdefault("offer", self.offer.offer_id)
        return Anomaly(self._file_context(), kind, detail, data=data)

    def _fatal(self, kind: str, detail: str) -> list[Command]:
        """Framing the session cannot follow ends the connection; a file being held ends with it."""
        transfer = self.transfer
        if transfer is not None and transfer.state is HoldState.RECEIVING:
            return self._ended(transfer.cut(kind, detail))
        if transfer is not None and transfer.state is HoldState.INSPECTING:
            return self._ended(transfer.abandon(kind, detail))
        self.closed = True
        return [self._anomaly(kind, detail), Close(f"OFT: {kind}")]

    def _unannounced(self) -> list[Command]:
        transfer = self.transfer
        if transfer is not None and transfer.holding:   # another cookie in the middle of a file
            return self._fatal("oft_unannounced", "an OFT header whose cookie no rendezvous announced")
        self.closed = True
        return [Anomaly(self.context.with_(protocol="oscar", transfer_mechanism="oft"), "oft_unannounced",
                        "an OFT connection whose cookie no rendezvous announced"), Close("unannounced OFT connection")]
