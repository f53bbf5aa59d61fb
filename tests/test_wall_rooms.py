"""Ethical walls in rooms (imguard/policy/walls.py `Rooms`, the XMPP and IRC sessions' member lists): the recipients
of a room message are its members, and entering a room means meeting them.

End to end with real parts, as tests/test_ethical_walls.py (whose gateways, groups and wall these reuse): a real
`imguard run` in front of a real Prosody with its XEP-0045 service (conference.localhost, non-anonymous: the rooms
give every occupant's real JID) and slixmpp clients, and in front of a real ngIRCd with the `irc` library. One party
of the wall is behind the gateway, the other is not; each case runs with research (alice, wra_*) and with trading
(bob, wtb_*) inside. carol (wcn_*, in neither group) is in every room: she sees what the room does (an independent
witness of a join and a leave) and carries the sentinels, which never cross the wall.

    a) our user enters a room where the other side is: refused in the protocol's terms (XMPP: a presence error,
       policy-violation; IRC: the gateway parts the channel again, and says why), a `wall_join` event;
    b) the other side enters a room our user is in: a `wall_join` event, our user told; from then on our user's
       messages to the room are refused with the wall's notice, and the other side's room messages do not reach our
       user (`wall_message` events); once the other side leaves, the room is open again.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from imguard.model import ChatContext
from imguard.policy.walls import Rooms
from tests import test_ethical_walls as walls
from tests.test_ethical_walls import WALL_ID, Sides, _ids, bare, join_room, sentinel_via
from tests.xmpp_clients import error_condition, error_text

pytestmark = pytest.mark.timeout(180)
walls_dir, xmpp_wall, irc_wall = walls.walls_dir, walls.xmpp_wall, walls.irc_wall     # that module's gateways
MUC = "http://jabber.org/protocol/muc"


def wall_events(gw, since: int, action: str) -> list[dict]:
    return [e for e in gw.alerts()[since:] if e["event"].get("action") == action
            and WALL_ID in _ids(e.get("rule", {}).get("id"))]


def wait_wall_event(gw, since: int, action: str, sender_prefix: str) -> dict:
    """The first `action` event naming the wall whose sender starts with `sender_prefix` (events are written behind
    the traffic: polled)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in wall_events(gw, since, action)
                 if e["imguard"]["context"]["sender"].startswith(sender_prefix)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {action} event from {sender_prefix}: {wall_events(gw, since, action)}\n{gw.logs()}")


# --- the member list alone ---------------------------------------------------------------------------------------

def test_room_members_follow_joins_leaves_renames_and_stay_bounded():
    rooms = Rooms(limit=3)
    rooms.enter("#a", "x", "x!u@h")                 # not a room our user is in: ignored
    assert rooms.identities("#a") == ()
    rooms.open("#a")
    rooms.open("#b")
    assert rooms.enter("#a", "me", "me!u@h") and rooms.enter("#a", "x", "x!u@h") and rooms.enter("#b", "x", "x")
    assert not rooms.enter("#b", "y", "y"), "a fourth member past the limit of 3 was recorded"
    assert rooms.identities("#a", besides="me") == ("x!u@h",)
    rooms.rename("x", "z", "z!u@h")
    assert rooms.identities("#a", besides="me") == ("z!u@h",) and rooms.identities("#b") == ("z!u@h",)
    rooms.quit("z")
    assert rooms.identities("#a") == ("me!u@h",) and rooms.identities("#b") == ()
    assert rooms.enter("#b", "y", "y"), "a member left, so there is room for another"
    rooms.close("#a")
    assert "#a" not in rooms and rooms.enter("#b", "w", "") and rooms.identities("#b") == ("y",)


# --- XMPP: Prosody's conference.localhost ------------------------------------------------------------------------

