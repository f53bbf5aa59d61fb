"""Conversation-level controls the chat sessions carry out: warn and continue, and disclaimers. Sans-io: the XMPP and
IRC sessions own one table each and give it the clock; nothing here touches a socket or the disk.

**Warn and continue** (a rule's `action: warn`, between alert and block): the message is held, not forwarded, and its
sender is told why and how to answer, in the chat. The sender answers in the same chat, within the window:

    !justify <reason>         the held message is delivered; the reason is recorded with the alert
    !falsepositive [comment]  the report is recorded with the alert (and the message delivered, unless
                              warn_false_positive_delivers is off)

An answer is addressed to imguard and never crosses. No answer within `warn_window_seconds`: the held message is
dropped. Every end of a held message is one event (`WarnOutcome`, the message's event with `imguard.warn`); the hold
itself is the message's own event (`event.action` `warn`). One held message is in one state at a time:

    HELD --!justify---------> JUSTIFIED        delivered
         --!falsepositive---> FALSE_POSITIVE   delivered (warn_false_positive_delivers) or dropped
         --window passed----> EXPIRED          dropped
         --table full-------> DISPLACED        dropped (the oldest, when a sender has warn_max_pending held)
         --connection ends--> ABANDONED        dropped

Only the sender's own connection can hold (it is the one the sender answers on): a WARN on a message the server
delivers (an outside sender's) is refused like a block, except the copy of a message this gateway released after a
justification on another connection (`RELEASED`, process-wide, a short memory), which is delivered (`DELIVERED`).

**Files** go the same way where the file and its sender's chat share one connection (XMPP IBB: the held stanzas
wait on the tracker, `HeldTransfer.warn_verdict`, state WARNED): the file is held whole, its sender gets the
notice and how to answer in the chat (the tracker's tell rule), and the same answers release it to its receiver
(the held stanzas byte-exact) or, unanswered, drop it (the receiver gets the mechanism's refusal). A held file is
a HeldMessage with its FileReport (`report`) and its transfer id as `tag`; its outcome is a file event
(`imguard.file`, `event.action` `warn_<state>`). The copy of a justified file reaching an inside receiver on another
connection is recognised by its SHA-256 (`file_key`).

**Files on a side connection** (IRC DCC SEND, an XMPP SOCKS5 bytestream): the file and the chat where its sender
answers are two connections. The side session holds the file (WARNED; the sender is done, a DCC sender has had every
ACK; the receiver waits, the sender's close is not passed on: `warn_side_file`) and enters it in `SIDE_WARNINGS`
(process-wide) under its sender and the chat connection that announced the offer; the sender is told there. The chat
session's answer (`settle_answer`: the conversation it names first, the connection's own held message before a side
file) moves the entry and returns a `Wake` for the side connection, whose session collects the entry
(`wake_side_file`) and releases the held bytes (JUSTIFIED, FALSE_POSITIVE delivering) or drops them. Its own Wake at
the window's end expires it (EXPIRED); the chat connection ending abandons it (ABANDONED), as does its receiver leaving
(`side_receiver_left`). Who moves an entry records its event. An outside sender's side file, and an HTTP
upload, are refused like a block (fail closed). Per process: with several workers a side connection on another worker
than its chat finds no answer and is dropped at the window's end.

**The window's end** is a timer: a hold returns `Wake(after=...)` for its own connection and the session's `wake()`
expires what is due, so `warn_expired` (and a held file's refusal) come at the window's end on an idle connection too.

**Disclaimers** (a rule's `action: disclaim`, with its text in `notify`): the policy says which conversations get one
(its conditions: sender and recipient groups, direction, protocol), `FirstContacts` says when: on the first message
between two parties and again once `disclaimer_every_days` have passed, one disclaimer per pair (the first due
rule's). In a room (an XMPP MUC, an IRC channel) the "pair" is the room and the inside member who writes there: on an
inside member's first message into the room (origin FROM_CLIENT) that member is told, in the room's own window (XMPP:
a groupchat message from the room's bare JID, as the room's own notices come; IRC: a NOTICE to the channel from
`imguard`); with `disclaimer_in_room` the notice is said in the room itself instead (through that member's connection,
as a groupchat message or a channel NOTICE every member sees; the writer sees the room's copy, on IRC the gateway's,
as the server echoes nothing back), once per room and period, whoever writes first (`room_key`). A room message
delivered to our user gives none (its writer is not ours to tell). It is process-wide, held by the pipeline: which
connection carries the message does not matter. The session injects it to both parties in the protocol's own terms
(XMPP: a chat message from the server's domain to our user and one through our user's stream to the other party; IRC:
a NOTICE from `imguard` to our user and a NOTICE to the other party), before the message. Every disclaimer given is an
event and an archive record (sender `imguard`, the two parties as recipients, action `disclaim`), and with an archive
the table is filled from those records at start, so a restart does not disclaim again.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol

from imguard import alerts
from imguard.model import ALLOW, DISCLAIM, FROM_CLIENT, ChatContext, Decision, FileReport, RuleMatch
from imguard.protocols.base import MessageDecision, Wake
from imguard.settings import setting


@dataclass(frozen=True)
class ConversationSettings:
    """Conversation controls: warn and continue"""
    warn_window_seconds: float = setting(
        300.0, "Seconds a message held by a `warn` rule waits for its sender's answer in the chat (!justify or "
               "!falsepositive). After them it is dropped, with an event, at once (a timer: on an idle connection "
               "too; the offline replay: at the connection's next traffic).")
    warn_justify_keyword: str = setting(
        "!justify", "What a sender's answer starts with to send a held message anyway: `!justify <reason>`. The "
                    "answer goes to imguard, never to the other party; the reason is recorded with the alert.")
    warn_false_positive_keyword: str = setting(
        "!falsepositive", "What a sender's answer starts with to report a held message as a false positive: "
                          "`!falsepositive [comment]`; recorded with the alert for the policy's authors.")
    warn_false_positive_delivers: bool = setting(
        True, "A false-positive report also delivers the held message (the sender vouches that the rule is "
              "wrong, as an override does); off: the report is recorded and the message dropped.")
    warn_max_pending: int = setting(
        8, "Messages held for an answer per connection (one sender). Past it the oldest is dropped (an event): a "
           "sender who never answers cannot make the gateway hold without bound.")
    warn_max_answer_chars: int = setting(
        500, "Characters of a justification or false-positive comment kept in the event; the rest is cut.")
    warn_released_seconds: float = setting(
        60.0, "Seconds the gateway remembers a message it delivered after a justification, so that its copy "
              "delivered to an inside receiver on another connection is not held again.")
    disclaimer_every_days: float = setting(
        30.0, "Days after which two parties who keep talking get a `disclaim` rule's notice again (it is given on "
              "their first message, then once this period has passed). 0: only the first time (while remembered).")
    disclaimer_in_room: bool = setting(
        False, "A room's disclaimer (XMPP MUC, IRC channel) is said in the room itself, for every member to see, once "
               "per room and period (through the connection of the inside member who writes first), rather than to "
               "each inside member who writes there, once per member, room and period.")
    disclaimer_max_pairs: int = setting(
        100_000, "Pairs of parties whose last disclaimer the gateway remembers in memory (about 200 bytes each); "
                 "past it the longest-unseen pair is forgotten and gets the notice again at its next message.")


class WarnState(enum.Enum):
    """Where one held message is (see the module docstring for the transitions)."""
    HELD = "held"                       # waiting for the sender's answer
    JUSTIFIED = "justified"             # the sender justified it: delivered
    FALSE_POSITIVE = "false_positive"   # the sender reported a false positive
    EXPIRED = "expired"                 # no answer within the window: dropped
    DISPLACED = "displaced"             # dropped for a newer one (warn_max_pending)
    ABANDONED = "abandoned"             # the connection ended while it was held: dropped
    DELIVERED = "delivered"             # (the receiving leg) the copy of a justified message, delivered


# The one table of moves: state -> the states it may go to. Every other state is final.
TRANSITIONS: dict[WarnState, frozenset[WarnState]] = {
    WarnState.HELD: frozenset({WarnState.JUSTIFIED, WarnState.FALSE_POSITIVE, WarnState.EXPIRED,
                               WarnState.DISPLACED, WarnState.ABANDONED}),
}


class Answer(NamedTuple):
    """A sender's answer to a warning, read from a chat message."""
    state: WarnState                    # JUSTIFIED or FALSE_POSITIVE
    text: str                           # the reason or comment ("" when none was given)


