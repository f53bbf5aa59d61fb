"""Ethical walls in Matrix rooms, what comes to our user: real matrix-nio clients, a real Synapse and the real
`imguard run` in front of it (tests/test_walls_matrix.py's fixtures and wall: research @wra-*, trading @wtb-*). Our
user is behind the gateway; the other side, a same-side colleague and carol (@wcn-*, in neither group) go straight to
Synapse. Each case runs with research inside and with trading inside.

    a) an invite from the other side never reaches our user: the /sync imguard relays has no such room under
       rooms.invite (nio's `invited_rooms` never lists it) and a `wall_invite` event (inbound) names it; a
       same-side colleague's invite sent after it arrives (the sentinel); the user's join by room id is refused;
    b) the other side joining a room our user is in shows in the user's timeline, right after their join, as
       imguard's notice (an m.notice nio reads), besides the `wall_join` event; carol's sentinel follows.

The carrier alone (gateway and replay share it): an invite whose invite_state shows a member of the other side is
taken out too; with no wall in force a /sync is not read for members at all (nothing is learned from it).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import nio
import pytest

from imguard.chatapi import ChatApiCarrier, ChatApiSettings, Rewrite
from imguard.model import ChatContext
from imguard.pipeline import Pipeline
from imguard.policy import load_policy
from imguard.protocols.httpchat import HttpRequest, matrix
from tests.test_e2e_matrix import synapse  # noqa: F401 (a fixture)
from tests.test_ethical_walls import WALL_FILE, groups_yaml
from tests.test_walls_matrix import BASES, matrix_wall, sides, wait_wall_event, wall_events  # noqa: F401

pytestmark = pytest.mark.timeout(240)
NOTICE = "across an ethical wall"


def _other(side: str) -> str:
    return "trading" if side == "research" else "research"


@pytest.mark.parametrize("inside_side", ["research", "trading"])
def test_matrix_invite_from_the_other_side_never_reaches_the_user(sides, inside_side):      # noqa: F811 (the imported fixture)
    """The other side invites our user, then a colleague of the user's own side does: the user's syncs bring the
    colleague's invite (nio lists it) and never the other side's; joining the other side's room by id is refused."""
    inside, outside = sides
    gw = inside.gateway

    async def scenario():
        me = await inside.client(BASES[inside_side])
        other = await outside.client(BASES[_other(inside_side)])
        colleague = await outside.client(BASES[inside_side])
        try:
            theirs = await other.room_create(invite=[me.user_id])
            assert isinstance(theirs, nio.RoomCreateResponse), theirs
            sentinel = await colleague.room_create(invite=[me.user_id])
            assert isinstance(sentinel, nio.RoomCreateResponse), sentinel
            invites: set[str] = set()
            deadline = time.monotonic() + 20
            while sentinel.room_id not in me.invited_rooms:
                assert time.monotonic() < deadline, "the same-side colleague's invite never reached our user"
                resp = await me.sync(timeout=500)
                assert isinstance(resp, nio.SyncResponse), resp
                invites |= set(resp.rooms.invite)
            assert theirs.room_id not in me.invited_rooms and theirs.room_id not in invites, \
                "the other side's invite reached our user"
            assert sentinel.room_id in invites
            joined = await me.join(theirs.room_id)
            assert isinstance(joined, nio.JoinError) and joined.status_code == "M_FORBIDDEN", joined
            assert isinstance(await me.join(sentinel.room_id), nio.JoinResponse), "control: the colleague's room"
            return me.user_id, other.user_id, theirs.room_id
        finally:
            for client in (me, other, colleague):
                await client.close()
    me, other, theirs = asyncio.run(scenario())
    invite = wait_wall_event(gw, inside.since, "wall_invite", other)
    assert invite["imguard"]["membership"] == {"kind": "invite", "room": theirs, "action": "block"}
    assert invite["imguard"]["context"]["direction"] == "inbound"
    assert invite["imguard"]["context"]["recipients"] == [me]
    join = wait_wall_event(gw, inside.since, "wall_join", me)
    assert join["imguard"]["membership"] == {"kind": "join", "room": theirs, "action": "block"}
    assert [e["imguard"]["membership"]["room"] for e in wall_events(gw, inside.since, "wall_invite")] == [theirs]


