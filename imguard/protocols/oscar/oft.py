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

The side that sends the prompt is the sender. After the receiver's ack, the sender's `size` bytes are
held (never forwarded); when the last one is in, the session returns `InspectFile(transfer_id=
"oft:<offer>:<n>", mechanism "oft")` and answers the sender itself with the done header (the prompt
with type 0x0204, bytes received = size, received checksum = the sender's checksum) so its client
finishes; the receiver's own done is swallowed later. Allowed: the held bytes go to the receiver.
Blocked: the connection closes (the receiver has nothing) and a Record with `imguard.notify`
(connection_id of the BOS connection that carried the rendezvous, text) asks the carrier to call
`OscarSession.notice(text)` there. Several files: each prompt starts the next; the sender's bytes
that arrive while a file is being inspected wait in the buffer. AOL proxy frames (length (2) |
0x044A | type (2) | ...) before the OFT headers cross unchanged. A resumed transfer (0x0205/0x0106/
0x0207) is inspected as truncated: only the part after the resume offset passed the gateway.

What the carrier does: on a new connection to (ip, port) for which `find_oft_offer(transfers,
host=ip, port=port)` is not None (or to the AOL proxy), `OftSession(checker, transfers, ctx, offer)`;
carry Send/Record/Close; answer InspectFile with Pipeline.check_file; route a Record with
`imguard.notify` to the OscarSession whose `context.connection_id` is `notify.connection_id`.
"""

from __future__ import annotations

import struct
from typing import Any

from imguard import alerts
from imguard.model import ChatContext, Decision, FileReport
from imguard.protocols.base import Close, Command, InspectFile, Record, Send, block_words
from imguard.protocols.oscar.decoder import (OFT_ACK, OFT_DONE, OFT_PROMPT, OFT_RESUME, OFT_RESUME_ACK,
                                             PROXY_VERSION, OftHeader, OscarError, OscarLimits, parse_oft)
from imguard.protocols.oscar.session import OftOffer, find_oft_offer

MAX_OFT_HEADER = 8192


class OftSession:
    """One OFT connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, offer: OftOffer | None = None,
                 limits: OscarLimits = OscarLimits()):
        self.checker = checker
        self.transfers = transfers
        self.context = context
        self.offer = offer
        self.limits = limits
        self.closed = False
        self._buf = {True: bytearray(), False: bytearray()}
        self.sender_is_client: bool | None = None
        self.prompt: OftHeader | None = None
        self.file_index = 0
        self.remaining = 0                  # file bytes still expected from the sender
        self.in_data = False
        self.resume_offset = 0
        self.held = bytearray()
        self.inspecting = False
        self.dones_owed = 0                 # receiver's done headers to swallow (we answered the sender)
        self.sender_closed = False
        self.receiver_closed = False
        self.transfer_id = ""

    def _file_context(self) -> ChatContext:
        base = self.offer.context if self.offer is not None else ChatContext()
        return base.with_(protocol="oscar", transfer_mechanism="oft",
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
        if transfer_id != self.transfer_id or not self.inspecting or self.closed:
            return []
        self.inspecting = False
        data, self.held = bytes(self.held), bytearray()
        receiver_is_client = not self.sender_is_client
        if decision.blocked:
            self.closed = True
            action, why = block_words(decision)
            name = self.prompt.name if self.prompt else self.offer.name
            text = decision.notice or (f"The file {name!r} from {self.offer.sender} to {self.offer.receiver} was "
                                       f"{action} by imguard: {why}")
            return [Record(alerts.notify_event(self.offer.context.connection_id, "oscar", self._file_context(), text, decision,
                                        oft=self.offer.to_dict())), Close(f"OFT file {decision.action}")]
        if self.receiver_closed:
            self.closed = True
            return [self._anomaly("oft_receiver_gone", "the receiver closed before the verdict; nothing delivered"),
                    Close("OFT receiver gone")]
        out: list[Command] = [Send(to_client=receiver_is_client, data=data)]
        if decision.notice:
            out.append(Record(alerts.notify_event(self.offer.context.connection_id, "oscar", self._file_context(),
                                           decision.notice, decision, oft=self.offer.to_dict())))
        self._process(out, self.sender_is_client)
        if self.sender_closed and not self.inspecting and not self.closed:
            self.closed = True
            out.append(Close("OFT transfer done"))
        return out

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self.closed:
            return []
        if from_client == self.sender_is_client:
            self.sender_closed = True
            if self.in_data and self.held:
                self.in_data = False
                return self._inspect(truncated=True)
        elif self.sender_is_client is not None:
            self.receiver_closed = True
        if self.inspecting:
            return []                       # the verdict still has to be recorded (and notified)
        self.closed = True
        return [Close("OFT peer closed")]

    # --- frames -------------------------------------------------------------------------------------

    def _process(self, out: list[Command], side: bool) -> None:
        buf = self._buf[side]
        while buf and not self.closed:
            if side == self.sender_is_client and self.inspecting:
                return                                  # the next file waits for this one's verdict
            if self.in_data and side == self.sender_is_client:
                take = min(self.remaining, len(buf))
                self.held += buf[:take]
                del buf[:take]
                self.remaining -= take
                if len(self.held) > self.limits.oscar_max_held_bytes:
                    out += self._too_large(len(self.held))
                    return
                if self.remaining == 0:
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
                if h.size > self.limits.oscar_max_held_bytes:
                    out += self._too_large(h.size)
                    return
                self.prompt = h
                self.file_index += 1
                self.resume_offset = 0
        elif h.type == OFT_ACK and side != self.sender_is_client and self.prompt is not None:
            out.append(Send(to_client=not side, data=h.raw))
            self._start_data(out, 0)
            self._process(out, self.sender_is_client)
            return
        elif h.type == OFT_RESUME and side != self.sender_is_client:
            self.resume_offset = min(h.bytes_received, self.prompt.size if self.prompt else 0)
        elif h.type == OFT_RESUME_ACK and side != self.sender_is_client and self.prompt is not None:
            out.append(Send(to_client=not side, data=h.raw))
            self._start_data(out, self.resume_offset)
            self._process(out, self.sender_is_client)
            return
        elif h.type == OFT_DONE and side != self.sender_is_client and self.dones_owed:
            self.dones_owed -= 1
            forward = False                             # the sender had ours
        if forward:
            out.append(Send(to_client=not side, data=h.raw))

    def _start_data(self, out: list[Command], offset: int) -> None:
        self.in_data = True
        self.remaining = self.prompt.size - offset
        self.held = bytearray()
        if self.remaining <= 0:
            self._complete(out)

    def _complete(self, out: list[Command]) -> None:
        self.in_data = False
        prompt = self.prompt
        done = prompt.with_type(OFT_DONE, bytes_received=prompt.size, received_checksum=prompt.checksum)
        out.append(Send(to_client=self.sender_is_client, data=done))
        self.dones_owed += 1
        out += self._inspect(truncated=self.resume_offset > 0)

    def _inspect(self, truncated: bool) -> list[Command]:
        self.inspecting = True
        self.transfer_id = f"oft:{self.offer.offer_id}:{self.file_index}"
        name = self.prompt.name if self.prompt is not None and self.prompt.name else self.offer.name
        return [InspectFile(transfer_id=self.transfer_id, data=bytes(self.held), context=self._file_context(),
                            name=name, truncated=truncated)]

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Record:
        if self.offer is not None:
            data.setdefault("offer", self.offer.offer_id)
        return Record(alerts.anomaly_event(self._file_context(), kind, detail, **data))

    def _fatal(self, kind: str, detail: str) -> list[Command]:
        self.closed = True
        self.held = bytearray()
        return [self._anomaly(kind, detail), Close(f"OFT: {kind}")]

    def _too_large(self, size: int) -> list[Command]:
        self.closed = True
        self.held = bytearray()
        text = (f"imguard: the file {self.offer.name!r} to {self.offer.receiver} was stopped: it is larger than "
                f"{self.limits.oscar_max_held_bytes} bytes and could not be inspected")
        return [self._anomaly("oft_too_large", text, size=size),
                Record(alerts.notify_event(self.offer.context.connection_id, "oscar", self._file_context(), text,
                                    oft=self.offer.to_dict())),
                Close("OFT file too large to inspect")]

    def _unannounced(self) -> list[Command]:
        self.closed = True
        return [Record(alerts.anomaly_event(self.context.with_(protocol="oscar", transfer_mechanism="oft"),
                                            "oft_unannounced", "an OFT connection whose cookie no rendezvous "
                                            "announced")), Close("unannounced OFT connection")]
