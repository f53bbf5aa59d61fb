"""Ethical walls (imguard/policy/walls.py): `- wall: {between: [research, trading], action: block}` keeps the two
groups apart, both ways round, whoever is behind the gateway.

End to end with real parts: a real `imguard run` in front of a real Prosody (slixmpp clients) and of a real ngIRCd
(the `irc` library), its rules folder given the groups and the wall by a hot reload (SIGHUP). In every case one
party is behind the gateway and the other is not, and each case runs A -> B and B -> A with either of them inside.
After each walled item a sentinel travels a path the wall does not cross and is waited for. A third person
(carol, in neither group) talks to both, so the wall is no wider than the two groups. Loading and its file:line
errors are tested on the policy alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from imguard.model import ChatContext
from imguard.policy import PolicyError, load_policy
from tests.peers.folders import kept_if_failed
from tests.peers.gateway import BUNDLED_RULES, Gateway
from tests.xmpp_clients import STARTTLS, Client, Endpoint, error_condition, error_text

pytestmark = pytest.mark.timeout(180)

WALL_ID = "wall-research-trading"
WALL_FILE = f"""\
# An information barrier between research and trading (test_ethical_walls.py).
rules:
  - wall:
      id: {WALL_ID}
      between: [research, trading]
      action: block
"""
IBB_PAYLOAD = b"research note: price target, do not share\n" * 40


def groups_yaml(research: list[str], trading: list[str]) -> str:
    """The bundled groups.yaml with the two groups added."""
    text = (BUNDLED_RULES / "groups.yaml").read_text()
    assert "\ngroups:\n" in text
    members = "".join(f"  {name}:\n" + "".join(f"    - \"{m}\"\n" for m in people)
                      for name, people in (("research", research), ("trading", trading)))
    return text.replace("\ngroups:\n", "\ngroups:\n" + members, 1)


def install_wall(gateway, research: list[str], trading: list[str]) -> None:
    """Write the groups and the wall into the gateway's rules folder and reload it (SIGHUP); wait until the
    reload is reported good and names the new policy."""
    rules = Path(gateway.directory) / "rules"
    since = gateway.mark()
    (rules / "groups.yaml").write_text(groups_yaml(research, trading))
    (rules / "50-walls.yaml").write_text(WALL_FILE)
    os.kill(gateway.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 120           # a reload compiles the signatures again: slow on a busy machine
    while time.monotonic() < deadline:
        for event in gateway.alerts()[since:]:
            if event["event"].get("action") == "policy_reload":
                assert event["event"]["outcome"] == "success", event["imguard"]["policy"]
                return
        time.sleep(0.1)
    raise AssertionError(f"no policy_reload event after SIGHUP\n{gateway.logs()}")


def wall_events(gateway, since: int, dataset: str) -> list[dict]:
    return [e for e in gateway.alerts()[since:]
            if e["event"]["dataset"] == dataset and WALL_ID in _ids(e.get("rule", {}).get("id"))]


def _ids(value) -> list:
    return value if isinstance(value, list) else [value] if value else []


def bare(identity: str) -> str:
    return identity.split("/")[0]


# --- the policy alone ----------------------------------------------------------------------------------------

def write_rules(folder: Path, walls: str) -> Path:
    (folder / "groups.yaml").write_text("groups:\n  research: [alice@corp.example, 'ra_*']\n"
                                        "  trading: [bob@corp.example]\n  legal: [lee@corp.example]\n")
    (folder / "50-walls.yaml").write_text(walls)
    return folder


@pytest.mark.parametrize("sender, recipient, walled", [
    ("alice@corp.example/laptop", "bob@corp.example", True),
    ("bob@corp.example", "alice@corp.example/phone", True),
    ("ra_1!~ra@10.0.0.5", "bob@corp.example", True),
    ("alice@corp.example", "lee@corp.example", False),
    ("lee@corp.example", "bob@corp.example", False),
    ("alice@corp.example", "alice@corp.example", False),
])
def test_a_wall_decides_messages_files_and_invitations_both_ways(tmp_path, sender, recipient, walled):
    """One wall is four rules (messages and files, each way round) plus the membership check: a member of one group
    to a member of the other is blocked, naming the wall; anyone else passes."""
    from imguard.model import FileReport
    policy = load_policy(write_rules(tmp_path, WALL_FILE))
    ctx = ChatContext(protocol="xmpp", sender=sender, recipients=(recipient,))
    decisions = [policy.decide_message("hello", ctx),
                 policy.decide_file(FileReport(name="a.txt", path="a.txt", size=3), ctx),
                 policy.decide_membership(ctx)]
    for decision in decisions:
        assert decision.action == ("block" if walled else "allow"), decision
        assert decision.rule_ids == ([WALL_ID] if walled else []), decision
        if walled:
            assert "information barrier" in decision.notice and bare(sender) in decision.notice


def test_a_wall_in_shadow_mode_or_alerting_only_lets_through(tmp_path):
    walls = ("rules:\n  - wall: {between: [research, trading], action: alert}\n"
             "  - wall: {id: shadow-wall, between: [research, legal], mode: shadow}\n")
    policy = load_policy(write_rules(tmp_path, walls))
    alert = policy.decide_message("hi", ChatContext(sender="alice@corp.example", recipients=("bob@corp.example",)))
    assert alert.action == "alert" and alert.rule_ids == [WALL_ID]
    shadow = policy.decide_message("hi", ChatContext(sender="lee@corp.example", recipients=("alice@corp.example",)))
    assert shadow.action == "allow" and [m.rule_id for m in shadow.shadow] == ["shadow-wall"]


def test_wall_errors_name_file_and_line(tmp_path):
    """Every problem of a wall is reported with its file:line, all at once; nothing is loaded."""
    walls = ("rules:\n"
             "  - wall: {between: [research, nobody], action: mask, extra: 1}\n"
             "  - wall: {between: [research, research]}\n"
             "  - wall: [research, trading]\n"
             "  - wall:\n      between: [research]\n"
             "  - wall: {between: [research, trading]}\n    id: beside\n"
             "  - wall: {between: [research, trading], notify: 'see {nobody}'}\n"
             "  - id: wall-research-trading\n    title: t\n    severity: low\n    action: alert\n"
             "    applies_to: message\n    match: {keywords: [x]}\n"
             "  - wall: {between: [research, trading]}\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(write_rules(tmp_path, walls))
    errors = raised.value.errors
    expected = [("50-walls.yaml:2:", "unknown key 'extra'"), ("50-walls.yaml:2:", "unknown group 'nobody'"),
                ("50-walls.yaml:2:", "'mask') is not one of: block, quarantine, alert"),
                ("50-walls.yaml:3:", "not 'research' and itself"),
                ("50-walls.yaml:4:", "got a list"), ("50-walls.yaml:6:", "a list of two group names"),
                ("50-walls.yaml:8:", "unknown key 'id' beside 'wall'"),
                ("50-walls.yaml:9:", "unknown placeholder {nobody}"),
                ("50-walls.yaml:16:", "duplicate rule id 'wall-research-trading' (first defined at "
                                      "50-walls.yaml:10)")]
    for where, what in expected:
        assert any(e.startswith(where) and what in e for e in errors), (where, what, errors)
    assert len(errors) == len(expected), errors


# --- XMPP: Prosody and slixmpp -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def walls_dir(request):
    """This module's folder for its peers' files and logs: removed when its tests passed (unless
    IMGUARD_E2E_KEEP=1), kept for reading otherwise."""
    with kept_if_failed(request, "imguard-walls-") as directory:
        yield directory


@pytest.fixture(scope="module")
def xmpp_wall(prosody, walls_dir):
    """A gateway of its own in front of the shared Prosody, with research = alice, trading = bob."""
    gw = Gateway.start(walls_dir / "xmpp", prosody)
    try:
        install_wall(gw, [prosody.jid("alice")], [prosody.jid("bob")])
        yield gw
    finally:
        gw.stop()


class Sides:
    """Who logs in through the gateway (inside) and who straight to Prosody (outside)."""

    def __init__(self, prosody, gateway: Gateway, inside: str):
        self.prosody, self.gateway, self.inside = prosody, gateway, inside
        self.outside_endpoint = Endpoint("127.0.0.1", prosody.c2s_port, STARTTLS, ca_file=prosody.ca_file)

    def client(self, user: str):
        endpoint = self.gateway.endpoint(STARTTLS) if user == self.inside else self.outside_endpoint
        return Client.connected(endpoint, f"{self.prosody.jid(user)}/walls-{uuid.uuid4().hex[:6]}",
                                self.prosody.password(user))


async def sentinel_via(sender: Client, via: Client, receiver: Client) -> None:
    """sender -> via, then via -> receiver, each waited for: what sender sent receiver before has arrived by then
    (Prosody routes one session's stanzas in order, and the receiver's stream is ordered)."""
    first, second = f"sentinel-1 {uuid.uuid4().hex[:6]}", f"sentinel-2 {uuid.uuid4().hex[:6]}"
    sender.send_chat(via.jid, first)
    assert await via.wait_message(first), f"the sentinel {first!r} did not reach {via.jid}"
    via.send_chat(receiver.jid, second)
    assert await receiver.wait_message(second), f"the sentinel {second!r} did not reach {receiver.jid}"


@pytest.mark.parametrize("inside", ["alice", "bob"])
@pytest.mark.parametrize("sender_name, receiver_name", [("alice", "bob"), ("bob", "alice")])
def test_xmpp_wall_blocks_messages_and_files_both_ways(prosody, xmpp_wall, inside, sender_name, receiver_name):
    """research (alice) and trading (bob), one of them behind the gateway: a chat message and an IBB file from
    either to the other never arrive (the sentinel after them does); the inside party is told; each attempt is an
    alert naming the wall, its parties and its direction. carol (neither group) reaches both."""
    gw = xmpp_wall
    gw.check_alive()
    since = gw.mark()
    sides = Sides(prosody, gw, inside)

    async def scenario():
        async with sides.client("alice") as alice, sides.client("bob") as bob, sides.client("carol") as carol:
            people = {"alice": alice, "bob": bob}
            sender, receiver = people[sender_name], people[receiver_name]
            body = f"the quarterly estimate before it is published {uuid.uuid4().hex[:6]}"
            sent_id = sender.send_chat(receiver.jid, body)
            name = f"note-{uuid.uuid4().hex[:6]}.txt"
            await sender.ibb_send(receiver.jid, IBB_PAYLOAD, name=name)
            await sentinel_via(sender, carol, receiver)
            assert body not in receiver.bodies(), f"the walled message reached {receiver_name}: {receiver.bodies()}"
            got = b"".join(bytes(v) for v in receiver.received.ibb.values())
            assert IBB_PAYLOAD not in got, f"the walled file reached {receiver_name} ({len(got)} bytes)"
            if sender_name == inside:
                error = await sender.wait_message(id=sent_id, type="error")
                assert error is not None and error_condition(error) == "policy-violation", error
                told = await sender.wait_for(lambda r: [m for m in r.messages
                                                        if name in (m["body"] or "") + error_text(m)], timeout=5)
                assert told, f"{sender_name} was not told of the file: {sender.bodies()}"
            else:
                for what in ("blocked", name):
                    notice = await receiver.wait_for(lambda r, what=what: [
                        m for m in r.messages if what in (m["body"] or "")
                        and prosody.jid(sender_name) in (m["body"] or "")], timeout=5)
                    assert notice, f"{receiver_name} was not told ({what}): {receiver.bodies()}"
            # carol, in neither group, reaches both, and both reach her.
            for person in (alice, bob):
                hello = f"hello from carol {uuid.uuid4().hex[:6]}"
                carol.send_chat(person.jid, hello)
                assert await person.wait_message(hello), f"carol's message did not reach {person.jid}"
    asyncio.run(scenario())
    direction = "outbound" if sender_name == inside else "inbound"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (wall_events(gw, since, "imguard.message")
                                               and wall_events(gw, since, "imguard.file")):
        time.sleep(0.1)
    for dataset in ("imguard.message", "imguard.file"):
        events = wall_events(gw, since, dataset)
        assert len(events) == 1, f"{len(events)} {dataset} events naming the wall: {events}\n{gw.logs()}"
        event = events[0]
        assert event["event"]["action"] == "block" and event["event"]["kind"] == "alert"
        context = event["imguard"]["context"]
        assert bare(context["sender"]) == prosody.jid(sender_name)
        assert [bare(r) for r in context["recipients"]] == [prosody.jid(receiver_name)]
        assert context["direction"] == direction, context

    def from_carol() -> list[dict]:       # what carol sent the inside party (the other one's is not seen)
        return [e for e in gw.alerts()[since:] if e["event"]["dataset"] == "imguard.message"
                and "hello from carol" in e["imguard"].get("message", {}).get("text", "")]
    deadline = time.monotonic() + 10        # an allowed message's event is written behind it, not fsync'ed
    while time.monotonic() < deadline and not from_carol():
        time.sleep(0.1)
    allowed = from_carol()
    assert len(allowed) == 1 and allowed[0]["event"]["action"] == "allow" \
        and "id" not in allowed[0].get("rule", {}), allowed


# --- IRC: ngIRCd and the `irc` library -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def irc_wall(walls_dir):
    """A real ngIRCd and a gateway in front of it, with research = nicks wra_*, trading = nicks wtb_*."""
    from tests.peers.ngircd import IrcGateway, NgIrcd
    ircd = NgIrcd.start(walls_dir / "ngircd")
    try:
        gw = IrcGateway.start(walls_dir / "irc", ircd)
        try:
            install_wall(gw, ["wra_*"], ["wtb_*"])
            yield ircd, gw
        finally:
            gw.stop()
    finally:
        ircd.stop()


def irc_sentinel_via(chat, sender, via, receiver) -> None:
    """sender -> via, then via -> receiver, by PRIVMSG, each waited for: what sender sent receiver before has arrived
    by then (one ngIRCd handles the lines in the order it reads them). Not through a channel they share: a wall
    refuses a channel message between its two sides."""
    first, second = f"sentinel-1 {uuid.uuid4().hex[:6]}", f"sentinel-2 {uuid.uuid4().hex[:6]}"
    sender.conn.privmsg(via.nick, first)
    assert chat.pump(lambda: first in [m for _, m in via.private], 15), f"{first!r} did not reach {via.nick}"
    via.conn.privmsg(receiver.nick, second)
    assert chat.pump(lambda: second in [m for _, m in receiver.private], 15), (
        f"{second!r} did not reach {receiver.nick}")


@pytest.mark.parametrize("inside", ["research", "trading"])
@pytest.mark.parametrize("way", ["research->trading", "trading->research"])
def test_irc_wall_blocks_messages_and_files_both_ways(irc_wall, inside, way):
    """research (wra_*) and trading (wtb_*), one behind the gateway: a PRIVMSG and a DCC SEND from either to the
    other never arrive (the channel sentinel after them does); the inside party gets imguard's NOTICE; each
    attempt is an alert naming the wall. carol (wcn_*, neither group) reaches both by PRIVMSG."""
    from tests.test_e2e_irc import Chat, Route
    ircd, gw = irc_wall
    gw.check_alive()
    route = Route("imguard", False, ircd, gw)
    bases = {"research": "wra", "trading": "wtb"}
    with Chat(route) as chat:
        people = {side: chat.person(bases[side], join=False, outside=side != inside) for side in bases}
        carol = chat.person("wcn", join=False, outside=True)
        sender_side, receiver_side = way.split("->")
        sender, receiver = people[sender_side], people[receiver_side]
        text = f"the estimate before it is published {uuid.uuid4().hex[:6]}"
        sender.conn.privmsg(receiver.nick, text)
        name = f"note-{uuid.uuid4().hex[:6]}.txt"
        t = chat.offer_file(sender, receiver, name, IBB_PAYLOAD)
        assert chat.pump(lambda: t.done or t.offer is None and not receiver.offers, 20)
        irc_sentinel_via(chat, sender, carol, receiver)
        assert text not in [m for _, m in receiver.private], f"the walled PRIVMSG arrived: {receiver.private}"
        assert bytes(t.received) == b"", f"{receiver.nick} received {len(t.received)} bytes of the walled file"
        inside_person = sender if sender_side == inside else receiver
        assert chat.pump(lambda: any("information barrier" in n or "blocked" in n
                                     for n in inside_person.imguard_notices()), 10), (
            f"{inside_person.nick} was not told: {inside_person.notices}")
        for person in people.values():
            hello = f"hello from carol {uuid.uuid4().hex[:6]}"
            carol.conn.privmsg(person.nick, hello)
            assert chat.pump(lambda hello=hello, person=person: hello in [m for _, m in person.private], 10), (
                f"carol's message did not reach {person.nick}: {person.private}")
    direction = "outbound" if sender_side == inside else "inbound"
    for dataset in ("imguard.message", "imguard.file"):
        event = gw.wait_alert(lambda e, dataset=dataset: e["event"]["dataset"] == dataset and
                              WALL_ID in _ids(e.get("rule", {}).get("id")) and
                              e["imguard"]["context"]["sender"].split("!")[0] == sender.nick, since=route.since)
        assert event is not None, f"no {dataset} alert naming the wall for {sender.nick}\n{gw.logs()}"
        context = event["imguard"]["context"]
        assert event["event"]["action"] == "block" and context["direction"] == direction, context
        assert receiver.nick in context["recipients"], context


# --- invitations ----------------------------------------------------------------------------------------------

def invite_events(gw, since: int) -> list[dict]:
    return [e for e in gw.alerts()[since:] if e["event"].get("action") == "wall_invite"]


def wait_invite_event(gw, since: int, sender_prefix: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in invite_events(gw, since) if e["imguard"]["context"]["sender"].startswith(sender_prefix)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no wall_invite event from {sender_prefix}: {invite_events(gw, since)}\n{gw.logs()}")


@pytest.mark.parametrize("inside", ["alice", "bob"])
@pytest.mark.parametrize("sender_name, receiver_name", [("alice", "bob"), ("bob", "alice")])
def test_xmpp_wall_refuses_room_invitations_both_ways(prosody, xmpp_wall, inside, sender_name, receiver_name):
    """A direct room invitation (XEP-0249, no body: no message rule sees it) from research to trading or back,
    either of them behind the gateway: it never arrives (the sentinel after it does), the inside party is told, and
    the attempt is a `wall_invite` alert naming the wall, the room and both parties. carol's invitation arrives."""
    from slixmpp.xmlstream.handler import Callback
    from slixmpp.xmlstream.matcher import MatchXPath
    gw = xmpp_wall
    gw.check_alive()
    since = gw.mark()
    sides = Sides(prosody, gw, inside)
    room = f"desk-{uuid.uuid4().hex[:6]}@conference.localhost"

    async def scenario():
        async with sides.client("alice") as alice, sides.client("bob") as bob, sides.client("carol") as carol:
            people = {"alice": alice, "bob": bob}
            sender, receiver = people[sender_name], people[receiver_name]
            invited: list[str] = []
            receiver.xmpp.register_handler(Callback("invitations", MatchXPath("{jabber:client}message/"
                                                                              "{jabber:x:conference}x"),
                                                    lambda msg: invited.append(str(msg["from"]))))
            invitation = f"<message to='{receiver.jid}'><x xmlns='jabber:x:conference' jid='{room}'/></message>"
            sender.xmpp.send_raw(invitation)
            await sentinel_via(sender, carol, receiver)
            assert invited == [], f"the walled invitation reached {receiver_name}: {invited}"
            if sender_name == inside:
                told = await sender.wait_for(lambda r: [m for m in r.messages if room in error_text(m)])
                assert told, f"{sender_name} was not told: {[error_text(m) for m in sender.received.messages]}"
            else:
                told = await receiver.wait_for(lambda r: [m for m in r.messages if room in (m["body"] or "")
                                                          and prosody.jid(sender_name) in (m["body"] or "")])
                assert told, f"{receiver_name} was not told: {receiver.bodies()}"
            carol.xmpp.send_raw(invitation)
            after = f"after carol's invitation {uuid.uuid4().hex[:6]}"
            carol.send_chat(receiver.jid, after)            # one sender to one receiver: in order
            assert await receiver.wait_message(after), f"{after!r} did not reach {receiver_name}"
            assert invited and invited[-1].startswith(prosody.jid("carol")), invited
    asyncio.run(scenario())
    event = wait_invite_event(gw, since, prosody.jid(sender_name))
    assert event["event"]["kind"] == "alert" and WALL_ID in _ids(event["rule"]["id"])
    assert event["imguard"]["membership"] == {"kind": "invite", "room": room, "action": "block"}
    context = event["imguard"]["context"]
    assert [bare(r) for r in context["recipients"]] == [prosody.jid(receiver_name)]
    assert context["direction"] == ("outbound" if sender_name == inside else "inbound")
    assert len(invite_events(gw, since)) == 1, invite_events(gw, since)      # carol's is no wall's business