@pytest.mark.parametrize("inside_side", ["research", "trading"])
def test_matrix_the_other_side_joining_is_told_in_the_room(sides, inside_side):      # noqa: F811 (the imported fixture)
    """carol's room with our user in it; the other side joins straight at Synapse. The user's timeline shows
    imguard's notice right after the join (nio reads it as an m.notice), then carol's sentinel."""
    inside, outside = sides
    gw = inside.gateway

    async def scenario():
        me = await inside.client(BASES[inside_side])
        other = await outside.client(BASES[_other(inside_side)])
        carol = await outside.client("wcn")
        try:
            made = await carol.room_create(invite=[me.user_id, other.user_id])
            assert isinstance(made, nio.RoomCreateResponse), made
            room = made.room_id
            assert isinstance(await me.join(room), nio.JoinResponse)
            await me.sync(timeout=0)
            assert isinstance(await other.join(room), nio.JoinResponse)
            sentinel = f"carol's sentinel {uuid.uuid4().hex[:6]}"
            assert isinstance(await carol.room_send(room, "m.room.message", {"msgtype": "m.text", "body": sentinel}),
                              nio.RoomSendResponse)
            seen: list = []
            deadline = time.monotonic() + 20
            while not any(getattr(e, "body", None) == sentinel for e in seen):
                assert time.monotonic() < deadline, f"carol's sentinel never came: {[e.source for e in seen]}"
                resp = await me.sync(timeout=500)
                assert isinstance(resp, nio.SyncResponse), resp
                joined = resp.rooms.join.get(room)
                seen += joined.timeline.events if joined else []
            notices = [e for e in seen if isinstance(e, nio.RoomMessageNotice) and NOTICE in e.body]
            assert len(notices) == 1, [e.source for e in seen]
            assert other.user_id in notices[0].body and "refused" in notices[0].body
            arrival = next(i for i, e in enumerate(seen) if isinstance(e, nio.RoomMemberEvent)
                           and e.state_key == other.user_id and e.membership == "join")
            assert seen[arrival + 1] is notices[0], "the notice is not right after the join"
            assert notices[0].source["event_id"] not in json.dumps(
                [e.get("event_id") for e in _history(inside, carol, room)]), "the notice is on the homeserver"
            return me.user_id, other.user_id, room
        finally:
            for client in (me, other, carol):
                await client.close()
    me, other, room = asyncio.run(scenario())
    arrival = wait_wall_event(gw, inside.since, "wall_join", other)
    assert arrival["imguard"]["context"]["recipients"] == [me]
    assert arrival["imguard"]["membership"]["room"] == room


def _history(route, client, room: str) -> list[dict]:
    from tests.test_e2e_matrix import server_history
    return server_history(route.synapse, client.access_token, room)


# --- the carrier alone -------------------------------------------------------------------------------------------

class _Log:
    def __init__(self):
        self.events: list[dict] = []

    def write(self, event):
        self.events.append(event)

    def write_message(self, text, ctx, decision):
        pass


def _carrier(tmp_path, walls: bool):
    if walls:
        (tmp_path / "groups.yaml").write_text(groups_yaml(["@wra-*"], ["@wtb-*"]))
        (tmp_path / "50-walls.yaml").write_text(WALL_FILE)
    log = _Log()
    carrier = ChatApiCarrier(Pipeline(inspector=None, policy=load_policy(tmp_path), alert_log=log),
                             settings=ChatApiSettings(), record=log.write)
    carrier.learn_identity(matrix.bearer(HttpRequest.make("GET", "/", {"Authorization": "Bearer t"})), "@wra-me:hs")
    return carrier, log


def _sync(carrier, body: dict) -> dict:
    req = HttpRequest.make("GET", "https://hs/_matrix/client/v3/sync", {"Authorization": "Bearer t"})
    call, _ = carrier.request_headers(req, ChatContext())
    carrier.response_headers(call, 200, {})
    raw = json.dumps(body).encode()
    with pytest.raises(StopIteration) as done:
        next(carrier.response_body(call, 200, {}, raw))
    out = done.value.value
    return json.loads(out.body) if isinstance(out, Rewrite) else body


def _invite(inviter: str, *joined: str) -> dict:
    member = {"type": "m.room.member"}
    return {"invite_state": {"events": [dict(member, sender=inviter, state_key="@wra-me:hs",
                                             content={"membership": "invite"})]
                             + [dict(member, sender=m, state_key=m, content={"membership": "join"}) for m in joined]}}


def test_carrier_takes_out_invites_whose_room_shows_the_other_side(tmp_path):
    """An invite from a colleague whose invite_state shows a trader in the room goes, as does one from a trader; an
    invite from carol alone stays. Each taken out is a `wall_invite` event naming the one across the wall."""
    carrier, log = _carrier(tmp_path, walls=True)
    shown = _sync(carrier, {"rooms": {"invite": {"!a:hs": _invite("@wra-colleague:hs", "@wtb-x:hs"),
                                                 "!b:hs": _invite("@wtb-y:hs"),
                                                 "!c:hs": _invite("@wcn-carol:hs", "@wra-colleague:hs")}}})
    assert list(shown["rooms"]["invite"]) == ["!c:hs"]
    invites = [e for e in log.events if e["event"]["action"] == "wall_invite"]
    assert [(e["imguard"]["membership"]["room"], e["imguard"]["context"]["sender"]) for e in invites] == \
        [("!a:hs", "@wtb-x:hs"), ("!b:hs", "@wtb-y:hs")]