def parse_answer(text: str | None, settings: ConversationSettings) -> Answer | None:
    """The answer a chat message gives (a message starting with a keyword, any case), else None."""
    if not text:
        return None
    stripped = text.strip()
    # every client message passes here: most fail at the first character (~0.2 us instead of ~0.9)
    if stripped[:1].lower() not in (settings.warn_justify_keyword[:1].lower(),
                                    settings.warn_false_positive_keyword[:1].lower()):
        return None
    for keyword, state in ((settings.warn_justify_keyword, WarnState.JUSTIFIED),
                           (settings.warn_false_positive_keyword, WarnState.FALSE_POSITIVE)):
        n = len(keyword)
        if keyword and stripped[:n].lower() == keyword.lower() and (len(stripped) == n or stripped[n].isspace()):
            return Answer(state, " ".join(stripped[n:].split())[:settings.warn_max_answer_chars])
    return None


def party(identity: str) -> str:
    """One name for a person on every connection: an XMPP bare JID, an IRC nick (without !user@host), lower case."""
    return identity.split("/", 1)[0].split("!", 1)[0].lower()


@dataclass
class HeldMessage:
    """One message a `warn` decision holds back."""
    sender: str
    key: str                    # the conversation it was addressed to: party(recipient) or the room
    context: ChatContext
    text: str
    decision: Decision
    payload: bytes              # what crosses when it is delivered: the stanza or line as the client sent it
    held_at: float
    state: WarnState = WarnState.HELD
    answer: str = ""
    tag: Any = None             # the session's own note for the delivery (XMPP: a groupchat's (room, id); a
                                # file's transfer id)
    report: FileReport | None = None    # a held file's (None: a message)

    @property
    def released_key(self) -> str:
        """What RELEASED remembers it by, with its sender: the text, or a file's SHA-256 (file_key)."""
        return self.text if self.report is None else file_key(self.report.sha256)

    def move(self, state: WarnState, answer: str = "") -> "HeldMessage":
        if state not in TRANSITIONS.get(self.state, ()):
            raise ValueError(f"a held message cannot go from {self.state.value} to {state.value}")
        self.state, self.answer = state, answer
        return self


