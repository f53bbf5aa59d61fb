"""The IRC client-to-server session: identity tracking, message policy, STARTTLS and DCC offers. Sans-io.

    session = IrcSession(pipeline, transfers, ChatContext(client_address=..., server_address=...))
    session.data_received(True, b"PRIVMSG #ops :the password is hunter2\\r\\n")
        -> [Send(to_client=False, data=b"PRIVMSG #ops :the password is *******\\r\\n")]       (mask)
        -> [Send(to_client=True, data=b":imguard NOTICE alice :Your message ... was blocked ...\\r\\n")]  (block)
    session.data_received(False, b":mallory!m@203.0.113.5 PRIVMSG alice :project-bluebird\\r\\n")
        -> [Send(to_client=True, data=b":imguard NOTICE alice :A message from mallory was blocked ...\\r\\n")]

Both directions are decided. The client is the user behind the gateway (inside): what it sends has
`origin=FROM_CLIENT` (outbound unless the zones say every recipient is internal); the PRIVMSGs and NOTICEs
the server delivers to it come from someone on the server's side and have `origin=FROM_SERVER` (inbound
unless the zones say the sender is internal); the pipeline derives the direction from that. Other server
lines (numerics, JOIN, PART, MODE, ...) are only decoded for context (registered nick, renames, SASL
account, ISUPPORT, STARTTLS, DCC offers made *to* the user) and forwarded byte for byte: they cost no policy.

Identity: the nick confirmed by the welcome (001) is the person's identity for the whole connection;
renames (`:old!u@h NICK new`, confirmed by the server) change the nick used for notices but events
keep the identity. A SASL account (900 RPL_LOGGEDIN, else the PLAIN authcid once 903 says success)
replaces it as the label: an account is what the server vouches for. Only the server's own lines move them:
a NICK whose prefix is our current nick, the first 001, the first account; a second welcome or a 900 naming
another account later is an `identity_change` anomaly (high) and changes nothing, and a 901 (logged out)
leaves the label as it was.

Text policy, from the client: PRIVMSG and NOTICE (plain text and CTCP ACTION; also CPRIVMSG, CNOTICE, SQUERY,
WALLOPS), TOPIC, SETNAME, the free-text reasons of PART, QUIT, KICK, KNOCK and AWAY, and the values of IRCv3
client-only tags (`+name=value`, which other clients receive) go to `checker.check_message(text, ctx)`.
An OTR message (a PRIVMSG or NOTICE whose text starts "?OTR", either direction) goes with `ctx.encryption` "otr",
for policy's `encrypted` condition (its text, the ciphertext, is checked too).
Allow/alert: the exact bytes cross.
Mask: the text param is rewritten (tags and prefix kept). Block/quarantine: the line is dropped and the
user gets `:imguard NOTICE <nick> :<why>`; for PART/QUIT/KICK/KNOCK/AWAY the command still goes,
without its text (a person must be able to leave). A line whose text param is ambiguous (more params
than the command takes), or that carries a bare CR or a NUL, is dropped as an anomaly.

Text policy, from the server: a PRIVMSG or NOTICE (plain text and CTCP ACTION) from a person (a nick!user@host
prefix) other than our user (an echo-message copy of our own line was decided on its way out) goes to
`checker.check_message` with sender = that prefix, recipients = our user (a query) or the channel,
conversation = the channel. Allow/alert: the exact bytes reach our user; mask: the text is rewritten; block:
the line is dropped and our user gets `:imguard NOTICE <nick> :A message from <nick> ... was blocked by
imguard: <why>`. A server's own notices (a server name as the prefix) are not chat and only forwarded. A
PRIVMSG/NOTICE line from the server with too many params, or one the decoder rejects (NUL, bare CR) but a
client could read as a message, is dropped as an anomaly rather than passed on undecided.

STARTTLS (IRCv3, deprecated but alive): client STARTTLS is forwarded; the server's 670 is forwarded,
then `StartTls`. Anything either side sent after those two lines and before TLS (the client: after its
STARTTLS, before the 670 or 691) is dropped as an anomaly: it is the plaintext-injection attack (CVE-2011-0411
style) on STARTTLS.

DCC (CTCP in PRIVMSG/NOTICE, either direction): a SEND or CHAT offer becomes a `DccOffer` in the
shared ExpectedTransfers table (kind "dcc", key (host, port)) and a "dcc_offer" event. With
`dcc_relay=(host, allocate)` the offer is rewritten to host:allocate(offer), so the data connection
must cross the gateway; the table is keyed by that relay address and keeps the real one. Passive DCC
(port 0 + token) is matched to its reply by token; RESUME/ACCEPT ports are translated between the
relay port (the receiver's view) and the real one (the sender's) and the offer's position renewed.
A malformed offer (bad size, port or address) is an anomaly and dropped, with a notice to our user;
an offer larger than `max_held_bytes` is refused (it could not be inspected). Offers made *to* our
user (from the server side) are registered and relayed the same way, so an inbound file's data connection
crosses the gateway too and is held and decided before our user gets a byte: active DCC, our user connects
to the relay and the gateway on to the outside sender; passive DCC, our user's answer (its own address) is
rewritten, so the outside sender connects to the relay and the gateway on to our user. The file's context
has `origin=FROM_SERVER` (sender the offerer's nick!user@host, recipient our user): its alerts say inbound,
and a blocked inbound file is explained to our user (the receiver) on this connection.

Events: anomalies (Anomaly facts) and protocol events (ProtocolEvent facts): "irc_registered" (nick, user,
host, realname, account, caps, tls), "irc_nick_change" (old, new, identity), "irc_logged_in", "dcc_offer",
"dcc_refused".
Message decisions are written by the checker (Pipeline.check_message), not here.

Ethical walls in channels (docs/rules.md "Rooms"): JOIN, PART, KICK, QUIT, NICK and NAMES (353/366) keep the member
lists of our user's channels (policy/walls.Rooms, `max_room_members`). Our user's JOIN into a channel where the NAMES
show the other side is taken back (the gateway sends PART, our user gets a NOTICE); its PRIVMSG/NOTICE to a channel is
decided against the channel's members, and a channel message from a member walled off from our user is not delivered
(checker.check_membership: `wall_join`, `wall_message` events).

WARN (imguard/conversation.py): our user's PRIVMSG is held and a NOTICE says why and how to answer; its
`PRIVMSG <same target> :!justify <reason>` (or `!falsepositive`) is not forwarded: it releases the held line byte-exact
or not, with a NOTICE saying so. A delivered PRIVMSG under WARN is refused like a block, unless it is the copy of one
this gateway released. A due disclaimer goes before the message: a NOTICE from `imguard` to our user and
`NOTICE <peer>` (from our user) to the other party; in a channel, `:imguard NOTICE #channel` to our user (and with
disclaimer_in_room `NOTICE #channel` from our user, for every member).
"""

