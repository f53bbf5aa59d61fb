"""Passwords for encrypted archives: the configured list, and what the conversation said around the file.

In chat, the password of an encrypted zip is usually the next message ("pw: infected"), sometimes the one before.
The same candidates open encrypted 7z and RAR (inspect/encrypted.py); "zip" below stands for all three.
`ConversationPasswords` remembers the recent short messages of each conversation (both directions), so that the
pipeline can try them on an encrypted archive that crossed in the same conversation:

    memory = ConversationPasswords(window=120, max_messages=8)
    memory.saw("the password is Tr0ub4dor", ctx, record_id)          # every message, from Pipeline.check_message
    memory.candidates(ctx)                      # -> [Candidate(...), ...] newest first, within the window
    memory.wait(ctx, after=seq, timeout=10)     # the candidates of messages that arrive in the next 10 s
    pool(tried, new, room(inspector), opened_by(report))    # what the file's next try gets: all of them, bounded

A `Candidate` carries where the password came from (the configured list, or the message: its archive record id,
sender and time, before or after the file) but its `facts()` never the password: what is logged and recorded
names the message that held it, never the password in clear. The memory holds only short messages (`max_chars`), at most
`max_messages` per conversation, in at most `max_conversations`; they are tried only within `window` seconds.
`saw()` is on every message's path, so it only appends; the words are taken when an encrypted zip asks.

Conversations: a room (ctx.conversation, or an IRC channel among the recipients) is one; between two people the
pair is one whichever of them sends (identities lower-cased, an XMPP resource and an IRC user@host dropped). A
file whose recipient is not known (an XEP-0363 upload) takes the messages of its sender's conversations.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timezone

from imguard.inspect.archives import ZIP_LOCKED
from imguard.inspect.encrypted import RAR_LOCKED, SEVEN_LOCKED
from imguard.model import ENCRYPTED, REASON_ENCRYPTED, UNSCANNABLE, ChatContext, FileReport

LIST, CONVERSATION = "list", "conversation"
BEFORE, AFTER = "before", "after"
MAX_TOKEN = 64                      # longer words are not passwords anyone types
MAX_TOKENS = 8                      # candidates taken from one message
_CUE = re.compile(r"(?i)\b(?:password|passwort|passwd|pass|pwd|pw|kennwort|mot de passe|mdp|contrase(?:ñ|n)a|senha|"
                  r"parola|wachtwoord|zip)\b\s*(?:is|ist|est|:|=|-)?\s*[:=]?\s*(\S+)")
_STRIP = "\"'`«»“”‘’.,;!?()[]{}<>"


@dataclass(frozen=True)
class Candidate:
    password: str = ""              # never logged, never recorded
    source: str = LIST              # LIST or CONVERSATION
    index: int = 0                  # LIST: the entry's position in the setting (1-based)
    message_id: str = ""            # CONVERSATION: the archive record id of the message ("" without an archive)
    sender: str = ""
    time: str = ""                  # ISO time the message was seen
    position: str = ""              # BEFORE or AFTER the file

    def describe(self) -> str:
        if self.source == LIST:
            return f"entry {self.index} of the zip_passwords setting"
        ref = f"archive record {self.message_id}" if self.message_id else "no archive record"
        return f"a message from {self.sender or 'an unknown sender'} {self.position} the file ({ref}, {self.time})"

    def facts(self) -> dict[str, object]:
        """What the report and the event say about the password: where it came from, not what it is."""
        if self.source == LIST:
            return {"password_source": LIST, "list_entry": self.index}
        return {"password_source": CONVERSATION, "message_id": self.message_id, "message_sender": self.sender,
                "message_time": self.time, "message_position": self.position}


def configured(passwords: str) -> tuple[Candidate, ...]:
    """The zip_passwords setting (comma separated) as candidates."""
    words = [p.strip() for p in passwords.split(",")]
    return tuple(Candidate(p, LIST, i) for i, p in enumerate((w for w in words if w), 1))


def words_of(text: str, max_chars: int) -> list[str]:
    """The password candidates of one message: what follows a cue ("password:", "pw", "mot de passe"), the whole
    message, and its words, in that order, without repeats; none for a long message."""
    text = text.strip()
    if not text or len(text) > max_chars:
        return []
    found = [m.group(1).strip(_STRIP) for m in _CUE.finditer(text)]
    found.append(text)
    found += [w.strip(_STRIP) for w in text.split()]
    out: list[str] = []
    for word in found:
        if word and len(word) <= MAX_TOKEN and word not in out:
            out.append(word)
    return out[:MAX_TOKENS]


LOCKED = (ZIP_LOCKED, SEVEN_LOCKED, RAR_LOCKED)        # the details of a member no password opened


def locked_members(report: FileReport) -> int:
    """How many encrypted zip, 7z and RAR members of the report no password opened (an archive whose names are
    encrypted counts as one)."""
    return sum(1 for r in report.walk() for f in r.findings
               if f.kind == UNSCANNABLE and f.data.get("reason") == REASON_ENCRYPTED and f.detail in LOCKED)


def opened_by(report: FileReport) -> list[dict]:
    """The facts of the conversation's candidates that opened a member of the report (its ENCRYPTED findings)."""
    return [f.data for r in report.walk() for f in r.findings
            if f.kind == ENCRYPTED and f.data.get("password_source") == CONVERSATION]