@dataclass(frozen=True)
class WarnOutcome(MessageDecision):
    """How a held message ended: recorded as the message's event (alerts.message_event) with `event.action`
    `warn_<state>` and `imguard.warn`: state, delivered, the sender's answer, seconds held."""
    state: WarnState = WarnState.EXPIRED
    delivered: bool = False
    answer: str = ""
    held_seconds: float = 0.0
    report: FileReport | None = None    # a file's: its event is a file event (alerts.file_event)

    def event(self, context: ChatContext | None = None) -> dict[str, Any]:
        if self.report is not None:
            event = alerts.file_event(self.report, context or self.context, self.decision)
        else:
            event = alerts.message_event(self.text, context or self.context, self.decision)
        fields = event["event"]
        fields["action"] = f"warn_{self.state.value}"
        fields["type"] = ["allowed" if self.delivered else "denied"]
        warn: dict[str, Any] = {"state": self.state.value, "delivered": self.delivered,
                                "held_seconds": round(self.held_seconds, 3)}
        if self.state is WarnState.JUSTIFIED:
            warn["justification"] = self.answer
        elif self.state is WarnState.FALSE_POSITIVE:
            warn["false_positive"] = True
            warn["comment"] = self.answer
        event["imguard"]["warn"] = warn
        said = f" ({alerts_one_line(self.answer)})" if self.answer else ""
        event["message"] = f"warn {self.state.value}{said}: " + event["message"]
        return event


def alerts_one_line(text: str, limit: int = 200) -> str:
    one = " ".join(text.split())
    return one[:limit] + ("..." if len(one) > limit else "")


def outcome(held: HeldMessage, now: float, delivered: bool = False) -> WarnOutcome:
    return WarnOutcome(held.text, held.context, held.decision, state=held.state, delivered=delivered,
                       answer=held.answer, held_seconds=max(0.0, now - held.held_at), report=held.report)


FILE_KEY = "\x00file sha256:"        # no chat text starts so: a file's key in RELEASED never meets a message's


def file_key(sha256: str) -> str:
    """A file's key in RELEASED (with its sender): its SHA-256."""
    return FILE_KEY + sha256


class Settled(NamedTuple):
    """A sender's answer, carried out: what to tell the sender, the held message to deliver (None: nothing crosses),
    the event to record (None: the answer matched no held message), and the held message it ended (delivered or
    not: a held file's transfer is released or dropped by the session)."""
    notice: str
    deliver: HeldMessage | None
    fact: WarnOutcome | None
    held: HeldMessage | None = None