@pytest.mark.parametrize("inside", ["research", "trading"])
@pytest.mark.parametrize("way", ["research->trading", "trading->research"])
def test_irc_wall_refuses_invites_both_ways(irc_wall, inside, way):
    """INVITE from research to trading or back, one of them behind the gateway: the invitee never gets it (the
    channel sentinel after it arrives), the inside party gets imguard's NOTICE, the attempt is a `wall_invite`
    alert; carol's INVITE arrives."""
    from tests.test_e2e_irc import Chat, Route
    ircd, gw = irc_wall
    gw.check_alive()
    route = Route("imguard", False, ircd, gw)
    bases = {"research": "wra", "trading": "wtb"}
    room = f"#desk-{uuid.uuid4().hex[:6]}"
    with Chat(route) as chat:
        invites: list[tuple[str, str, str]] = []     # (receiving nick, inviter, channel)
        chat.reactor.add_global_handler("invite", lambda conn, event: invites.append(
            (chat.people[conn].nick, event.source.nick, event.arguments[0])))
        people = {side: chat.person(bases[side], join=False, outside=side != inside) for side in bases}
        carol = chat.person("wcn", join=False, outside=True)
        sender_side, receiver_side = way.split("->")
        sender, receiver = people[sender_side], people[receiver_side]
        sender.conn.invite(receiver.nick, room)
        irc_sentinel_via(chat, sender, carol, receiver)
        assert not [i for i in invites if i[0] == receiver.nick], f"the walled INVITE arrived: {invites}"
        inside_person = sender if sender_side == inside else receiver
        assert chat.pump(lambda: any(room in n for n in inside_person.imguard_notices()), 10), (
            f"{inside_person.nick} was not told: {inside_person.notices}")
        carol.conn.invite(receiver.nick, room)
        assert chat.pump(lambda: (receiver.nick, carol.nick, room) in invites, 10), (
            f"carol's INVITE did not arrive: {invites}\n{route.failure_logs()}")
    event = wait_invite_event(gw, route.since, sender.nick)
    assert WALL_ID in _ids(event["rule"]["id"]) and event["imguard"]["membership"]["room"] == room
    assert receiver.nick in event["imguard"]["context"]["recipients"][0], event["imguard"]["context"]
    assert len(invite_events(gw, route.since)) == 1, invite_events(gw, route.since)