def watch_room(client, room: str) -> list[tuple[str, str, str]]:
    """The presences `client` gets from `room`, as (occupant nick, type, the stanza)."""
    from slixmpp.xmlstream.handler import Callback
    from slixmpp.xmlstream.matcher import MatchXPath
    seen: list[tuple[str, str, str]] = []

    def on_presence(stanza) -> None:
        frm = str(stanza["from"])
        if frm.startswith(room + "/") or frm == room:
            seen.append((frm.partition("/")[2], stanza.xml.get("type", ""), str(stanza)))
            client.received.poke()
    client.xmpp.register_handler(Callback(f"watch {room} {uuid.uuid4().hex[:4]}",
                                          MatchXPath("{jabber:client}presence"), on_presence))
    return seen


def say(client, room: str, body: str) -> str:
    message_id = f"gc-{uuid.uuid4().hex[:8]}"
    client.send_raw(f"<message to='{room}' type='groupchat' id='{message_id}'><body>{body}</body></message>")
    return message_id


def room_bodies(client) -> list[str]:
    return [m["body"] for m in client.received.messages if m["type"] == "groupchat"]


async def room_message(client, body: str):
    return await client.wait_for(lambda r: [m for m in r.messages if m["type"] == "groupchat" and m["body"] == body])


@pytest.mark.parametrize("joiner, present", [("alice", "bob"), ("bob", "alice")])
def test_xmpp_entry_into_a_room_with_the_other_side_is_refused(prosody, xmpp_wall, joiner, present):
    """The user behind the gateway enters a room where a member of the other group already is: the client gets a
    presence error (policy-violation, naming the room) and never its own presence in the room; the room (as carol
    sees it) has the user come and go (the gateway left it for the user); the room's messages after that do not
    reach the user; a `wall_join` event names the wall, the room and both parties. Entering a room with carol alone
    is allowed."""
    gw = xmpp_wall
    gw.check_alive()
    since = gw.mark()
    sides = Sides(prosody, gw, inside=joiner)
    room = f"floor-{uuid.uuid4().hex[:6]}@conference.localhost"
    open_room = f"lobby-{uuid.uuid4().hex[:6]}@conference.localhost"

    async def scenario():
        async with sides.client(joiner) as inside, sides.client(present) as other, sides.client("carol") as carol:
            await join_room(other, room, present)
            await join_room(carol, room, "carol")
            await join_room(carol, open_room, "carol")
            await join_room(inside, open_room, joiner)         # carol alone there: allowed (join_room waited)
            by_carol, by_inside = watch_room(carol, room), watch_room(inside, room)
            inside.send_raw(f"<presence to='{room}/{joiner}'><x xmlns='{MUC}'/></presence>")
            refused = await inside.wait_for(lambda r: [p for p in by_inside if p[1] == "error"])
            assert refused, f"no presence error for {joiner}: {by_inside}"
            assert "policy-violation" in refused[0][2] and room in refused[0][2], refused[0][2]
            left = await carol.wait_for(lambda r: [p for p in by_carol if p[0] == joiner and p[1] == "unavailable"])
            assert left, f"carol did not see {joiner} leave {room} again: {by_carol}"
            after = f"after the refused entry {uuid.uuid4().hex[:6]}"
            say(other, room, after)
            assert await room_message(carol, after), "the room did not pass the other side's message to carol"
            await sentinel_via(other, carol, inside)
            assert after not in room_bodies(inside), f"{joiner} got the room's messages: {room_bodies(inside)}"
            assert [p for p in by_inside if p[1] != "error"] == [], f"{joiner} saw the room's presences: {by_inside}"
    asyncio.run(scenario())
    event = wait_wall_event(gw, since, "wall_join", prosody.jid(joiner))
    assert event["event"]["kind"] == "alert" and event["event"]["type"] == ["denied"], event["event"]
    assert event["imguard"]["membership"] == {"kind": "join", "room": room, "action": "block"}
    context = event["imguard"]["context"]
    assert context["direction"] == "outbound" and prosody.jid(present) in [bare(r) for r in context["recipients"]]
    assert prosody.jid("carol") in [bare(r) for r in context["recipients"]], context     # the room's members
    assert len(wall_events(gw, since, "wall_join")) == 1, wall_events(gw, since, "wall_join")   # not open_room