def test_carrier_tells_the_arrival_after_the_join_and_learns_nothing_without_a_wall(tmp_path):
    """A trader's join in a room our user is in: imguard's notice right after it, in the same /sync. With no wall
    in force the /sync passes untouched and no member is learned (nothing reads it a second time)."""
    member = {"type": "m.room.member", "content": {"membership": "join"}}
    first = {"rooms": {"join": {"!r:hs": {"state": {"events": [dict(member, state_key="@wra-me:hs")]}}}}}
    then = {"rooms": {"join": {"!r:hs": {"timeline": {"events": [
        dict(member, state_key="@wtb-x:hs", sender="@wtb-x:hs", origin_server_ts=7),
        {"type": "m.room.message", "sender": "@wcn-carol:hs", "content": {"msgtype": "m.text", "body": "hi"}}]}}}}}
    (tmp_path / "walled").mkdir()
    carrier, log = _carrier(tmp_path / "walled", walls=True)
    _sync(carrier, first)
    events = _sync(carrier, then)["rooms"]["join"]["!r:hs"]["timeline"]["events"]
    assert [e.get("state_key") or e["content"].get("body", "")[:7] for e in events] == ["@wtb-x:hs", "imguard", "hi"]
    notice = events[1]
    assert notice["content"]["msgtype"] == "m.notice" and notice["sender"] == "@imguard:hs"
    assert "@wtb-x:hs joined this room" in notice["content"]["body"] and notice["origin_server_ts"] == 7
    assert [e["event"]["action"] for e in log.events if e["event"]["action"].startswith("wall_")] == ["wall_join"]
    (tmp_path / "open").mkdir()
    carrier, log = _carrier(tmp_path / "open", walls=False)
    _sync(carrier, first)
    assert _sync(carrier, then) == then
    assert "!r:hs" not in carrier.rooms and not log.events


def test_carrier_tells_each_user_once_and_not_a_rename(tmp_path):
    """Two users behind the gateway in one room: a trader's join is told in each one's /sync (a `wall_join` event
    for each), though the member table knew the trader from the first; the trader's later rename (a join over a
    join) is not an arrival."""
    carrier, log = _carrier(tmp_path, walls=True)
    carrier.learn_identity(matrix.bearer(HttpRequest.make("GET", "/", {"Authorization": "Bearer t2"})), "@wra-two:hs")
    member = {"type": "m.room.member", "content": {"membership": "join"}}
    both = [dict(member, state_key="@wra-me:hs"), dict(member, state_key="@wra-two:hs")]
    joins = {"rooms": {"join": {"!r:hs": {"timeline": {"events": [dict(member, state_key="@wtb-x:hs")]}}}}}
    rename = {"rooms": {"join": {"!r:hs": {"timeline": {"events": [
        dict(member, state_key="@wtb-x:hs", unsigned={"prev_content": {"membership": "join"}},
             content={"membership": "join", "displayname": "X"})]}}}}}

    def sync(token: str, body: dict) -> list[dict]:
        req = HttpRequest.make("GET", "https://hs/_matrix/client/v3/sync", {"Authorization": f"Bearer {token}"})
        call, _ = carrier.request_headers(req, ChatContext())
        carrier.response_headers(call, 200, {})
        with pytest.raises(StopIteration) as done:
            next(carrier.response_body(call, 200, {}, json.dumps(body).encode()))
        out = done.value.value
        shown = json.loads(out.body) if isinstance(out, Rewrite) else body
        return shown["rooms"]["join"]["!r:hs"].get("timeline", {}).get("events", [])
    for token in ("t", "t2"):
        sync(token, {"rooms": {"join": {"!r:hs": {"state": {"events": both}}}}})
    for token in ("t", "t2"):
        assert [e["type"] for e in sync(token, joins)] == ["m.room.member", "m.room.message"], token
        assert [e["type"] for e in sync(token, rename)] == ["m.room.member"], token
    joined = [e for e in log.events if e["event"]["action"] == "wall_join"]
    assert [e["imguard"]["context"]["recipients"] for e in joined] == [["@wra-me:hs"], ["@wra-two:hs"]]
