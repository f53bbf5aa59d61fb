"""The Sametime Community client-to-server session: identity, one-to-one and conference messages to policy, file
transfers held and decided.
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
Encrypted channels (an IM or conference channel whose accept chose RC2/40 or RC2/128; CHANNEL_SEND with the ENCRYPT
option; cipher.py has libmeanwhile's scheme) are read, as a gateway in the middle can: RC2/40's keys are the two
parties' login ids (ours from LOGIN_ACK, the other's from the create or accept), so each message is decrypted on its
sender's chain and decided like a plain one; allowed, its original bytes cross (re-encrypted on the receiver's chain
once a dropped or masked message made the two chains differ). RC2/128 is Diffie-Hellman with unauthenticated public
keys in the create's offer and the accept: with `sametime_intercept_rc2_128` the gateway swaps each for its own (a
key pair per connection, made when first needed), so each leg has its own key, and what crosses is decrypted and
re-encrypted; without it (the default) the create and accept cross unchanged and the channel is not read. A notice
on such a channel goes to our client unencrypted (libmeanwhile reads a message without the ENCRYPT option as
plain). A file channel's keys are left alone (an encrypted chunk stops its file, below). What cannot be read (a
channel whose accept the gateway did not see, a login id under 4 bytes, an encrypt block that does not fit, data
that does not decrypt) is an `encrypted_channel` anomaly (once per channel) and decided by policy on empty text (so
a policy that blocks what it cannot read blocks it), as Matrix's end-to-end encrypted events are.
File transfers (service 0x38, both directions, the same code): the CHANNEL_CREATE names the file and its size
(`sametime_file_offer`); its creator is the sender (our client: outbound; the server's side: inbound). Its chunks
(TRANSFER) are *held, not forwarded*, in one `HeldTransfer` (imguard.files.tracker) per channel, made at its first
chunk: kind "sametime_ft" (its anomalies are sametime_ft_*), bounded by `sametime_max_held_bytes` (an offer
announcing more is cut at its first chunk) and, with the connection's other held files, by `sametime_max_transfers`
such files and `max_total_held_bytes`. Each chunk is one piece: its file bytes, and the message's bytes before them
as its head, so the release is byte-exact and the file held once. libmeanwhile's sender waits for the receiver's
RECEIVED before each next chunk, so the gateway answers the sender with a RECEIVED of its own for every held chunk
but the last, counting them; the file whole (its announced size), the tracker's `InspectFile`
(transfer_id "sametime-ft:<conn>:<channel>", mechanism "sametime"). Allowed: the held chunks go to the receiver in
order, and its RECEIVEDs are swallowed as many as the gateway gave; the one for the last chunk crosses, and the
sender, answered by its real receiver, closes the channel itself. Blocked or cut: the gateway destroys the channel
towards both parties with libmeanwhile's "rejected" reason (the receiver never got a byte; the sender, still waiting
for its last RECEIVED, sees its transfer refused: what tells an outside sender) and, as the tracker's tell rule
says, our client gets an IM from `[imguard]`: on its IM channel with the other party if one is open, else on an IM
channel the gateway opens to it from the user "imguard" (what our client sends there goes nowhere). Whatever
either party sends on a channel the gateway destroyed is dropped. A chunk past the announced size cuts the file
(sametime_ft_bad_chunk), so does an encrypted chunk (sametime_ft_encrypted: a channel that negotiated RC2 cannot
be inspected, fail closed), and a TRANSFER from the receiver's side is dropped. The sender destroying the channel
before the last byte abandons the file (sametime_ft_incomplete; its close crosses), and so does its leg of the
connection closing; the receiver leaving before the verdict lets the file be decided and delivers nothing.
Over TLS (HCL Sametime's "Direct connection using TLS": TLS from the first byte, on the same port) the carrier
terminates TLS on both legs and this session reads the same messages inside.
Anomalies (at most `sametime_max_anomalies_per_kind` per kind): framing (a length past the limit, no header: the
connection closes), a structure that does not fit (a client message on an IM or conference channel that cannot
be read is dropped: the server might read text we did not), a truncated message at close.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from imguard.files.tracker import ConnectionHolds, HeldTransfer, HoldState, Notice, Piece
from imguard.model import FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Close, Command, ProtocolEvent, Send, StreamSession, limited_anomaly
from imguard.protocols.sametime.cipher import RC2_40, RC2_128, Chain, CipherError, DhKeyPair, rc2_40_key
from imguard.protocols.sametime.decoder import (CHANNEL_ACCEPT, CHANNEL_CREATE, CHANNEL_DESTROY, CHANNEL_SEND,
                                                CONF_JOIN, CONF_MESSAGE, CONF_WELCOME, FT_REJECTED, FT_RECEIVED,
                                                FT_TRANSFER, IM_MESSAGE, LOGIN, LOGIN_ACK, SERVICE_CONFERENCE,
                                                SERVICE_FILE_TRANSFER, SERVICE_IM, DecodeError, FrameDecoder,
                                                Encrypt, FramingError, LoginInfo, Message, Reader, SametimeLimits,
                                                build_message, channel_destroy, conference_name, file_offer,
                                                ft_received, im_channel_create, login_ack_user, login_name,
                                                put_opaque, put_string, read_channel_accept, read_channel_create,
                                                read_im, read_login_info, read_send, rebuild, replace_encrypt_info,
                                                write_im)

GATEWAY_USER = "imguard"                # the party of the IM channel the gateway opens for a file notice
_GATEWAY_CHANNELS = 0xFFFFFF00          # its channel ids (a server's ids have the top bit set; these are far up)


class Opened(Enum):
    """Who opened a channel."""
    BY_CLIENT = "client"
    BY_SERVER = "server"
    BY_GATEWAY = "gateway"              # an IM channel the gateway opened to our client for a file notice


class FtState(Enum):
    """A file-transfer channel, as far as the session's framing goes (the file itself: its HeldTransfer)."""
    OFFERED = "offered"                 # created, no chunk yet
    HOLDING = "holding"                 # its tracker holds the chunks (or decides them)
    RELEASED = "released"               # allowed: delivered, the receiver's RECEIVEDs are being counted off
    REFUSED = "refused"                 # the gateway destroyed it towards both parties: whatever comes is dropped
    GONE = "gone"                       # abandoned by a party: what follows crosses as usual