@pytest.mark.parametrize("inside, arriving", [("alice", "bob"), ("bob", "alice")])
def test_xmpp_room_with_the_other_side_in_it_carries_nothing_across_both_ways(prosody, xmpp_wall, inside, arriving):
    """The user behind the gateway is in a room with carol; a member of the other group enters (outside the
    gateway): a `wall_join` event, and the user is told. The user's message to the room is refused (a
    policy-violation error with the wall's notice) and reaches nobody; the other side's message to the room reaches
    carol but not the user. When the other side leaves, the user's messages reach the room again."""
    gw = xmpp_wall
    gw.check_alive()
    since = gw.mark()
    sides = Sides(prosody, gw, inside=inside)
    room = f"floor-{uuid.uuid4().hex[:6]}@conference.localhost"

    async def scenario():
        async with sides.client(inside) as me, sides.client(arriving) as other, sides.client("carol") as carol:
            await join_room(me, room, inside)
            await join_room(carol, room, "carol")
            by_me = watch_room(me, room)
            await join_room(other, room, arriving)
            told = await me.wait_for(lambda r: [m for m in r.messages if "entered" in (m["body"] or "")
                                                and room in (m["body"] or "")])
            assert told, f"{inside} was not told of {arriving}'s entry: {me.bodies()}"
            mine = f"from inside to the room {uuid.uuid4().hex[:6]}"
            mine_id = say(me, room, mine)
            error = await me.wait_message(id=mine_id, type="error")
            assert error is not None and error_condition(error) == "policy-violation", error
            assert "information barrier" in error_text(error), error_text(error)
            marker = f"carol to the room {uuid.uuid4().hex[:6]}"
            done = f"sentinel {uuid.uuid4().hex[:6]}"
            me.send_chat(carol.jid, done)           # me's earlier stanzas are handled by the time it arrives
            assert await carol.wait_message(done), f"{done!r} did not reach carol"
            say(carol, room, marker)
            assert await room_message(other, marker), f"carol's room message did not reach {arriving}"
            assert mine not in room_bodies(other) and mine not in room_bodies(carol), "the walled message crossed"
            theirs = f"from outside to the room {uuid.uuid4().hex[:6]}"
            say(other, room, theirs)
            assert await room_message(carol, theirs), "the room did not pass the outside message to carol"
            marker = f"carol to the room again {uuid.uuid4().hex[:6]}"
            say(carol, room, marker)
            assert await room_message(me, marker), f"carol's room message did not reach {inside}"
            assert theirs not in room_bodies(me), f"the walled room message reached {inside}: {room_bodies(me)}"
            other.send_raw(f"<presence to='{room}/{arriving}' type='unavailable'/>")
            assert await me.wait_for(lambda r: [p for p in by_me if p[0] == arriving and p[1] == "unavailable"])
            free = f"the room is open again {uuid.uuid4().hex[:6]}"
            say(me, room, free)
            assert await room_message(carol, free), f"{inside}'s message after {arriving} left did not reach carol"
    asyncio.run(scenario())
    arrival = wait_wall_event(gw, since, "wall_join", prosody.jid(arriving))
    assert arrival["imguard"]["context"]["direction"] == "inbound"
    assert [bare(r) for r in arrival["imguard"]["context"]["recipients"]] == [prosody.jid(inside)]
    outgoing = wait_wall_event(gw, since, "wall_message", prosody.jid(inside))
    assert outgoing["imguard"]["membership"] == {"kind": "message", "room": room, "action": "block"}
    assert outgoing["imguard"]["context"]["direction"] == "outbound"
    assert prosody.jid(arriving) in outgoing["imguard"]["context"]["recipients"], outgoing["imguard"]["context"]
    incoming = wait_wall_event(gw, since, "wall_message", prosody.jid(arriving))
    assert incoming["imguard"]["context"]["direction"] == "inbound"
    assert len(wall_events(gw, since, "wall_message")) == 2, wall_events(gw, since, "wall_message")


