"""Inbound Megolm: an m.room.encrypted event an outside user sends, on its way to the inside user's /sync, is decided
by policy as encrypted (issue 18; the outbound side is tests/test_e2e_matrix.py's Megolm tests).

Real parts: matrix-nio clients with encryption (python-olm), a real Synapse, the real `imguard run`. Alice is outside
(straight to Synapse), bob inside (his whole client, keys and to-device messages included, through the gateway). What
Synapse holds is read on its own port: the ciphertext did reach the server, so what bob gets is the gateway's doing.
- bundled policy (e2e-encrypted-content alerts): bob decrypts exactly what alice wrote; the decision is recorded and
  archived inbound, encryption megolm, from alice to bob;
- a policy that blocks Megolm: bob's /sync carries imguard's notice (a clear m.room.message nio shows) in place of
  the event, never its ciphertext, and the plain sentinel alice sends after it arrives.
The sans-io half (matrix.deliver, rewrite_delivered, the carrier's context) is tested first, without servers.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid

import nio
import pytest

from imguard.chatapi import ChatApiCarrier, ChatApiSettings
from imguard.model import ALLOW, BLOCK, ChatContext, Decision
from imguard.protocols.httpchat import matrix
from imguard.protocols.httpchat.events import DELIVER, DeliveredMessage, HttpRequest
from tests.test_e2e_matrix import (Route, archive_rows, blocking_gateway, check_gateway, closing,  # noqa: F401
                                   encrypted_room, encrypting_client, imguard_route, is_inbound, matrix_gateway, run,
                                   server_history, synapse, sync_until)

pytestmark = pytest.mark.timeout(240)

MEGOLM = {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg",
          "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA", "device_id": "RJYKSTBOIE",
          "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ"}


def sync_body(*events: dict, room: str = "!r:example.org") -> bytes:
    return json.dumps({"next_batch": "s1", "rooms": {"join": {room: {"timeline": {"events": list(events)}}}}}).encode()


def encrypted_event(sender: str, event_id: str = "$enc1") -> dict:
    return {"type": "m.room.encrypted", "sender": sender, "event_id": event_id, "content": dict(MEGOLM),
            "origin_server_ts": 1, "unsigned": {"age": 5}}


# --- sans-io: the decoder and the carrier ---------------------------------------------------------------------------

def test_sync_delivers_an_encrypted_event_as_an_encrypted_message():
    """/sync (and /messages) bring an m.room.encrypted event as a DeliveredMessage with no text, `encrypted` naming
    the scheme, its sender, room and place; a redacted one (empty content) brings nothing."""
    ep = matrix.classify("GET", "/_matrix/client/v3/sync")
    req = HttpRequest.make("GET", "/_matrix/client/v3/sync")
    found = matrix.deliver(ep, req, 200, sync_body(encrypted_event("@alice:example.org"),
                                                   {**encrypted_event("@eve:example.org", "$gone"), "content": {}}))
    assert found == [DeliveredMessage(matrix.ChatMessage("matrix", "sync", "@alice:example.org", "!r:example.org",
                                                         kind="m.room.encrypted"),
                                      "$enc1", ("rooms", "join", "!r:example.org", "timeline", "events", 0),
                                      encrypted="m.room.encrypted")]
    page = json.dumps({"chunk": [encrypted_event("@alice:example.org")]}).encode()
    ep = matrix.classify("GET", "/_matrix/client/v3/rooms/!r:example.org/messages")
    (item,) = matrix.deliver(ep, HttpRequest.make("GET", "/_matrix/client/v3/rooms/!r:example.org/messages"), 200,
                             page)
    assert item.encrypted == "m.room.encrypted" and item.locator == ("chunk", 0)


def test_delivered_encrypted_attachment_is_marked_as_outbound_is():
    """A message in clear sharing an EncryptedFile is delivered with its text and mxc and `encrypted`
    "EncryptedFile" (policy: matrix-attachment, as when it is sent); a plain m.file is not encrypted."""
    ep = matrix.classify("GET", "/_matrix/client/v3/sync")
    req = HttpRequest.make("GET", "/_matrix/client/v3/sync")
    enc = {"type": "m.room.message", "sender": "@a:x", "event_id": "$f", "content": {
        "msgtype": "m.file", "body": "plan.pdf", "file": {"url": "mxc://x/enc", "v": "v2"}}}
    plain = {"type": "m.room.message", "sender": "@a:x", "event_id": "$g", "content": {
        "msgtype": "m.file", "body": "plan.pdf", "url": "mxc://x/plain"}}
    found = [i for i in matrix.deliver(ep, req, 200, sync_body(enc, plain)) if isinstance(i, DeliveredMessage)]
    assert [(i.event_id, i.encrypted, i.message.refs, i.message.text) for i in found] == [
        ("$f", "EncryptedFile", ("mxc://x/enc",), "plan.pdf"), ("$g", "", ("mxc://x/plain",), "plan.pdf")]


def test_blocked_encrypted_event_becomes_a_clear_notice():
    """A blocked encrypted event is rewritten in place to an m.room.message notice: no ciphertext, session or sender
    key left, event id and sender kept (the client shows it where the message was)."""
    body = sync_body(encrypted_event("@alice:example.org"), {"type": "m.room.message", "sender": "@alice:example.org",
                                                             "event_id": "$2", "content": {"body": "hi"}})
    out = json.loads(matrix.rewrite_delivered(body, [(("rooms", "join", "!r:example.org", "timeline", "events", 0),
                                                      "A message from @alice:example.org was blocked")]))
    first, second = out["rooms"]["join"]["!r:example.org"]["timeline"]["events"]
    assert first["type"] == "m.room.message" and first["event_id"] == "$enc1"
    assert first["content"] == {"msgtype": "m.notice", "body": "A message from @alice:example.org was blocked"}
    assert MEGOLM["session_id"] not in json.dumps(out) and MEGOLM["ciphertext"] not in json.dumps(out)
    assert second["content"] == {"body": "hi"}


class Policy:
    """Blocks what policy would see as Megolm (ctx.encryption), when told to; records each context decided."""

    def __init__(self, block: bool):
        self.block, self.decided, self.records = block, [], []

    def check_message(self, text, ctx):
        self.decided.append((text, ctx))
        return Decision(action=BLOCK if self.block and ctx.encryption == "megolm" else ALLOW,
                        notice="no encrypted rooms")

    def record(self, event):
        self.records.append(event)


@pytest.mark.parametrize("block", [False, True])
def test_carrier_decides_a_delivered_encrypted_event_inbound(block):
    """Through the carrier (gateway and replay alike): the encrypted event from alice to bob (whose token asks) is
    decided with origin server, encryption megolm, sender alice, recipient bob and the room; an e2e_encrypted
    anomaly names the scheme. Allowed, the body crosses untouched; blocked, it is the notice. Bob's own encrypted
    event is not decided, and a repeat of the same event is not decided twice."""
    pipeline = Policy(block)
    carrier = ChatApiCarrier(pipeline, settings=ChatApiSettings())
    carrier.learn_identity(matrix.bearer(HttpRequest.make("GET", "/", {"Authorization": "Bearer bobtoken"})),
                           "@bob:example.org")
    req = HttpRequest.make("GET", "https://hs.example.org/_matrix/client/v3/sync",
                           {"Authorization": "Bearer bobtoken"})
    body = sync_body(encrypted_event("@alice:example.org"), encrypted_event("@bob:example.org", "$own"))
    for _ in range(2):
        call, fate = carrier.request_headers(req, ChatContext())
        assert call is not None and call.ep.kind == DELIVER and fate is None
        assert carrier.response_headers(call, 200, {}) is not None
        step = carrier.response_body(call, 200, {}, body)
        with pytest.raises(StopIteration) as done:
            next(step)
        outcome = done.value.value
        if block:
            events = json.loads(outcome.body)["rooms"]["join"]["!r:example.org"]["timeline"]["events"]
            assert events[0]["type"] == "m.room.message" and "no encrypted rooms" in events[0]["content"]["body"]
            assert events[1]["content"] == MEGOLM          # bob's own: untouched
        else:
            assert outcome is None
    (text, ctx), = pipeline.decided
    assert text == "" and ctx.encryption == "megolm" and ctx.origin == "server"
    assert ctx.sender == "@alice:example.org" and ctx.recipients == ("@bob:example.org",)
    assert ctx.conversation == "!r:example.org" and ctx.tenant == "hs.example.org"
    anomalies = [e["imguard"]["anomaly"] for e in pipeline.records]
    assert anomalies == [{"kind": "e2e_encrypted", "detail": "end-to-end encrypted content: it cannot be inspected",
                          "scheme": "m.room.encrypted", "severity": "info"}]


# --- end to end: alice outside sends in an encrypted room, bob inside syncs through imguard --------------------------

async def across_encrypted(route: Route, tmp_path) -> tuple:
    """(alice outside, bob inside, room): both with encryption, in a Megolm room alice made; both have synced it."""
    outside = Route("outside", route.synapse, None)
    alice = await encrypting_client(outside, "alice", tmp_path / "alice")
    bob = await encrypting_client(route, "bob", tmp_path / "bob")
    room = await encrypted_room(alice, bob)
    return alice, bob, room


async def send_secret(alice, room: str, server) -> tuple[str, str]:
    """alice's real Megolm message in `room` (nio encrypts it and shares the room key with bob's device); what
    Synapse stored is ciphertext (asked on its own port). Returns (event id, the plain text)."""
    secret = f"the merger closes on friday {uuid.uuid4().hex[:6]}"
    sent = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": secret},
                                 ignore_unverified_devices=True)
    assert isinstance(sent, nio.RoomSendResponse), sent
    stored = [e for e in server_history(server, alice.access_token, room) if e.get("event_id") == sent.event_id]
    assert stored and stored[0]["type"] == "m.room.encrypted", stored
    assert secret not in json.dumps(stored)
    return sent.event_id, secret


def send_plain(server, token: str, room: str, text: str) -> str:
    """A plain m.room.message straight to Synapse (nio would encrypt it in this room): the sentinel."""
    url = (f"{server.url}/_matrix/client/v3/rooms/{urllib.parse.quote(room)}/send/m.room.message/"
           f"s{uuid.uuid4().hex}")
    req = urllib.request.Request(url, json.dumps({"msgtype": "m.text", "body": text}).encode(), method="PUT",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["event_id"]


async def decrypted(bob, room: str, event_id: str, timeout: float = 30.0):
    """The event `event_id` as bob's nio has it after its syncs (decrypted when it could be)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sync = await bob.sync(timeout=1000)
        assert isinstance(sync, nio.SyncResponse), sync
        joined = sync.rooms.join.get(room)
        for event in joined.timeline.events if joined else []:
            if getattr(event, "event_id", "") == event_id:
                return event
    raise AssertionError(f"{bob.user_id} never got {event_id}")