@dataclass
class Leg:
    """One direction of an encrypted channel: the chain its sender encrypts with (read here), and the chain its
    receiver decrypts with (what is forwarded is encrypted on it). RC2/40 has one key for both, so what crosses
    unchanged is its original bytes while the two chains agree; RC2/128's legs have keys of their own."""
    inbound: Chain
    outbound: Chain
    same_key: bool


@dataclass
class Channel:
    id: int
    service: int
    opened: Opened
    peer: str = ""                      # the other party of an IM channel
    conference: str = ""                # a conference's name
    encrypted: bool = False
    told_encrypted: bool = False
    other_login: str = ""               # the other party's login id (its create's creator, its accept's acceptor)
    offer: Encrypt | None = None        # the creator's encrypt offer as it came (RC2/128: the creator's public key)
    legs: dict[bool, Leg] = field(default_factory=dict)      # from_client -> its leg, once the cipher is known
    members: dict[int, str] = field(default_factory=dict)     # conference member id -> user
    # a file-transfer channel
    file_name: str = ""
    file_size: int = 0
    ft: FtState = FtState.OFFERED
    transfer: HeldTransfer | None = None
    acks_owed: int = 0                  # RECEIVEDs the gateway gave the sender: swallowed from the receiver
    held_after: bytes = b""             # the sender's messages after its last chunk, released with the file

    @property
    def sender_is_client(self) -> bool:
        """A file channel's sender is its creator."""
        return self.opened is Opened.BY_CLIENT


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
        self.login_id = ""                      # our client's login id (LOGIN_ACK): its RC2/40 key
        self._dh: DhKeyPair | None = None       # the gateway's RC2/128 key pair, made when first needed
        self.channels: dict[int, Channel] = {}
        self._held: dict[str, Channel] = {}      # transfer id -> file channel whose tracker holds or decides
        self.holds = ConnectionHolds(max_bytes=limits.sametime_max_transfers * limits.sametime_max_held_bytes)
        self._next_gateway_channel = _GATEWAY_CHANNELS
        self._refused: dict[int, None] = {}     # file channels the gateway destroyed: what comes on them is dropped

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
                self._drop_held()
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
        return []       # no STARTTLS: Sametime over TLS is TLS from the first byte, this session reads inside it

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        channel = self._held.get(transfer_id)
        if channel is None or channel.transfer is None or self.closed:
            return []
        return self._carry(channel, channel.transfer.verdict(decision))

    def connection_closed(self, from_client: bool) -> list[Command]:
        out: list[Command] = []
        pending = self._decoders[from_client].pending
        if pending and not self.closed:
            rec = self._anomaly("truncated_message", "the connection closed in the middle of a Sametime message; not "
                                "forwarded", from_client=from_client, size=len(pending))
            if rec:
                out.append(rec)
        for channel in list(self._held.values()):
            t = channel.transfer
            if t is not None and t.state is HoldState.RECEIVING and channel.sender_is_client == from_client:
                # the sender's leg closed before the last byte: the file will not be whole
                out += self._carry(channel, t.abandon("sametime_ft_incomplete", f"the connection closed after "
                                                      f"{t.received} of {t.size} bytes; nothing was forwarded"))
            elif t is not None and channel.sender_is_client != from_client:
                t.receiver_closed()
        return out

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
            elif msg.type in (CHANNEL_SEND, CHANNEL_ACCEPT, CHANNEL_DESTROY) and msg.channel in self._refused:
                return b"", extra           # a file channel the gateway destroyed towards both parties
            elif msg.type == CHANNEL_CREATE:
                return self._create(from_client, msg, extra), extra
            elif msg.type == CHANNEL_ACCEPT:
                channel = self.channels.get(msg.channel)
                if channel is not None and channel.opened is Opened.BY_GATEWAY:
                    return b"", extra       # ours to our client: nobody else knows it
                if channel is not None:
                    return self._accept(from_client, msg, channel, extra), extra
            elif msg.type == CHANNEL_DESTROY:
                return self._destroy(from_client, msg, extra), extra
            elif msg.type == CHANNEL_SEND and msg.channel in self.channels:
                return self._send(from_client, msg, extra)
        except DecodeError as e:
            rec = self._anomaly("bad_structure", f"message type 0x{msg.type:04x}: {e}", from_client=from_client,
                                type=msg.type)
            if rec:
                extra.append(rec)
        return msg.raw, extra

    def _login_ack(self, msg: Message, extra: list[Command]) -> None:
        info = login_ack_user(msg.body)
        user = info.user_id
        if not user:
            return
        if not self.confirmed:
            self.identity, self.confirmed, self.login_id = user, True, info.login_id
            extra.append(self._event("sametime_login", user_id=user))
        elif user.lower() != self.identity.lower():
            rec = self._anomaly("identity_change", "a later LOGIN_ACK naming another user: the identity stays",
                                from_client=False, severity="high", user_id=self.identity, claimed=user)
            if rec:
                extra.append(rec)

    def _create(self, from_client: bool, msg: Message, extra: list[Command]) -> bytes:
        create = read_channel_create(msg.body)
        if create.service not in (SERVICE_IM, SERVICE_CONFERENCE, SERVICE_FILE_TRANSFER):
            return msg.raw
        if len(self.channels) >= self.limits.sametime_max_channels and create.channel not in self.channels:
            ft = create.service == SERVICE_FILE_TRANSFER
            rec = self._anomaly("too_many_channels", f"more than sametime_max_channels "
                                f"({self.limits.sametime_max_channels}) channels: this one is "
                                f"{'refused (a file is never let through unheld)' if ft else 'not followed'}",
                                from_client=from_client)
            if rec:
                extra.append(rec)
            if ft:
                extra.append(Send(to_client=from_client, data=channel_destroy(create.channel, FT_REJECTED)))
                return b""
            return msg.raw
        self._refused.pop(create.channel, None)     # the id is used again
        peer = create.target if from_client else (create.creator.user_id if create.creator else "")
        channel = Channel(create.channel, create.service, Opened.BY_CLIENT if from_client else Opened.BY_SERVER,
                          peer=peer, offer=create.encrypt)
        if not from_client and create.creator is not None:
            channel.other_login = create.creator.login_id
        if create.service == SERVICE_CONFERENCE:
            channel.conference = conference_name(create.addtl)
        self.channels[create.channel] = channel
        if create.service == SERVICE_FILE_TRANSFER:
            try:
                name, size = file_offer(create.addtl)
            except DecodeError:
                name, size = "", 0      # its first chunk is past the size: cut
            channel.file_name, channel.file_size = name, size
            extra.append(self._event("sametime_file_offer", name=name, size=size, peer=peer,
                                     outbound=from_client))
            return msg.raw          # an encrypted file channel is stopped at its first chunk: its keys stay theirs
        item = create.encrypt.item(RC2_128)
        if item is None or not self.limits.sametime_intercept_rc2_128:
            return msg.raw
        # RC2/128 offered: the other side gets the gateway's public key in place of the creator's (kept in `offer`)
        return rebuild(msg, replace_encrypt_info(msg.body, create.encrypt, item, self._dh_pair().public_bytes()))

    def _dh_pair(self) -> DhKeyPair:
        if self._dh is None:
            self._dh = DhKeyPair()
        return self._dh

    def _accept(self, from_client: bool, msg: Message, channel: Channel, extra: list[Command]) -> bytes:
        """A channel accepted: its acceptor (the other party of one our client opened), and its cipher: the legs
        that read and re-encrypt it (RC2/128: the acceptor's public key swapped for the gateway's, as the
        creator's was)."""
        _, acceptor, encrypt = read_channel_accept(msg.body)
        channel.encrypted = encrypt.mode != 0
        if acceptor is not None and not from_client:
            channel.other_login = acceptor.login_id
            if channel.opened is Opened.BY_CLIENT and not channel.peer:
                channel.peer = acceptor.user_id
        if not channel.encrypted or not encrypt.items or channel.service not in (SERVICE_IM, SERVICE_CONFERENCE):
            return msg.raw
        item = encrypt.items[0]
        if item.cipher == RC2_40:
            ours, theirs = rc2_40_key(self.login_id), rc2_40_key(channel.other_login)
            if ours is not None:
                channel.legs[True] = Leg(Chain(ours), Chain(ours), same_key=True)
            if theirs is not None:
                channel.legs[False] = Leg(Chain(theirs), Chain(theirs), same_key=True)
            return msg.raw
        offered = channel.offer.item(RC2_128) if channel.offer is not None else None
        if item.cipher != RC2_128 or offered is None or not self.limits.sametime_intercept_rc2_128:
            return msg.raw
        # the creator's key came in its offer, the acceptor's here; each leg's key is with the gateway's pair
        client_public, server_public = (offered.info, item.info) if channel.opened is Opened.BY_CLIENT \
            else (item.info, offered.info)
        dh = self._dh_pair()
        client_key, server_key = dh.key_with(client_public), dh.key_with(server_public)
        if client_key is not None and server_key is not None:
            channel.legs[True] = Leg(Chain(client_key), Chain(server_key), same_key=False)
            channel.legs[False] = Leg(Chain(server_key), Chain(client_key), same_key=False)
        return rebuild(msg, replace_encrypt_info(msg.body, encrypt, item, dh.public_bytes()))

    def _destroy(self, from_client: bool, msg: Message, extra: list[Command]) -> bytes:
        channel = self.channels.pop(msg.channel, None)
        if channel is None:
            return msg.raw
        if channel.opened is Opened.BY_GATEWAY:
            return b"" if from_client else msg.raw
        t = channel.transfer
        if t is None or not t.holding:
            return msg.raw
        if from_client == channel.sender_is_client:
            if t.state is HoldState.INSPECTING:
                channel.held_after += msg.raw       # its close follows the file, if the file goes
                self.channels[msg.channel] = channel
                return b""
            extra += self._carry(channel, t.abandon("sametime_ft_incomplete", f"the sender closed the channel after "
                                                    f"{t.received} of {t.size} bytes; nothing was forwarded"))
            channel.ft = FtState.GONE
            return msg.raw
        # the receiver leaves before the verdict: the file is still decided, nothing delivered
        extra += self._carry(channel, t.receiver_closed())
        return msg.raw

    def _send(self, from_client: bool, msg: Message, extra: list[Command]) -> tuple[bytes, list[Command]]:
        channel = self.channels[msg.channel]
        if channel.service == SERVICE_FILE_TRANSFER:
            return self._ft_send(from_client, msg, channel, extra), extra
        if channel.opened is Opened.BY_GATEWAY:
            return (b"" if from_client else msg.raw), extra       # our client answering imguard: nobody hears it
        if msg.encrypted:
            return self._decrypted(from_client, msg, channel, extra)
        return self._read_send(from_client, msg, channel, extra)

    def _decrypted(self, from_client: bool, msg: Message, channel: Channel,
                   extra: list[Command]) -> tuple[bytes, list[Command]]:
        """An encrypted message on a channel whose keys the gateway has: decrypted on its sender's chain, decided
        as a plain one, and what crosses encrypted on its receiver's chain (the original bytes while the chains
        agree; re-encrypted once a message was dropped or changed, or always with RC2/128's two keys)."""
        leg = channel.legs.get(from_client)
        if leg is None:
            return self._encrypted(from_client, msg, channel, extra, "its keys are not known to the gateway")
        try:
            send_type, data = read_send(msg.body)
            iv_before = leg.inbound.iv
            plain = leg.inbound.decrypt(data)
        except (DecodeError, CipherError) as e:
            return self._encrypted(from_client, msg, channel, extra, f"it does not decrypt: {e}")
        body = struct.pack(">H", send_type) + put_opaque(plain)
        clear = Message(msg.type, msg.options, msg.channel, body, rebuild(msg, body), msg.attribs)
        out, extra = self._read_send(from_client, clear, channel, extra)
        if not out:
            return out, extra
        if out == clear.raw:
            if leg.same_key and leg.outbound.iv == iv_before:
                leg.outbound.iv = data[-8:]
                return msg.raw, extra
        else:
            [changed] = [m for m in FrameDecoder(self.limits).feed(out) if isinstance(m, Message)]
            send_type, plain = read_send(changed.body)
        return rebuild(msg, struct.pack(">H", send_type) + put_opaque(leg.outbound.encrypt(plain))), extra

    def _read_send(self, from_client: bool, msg: Message, channel: Channel,
                   extra: list[Command]) -> tuple[bytes, list[Command]]:
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

    def _encrypted(self, from_client: bool, msg: Message, channel: Channel, extra: list[Command],
                   why: str) -> tuple[bytes, list[Command]]:
        """An encrypted message the gateway cannot read: policy decides on empty text."""
        if not channel.told_encrypted:
            channel.told_encrypted = True
            rec = self._anomaly("encrypted_channel", f"a Sametime channel encrypted with RC2 whose messages cannot "
                                f"be inspected: {why}", from_client=from_client, severity="info",
                                channel=msg.channel)
            if rec:
                extra.append(rec)
        decision = self.checker.check_message("", self._context(from_client, channel, channel.peer))
        if decision.blocked:
            extra.append(Send(True, self._notice(channel, "An encrypted message was blocked by imguard: it cannot "
                                                 "be inspected")))
            return b"", extra
        return msg.raw, extra

    # --- a file-transfer channel: its HeldTransfer in Sametime's terms ------------------------------------------

    def _ft_send(self, from_client: bool, msg: Message, channel: Channel, extra: list[Command]) -> bytes:
        sender = from_client == channel.sender_is_client
        try:
            send_type, data = read_send(msg.body)
        except DecodeError as e:
            rec = self._anomaly("bad_structure", f"a message on file channel {msg.channel} cannot be read: {e}",
                                from_client=from_client)
            if rec:
                extra.append(rec)
            return b"" if sender else msg.raw       # fail closed: it might be a chunk
        if send_type == FT_TRANSFER:
            if not sender:
                rec = self._anomaly("sametime_ft_wrong_direction", "file data from the receiver's side of a "
                                    "transfer: dropped", from_client=from_client, channel=msg.channel)
                if rec:
                    extra.append(rec)
                return b""
            extra += self._chunk(msg, channel, data)
            return b""
        if send_type == FT_RECEIVED and not sender and channel.acks_owed:
            channel.acks_owed -= 1                  # the gateway already gave the sender this one
            return b""
        if sender and channel.transfer is not None and channel.transfer.state is HoldState.INSPECTING:
            channel.held_after += msg.raw
            return b""
        return msg.raw

    def _chunk(self, msg: Message, channel: Channel, data: bytes) -> list[Command]:
        """A chunk of the file from its sender: held; the sender answered with a RECEIVED (all but the last)."""
        if channel.transfer is None and len(self._held) >= self.limits.sametime_max_transfers:
            t = self._hold(channel)
            text = (f"imguard: the file {channel.file_name!r} was stopped: more than "
                    f"{self.limits.sametime_max_transfers} files at once on this connection")
            return self._carry(channel, t.cut("sametime_ft_too_many", f"more than sametime_max_transfers "
                                              f"({self.limits.sametime_max_transfers}) files held at once",
                                              notice=text, receiver_notice=text))
        t = channel.transfer or self._hold(channel)
        if t.state is not HoldState.RECEIVING:
            return self._carry(channel, t.append(data))         # after the file was whole: an overrun, dropped
        if channel.file_size > self.limits.sametime_max_held_bytes:
            return self._carry(channel, t.too_large(channel.file_size))
        if msg.encrypted:
            text = (f"imguard: the file {channel.file_name!r} was stopped: its channel is encrypted, so it could not "
                    "be inspected")
            return self._carry(channel, t.cut("sametime_ft_encrypted", "a chunk encrypted with the channel's RC2 "
                                              "cipher: the file cannot be inspected", notice=text,
                                              receiver_notice=text))
        if t.received + len(data) > channel.file_size:
            text = f"imguard: the file {channel.file_name!r} was stopped: it sent more than it announced"
            return self._carry(channel, t.cut("sametime_ft_bad_chunk", f"a chunk of {len(data)} bytes after "
                                              f"{t.received} of an announced {channel.file_size}",
                                              notice=text, receiver_notice=text))
        if data and msg.raw.endswith(data):
            out = t.append(data, head=msg.raw[:len(msg.raw) - len(data)])   # held once: the head, then the bytes
        else:
            out = t.append(data, wire=msg.raw)
        out = self._carry(channel, out)
        if t.state is not HoldState.RECEIVING:
            return out                              # cut: the connection's or the gateway's hold limit
        if t.complete:
            return out + self._carry(channel, t.inspect())
        channel.acks_owed += 1
        return out + [Send(to_client=channel.sender_is_client, data=ft_received(channel.id))]

    def _hold(self, channel: Channel) -> HeldTransfer:
        """The channel's tracker, made at its first chunk: multiplexed with the chat (owns_connection False), its
        anomalies sametime_ft_*, its bytes counted in this connection's holds."""
        if channel.sender_is_client:
            ctx = self._ctx(recipients=(channel.peer,) if channel.peer else (), origin=FROM_CLIENT,
                            transfer_mechanism="sametime")
        else:
            ctx = self._ctx(sender=channel.peer, recipients=(self.identity,) if self.identity else (),
                            origin=FROM_SERVER, transfer_mechanism="sametime")
        transfer_id = f"sametime-ft:{self.context.connection_id}:{channel.id}:{next(_ids)}"
        channel.transfer = HeldTransfer(
            transfer_id, ctx, sender_is_client=channel.sender_is_client, kind="sametime_ft",
            max_bytes=self.limits.sametime_max_held_bytes, size=channel.file_size, name=channel.file_name,
            sender_name=ctx.sender, holds=self.holds,
            deliver=lambda transfer, pieces: self._deliver(channel, transfer, pieces),
            refuse=lambda transfer: self._refuse(channel, transfer),
            tell=lambda transfer, notice: self._tell(channel, notice),
            event_data={"channel": channel.id, "name": channel.file_name},
            scan_notice_in_band=True)       # our client is told "being scanned" in an IM
        channel.ft = FtState.HOLDING
        self._held[transfer_id] = channel
        return channel.transfer

    def _deliver(self, channel: Channel, transfer: HeldTransfer, pieces: list[Piece]) -> list[Command]:
        """Allowed: the held chunks, in order, byte-exact, and whatever the sender sent after its last one."""
        channel.ft = FtState.RELEASED
        data = transfer.lead + b"".join(p.released for p in pieces) + channel.held_after
        channel.held_after = b""
        return [Send(to_client=transfer.receiver_is_client, data=data)]

    def _refuse(self, channel: Channel, transfer: HeldTransfer) -> list[Command]:
        """Blocked or cut: the channel destroyed towards both parties ("rejected"): the receiver got nothing, the
        sender waits for a last RECEIVED it will not get. An abandoned file: its party's own close crosses."""
        if transfer.state is HoldState.ABANDONED:
            channel.ft = FtState.GONE
            return []
        channel.ft, channel.held_after = FtState.REFUSED, b""
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]
        self._refused[channel.id] = None
        while len(self._refused) > 256:             # bounded: the oldest is forgotten
            self._refused.pop(next(iter(self._refused)))
        out = [] if transfer.receiver_gone else [Send(to_client=transfer.receiver_is_client,
                                                      data=channel_destroy(channel.id, FT_REJECTED))]
        return out + [Send(to_client=transfer.sender_is_client, data=channel_destroy(channel.id, FT_REJECTED))]

    def _tell(self, channel: Channel, notice: Notice) -> list[Command]:
        """Our client (the file's sender or receiver) gets an IM from [imguard]; the outside sender has the
        channel's rejection (see the module docstring)."""
        if not notice.party.inside or self.closed:
            return []
        text = notice.text.removeprefix("imguard: ")
        im = next((c for c in reversed(self.channels.values()) if c.service == SERVICE_IM
                   and c.opened is not Opened.BY_GATEWAY and c.peer and c.peer.lower() == channel.peer.lower()), None)
        if im is not None:
            return [Send(True, self._notice(im, text))]
        out: list[Command] = []
        im = next((c for c in self.channels.values() if c.opened is Opened.BY_GATEWAY), None)
        if im is None:
            im = Channel(self._next_gateway_channel, SERVICE_IM, Opened.BY_GATEWAY, peer=GATEWAY_USER)
            self._next_gateway_channel = _GATEWAY_CHANNELS + (im.id + 1 - _GATEWAY_CHANNELS) % 0x100
            self.channels[im.id] = im
            out.append(Send(True, im_channel_create(im.id, self.identity, LoginInfo(GATEWAY_USER, GATEWAY_USER,
                                                                                      GATEWAY_USER, ""))))
        return out + [Send(True, self._notice(im, text))]

    def _carry(self, channel: Channel, cmds: list[Command]) -> list[Command]:
        """The tracker's commands, its anomalies under the per-kind cap; a file no longer held or decided is
        forgotten here."""
        out: list[Command] = []
        for c in cmds:
            if isinstance(c, Anomaly):
                c = self._capped(c)
            if c is not None:
                out.append(c)
        t = channel.transfer
        if t is not None and not t.holding:
            self._held.pop(t.transfer_id, None)
        return out

    def _capped(self, anomaly: Anomaly) -> Anomaly | None:
        seen = self.anomaly_counts[anomaly.kind] = self.anomaly_counts.get(anomaly.kind, 0) + 1
        limit = self.limits.sametime_max_anomalies_per_kind
        if seen > limit:
            return None
        if seen == limit:
            return dataclasses.replace(anomaly, data={**anomaly.data, "further_suppressed": True})
        return anomaly

    def _drop_held(self) -> None:
        """The connection closes on a framing error: every held file goes with it, unreleased (the framing
        error's anomaly explains it)."""
        for channel in list(self._held.values()):
            if channel.transfer is not None:
                channel.transfer.abandon("sametime_ft_incomplete", "the connection closed on a framing error")
        self._held.clear()


_ids = itertools.count(1)