from __future__ import annotations

import base64
import binascii
import collections
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from imguard.conversation import (RELEASED, SIDE_WARNINGS, Answer, ConversationSettings, PendingWarnings, WarnOutcome,
                                  WarnState, outcome, parse_answer, settle_answer, warn_instructions)
from imguard.model import FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.model import WARN
from imguard.protocols.base import (Anomaly, Close, Command, MembershipChecker, OutgoingCommands, ProtocolEvent, Send,
                                    StartTls, StreamSession, Wake, block_words, limited_anomaly)
from imguard.policy.walls import Rooms, decide_room
from imguard.protocols.irc.dcc import CHAT, DCC_KIND, SEND, DccOffer, new_offer_id, remember_offer
from imguard.protocols.irc.decoder import (BadLine, Ctcp, DccError, DccResume, DccSend, IrcLimits,
                                           LineDecoder, LineTooLong, Message, encode_text, format_ctcp,
                                           format_dcc_chat, format_dcc_resume, format_dcc_send, parse_dcc,
                                           parse_line, split_ctcp)

GATEWAY_NAME = "imguard"        # the prefix of notices the gateway writes into the chat
_CTX_CACHE_SIZE = 64            # contexts kept per connection (one per channel or peer)
_INBOUND_CACHE_SIZE = 256       # contexts of what the server delivers (one per sender and channel or query)


def _is_otr(text: str) -> bool:
    """An OTR message (data, query, error or a fragment: all start "?OTR"): ChatContext.encryption "otr"."""
    return text.lstrip().startswith("?OTR")


# command -> (index of the target param or None, index of the text param, droppable)
# droppable: a blocked text drops the whole line; otherwise the command goes without its text.
TEXT_COMMANDS = {
    "PRIVMSG": (0, 1, True),
    "NOTICE": (0, 1, True),
    "CPRIVMSG": (0, 2, True),       # hybrid/ratbox/solanum: CPRIVMSG <nick> <channel> :<text>
    "CNOTICE": (0, 2, True),
    "SQUERY": (0, 1, True),         # RFC 2812 §3.3.2: a message to a service
    "WALLOPS": (None, 0, True),
    "TOPIC": (0, 1, True),
    "SETNAME": (None, 0, True),     # IRCv3 setname: the visible real name
    "PART": (0, 1, False),
    "KICK": (0, 2, False),
    "KNOCK": (0, 1, False),
    "QUIT": (None, 0, False),
    "AWAY": (None, 0, False),
}
MESSAGE_COMMANDS = ("PRIVMSG", "NOTICE", "CPRIVMSG", "CNOTICE")     # these carry CTCP (and DCC)
# Client-only tags (IRCv3 '+name') relay arbitrary values to other clients; these carry no free text.
BENIGN_CLIENT_TAGS = {"+typing", "+draft/typing", "+draft/reply", "+reply", "+draft/channel-context",
                      "+channel-context", "+draft/react", "+react"}