def test_xmpp_semi_anonymous_occupants_count_for_no_group(tmp_path):
    """On the session alone: a room that names no real JID (semi-anonymous) gives occupants no identity, so the
    wall does not see them (documented); the same room naming the real JID refuses the entry."""
    from imguard.files.expected import ExpectedTransfers
    from imguard.pipeline import Pipeline
    from imguard.policy import load_policy
    from imguard.protocols.xmpp.session import XmppSession
    from tests.test_ethical_walls import WALL_FILE, groups_yaml
    from tests.test_xmpp_session import CTX, play, segments, sent
    (tmp_path / "groups.yaml").write_text(groups_yaml(["alice@localhost"], ["bob@localhost"]))
    (tmp_path / "50-walls.yaml").write_text(WALL_FILE)
    pipeline = Pipeline(inspector=None, policy=load_policy(tmp_path))
    for jid, refused in (("", False), (" jid='bob@localhost/x'", True)):
        session = XmppSession(pipeline, ExpectedTransfers(), CTX, stripped_auth_open=True)
        play(session, segments("httpupload_alice.json")[:12])
        room = "desk@conference.localhost"
        enter = f"<presence to='{room}/al'><x xmlns='{MUC}'/></presence>".encode()
        assert sent(session.data_received(True, enter), to_client=False) == enter
        bob = (f"<presence from='{room}/bo' to='alice@localhost/t'><x xmlns='{MUC}#user'>"
               f"<item affiliation='none' role='participant'{jid}/></x></presence>").encode()
        assert sent(session.data_received(False, bob), to_client=True) == b"", "held until our own presence"
        own = (f"<presence from='{room}/al' to='alice@localhost/t'><x xmlns='{MUC}#user'>"
               f"<item affiliation='none' role='participant'/><status code='110'/></x></presence>").encode()
        cmds = session.data_received(False, own)
        to_client, to_server = sent(cmds, to_client=True).decode(), sent(cmds, to_client=False).decode()
        if refused:
            assert "type='error'" in to_client and "policy-violation" in to_client and "type='unavailable'" in to_server
        else:
            assert to_client == (bob + own).decode() and to_server == "", (to_client, to_server)


# --- IRC: ngIRCd channels ------------------------------------------------------------------------------------------

def watch_channels(chat) -> list[tuple[str, str, str, str]]:
    """Every JOIN and PART the test's people see: (seen by nick, command, who, channel)."""
    seen: list[tuple[str, str, str, str]] = []
    for kind in ("join", "part"):
        chat.reactor.add_global_handler(kind, lambda conn, event, kind=kind: seen.append(
            (chat.people[conn].nick, kind, event.source.nick, event.target.lower())))
    return seen


