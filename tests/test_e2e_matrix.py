"""Matrix end to end, with real parts only: matrix-nio clients, a real Synapse homeserver, the real `imguard run`.

The clients talk HTTPS to the gateway (reverse proxy in front of Synapse's plain-HTTP listener) and verify
imguard's CA. What reached the homeserver is read from Synapse itself, directly (its room history through its
own port, its media store on disk), so "never reached the server" is the server's word, not the gateway's.
A control route (nio straight to Synapse) proves the fixture: there the keyword and EICAR do get through.

Inbound (the perimeter's first job): an outside user connects straight to Synapse, the inside user through the
gateway. What the outside user shares is decided on its way in: a media download of EICAR gets M_FORBIDDEN
(never the bytes), a clean file arrives byte-identical, a message with the blocked keyword shows in the inside
client's /sync as imguard's notice instead; the alerts say inbound and name both parties.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import time
import urllib.parse
import urllib.request
import uuid

import nio          # matrix-nio: in the test extras of setup.cfg
import pytest

from tests.peers.http_gateway import HttpGateway
from tests.peers.synapse import Synapse

pytestmark = pytest.mark.timeout(180)

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
CLEAN = b"quarterly numbers, nothing secret\n" * 300 + bytes(range(256)) * 4
BLOCKED_WORD = "project-bluebird"           # tests/data/rules: a keyword block rule


@pytest.fixture(scope="module")
def synapse(tmp_path_factory):
    server = Synapse.start(tmp_path_factory.mktemp("synapse"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def matrix_gateway(tmp_path_factory, synapse):
    gw = HttpGateway.start(tmp_path_factory.mktemp("matrix-gw"), [f"http://127.0.0.1:{synapse.port}"])
    try:
        yield gw
    finally:
        status = gw.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


class Route:
    def __init__(self, name: str, synapse: Synapse, gateway: HttpGateway | None):
        self.name, self.synapse, self.gateway = name, synapse, gateway
        self.since = gateway.mark() if gateway else 0
        if gateway is None:
            self.base, self.ssl = synapse.url, None
        else:
            self.base = f"https://localhost:{gateway.ports[0]}"
            self.ssl = ssl.create_default_context(cafile=str(gateway.ca_file))

    @property
    def through_gateway(self) -> bool:
        return self.gateway is not None

    async def client(self, name: str) -> "nio.AsyncClient":
        user = f"{name}-{uuid.uuid4().hex[:6]}"
        client = nio.AsyncClient(self.base, user, ssl=self.ssl)
        resp = await client.register(user, f"{user}-password-1")
        assert isinstance(resp, nio.RegisterResponse), f"register failed: {resp}"
        return client

    async def room(self, alice, bob) -> str:
        resp = await alice.room_create(invite=[bob.user_id])
        assert isinstance(resp, nio.RoomCreateResponse), resp
        joined = await bob.join(resp.room_id)
        assert isinstance(joined, nio.JoinResponse), joined
        return resp.room_id

    async def wait_alert(self, predicate, timeout: float = 10.0):
        return await self.gateway.wait_alert(predicate, since=self.since, timeout=timeout)

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=["control", "imguard"])
def route(request, synapse):
    """Each scenario straight to Synapse (the control) and through imguard."""
    gateway = request.getfixturevalue("matrix_gateway") if request.param == "imguard" else None
    offset = gateway.log_size() if gateway else 0
    yield Route(request.param, synapse, gateway)
    if gateway is not None:
        check_gateway(gateway, offset)


@pytest.fixture
def imguard_route(synapse, matrix_gateway):
    """Through imguard only: for what only a gateway does."""
    offset = matrix_gateway.log_size()
    yield Route("imguard", synapse, matrix_gateway)
    check_gateway(matrix_gateway, offset)


def check_gateway(gateway: HttpGateway, offset: int) -> None:
    assert not gateway.crashed, gateway.logs()
    errors = gateway.errors_since(offset)
    assert not errors, "imguard logged errors:\n" + "\n".join(errors) + "\n" + gateway.logs()


def server_history(synapse: Synapse, token: str, room_id: str) -> list[dict]:
    """The room's events as Synapse itself has them (asked on its own port, not through the gateway)."""
    url = (f"{synapse.url}/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/messages?dir=b&limit=100")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["chunk"]