UNCHECKED_CTCP = {"DCC", "PING", "VERSION", "TIME", "CLIENTINFO", "SOURCE", "FINGER"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# A line from the server the decoder cannot use, but a client might read as a message: dropped, not forwarded
# undecided (a NUL or a bare CR inside a PRIVMSG from outside).
_MESSAGE_WORD = re.compile(rb"(?i)(?:^|[ \r])(?:PRIVMSG|NOTICE)(?: |$)")
EMPTY_KINDS = {"empty_line"}
ROOM_LINES = frozenset({"JOIN", "PART", "QUIT", "KICK", "NICK", "353", "366"})   # who is in our user's channels
NAMES_PREFIXES = "~&@%+"        # channel status prefixes in a NAMES reply (RPL_NAMREPLY 353)


@dataclass(frozen=True)
class DccRelay:
    """Where DCC offers are rewritten to point, so the data connection crosses the gateway.
    `allocate(offer)` returns a port on `host` where the carrier will accept that offer's connection
    (and look the offer up in the table by (host, port)); raising refuses the offer."""
    host: str
    allocate: Callable[[DccOffer], int]


def _escape_tag(value: str) -> str:
    return (value.replace("\\", "\\\\").replace(";", "\\:").replace(" ", "\\s")
            .replace("\r", "\\r").replace("\n", "\\n"))


class IrcSession(StreamSession):
    """One IRC client connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, limits: IrcLimits = IrcLimits(),
                 tls_on_connect: bool = False, dcc_relay: DccRelay | tuple | None = None,
                 conversation: ConversationSettings | None = None):
        self.checker = checker
        # messages a `warn` rule holds until their sender answers (imguard/conversation.py)
        self.warnings = PendingWarnings(conversation or ConversationSettings())
        self.transfers = transfers
        self.context = context.with_(protocol="irc")
        self._ctx_cache: dict[tuple, ChatContext] = {}
        self._inbound_cache: dict[tuple, ChatContext] = {}
        self.limits = limits
        self.tls = tls_on_connect
        if isinstance(dcc_relay, tuple):
            dcc_relay = DccRelay(*dcc_relay)
        self.dcc_relay: DccRelay | None = dcc_relay
        self._decoders = {True: LineDecoder(limits), False: LineDecoder(limits)}
        self.closed = False
        self.anomaly_counts: dict[str, int] = {}
        # who
        self.nick = ""                  # current nick ("" before NICK)
        self.identity = ""              # the nick the server welcomed first: stays across renames
        self.user = ""                  # from USER, then from the server's view of us
        self.host = ""
        self.realname = ""
        self.account = ""               # SASL account, when logged in
        self.registered = False
        # what the server supports, and what was negotiated (CAP ACK)
        self.caps: set[str] = set()
        self.chantypes = "#&"
        self.statusmsg = "@+"
        # STARTTLS and SASL
        self.starttls_requested = False
        self._starting_tls = False
        self._sasl_mechanism = ""
        self._sasl_chunks: list[str] = []
        self._sasl_account = ""         # from the PLAIN message, until the server says 903/900
        # DCC offers seen on this connection, for RESUME/ACCEPT and passive replies (oldest forgotten)
        self._offers: collections.OrderedDict[tuple, DccOffer] = collections.OrderedDict()
        # the members of the channels our user is in (ethical walls); channels joined whose NAMES are still coming
        self.rooms = Rooms(limits.max_room_members)
        self._joining: set[str] = set()
        self._walls = isinstance(checker, MembershipChecker)     # (a Protocol isinstance costs microseconds)

    # --- who --------------------------------------------------------------------------------------------

    @property
    def sender(self) -> str:
        """The label of this connection's person: the SASL account, else the registered nick."""
        return self.account or self.identity or self.nick

    @property
    def mask(self) -> str:
        """nick!user@host as far as known."""
        m = self.nick or "*"
        if self.user:
            m += "!" + self.user
        if self.host:
            m += "@" + self.host
        return m

    def _ctx(self, **changes: Any) -> ChatContext:
        """The connection's context with this sender and `changes`. A connection talks in a few channels
        and queries, thousands of times: each context is built once and reused (dataclasses.replace costs
        ~9 us, and the same object lets the pipeline and the event writer cache what they derive from it)."""
        key = (self.sender, *changes.items())
        ctx = self._ctx_cache.get(key)
        if ctx is None:
            if len(self._ctx_cache) >= _CTX_CACHE_SIZE:     # someone messaging thousands of targets
                self._ctx_cache.clear()
            ctx = self._ctx_cache[key] = self.context.with_(sender=self.sender, **changes)
        return ctx

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        out = OutgoingCommands()
        for step in self.data_received_steps(from_client, data):
            out.add(*step)
        return out.cmds

    def data_received_steps(self, from_client: bool, data: bytes) -> Iterator[list[Command]]:
        """data_received, one line at a time: the commands for each line as soon as it is decided, so a
        carrier can forward the first lines of a read while it checks the rest."""
        if self.closed:
            return
        if self._starting_tls:
            # Bytes after STARTTLS/670 and before the TLS handshake: plaintext injection; never forwarded.
            yield [self._anomaly("starttls_injection", "plaintext after STARTTLS was agreed; dropped",
                                 from_client=from_client, size=len(data))]
            return
        if self.warnings and (expired := self.warnings.expire()):
            yield list(self.warnings.dropped(expired))          # held past the window: dropped, recorded
        events = self._decoders[from_client].feed(data)
        for i, ev in enumerate(events):
            out = OutgoingCommands()
            if isinstance(ev, LineTooLong):
                self.closed = True
                out.add(self._anomaly(ev.kind, ev.detail, from_client=from_client), Close("IRC line too long"))
                yield out.cmds
                return
            if isinstance(ev, BadLine):
                self._bad_line(out, from_client, ev)
            elif from_client:
                self._client_message(out, ev)
            else:
                self._server_message(out, ev)
            if self._starting_tls:
                rest = sum(len(getattr(e, "raw", b"")) for e in events[i + 1:])
                rest += len(self._decoders[True].clear()) + len(self._decoders[False].clear())
                if rest:
                    out.add(self._anomaly("starttls_injection", "plaintext after STARTTLS was agreed; dropped",
                                          from_client=from_client, size=rest))
                out.add(StartTls())
                yield out.cmds
                return
            yield out.cmds

    def tls_started(self) -> list[Command]:
        self.tls = True
        self._starting_tls = False
        self.starttls_requested = False
        self._decoders = {True: LineDecoder(self.limits), False: LineDecoder(self.limits)}
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        return []       # DCC files are held by DccSendSession on their own connection

    def connection_closed(self, from_client: bool) -> list[Command]:
        # held messages can no longer be answered (client gone) or delivered (server gone): dropped, recorded
        out: list[Command] = list(self.warnings.dropped(self.warnings.abandon()))
        for side in SIDE_WARNINGS.abandon(self.context.connection_id) if self.context.connection_id else ():
            out += [outcome(side.held, self.warnings.clock()), Wake(connection_id=side.side)]  # its DCC file dropped
        pending = self._decoders[from_client].pending
        if pending and not self.closed:
            record = self._anomaly("incomplete_line", "the connection closed in the middle of a line; "
                                   "the partial line was not forwarded", from_client=from_client, size=len(pending))
            out += [record] if record else []
        return out

    # --- for the carrier ----------------------------------------------------------------------------

    def notice(self, text: str) -> list[Command]:
        """A notice from the gateway to this connection's user (e.g. a DCC file blocked on its own connection)."""
        if self.closed:
            return []
        return [Send(to_client=True, data=self._notice_line(text))]

    def addressee(self) -> str:
        return self.sender if self.registered and not self.closed else ""

    # --- lines --------------------------------------------------------------------------------------

    def _notice_line(self, text: str) -> bytes:
        text = _CONTROL.sub(" ", text).strip() or "imguard"
        head = f":{GATEWAY_NAME} NOTICE {self.nick or '*'} :"
        line = encode_text(head + text)
        if len(line) > self.limits.max_body_length - 2:
            cut = line[:self.limits.max_body_length - 2]
            line = cut.decode("utf-8", "ignore").encode("utf-8")
        return line + b"\r\n"

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly | None:
        """An anomaly record; past max_anomalies_per_kind of one kind on this connection, only counted."""
        return limited_anomaly(self.anomaly_counts, self.limits.max_anomalies_per_kind, self._ctx(),
                               kind, detail, **data)

    def _event(self, action: str, category: str = "session", ctx: ChatContext | None = None,
               **data: Any) -> ProtocolEvent:
        return ProtocolEvent("irc", action, ctx or self._ctx(), category, data)

    def _bad_line(self, out: OutgoingCommands, from_client: bool, ev: BadLine) -> None:
        if ev.kind in EMPTY_KINDS:
            out.send(not from_client, ev.raw)
            return
        if from_client or not _MESSAGE_WORD.search(ev.raw):
            out.add(self._anomaly(ev.kind, ev.detail, from_client=from_client, line=ev.raw[:200].decode("latin-1")))
            if not from_client:
                out.send(True, ev.raw)      # the server's own oddities are its business
            return
        # It could be read as a message from someone outside, which could not be decided: not passed on.
        out.add(self._anomaly(ev.kind, ev.detail + "; a message line from the server, dropped", from_client=False,
                              line=ev.raw[:200].decode("latin-1"), dropped=True))

    # --- client -> server ---------------------------------------------------------------------------

    def _client_message(self, out: OutgoingCommands, msg: Message) -> None:
        if self.starttls_requested and not self.tls:
            # Pipelined after STARTTLS, before the server's 670/691: a vulnerable server would read it as sent
            # inside TLS (CVE-2011-0411). Never forwarded.
            out.add(self._anomaly("starttls_injection", "a line sent after STARTTLS before the server answered; "
                                  "dropped", from_client=True, size=len(msg.raw), command=msg.command))
            return
        if msg.overlong:
            out.add(self._anomaly("overlong_line", f"a {len(msg.raw)}-byte line (body over "
                                  f"{self.limits.max_body_length})", from_client=True, command=msg.command))
        cmd = msg.command
        if cmd == "NICK" and msg.params:
            if not self.registered:
                self.nick = msg.params[0]
        elif cmd == "USER" and msg.params:
            self.user = self.user or msg.params[0]
            self.realname = msg.param(3)
        elif cmd == "AUTHENTICATE" and msg.params:
            self._client_authenticate(msg.params[0])
        elif cmd == "STARTTLS":
            if self.tls:
                out.add(self._anomaly("starttls_in_tls", "STARTTLS on a connection already in TLS",
                                      from_client=True))
            else:
                self.starttls_requested = True
        if any(k.startswith("+") and v and k not in BENIGN_CLIENT_TAGS for k, v in msg.tags.items()):
            msg = self._client_tags(out, msg)
            if msg is None:
                return
        if cmd in TEXT_COMMANDS:
            self._client_text(out, msg)
            return
        if cmd == "INVITE" and len(msg.params) >= 2 and self._invite_refused(out, msg, True):
            return
        out.send(False, msg.raw)

    def _invite_refused(self, out: OutgoingCommands, msg: Message, from_client: bool) -> bool:
        """INVITE <nick> <channel>: the inviter and the invitee decided by policy's ethical walls
        (checker.check_membership, which records it). Refused: the line is dropped and our user told."""
        if not isinstance(self.checker, MembershipChecker):
            return False
        invitee, channel = msg.params[0], msg.params[1]
        if from_client:
            ctx = self._ctx(recipients=(invitee,), conversation=channel, origin=FROM_CLIENT)
        elif msg.prefix and msg.nick.lower() != self.nick.lower():
            ctx = self._inbound_ctx(msg.prefix, self.sender, channel)
        else:
            return False
        decision = self.checker.check_membership("invite", ctx, channel)
        if not decision.blocked:
            return False
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        text = (f"Your invitation of {invitee} to {channel} was blocked by imguard: {why}" if from_client else
                f"An invitation from {msg.nick} to {channel} was blocked by imguard: {why}")
        out.add(Send(True, self._notice_line(text)))
        return True

    # --- channels and their members (ethical walls) ---------------------------------------------------------

    def _room_line(self, out: OutgoingCommands, msg: Message) -> None:
        """Who is in the channels our user is in: JOIN, PART, KICK, QUIT and NICK lines and the NAMES reply (353,
        ended by 366). A member's identity for the groups is its nick!user@host where a line shows it (JOIN, NICK,
        NAMES under userhost-in-names), else its nick, as a message's sender is. Our user's own JOIN is decided at
        the end of the channel's NAMES (366) against the members it lists; another member's JOIN when our user is
        there is decided too (an event when a wall matches; our user is told, and from then on its messages to the
        channel are refused while that member is in it)."""
        cmd, params = msg.command, msg.params
        me, nick = self.nick.lower(), (msg.nick or "").lower()
        if cmd == "JOIN" and params:
            for channel in params[0].split(","):
                room = channel.lower()
                if nick == me:
                    self.rooms.close(room)
                    self.rooms.open(room)
                    self._joining.add(room)
                elif room in self.rooms:
                    self._member_joined(out, room, channel, nick, msg.prefix)
        elif cmd == "PART" and params:
            for channel in params[0].split(","):
                if nick == me:
                    self.rooms.close(channel.lower())
                else:
                    self.rooms.leave(channel.lower(), nick)
        elif cmd == "KICK" and len(params) >= 2:
            if params[1].lower() == me:
                self.rooms.close(params[0].lower())
            else:
                self.rooms.leave(params[0].lower(), params[1].lower())
        elif cmd == "QUIT" and nick and nick != me:
            self.rooms.quit(nick)
        elif cmd == "NICK" and params and nick:
            self.rooms.rename(nick, params[0].lower(), params[0] + msg.prefix[len(msg.nick):])
        elif cmd == "353" and len(params) >= 4 and params[2].lower() in self.rooms:
            room = params[2].lower()
            for word in params[3].split():
                word = word.lstrip(NAMES_PREFIXES)
                name = word.split("!", 1)[0]
                if name and not self.rooms.enter(room, name.lower(), word):
                    out.add(self._anomaly("room_members_overflow", f"more than {self.limits.max_room_members} "
                                          "channel members on this connection: not all recorded",
                                          from_client=False, channel=params[2]))
                    break
        elif cmd == "366" and len(params) >= 2 and params[1].lower() in self._joining:
            self._joining.discard(params[1].lower())
            self._our_join(out, params[1])

    def _member_joined(self, out: OutgoingCommands, room: str, channel: str, nick: str, prefix: str) -> None:
        if not self.rooms.enter(room, nick, prefix):
            out.add(self._anomaly("room_members_overflow", f"more than {self.limits.max_room_members} channel "
                                  "members on this connection: not all recorded", from_client=False, channel=channel))
            return
        decision = self.checker.check_membership("join", self._inbound_ctx(prefix, self.sender, channel), channel)
        if decision.blocked:
            why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
            out.add(Send(True, self._notice_line(f"{prefix.split('!', 1)[0]} joined {channel}: {why}. imguard "
                                                 f"does not deliver your messages to {channel} while they are in "
                                                 "it.")))

    def _our_join(self, out: OutgoingCommands, channel: str) -> None:
        """Our user's JOIN, decided against the members the NAMES reply listed. Refused: the gateway parts the
        channel for our user (the server's PART reaches the client, which shows it left) and says why. (The
        members are known only once the server has let our user in: the JOIN cannot be refused before.)"""
        members = self.rooms.identities(channel.lower(), besides=self.nick.lower())
        if not members:
            return
        decision = self.checker.check_membership("join", self._ctx(recipients=members, conversation=channel,
                                                                  origin=FROM_CLIENT), channel)
        if decision.blocked:
            why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
            out.send(False, encode_text(f"PART {channel}") + b"\r\n")
            out.add(Send(True, self._notice_line(f"Your join of {channel} was refused by imguard, which took you "
                                                 f"out of it again: {why}")))

    def _walled_room_message(self, out: OutgoingCommands, channels: list[str]) -> bool:
        """Our user's message to channels: its recipients, for the walls, are the channels' members. True: a wall
        refused it (dropped, our user told with the wall's notice)."""
        if not self._walls:
            return False
        for channel in channels:
            if channel.lower() not in self.rooms:
                continue
            decision = decide_room(lambda ctx, channel=channel: self.checker.check_membership("message", ctx, channel),
                                   self.rooms, channel.lower(), lambda members, channel=channel: self._ctx(
                                       recipients=members, conversation=channel, origin=FROM_CLIENT),
                                   besides=self.nick.lower())
            if decision is not None and decision.blocked:
                out.add(Send(True, self._notice_line(decision.notice or self._default_notice(
                    decision, "message", (channel,)))))
                return True
        return False

    def _walled_delivery(self, out: OutgoingCommands, msg: Message, prefix: str, channel: str) -> bool:
        """A channel message to our user, a member of it, from `prefix`: decided by the walls with our user as its
        recipient. True: refused (dropped, our user told)."""
        if not self._walls or channel.lower() not in self.rooms:
            return False
        decision = self.checker.check_membership("message", self._inbound_ctx(prefix, self.sender, channel), channel)
        if not decision.blocked:
            return False
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        out.add(Send(True, self._notice_line(f"A message from {msg.nick} to {channel} was blocked by imguard: {why}")))
        return True

    def _client_tags(self, out: OutgoingCommands, msg: Message) -> Message | None:
        """Client-only tag values go to other people: checked as text. Blocked: the line is dropped; masked:
        the line goes without its client-only tags."""
        values = [v for k, v in msg.tags.items() if k.startswith("+") and v and k not in BENIGN_CLIENT_TAGS]
        target = msg.param(0) if msg.command in ("PRIVMSG", "NOTICE", "TAGMSG") else ""
        targets = tuple(t for t in target.split(",") if t)
        channels = [t.lstrip(self.statusmsg) for t in targets if self._is_channel(t)]
        decision = self.checker.check_message(" ".join(values), self._ctx(
            recipients=targets, conversation=channels[0] if channels else "", origin=FROM_CLIENT))
        if decision.blocked:
            out.add(Send(True, self._notice_line(decision.notice or self._default_notice(
                decision, "message tags", targets))))
            return None
        if decision.action != MASK:
            return msg
        kept = ";".join(f"{k}={_escape_tag(v)}" if v else k for k, v in msg.tags.items() if not k.startswith("+"))
        rest = msg.raw[msg.raw.index(b" ") + 1:].lstrip(b" ")
        rebuilt = (b"@" + kept.encode() + b" " if kept else b"") + rest
        parsed = parse_line(rebuilt, self.limits)
        return parsed if isinstance(parsed, Message) else None

    def _client_authenticate(self, arg: str) -> None:
        if not self._sasl_mechanism:
            self._sasl_mechanism = arg.upper()
            self._sasl_chunks = []
            return
        if arg == "*":              # abort
            self._sasl_mechanism = ""
            self._sasl_chunks = []
            return
        if self._sasl_mechanism != "PLAIN":
            return
        if arg != "+":
            self._sasl_chunks.append(arg)
            if len(self._sasl_chunks) > 32:     # 12 KiB of PLAIN is not a login: stop reading it
                self._sasl_mechanism = ""
                self._sasl_chunks = []
                return
        if arg == "+" or len(arg) < 400:    # IRCv3 SASL: 400-byte chunks, '+' ends an exact multiple
            try:
                raw = base64.b64decode("".join(self._sasl_chunks), validate=True)
                authzid, authcid, _password = raw.split(b"\x00", 2)
                self._sasl_account = (authzid or authcid).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                self._sasl_account = ""
            self._sasl_chunks = []      # the password is not kept

    def _is_channel(self, target: str) -> bool:
        t = target.lstrip(self.statusmsg)
        return bool(t) and t[0] in self.chantypes

    def _client_text(self, out: OutgoingCommands, msg: Message) -> None:
        cmd = msg.command
        target_index, text_index, droppable = TEXT_COMMANDS[cmd]
        if len(msg.params) > text_index + 1:
            out.add(self._anomaly("ambiguous_message", f"{cmd} with {len(msg.params)} params (servers differ on "
                                  "which one is the text); dropped", from_client=True))
            return
        if len(msg.params) <= text_index:
            out.send(False, msg.raw)            # no text (a query, a bare QUIT): nothing to check
            return
        if target_index is None:
            targets: tuple[str, ...] = ()
        elif "," in (target := msg.param(target_index)) or not target:
            targets = tuple(t for t in target.split(",") if t)
        else:
            targets = (target,)             # the usual line: one target
        channels = [t.lstrip(self.statusmsg) for t in targets if self._is_channel(t)]
        conversation = channels[0] if channels else ""
        if cmd in ("CPRIVMSG", "CNOTICE"):
            conversation = msg.param(1)
        if cmd in ("PART", "KICK") and targets:
            recipients = targets
        elif target_index is None:
            recipients = ()
        else:
            recipients = targets
        text = msg.params[text_index]
        plain, ctcps = (split_ctcp(text) if cmd in MESSAGE_COMMANDS else (text, []))
        if ctcps:
            check_parts = [plain] + [c.args for c in ctcps if c.verb not in UNCHECKED_CTCP]
            check_text = " ".join(p for p in check_parts if p)
        else:
            check_text = plain                  # the same: " ".join of [plain] without the empty parts
        ctx = self._ctx(recipients=recipients, conversation=conversation, origin=FROM_CLIENT)
        if cmd in MESSAGE_COMMANDS and _is_otr(plain):
            ctx = ctx.with_(encryption="otr")
        decision: Decision | None = None
        answer = parse_answer(plain, self.warnings.settings) if cmd == "PRIVMSG" and not ctcps else None
        if answer is not None:                  # the sender answers a warning: to imguard, it never crosses
            self._warn_answer(out, targets[0] if targets else "", answer)
            return
        if cmd in MESSAGE_COMMANDS and channels and self._walled_room_message(out, channels):
            return
        if check_text.strip():
            decision = self.checker.check_message(check_text, ctx)
            if decision.action == WARN and cmd == "PRIVMSG" and not ctcps and ctx.encryption == "":
                # held until the sender answers in the chat (imguard/conversation.py)
                out.add(*self.warnings.dropped(self.warnings.hold(self.sender, targets[0] if targets else "", ctx,
                                                                  check_text, decision, msg.raw)))
                out.add(Send(True, self._notice_line((decision.notice or self._default_notice(
                    decision, "message", recipients)) + warn_instructions(self.warnings.settings))))
                out.add(Wake(self.warnings.wake_after()))     # its window ends even on an idle connection
                return
            if decision.blocked:
                if droppable:
                    what = "message" if cmd in MESSAGE_COMMANDS else cmd.lower()
                    out.add(Send(True, self._notice_line(decision.notice or self._default_notice(
                        decision, what, recipients))))
                else:
                    out.send(False, msg.raw[:msg.last_param_offset].rstrip(b" ") + b"\r\n")
                    out.add(Send(True, self._notice_line(decision.notice or self._default_notice(
                        decision, f"{cmd.lower()} text", recipients))))
                return
            if decision.disclaimers:        # first contact (or the period passed): both parties told, before it
                self._disclaimers(out, decision, targets[0] if targets else "")
        if not self._forward_text(out, True, msg, plain, ctcps, decision, peer=targets[0] if targets else ""):
            return
        if decision is not None and decision.notice and not decision.blocked and decision.action == MASK:
            out.add(Send(True, self._notice_line(decision.notice)))

    def _warn_answer(self, out: OutgoingCommands, target: str, answer: Answer) -> None:
        """Our user answers a warning (!justify, !falsepositive): recorded, the held line released as the client sent
        it or not, our user told by a NOTICE; the answer itself never crosses."""
        settled, side = settle_answer(self.warnings, self.context.connection_id, self.sender, target, answer)
        if settled.fact is not None:
            out.add(settled.fact)
        if settled.deliver is not None:
            out.send(False, settled.deliver.payload)
        if side:                                # a DCC file held on its own connection: released or dropped there
            out.add(Wake(connection_id=side))
        out.add(Send(True, self._notice_line(settled.notice)))

    def wake(self) -> list[Command]:
        """A warning's window ended (the Wake of its hold): what is past it dropped, recorded, on an idle
        connection too."""
        return list(self.warnings.dropped(self.warnings.expire())) if self.warnings else []

    def _disclaimers(self, out: OutgoingCommands, decision: Decision, peer: str) -> None:
        """The disclaimer the pipeline found due for this conversation, to both parties: a NOTICE from the gateway to
        our user, and a NOTICE to the other party (from our user: IRC's word for an automatic message). In a channel:
        a NOTICE to the channel from the gateway to our user, and with disclaimer_in_room one to the channel."""
        for m in decision.disclaimers:
            text = _CONTROL.sub(" ", m.notice).strip() or "imguard"
            if peer and self._is_channel(peer):         # a room's (imguard/conversation.py): in the channel's window
                line = encode_text(f":{GATEWAY_NAME} NOTICE {peer} :{text}")[:self.limits.max_body_length - 2]
                out.add(Send(True, line + b"\r\n"))
                if self.warnings.settings.disclaimer_in_room:      # said in the channel, for every member
                    out.send(False, encode_text(f"NOTICE {peer} :{text}")[:self.limits.max_body_length - 2] + b"\r\n")
                continue
            out.add(Send(True, self._notice_line(m.notice)))
            if peer:
                line = encode_text(f"NOTICE {peer} :" + text)
                out.send(False, line[:self.limits.max_body_length - 2] + b"\r\n")

    def _default_notice(self, decision: Decision, what: str, recipients: tuple[str, ...]) -> str:
        words = {"block": "blocked", "quarantine": "quarantined"}
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        to = f" to {', '.join(recipients)}" if recipients else ""
        return f"Your {what}{to} was {words.get(decision.action, 'blocked')} by imguard: {why}"

    # --- server -> client ---------------------------------------------------------------------------

    def _server_message(self, out: OutgoingCommands, msg: Message) -> None:
        cmd = msg.command
        if cmd in ROOM_LINES and self._walls:
            self._room_line(out, msg)
        if cmd == "001" and msg.params:
            self._welcome(out, msg)
        elif cmd == "005":
            for token in msg.params[1:-1] if msg.has_trailing else msg.params[1:]:
                key, _, value = token.partition("=")
                if key == "CHANTYPES" and value:
                    self.chantypes = value
                elif key == "STATUSMSG" and value:
                    self.statusmsg = value
        elif cmd == "CAP" and len(msg.params) >= 3:
            sub = msg.params[1].upper()
            names = msg.params[-1].split()
            if sub == "ACK":
                for name in names:
                    if name.startswith("-"):
                        self.caps.discard(name[1:])
                    else:
                        self.caps.add(name.split("=", 1)[0])
            elif sub == "DEL":
                self.caps.difference_update(names)
        elif cmd == "NICK" and msg.params and msg.nick and msg.nick.lower() == self.nick.lower():
            old, new = self.nick, msg.params[0]
            self.nick = new
            self._learn_mask(msg.prefix)
            out.add(self._event("irc_nick_change", old_nick=old, new_nick=new, identity=self.sender))
        elif cmd == "JOIN" and msg.nick and msg.nick.lower() == self.nick.lower():
            self._learn_mask(msg.prefix)
        elif cmd == "900" and len(msg.params) >= 3:      # RPL_LOGGEDIN <nick> <nick!user@host> <account> :...
            if self.account and msg.params[2] != self.account:
                out.add(self._anomaly("identity_change", "a second account login on this connection: the label "
                                      "stays", from_client=False, severity="high", account=self.account,
                                      claimed=msg.params[2]))
            else:
                self.account = msg.params[2]
                self._learn_mask(msg.params[1])
                out.add(self._event("irc_logged_in", account=self.account, nick=self.nick))
        elif cmd == "901":                               # RPL_LOGGEDOUT: the label stays what it was
            out.add(self._event("irc_logged_out", account=self.account, nick=self.nick))
        elif cmd == "903":                               # RPL_SASLSUCCESS
            if not self.account and self._sasl_account:
                self.account = self._sasl_account
                out.add(self._event("irc_logged_in", account=self.account, nick=self.nick))
            self._sasl_mechanism = ""
        elif cmd in ("902", "904", "905", "906", "907"):
            self._sasl_mechanism = ""
            self._sasl_account = ""
        elif cmd == "670":
            if self.starttls_requested and not self.tls:
                out.send(True, msg.raw)
                self._starting_tls = True
                return
            out.add(self._anomaly("unexpected_starttls_reply", "670 without a pending STARTTLS", from_client=False))
        elif cmd == "691":
            self.starttls_requested = False
        elif cmd == "INVITE" and len(msg.params) >= 2 and self._invite_refused(out, msg, False):
            return
        elif cmd in ("PRIVMSG", "NOTICE") and len(msg.params) >= 2 and msg.nick.lower() != self.nick.lower():
            self._server_text(out, msg)     # (our own line echoed by echo-message was decided on its way out)
            return
        out.send(True, msg.raw)

    def _server_text(self, out: OutgoingCommands, msg: Message) -> None:
        """A PRIVMSG or NOTICE the server delivers to our user: someone else's message (inbound unless the zones
        say the sender is inside), decided like our user's own. Allowed: the exact bytes; masked: the text
        rewritten; blocked: dropped, and our user is told by a NOTICE from the gateway. DCC offers in it are
        registered and rewritten to the relay. A server's own notices (a server name as the prefix, or none)
        are not chat: only forwarded (DCC offers in them still handled)."""
        if len(msg.params) > 2:
            out.add(self._anomaly("ambiguous_message", f"{msg.command} with {len(msg.params)} params from the "
                                  "server (clients differ on which one is the text); dropped", from_client=False))
            return
        target, text = msg.params
        plain, ctcps = split_ctcp(text) if "\x01" in text else (text, [])
        prefix = msg.prefix
        person = bool(prefix) and ("!" in prefix or "@" in prefix or "." not in prefix)
        decision: Decision | None = None
        if person:
            check_text = (" ".join(p for p in [plain] + [c.args for c in ctcps if c.verb not in UNCHECKED_CTCP] if p)
                          if ctcps else plain)
            if check_text.strip():
                channel = self._is_channel(target)
                conversation = target.lstrip(self.statusmsg) if channel else ""
                recipient = target if channel or target.lower() != self.nick.lower() else self.sender
                ctx = self._inbound_ctx(prefix, recipient, conversation)
                if channel and self._walled_delivery(out, msg, prefix, conversation):
                    return
                if _is_otr(plain):
                    ctx = ctx.with_(encryption="otr")
                decision = self.checker.check_message(check_text, ctx)
                if decision.action == WARN and RELEASED.take(prefix, check_text):
                    # the copy of a message its sender justified on another connection of this gateway
                    out.add(WarnOutcome(check_text, ctx, decision, state=WarnState.DELIVERED, delivered=True))
                    decision = None
                if decision is not None and decision.blocked:
                    what = "message" if msg.command == "PRIVMSG" else "notice"
                    to = f" to {target}" if channel else ""
                    action, why = block_words(decision)
                    out.add(Send(True, self._notice_line(
                        f"A {what} from {msg.nick}{to} was {action} by imguard: {why}")))
                    return
                if decision is not None and decision.disclaimers:
                    self._disclaimers(out, decision, msg.nick)
        self._forward_text(out, False, msg, plain, ctcps, decision, peer=prefix or msg.nick)

    def _forward_text(self, out: OutgoingCommands, from_client: bool, msg: Message, plain: str, ctcps: list[Ctcp],
                      decision: Decision | None, peer: str) -> bool:
        """A decided (not blocked) message on its way: its DCC requests registered, rewritten for the relay or
        refused; then the exact bytes, or the line rewritten (masked text, rewritten DCC). False: a DCC request in it
        was refused and the whole line dropped (the notice is queued)."""
        new_ctcps: list[Ctcp] = []
        changed = False
        for c in ctcps:
            if c.verb == "DCC":
                args = self._dcc(out, from_client, c.args, peer=peer, msg=msg)
                if args is None:
                    return False
                changed = changed or args != c.args
                new_ctcps.append(Ctcp("DCC", args))
            else:
                new_ctcps.append(c)
        to_client = not from_client          # the line goes on to the other side
        if decision is not None and decision.action == MASK and decision.masked_text is not None:
            masked = decision.masked_text.replace("\x01", "")     # no CTCP smuggled in by a mask
            if not plain and len(ctcps) == 1 and ctcps[0].verb == "ACTION":
                new_text = format_ctcp("ACTION", masked)
            else:
                new_text = masked + "".join(format_ctcp(c.verb, c.args) for c in new_ctcps if c.verb == "DCC")
            out.send(to_client, msg.with_last_param(new_text))
        elif changed:
            out.send(to_client, msg.with_last_param(plain + "".join(format_ctcp(c.verb, c.args)
                                                                        for c in new_ctcps)))
        else:
            out.send(to_client, msg.raw)
        return True

    def _inbound_ctx(self, sender: str, recipient: str, conversation: str) -> ChatContext:
        """The context of a message the server delivers: from `sender` (nick!user@host) to our user or a channel,
        origin FROM_SERVER. Built once per sender and target, as _ctx."""
        key = (sender, recipient, conversation)
        ctx = self._inbound_cache.get(key)
        if ctx is None:
            if len(self._inbound_cache) >= _INBOUND_CACHE_SIZE:
                self._inbound_cache.clear()
            ctx = self._inbound_cache[key] = self.context.with_(
                sender=sender, recipients=(recipient,), conversation=conversation, origin=FROM_SERVER)
        return ctx

    def _welcome(self, out: OutgoingCommands, msg: Message) -> None:
        if self.registered:
            out.add(self._anomaly("identity_change", "a second welcome (001) on a registered connection: the "
                                  "identity stays", from_client=False, severity="high", identity=self.sender,
                                  claimed=msg.params[0]))
            return
        self.nick = msg.params[0]
        if not self.identity:
            self.identity = self.nick
        words = msg.params[-1].split()
        if words and "!" in words[-1]:
            self._learn_mask(words[-1])
        self.registered = True
        out.add(self._event("irc_registered", nick=self.nick, user=self.user, host=self.host,
                            realname=self.realname, account=self.account, identity=self.sender,
                            caps=sorted(self.caps), tls=self.tls))

    def _learn_mask(self, prefix: str) -> None:
        if "!" in prefix and "@" in prefix:
            user_host = prefix.split("!", 1)[1]
            self.user, _, self.host = user_host.partition("@")

    # --- DCC ----------------------------------------------------------------------------------------

    def _remember_local(self, offer: DccOffer) -> None:
        self._offers[(offer.kind, offer.name, offer.relay_port or offer.port, offer.token)] = offer
        while len(self._offers) > self.limits.max_tracked_offers:
            self._offers.popitem(last=False)

    def _find_local(self, name: str, port: int, token: str) -> DccOffer | None:
        for offer in reversed(self._offers.values()):
            if offer.kind != SEND:
                continue
            if token and offer.token == token:
                return offer
            if port and port in (offer.port, offer.relay_port) and (offer.name == name or not name
                                                                    or name == "file.ext"):
                return offer
        return None

    def _refuse(self, out: OutgoingCommands, from_client: bool, text: str) -> None:
        if from_client:
            out.add(Send(True, self._notice_line(text)))

    def _dcc(self, out: OutgoingCommands, from_client: bool, args: str, peer: str, msg: Message) -> str | None:
        """Handle one CTCP DCC request seen in either direction. Returns the (possibly rewritten) args to
        forward, or None to drop the whole line."""
        try:
            req = parse_dcc(args, self.limits)
        except DccError as e:
            out.add(self._anomaly(e.kind, e.detail, from_client=from_client, dcc=args[:200]))
            self._refuse(out, from_client, f"imguard: your DCC request was refused: {e.detail}")
            return None
        peer_nick = peer.split("!", 1)[0]
        if isinstance(req, DccResume):
            return self._dcc_resume(out, from_client, req)
        kind = SEND if isinstance(req, DccSend) else CHAT
        name = req.name if isinstance(req, DccSend) else ""
        size = req.size if isinstance(req, DccSend) else None
        if self.dcc_relay is not None and req.port and req.host == self.dcc_relay.host:
            known = self.transfers.get((req.host, req.port), kind=DCC_KIND) if self.transfers is not None else None
            if known is not None and known.relay_host == req.host and known.relay_port == req.port:
                # Already rewritten by the other person's session (both behind the gateway). In passive
                # DCC that was the receiver's session, answering; when the offer it answers is ours, we
                # are the file's sender: notices and alerts about the file belong to this connection.
                mine = self._find_local(name, 0, req.token) if req.token else None
                if mine is not None and mine.outbound and not from_client:
                    remember_offer(self.transfers, replace(known, sender=mine.sender, context=mine.context,
                                                           outbound=True), self.limits.dcc_offer_ttl)
                return args
        if kind == SEND and size is not None and size > self.limits.max_held_bytes:
            text = (f"imguard: the file {name!r} ({size} bytes) is larger than {self.limits.max_held_bytes} "
                    f"bytes and cannot be inspected; the offer was not passed on")
            out.add(self._event("dcc_refused", category="file", reason="too_large", name=name, size=size,
                                peer=peer, outbound=from_client))
            out.add(Send(True, self._notice_line(text)))
            return None
        if req.port == 0:
            # Passive (reverse) DCC: the offerer asks the receiver to listen; remember the token for the reply.
            offer = DccOffer(offer_id=new_offer_id(self.context.connection_id), kind=kind, name=name, size=size,
                             sender=self.sender if from_client else peer, receiver=peer_nick if from_client
                             else self.nick, host=req.host, port=0, listener_is_sender=False, token=req.token,
                             outbound=from_client, context=self._offer_ctx(from_client, peer))
            self._remember_local(offer)
            return args
        pending = self._find_local(name, 0, req.token) if req.token else None
        if pending is not None and pending.port == 0 and pending.outbound != from_client:
            # The reply to a passive offer: its sender (the receiver) listens at host:port.
            offer = replace(pending, host=req.host, port=req.port, size=size if size is not None else pending.size)
        else:
            offer = DccOffer(offer_id=new_offer_id(self.context.connection_id), kind=kind, name=name, size=size,
                             sender=self.sender if from_client else peer,
                             receiver=peer_nick if from_client else self.nick,
                             host=req.host, port=req.port, listener_is_sender=True, token=req.token,
                             outbound=from_client, context=self._offer_ctx(from_client, peer))
        if self.dcc_relay is not None:
            try:
                port = int(self.dcc_relay.allocate(offer))
                if not 0 < port < 65536:
                    raise ValueError(f"relay port {port}")
            except Exception as e:      # the allocator is the carrier's: fail closed
                out.add(self._anomaly("dcc_relay_failed", f"no relay port for the DCC offer: {e}",
                                      from_client=from_client))
                self._refuse(out, from_client, "imguard: your DCC offer could not be relayed and was not passed on")
                return None
            offer = replace(offer, relay_host=self.dcc_relay.host, relay_port=port)
        remember_offer(self.transfers, offer, self.limits.dcc_offer_ttl)
        self._remember_local(offer)
        out.add(self._event("dcc_offer", category="file", ctx=offer.context, **offer.to_dict()))
        if not offer.relay_host:
            return args
        if isinstance(req, DccSend):
            return format_dcc_send(req.name, offer.relay_host, offer.relay_port, req.size, req.token)
        return format_dcc_chat(req.protocol, offer.relay_host, offer.relay_port, req.token)

    def _offer_ctx(self, from_client: bool, peer: str) -> ChatContext:
        """The file's context: offered by our user (outbound unless the zones say otherwise), or offered to our
        user by someone on the server's side (inbound)."""
        if from_client:
            return self._ctx(recipients=(peer.split("!", 1)[0],), transfer_mechanism="dcc", origin=FROM_CLIENT)
        return self.context.with_(sender=peer, recipients=(self.sender,), transfer_mechanism="dcc",
                                  origin=FROM_SERVER)

    def _dcc_resume(self, out: OutgoingCommands, from_client: bool, req: DccResume) -> str | None:
        offer = self._find_local(req.name, req.port, req.token)
        if offer is None:
            return format_dcc_resume(req.verb, req.name, req.port, req.position, req.token)
        if offer.size and req.position > offer.size:
            out.add(self._anomaly("dcc_bad_position", f"{req.verb} at {req.position} past the size {offer.size}",
                                  from_client=from_client))
            self._refuse(out, from_client, "imguard: your DCC resume was refused: position past the file size")
            return None
        if req.verb == "RESUME":
            offer = replace(offer, position=req.position)
            if offer.port:
                remember_offer(self.transfers, offer, self.limits.dcc_offer_ttl)
            self._remember_local(offer)
        # The receiver knows the relay port, the sender its real port: translate on the way.
        to_sender = (req.verb == "RESUME")
        port = req.port
        if offer.relay_port and port:
            port = offer.port if to_sender else offer.relay_port
        return format_dcc_resume(req.verb, req.name, port, req.position, req.token)