def release_decision(decision: Decision) -> Decision:
    """The decision a justified file is released with: allowed, no notice (the sender is told by the answer's)."""
    return dataclasses.replace(decision, action=ALLOW, notice="", disclaimers=[])


WAKE_SLACK = 0.05      # seconds after a window's end a Wake comes (a timer may fire a hair early; expire() is exact)


def delivers(state: WarnState, settings: ConversationSettings) -> bool:
    """Whether an answer in `state` delivers the held message."""
    return state is WarnState.JUSTIFIED or (state is WarnState.FALSE_POSITIVE and settings.warn_false_positive_delivers)


def settled(held: HeldMessage, answer: Answer, settings: ConversationSettings, now: float,
            released: "ReleasedMessages | None" = None) -> Settled:
    """`answer` carried out on `held` (already moved to its state): remembered in `released` (RELEASED by default)
    when delivered, for its copies to inside receivers."""
    delivered = delivers(answer.state, settings)
    if delivered:
        (released if released is not None else RELEASED).add(
            held.sender, held.released_key, settings.warn_released_seconds,
            copies=max(1, len(held.context.recipients)))
    return Settled(answer_notice(held, answer, delivered), held if delivered else None,
                   outcome(held, now, delivered), held)


class PendingWarnings:
    """One connection's held messages, oldest first, per sender; at most warn_max_pending in all."""

    def __init__(self, settings: ConversationSettings = ConversationSettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._held: collections.deque[HeldMessage] = collections.deque()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, sender: str, key: str, ctx: ChatContext, text: str, decision: Decision,
             payload: bytes, tag: Any = None, report: FileReport | None = None) -> list[HeldMessage]:
        """Hold a message (or, with its `report`, a file); the ones it displaces (DISPLACED) are returned."""
        displaced = []
        while self._held and len(self._held) >= max(1, self.settings.warn_max_pending):
            displaced.append(self._held.popleft().move(WarnState.DISPLACED))
        self._held.append(HeldMessage(sender, party(key), ctx, text, decision, payload, self.clock(), tag=tag,
                                      report=report))
        return displaced

    def answer(self, sender: str, key: str, answer: Answer) -> HeldMessage | None:
        """The held message `answer` is about, moved to its state and taken out of the table: the sender's oldest
        to `key`, else the sender's oldest (an answer sent to the gateway's notice rather than to the peer)."""
        mine = [h for h in self._held if h.sender == sender]
        found = next((h for h in mine if h.key == party(key)), mine[0] if mine else None)
        if found is None:
            return None
        self._held.remove(found)
        return found.move(answer.state, answer.text)

    def settle(self, sender: str, key: str, answer: Answer, released: "ReleasedMessages | None" = None) -> Settled:
        """Carry out `answer` from `sender` in the conversation `key`. A delivered message is remembered in
        `released` (RELEASED by default) for its copies to inside receivers."""
        settings = self.settings
        if answer.state is WarnState.JUSTIFIED and not answer.text:
            return Settled(f"imguard: a justification needs a reason: '{settings.warn_justify_keyword} <your "
                           "reason>'. The message is still held.", None, None)
        held = self.answer(sender, key, answer)
        if held is None:
            return Settled(answer_notice(None, answer, False), None, None)
        return settled(held, answer, settings, self.clock(), released)

    def has(self, sender: str, key: str = "") -> bool:
        """Whether `sender` has a message held here (to `key`, when given)."""
        return any(h.sender == sender and (not key or h.key == party(key)) for h in self._held)

    def wake_after(self) -> float:
        """The Wake of a message held now: its window's end (and WAKE_SLACK). One per hold, so every held message
        has its own; a wake that finds it answered already changes nothing."""
        return self.settings.warn_window_seconds + WAKE_SLACK

    def dropped(self, held: list[HeldMessage]) -> list[WarnOutcome]:
        """The events of held messages that ended undelivered (expired, displaced, abandoned)."""
        now = self.clock()
        return [outcome(h, now) for h in held]

    def expire(self) -> list[HeldMessage]:
        """The held messages whose window has passed, moved to EXPIRED and taken out."""
        if not self._held:
            return []
        limit = self.clock() - self.settings.warn_window_seconds
        gone = []
        while self._held and self._held[0].held_at <= limit:
            gone.append(self._held.popleft().move(WarnState.EXPIRED))
        return gone

    def abandon(self) -> list[HeldMessage]:
        """The connection ends: every held message ABANDONED."""
        gone = [h.move(WarnState.ABANDONED) for h in self._held]
        self._held.clear()
        return gone