def bodies(events: list[dict]) -> list[str]:
    return [e.get("content", {}).get("body", "") for e in events if e.get("type") == "m.room.message"]


def run(coro):
    return asyncio.run(coro)


async def closing(*clients):
    for c in clients:
        await c.close()


def test_message_passes_and_is_attributed(route):
    """A text message arrives at the homeserver unchanged; through imguard it is logged with alice's user id
    (learned from the register response) and the room."""
    async def scenario():
        alice, bob = await route.client("alice"), await route.client("bob")
        try:
            room = await route.room(alice, bob)
            text = f"hello bob ünïcödé ✓ {uuid.uuid4().hex[:6]}"
            resp = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": text})
            assert isinstance(resp, nio.RoomSendResponse), resp
            assert text in bodies(server_history(route.synapse, bob.access_token, room))
            if route.through_gateway:
                alert = await route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                               and e["imguard"].get("message", {}).get("text") == text)
                assert alert, "no message event in the alert log"
                assert alert["source"]["user"]["name"] == alice.user_id
                assert alert["destination"]["user"]["name"] == [room]
                assert alert["network"]["protocol"] == "matrix"
        finally:
            await closing(alice, bob)
    run(scenario())


def test_blocked_keyword_is_stopped_with_a_matrix_error(route):
    """A message naming the blocked keyword (plain and in formatted_body only) is refused with M_FORBIDDEN and
    the policy's reason; the homeserver never has it."""
    async def scenario():
        alice, bob = await route.client("alice"), await route.client("bob")
        try:
            room = await route.room(alice, bob)
            plain = {"msgtype": "m.text", "body": f"the {BLOCKED_WORD} launch is friday"}
            hidden = {"msgtype": "m.text", "body": "see below", "format": "org.matrix.custom.html",
                      "formatted_body": f"<p>the <i>{BLOCKED_WORD}</i> launch</p>"}
            for content in (plain, hidden):
                resp = await alice.room_send(room, "m.room.message", content)
                if not route.through_gateway:
                    assert isinstance(resp, nio.RoomSendResponse), resp
                    continue
                assert isinstance(resp, nio.RoomSendError), f"the blocked message was accepted: {resp}"
                assert resp.status_code == "M_FORBIDDEN" and "confidential project" in resp.message, resp
            history = json.dumps(server_history(route.synapse, bob.access_token, room))
            assert (BLOCKED_WORD in history) != route.through_gateway
        finally:
            await closing(alice, bob)
    run(scenario())


def test_eicar_media_never_reaches_the_store_clean_media_does(route):
    """EICAR uploaded as media is refused (M_FORBIDDEN) and no file in Synapse's media store holds it; a clean
    file is stored byte-identical and can be shared."""
    async def scenario():
        alice, bob = await route.client("alice"), await route.client("bob")
        try:
            room = await route.room(alice, bob)
            before = route.synapse.media_files()
            resp, _ = await alice.upload(io.BytesIO(EICAR), content_type="application/octet-stream",
                                         filename="eicar.com", filesize=len(EICAR))
            stored = route.synapse.stored_media(since=before)
            if route.through_gateway:
                assert isinstance(resp, nio.UploadError), f"EICAR was accepted: {resp}"
                assert resp.status_code == "M_FORBIDDEN" and "malware" in resp.message, resp
                assert EICAR not in stored, "EICAR reached Synapse's media store"
            else:
                assert isinstance(resp, nio.UploadResponse) and EICAR in stored, "control: Synapse stores EICAR"
            name = f"numbers-{uuid.uuid4().hex[:6]}.bin"
            resp, _ = await alice.upload(io.BytesIO(CLEAN), content_type="application/octet-stream", filename=name,
                                         filesize=len(CLEAN))
            assert isinstance(resp, nio.UploadResponse), resp
            assert CLEAN in route.synapse.stored_media(since=before)
            sent = await alice.room_send(room, "m.room.message",
                                         {"msgtype": "m.file", "body": name, "url": resp.content_uri,
                                          "info": {"size": len(CLEAN)}})
            assert isinstance(sent, nio.RoomSendResponse), sent
            got = await bob.download(resp.content_uri)
            assert isinstance(got, nio.DownloadResponse) and got.body == CLEAN, got
        finally:
            await closing(alice, bob)
    run(scenario())