def test_xmpp_mediated_room_invitations_are_decided_both_ways(tmp_path):
    """XEP-0045 mediated invitations, on the XMPP session alone (the test Prosody has no MUC service): alice
    (research) inviting bob (trading) into a room is refused with a policy-violation error naming the room; the
    room passing on bob's invitation to alice is dropped and she is told; inviting carol crosses byte-identical."""
    from imguard.files.expected import ExpectedTransfers
    from imguard.pipeline import Pipeline
    from imguard.protocols.xmpp.session import XmppSession
    from tests.test_xmpp_session import CTX, play, segments, sent
    (tmp_path / "groups.yaml").write_text(groups_yaml(["alice@localhost"], ["bob@localhost"]))
    (tmp_path / "50-walls.yaml").write_text(WALL_FILE)
    pipeline = Pipeline(inspector=None, policy=load_policy(tmp_path))
    session = XmppSession(pipeline, ExpectedTransfers(), CTX, stripped_auth_open=True)
    play(session, segments("httpupload_alice.json")[:12])
    assert session.jid == "alice@localhost/t"
    muc = "http://jabber.org/protocol/muc#user"
    room = "desk@conference.localhost"
    walled = f"<message to='{room}' id='i1'><x xmlns='{muc}'><invite to='bob@localhost'/></x></message>".encode()
    cmds = session.data_received(True, walled)
    assert sent(cmds, to_client=False) == b"", "the invitation reached the server"
    answer = sent(cmds, to_client=True).decode()
    assert "policy-violation" in answer and room in answer and "id='i1'" in answer.replace('"', "'"), answer
    allowed = f"<message to='{room}' id='i2'><x xmlns='{muc}'><invite to='carol@localhost'/></x></message>".encode()
    assert sent(session.data_received(True, allowed), to_client=False) == allowed
    delivered = (f"<message from='{room}' to='alice@localhost/t' id='i3'><x xmlns='{muc}'>"
                 f"<invite from='bob@localhost/desk'/></x></message>").encode()
    cmds = session.data_received(False, delivered)
    to_alice = sent(cmds, to_client=True).decode()
    assert "<invite" not in to_alice and "bob@localhost" in to_alice and room in to_alice, to_alice
    assert sent(cmds, to_client=False) == b""
    decisions = [pipeline.policy.decide_membership(ChatContext(sender=s, recipients=(r,)))
                 for s, r in (("alice@localhost", "bob@localhost"), ("bob@localhost", "alice@localhost"))]
    assert [d.rule_ids for d in decisions] == [[WALL_ID], [WALL_ID]]