def test_inbound_megolm_message_is_decided_and_reaches_the_inside_user(imguard_route, tmp_path):  # noqa: F811
    """Bundled policy (e2e-encrypted-content: alert): bob, inside, decrypts exactly what alice wrote (the ciphertext
    crossed unchanged); the gateway, which cannot read it, recorded the decision inbound with encryption megolm,
    from alice to bob, in the alert log and the archive, and never the text."""
    route = imguard_route

    async def scenario():
        alice, bob, room = await across_encrypted(route, tmp_path)
        try:
            event_id, secret = await send_secret(alice, room, route.synapse)
            got = await decrypted(bob, room, event_id)
            assert isinstance(got, nio.RoomMessageText) and got.decrypted, f"bob could not decrypt it: {got}"
            assert got.body == secret
            alert = await route.wait_alert(lambda e: e["event"].get("dataset") == "imguard.message"
                                           and e["imguard"]["context"].get("encryption") == "megolm"
                                           and is_inbound(e, alice.user_id, bob.user_id))
            assert alert, "no inbound message event with the encryption"
            assert alert["event"]["action"] == "alert" and alert["rule"]["id"] == "e2e-encrypted-content", alert
            assert alert["imguard"]["context"]["conversation"] == room
            assert secret not in json.dumps(route.gateway.alerts())
            anomaly = await route.wait_alert(lambda e: e.get("imguard", {}).get("anomaly", {}).get("kind") ==
                                             "e2e_encrypted" and e["imguard"]["context"].get("origin") == "server")
            assert anomaly and anomaly["imguard"]["anomaly"]["scheme"] == "m.room.encrypted"
            rows = archive_rows(route, alice.user_id, lambda r: r["conversation"] == room)
            assert [r["direction"] for r in rows] == ["inbound"], rows
        finally:
            await closing(alice, bob)
    run(scenario())