def test_message_sharing_a_blocked_mxc_is_blocked(imguard_route):
    """The async upload (POST /_matrix/media/v1/create, then PUT the bytes to that mxc): EICAR is refused, the
    mxc is remembered as blocked, and an m.file message that shares it is refused too (so is a download)."""
    route = imguard_route

    async def scenario():
        alice, bob = await route.client("alice"), await route.client("bob")
        try:
            room = await route.room(alice, bob)
            import aiohttp
            auth = {"Authorization": f"Bearer {alice.access_token}"}
            async with aiohttp.ClientSession() as http:
                before = route.synapse.media_files()
                async with http.post(f"{route.base}/_matrix/media/v1/create", headers=auth, ssl=route.ssl) as r:
                    assert r.status == 200, await r.text()
                    mxc = (await r.json())["content_uri"]
                server, media_id = mxc[len("mxc://"):].split("/", 1)
                async with http.put(f"{route.base}/_matrix/media/v3/upload/{server}/{media_id}?filename=e.com",
                                    data=EICAR, headers={**auth, "Content-Type": "application/octet-stream"},
                                    ssl=route.ssl) as r:
                    body = await r.json()
                    assert r.status == 403 and body["errcode"] == "M_FORBIDDEN", body
                async with http.get(f"{route.base}/_matrix/client/v1/media/download/{server}/{media_id}",
                                    headers=auth, ssl=route.ssl) as r:
                    assert r.status == 403 and "blocked" in (await r.json())["error"]
            assert EICAR not in route.synapse.stored_media(since=before)
            resp = await alice.room_send(room, "m.room.message",
                                         {"msgtype": "m.file", "body": "report.pdf", "url": mxc})
            assert isinstance(resp, nio.RoomSendError) and resp.status_code == "M_FORBIDDEN", resp
            assert "blocked" in resp.message
            assert mxc not in json.dumps(server_history(route.synapse, bob.access_token, room))
        finally:
            await closing(alice, bob)
    run(scenario())


def test_encrypted_event_is_recognised_and_left_to_policy(imguard_route):
    """An m.room.encrypted event (Megolm ciphertext) cannot be read: it passes under the bundled policy, and the
    gateway records an e2e_encrypted anomaly for it."""
    route = imguard_route

    async def scenario():
        alice, bob = await route.client("alice"), await route.client("bob")
        try:
            room = await route.room(alice, bob)
            content = {"algorithm": "m.megolm.v1.aes-sha2",
                       "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg",
                       "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA", "device_id": "RJYKSTBOIE",
                       "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ"}
            resp = await alice.room_send(room, "m.room.encrypted", content)
            assert isinstance(resp, nio.RoomSendResponse), resp
            alert = await route.wait_alert(
                lambda e: e.get("imguard", {}).get("anomaly", {}).get("kind") == "e2e_encrypted")
            assert alert and alert["imguard"]["anomaly"]["scheme"] == "m.room.encrypted"
            assert alert["source"]["user"]["name"] == alice.user_id
        finally:
            await closing(alice, bob)
    run(scenario())


# --- inbound: sender outside (straight to Synapse), receiver inside (through imguard) ----------------------

async def across(route: Route) -> tuple:
    """(outside alice, inside bob, room): alice straight to Synapse, bob through the gateway, both in one room;
    bob has synced once (its next sync brings only what comes after)."""
    outside = Route("outside", route.synapse, None)
    alice, bob = await outside.client("alice"), await route.client("bob")
    room = await outside.room(alice, bob)
    first = await bob.sync(timeout=0)
    assert isinstance(first, nio.SyncResponse), first
    return alice, bob, room


