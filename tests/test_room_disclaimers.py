"""Disclaimers in rooms (imguard/conversation.py `room_key`), end to end with real parts: slixmpp clients in a real
Prosody's XEP-0045 rooms (conference.localhost) and `irc` library clients in real ngIRCd channels, through the real
`imguard run`, with the disclaimer rules of tests/test_disclaimers.py.

What the members and an auditor would check: an inside member's first message into a room brings the disclaimer, in
the room's own window and before the message (XMPP: a groupchat message from the room's address; IRC: a NOTICE to the
channel from imguard); by default to that member only (the outside member never gets it), once per member, room and
period, and again after the period; an outside member's messages to the room bring none. With
`--disclaimer-in-room` it is said in the room for every member, once per room, whoever inside writes first. Each one
is an event (with the room) and an archive record in the room's conversation.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from imguard.conversation import ConversationSettings, FirstContacts, disclaimer_event, disclaimer_record, room_key
from imguard.model import FROM_CLIENT, FROM_SERVER, ChatContext, RuleMatch
from tests.peers.conversation_rules import ngircd, serving, wait_for
from tests.test_disclaimers import IN_TEXT, OUT_TEXT, endpoints, prepare, xmpp_client
from tests.test_ethical_walls import join_room
from tests.test_wall_rooms import say

pytestmark = pytest.mark.timeout(240)

PERIOD = 5.0                            # seconds: --disclaimer-every-days of the gateways here


def room_disclaimers(events: list[dict], room: str) -> list[dict]:
    return [e for e in events if e.get("event", {}).get("action") == "disclaimer"
            and e["imguard"]["disclaimer"].get("room") == room.lower()]


# --- XMPP: Prosody's conference.localhost -------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[False, True], ids=["to-members", "in-room"])
def xmpp_room_gateway(request, peers_dir, prosody):
    from tests.peers.gateway import Gateway
    directory = peers_dir / f"imguard-roomdisclaimer-{uuid.uuid4().hex[:6]}"
    extra = prepare(directory) + ["--fail-mode", "xmpp:downgrade=open",
                                  "--disclaimer-every-days", repr(PERIOD / 86400)]
    if request.param:
        extra.append("--disclaimer-in-room")
    gw = Gateway.start(directory, prosody, extra=extra)
    gw.in_room = request.param
    yield from serving(gw)


def groupchat(client, room: str) -> list[tuple[str, str]]:
    """What `client` got from `room`, in order: (the occupant's nick, "" for the room itself; the body)."""
    return [(str(m["from"]).partition("/")[2], m["body"]) for m in client.received.messages
            if m["type"] == "groupchat" and str(m["from"]).split("/")[0] == room and m["body"]]


async def said(sender, room: str, body: str, *witnesses) -> None:
    """`sender` says `body` in the room; it and every witness have it (the room reflects it to its sender too)."""
    say(sender, room, body)
    for client in (sender, *witnesses):
        assert await client.wait_for(lambda r, c=client: body in [b for _, b in groupchat(c, room)]), \
            f"{body!r} did not come back from {room}: {groupchat(client, room)}"


def test_xmpp_room_disclaimer_to_inside_members_or_in_the_room(prosody, xmpp_room_gateway):
    """alice and dave (inside) and bob (outside) are in a room. bob writes: no disclaimer. alice writes: the outbound
    disclaimer comes before her message, to her alone in the room's window from the room's address (to-members), or
    said in the room for all (in-room). Her next message and bob's: none. dave writes: his own (to-members) or none
    (in-room: the room had it). After the period alice's message brings it again."""
    gw = xmpp_room_gateway
    tag = uuid.uuid4().hex[:6]
    room = f"desk-{tag}@conference.localhost"
    since = gw.mark()

    async def scenario():
        inside, outside = endpoints(prosody, gw)
        alice = await xmpp_client(prosody, inside, "alice", tag)
        dave = await xmpp_client(prosody, inside, "dave", tag)
        bob = await xmpp_client(prosody, outside, "bob", tag)
        people = (alice, dave, bob)
        try:
            for client, nick in ((alice, "al"), (dave, "da"), (bob, "bo")):
                await join_room(client, room, nick)
            await said(bob, room, f"bob first {tag}", alice, dave)
            first = f"alice first {tag}"
            await said(alice, room, first, dave, bob)
            texts = {c: [b for _, b in groupchat(c, room)] for c in people}
            assert OUT_TEXT in texts[alice] and texts[alice].index(OUT_TEXT) < texts[alice].index(first), texts[alice]
            if gw.in_room:
                for c in (dave, bob):
                    assert OUT_TEXT in texts[c] and texts[c].index(OUT_TEXT) < texts[c].index(first), texts[c]
                assert ("al", OUT_TEXT) in groupchat(bob, room), "the room's notice is not the room's own message"
            else:
                assert ("", OUT_TEXT) in groupchat(alice, room), "the notice did not come from the room's address"
                assert OUT_TEXT not in texts[dave] + texts[bob], "the member's disclaimer reached other members"
            await said(alice, room, f"alice again {tag}", dave, bob)
            await said(bob, room, f"bob again {tag}", alice, dave)
            await said(dave, room, f"dave first {tag}", alice, bob)
            counts = {c: [b for _, b in groupchat(c, room)].count(OUT_TEXT) for c in people}
            expected = {alice: 1, dave: 1, bob: 1} if gw.in_room else {alice: 1, dave: 1, bob: 0}
            assert counts == expected, {c.jid: n for c, n in counts.items()}
            assert all(IN_TEXT not in [b for _, b in groupchat(c, room)] for c in people)
            await asyncio.sleep(PERIOD + 0.5)
            await said(alice, room, f"alice after the period {tag}", dave, bob)
            assert [b for _, b in groupchat(alice, room)].count(OUT_TEXT) == 2, groupchat(alice, room)
        finally:
            for client in people:
                await client.close()
    asyncio.run(scenario())
    wanted = 2 if gw.in_room else 3
    assert wait_for(lambda: len(room_disclaimers(gw.alerts()[since:], room)) >= wanted)
    events = room_disclaimers(gw.alerts()[since:], room)
    if gw.in_room:
        assert [(e["imguard"]["disclaimer"]["parties"], e["imguard"]["disclaimer"]["in_room"],
                 e["imguard"]["disclaimer"]["first_contact"]) for e in events] == [([], True, True), ([], True, False)]
    else:
        people = [e["imguard"]["disclaimer"]["parties"][0].split("-")[0] for e in events]
        assert people == ["alice", "dave", "alice"], people
        assert [e["imguard"]["disclaimer"]["first_contact"] for e in events] == [True, True, False]
    assert all(e["network"]["direction"] == "outbound" and e["imguard"]["disclaimer"]["text"] == OUT_TEXT
               for e in events), events


# --- IRC: ngIRCd channels -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def room_ircd(peers_dir):
    yield from ngircd(peers_dir / f"ngircd-roomdisclaimer-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module", params=[False, True], ids=["to-members", "in-room"])
def irc_room_gateway(request, peers_dir, room_ircd):
    from tests.peers.ngircd import IrcGateway
    directory = peers_dir / f"imguard-irc-roomdisclaimer-{uuid.uuid4().hex[:6]}"
    extra = prepare(directory) + ["--disclaimer-every-days", repr(PERIOD / 86400)]
    if request.param:
        extra.append("--disclaimer-in-room")
    gw = IrcGateway.start(directory, room_ircd, extra=extra)
    gw.in_room = request.param
    yield from serving(gw)


def test_irc_channel_disclaimer_to_inside_members_or_in_the_channel(room_ircd, irc_room_gateway):
    """The same in an ngIRCd channel: me and dave inside, other outside. The outside member's line brings none; my
    first line brings a NOTICE to the channel, before the line: from imguard to me alone (to-members), or said in
    the channel (in-room: every member sees it, from me). dave's first line: his own, or none (the channel had it).
    After the period, mine brings it again."""
    from tests.test_e2e_irc import Chat, Route
    gw = irc_room_gateway
    route = Route("imguard", False, room_ircd, gw)
    room = f"#desk-{uuid.uuid4().hex[:6]}"
    with Chat(route) as chat:
        seen: dict[object, list[tuple[str, str, str]]] = {}      # per connection: (kind, from nick, text), in order
        for kind in ("pubmsg", "pubnotice"):
            chat.reactor.add_global_handler(kind, lambda conn, event, kind=kind: seen.setdefault(conn, []).append(
                (kind, str(event.source).split("!")[0], event.arguments[0])) if event.target.lower() == room else None)
        me = chat.person("rdm", join=False)
        dave = chat.person("rdd", join=False)
        other = chat.person("rdo", join=False, outside=True)
        people = (me, dave, other)
        for person in people:
            person.conn.join(room)
        for person in people:       # everyone has seen everyone's JOIN: the channel is complete
            assert chat.pump(lambda p=person: sum(1 for q in people if q.joined) == 3, 15)

        def line(sender, text: str) -> None:
            sender.conn.privmsg(room, text)
            for person in people:
                if person is not sender:
                    assert chat.pump(lambda p=person: ("pubmsg", sender.nick, text) in seen.get(p.conn, []), 10), \
                        f"{text!r} did not reach {person.nick}: {seen.get(person.conn)}"

        def notices(person) -> list[tuple[str, str, str]]:
            return [s for s in seen.get(person.conn, []) if s[0] == "pubnotice" and s[2] == OUT_TEXT]
        time.sleep(0.3)
        line(other, "the outside member speaks first")
        first = f"my first line {uuid.uuid4().hex[:6]}"
        line(me, first)
        assert chat.pump(lambda: notices(me), 10), f"no disclaimer in the channel for {me.nick}: {seen.get(me.conn)}"
        assert notices(me)[0][1] == "imguard"
        if gw.in_room:
            for person in (dave, other):
                got = seen.get(person.conn, [])
                assert ("pubnotice", me.nick, OUT_TEXT) in got, got
                assert got.index(("pubnotice", me.nick, OUT_TEXT)) < got.index(("pubmsg", me.nick, first)), got
        else:
            line(dave, f"dave's first line {uuid.uuid4().hex[:6]}")
            assert chat.pump(lambda: notices(dave), 10), f"no disclaimer for {dave.nick}"
            assert not notices(other), "a member's disclaimer reached the outside member"
        line(me, "my second line")
        line(other, "the outside member again")
        line(dave, "dave again")
        expected = {me: 1, dave: 1, other: 1 if gw.in_room else 0}
        assert {p: len(notices(p)) for p in people} == expected, {p.nick: notices(p) for p in people}
        chat.pump(lambda: False, PERIOD + 0.5)
        line(me, "my line after the period")
        assert chat.pump(lambda: len(notices(me)) == 2, 10), notices(me)
    assert wait_for(lambda: len(room_disclaimers(gw.alerts()[route.since:], room)) >= (2 if gw.in_room else 3))
    events = room_disclaimers(gw.alerts()[route.since:], room)
    if gw.in_room:
        assert [(e["imguard"]["disclaimer"]["parties"], e["imguard"]["disclaimer"]["first_contact"])
                for e in events] == [([], True), ([], False)]
    else:
        assert [(e["imguard"]["disclaimer"]["parties"], e["imguard"]["disclaimer"]["first_contact"])
                for e in events] == [([me.nick.lower()], True), ([dave.nick.lower()], True),
                                     ([me.nick.lower()], False)]


# --- the table and the records alone -----------------------------------------------------------------------------

MATCH = RuleMatch("test-disclaimer-outbound", "disclaim", "info", "enforce", title="t", notice=OUT_TEXT)


def test_room_keys_per_member_or_per_room_and_only_for_inside_writers():
    for in_room in (False, True):
        table = FirstContacts(ConversationSettings(disclaimer_in_room=in_room), clock=lambda: 1000.0)
        mine = ChatContext(protocol="irc", sender="Me!u@h", recipients=("#Desk",), conversation="#Desk",
                           origin=FROM_CLIENT)
        theirs = mine.with_(sender="other!o@h", origin=FROM_SERVER)
        dave = mine.with_(sender="dave!d@h")
        assert table.due(theirs, [MATCH]) is None, "an outside member's room message brought a disclaimer"
        match, key, first = table.due(mine, [MATCH])
        assert first and key == (("room:#desk", "*") if in_room else ("room:#desk", "me"))
        assert table.due(mine, [MATCH]) is None
        assert (table.due(dave, [MATCH]) is None) is in_room
        record, _ = disclaimer_record(mine, match, key, "v1")
        assert record.conversation == "#desk" and record.recipients == (("#desk",) if in_room else ("me",))
        event = disclaimer_event(mine, match, key, first)["imguard"]["disclaimer"]
        assert event["room"] == "#desk" and event["in_room"] is in_room
        assert event["parties"] == ([] if in_room else ["me"])


def test_room_disclaimers_are_read_back_from_the_archive(tmp_path):
    """A restart with the archive: a room's disclaimer records (per member, or the room's own) are remembered."""
    from imguard.archive import Archive
    from imguard.model import Decision
    archive = Archive(tmp_path / "archive.sqlite3")
    now = time.time()
    for in_room in (False, True):
        ctx = ChatContext(protocol="xmpp", sender="alice@corp", recipients=(f"r{in_room}@conf",),
                          conversation=f"r{in_room}@conf", origin=FROM_CLIENT)
        key = room_key(ctx, ConversationSettings(disclaimer_in_room=in_room))
        archive.add_message(OUT_TEXT, *disclaimer_record(ctx, MATCH, key, "v1"))
    archive.add_message("hello", ChatContext(sender="a@x", recipients=("b@y",)), Decision())
    archive.commit()
    for in_room in (False, True):
        table = FirstContacts(ConversationSettings(disclaimer_in_room=in_room), clock=lambda: now)
        assert table.load(archive) >= 2
        ctx = ChatContext(protocol="xmpp", sender="alice@corp", recipients=(f"r{in_room}@conf",),
                          conversation=f"r{in_room}@conf", origin=FROM_CLIENT)
        assert table.due(ctx, [MATCH]) is None, f"remembered nothing for the room (in_room={in_room})"