class ReleasedMessages:
    """Messages delivered after a justification, remembered for warn_released_seconds by (sender, text) so the
    copy the server delivers to an inside receiver (another connection of this gateway) is not held again.
    Process-wide (RELEASED), bounded; each copy is taken once per release."""

    MAX_ENTRIES = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: collections.OrderedDict[tuple[str, str], tuple[float, int]] = collections.OrderedDict()

    @staticmethod
    def _key(sender: str, text: str) -> tuple[str, str]:
        return party(sender), hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()

    def add(self, sender: str, text: str, ttl: float, copies: int = 1) -> None:
        key = self._key(sender, text)
        self._entries.pop(key, None)
        while len(self._entries) >= self.MAX_ENTRIES:
            self._entries.popitem(last=False)
        self._entries[key] = (self.clock() + ttl, copies)

    def take(self, sender: str, text: str) -> bool:
        key = self._key(sender, text)
        entry = self._entries.get(key)
        if entry is None:
            return False
        until, copies = entry
        if until < self.clock():
            del self._entries[key]
            return False
        if copies <= 1:
            del self._entries[key]
        else:
            self._entries[key] = (until, copies - 1)
        return True


RELEASED = ReleasedMessages()


# --- warned files on a side connection ------------------------------------------------------------------------

@dataclass
class SideWarning:
    """A file held on a connection of its own (a DCC SEND) for its sender's answer in the chat that announced it."""
    held: HeldMessage           # tag: the transfer id; report: the file's
    chat: str                   # the chat connection that announced the offer: where the sender answers
    side: str                   # the file's own connection: woken (Wake) to release or drop it


class SideWarnings:
    """The files held on side connections for an answer given on another connection: keyed by their transfer id,
    found by their sender and chat connection (where the answer comes). Process-wide (SIDE_WARNINGS): a side
    connection and its chat connection meet only in one process (with several workers, a DCC connection that lands
    on another worker than its chat finds no answer: its file is dropped at the window's end, fail closed).

    Who moves an entry records its event: the chat session an answer (JUSTIFIED, FALSE_POSITIVE) or its end
    (ABANDONED), the side session the window's end (EXPIRED) or a newer file (DISPLACED). The side session carries
    the move out when woken (`collect`): released, or dropped. Bounded: warn_max_pending per sender and chat, and
    MAX_ENTRIES in all (an entry whose side never collects it is forgotten, its transfer's own timer drops it)."""

    MAX_ENTRIES = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: collections.OrderedDict[str, SideWarning] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def hold(self, held: HeldMessage, chat: str, side: str,
             settings: ConversationSettings) -> list[SideWarning]:
        """Hold a file (its transfer id is `held.tag`); the ones it displaces (DISPLACED, still to be collected by
        their sides) are returned."""
        mine = self._waiting(held.sender, chat)
        displaced = []
        while mine and len(mine) >= max(1, settings.warn_max_pending):
            entry = mine.pop(0)
            entry.held.move(WarnState.DISPLACED)
            displaced.append(entry)
        while len(self._entries) >= self.MAX_ENTRIES:
            self._entries.popitem(last=False)
        self._entries[str(held.tag)] = SideWarning(held, chat, side)
        return displaced

    def _waiting(self, sender: str, chat: str) -> list[SideWarning]:
        who = party(sender)
        return [e for e in self._entries.values()
                if e.held.state is WarnState.HELD and party(e.held.sender) == who and e.chat == chat]

    def has(self, sender: str, chat: str, key: str = "") -> bool:
        return any(not key or e.held.key == party(key) for e in self._waiting(sender, chat))

    def settle(self, sender: str, chat: str, key: str, answer: Answer, settings: ConversationSettings,
               released: "ReleasedMessages | None" = None) -> tuple[Settled, str]:
        """Carry out `answer` from `sender` on chat connection `chat` (to `key`, else the sender's oldest): the
        Settled (nothing to deliver on the chat connection: the file crosses on its own) and the side connection to
        wake ("" when no file was held)."""
        mine = self._waiting(sender, chat)
        entry = next((e for e in mine if e.held.key == party(key)), mine[0] if mine else None)
        if entry is None:
            return Settled(answer_notice(None, answer, False), None, None), ""
        entry.held.move(answer.state, answer.text)
        done = settled(entry.held, answer, settings, self.clock(), released)
        return done._replace(deliver=None), entry.side

    def collect(self, tag: str, settings: ConversationSettings) -> HeldMessage | None:
        """For the side session, woken: its file's entry once it has ended (taken out), moved to EXPIRED first when
        its window has passed; None while it waits (or when it is not here)."""
        entry = self._entries.get(str(tag))
        if entry is None:
            return None
        if entry.held.state is WarnState.HELD:
            if self.clock() - entry.held.held_at < settings.warn_window_seconds:
                return None
            entry.held.move(WarnState.EXPIRED)
        del self._entries[str(tag)]
        return entry.held

    def forget(self, tag: str) -> HeldMessage | None:
        """The side connection ended (its receiver left): its entry taken out, ABANDONED if it was still held."""
        entry = self._entries.pop(str(tag), None)
        if entry is None:
            return None
        if entry.held.state is WarnState.HELD:
            entry.held.move(WarnState.ABANDONED)
        return entry.held

    def abandon(self, chat: str) -> list[SideWarning]:
        """The chat connection ended: its files still held are ABANDONED (their sides still collect them)."""
        gone = [e for e in self._entries.values() if e.chat == chat and e.held.state is WarnState.HELD]
        for entry in gone:
            entry.held.move(WarnState.ABANDONED)
        return gone