async def sync_until(client, room: str, predicate, timeout: float = 20.0) -> list[dict]:
    """The raw timeline events `client` gets for `room` from its syncs, until one satisfies `predicate`."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.sync(timeout=1000)
        assert isinstance(resp, nio.SyncResponse), resp
        joined = resp.rooms.join.get(room)
        for event in joined.timeline.events if joined else []:
            seen.append(event.source)
        if any(predicate(e) for e in seen):
            return seen
    raise AssertionError(f"{client.user_id} never saw the awaited event; saw {seen}")


def body_is(text: str):
    return lambda e: e.get("type") == "m.room.message" and e.get("content", {}).get("body") == text


def is_inbound(alert: dict, sender: str, receiver: str) -> bool:
    ctx = alert.get("imguard", {}).get("context", {})
    return (ctx.get("direction") == "inbound" and ctx.get("origin") == "server"
            and alert.get("source", {}).get("user", {}).get("name") == sender
            and receiver in alert.get("destination", {}).get("user", {}).get("name", []))


def test_inbound_eicar_download_is_refused_clean_file_arrives(imguard_route):
    """An outside user uploads EICAR straight to Synapse and shares it in a room with the inside user: the inside
    user's download through imguard gets M_FORBIDDEN, never the bytes, and the alert says inbound, from alice to
    bob. A clean file shared the same way downloads byte-identical."""
    route = imguard_route

    async def scenario():
        alice, bob, room = await across(route)
        try:
            shared = {}
            for name, data in (("eicar.com", EICAR), (f"numbers-{uuid.uuid4().hex[:6]}.bin", CLEAN)):
                up, _ = await alice.upload(io.BytesIO(data), content_type="application/octet-stream",
                                           filename=name, filesize=len(data))
                assert isinstance(up, nio.UploadResponse), f"control: Synapse takes {name} from outside: {up}"
                sent = await alice.room_send(room, "m.room.message", {"msgtype": "m.file", "body": name,
                                                                      "url": up.content_uri})
                assert isinstance(sent, nio.RoomSendResponse), sent
                shared[name] = up.content_uri
            clean_name = next(n for n in shared if n != "eicar.com")
            await sync_until(bob, room, body_is(clean_name))        # bob's client learns of both files

            got = await bob.download(shared["eicar.com"])
            assert isinstance(got, nio.DownloadError), f"EICAR reached the inside user: {got}"
            assert got.status_code == "M_FORBIDDEN" and "blocked" in got.message, got
            alert = await route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.file"
                                           and e.get("event", {}).get("action") == "block"
                                           and is_inbound(e, alice.user_id, bob.user_id))
            assert alert, "no inbound file block alert naming alice and bob"
            assert alert["imguard"]["context"]["conversation"] == room

            got = await bob.download(shared[clean_name])
            assert isinstance(got, nio.DownloadResponse) and got.body == CLEAN, got
            alert = await route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.file"
                                           and e.get("event", {}).get("action") != "block"
                                           and is_inbound(e, alice.user_id, bob.user_id))
            assert alert, "the clean inbound file was not recorded"
        finally:
            await closing(alice, bob)
    run(scenario())


def test_inbound_blocked_message_shows_as_the_notice(imguard_route):
    """An outside user's message with the blocked keyword never shows in the inside user's client: its sync
    has imguard's notice in its place (a sentinel sent after it arrives, the keyword never does). An allowed
    message arrives untouched; both are recorded inbound (alert log, archive by either person)."""
    route = imguard_route

    async def scenario():
        alice, bob, room = await across(route)
        try:
            secret = f"the {BLOCKED_WORD} launch is friday {uuid.uuid4().hex[:6]}"
            hello = f"hello from outside ✓ {uuid.uuid4().hex[:6]}"
            sentinel = f"sentinel {uuid.uuid4().hex}"
            for text in (secret, hello, sentinel):
                sent = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": text})
                assert isinstance(sent, nio.RoomSendResponse), sent
            assert secret in bodies(server_history(route.synapse, alice.access_token, room)), "control"
            seen = await sync_until(bob, room, body_is(sentinel))
            assert BLOCKED_WORD not in json.dumps(seen), "the blocked message reached the inside client"
            shown = [e["content"]["body"] for e in seen if e.get("type") == "m.room.message"]
            notice = [b for b in shown if b.startswith(f"A message from {alice.user_id} was blocked by imguard:")]
            assert len(notice) == 1 and "confidential project" in notice[0], shown
            assert hello in shown, shown
            alert = await route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                           and e.get("event", {}).get("action") == "block"
                                           and is_inbound(e, alice.user_id, bob.user_id))
            assert alert, "no inbound message block alert naming alice and bob"
            allowed = await route.wait_alert(lambda e: e.get("imguard", {}).get("message", {}).get("text") == hello)
            assert allowed and is_inbound(allowed, alice.user_id, bob.user_id), allowed
            for person in (alice.user_id, bob.user_id):
                rows = archive_rows(route, person, lambda r: r["text"] == hello)
                assert len(rows) == 1 and rows[0]["direction"] == "inbound", (person, rows)

            # The other way round: bob (inside) answers through imguard; alice (outside) has it, it is recorded
            # once, outbound (bob's own message in his next sync is not decided again).
            reply = f"reply from inside {uuid.uuid4().hex[:6]}"
            sent = await bob.room_send(room, "m.room.message", {"msgtype": "m.text", "body": reply})
            assert isinstance(sent, nio.RoomSendResponse), sent
            await sync_until(alice, room, body_is(reply))
            await sync_until(bob, room, body_is(reply))
            out = await route.wait_alert(lambda e: e.get("imguard", {}).get("message", {}).get("text") == reply)
            assert out and out["imguard"]["context"]["direction"] == "outbound", out
            assert out["source"]["user"]["name"] == bob.user_id
            records = [e for e in route.gateway.alerts()
                       if e.get("imguard", {}).get("message", {}).get("text") == reply]
            assert len(records) == 1, records
        finally:
            await closing(alice, bob)
    run(scenario())


def archive_rows(route: Route, person: str, predicate, timeout: float = 10.0) -> list[dict]:
    """The gateway's archive searched by person (as `imguard archive search --person`), waited for."""
    from imguard import archive

    store = archive.Archive(route.gateway.data_dir / "archive.sqlite3")
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in store.search(archive.Query(person=person)) if predicate(r)]
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)
    finally:
        store.close()