async def join_room(client: Client, room: str, nick: str) -> None:
    """Enter a XEP-0045 room (Prosody's conference.localhost, created on first entry) and wait for the room's
    presence of ourselves (status 110)."""
    from slixmpp.xmlstream.handler import Callback
    from slixmpp.xmlstream.matcher import MatchXPath
    joined = asyncio.get_running_loop().create_future()

    def on_presence(stanza) -> None:
        if str(stanza["from"]) == f"{room}/{nick}" and "110" in str(stanza) and not joined.done():
            joined.set_result(True)
    client.xmpp.register_handler(Callback(f"join {room}", MatchXPath("{jabber:client}presence"), on_presence))
    client.xmpp.send_raw(f"<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>")
    await asyncio.wait_for(joined, 10)


@pytest.mark.parametrize("inside", ["alice", "bob"])
@pytest.mark.parametrize("sender_name, receiver_name", [("alice", "bob"), ("bob", "alice")])
def test_xmpp_wall_refuses_mediated_room_invitations_both_ways(prosody, xmpp_wall, inside, sender_name,
                                                               receiver_name):
    """A XEP-0045 mediated invitation through a real Prosody room: the inviter, in the room, asks the room to invite
    the other; from research to trading or back, either behind the gateway. The invitee never gets the room's
    invitation (the sentinel after it arrives), the inside party is told, the attempt is a `wall_invite` alert;
    carol's invitation through the same room arrives."""
    from slixmpp.xmlstream.handler import Callback
    from slixmpp.xmlstream.matcher import MatchXPath
    gw = xmpp_wall
    gw.check_alive()
    since = gw.mark()
    sides = Sides(prosody, gw, inside)
    room = f"desk-{uuid.uuid4().hex[:6]}@conference.localhost"
    muc = "http://jabber.org/protocol/muc#user"

    async def scenario():
        async with sides.client("alice") as alice, sides.client("bob") as bob, sides.client("carol") as carol:
            people = {"alice": alice, "bob": bob}
            sender, receiver = people[sender_name], people[receiver_name]
            invited: list[str] = []
            receiver.xmpp.register_handler(Callback("invitations", MatchXPath(
                f"{{jabber:client}}message/{{{muc}}}x/{{{muc}}}invite"), lambda msg: invited.append(str(msg))))
            await join_room(sender, room, sender_name)
            await join_room(carol, room, "carol")
            ask = f"<message to='{room}'><x xmlns='{muc}'><invite to='{prosody.jid(receiver_name)}'/></x></message>"
            sender.xmpp.send_raw(ask)
            await sentinel_via(sender, carol, receiver)
            assert invited == [], f"the walled invitation reached {receiver_name}: {invited}"
            if sender_name == inside:
                told = await sender.wait_for(lambda r: [m for m in r.messages if room in error_text(m)])
                assert told, f"{sender_name} was not told: {[error_text(m) for m in sender.received.messages]}"
            else:
                told = await receiver.wait_for(lambda r: [m for m in r.messages if room in (m["body"] or "")
                                                          and prosody.jid(sender_name) in (m["body"] or "")])
                assert told, f"{receiver_name} was not told: {receiver.bodies()}"
            carol.xmpp.send_raw(ask)
            after = f"after carol's invitation {uuid.uuid4().hex[:6]}"
            carol.send_chat(receiver.jid, after)
            assert await receiver.wait_message(after), f"{after!r} did not reach {receiver_name}"
            assert await receiver.wait_for(lambda r: invited, timeout=5), "carol's invitation did not arrive"
            assert "carol" in invited[-1], invited
    asyncio.run(scenario())
    event = wait_invite_event(gw, since, prosody.jid(sender_name))
    assert WALL_ID in _ids(event["rule"]["id"]) and event["imguard"]["membership"]["room"] == room
    context = event["imguard"]["context"]
    assert [bare(r) for r in context["recipients"]] == [prosody.jid(receiver_name)]
    assert context["direction"] == ("outbound" if sender_name == inside else "inbound")
    assert len(invite_events(gw, since)) == 1, invite_events(gw, since)