SIDE_WARNINGS = SideWarnings()


class SideTransfer(Protocol):
    """What the side-file helpers need of a held file (imguard.files.tracker.HeldTransfer)."""
    transfer_id: str
    context: ChatContext
    inbound: bool

    def verdict(self, decision: Decision) -> list[Any]: ...

    def warn_verdict(self, decision: Decision, instructions: str) -> list[Any]: ...

    def abandon(self, kind: str, detail: str) -> list[Any]: ...


def warn_side_file(transfer: SideTransfer, report: FileReport, decision: Decision, sender: str, receiver: str,
                   chat: str, side: str, settings: ConversationSettings,
                   sides: SideWarnings | None = None) -> list[Any]:
    """A warn verdict on a file held on its own connection `side` (DCC, a SOCKS5 bytestream), announced on chat
    connection `chat`: our sender's is held (the tracker's warn_verdict tells the sender how to answer) and entered
    in SIDE_WARNINGS, with a Wake for this connection at the window's end; an outside sender's, or one whose
    connections are not known, gets the verdict (refused like a block). The commands, for the side session."""
    if transfer.inbound or not chat or not side:
        return transfer.verdict(decision)
    sides = SIDE_WARNINGS if sides is None else sides
    held = HeldMessage(sender, party(receiver), transfer.context, report.name, decision, b"", sides.clock(),
                       tag=transfer.transfer_id, report=report)
    out: list[Any] = []
    for gone in sides.hold(held, chat, side, settings):      # past warn_max_pending: the oldest, dropped there
        out += [outcome(gone.held, sides.clock()), Wake(connection_id=gone.side)]
    out += transfer.warn_verdict(decision, warn_instructions(settings))
    return out + [Wake(settings.warn_window_seconds + WAKE_SLACK)]     # its own window's end


def wake_side_file(transfer: SideTransfer, settings: ConversationSettings,
                   sides: SideWarnings | None = None) -> list[Any]:
    """The side session woken while its file is WARNED: the answer (or the window's end: EXPIRED, recorded here)
    carried out, the held bytes released or dropped; nothing while it still waits."""
    sides = SIDE_WARNINGS if sides is None else sides
    held = sides.collect(transfer.transfer_id, settings)
    if held is None:
        return []
    out: list[Any] = [outcome(held, sides.clock())] if held.state is WarnState.EXPIRED else []
    if delivers(held.state, settings):
        return out + transfer.verdict(release_decision(held.decision))
    return out + transfer.verdict(held.decision)


def side_receiver_left(transfer: SideTransfer, kind: str, sides: SideWarnings | None = None) -> list[Any]:
    """The receiver of a WARNED side file closed: nobody to deliver to, the file given up (ABANDONED, recorded)."""
    sides = SIDE_WARNINGS if sides is None else sides
    held = sides.forget(transfer.transfer_id)
    out: list[Any] = [outcome(held, sides.clock())] if held is not None and held.state is WarnState.ABANDONED else []
    return out + transfer.abandon(f"{kind}_receiver_gone", "the receiver closed while the file waited for its "
                                  "sender's answer; nothing delivered")