def test_inbound_messages_context_and_event_show_the_notice(imguard_route):
    """What /messages, /context/{eventId} and /rooms/{room}/event/{eventId} deliver is decided as /sync's is: the
    outside user's blocked message reaches the inside user (room_messages, room_context, room_get_event, before
    any sync brought it) as imguard's notice, the sentinel after it untouched; a message sharing a file whose
    download was blocked shows as the notice from then on. The alerts say inbound and name both parties."""
    route = imguard_route

    async def scenario():
        alice, bob, room = await across(route)
        try:
            tag = uuid.uuid4().hex[:6]
            secret, sentinel = f"the {BLOCKED_WORD} launch {tag}", f"sentinel {tag}"
            ids = {}
            for text in (secret, sentinel):
                sent = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": text})
                assert isinstance(sent, nio.RoomSendResponse), sent
                ids[text] = sent.event_id
            assert secret in bodies(server_history(route.synapse, alice.access_token, room)), "control"
            notice = f"A message from {alice.user_id} was blocked by imguard:"

            page = await bob.room_messages(room, limit=20)
            assert isinstance(page, nio.RoomMessagesResponse), page
            shown = {e.source["event_id"]: e.source["content"].get("body", "") for e in page.chunk}
            assert shown[ids[sentinel]] == sentinel, shown
            assert shown[ids[secret]].startswith(notice) and "confidential project" in shown[ids[secret]], shown
            assert BLOCKED_WORD not in json.dumps([e.source for e in page.chunk])
            alert = await route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                           and e.get("event", {}).get("action") == "block"
                                           and is_inbound(e, alice.user_id, bob.user_id))
            assert alert and "matrix:messages" in json.dumps(alert), alert

            context = await bob.room_context(room, ids[secret], limit=4)
            assert isinstance(context, nio.RoomContextResponse), context
            assert context.event.source["content"]["body"].startswith(notice)
            around = [e.source for e in context.events_before + context.events_after] + [context.event.source]
            assert BLOCKED_WORD not in json.dumps(around)
            single = await bob.room_get_event(room, ids[secret])
            assert isinstance(single, nio.RoomGetEventResponse), single
            assert single.event.source["content"] == {"msgtype": "m.notice", "body": shown[ids[secret]]}
            assert (await bob.room_get_event(room, ids[sentinel])).event.source["content"]["body"] == sentinel

            # A file message: it passes until its file is known to be blocked (the download), then it is the
            # notice in every answer.
            up, _ = await alice.upload(io.BytesIO(EICAR), content_type="application/octet-stream",
                                       filename="eicar.com", filesize=len(EICAR))
            assert isinstance(up, nio.UploadResponse), up
            sent = await alice.room_send(room, "m.room.message", {"msgtype": "m.file", "body": "eicar.com",
                                                                  "url": up.content_uri})
            assert isinstance(sent, nio.RoomSendResponse), sent
            first = await bob.room_get_event(room, sent.event_id)
            assert first.event.source["content"].get("url") == up.content_uri
            got = await bob.download(up.content_uri)
            assert isinstance(got, nio.DownloadError) and got.status_code == "M_FORBIDDEN", got
            after = await bob.room_get_event(room, sent.event_id)
            assert after.event.source["content"]["body"].startswith(notice), after.event.source
            assert "url" not in after.event.source["content"]
            context = await bob.room_context(room, sent.event_id, limit=2)
            assert context.event.source["content"]["body"].startswith(notice)
            page = await bob.room_messages(room, limit=5)
            assert up.content_uri not in json.dumps([e.source for e in page.chunk])
            alert = await route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                           and "matrix:event" in json.dumps(e)
                                           and e.get("event", {}).get("action") == "block"
                                           and is_inbound(e, alice.user_id, bob.user_id))
            assert alert, "no inbound block alert for the message sharing the blocked file"
        finally:
            await closing(alice, bob)
    run(scenario())