@pytest.mark.parametrize("joiner_side", ["research", "trading"])
def test_irc_join_into_a_channel_with_the_other_side_is_taken_back(irc_wall, joiner_side):
    """The user behind the gateway JOINs a channel where a member of the other group is: after the server's NAMES the
    gateway PARTs the channel for the user (carol, in the channel, sees the JOIN and the PART), the user gets
    imguard's NOTICE naming the channel, and a `wall_join` event names the wall. A JOIN into a channel with carol
    alone stays."""
    from tests.test_e2e_irc import Chat, Route
    ircd, gw = irc_wall
    gw.check_alive()
    route = Route("imguard", False, ircd, gw)
    bases = {"research": "wra", "trading": "wtb"}
    other_side = "trading" if joiner_side == "research" else "research"
    room, lobby = f"#floor-{uuid.uuid4().hex[:6]}", f"#lobby-{uuid.uuid4().hex[:6]}"
    with Chat(route) as chat:
        seen = watch_channels(chat)
        me = chat.person(bases[joiner_side], join=False)
        other = chat.person(bases[other_side], join=False, outside=True)
        carol = chat.person("wcn", join=False, outside=True)
        for person, channel in ((other, room), (carol, room), (carol, lobby), (me, lobby)):
            person.conn.join(channel)
            assert chat.pump(lambda p=person, c=channel: (p.nick, "join", p.nick, c) in seen, 10), seen
        me.conn.join(room)
        assert chat.pump(lambda: (carol.nick, "part", me.nick, room) in seen, 10), (
            f"carol did not see {me.nick} leave {room} again: {seen}\n{route.failure_logs()}")
        assert chat.pump(lambda: any(room in n and "refused" in n for n in me.imguard_notices()), 10), me.notices
        assert (carol.nick, "part", me.nick, lobby) not in seen
        hello = f"still in the lobby {uuid.uuid4().hex[:6]}"
        me.conn.privmsg(lobby, hello)
        assert chat.pump(lambda: hello in carol.channel_texts(), 10), f"{me.nick} is not in {lobby} any more"
    event = wait_wall_event(gw, route.since, "wall_join", me.nick)
    assert event["imguard"]["membership"] == {"kind": "join", "room": room, "action": "block"}
    context = event["imguard"]["context"]
    assert context["direction"] == "outbound" and any(r.startswith(other.nick) for r in context["recipients"])
    assert len(wall_events(gw, route.since, "wall_join")) == 1, wall_events(gw, route.since, "wall_join")


@pytest.mark.parametrize("inside_side", ["research", "trading"])
def test_irc_channel_with_the_other_side_in_it_carries_nothing_across_both_ways(irc_wall, inside_side):
    """The user behind the gateway is in a channel with carol; a member of the other group JOINs it (outside the
    gateway): a `wall_join` event, the user is told. The user's PRIVMSG to the channel is refused with the wall's
    notice and reaches nobody; the other side's PRIVMSG to the channel reaches carol but not the user. After the
    other side PARTs, the user's messages reach the channel again."""
    from tests.test_e2e_irc import Chat, Route
    ircd, gw = irc_wall
    gw.check_alive()
    route = Route("imguard", False, ircd, gw)
    bases = {"research": "wra", "trading": "wtb"}
    other_side = "trading" if inside_side == "research" else "research"
    room = f"#floor-{uuid.uuid4().hex[:6]}"
    with Chat(route) as chat:
        seen = watch_channels(chat)
        me = chat.person(bases[inside_side], join=False)
        other = chat.person(bases[other_side], join=False, outside=True)
        carol = chat.person("wcn", join=False, outside=True)
        for person in (me, carol, other):
            person.conn.join(room)
            assert chat.pump(lambda p=person: (p.nick, "join", p.nick, room) in seen, 10), seen
        assert chat.pump(lambda: any(other.nick in n and room in n for n in me.imguard_notices()), 10), me.notices
        mine = f"from inside to the channel {uuid.uuid4().hex[:6]}"
        me.conn.privmsg(room, mine)
        assert chat.pump(lambda: any("information barrier" in n for n in me.imguard_notices()), 10), me.notices
        done = f"sentinel {uuid.uuid4().hex[:6]}"
        me.conn.privmsg(carol.nick, done)       # me's earlier lines are handled by the time it arrives
        assert chat.pump(lambda: done in [m for _, m in carol.private], 10), carol.private
        marker = f"carol to the channel {uuid.uuid4().hex[:6]}"
        carol.conn.privmsg(room, marker)
        assert chat.pump(lambda: marker in other.channel_texts(), 10), other.channel
        assert mine not in other.channel_texts() + carol.channel_texts(), "the walled channel message crossed"
        theirs = f"from outside to the channel {uuid.uuid4().hex[:6]}"
        other.conn.privmsg(room, theirs)
        assert chat.pump(lambda: theirs in carol.channel_texts(), 10), carol.channel
        marker = f"carol to the channel again {uuid.uuid4().hex[:6]}"
        carol.conn.privmsg(room, marker)
        assert chat.pump(lambda: marker in me.channel_texts(), 10), me.channel
        assert theirs not in me.channel_texts(), f"the walled channel message reached {me.nick}"
        other.conn.part(room)
        assert chat.pump(lambda: (me.nick, "part", other.nick, room) in seen, 10), seen
        free = f"the channel is open again {uuid.uuid4().hex[:6]}"
        me.conn.privmsg(room, free)
        assert chat.pump(lambda: free in carol.channel_texts(), 10), f"after the PART: {carol.channel}"
    arrival = wait_wall_event(gw, route.since, "wall_join", other.nick)
    assert arrival["imguard"]["context"]["direction"] == "inbound"
    outgoing = wait_wall_event(gw, route.since, "wall_message", me.nick)
    assert outgoing["imguard"]["membership"] == {"kind": "message", "room": room, "action": "block"}
    assert outgoing["imguard"]["context"]["direction"] == "outbound"
    assert any(r.startswith(other.nick) for r in outgoing["imguard"]["context"]["recipients"])
    incoming = wait_wall_event(gw, route.since, "wall_message", other.nick)
    assert incoming["imguard"]["context"]["direction"] == "inbound"
    assert len(wall_events(gw, route.since, "wall_message")) == 2, wall_events(gw, route.since, "wall_message")


