"""The Sametime Community client-to-server session: identity, one-to-one and conference messages to policy.
Sans-io (decoder.py has the structures).

    session = SametimeSession(checker, transfers, ChatContext(client_address=..., server_address=...))
    session.data_received(True, <CHANNEL_SEND on an IM channel: "the password is hunter2">)
        -> [Send(to_client=False, data=<the same message>)]                               (allow)
        -> [Send(to_client=False, data=<the message with the text masked, lengths fixed>)]  (mask)
        -> [Send(to_client=True, data=<an IM on the same channel: the notice>)]            (block)

Identity: the LOGIN's name, tentatively; the server's LOGIN_ACK names the user (its user id), once: a later one
naming another user is an `identity_change` anomaly and changes nothing.

Channels (a table: channel id -> Channel): a CHANNEL_CREATE names the service and the other party (the target
of one the client opens; the creator of one the server opens to it), a conference's name; CHANNEL_ACCEPT says
whether the channel is encrypted (its encryption mode) and, for one the client opened, who accepted;
CHANNEL_DESTROY forgets it. Messages:
- IM (service 0x1000, send type 0x0064): plain text or an HTML message (tags dropped, entities resolved for
  policy); typing and other data carry nothing;
- conference (0x80000010, send type 0x04): the client's text goes to the conference (the recipients: its name),
  the server's names a member id that WELCOME and JOIN mapped to a user.
What our client sends is decided outbound from it; what the server delivers, from the other party to it.
- allow/alert: the exact message crosses;
- mask: the text is rewritten (an HTML message as escaped text), lengths recomputed, header and attributes kept;
- block/quarantine: the message is dropped; our client gets an IM on that channel saying so (the sender: "Your
  message ... was blocked"; the inside receiver of a blocked message: "A message from X was blocked"), shown in
  the conversation as if the other party wrote it, prefixed "[imguard]". A conference gets its notice as a
  conference message from member 0.
Encrypted channels (CHANNEL_SEND with the ENCRYPT option: the channel negotiated RC2/40 or RC2/128) cannot be read:
each such message is an `encrypted_channel` anomaly (once per channel) and decided by policy on empty text (so a
policy that blocks what it cannot read blocks it), as Matrix's end-to-end encrypted events are.
File transfers (service 0x38) are recorded (`sametime_file_offer`) and not yet held: the file's bytes cross
undecided (see the README's table). Holding them needs more than the tracker: libmeanwhile's sender sends a chunk
(send type 0x0001) and waits for the receiver's ACK (0x0003) before the next, so the gateway would have to ACK the
sender itself while it holds the chunks, and swallow the receiver's ACKs when it releases them.

Anomalies (at most `sametime_max_anomalies_per_kind` per kind): framing (a length past the limit, no header: the
connection closes), a structure that does not fit (a client message on an IM or conference channel that cannot
be read is dropped: the server might read text we did not), a truncated message at close.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from imguard.model import FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Close, Command, ProtocolEvent, Send, StreamSession, limited_anomaly
from imguard.protocols.sametime.decoder import (CHANNEL_ACCEPT, CHANNEL_CREATE, CHANNEL_DESTROY, CHANNEL_SEND,
                                                CONF_JOIN, CONF_MESSAGE, CONF_WELCOME, IM_MESSAGE, LOGIN, LOGIN_ACK,
                                                SERVICE_CONFERENCE, SERVICE_FILE_TRANSFER, SERVICE_IM, DecodeError,
                                                FrameDecoder, FramingError, Message, Reader, SametimeLimits,
                                                build_message, conference_name, file_offer, login_ack_user,
                                                login_name, put_opaque, put_string, read_channel_accept,
                                                read_channel_create, read_im, read_login_info, read_send, rebuild,
                                                write_im)


class Opened(Enum):
    """Who opened a channel."""
    BY_CLIENT = "client"
    BY_SERVER = "server"


@dataclass
class Channel:
    id: int
    service: int
    opened: Opened
    peer: str = ""                      # the other party of an IM channel
    conference: str = ""                # a conference's name
    encrypted: bool = False
    told_encrypted: bool = False
    members: dict[int, str] = field(default_factory=dict)     # conference member id -> user


class SametimeSession(StreamSession):
    """One Sametime Community connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, limits: SametimeLimits = SametimeLimits()):
        self.checker = checker
        self.transfers = transfers
        self.context = context.with_(protocol="sametime")
        self.limits = limits
        self._decoders = {True: FrameDecoder(limits), False: FrameDecoder(limits)}
        self.closed = False
        self.anomaly_counts: dict[str, int] = {}
        self.identity = ""
        self.confirmed = False
        self.channels: dict[int, Channel] = {}

    # --- StreamSession ------------------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        out: list[Command] = []
        forward = bytearray()

        def flush() -> None:
            if forward:
                out.append(Send(to_client=not from_client, data=bytes(forward)))
                forward.clear()

        for ev in self._decoders[from_client].feed(data):
            if isinstance(ev, bytes):           # a keepalive
                forward += ev
                continue
            if isinstance(ev, FramingError):
                flush()
                self.closed = True
                out += [c for c in (self._anomaly(ev.kind, ev.detail, from_client=from_client, size=ev.size),
                                    Close(f"Sametime framing: {ev.kind}")) if c is not None]
                break
            replacement, extra = self._message(from_client, ev)
            forward += replacement
            if extra:
                flush()
                out += extra
        flush()
        return out

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        return []

    def connection_closed(self, from_client: bool) -> list[Command]:
        pending = self._decoders[from_client].pending
        if pending and not self.closed:
            rec = self._anomaly("truncated_message", "the connection closed in the middle of a Sametime message; not "
                                "forwarded", from_client=from_client, size=len(pending))
            return [rec] if rec else []
        return []

    def notice(self, text: str) -> list[Command]:
        """A notice to this connection's user on its most recent IM channel (none open: nothing can show it)."""
        channel = next((c for c in reversed(self.channels.values()) if c.service == SERVICE_IM), None)
        if self.closed or channel is None:
            return []
        return [Send(True, self._notice(channel, text))]

    # --- helpers ------------------------------------------------------------------------------------------------

    def _ctx(self, **changes: Any) -> ChatContext:
        base: dict[str, Any] = {"sender": self.identity}
        base.update(changes)
        return self.context.with_(**base)

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly | None:
        return limited_anomaly(self.anomaly_counts, self.limits.sametime_max_anomalies_per_kind, self._ctx(),
                               kind, detail, **data)

    def _event(self, action: str, **data: Any) -> ProtocolEvent:
        return ProtocolEvent("sametime", action, self._ctx(), "session", data)

    @staticmethod
    def _notice(channel: Channel, text: str) -> bytes:
        text = "[imguard] " + " ".join(text.split())[:1000]
        if channel.service == SERVICE_CONFERENCE:
            data = struct.pack(">I", 0) + put_string(text)
            send_type = CONF_MESSAGE
        else:
            data = write_im("text", text)
            send_type = IM_MESSAGE
        return build_message(CHANNEL_SEND, channel.id, struct.pack(">H", send_type) + put_opaque(data))

    # --- messages -----------------------------------------------------------------------------------------------

    def _message(self, from_client: bool, msg: Message) -> tuple[bytes, list[Command]]:
        extra: list[Command] = []
        try:
            if msg.type == LOGIN and from_client and not self.confirmed:
                self.identity = login_name(msg.body) or self.identity
            elif msg.type == LOGIN_ACK and not from_client:
                self._login_ack(msg, extra)
            elif msg.type == CHANNEL_CREATE:
                self._create(from_client, msg, extra)
            elif msg.type == CHANNEL_ACCEPT:
                channel = self.channels.get(msg.channel)
                if channel is not None:
                    _, acceptor, mode = read_channel_accept(msg.body)
                    channel.encrypted = mode != 0
                    if acceptor is not None and channel.opened is Opened.BY_CLIENT and not channel.peer:
                        channel.peer = acceptor.user_id
            elif msg.type == CHANNEL_DESTROY:
                self.channels.pop(msg.channel, None)
            elif msg.type == CHANNEL_SEND and msg.channel in self.channels:
                return self._send(from_client, msg, extra)
        except DecodeError as e:
            rec = self._anomaly("bad_structure", f"message type 0x{msg.type:04x}: {e}", from_client=from_client,
                                type=msg.type)
            if rec:
                extra.append(rec)
        return msg.raw, extra

    def _login_ack(self, msg: Message, extra: list[Command]) -> None:
        user = login_ack_user(msg.body).user_id
        if not user:
            return
        if not self.confirmed:
            self.identity, self.confirmed = user, True
            extra.append(self._event("sametime_login", user_id=user))
        elif user.lower() != self.identity.lower():
            rec = self._anomaly("identity_change", "a later LOGIN_ACK naming another user: the identity stays",
                                from_client=False, severity="high", user_id=self.identity, claimed=user)
            if rec:
                extra.append(rec)

    def _create(self, from_client: bool, msg: Message, extra: list[Command]) -> None:
        create = read_channel_create(msg.body)
        if create.service not in (SERVICE_IM, SERVICE_CONFERENCE, SERVICE_FILE_TRANSFER):
            return
        if len(self.channels) >= self.limits.sametime_max_channels and create.channel not in self.channels:
            rec = self._anomaly("too_many_channels", f"more than sametime_max_channels "
                                f"({self.limits.sametime_max_channels}) channels: this one is not followed",
                                from_client=from_client)
            if rec:
                extra.append(rec)
            return
        peer = create.target if from_client else (create.creator.user_id if create.creator else "")
        channel = Channel(create.channel, create.service, Opened.BY_CLIENT if from_client else Opened.BY_SERVER,
                          peer=peer)
        if create.service == SERVICE_CONFERENCE:
            channel.conference = conference_name(create.addtl)
        self.channels[create.channel] = channel
        if create.service == SERVICE_FILE_TRANSFER:
            try:
                name, size = file_offer(create.addtl)
            except DecodeError:
                name, size = "", 0
            extra.append(self._event("sametime_file_offer", name=name, size=size, peer=peer,
                                     outbound=from_client))

    def _send(self, from_client: bool, msg: Message, extra: list[Command]) -> tuple[bytes, list[Command]]:
        channel = self.channels[msg.channel]
        if channel.service == SERVICE_FILE_TRANSFER:
            return msg.raw, extra
        if msg.encrypted:
            return self._encrypted(from_client, msg, channel, extra)
        try:
            send_type, data = read_send(msg.body)
            if channel.service == SERVICE_IM:
                if send_type != IM_MESSAGE:
                    return msg.raw, extra
                im = read_im(data)
                if im is None:
                    return msg.raw, extra
                return self._decide(from_client, msg, channel, im.text, channel.peer, send_type,
                                    lambda text: write_im(im.kind, text), extra)
            return self._conference(from_client, msg, channel, send_type, data, extra)
        except DecodeError as e:
            rec = self._anomaly("bad_structure", f"a message on channel {msg.channel} cannot be read: {e}",
                                from_client=from_client)
            if rec:
                extra.append(rec)
            return (b"" if from_client else msg.raw), extra      # fail closed for what our client sends

    def _conference(self, from_client: bool, msg: Message, channel: Channel, send_type: int, data: bytes,
                    extra: list[Command]) -> tuple[bytes, list[Command]]:
        r = Reader(data)
        if send_type == CONF_WELCOME and not from_client:
            channel.conference = r.string() or channel.conference
            r.string()
            r.u32()
            for _ in range(min(r.u32(), 10_000)):
                member = r.u32()
                channel.members[member] = read_login_info(r).user_id
        elif send_type == CONF_JOIN and not from_client:
            member = r.u32()
            channel.members[member] = read_login_info(r).user_id
        elif send_type == CONF_MESSAGE:
            if from_client:
                text = r.string()
                return self._decide(True, msg, channel, text, "", send_type, lambda t: put_string(t), extra)
            member = r.u32()
            text = r.string()
            return self._decide(False, msg, channel, text, channel.members.get(member, f"member {member}"),
                                send_type, lambda t: struct.pack(">I", member) + put_string(t), extra)
        return msg.raw, extra

    def _context(self, from_client: bool, channel: Channel, other: str) -> ChatContext:
        room = channel.conference
        if from_client:
            recipients = (room,) if room else ((other,) if other else ())
            return self._ctx(recipients=recipients, conversation=room, origin=FROM_CLIENT)
        return self._ctx(sender=other, recipients=(self.identity,) if self.identity else (), conversation=room,
                         origin=FROM_SERVER)

    def _decide(self, from_client: bool, msg: Message, channel: Channel, text: str, other: str, send_type: int,
                write, extra: list[Command]) -> tuple[bytes, list[Command]]:
        if not text.strip():
            return msg.raw, extra
        ctx = self._context(from_client, channel, other)
        decision = self.checker.check_message(text, ctx)
        if decision.blocked:
            words = {"block": "blocked", "quarantine": "quarantined"}
            action = words.get(decision.action, "blocked")
            why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
            if from_client:
                to = channel.conference or other
                notice = decision.notice or f"Your message{' to ' + to if to else ''} was {action} by imguard: {why}"
            else:
                notice = f"A message from {other} was {action} by imguard: {why}"
            extra.append(Send(True, self._notice(channel, notice)))
            return b"", extra
        if decision.action == MASK and decision.masked_text is not None:
            data = write(decision.masked_text)
            return rebuild(msg, struct.pack(">H", send_type) + put_opaque(data)), extra
        return msg.raw, extra

    def _encrypted(self, from_client: bool, msg: Message, channel: Channel,
                   extra: list[Command]) -> tuple[bytes, list[Command]]:
        if not channel.told_encrypted:
            channel.told_encrypted = True
            rec = self._anomaly("encrypted_channel", "a Sametime channel encrypted with RC2 (negotiated at its "
                                "creation): its messages cannot be inspected", from_client=from_client,
                                severity="info", channel=msg.channel)
            if rec:
                extra.append(rec)
        if channel.service == SERVICE_FILE_TRANSFER:
            return msg.raw, extra
        decision = self.checker.check_message("", self._context(from_client, channel, channel.peer))
        if decision.blocked:
            extra.append(Send(True, self._notice(channel, "An encrypted message was blocked by imguard: it cannot "
                                                 "be inspected")))
            return b"", extra
        return msg.raw, extra