def room(inspector: object) -> int:
    """How many of the conversation's candidates one inspection tries: zip_password_tries less the configured list
    (which the inspector tries first)."""
    tries = int(getattr(getattr(inspector, "limits", None), "zip_password_tries", 64))
    return max(0, tries - len(getattr(inspector, "zip_passwords", ())))


def pool(earlier: list[Candidate], new: list[Candidate], limit: int, opened: list[dict] = ()) -> list[Candidate]:
    """The candidates a file's next try gets, every one collected for it in the window: the members of an archive
    may each have their own password, said in messages of their own, and a try with only the newest message's words
    would lock again what an older one had opened. In order: the words of the messages that opened a member so far
    (`opened`: their facts, opened_by), then `new` (the latest messages, newest first), then the `earlier`; each
    password once (its first place); at most `limit` (zip_password_tries less the list: room())."""
    out: list[Candidate] = []
    words: set[str] = set()
    first = [c for c in (*earlier, *new) if c.facts() in opened]
    for candidate in (*first, *new, *earlier):
        if len(out) >= limit:
            break
        if candidate.password not in words:
            words.add(candidate.password)
            out.append(candidate)
    return out


def for_limits(limits: object) -> "ConversationPasswords":
    """The memory the InspectLimits' zip_password_window asks for (0: one that remembers nothing)."""
    return ConversationPasswords(window=float(getattr(limits, "zip_password_window", 0.0) or 0.0))


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _party(identity: str) -> str:
    return identity.split("!", 1)[0].split("/", 1)[0].strip().lower()


def _keys(ctx: ChatContext) -> list[tuple]:
    """The conversations a message or file belongs to."""
    sender = _party(ctx.sender)
    keys: list[tuple] = []
    if ctx.conversation:
        keys.append(("room", _party(ctx.conversation)))
    for recipient in ctx.recipients:
        party = _party(recipient)
        if party[:1] in ("#", "&", "!", "+"):
            keys.append(("room", party))
        elif party and sender:
            keys.append(("pair", *sorted((sender, party))))
    return keys


@dataclass
class _Seen:
    seq: int
    at: float                       # monotonic
    text: str
    message_id: str
    sender: str
    time: float                     # wall clock, for the record