def test_a_room_decision_names_the_wall_for_members_on_the_other_side(tmp_path):
    """The policy alone: a join or a room message, its recipients the room's members, is refused when any member is
    on the other side, and allowed when none is."""
    from imguard.policy import load_policy
    from tests.test_ethical_walls import write_rules, WALL_FILE
    policy = load_policy(write_rules(tmp_path, WALL_FILE))
    walled = policy.decide_membership(ChatContext(sender="alice@corp.example",
                                                  recipients=("lee@corp.example", "bob@corp.example")))
    assert walled.action == "block" and walled.rule_ids == [WALL_ID]
    free = policy.decide_membership(ChatContext(sender="alice@corp.example", recipients=("lee@corp.example",)))
    assert free.action == "allow" and free.rule_ids == []


# --- the sessions alone: renames, leaves, quits -------------------------------------------------------------------

def _pipeline(tmp_path, research: list[str], trading: list[str]):
    from imguard.pipeline import Pipeline
    from imguard.policy import load_policy
    from tests.test_ethical_walls import WALL_FILE, groups_yaml
    (tmp_path / "groups.yaml").write_text(groups_yaml(research, trading))
    (tmp_path / "50-walls.yaml").write_text(WALL_FILE)
    return Pipeline(inspector=None, policy=load_policy(tmp_path))