def test_inbound_megolm_message_blocked_shows_the_notice_then_the_sentinel(synapse, blocking_gateway,  # noqa: F811
                                                                           tmp_path):
    """A policy that blocks Megolm (`encrypted: [megolm]`, action block; no direction): alice's encrypted message
    reaches Synapse, but bob's /sync through imguard carries imguard's notice in its place (an m.room.message nio
    shows as a notice, with the event's id), never the ciphertext, so bob decrypts nothing; the plain sentinel
    alice sends after it arrives. The block is recorded inbound with the rule and the scheme."""
    offset = blocking_gateway.log_size()
    route = Route("imguard", synapse, blocking_gateway)

    async def scenario():
        alice, bob, room = await across_encrypted(route, tmp_path)
        try:
            event_id, secret = await send_secret(alice, room, synapse)
            sentinel = f"sentinel {uuid.uuid4().hex[:6]}"
            sentinel_id = send_plain(synapse, alice.access_token, room, sentinel)
            seen = await sync_until(bob, room, lambda e: e.get("event_id") == sentinel_id)
            mine = [e for e in seen if e.get("event_id") == event_id]
            assert len(mine) == 1, seen
            assert mine[0]["type"] == "m.room.message", mine
            assert mine[0]["content"]["msgtype"] == "m.notice"
            assert mine[0]["content"]["body"].startswith(f"A message from {alice.user_id} was blocked by imguard")
            assert MEGOLM["algorithm"] not in json.dumps(seen) and secret not in json.dumps(seen)
            assert [e["content"]["body"] for e in seen if e.get("event_id") == sentinel_id] == [sentinel]
            alert = await route.wait_alert(lambda e: e["event"].get("dataset") == "imguard.message"
                                           and e["event"].get("action") == "block"
                                           and is_inbound(e, alice.user_id, bob.user_id))
            assert alert and "test-no-encrypted-matrix" in alert["rule"]["id"], alert
            assert alert["imguard"]["context"]["encryption"] == "megolm"
            # control: straight to Synapse, bob's own history has the ciphertext alice sent
            stored = [e for e in server_history(synapse, bob.access_token, room) if e.get("event_id") == event_id]
            assert stored and stored[0]["type"] == "m.room.encrypted"
        finally:
            await closing(alice, bob)
    run(scenario())
    check_gateway(blocking_gateway, offset)