class ConversationPasswords:
    def __init__(self, window: float = 120.0, max_messages: int = 8, max_chars: int = 200,
                 max_conversations: int = 10000) -> None:
        self.window, self.max_messages, self.max_chars = window, max_messages, max_chars
        self.max_conversations = max_conversations
        self._lock = threading.Condition()
        self._seq = 0
        self._waiting = 0               # threads in wait(): only then does a message notify
        self._by_key: OrderedDict[tuple, deque[_Seen]] = OrderedDict()
        self.message_thread: threading.Thread | None = None     # the thread that delivers messages
        self._message_keys: dict[ChatContext, list[tuple]] = {}  # a context's conversations (sessions reuse them)

    @property
    def seq(self) -> int:
        return self._seq

    def saw(self, text: str | None, ctx: ChatContext, message_id: str = "") -> None:
        """Remember a message's words (if it is short enough to hold a password). On every message's path: a long
        message costs a length test, a short one a few microseconds (the keys of a context are remembered)."""
        if self.message_thread is None:
            self.message_thread = threading.current_thread()
        if self.window <= 0 or not isinstance(text, str) or not text or len(text) > self.max_chars:
            return
        keys = self._message_keys.get(ctx)
        if keys is None:
            keys = _keys(ctx)
            if keys:
                keys = list(dict.fromkeys(keys + [("party", _party(p)) for p in (ctx.sender, *ctx.recipients)]))
            if len(self._message_keys) >= 4096:
                self._message_keys.clear()
            self._message_keys[ctx] = keys
        if not keys or text.isspace():
            return
        with self._lock:       # the text is kept; its words are taken only when an encrypted zip asks (rare)
            self._seq += 1
            seen = _Seen(self._seq, time.monotonic(), text, message_id, ctx.sender, time.time())
            for key in keys:
                queue = self._by_key.get(key)
                if queue is None:
                    queue = self._by_key[key] = deque(maxlen=self.max_messages)
                    while len(self._by_key) > self.max_conversations:
                        self._by_key.popitem(last=False)
                else:
                    self._by_key.move_to_end(key)
                queue.append(seen)
            if self._waiting:
                self._lock.notify_all()

    def _file_keys(self, ctx: ChatContext) -> list[tuple]:
        keys = _keys(ctx)
        return keys if keys else [("party", _party(ctx.sender))]

    def _collect(self, keys: list[tuple], after: int, since: float, position: str,
                 upto: int | None = None) -> list[Candidate]:
        seen: dict[int, _Seen] = {}
        for key in keys:
            for item in self._by_key.get(key, ()):
                if item.seq > after and item.at >= since and (upto is None or item.seq <= upto):
                    seen[item.seq] = item
        out: list[Candidate] = []
        words: set[str] = set()
        for item in sorted(seen.values(), key=lambda s: -s.seq):       # newest first
            for word in words_of(item.text, self.max_chars):
                if word not in words:
                    words.add(word)
                    out.append(Candidate(word, CONVERSATION, 0, item.message_id, item.sender, _iso(item.time),
                                         position))
        return out

    def candidates(self, ctx: ChatContext, upto: int | None = None) -> tuple[int, list[Candidate]]:
        """(`upto`, the candidates of the messages numbered up to `upto` (the `seq` read when the file was complete;
        None: all) within the window), newest message first. Later messages are wait()'s, "after" the file."""
        with self._lock:
            upto = self._seq if upto is None else upto
            return upto, self._collect(self._file_keys(ctx), 0, time.monotonic() - self.window, BEFORE, upto)

    def wait(self, ctx: ChatContext, after: int, timeout: float) -> tuple[int, list[Candidate]]:
        """Wait up to `timeout` s for a message of the file's conversations numbered after `after`; its candidates
        (and those of any other that came meanwhile), or [] when none came in time."""
        keys = self._file_keys(ctx)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = self._collect(keys, after, 0.0, AFTER)
                if found:
                    return self._seq, found
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._seq, []
                self._waiting += 1
                try:
                    self._lock.wait(left)
                finally:
                    self._waiting -= 1
