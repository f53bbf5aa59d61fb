"""Ethical walls (information barriers): one two-way rule that keeps two groups apart.

    - wall: {between: [research, trading], action: block}

in a rule file's list of rules is one wall. It stands for what a policy author would otherwise write as
four rules (messages and files, each way round): anything a member of one group sends to a member of
the other is decided by it, whatever the protocol, and the same parties are checked when one invites
the other into a room (`Policy.decide_membership`). A wall is compiled into ordinary `Rule`s (tag
`wall`), so its matches, notices, shadow mode and events are those of every rule: every attempt across it
is a decision event naming the wall's id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

from imguard.model import ALERT, BLOCK, ENFORCE, MODES, QUARANTINE, SEVERITIES, ChatContext, Decision
from imguard.policy import conditions as C
from imguard.policy.engine import Rule
from imguard.policy.notice import check_template
from imguard.policy.yamlsrc import Map, type_name
from imguard.policy.zones import PartyPattern

WALL_KEYS = ("id", "title", "between", "action", "severity", "mode", "notify", "description", "enabled")
WALL_ACTIONS = (BLOCK, QUARANTINE, ALERT)       # not mask: a wall is about who, not what
WALL_TAG = "wall"
DEFAULT_WALL_NOTICE = ("Not delivered: an information barrier separates {sender} and {recipients} "
                       "({reason}).")
DEFAULT_WALL_FILE_NOTICE = ("Your file {file.name} was not delivered: an information barrier separates {sender} "
                            "and {recipients} ({reason}).")


@dataclass(frozen=True)
class Wall:
    """Two groups kept apart, and the rules that do it."""
    id: str
    between: tuple[str, str]
    rules: tuple[Rule, ...]         # the message rule and the file rule

    @property
    def message_rule(self) -> Rule:
        return self.rules[0]


def _party(key: str, group: str, members: list[PartyPattern]) -> C.PartyCondition:
    pattern = PartyPattern(f"group:{group}", "group", group, members)
    cond = C.PartyCondition(key, [pattern])
    cond.key = key
    return cond


def compile_wall(doc: Any, line: int, groups: dict[str, list[PartyPattern]], filename: str,
                 error: Callable[[int, str], None]) -> Wall | None:
    """A `wall:` mapping -> a Wall, or None after reporting every problem through `error(line, message)`."""
    if not isinstance(doc, dict):
        error(line, f"wall: expected a mapping like {{between: [research, trading], action: block}}, "
                    f"got {type_name(doc)}")
        return None
    ln = doc.line_of if isinstance(doc, Map) else (lambda k: line)
    problems = 0

    def fail(at: int, message: str) -> None:
        nonlocal problems
        problems += 1
        error(at, message)

    for k in doc:
        if k not in WALL_KEYS:
            fail(ln(k), f"wall: unknown key {k!r}; allowed keys: {', '.join(WALL_KEYS)}")
    between = doc.get("between")
    names: list[str] = []
    if "between" not in doc:
        fail(line, "wall: missing required key 'between' (two group names from groups.yaml)")
    elif not isinstance(between, list) or len(between) != 2 or not all(isinstance(g, str) for g in between):
        fail(ln("between"), f"wall: between: expected a list of two group names, got {type_name(between)}")
    else:
        names = [g.strip().removeprefix("group:") for g in between]
        if names[0] == names[1]:
            fail(ln("between"), f"wall: between: a wall keeps two different groups apart, not {names[0]!r} "
                                f"and itself")
        for name in names:
            if name not in groups:
                known = ", ".join(sorted(groups)) or "none"
                fail(ln("between"), f"wall: between: unknown group {name!r} (groups defined in groups.yaml: "
                                    f"{known})")

    def choice(key: str, allowed: tuple[str, ...], default: str) -> str:
        value = doc.get(key, default)
        if not isinstance(value, str) or value.lower() not in allowed:
            fail(ln(key), f"wall: {key}: {type_name(value)} is not one of: {', '.join(allowed)}")
            return default
        return value.lower()

    def text(key: str, default: str) -> str:
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            fail(ln(key), f"wall: {key}: expected text, got {type_name(value)}")
            return default
        return str(value)

    action = choice("action", WALL_ACTIONS, BLOCK)
    severity = choice("severity", SEVERITIES, "high")
    mode = choice("mode", MODES, ENFORCE)
    enabled = doc.get("enabled", True)
    if not isinstance(enabled, bool):
        fail(ln("enabled"), f"wall: enabled: expected true or false, got {type_name(enabled)}")
    wid = text("id", "wall-" + "-".join(names)) if names else text("id", "wall")
    title = text("title", f"Ethical wall between {' and '.join(names)}")
    notify = text("notify", "")
    description = text("description", "")
    for problem in check_template(notify, "message") if notify else ():
        fail(ln("notify"), f"wall: {problem}")
    if problems or enabled is not True:
        return None
    a, b = names
    match = [[_party("sender", a, groups[a]), _party("recipient", b, groups[b])],
             [_party("sender", b, groups[b]), _party("recipient", a, groups[a])]]
    notices = {"message": notify or DEFAULT_WALL_NOTICE, "file": notify or DEFAULT_WALL_FILE_NOTICE}
    rules = tuple(Rule(id=wid, title=title, severity=severity, mode=mode, action=action, applies_to=applies_to,
                       match=match, notify=notices[applies_to], description=description, tags=(WALL_TAG,),
                       file=filename, line=line)
                  for applies_to in ("message", "file"))
    return Wall(wid, (a, b), rules)


class Rooms:
    """Who is in the rooms our user is in, as one connection's session sees them (XMPP MUC occupant presences,
    IRC JOIN/PART/QUIT/KICK/NICK and NAMES): room -> {occupant key -> identity}. The key is how the protocol names
    an occupant in the room (an XMPP room nick, an IRC nick, lowercased by the caller); the identity is what groups
    match (a real JID, an IRC nick!user@host or the nick alone). An occupant whose identity the session cannot see
    (a semi-anonymous XMPP room) is kept with identity "" and counts for no group.

    Bounded: at most `limit` occupants over all rooms of the connection (the setting `max_room_members`); past it
    an occupant is not recorded, `enter` says so and the caller records an anomaly: the wall then decides on the
    members it knows.

    A message to a room is decided against all its members (Policy.decide_membership costs some microseconds per
    member with a wall in force): a member list that no wall matched under a policy version is remembered as such
    (`allowed`), until a member comes or goes, so a busy room costs a lookup per message. A decision that matched is
    never remembered: every attempt across a wall is decided, and recorded, again."""

    def __init__(self, limit: int):
        self.limit = limit
        self._rooms: dict[str, dict[str, str]] = {}
        self._count = 0
        self._allowed: dict[str, str] = {}      # room -> the policy version under which its members were allowed

    def allowed(self, room: str, policy_version: str) -> bool:
        """This room's members, as they are, were decided with no wall matching under `policy_version`."""
        return self._allowed.get(room) == policy_version

    def allow(self, room: str, policy_version: str) -> None:
        self._allowed[room] = policy_version

    def __contains__(self, room: str) -> bool:
        return room in self._rooms

    def open(self, room: str) -> None:
        """Our user is in `room` (its members follow)."""
        self._rooms.setdefault(room, {})

    def close(self, room: str) -> None:
        """Our user left `room`: its members are forgotten."""
        self._count -= len(self._rooms.pop(room, {}))
        self._allowed.pop(room, None)

    def enter(self, room: str, key: str, identity: str) -> bool:
        """`key` is in `room` (a room our user is in) as `identity`. False: not recorded (the limit)."""
        members = self._rooms.get(room)
        if members is None:
            return True
        if key not in members:
            if self._count >= self.limit:
                return False
            self._count += 1
        if (identity or key not in members) and members.get(key) != identity:
            members[key] = identity
            self._allowed.pop(room, None)
        return True

    def leave(self, room: str, key: str) -> str | None:
        """`key` left `room`; its identity, or None if it was not known there."""
        members = self._rooms.get(room)
        if members is None or key not in members:
            return None
        self._count -= 1
        self._allowed.pop(room, None)
        return members.pop(key)

    def quit(self, key: str) -> None:
        """`key` left every room (IRC QUIT)."""
        for room in list(self._rooms):
            self.leave(room, key)

    def rename(self, old: str, new: str, identity: str) -> None:
        """`old` is now `new` (IRC NICK), as `identity`, in every room it is in."""
        for room, members in self._rooms.items():
            if old in members:
                del members[old]
                members[new] = identity
                self._allowed.pop(room, None)

    def identity(self, room: str, key: str) -> str:
        return self._rooms.get(room, {}).get(key, "")

    def identities(self, room: str, besides: str = "") -> tuple[str, ...]:
        """The known identities in `room`, but `besides` (our user's own key) and those not known."""
        return tuple(sorted({i for k, i in self._rooms.get(room, {}).items() if i and k != besides}))

    def has(self, room: str, identity: str) -> bool:
        return identity in self._rooms.get(room, {}).values()


