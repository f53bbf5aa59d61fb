"""The MSNP client-to-server session (notification server or switchboard): identity, message policy,
MSNFTP invitations and MSNSLP in-band file transfers. Sans-io.

    session = MsnpSession(checker, transfers, ChatContext(client_address=..., server_address=...))
    session.data_received(True, b"MSG 95 N 156\\r\\nMIME-Version: 1.0\\r\\n...\\r\\n\\r\\nouai cest ...")
        -> [Send(to_client=False, data=<the same bytes>)]                                      (allow)
        -> [Send(to_client=False, data=b"MSG 95 N 150\\r\\n...\\r\\n\\r\\nouai c*** ...")]     (mask: length fixed)
        -> [Send(to_client=True, data=b"MSG imguard imguard 187\\r\\n...notice..."),
            Send(to_client=True, data=b"NAK 95\\r\\n")]                                         (block)

One class serves both kinds of MSNP connection; the commands say which one it is.

Identity: the passport named by the client in `USR` (NS: `USR trid TWN|MD5|SSO I <passport>`; SB:
`USR trid <passport> <cookie>`) or `ANS trid <passport> <cookie> <session>` is tentative; the server's
`USR trid OK <passport> ...` (or `ANS trid OK`: the switchboard checked the cookie) confirms it, once, and only
as the answer to the client's own USR (same trid, when one was seen): a later or unsolicited `USR OK` naming
someone else is an `identity_change` anomaly (high) and changes nothing.
ChatContext.sender is always a passport (e-mail address).

Switchboard participants (the recipients of what our client says) come from `IRO` (when answering a
ring), `JOI` (someone joined after `CAL`) and leave with `BYE <passport>`; a connection picked up
mid-session (offline replay) also learns them from the senders of server MSGs, and our passport
from our client's own typing notices (`TypingUser:`, tentative). The conversation id is the
switchboard session id (`ANS`'s last word, `CAL trid RINGING <id>`).

Messages: `MSG` with `Content-Type: text/plain` goes to `checker.check_message(body, ctx)` in both
directions: client -> server (sender: our passport, recipients: the participants) and server ->
client (`MSG <passport> <nick> <len>`: sender that passport, recipients: us and the other
participants). MSNP14+ messages to and from Yahoo! contacts through the NS (`UUM trid <id> <net>
<type> <len>` / `UBM <id> <net> <type> <len>`) are checked the same way. Typing
(`text/x-msmsgscontrol`), datacasts, emoticons and profiles are forwarded.
- allow/alert: the exact bytes cross;
- mask: the body is replaced by `decision.masked_text` (UTF-8; the Content-Type charset is rewritten
  to UTF-8 when it said something else) and the length on the command line is recomputed;
- block/quarantine: the MSG is dropped. Our client gets a notice as a switchboard message from the
  gateway, `MSG imguard imguard <len>` + text/plain (MSNP has no error-with-text; this is what a
  person sees in the conversation window). When the client asked for an acknowledgement (flag N, A
  or D) it also gets `NAK <trid>`, so its "could not be delivered" warning shows. An inbound message
  blocked is dropped with a notice to our client naming its sender, in our client's words (a rule's notice
  is written for a sender: it is shown only to our own senders, also after a mask).

MSNFTP (`text/x-msmsgsinvite`, Application-GUID {5D3E02AB-6190-11d3-BBBB-00C04F795683}): the INVITE
gives name and size per Invitation-Cookie; the ACCEPT that carries `IP-Address`/`Port`/`AuthCookie`
(from the listening side; `IP-Address-Internal` and `PortX` variants too) becomes an `MsnftpOffer` in
the shared ExpectedTransfers table, kind "msnftp", key (ip, port), one entry per announced address.
The carrier puts a `DirectMsnftpSession` (imguard.protocols.msnp.msnftp) on the connection to such an
address. An offer larger than `msnp_max_held_bytes` is dropped with a notice.
With `side_relay` (the gateway's side relay: `.host`, `.allocate(offer) -> port`, as IRC's DccRelay), the
ACCEPT's address is rewritten to host:allocate(offer) in either direction (IP-Address and Port; the
IP-Address-Internal/PortX variants are removed), the offer waits under that relay key with the first
announced address as its `real_address`, and the receiver's connection crosses the gateway whatever port
the listener chose. An ACCEPT already naming the relay (both parties behind the gateway) crosses unchanged;
no free relay port, or an ACCEPT for an invitation not seen on this connection: the ACCEPT is dropped with a
notice (the file is never let around the gateway).

MSNSLP / P2P in-band (`application/x-msnmsgrp2p`, 48-byte little-endian header): session-0 SLP
messages are reassembled by identifier; an `INVITE` with the file-transfer EUF-GUID gives the
SessionID, name and size (base64 Context). Data chunks of that SessionID are *held, not forwarded*,
in one `HeldTransfer` (imguard.files.tracker) per file session, made at its first data chunk: kind
"p2p" (its anomalies are p2p_*), the Context's size, bounded by `msnp_max_held_bytes`, multiplexed
with the chat (owns_connection False), its bytes counted in the connection's `ConnectionHolds`
(`held_bound`: `msnp_max_transfers` such files). Each chunk is one piece: its file bytes at the P2P
header's offset, and the whole raw MSG that carried it as what crosses on release. The session keeps
only the framing: it answers each held client MSG with `ACK <trid>` itself (the switchboard would have)
so the sender's client keeps going, and later swallows the switchboard's own ACK/NAK for those trids.
A gap, or chunks announcing another total size than the INVITE, cut the file (p2p_bad_chunk: fail
closed); a chunk after the file was complete or stopped is dropped (p2p_overrun). When the last byte
is in: the tracker's `InspectFile(transfer_id="msnslp:<conn>:<sid>")`, mechanism "msnslp";
`file_verdict` is that tracker's verdict. In MSNSLP's terms: allowed, the held MSGs go on byte-exact,
in order (the tracker's default delivery); blocked or cut, our client gets an MSNSLP `BYE` for the
session (`refuse`: so its transfer window ends) and, as the tracker's tell rule says, a notice (`tell`);
the remote peer's client, which got nothing, is not told and times out (injecting towards the server would
need a transaction id of our client's, which the switchboard may answer or refuse).
Both directions are the same code: a file the switchboard delivers to our client (the INVITE came from
the server's side) is held the same way (`sender_is_client` False, origin server: inbound unless the zones
say its sender is inside); nothing is ACKed for it (server MSGs carry no transaction), and when it is
stopped our client, its receiver, gets the BYE "from" the sender and a notice in its own words ("the
file ... from <sender> was blocked (<rule>)", not the rule's notice, which is written for a sender);
an allowed inbound file tells nobody.
The sender's leg closing before the last byte abandons the file (p2p_incomplete), and so does a new
INVITE reusing its SessionID (the new file gets a transfer id of its own); a framing error that closes
the connection drops every held file with it. An INVITE nobody accepts holds nothing.
A direct-connection negotiation (`application/x-msnmsgr-transreqbody` INVITE, or a transrespbody
saying `Listening: true`) is dropped ("msnslp_direct_refused"; our client's own INVITE gets a
`603 Decline`): a direct connection would carry the file around the gateway, and clients fall back
to the switchboard. An SLP message split over several chunks is only judged at its last chunk; the
earlier chunks have crossed, but a receiver never acts on an incomplete SLP message.

Anomalies (`Anomaly` facts, the held files' too, at most `msnp_max_anomalies_per_kind` per kind):
framing errors (line too long, payload length absurd or not a number: the connection closes), truncated
payloads at close, malformed P2P headers and contexts, bad UTF-16 names, unknown invitation cookies,
the held files' p2p_*. Events (`ProtocolEvent`): "msnp_logged_in", "msnftp_offer", "msnftp_expected",
"msnslp_offer", "msnp_file_refused", "msnslp_direct_refused".
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field, replace
from typing import Any

from imguard.files.tracker import ConnectionHolds, HeldTransfer, HoldState, Notice
from imguard.model import FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.protocols.base import (Anomaly, Close, Command as Cmd, OutgoingCommands, ProtocolEvent, Send,
                                    StreamSession, block_words, limited_anomaly)
from imguard.protocols.framing import is_number
from imguard.protocols.msnp.decoder import (FT_GUID, P2P_FLAG_ACK, P2P_FLAG_DATA, Command, CommandDecoder,
                                            FramingError, Mime, MsnpLimits, P2PError, P2PHeader, SlpMessage, build_p2p,
                                            decode_body, format_command, parse_file_context, parse_invitation,
                                            parse_mime, parse_p2p, parse_slp)

GATEWAY_NAME = "imguard"
MSNFTP_KIND = "msnftp"          # ExpectedTransfers kind of accepted MSNFTP invitations; key (ip, port)
_ids = itertools.count(1)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+")


@dataclass(frozen=True)
class MsnftpOffer:
    """An accepted MSNFTP invitation: what the expected direct connection will carry and for whom."""
    offer_id: str
    cookie: str                     # Invitation-Cookie
    name: str                       # never used as a path
    size: int | None
    sender: str                     # passports
    receiver: str
    host: str                       # where the listening side waits
    port: int
    auth_cookie: str = ""
    listener_is_sender: bool = True  # False with Sender-Connect: TRUE (the receiver listens)
    outbound: bool = True           # sent by the gateway's own client
    context: ChatContext = field(default_factory=ChatContext)   # connection_id = the switchboard's
    relay_host: str = ""            # the gateway's side relay the ACCEPT was rewritten to ("": not rewritten)
    relay_port: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.relay_host, self.relay_port) if self.relay_host else (self.host, self.port)

    @property
    def real_address(self) -> tuple[str, int]:
        """Where the carrier connects on to (the listening side), relayed or not."""
        return (self.host, self.port)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.offer_id, "cookie": self.cookie, "name": self.name, "size": self.size,
                "sender": self.sender, "receiver": self.receiver, "host": self.host, "port": self.port,
                "listener_is_sender": self.listener_is_sender, "outbound": self.outbound,
                "relay_host": self.relay_host, "relay_port": self.relay_port}


@dataclass
class _P2pFile:
    """An MSNSLP file session announced by an INVITE: its MSNSLP facts and, from its first data chunk, the
    HeldTransfer that holds it (one per file session)."""
    session_id: int
    name: str
    size: int
    sender_is_client: bool
    sender: str
    receiver: str
    call_id: str
    transfer_id: str
    context: ChatContext
    transfer: HeldTransfer | None = None

    @property
    def receiving(self) -> bool:
        """Announced or arriving: counted against msnp_max_transfers."""
        return self.transfer is None or self.transfer.state is HoldState.RECEIVING

    @property
    def holding(self) -> bool:
        """Its tracker holds bytes (receiving or inspecting): never forgotten before its final state."""
        return self.transfer is not None and self.transfer.holding


def held_bound(limits: MsnpLimits) -> int:
    """Bytes the held MSNSLP files of one switchboard may take together: `msnp_max_transfers` files of
    `msnp_max_held_bytes` each, each held twice (its file bytes for inspection, the MSGs that carried them for the
    release) plus the MSGs' framing (about 15% of a 1202-byte chunk), so 3x."""
    return limits.msnp_max_transfers * 3 * limits.msnp_max_held_bytes