def test_xmpp_session_follows_renames_and_departures(tmp_path):
    """alice (research) is in a room with carol; bob (trading) enters: her groupchat message is refused. bob's nick
    change (status 303) keeps him a member (and is no new entry); alice's own nick change keeps the room followed;
    once bob leaves, her message goes byte-identical."""
    from imguard.files.expected import ExpectedTransfers
    from imguard.protocols.xmpp.session import XmppSession
    from tests.test_xmpp_session import CTX, play, segments, sent
    session = XmppSession(_pipeline(tmp_path, ["alice@localhost"], ["bob@localhost"]), ExpectedTransfers(), CTX,
                          stripped_auth_open=True)
    play(session, segments("httpupload_alice.json")[:12])
    room = "desk@conference.localhost"

    def presence(nick: str, jid: str, extra: str = "", ptype: str = "") -> bytes:
        kind = f" type='{ptype}'" if ptype else ""
        return (f"<presence from='{room}/{nick}' to='alice@localhost/t'{kind}><x xmlns='{MUC}#user'>"
                f"<item affiliation='none' role='participant' jid='{jid}'{extra}/></x></presence>").encode()

    def walled() -> bool:
        message = f"<message to='{room}' type='groupchat' id='m'><body>hello</body></message>".encode()
        out = sent(session.data_received(True, message), to_client=False)
        assert out in (b"", message), out
        return out == b""
    session.data_received(True, f"<presence to='{room}/al'><x xmlns='{MUC}'/></presence>".encode())
    session.data_received(False, presence("ca", "carol@localhost/x"))
    cmds = session.data_received(False, presence("al", "alice@localhost/t", "/><status code='110'"))
    assert b"110" in sent(cmds, to_client=True), "the entry with carol alone was not let through"
    assert not walled()
    cmds = session.data_received(False, presence("bo", "bob@localhost/x"))
    assert b"entered" in sent(cmds, to_client=True) and walled()
    session.data_received(False, presence("bo", "bob@localhost/x", " nick='bobby'/><status code='303'",
                                          "unavailable"))
    cmds = session.data_received(False, presence("bobby", "bob@localhost/x"))
    assert b"entered" not in sent(cmds, to_client=True), "a nick change was taken for a new entry"
    assert walled()
    session.data_received(False, presence("al", "alice@localhost/t", " nick='ali'/><status code='303'/>"
                                          "<status code='110'", "unavailable"))
    session.data_received(False, presence("ali", "alice@localhost/t", "/><status code='110'"))
    assert walled(), "alice's own nick change lost the room"
    session.data_received(False, presence("bobby", "bob@localhost/x", "", "unavailable"))
    assert not walled(), "bob left, yet the room is still walled"


def test_irc_session_follows_names_nick_kick_and_quit(tmp_path):
    """wra_me (research) is in #desk; NAMES lists carol and wtb_x (trading): its PRIVMSG to #desk is refused; after
    wtb_x's NICK still (the same person under a new nick); after a KICK of it not; wtb_y's JOIN walls it again, its
    QUIT opens it; our user's own PART forgets the channel."""
    from imguard.files.expected import ExpectedTransfers
    from imguard.protocols.irc.session import IrcSession
    session = IrcSession(_pipeline(tmp_path, ["wra_*"], ["wtb_*"]), ExpectedTransfers(),
                         ChatContext(client_address="127.0.0.1"))
    session.data_received(False, b":srv 001 wra_me :Welcome wra_me!u@h\r\n")

    def walled() -> bool:
        line = b"PRIVMSG #desk :hello\r\n"
        out = [c for c in session.data_received(True, line) if hasattr(c, "to_client")]
        assert [c.data for c in out if not c.to_client] in ([], [line]), out
        return not [c for c in out if not c.to_client]
    cmds = session.data_received(False, b":wra_me!u@h JOIN #desk\r\n:srv 353 wra_me = #desk :wra_me @wcn_c\r\n"
                                        b":srv 366 wra_me #desk :End\r\n")
    assert not [c for c in cmds if getattr(c, "to_client", True) is False], "the join with carol alone was taken back"
    assert not walled()
    session.data_received(False, b":wtb_x!x@h JOIN #desk\r\n")
    assert walled()
    session.data_received(False, b":wtb_x!x@h NICK wtb_z\r\n")
    assert walled()
    session.data_received(False, b":wcn_c!c@h KICK #desk wtb_z :out\r\n")
    assert not walled()
    session.data_received(False, b":wtb_y!y@h JOIN #desk\r\n")
    assert walled()
    session.data_received(False, b":wtb_y!y@h QUIT :bye\r\n")
    assert not walled()
    session.data_received(False, b":wtb_y!y@h JOIN #desk\r\n")
    session.data_received(False, b":wra_me!u@h PART #desk\r\n")
    assert not walled(), "a channel our user left is still followed"
    cmds = session.data_received(False, b":wra_me!u@h JOIN #desk\r\n:srv 353 wra_me = #desk :wra_me wtb_y\r\n"
                                        b":srv 366 wra_me #desk :End\r\n")
    assert [c.data for c in cmds if getattr(c, "to_client", True) is False] == [b"PART #desk\r\n"], cmds
