"""Ethical walls in Matrix rooms, end to end with real parts: matrix-nio clients, a real Synapse, the real `imguard run`
in front of it (tests/test_e2e_matrix.py's fixtures), with the wall of tests/test_ethical_walls.py between research
(@wra-*) and trading (@wtb-*). One party of the wall is behind the gateway, the other goes straight to Synapse; each
case runs with research inside and with trading inside. carol (@wcn-*, in neither group) is the neutral member who
makes rooms and carries the sentinels. What reached the homeserver is asked of Synapse itself, on its own port.

    a) invitations: our user's invite of the other side is refused (403 M_FORBIDDEN, `wall_invite`), and the other
       side never gets it; the other side's invite of our user is taken out of its /sync
       (test_walls_matrix_inbound.py), a join by room id is refused (403, `wall_join`): Synapse never has our user in
       the room;
    b) the other side in a room our user is in (they come in after the user): `wall_join` at the user's next /sync;
       the user's messages to the room are refused (403, `wall_message`) and never reach Synapse, the other side's
       messages show in the user's /sync as imguard's notice (`wall_message`); once the other side leaves, the
       user's messages reach the room again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import nio
import pytest

from imguard.chatapi import ChatApiCarrier
from imguard.policy.walls import Rooms, learn_members
from imguard.protocols.httpchat import matrix
from tests.peers.http_gateway import HttpGateway
from tests.test_e2e_matrix import Route, body_is, bodies, check_gateway, server_history, synapse  # noqa: F401
from tests.test_ethical_walls import WALL_FILE, WALL_ID, _ids, groups_yaml

pytestmark = pytest.mark.timeout(240)
BASES = {"research": "wra", "trading": "wtb"}


@pytest.fixture(scope="module")
def matrix_wall(tmp_path_factory, synapse):         # noqa: F811 (the imported fixture)
    rules = {"groups.yaml": groups_yaml(["@wra-*"], ["@wtb-*"]), "50-walls.yaml": WALL_FILE}
    gw = HttpGateway.start(tmp_path_factory.mktemp("matrix-wall-gw"), [f"http://127.0.0.1:{synapse.port}"],
                           extra_rules=rules)
    try:
        yield gw
    finally:
        status = gw.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


@pytest.fixture
def sides(synapse, matrix_wall):                    # noqa: F811
    offset = matrix_wall.log_size()
    yield Route("imguard", synapse, matrix_wall), Route("outside", synapse, None)
    check_gateway(matrix_wall, offset)


def wall_events(gw, since: int, action: str) -> list[dict]:
    return [e for e in gw.alerts()[since:] if e["event"].get("action") == action
            and WALL_ID in _ids(e.get("rule", {}).get("id"))]


def wait_wall_event(gw, since: int, action: str, sender: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in wall_events(gw, since, action) if e["imguard"]["context"]["sender"] == sender]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {action} event from {sender}: {wall_events(gw, since, action)}\n{gw.logs()}")


def joined_members(server, client, room: str) -> set[str]:
    """The room's joined members as Synapse itself has them (asked on its own port)."""
    import urllib.parse
    import urllib.request
    url = f"{server.url}/_matrix/client/v3/rooms/{urllib.parse.quote(room)}/joined_members"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {client.access_token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return set(json.loads(r.read())["joined"])


async def synced(client) -> nio.SyncResponse:
    resp = await client.sync(timeout=0)
    assert isinstance(resp, nio.SyncResponse), resp
    return resp


async def timeline_until(client, room: str, predicate, timeout: float = 20.0) -> list[dict]:
    """The raw timeline events `client` gets for `room` from its syncs, until one satisfies `predicate`."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.sync(timeout=500)
        assert isinstance(resp, nio.SyncResponse), resp
        joined = resp.rooms.join.get(room)
        seen += [event.source for event in (joined.timeline.events if joined else [])]
        if any(predicate(e) for e in seen):
            return seen
    raise AssertionError(f"{client.user_id} never saw the awaited event; saw {seen}")


async def send(client, room: str, text: str):
    return await client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": text})


@pytest.mark.parametrize("inside_side", ["research", "trading"])
def test_matrix_invitations_across_the_wall_are_refused_both_ways(sides, inside_side):
    """Our user invites the other side: 403, a `wall_invite` event, and the other side's own /sync (straight from
    Synapse) never has the invite; inviting carol works. The other side invites our user (the invite is taken out
    of the user's /sync): the user's join (POST /join/{room}) is refused with 403 and a `wall_join` event; Synapse
    never has the user joined."""
    inside, outside = sides
    gw = inside.gateway
    other_side = "trading" if inside_side == "research" else "research"

    async def scenario():
        me = await inside.client(BASES[inside_side])
        other = await outside.client(BASES[other_side])
        carol = await outside.client("wcn")
        try:
            made = await me.room_create()
            assert isinstance(made, nio.RoomCreateResponse), made
            await synced(me)
            refused = await me.room_invite(made.room_id, other.user_id)
            assert isinstance(refused, nio.RoomInviteError) and refused.status_code == "M_FORBIDDEN", refused
            assert "information barrier" in refused.message, refused.message
            fine = await me.room_invite(made.room_id, carol.user_id)
            assert isinstance(fine, nio.RoomInviteResponse), fine
            invites = (await synced(other)).rooms.invite
            assert made.room_id not in invites, "the refused invite reached the other side"
            assert made.room_id in (await synced(carol)).rooms.invite, "control: carol's invite did not arrive"

            theirs = await other.room_create(invite=[me.user_id])
            assert isinstance(theirs, nio.RoomCreateResponse), theirs
            # imguard takes the invite out of the user's /sync (tests/test_walls_matrix_inbound.py): carol's
            # invite after it is the sentinel, then the user joins by room id
            sentinel = await carol.room_create(invite=[me.user_id])
            deadline = time.monotonic() + 10
            while sentinel.room_id not in (await synced(me)).rooms.invite:
                assert time.monotonic() < deadline, "carol's invite never reached our user"
            joined = await me.join(theirs.room_id)
            assert isinstance(joined, nio.JoinError) and joined.status_code == "M_FORBIDDEN", joined
            assert me.user_id not in joined_members(inside.synapse, other, theirs.room_id)
            return me.user_id, other.user_id, made.room_id, theirs.room_id
        finally:
            for client in (me, other, carol):
                await client.close()
    me, other, mine, theirs = asyncio.run(scenario())
    invite = wait_wall_event(gw, inside.since, "wall_invite", me)
    assert invite["imguard"]["membership"] == {"kind": "invite", "room": mine, "action": "block"}
    assert invite["imguard"]["context"]["recipients"] == [other]
    assert invite["imguard"]["context"]["direction"] == "outbound"
    join = wait_wall_event(gw, inside.since, "wall_join", me)
    assert join["imguard"]["membership"] == {"kind": "join", "room": theirs, "action": "block"}
    assert other in join["imguard"]["context"]["recipients"]
    assert [e["imguard"]["context"]["direction"] for e in wall_events(gw, inside.since, "wall_invite")
            if e["imguard"]["context"]["sender"] == me] == ["outbound"]


@pytest.mark.parametrize("inside_side", ["research", "trading"])
def test_matrix_room_with_the_other_side_carries_nothing_across_both_ways(sides, inside_side):
    """carol makes a room with our user in it; the other side joins later, straight to Synapse. At the user's next
    /sync a `wall_join` event names the arrival. The user's message to the room is refused (403, `wall_message`) and
    Synapse never has it; the other side's message shows in the user's /sync as imguard's notice, while carol's
    sentinel after it arrives as sent. After the other side leaves, the user's message reaches the room."""
    inside, outside = sides
    gw = inside.gateway
    other_side = "trading" if inside_side == "research" else "research"

    async def scenario():
        me = await inside.client(BASES[inside_side])
        other = await outside.client(BASES[other_side])
        carol = await outside.client("wcn")
        try:
            made = await carol.room_create(invite=[me.user_id, other.user_id])
            assert isinstance(made, nio.RoomCreateResponse), made
            room = made.room_id
            assert isinstance(await me.join(room), nio.JoinResponse), "our user could not join carol's room"
            await timeline_until(me, room, lambda e: e.get("type") == "m.room.member")
            hello = f"before the other side came {uuid.uuid4().hex[:6]}"
            assert isinstance(await send(me, room, hello), nio.RoomSendResponse)
            assert isinstance(await other.join(room), nio.JoinResponse)
            await timeline_until(me, room, lambda e: e.get("type") == "m.room.member"
                                 and e.get("state_key") == other.user_id)
            mine = f"from inside across the wall {uuid.uuid4().hex[:6]}"
            refused = await send(me, room, mine)
            assert isinstance(refused, nio.RoomSendError) and refused.status_code == "M_FORBIDDEN", refused
            assert "information barrier" in refused.message, refused.message
            theirs = f"from outside across the wall {uuid.uuid4().hex[:6]}"
            sentinel = f"carol's sentinel {uuid.uuid4().hex[:6]}"
            for sender, text in ((other, theirs), (carol, sentinel)):
                assert isinstance(await send(sender, room, text), nio.RoomSendResponse)
            seen = await timeline_until(me, room, body_is(sentinel))
            assert theirs not in json.dumps(seen), "the walled room message reached our user"
            notices = [e["content"]["body"] for e in seen if e.get("type") == "m.room.message"
                       and e["content"]["body"].startswith(f"A message from {other.user_id} was blocked")]
            assert len(notices) == 1, seen
            history = bodies(server_history(inside.synapse, carol.access_token, room))
            assert hello in history and theirs in history and mine not in history, history
            assert isinstance(await other.room_leave(room), nio.RoomLeaveResponse)
            await timeline_until(me, room, lambda e: e.get("type") == "m.room.member"
                                 and e.get("state_key") == other.user_id
                                 and e.get("content", {}).get("membership") == "leave")
            free = f"the room is open again {uuid.uuid4().hex[:6]}"
            assert isinstance(await send(me, room, free), nio.RoomSendResponse)
            assert free in bodies(server_history(inside.synapse, carol.access_token, room))
            return me.user_id, other.user_id, room
        finally:
            for client in (me, other, carol):
                await client.close()
    me, other, room = asyncio.run(scenario())
    arrival = wait_wall_event(gw, inside.since, "wall_join", other)
    assert arrival["imguard"]["context"]["direction"] == "inbound"
    assert arrival["imguard"]["context"]["recipients"] == [me]
    out = wait_wall_event(gw, inside.since, "wall_message", me)
    assert out["imguard"]["membership"] == {"kind": "message", "room": room, "action": "block"}
    assert out["imguard"]["context"]["direction"] == "outbound" and other in out["imguard"]["context"]["recipients"]
    incoming = wait_wall_event(gw, inside.since, "wall_message", other)
    assert incoming["imguard"]["context"]["direction"] == "inbound"
    assert len(wall_events(gw, inside.since, "wall_message")) == 2, wall_events(gw, inside.since, "wall_message")


# --- the decoder and the member table alone -----------------------------------------------------------------------

def test_membership_calls_and_sync_members_are_read():
    assert matrix.membership_call("POST", "/_matrix/client/v3/join/%23desk%3Ahs") == ("join", "#desk:hs")
    assert matrix.membership_call("POST", "/_matrix/client/r0/rooms/!r%3Ahs/join") == ("join", "!r:hs")
    assert matrix.membership_call("POST", "/_matrix/client/v3/rooms/!r:hs/invite") == ("invite", "!r:hs")
    assert matrix.membership_call("GET", "/_matrix/client/v3/rooms/!r:hs/join") is None
    assert matrix.membership_call("POST", "/_matrix/client/v3/rooms/!r:hs/leave") is None
    member = {"type": "m.room.member"}
    sync = {"rooms": {
        "join": {"!a:hs": {"state": {"events": [dict(member, state_key="@me:hs", content={"membership": "join"})]},
                           "timeline": {"events": [dict(member, state_key="@x:hs", content={"membership": "join"}),
                                                   {"type": "m.room.message", "content": {"body": "hi"}},
                                                   dict(member, state_key="@x:hs", content={"membership": "leave"})]}}},
        "invite": {"!b:hs": {"invite_state": {"events": [dict(member, state_key="@me:hs", sender="@y:hs",
                                                              content={"membership": "invite"})]}}},
        "leave": {"!c:hs": "not a mapping"}}}
    facts = matrix.room_members(json.dumps(sync).encode())
    assert facts == [("!a:hs", "@me:hs", "join"), ("!a:hs", "@x:hs", "join"), ("!a:hs", "@x:hs", "leave"),
                     ("!b:hs", "@y:hs", "join")]
    assert matrix.room_members(b"not json") == [] and matrix.room_members(b"[1]") == []
    rooms = Rooms(limit=3)
    learned = learn_members(rooms, facts, "@me:hs")
    assert learned.entered == ["!a:hs"] and learned.arrived == [] and learned.kept
    assert rooms.identities("!a:hs") == ("@me:hs",) and rooms.identities("!b:hs") == ("@y:hs",)
    learned = learn_members(rooms, [("!a:hs", "@z:hs", "join"), ("!a:hs", "@w:hs", "join")], "@me:hs")
    assert learned.arrived == [("!a:hs", "@z:hs"), ("!a:hs", "@w:hs")] and not learned.kept
    assert "@w:hs" not in rooms.identities("!a:hs"), "a member past the limit of 3 was recorded"


def test_carrier_without_membership_checks_lets_joins_through():
    """A carrier whose pipeline cannot decide memberships (a test stand-in) relays joins and invites undecided."""
    class Stand:
        def record(self, event):
            pass
    carrier = ChatApiCarrier(Stand())
    assert carrier._walls_check("join", None, "!r:hs") is None


def test_carrier_keeps_a_megolm_message_from_a_walled_room(tmp_path):
    """Through the carrier alone (gateway and replay alike), with the real policy: a /sync shows the other side in
    the room; the user's encrypted (Megolm) room event is refused like a clear one (403, a `wall_message` event),
    and once the other side has left it goes on."""
    from imguard.chatapi import ChatApiSettings, Respond
    from imguard.model import ChatContext
    from imguard.pipeline import Pipeline
    from imguard.policy import load_policy
    from imguard.protocols.httpchat import HttpRequest
    (tmp_path / "groups.yaml").write_text(groups_yaml(["@wra-*"], ["@wtb-*"]))
    (tmp_path / "50-walls.yaml").write_text(WALL_FILE)
    recorded: list[dict] = []

    class Log:
        def write(self, event):
            recorded.append(event)

        def write_message(self, text, ctx, decision):
            pass
    pipeline = Pipeline(inspector=None, policy=load_policy(tmp_path), alert_log=Log())
    carrier = ChatApiCarrier(pipeline, settings=ChatApiSettings(), record=recorded.append)
    auth = {"Authorization": "Bearer metoken"}
    carrier.learn_identity(matrix.bearer(HttpRequest.make("GET", "/", auth)), "@wra-me:hs")

    def sync(membership: str) -> None:
        member = {"type": "m.room.member", "content": {"membership": membership}}
        body = json.dumps({"rooms": {"join": {"!r:hs": {"timeline": {"events": [
            dict(member, state_key="@wra-me:hs", content={"membership": "join"}),
            dict(member, state_key="@wtb-x:hs")]}}}}}).encode()
        call, _ = carrier.request_headers(HttpRequest.make("GET", "https://hs/_matrix/client/v3/sync", auth),
                                          ChatContext())
        carrier.response_headers(call, 200, {})
        with pytest.raises(StopIteration):
            next(carrier.response_body(call, 200, {}, body))

    def send() -> object:
        req = HttpRequest.make("PUT", "https://hs/_matrix/client/v3/rooms/!r:hs/send/m.room.encrypted/t1", auth,
                               json.dumps({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA"}).encode())
        call, _ = carrier.request_headers(req, ChatContext())
        with pytest.raises(StopIteration) as done:
            next(carrier.request_body(call, req))
        return done.value.value
    sync("join")
    refused = send()
    assert isinstance(refused, Respond) and refused.status == 403, refused
    assert [e["event"]["action"] for e in recorded if e["event"]["action"].startswith("wall_")] == \
        ["wall_join", "wall_message"]
    sync("leave")
    assert send() is None