class MsnpSession(StreamSession):
    """One MSNP client connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, limits: MsnpLimits = MsnpLimits(),
                 side_relay: Any = None):
        self.checker = checker
        self.transfers = transfers
        self.side_relay = side_relay    # .host, .allocate(offer) -> port: MSNFTP addresses rewritten to it
        self.context = context.with_(protocol="msnp")
        self.limits = limits
        self._decoders = {True: CommandDecoder(limits), False: CommandDecoder(limits)}
        self.closed = False
        self.anomaly_counts: dict[str, int] = {}
        self.passport = ""              # our client's identity
        self.confirmed = False          # the server's USR OK named it
        self._usr_trid = ""             # the trid of the client's latest USR: only its answer names the passport
        self.friendly = ""
        self.conversation = ""          # switchboard session id
        self.participants: dict[str, str] = {}     # passport -> friendly name (not us)
        self.calling: list[str] = []   # CAL targets not joined yet
        # Invitation-Cookie -> (Invitation, from_client, file sender, file receiver)
        self._invites: dict[str, tuple[Any, bool, str, str]] = {}
        self._p2p: dict[int, _P2pFile] = {}       # SessionID -> file session (bounded; final ones are forgotten)
        self._held: dict[str, _P2pFile] = {}      # transfer_id -> file session whose tracker holds bytes
        self.holds = ConnectionHolds(max_bytes=held_bound(limits))
        self._slp_parts: dict[tuple[bool, int], bytearray] = {}
        self._own_acks: dict[str, None] = {}    # trids we ACKed for the switchboard: its ACK/NAK is swallowed
        self._slp_ids = itertools.count(0x7F000000)

    # --- who --------------------------------------------------------------------------------------------

    def _ctx(self, **changes: Any) -> ChatContext:
        base = {"sender": self.passport, "conversation": self.conversation}
        base.update(changes)
        return self.context.with_(**base)

    def _recipients(self) -> tuple[str, ...]:
        return tuple(self.participants) or tuple(self.calling)

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Cmd]:
        if self.closed:
            return []
        out = OutgoingCommands()
        for ev in self._decoders[from_client].feed(data):
            if isinstance(ev, FramingError):
                self.closed = True
                out.add(self._anomaly(ev.kind, ev.detail, from_client=from_client, size=ev.size))
                self._drop_held()
                out.add(Close(f"MSNP framing: {ev.kind}"))
                break
            if from_client:
                self._client_command(out, ev)
            else:
                self._server_command(out, ev)
        return out.cmds

    def tls_started(self) -> list[Cmd]:
        return []           # MSNP has no STARTTLS

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Cmd]:
        f = self._held.get(transfer_id)
        if f is None or self.closed:
            return []
        out = OutgoingCommands()
        self._carry(out, f, f.transfer.verdict(decision))
        return out.cmds

    def connection_closed(self, from_client: bool) -> list[Cmd]:
        out = OutgoingCommands()
        pending = self._decoders[from_client].pending
        if pending and not self.closed:
            out.add(self._anomaly("truncated_command", "the connection closed in the middle of a command (a "
                                  "payload shorter than its length); not forwarded", from_client=from_client,
                                  size=len(pending)))
        for f in list(self._held.values()):
            t = f.transfer
            if t.state is HoldState.RECEIVING and f.sender_is_client == from_client:
                # The sender's leg closed before the last byte: the file will not be whole. (One still being
                # inspected is decided as usual: its receiver's leg may still be open.)
                self._carry(out, f, t.abandon("p2p_incomplete", f"the connection closed after {t.received} of "
                                              f"{t.size} bytes of an MSNSLP file; nothing was forwarded"))
        return out.cmds

    # --- for the carrier ----------------------------------------------------------------------------

    def notice(self, text: str) -> list[Cmd]:
        """A notice from the gateway to this connection's user (e.g. an MSNFTP file blocked on its own connection)."""
        if self.closed:
            return []
        return [Send(to_client=True, data=self._notice_msg(text))]

    # --- helpers ------------------------------------------------------------------------------------

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly | None:
        return limited_anomaly(self.anomaly_counts, self.limits.msnp_max_anomalies_per_kind, self._ctx(),
                               kind, detail, **data)

    def _capped(self, anomaly: Anomaly) -> Anomaly | None:
        """A tracker's anomaly under this connection's per-kind cap (as `_anomaly`)."""
        seen = self.anomaly_counts[anomaly.kind] = self.anomaly_counts.get(anomaly.kind, 0) + 1
        limit = self.limits.msnp_max_anomalies_per_kind
        if seen > limit:
            return None
        if seen == limit:
            return dataclasses.replace(anomaly, data={**anomaly.data, "further_suppressed": True})
        return anomaly

    def _event(self, action: str, category: str = "session", ctx: ChatContext | None = None,
               **data: Any) -> ProtocolEvent:
        return ProtocolEvent("msnp", action, ctx or self._ctx(), category, data)

    def _notice_msg(self, text: str) -> bytes:
        text = _CONTROL.sub(" ", text).strip() or GATEWAY_NAME
        body = text.encode("utf-8")[:1400].decode("utf-8", "ignore").encode("utf-8")   # switchboard MSG limit
        payload = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n"
                   b"X-MMS-IM-Format: FN=Arial; EF=B; CO=0000FF; CS=0; PF=0\r\n\r\n" + body)
        return format_command("MSG", GATEWAY_NAME, GATEWAY_NAME, payload=payload)

    def _slp_to_client(self, from_passport: str, slp: bytes) -> bytes:
        """An MSNSLP message (text, NUL-terminated) on session 0, in a server -> client MSG from `from_passport`."""
        header = P2PHeader(0, next(self._slp_ids), 0, len(slp), len(slp), 0, ack_id=next(self._slp_ids))
        payload = (b"MIME-Version: 1.0\r\nContent-Type: application/x-msnmsgrp2p\r\n"
                   b"P2P-Dest: " + self.passport.encode() + b"\r\n\r\n" + build_p2p(header, slp, 0))
        return format_command("MSG", from_passport, from_passport, payload=payload)

    def _slp_bye(self, t: _P2pFile, from_passport: str) -> bytes:
        """An MSNSLP BYE for transfer `t`, as if from `from_passport` (so our client's transfer window ends)."""
        slp = (f"BYE MSNMSGR:{self.passport} MSNSLP/1.0\r\nTo: <msnmsgr:{self.passport}>\r\n"
               f"From: <msnmsgr:{from_passport}>\r\nVia: MSNSLP/1.0/TLP ;branch={{A0D624A6-6C0C-4283-A9E0-"
               f"BC97B4B46D32}}\r\nCSeq: 0\r\nCall-ID: {t.call_id}\r\nMax-Forwards: 0\r\n"
               f"Content-Type: application/x-msnmsgr-sessionclosebody\r\nContent-Length: 3\r\n\r\n\r\n").encode()
        return self._slp_to_client(from_passport, slp + b"\x00")

    def _slp_decline(self, slp: SlpMessage, from_passport: str) -> bytes:
        """`603 Decline` to an INVITE our client sent, as if from the invitee."""
        body = "\r\n\x00"
        text = (f"MSNSLP/1.0 603 Decline\r\nTo: <msnmsgr:{self.passport}>\r\nFrom: <msnmsgr:{from_passport}>\r\n"
                f"Via: {slp.get('Via')}\r\nCSeq: 1 \r\nCall-ID: {slp.get('Call-ID')}\r\nMax-Forwards: 0\r\n"
                f"Content-Type: {slp.get('Content-Type')}\r\nContent-Length: {len(body)}\r\n\r\n{body}")
        return self._slp_to_client(from_passport, text.encode() + b"\x00")

    # --- client -> server ---------------------------------------------------------------------------

    def _client_command(self, out: OutgoingCommands, cmd: Command) -> None:
        v, a = cmd.verb, cmd.args
        if v == "USR" and len(a) >= 3:
            self._usr_trid = a[0]
            if "@" in a[1]:                       # SB: USR trid passport cookie
                self.passport = self.passport if self.confirmed else a[1]
            elif len(a) >= 4 and a[2] == "I":     # NS: USR trid TWN|MD5|SSO I passport
                self.passport = self.passport if self.confirmed else a[3]
        elif v == "ANS" and len(a) >= 3:
            if not self.confirmed:
                self.passport = a[1]
            if len(a) >= 4:
                self.conversation = a[3]
        elif v == "CAL" and len(a) >= 2:
            if a[1] not in self.calling and a[1] not in self.participants:
                self.calling.append(a[1])
        elif (v == "MSG" and len(a) >= 3 or v == "UUM" and len(a) >= 4) and cmd.payload is not None:
            self._message(out, True, cmd)
            return
        out.send(False, cmd.raw)

    # --- server -> client ---------------------------------------------------------------------------

    def _server_command(self, out: OutgoingCommands, cmd: Command) -> None:
        v, a = cmd.verb, cmd.args
        if v == "USR" and len(a) >= 3 and a[1] == "OK" and (
                self.confirmed or (self._usr_trid and a[0] != self._usr_trid)):
            if a[2].lower() != self.passport.lower() or not self.confirmed:
                out.add(self._anomaly("identity_change", "a USR OK that does not answer the client's own USR: "
                                      "the identity stays", from_client=False, severity="high",
                                      passport=self.passport, claimed=a[2]))
        elif v == "USR" and len(a) >= 3 and a[1] == "OK":
            self.passport = a[2]
            self.friendly = a[3] if len(a) >= 4 else ""
            self.confirmed = True
            out.add(self._event("msnp_logged_in", passport=self.passport, friendly=self.friendly))
        elif v == "ANS" and len(a) >= 2 and a[1] == "OK" and self.passport and not self.confirmed:
            self.confirmed = True               # the switchboard accepted our passport with the ring's cookie
            out.add(self._event("msnp_logged_in", passport=self.passport, friendly=self.friendly))
        elif v == "IRO" and len(a) >= 5:
            self.participants[a[3]] = a[4]
        elif v == "JOI" and len(a) >= 1:
            self.participants[a[0]] = a[1] if len(a) >= 2 else ""
            if a[0] in self.calling:
                self.calling.remove(a[0])
        elif v == "BYE" and a:
            self.participants.pop(a[0], None)
        elif v == "CAL" and len(a) >= 3 and a[1] == "RINGING":
            self.conversation = a[2]
        elif v in ("ACK", "NAK") and a and a[0] in self._own_acks:
            self._own_acks.pop(a[0], None)        # we acknowledged this held MSG to the client already
            return
        elif v in ("MSG", "UBM") and cmd.payload is not None and len(a) >= 3:
            self._message(out, False, cmd)
            return
        out.send(True, cmd.raw)

    # --- MSG ----------------------------------------------------------------------------------------

    def _message(self, out: OutgoingCommands, from_client: bool, cmd: Command) -> None:
        mime = parse_mime(cmd.payload or b"")
        ctype = mime.content_type
        if cmd.verb == "UUM":               # MSNP14+ message to a Yahoo! contact through the NS
            sender, recipients = self.passport, (cmd.args[1],)
        elif cmd.verb == "UBM":             # ... and from one
            sender, recipients = cmd.args[0], ((self.passport,) if self.passport else ())
        elif from_client:
            if not self.passport and ctype == "text/x-msmsgscontrol":
                # Joined mid-session (no USR/ANS seen): our client's own typing notice names it (tentative).
                self.passport = mime.get("TypingUser")
            sender, recipients = self.passport, self._recipients()
        else:
            sender = cmd.args[0]
            if cmd.verb == "MSG" and "@" in sender and sender != self.passport and sender not in self.participants:
                self.participants[sender] = cmd.args[1]      # a participant we missed the IRO/JOI of
                if sender in self.calling:
                    self.calling.remove(sender)
            recipients = tuple(p for p in ((self.passport,) + tuple(self.participants)) if p and p != sender)
        if ctype == "text/plain" or (cmd.verb in ("UUM", "UBM") and not ctype):
            self._text(out, from_client, cmd, mime, sender, recipients)
        elif cmd.verb in ("UUM", "UBM"):
            out.send(not from_client, cmd.raw)
        elif ctype == "text/x-msmsgsinvite":
            self._invitation(out, from_client, cmd, mime, sender, recipients)
        elif ctype == "application/x-msnmsgrp2p":
            self._p2p_message(out, from_client, cmd, mime, sender, recipients)
        else:
            out.send(not from_client, cmd.raw)

    def _text(self, out: OutgoingCommands, from_client: bool, cmd: Command, mime: Mime, sender: str,
              recipients: tuple[str, ...]) -> None:
        text, encoding = decode_body(mime.body, mime.charset)
        if not text.strip():
            out.send(not from_client, cmd.raw)
            return
        decision = self.checker.check_message(text, self._ctx(sender=sender, recipients=recipients,
                                                              origin=FROM_CLIENT if from_client else FROM_SERVER))
        if decision.blocked:
            action, why = block_words(decision)
            if from_client:
                to = f" to {', '.join(recipients)}" if recipients else ""
                notice = decision.notice or f"Your message{to} was {action} by imguard: {why}"
                out.send(True, self._notice_msg(notice))
                if cmd.verb == "MSG" and len(cmd.args) >= 2 and cmd.args[1].upper() in ("N", "A", "D"):
                    out.send(True, format_command("NAK", cmd.trid))
            else:
                # Our client is the receiver: told in its own words (a rule's notice is written for a sender).
                out.send(True, self._notice_msg(f"A message from {sender} was {action} by imguard: {why}"))
            return
        if decision.action == MASK and decision.masked_text is not None:
            head = mime.head
            if encoding.lower().replace("-", "") != "utf8":
                head = re.sub(rb"(?i)(content-type:[^\r\n]*?charset=)[^;\r\n]*", rb"\1UTF-8", head)
            payload = head + decision.masked_text.encode("utf-8")
            if len(payload) > self.limits.msnp_max_payload:
                out.add(self._anomaly("mask_too_large", f"the masked message ({len(payload)} bytes) exceeds "
                                      "msnp_max_payload; dropped", from_client=from_client))
                out.send(True, self._notice_msg("imguard: a message was rewritten by policy and became too long "
                                                "to send; it was dropped"))
                return
            out.send(not from_client, format_command(cmd.verb, *cmd.args[:-1], payload=payload))
            if decision.notice and from_client:     # a rule's notice is for the sender, ours only
                out.send(True, self._notice_msg(decision.notice))
            return
        out.send(not from_client, cmd.raw)

    # --- MSNFTP invitations ------------------------------------------------------------------------

    def _invitation(self, out: OutgoingCommands, from_client: bool, cmd: Command, mime: Mime, sender: str,
                    recipients: tuple[str, ...]) -> None:
        inv = parse_invitation(mime.body)
        if inv.command == "INVITE":
            if not inv.is_file_transfer:
                out.send(not from_client, cmd.raw)
                return
            receiver = recipients[0] if recipients else ""
            if inv.size is None:
                out.add(self._anomaly("msnftp_bad_size", "an MSNFTP invitation without a numeric "
                                      "Application-FileSize", from_client=from_client, cookie=inv.cookie))
            elif inv.size > self.limits.msnp_max_held_bytes:
                self._refuse(out, from_client, inv.name, inv.size, sender, receiver, "msnftp")
                return
            self._invites[inv.cookie] = (inv, from_client, sender, receiver)
            while len(self._invites) > 64:
                self._invites.pop(next(iter(self._invites)))
            out.add(self._event("msnftp_offer", category="file", cookie=inv.cookie, name=inv.name, size=inv.size,
                                sender=sender, receiver=receiver, outbound=from_client))
        elif inv.command == "ACCEPT" and inv.addresses:
            known = self._invites.get(inv.cookie)
            if known is None:
                out.add(self._anomaly("msnftp_unknown_cookie", "an MSNFTP ACCEPT with an address for an invitation "
                                      "not seen on this connection; its data connection cannot be attributed",
                                      from_client=from_client, cookie=inv.cookie))
                if self.side_relay is not None and not self._relayed_already(inv):
                    # It could not be rewritten to the relay: passed on, the file would go around the gateway.
                    out.send(True, self._notice_msg("imguard: a file transfer whose invitation imguard did not see "
                                                    "was not passed on"))
                    return
            elif self._relayed_already(inv):
                pass            # rewritten by the other party's session (both behind the gateway)
            else:
                invite, invite_from_client, file_sender, file_receiver = known
                listener_is_sender = (from_client == invite_from_client)
                ctx = self._ctx(sender=file_sender, recipients=(file_receiver,), transfer_mechanism="msnftp")
                offer_id = f"{self.context.connection_id or 'msnftp'}-{next(_ids)}"
                offers = [MsnftpOffer(offer_id=offer_id, cookie=inv.cookie, name=invite.name, size=invite.size,
                                      sender=file_sender, receiver=file_receiver, host=host, port=port,
                                      auth_cookie=inv.auth_cookie, listener_is_sender=listener_is_sender,
                                      outbound=invite_from_client, context=ctx) for host, port in inv.addresses]
                if self.side_relay is not None:
                    offers = offers[:1]         # the public address first; the relay connects on to it
                    try:
                        port = int(self.side_relay.allocate(offers[0]))
                        if not 0 < port < 65536:
                            raise ValueError(f"relay port {port}")
                    except Exception as e:      # the allocator is the carrier's: fail closed
                        out.add(self._anomaly("msnftp_relay_failed", f"no relay port for the MSNFTP offer: {e}",
                                              from_client=from_client, cookie=inv.cookie))
                        out.send(True, self._notice_msg(f"imguard: the file {invite.name!r} could not be relayed "
                                                        "through the gateway; the transfer was not passed on"))
                        return
                    offers[0] = replace(offers[0], relay_host=self.side_relay.host, relay_port=port)
                    cmd = self._rewrite_accept(cmd, mime, self.side_relay.host, port)
                for offer in offers:
                    if self.transfers is not None:
                        self.transfers.expect(offer.key, offer, kind=MSNFTP_KIND, ttl=self.limits.msnp_transfer_ttl)
                    out.add(self._event("msnftp_expected", category="file", ctx=ctx, **offer.to_dict()))
        elif inv.command == "CANCEL":
            self._invites.pop(inv.cookie, None)
        out.send(not from_client, cmd.raw)

    def _relayed_already(self, inv) -> bool:
        """The ACCEPT names an address of our side relay that an offer already waits on."""
        if self.side_relay is None or self.transfers is None or len(inv.addresses) != 1:
            return False
        host, port = inv.addresses[0]
        return host == self.side_relay.host and self.transfers.get((host, port), kind=MSNFTP_KIND) is not None

    @staticmethod
    def _rewrite_accept(cmd: Command, mime: Mime, host: str, port: int) -> Command:
        """The ACCEPT with IP-Address/Port replaced by the relay's and the other address variants removed."""
        lines = []
        for line in mime.body.split(b"\r\n"):
            name = line.split(b":", 1)[0].strip().lower() if b":" in line else b""
            if name in (b"ip-address-internal", b"portx", b"portx-internal"):
                continue
            if name == b"ip-address":
                line = b"IP-Address: " + host.encode()
            elif name == b"port":
                line = b"Port: " + str(port).encode()
            lines.append(line)
        raw = format_command(cmd.verb, *cmd.args[:-1], payload=mime.head + b"\r\n".join(lines))
        return replace(cmd, raw=raw)

    def _refuse(self, out: OutgoingCommands, from_client: bool, name: str, size: int, sender: str, receiver: str,
                mechanism: str) -> None:
        ctx = self._ctx(sender=sender, recipients=(receiver,), transfer_mechanism=mechanism)
        out.add(self._event("msnp_file_refused", category="file", ctx=ctx, reason="too_large", name=name, size=size))
        who = f"to {receiver}" if from_client else f"from {sender}"
        out.send(True, self._notice_msg(f"The file {name!r} ({size} bytes) {who} is larger than "
                                        f"{self.limits.msnp_max_held_bytes} bytes and cannot be inspected; "
                                        "imguard did not pass the offer on"))

    # --- MSNSLP / P2P -------------------------------------------------------------------------------

    def _p2p_message(self, out: OutgoingCommands, from_client: bool, cmd: Command, mime: Mime, sender: str,
                     recipients: tuple[str, ...]) -> None:
        try:
            msg = parse_p2p(mime.body)
        except P2PError as e:
            # Fail closed: a P2P message we cannot read might carry file data.
            out.add(self._anomaly(e.kind, e.detail + "; dropped", from_client=from_client))
            if from_client and len(cmd.args) >= 2 and cmd.args[1].upper() in ("N", "A", "D"):
                out.send(True, format_command("NAK", cmd.trid))
            return
        h = msg.header
        if h.session_id == 0 and not h.flags & P2P_FLAG_ACK:
            if not self._signalling(out, from_client, msg, sender, recipients):
                return
            out.send(not from_client, cmd.raw)
            return
        f = self._p2p.get(h.session_id)
        is_data = bool(h.flags & P2P_FLAG_DATA) or (h.flags == 0 and h.length > 0)
        if f is None or not is_data or from_client != f.sender_is_client:
            out.send(not from_client, cmd.raw)      # acks, MSN objects (display pictures), the receiver's side
            return
        transfer = f.transfer or self._hold(f)
        if transfer.state is not HoldState.RECEIVING:
            # After the file was complete (or stopped): an overrun (p2p_overrun), dropped.
            self._carry(out, f, transfer.append(msg.data))
            return
        fail = ""
        if h.total_size != f.size:
            fail = f"data chunks announce {h.total_size} bytes, the invitation {f.size}"
        elif h.offset > transfer.contiguous:
            fail = f"a gap: chunk at {h.offset}, {transfer.contiguous} bytes received"
        if fail:
            self._carry(out, f, transfer.cut("p2p_bad_chunk", fail + "; the transfer is stopped",
                                             notice=f"The file {f.name!r} could not be inspected (malformed "
                                                    "transfer) and was stopped by imguard", from_client=from_client))
            return
        # The chunk's file bytes at its offset, and the whole MSG to release for them (byte-exact, in order). A chunk
        # without bytes is framing after the last one.
        held = transfer.append(msg.data, cmd.raw, h.offset) if msg.data else transfer.append(b"", cmd.raw)
        self._carry(out, f, held)
        if transfer.state is not HoldState.RECEIVING:
            return                                  # cut: the connection's or the gateway's hold limit
        if from_client and len(cmd.args) >= 2 and cmd.args[1].upper() in ("A", "D"):
            out.send(True, format_command("ACK", cmd.trid))
            self._own_acks[cmd.trid] = None
            while len(self._own_acks) > 4096:
                self._own_acks.pop(next(iter(self._own_acks)))
        if transfer.complete:
            self._carry(out, f, transfer.inspect())

    def _signalling(self, out: OutgoingCommands, from_client: bool, msg, sender: str,
                    recipients: tuple[str, ...]) -> bool:
        """An MSNSLP chunk on session 0. Returns False when the message must be dropped."""
        h = msg.header
        key = (from_client, h.identifier)
        if h.total_size > self.limits.msnp_max_payload * 4:
            out.add(self._anomaly("slp_too_large", f"an MSNSLP message of {h.total_size} bytes",
                                  from_client=from_client))
            return True
        if h.offset == 0 and h.length >= h.total_size:
            full = msg.data
        else:
            part = self._slp_parts.setdefault(key, bytearray())
            while len(self._slp_parts) > 16:            # bounded: the oldest unfinished message is forgotten
                self._slp_parts.pop(next(iter(self._slp_parts)))
            if key not in self._slp_parts:
                return True
            if h.offset != len(part):
                self._slp_parts.pop(key, None)
                out.add(self._anomaly("slp_gap", "MSNSLP chunks out of order", from_client=from_client))
                return True
            part += msg.data
            if len(part) < h.total_size:
                return True
            full = bytes(self._slp_parts.pop(key))
        slp = parse_slp(full)
        if slp is None:
            return True
        ctype = slp.get("Content-Type").lower()
        if ctype in ("application/x-msnmsgr-transreqbody", "application/x-msnmsgr-transrespbody") and (
                slp.method == "INVITE" or slp.get("Listening").lower() == "true"):
            # A direct connection would carry the file around the gateway: refused, the clients fall back
            # to the switchboard (where the file is held and inspected).
            out.add(self._event("msnslp_direct_refused", category="file", call_id=slp.get("Call-ID"),
                                outbound=from_client))
            if from_client and slp.method == "INVITE":
                peer = slp.get("To").strip("<>").removeprefix("msnmsgr:") or (recipients[0] if recipients else "")
                out.send(True, self._slp_decline(slp, peer))
            return False
        if slp.method != "INVITE" or slp.get("EUF-GUID").upper() != FT_GUID:
            return True
        sid_text = slp.get("SessionID")
        if not is_number(sid_text):
            out.add(self._anomaly("slp_bad_session", f"a file INVITE with SessionID {sid_text[:20]!r}",
                                  from_client=from_client))
            return True
        try:
            name, size = parse_file_context(slp.get("Context"))
        except P2PError as e:
            out.add(self._anomaly(e.kind, e.detail, from_client=from_client))
            name, size = "", -1
        to = slp.get("To").strip("<>").removeprefix("msnmsgr:")
        frm = slp.get("From").strip("<>").removeprefix("msnmsgr:")
        file_sender = frm or sender
        file_receiver = to or (recipients[0] if recipients else "")
        if size < 0 or size > self.limits.msnp_max_held_bytes or \
                sum(f.receiving for f in self._p2p.values()) >= self.limits.msnp_max_transfers:
            self._refuse(out, from_client, name, size, file_sender, file_receiver, "msnslp")
            return False
        sid = int(sid_text)
        transfer_id = f"msnslp:{self.context.connection_id}:{sid}"
        old = self._p2p.pop(sid, None)
        if old is not None:
            # A SessionID used again: the new file gets its own transfer id (a verdict still due for the old one
            # must not decide it), and an old one still held is given up (its sender started over).
            transfer_id = f"{transfer_id}.{next(_ids)}"
            if old.holding:
                self._carry(out, old, old.transfer.abandon("p2p_incomplete", "a new INVITE used the SessionID of "
                                                           "an MSNSLP file still held; nothing of it was forwarded"))
        ctx = self._ctx(sender=file_sender, recipients=(file_receiver,), transfer_mechanism="msnslp")
        f = _P2pFile(session_id=sid, name=name, size=size, sender_is_client=from_client, sender=file_sender,
                     receiver=file_receiver, call_id=slp.get("Call-ID"), transfer_id=transfer_id, context=ctx)
        self._p2p[sid] = f
        while len(self._p2p) > 4 * self.limits.msnp_max_transfers:
            oldest = next((k for k, v in self._p2p.items() if not v.holding), None)
            if oldest is None:
                break
            self._p2p.pop(oldest)
        out.add(self._event("msnslp_offer", category="file", ctx=ctx, session_id=sid, name=name, size=size,
                            call_id=f.call_id, outbound=from_client))
        if size == 0:
            self._carry(out, f, self._hold(f).inspect())
        return True

    # --- an MSNSLP file, held: its HeldTransfer in MSNSLP's terms ----------------------------------

    def _hold(self, f: _P2pFile) -> HeldTransfer:
        """The file's tracker, made at its first data chunk (an INVITE nobody accepts holds nothing). Multiplexed
        with chat (owns_connection False); its anomalies are p2p_*; its bytes count in this connection's holds."""
        f.transfer = HeldTransfer(
            f.transfer_id, f.context.with_(origin=FROM_CLIENT if f.sender_is_client else FROM_SERVER),
            sender_is_client=f.sender_is_client, kind="p2p",
            max_bytes=self.limits.msnp_max_held_bytes, size=f.size, name=f.name, receiver=f.receiver,
            sender_name=f.sender, holds=self.holds, refuse=lambda transfer: self._refuse_file(f),
            tell=lambda transfer, notice: self._tell_file(notice),
            event_data={"session_id": f.session_id, "name": f.name},
            scan_notice_in_band=True)       # our client is told "being scanned" in the conversation
        self._held[f.transfer_id] = f
        return f.transfer

    def _refuse_file(self, f: _P2pFile) -> list[Cmd]:
        """A file blocked or stopped: our client gets an MSNSLP BYE for its session, as if from the other party,
        so its transfer window ends (the remote client, which got nothing, times out). An abandoned file (its
        sender's leg closed, the connection failed) gets none."""
        if f.transfer.state is HoldState.ABANDONED:
            return []
        return [Send(to_client=True, data=self._slp_bye(f, f.receiver if f.sender_is_client else f.sender))]

    def _tell_file(self, notice: Notice) -> list[Cmd]:
        """A notice in MSNSLP's terms: our client (the file's sender or receiver) gets a message in the
        conversation. The outside sender is not told (see the module docstring)."""
        return [Send(to_client=True, data=self._notice_msg(notice.text))] if notice.party.inside else []

    def _carry(self, out: OutgoingCommands, f: _P2pFile, cmds: list[Cmd]) -> None:
        """The tracker's commands, its anomalies under the per-kind cap; a file no longer held is forgotten here."""
        for c in cmds:
            out.add(self._capped(c) if isinstance(c, Anomaly) else c)
        if not f.holding:
            self._held.pop(f.transfer_id, None)

    def _drop_held(self) -> None:
        """The connection closes on a framing error: every held file goes with it, unreleased. The framing
        error's anomaly explains it; nothing more is recorded or sent."""
        for f in list(self._held.values()):
            f.transfer.abandon("p2p_incomplete", "the connection closed on a framing error")
        self._held.clear()