def decide_room(check: Callable[[ChatContext], Decision], rooms: Rooms, room: str,
                ctx_for: Callable[[tuple[str, ...]], ChatContext], besides: str = "",
                exclude: str = "") -> Decision | None:
    """A message to `room` decided by the walls against the room's members (`besides` our user's key, `exclude` its
    identity), `check` being the session's checker.check_membership for the room (which records a wall's match).
    None: allowed without a decision (no members; or the same members were allowed under the policy in force, whose
    version a decision on no recipients tells: no wall can match it, so it is never recorded)."""
    version = check(ctx_for(())).policy_version
    if rooms.allowed(room, version):
        return None
    members = tuple(m for m in rooms.identities(room, besides) if m != exclude)
    if not members:
        rooms.allow(room, version)
        return None
    decision = check(ctx_for(members))
    if not decision.matches and not decision.shadow:
        rooms.allow(room, decision.policy_version)
    return decision


class Learned(NamedTuple):
    """What membership facts changed, for the walls to decide on (learn_members)."""
    arrived: list[tuple[str, str]]      # (room, member): another member newly in a room our user is in
    entered: list[str]                  # rooms our user is newly in (its join: decided against who is there)
    kept: bool                          # False: a member could not be recorded (the table's limit)


def learn_members(rooms: Rooms, facts: Iterable[tuple[str, str, str]], user: str) -> Learned:
    """Room membership facts (room, member, membership: Matrix's join, leave, ban, ...) as a chat API's response shows
    them to `user` (a process-wide table: a room is the same for every user behind the gateway; a member's key and
    identity are its user id)."""
    learned = Learned([], [], True)
    joined: list[tuple[str, str]] = []
    for room, member, membership in facts:
        rooms.open(room)
        if membership == "join":
            if not rooms.identity(room, member):
                joined.append((room, member))
            if not rooms.enter(room, member, member):
                learned = learned._replace(kept=False)
        elif membership in ("leave", "ban"):
            rooms.leave(room, member)
    entered = {room for room, member in joined if member == user}
    learned.entered.extend(dict.fromkeys(room for room, member in joined if member == user))
    learned.arrived.extend((room, member) for room, member in joined
                           if member != user and room not in entered and user and rooms.identity(room, user) == user)
    return learned