def settle_answer(local: PendingWarnings, chat: str, sender: str, key: str, answer: Answer,
                  sides: SideWarnings | None = None) -> tuple[Settled, str]:
    """A chat session's answer, for what it holds itself (`local`) or a file its sender offered on a side connection
    (`sides`, SIDE_WARNINGS by default): the one held for `key` first (the connection's own before a side file),
    else the sender's oldest. The Settled, and the side connection to wake ("" for none)."""
    sides = SIDE_WARNINGS if sides is None else sides
    settings = local.settings
    if answer.state is WarnState.JUSTIFIED and not answer.text:
        return local.settle(sender, key, answer), ""
    if not local.has(sender, party(key)) and chat and (sides.has(sender, chat, key) or not local.has(sender)):
        found, side = sides.settle(sender, chat, key, answer, settings)
        if side:
            return found, side
    return local.settle(sender, key, answer), ""


def warn_instructions(settings: ConversationSettings) -> str:
    """What a held message's sender is told to do, after the reason."""
    minutes = settings.warn_window_seconds / 60
    window = f"{minutes:g} minute{'s' if minutes != 1 else ''}" if minutes >= 1 \
        else f"{settings.warn_window_seconds:g} seconds"
    return (f" To send it anyway, reply '{settings.warn_justify_keyword} <your reason>' within {window}; if this is "
            f"a mistake, reply '{settings.warn_false_positive_keyword}'. Both are recorded.")


def answer_notice(held: HeldMessage | None, answer: Answer, delivered: bool) -> str:
    """What the sender is told after answering."""
    if held is None:
        return "imguard: there is no held message to answer (it was delivered, or dropped after the time to answer)."
    to = f" to {held.key}" if held.key else ""
    what = "message" if held.report is None else f"file {held.report.name!r}" if held.report.name else "file"
    if answer.state is WarnState.JUSTIFIED:
        return f"imguard: your {what}{to} was delivered; your justification was recorded."
    if delivered:
        return f"imguard: your {what}{to} was delivered; your false-positive report was recorded."
    return f"imguard: your false-positive report was recorded; the {what}{to} was not delivered."


# --- disclaimers -------------------------------------------------------------------------------------------------

DISCLAIMER_PROTOCOLS = frozenset({"xmpp", "irc"})     # the sessions that inject a due disclaimer
DISCLAIMER_SENDER = "imguard"                           # the archive record's sender: the gateway told both parties


def conversation_pair(ctx: ChatContext) -> tuple[str, str] | None:
    """The two parties of a one-to-one conversation, in a fixed order (None for a room, a channel, or a message
    without one sender and one recipient)."""
    if ctx.conversation or len(ctx.recipients) != 1 or not ctx.sender:
        return None
    a, b = party(ctx.sender), party(ctx.recipients[0])
    if not a or not b or a == b or " " in a or " " in b:
        return None
    return (a, b) if a < b else (b, a)


ROOM = "room:"       # a room's key in FirstContacts: (ROOM + room, member), or (ROOM + room, ANYONE) in the room


ANYONE = "*"


def room_key(ctx: ChatContext, settings: ConversationSettings) -> tuple[str, str] | None:
    """The key of a room message's disclaimer: its inside writer in that room, or the room itself with
    disclaimer_in_room; None for a message that is not an inside member's into a room."""
    if not ctx.conversation or ctx.origin != FROM_CLIENT or not ctx.sender:
        return None
    room, member = ctx.conversation.lower(), party(ctx.sender)
    if not room or not member:
        return None
    return (ROOM + room, ANYONE if settings.disclaimer_in_room else member)


def in_room(key: tuple[str, str]) -> str:
    """The room of a room's key ("" for a pair of parties)."""
    return key[0][len(ROOM):] if key[0].startswith(ROOM) else ""