# --- Megolm: a real encrypted room (matrix-nio with python-olm) ----------------------------------------------

async def encrypting_client(route: Route, name: str, store) -> "nio.AsyncClient":
    """A registered nio client with end-to-end encryption on (python-olm), its device keys uploaded."""
    if not nio.crypto.ENCRYPTION_ENABLED:
        pytest.fail("matrix-nio has no encryption here: python-olm is missing (setup.cfg test extras)")
    user = f"{name}-{uuid.uuid4().hex[:6]}"
    store.mkdir(exist_ok=True)
    client = nio.AsyncClient(route.base, user, ssl=route.ssl, store_path=str(store),
                             config=nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False))
    resp = await client.register(user, f"{user}-password-1")
    assert isinstance(resp, nio.RegisterResponse), f"register failed: {resp}"
    assert client.olm is not None
    if client.should_upload_keys:
        assert isinstance(await client.keys_upload(), nio.KeysUploadResponse)
    return client


async def encrypted_room(alice, bob) -> str:
    """A room alice creates with encryption on (m.room.encryption, Megolm) and bob joins; both have synced it."""
    resp = await alice.room_create(invite=[bob.user_id], initial_state=[
        {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
    assert isinstance(resp, nio.RoomCreateResponse), resp
    assert isinstance(await bob.join(resp.room_id), nio.JoinResponse)
    for client in (alice, bob):
        assert isinstance(await client.sync(timeout=0, full_state=True), nio.SyncResponse)
    assert alice.rooms[resp.room_id].encrypted
    return resp.room_id


def test_megolm_room_message_is_seen_by_policy_as_encrypted(imguard_route, tmp_path):
    """alice, inside, writes in an encrypted room to bob, outside (straight to Synapse): nio encrypts it with
    Megolm (python-olm) and shares the room key with bob's device. Bob decrypts exactly what she wrote (real
    ciphertext crossed, unchanged); the gateway, which cannot read it, hands policy the fact: the bundled
    e2e-encrypted-content rule alerts on `encrypted: true`, and the event says imguard.context.encryption =
    megolm, outbound, from alice. A plain message after it in a room without encryption is not `encrypted`."""
    route = imguard_route
    outside = Route("outside", route.synapse, None)

    async def scenario():
        alice = await encrypting_client(route, "alice", tmp_path / "alice")
        bob = await encrypting_client(outside, "bob", tmp_path / "bob")
        try:
            room = await encrypted_room(alice, bob)
            secret = f"the merger closes on friday {uuid.uuid4().hex[:6]}"
            sent = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": secret},
                                         ignore_unverified_devices=True)
            assert isinstance(sent, nio.RoomSendResponse), sent
            # What Synapse stored is ciphertext (asked on its own port).
            stored = [e for e in server_history(route.synapse, bob.access_token, room)
                      if e.get("event_id") == sent.event_id]
            assert stored and stored[0]["type"] == "m.room.encrypted", stored
            assert stored[0]["content"]["algorithm"] == "m.megolm.v1.aes-sha2" and secret not in json.dumps(stored)
            deadline = time.monotonic() + 20
            got = None
            while got is None and time.monotonic() < deadline:
                sync = await bob.sync(timeout=1000)
                assert isinstance(sync, nio.SyncResponse), sync
                timeline = sync.rooms.join.get(room)
                for event in (timeline.timeline.events if timeline else []):
                    if getattr(event, "event_id", "") == sent.event_id:
                        got = event
            assert isinstance(got, nio.RoomMessageText) and got.decrypted, f"bob could not decrypt it: {got}"
            assert got.body == secret
            alert = await route.wait_alert(
                lambda e: e["event"].get("dataset") == "imguard.message"
                and e["imguard"]["context"].get("encryption") == "megolm")
            assert alert, "no message event with the encryption"
            assert alert["event"]["action"] == "alert" and alert["rule"]["id"] == "e2e-encrypted-content", alert
            assert alert["imguard"]["context"]["direction"] == "outbound"
            assert alert["source"]["user"]["name"] == alice.user_id
            assert secret not in json.dumps(alert)
            plain_room = await route.room(alice, bob)
            assert isinstance(await alice.sync(timeout=0), nio.SyncResponse)      # nio sends only in rooms it knows
            note = f"plain text after it {uuid.uuid4().hex[:6]}"
            assert isinstance(await alice.room_send(plain_room, "m.room.message", {"msgtype": "m.text",
                                                                                 "body": note}), nio.RoomSendResponse)
            plain = await route.wait_alert(lambda e: e["event"].get("dataset") == "imguard.message"
                                           and e["imguard"].get("message", {}).get("text") == note)
            assert plain and plain["imguard"]["context"]["encryption"] == ""
            assert "e2e-encrypted-content" not in json.dumps(plain.get("rule", {}))
        finally:
            await closing(alice, bob)
    run(scenario())


NO_MEGOLM_RULE = """\
- id: test-no-encrypted-matrix
  title: No encrypted Matrix rooms
  severity: medium
  action: block
  applies_to: message
  match:
    encrypted: [megolm]
"""


@pytest.fixture(scope="module")
def blocking_gateway(tmp_path_factory, synapse):
    """A second gateway whose company chose to block Megolm (one rule more than the bundled policy)."""
    gw = HttpGateway.start(tmp_path_factory.mktemp("matrix-gw-no-megolm"), [f"http://127.0.0.1:{synapse.port}"],
                           extra_rules={"95-no-megolm.yaml": NO_MEGOLM_RULE})
    try:
        yield gw
    finally:
        status = gw.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


def test_a_policy_that_blocks_megolm_keeps_encrypted_messages_off_the_server(synapse, blocking_gateway, tmp_path):
    """Where the company blocks encrypted chat (`encrypted: [megolm]`, action block), nio's real Megolm message
    from alice inside is refused (M_FORBIDDEN) and never reaches Synapse (its own history says so); the block is
    logged with the rule and the scheme; a plain message from her still goes."""
    offset = blocking_gateway.log_size()
    route = Route("imguard", synapse, blocking_gateway)
    outside = Route("outside", synapse, None)

    async def scenario():
        alice = await encrypting_client(route, "alice", tmp_path / "alice")
        bob = await encrypting_client(outside, "bob", tmp_path / "bob")
        try:
            room = await encrypted_room(alice, bob)
            secret = f"the merger closes on friday {uuid.uuid4().hex[:6]}"
            resp = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": secret},
                                         ignore_unverified_devices=True)
            assert isinstance(resp, nio.RoomSendError) and resp.status_code == "M_FORBIDDEN", resp
            history = server_history(synapse, bob.access_token, room)
            assert not [e for e in history if e.get("type") == "m.room.encrypted"], history
            alert = await route.wait_alert(lambda e: e["event"].get("dataset") == "imguard.message"
                                           and e["event"].get("action") == "block")
            assert alert and "test-no-encrypted-matrix" in alert["rule"]["id"], alert
            assert alert["imguard"]["context"]["encryption"] == "megolm"
            plain_room = await route.room(alice, bob)
            assert isinstance(await alice.sync(timeout=0), nio.SyncResponse)
            sent = await alice.room_send(plain_room, "m.room.message", {"msgtype": "m.text", "body": "lunch?"})
            assert isinstance(sent, nio.RoomSendResponse), sent
            assert [e for e in server_history(synapse, bob.access_token, plain_room)
                    if e.get("event_id") == sent.event_id]
        finally:
            await closing(alice, bob)
    run(scenario())
    check_gateway(blocking_gateway, offset)