class FirstContacts:
    """When each pair of parties last got a disclaimer (wall-clock seconds), the least recently disclaimed first;
    at most disclaimer_max_pairs. `due` decides and remembers in one step."""

    def __init__(self, settings: ConversationSettings = ConversationSettings(),
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._last: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def remember(self, pair: tuple[str, str], when: float) -> None:
        if when <= self._last.get(pair, float("-inf")):
            return
        self._last[pair] = when
        self._last.move_to_end(pair)
        while len(self._last) > max(1, self.settings.disclaimer_max_pairs):
            self._last.popitem(last=False)

    def due(self, ctx: ChatContext, disclaimers: list[RuleMatch]) -> tuple[RuleMatch, tuple[str, str], bool] | None:
        """The disclaimer to give now for this message (the first of `disclaimers`), its pair and whether it is their
        first; None when the pair had one within the period, or this is no one-to-one conversation of a protocol
        that injects. A disclaimer returned is remembered as given."""
        if not disclaimers or ctx.protocol not in DISCLAIMER_PROTOCOLS:
            return None
        pair = conversation_pair(ctx) or room_key(ctx, self.settings)
        if pair is None:
            return None
        now = self.clock()
        last = self._last.get(pair)
        period = self.settings.disclaimer_every_days * 86400
        if last is not None and (period <= 0 or now - last < period):
            return None
        self.remember(pair, now)
        return disclaimers[0], pair, last is None

    def load(self, archive: Any) -> int:
        """Fill the table from the archive's disclaimer records of the period (all of them when it is 0); the
        number of pairs read. The archive's queue is written first (Archive.database)."""
        store = archive.database()
        mark = getattr(store, "mark", "?")
        since = 0.0 if self.settings.disclaimer_every_days <= 0 else \
            self.clock() - self.settings.disclaimer_every_days * 86400
        rows = store.fetch(f"SELECT recipients, conversation, MAX(time) FROM records WHERE kind = 'message' "
                           f"AND action = {mark} AND sender = {mark} AND time >= {mark} GROUP BY recipients, "
                           f"conversation", [DISCLAIM, DISCLAIMER_SENDER, _iso(since)])
        for recipients, room, when in rows:
            parties = tuple(str(recipients or "").split(" "))
            seconds = _seconds(when)
            if seconds is None:
                continue
            if room and len(parties) == 1:          # a room's (disclaimer_record): its member, or the room itself
                member = ANYONE if parties[0].lower() == str(room).lower() else parties[0]
                self.remember((ROOM + str(room).lower(), member), seconds)
            elif len(parties) == 2:
                self.remember((parties[0], parties[1]), seconds)
        return len(rows)


def _iso(seconds: float) -> str:
    """The archive's spelling of a time (archive._now: milliseconds, "+00:00"), so times compare as text."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _seconds(iso: Any) -> float | None:
    try:
        return datetime.datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def disclaimer_record(ctx: ChatContext, match: RuleMatch, pair: tuple[str, str],
                      policy_version: str) -> tuple[ChatContext, Decision]:
    """The archive record of a disclaimer given: from imguard to both parties, action `disclaim`, its rule. In a
    room: to its member (or to the room itself, with disclaimer_in_room), in the room."""
    decision = Decision(action=DISCLAIM, matches=[match], policy_version=policy_version)
    room = in_room(pair)
    if room:
        return (ctx.with_(sender=DISCLAIMER_SENDER, recipients=(room if pair[1] == ANYONE else pair[1],),
                          conversation=room), decision)
    return ctx.with_(sender=DISCLAIMER_SENDER, recipients=pair, conversation=""), decision


def disclaimer_event(ctx: ChatContext, match: RuleMatch, pair: tuple[str, str], first: bool) -> dict[str, Any]:
    """The event of a disclaimer given to the two parties of a conversation (dataset imguard.session)."""
    protocol = ctx.protocol or "chat"
    event = alerts.protocol_event(protocol, "disclaimer", ctx, category="session")
    event["imguard"].pop(protocol, None)
    room = in_room(pair)
    parties = list(pair) if not room else [] if pair[1] == ANYONE else [pair[1]]
    event["imguard"]["disclaimer"] = {"rule_id": match.rule_id, "text": match.notice, "parties": parties,
                                      "first_contact": first}
    if room:
        event["imguard"]["disclaimer"]["room"] = room
        event["imguard"]["disclaimer"]["in_room"] = pair[1] == ANYONE
    event["rule"] = {"id": match.rule_id, "name": [match.title]}
    to = (f"room {room}" if pair[1] == ANYONE else f"{pair[1]} in {room}") if room else f"{pair[0]} and {pair[1]}"
    event["message"] = f"{protocol} disclaimer {match.rule_id} to {to}" + (" (first contact)" if first else "")
    return event
