"""Slack, Mattermost, Rocket.Chat and Discord requests made by the vendors' own client libraries (slack_sdk,
mattermostdriver, rocketchat_API, discord.py), pointed at the real `imguard run` (reverse mode) in front of the
stand-in vendor of tests/test_httpchat_gateway.py: what imguard parses is what those clients really send
(multipart layouts, two-step uploads, form or JSON bodies), not what a test author wrote.

For each library: a clean message arrives as the library sent it, a blocked one gets the API's error in the
library (and never reaches the vendor: a sentinel sent after it arrives alone), a masked one arrives masked, a clean
file arrives byte-identical by the library's own upload path, EICAR is refused with the API's error; and the
inbound direction where the library reads history: the outside user's blocked message is imguard's notice."""

from __future__ import annotations

import asyncio
import io
import json
import uuid

import discord
import pytest

from tests import test_httpchat_gateway as stand_in
from tests.test_httpchat_gateway import BLOCKED_WORD, CASES, CLEAN, EICAR, MASK_WORD, history_texts

vendor_gateway = stand_in.vendor_gateway      # the fixtures: the stand-in vendor behind a real `imguard run`
route = stand_in.route

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore:This class is deprecated:DeprecationWarning"),     # msgraph-sdk's
              pytest.mark.filterwarnings("ignore:GetQueryParameters is deprecated:DeprecationWarning")]   # own
REDACTED = "[REDACTED:keyword]"


def tag() -> str:
    return uuid.uuid4().hex[:6]


def sent_texts(vendor, path_part: str) -> str:
    """Everything the vendor received on paths containing path_part, as one text (for 'never arrived' checks)."""
    return b"\n".join(vendor.bodies(path_part)).decode("utf-8", "replace")


def serve(vendor, path: str, obj) -> None:
    vendor.served[path] = (200, "application/json", json.dumps(obj).encode())


def assert_history_notice(texts: list[str], outside: str, blocked: str, masked_tag: str, sentinel: str,
                          own: str) -> None:
    assert len(texts) == 4 and texts[2:] == [sentinel, own], texts
    assert texts[0].startswith(f"A message from {outside} was blocked by imguard:"), texts
    assert blocked not in texts[0] and BLOCKED_WORD not in texts[0]
    assert texts[1] == f"code {REDACTED} {masked_tag}", texts


def inbound_history(vendor, api: str) -> tuple:
    """Serve the vendor's history for `api` (tests/test_httpchat_gateway.py's case); the texts it holds."""
    case = CASES[api]()
    t = tag()
    blocked, masked = f"the {BLOCKED_WORD} launch {t}", f"code {MASK_WORD} {t}"
    sentinel, own = f"sentinel {t}", f"my own {BLOCKED_WORD} note {t}"
    vendor.served[case.history_path.split("?")[0]] = (
        200, "application/json", json.dumps(case.history(history_texts(blocked, masked, sentinel, own), ())).encode())
    if case.whoami:
        serve(vendor, case.whoami[0], case.whoami[1])
    return case, t, blocked, sentinel, own


# --- Slack: slack_sdk ----------------------------------------------------------------------------------------

def slack_client(port: int, token: str = "xoxb-test-token"):
    from slack_sdk import WebClient
    return WebClient(token=token, base_url=f"http://127.0.0.1:{port}/api/", timeout=15)


def test_slack_sdk_messages(route):
    """chat_postMessage (slack_sdk sends JSON): clean arrives as sent, blocked raises SlackApiError with Slack's
    error shape and never arrives, masked arrives redacted."""
    from slack_sdk.errors import SlackApiError
    vendor, gw = route
    client, t = slack_client(gw.ports[0]), tag()
    assert client.chat_postMessage(channel="C1", text=f"lunch at noon? ünïcödé {t}")["ok"] is True
    [clean] = vendor.bodies("chat.postMessage")
    assert json.loads(clean) == {"channel": "C1", "text": f"lunch at noon? ünïcödé {t}"}

    with pytest.raises(SlackApiError) as err:
        client.chat_postMessage(channel="C1", text=f"the {BLOCKED_WORD} plan {t}")
    assert err.value.response.status_code == 403 and err.value.response["ok"] is False
    assert "confidential project" in err.value.response["detail"]
    client.chat_postMessage(channel="C1", text=f"sentinel {t}")
    assert json.loads(vendor.bodies("chat.postMessage")[-1])["text"] == f"sentinel {t}"
    assert len(vendor.bodies("chat.postMessage")) == 2 and BLOCKED_WORD not in sent_texts(vendor, "chat.postMessage")

    client.chat_postMessage(channel="C1", text=f"code {MASK_WORD} {t}",
                            blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": f"*{MASK_WORD}*"}}])
    got = json.loads(vendor.bodies("chat.postMessage")[-1])
    assert got["text"] == f"code {REDACTED} {t}" and got["blocks"][0]["text"]["text"] == f"*{REDACTED}*"
    assert MASK_WORD not in json.dumps(got)


def test_slack_sdk_files_upload_v2(route):
    """files_upload_v2: getUploadURLExternal (form), the bytes POSTed to the upload_url it returned, then
    completeUploadExternal. A clean file arrives byte-identical at the upload URL; EICAR is refused there (the
    SDK's urllib upload raises HTTPError on the 403) and never arrives, and its completion is never sent."""
    from urllib.error import HTTPError
    vendor, gw = route
    client, t = slack_client(gw.ports[0]), tag()
    serve(vendor, "/api/files.completeUploadExternal", {"ok": True, "files": [{"id": "F1", "title": "numbers"}]})
    done = client.files_upload_v2(channel="C1", file=CLEAN, filename="numbers.bin", title="numbers",
                                  initial_comment=f"the numbers {t}")
    assert done["ok"] is True
    assert vendor.bodies("/upload/v1/") == [CLEAN]
    # what the SDK really sends: the raw bytes, labelled a form by urllib's default; the share as a form whose
    # `files` field is a JSON string
    [upload] = [r for r in vendor.requests if "/upload/v1/" in r.path]
    assert upload.method == "POST" and upload.headers["Content-Type"] == "application/x-www-form-urlencoded"
    [complete] = vendor.bodies("files.completeUploadExternal")
    assert f"the numbers {t}".replace(" ", "+").encode() in complete or f"the numbers {t}".encode() in complete

    with pytest.raises(HTTPError) as err:
        client.files_upload_v2(channel="C1", file=EICAR, filename="eicar.com", title="build")
    error = json.loads(err.value.read())
    assert err.value.code == 403 and error["ok"] is False and "blocked" in error["detail"]
    client.files_upload_v2(channel="C1", file=CLEAN, filename="sentinel.bin", title=f"sentinel {t}")    # sentinel
    assert vendor.bodies("/upload/v1/") == [CLEAN, CLEAN]
    assert len(vendor.bodies("files.completeUploadExternal")) == 2
    assert not any(EICAR in r.body for r in vendor.requests)

    # a blocked comment on the share: the completion is refused, the SDK raises the API's error
    from slack_sdk.errors import SlackApiError
    with pytest.raises(SlackApiError) as err:
        client.files_upload_v2(channel="C1", file=CLEAN, filename="n.bin", title="n",
                               initial_comment=f"about {BLOCKED_WORD}")
    assert err.value.response.status_code == 403 and err.value.response["ok"] is False
    assert len(vendor.bodies("files.completeUploadExternal")) == 2
    assert BLOCKED_WORD not in sent_texts(vendor, "/api/")


def test_slack_sdk_conversations_history(route):
    """The inside user reads history with auth_test then conversations_history (slack_sdk POSTs it as a form):
    the outside user's blocked message is imguard's notice, the masked one masked."""
    vendor, gw = route
    case, t, blocked, sentinel, own = inbound_history(vendor, "slack")
    client = slack_client(gw.ports[0], "xoxp-inside")
    assert client.auth_test()["user_id"] == case.inside
    history = client.conversations_history(channel="C1")
    texts = [m["text"] for m in history["messages"]]
    assert_history_notice(texts, case.outside, blocked, t, sentinel, own)


# --- Mattermost: mattermostdriver ------------------------------------------------------------------------------

def mattermost_driver(port: int, token: str = "mm-token"):
    from mattermostdriver import Driver
    serve_me = Driver({"url": "127.0.0.1", "port": port, "scheme": "http", "token": token,
                       "basepath": "/api/v4", "timeout": 15})
    return serve_me


def test_mattermostdriver_posts_and_files(route):
    """posts.create_post (JSON) and files.upload_file (multipart channel_id + files) then a post with file_ids."""
    from mattermostdriver.exceptions import NotEnoughPermissions
    vendor, gw = route
    serve(vendor, "/api/v4/users/me", {"id": "mminsider22", "username": "inside"})
    driver, t = mattermost_driver(gw.ports[0]), tag()
    driver.login()
    driver.posts.create_post({"channel_id": "ch1", "message": f"hello team {t}"})
    assert json.loads(vendor.bodies("/api/v4/posts")[-1]) == {"channel_id": "ch1", "message": f"hello team {t}"}

    with pytest.raises(NotEnoughPermissions) as err:
        driver.posts.create_post({"channel_id": "ch1", "message": f"the {BLOCKED_WORD} plan {t}"})
    assert "confidential project" in str(err.value)
    driver.posts.create_post({"channel_id": "ch1", "message": f"sentinel {t}"})
    assert json.loads(vendor.bodies("/api/v4/posts")[-1])["message"] == f"sentinel {t}"
    assert len(vendor.bodies("/api/v4/posts")) == 2 and BLOCKED_WORD not in sent_texts(vendor, "/api/v4/posts")

    driver.posts.create_post({"channel_id": "ch1", "message": f"code {MASK_WORD} {t}"})
    assert json.loads(vendor.bodies("/api/v4/posts")[-1])["message"] == f"code {REDACTED} {t}"

    serve(vendor, "/api/v4/files", {"file_infos": [{"id": "fileclean1", "name": "numbers.bin"}], "client_ids": []})
    info = driver.files.upload_file("ch1", {"files": ("numbers.bin", CLEAN)})
    [upload] = vendor.bodies("/api/v4/files")
    assert CLEAN in upload and b'name="channel_id"' in upload
    driver.posts.create_post({"channel_id": "ch1", "message": f"numbers {t}",
                              "file_ids": [info["file_infos"][0]["id"]]})
    assert json.loads(vendor.bodies("/api/v4/posts")[-1])["file_ids"] == ["fileclean1"]

    with pytest.raises(NotEnoughPermissions) as err:
        driver.files.upload_file("ch1", {"files": ("eicar.com", EICAR)})
    assert "malware" in str(err.value) or "blocked" in str(err.value)
    driver.files.upload_file("ch1", {"files": ("sentinel.bin", CLEAN)})        # the sentinel
    assert len(vendor.bodies("/api/v4/files")) == 2 and not any(EICAR in r.body for r in vendor.requests)


def test_mattermostdriver_channel_posts(route):
    vendor, gw = route
    case, t, blocked, sentinel, own = inbound_history(vendor, "mattermost")
    driver = mattermost_driver(gw.ports[0], "mm-inside")
    driver.login()
    assert driver.client.userid == case.inside
    posts = driver.posts.get_posts_for_channel("ch1")
    texts = [posts["posts"][k]["message"] for k in posts["order"]]
    assert_history_notice(texts, case.outside, blocked, t, sentinel, own)


# --- Rocket.Chat: rocketchat_API ------------------------------------------------------------------------------

def rocket(port: int, user_id: str = "rc-user-1"):
    from rocketchat_API.rocketchat import RocketChat
    return RocketChat(user_id=user_id, auth_token="rc-token", server_url=f"http://127.0.0.1:{port}", timeout=15)


def test_rocketchat_api_messages(route):
    from rocketchat_API.APIExceptions.RocketExceptions import RocketApiException
    vendor, gw = route
    rc, t = rocket(gw.ports[0]), tag()
    assert rc.chat_post_message(f"hello {t}", room_id="GENERAL")["success"] is True
    assert json.loads(vendor.bodies("chat.postMessage")[-1]) == {"roomId": "GENERAL", "text": f"hello {t}"}

    with pytest.raises(RocketApiException) as err:
        rc.chat_post_message(f"the {BLOCKED_WORD} plan {t}", room_id="GENERAL")
    assert "confidential project" in err.value.response_json["error"]
    rc.chat_post_message(f"sentinel {t}", room_id="GENERAL")
    assert json.loads(vendor.bodies("chat.postMessage")[-1])["text"] == f"sentinel {t}"
    assert len(vendor.bodies("chat.postMessage")) == 2 and BLOCKED_WORD not in sent_texts(vendor, "chat.")

    rc.chat_post_message(f"code {MASK_WORD} {t}", room_id="GENERAL")
    assert json.loads(vendor.bodies("chat.postMessage")[-1])["text"] == f"code {REDACTED} {t}"
    rc.chat_send_message({"rid": "GENERAL", "msg": f"x {MASK_WORD}"})
    assert json.loads(vendor.bodies("chat.sendMessage")[-1])["message"]["msg"] == f"x {REDACTED}"


def test_rocketchat_api_rooms_media_upload(route):
    """rooms_media (multipart `file`) then rooms_media_confirm (the message naming the file id): a clean file
    arrives byte-identical, EICAR is refused with Rocket.Chat's error and never arrives."""
    from rocketchat_API.APIExceptions.RocketExceptions import RocketApiException
    vendor, gw = route
    rc, t = rocket(gw.ports[0]), tag()
    serve(vendor, "/api/v1/rooms.media/GENERAL", {"success": True, "file": {"_id": "fileid1", "url": "/f"}})
    up = rc.rooms_media("GENERAL", ("numbers.bin", io.BytesIO(CLEAN), "application/octet-stream"))
    [sent] = vendor.bodies("rooms.media/")
    assert CLEAN in sent
    rc.rooms_media_confirm("GENERAL", up["file"]["_id"], msg=f"numbers {MASK_WORD} {t}")
    assert json.loads(vendor.bodies("rooms.mediaConfirm")[-1])["msg"] == f"numbers {REDACTED} {t}"

    with pytest.raises(RocketApiException) as err:
        rc.rooms_media("GENERAL", ("eicar.com", io.BytesIO(EICAR), "application/octet-stream"))
    assert err.value.response_json["success"] is False and "blocked" in err.value.response_json["error"]
    rc.rooms_media("GENERAL", ("sentinel.bin", io.BytesIO(CLEAN), "application/octet-stream"))
    assert len(vendor.bodies("rooms.media/")) == 2 and not any(EICAR in r.body for r in vendor.requests)


def test_rocketchat_api_channels_history(route):
    vendor, gw = route
    case, t, blocked, sentinel, own = inbound_history(vendor, "rocketchat")
    history = list(rocket(gw.ports[0], case.inside).channels_history("GENERAL"))      # the SDK pages: a generator
    assert vendor.requests[-1].path == "/api/v1/channels.history?roomId=GENERAL&offset=0&count=50"
    assert_history_notice([m["msg"] for m in history], case.outside, blocked, t, sentinel, own)


# --- Discord: discord.py --------------------------------------------------------------------------------------

WEBHOOK_ID, WEBHOOK_TOKEN = 112233445566778899, "w" * 68


@pytest.fixture
def discord_base(route, monkeypatch):
    """discord.py has no base-URL option: its Route.BASE (class attribute) points at the gateway instead."""
    from discord.http import Route
    vendor, gw = route
    monkeypatch.setattr(Route, "BASE", f"http://127.0.0.1:{gw.ports[0]}/api/v10")
    return vendor, gw


def test_discord_py_webhook(discord_base):
    """SyncWebhook.send (requests): JSON for a message, multipart payload_json + files[0] with a discord.File."""
    from discord import File, Forbidden, SyncWebhook
    vendor, gw = discord_base
    hook, t = SyncWebhook.partial(WEBHOOK_ID, WEBHOOK_TOKEN), tag()
    path = f"/webhooks/{WEBHOOK_ID}/"
    hook.send(f"build ready {t}")
    assert json.loads(vendor.bodies(path)[-1])["content"] == f"build ready {t}"

    with pytest.raises(Forbidden) as err:
        hook.send(f"the {BLOCKED_WORD} plan {t}")
    assert err.value.status == 403 and "confidential project" in err.value.text
    hook.send(f"sentinel {t}")
    assert json.loads(vendor.bodies(path)[-1])["content"] == f"sentinel {t}"
    assert len(vendor.bodies(path)) == 2 and BLOCKED_WORD not in sent_texts(vendor, path)

    hook.send(f"code {MASK_WORD} {t}")
    assert json.loads(vendor.bodies(path)[-1])["content"] == f"code {REDACTED} {t}"

    since = gw.mark()
    hook.send(f"numbers {t}", file=File(io.BytesIO(CLEAN), "numbers.bin"))
    assert CLEAN in vendor.bodies(path)[-1] and b'name="payload_json"' in vendor.bodies(path)[-1]
    assert vendor.requests[-1].headers["Content-Type"].startswith("multipart/form-data; boundary=")
    with pytest.raises(Forbidden) as err:
        hook.send("the build", file=File(io.BytesIO(EICAR), "eicar.com"))
    assert err.value.code == 200000 and "blocked" in err.value.text
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.file"
                                      and e.get("event", {}).get("action") == "block", since))
    assert alert["network"]["protocol"] == "discord" and alert["source"]["user"]["name"] == f"webhook:{WEBHOOK_ID}"
    assert WEBHOOK_TOKEN not in json.dumps(gw.alerts()), "the webhook's token was recorded"
    hook.send(f"sentinel file {t}", file=File(io.BytesIO(CLEAN), "sentinel.bin"))
    assert len(vendor.bodies(path)) == 5 and not any(EICAR in r.body for r in vendor.requests)


def test_discord_py_http_client_channel(discord_base):
    """discord.py's HTTPClient (aiohttp): static_login, send_message with and without a discord.File, logs_from
    for the inbound history."""
    from discord import File, Forbidden
    from discord.http import HTTPClient, handle_message_parameters
    vendor, gw = discord_base
    case, t, blocked, sentinel, own = inbound_history(vendor, "discord")

    async def scenario():
        http = HTTPClient(asyncio.get_running_loop())
        try:
            assert (await http.static_login("discord-inside"))["id"] == case.inside
            path = "/api/v10/channels/42/messages"

            async def send(content, file=None):
                with handle_message_parameters(content=content, file=file or discord.utils.MISSING) as params:
                    return await http.send_message(42, params=params)
            await send(f"hello {t}")
            assert json.loads(vendor.bodies(path)[-1])["content"] == f"hello {t}"
            with pytest.raises(Forbidden):
                await send(f"the {BLOCKED_WORD} plan {t}")
            await send(f"code {MASK_WORD} {t}")
            assert json.loads(vendor.bodies(path)[-1])["content"] == f"code {REDACTED} {t}"
            await send(f"numbers {t}", File(io.BytesIO(CLEAN), "numbers.bin"))
            assert CLEAN in vendor.bodies(path)[-1]
            with pytest.raises(Forbidden) as err:
                await send("build", File(io.BytesIO(EICAR), "eicar.com"))
            assert err.value.code == 200000
            await send(f"sentinel {t}")
            assert json.loads(vendor.bodies(path)[-1])["content"] == f"sentinel {t}"
            assert len(vendor.bodies(path)) == 4 and not any(EICAR in r.body for r in vendor.requests)
            assert BLOCKED_WORD not in sent_texts(vendor, path)
            history = await http.logs_from(42, 50)
            assert_history_notice([m["content"] for m in history], case.outside, blocked, t, sentinel, own)
        finally:
            await http.close()
    asyncio.run(scenario())


# --- Microsoft Teams over Microsoft Graph: msgraph-sdk ----------------------------------------------------------

CHAT = "19:inside-outside@unq.gbl.spaces"


def graph_client(port: int, token: str = "graph-token"):
    """msgraph-sdk's GraphServiceClient on a request adapter whose base URL is the gateway, with a static bearer
    token (kiota's BaseBearerTokenAuthenticationProvider; azure-identity is for the real login)."""
    from kiota_abstractions.authentication import (AccessTokenProvider, AllowedHostsValidator,
                                                   BaseBearerTokenAuthenticationProvider)
    from msgraph import GraphRequestAdapter, GraphServiceClient

    class StaticToken(AccessTokenProvider):
        async def get_authorization_token(self, uri, additional_authentication_context=None) -> str:
            return token

        def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
            return AllowedHostsValidator([])

    adapter = GraphRequestAdapter(BaseBearerTokenAuthenticationProvider(StaticToken()))
    adapter.base_url = f"http://127.0.0.1:{port}/v1.0"
    return GraphServiceClient(request_adapter=adapter)


def graph_message(text: str):
    from msgraph.generated.models.body_type import BodyType
    from msgraph.generated.models.chat_message import ChatMessage
    from msgraph.generated.models.item_body import ItemBody
    return ChatMessage(body=ItemBody(content=f"<p>{text}</p>", content_type=BodyType.Html))


def test_msgraph_teams_chat_messages(route):
    """chats/{id}/messages.post (JSON chatMessage, HTML body): clean arrives as sent, blocked raises the SDK's
    ODataError with Graph's error and never arrives (the sentinel after it arrives alone), masked arrives masked."""
    from msgraph.generated.models.o_data_errors.o_data_error import ODataError
    vendor, gw = route
    client, t = graph_client(gw.ports[0]), tag()
    messages = client.chats.by_chat_id(CHAT).messages
    path = "/v1.0/chats/"

    async def scenario():
        await messages.post(graph_message(f"lunch at noon? ünïcödé {t}"))
        sent = json.loads(vendor.bodies(path)[-1])
        assert sent["body"] == {"contentType": "html", "content": f"<p>lunch at noon? ünïcödé {t}</p>"}, sent
        with pytest.raises(ODataError) as err:
            await messages.post(graph_message(f"the {BLOCKED_WORD} plan {t}"))
        assert err.value.response_status_code == 403 and err.value.error.code == "accessDenied"
        assert "confidential project" in err.value.error.message
        await messages.post(graph_message(f"sentinel {t}"))
        assert json.loads(vendor.bodies(path)[-1])["body"]["content"] == f"<p>sentinel {t}</p>"
        assert len(vendor.bodies(path)) == 2 and BLOCKED_WORD not in sent_texts(vendor, path)
        await messages.post(graph_message(f"code {MASK_WORD} {t}"))
        assert json.loads(vendor.bodies(path)[-1])["body"]["content"] == f"<p>code {REDACTED} {t}</p>"
    since = gw.mark()
    asyncio.run(scenario())
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block", since))
    assert alert["network"]["protocol"] == "teams" and alert["destination"]["user"]["name"] == [CHAT]


def upload_session(vendor, gw) -> str:
    """The stand-in's answer to the next createUploadSession: a fresh uploadUrl, through the gateway."""
    url = f"http://127.0.0.1:{gw.ports[0]}/upload-session/{tag()}"
    serve(vendor, "/v1.0/drives/drive1/items/root:/numbers.bin:/createUploadSession",       # aiohttp's decoded path
          {"uploadUrl": url, "expirationDateTime": "2099-01-01T00:00:00Z", "nextExpectedRanges": ["0-"]})
    return url


def test_msgraph_onedrive_upload_sessions(route):
    """createUploadSession then msgraph-core's LargeFileUploadTask PUTting the bytes (Content-Range) to the
    session's uploadUrl: a clean file arrives byte-identical, EICAR is refused (the SDK raises) and never arrives;
    a file larger than the task's chunk is refused at its first chunk (a chunk alone cannot be scanned). The small
    upload (PUT .../content) likewise."""
    from kiota_abstractions.api_error import APIError
    from msgraph.generated.drives.item.items.item.create_upload_session.create_upload_session_post_request_body \
        import CreateUploadSessionPostRequestBody
    from msgraph.generated.models.drive_item_uploadable_properties import DriveItemUploadableProperties
    from msgraph_core.tasks.large_file_upload import LargeFileUploadTask
    vendor, gw = route
    client = graph_client(gw.ports[0])
    item = client.drives.by_drive_id("drive1").items.by_drive_item_id("root:/numbers.bin:")

    async def upload(data: bytes, chunk: int = 5 * 1024 * 1024):
        body = CreateUploadSessionPostRequestBody(item=DriveItemUploadableProperties(
            additional_data={"@microsoft.graph.conflictBehavior": "replace"}))
        session = await item.create_upload_session.post(body)
        return await LargeFileUploadTask(session, client.request_adapter, io.BytesIO(data), max_chunk_size=chunk)\
            .upload()

    async def scenario():
        url = upload_session(vendor, gw)
        await upload(CLEAN)
        put = [r for r in vendor.requests if r.path == url.split(str(gw.ports[0]), 1)[1]]
        # msgraph-core's task PUTs a one-chunk file twice: next_chunk with the bytes, then last_chunk with the same
        # Content-Range and an empty body (its stream already read)
        assert [r.body for r in put] == [CLEAN, b""], [len(r.body) for r in put]
        assert put[0].method == "PUT" and put[0].headers["Content-Range"] == f"bytes 0-{len(CLEAN) - 1}/{len(CLEAN)}"

        url = upload_session(vendor, gw)
        with pytest.raises(APIError) as err:
            await upload(EICAR)
        assert err.value.response_status_code == 403
        url = upload_session(vendor, gw)
        with pytest.raises(APIError) as err:
            await upload(CLEAN, chunk=1024)         # 8 chunks: the first is refused, nothing arrives
        assert err.value.response_status_code == 413
        assert not [r for r in vendor.requests if r.path == url.split(str(gw.ports[0]), 1)[1]]
        upload_session(vendor, gw)
        await upload(CLEAN)                         # the sentinel
        assert not any(EICAR in r.body for r in vendor.requests)

        content = client.drives.by_drive_id("drive1").items.by_drive_item_id("root:/notes.txt:").content
        await content.put(CLEAN)
        assert vendor.requests[-1].method == "PUT" and vendor.requests[-1].body == CLEAN
        with pytest.raises(APIError) as err:
            await client.drives.by_drive_id("drive1").items.by_drive_item_id("root:/eicar.com:").content.put(EICAR)
        assert err.value.response_status_code == 403
        await content.put(CLEAN)                    # the sentinel
        assert not any(EICAR in r.body for r in vendor.requests)
    since = gw.mark()
    asyncio.run(scenario())
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.file"
                                      and e.get("event", {}).get("action") == "block", since))
    assert alert["network"]["protocol"] == "teams"


def test_msgraph_teams_chat_history(route):
    """The inside user (me.get teaches the gateway who the token is) reads a chat's messages: the outside user's
    blocked one is imguard's notice, the masked one masked, the sentinel and the user's own message untouched."""
    vendor, gw = route
    outside, inside = "8f0c-outside", "2b7e-inside"
    t = tag()
    blocked, masked = f"the {BLOCKED_WORD} launch {t}", f"code {MASK_WORD} {t}"
    sentinel, own = f"sentinel {t}", f"my own {BLOCKED_WORD} note {t}"
    serve(vendor, "/v1.0/me", {"id": inside, "displayName": "Inside"})
    serve(vendor, f"/v1.0/chats/{CHAT}/messages", {"value": [
        {"id": str(1700 + i), "chatId": CHAT, "messageType": "message", "body": {"contentType": "text",
                                                                                 "content": text},
         "from": {"user": {"id": who, "displayName": who}}, "attachments": [], "mentions": []}
        for i, (who, text) in enumerate([(outside, blocked), (outside, masked), (outside, sentinel), (inside, own)])]})
    client = graph_client(gw.ports[0], "graph-inside")

    async def scenario():
        assert (await client.me.get()).id == inside
        page = await client.chats.by_chat_id(CHAT).messages.get()
        return [m.body.content for m in page.value]
    since = gw.mark()
    texts = asyncio.run(scenario())
    assert_history_notice(texts, outside, blocked, t, sentinel, own)
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block", since))
    assert alert["network"]["protocol"] == "teams" and alert["source"]["user"]["name"] == outside
    assert inside in alert["destination"]["user"]["name"]


def test_teams_decoder_shapes():
    """teams.py, pure: what classify holds, the file name of a path-addressed item (plain or as msgraph-sdk
    encodes it), an upload-session PUT decided whole or refused as a chunk, broken JSON a MalformedRequest."""
    from imguard.protocols.httpchat import HttpRequest, teams
    from imguard.protocols.httpchat.events import FileUpload, MalformedRequest
    assert teams.classify("POST", "/v1.0/chats/19%3Aa%40b/messages").name == "message"
    assert teams.classify("POST", "/v1.0/teams/t1/channels/c1/messages/m1/replies").name == "message"
    assert teams.classify("PATCH", "/beta/chats/c/messages/m1").name == "message"
    assert teams.classify("GET", "/v1.0/teams/t1/channels/c1/messages/m1/replies").name == "messages"
    assert teams.classify("GET", "/v1.0/me/drive/root/children") is None
    assert teams.classify("DELETE", "/v1.0/chats/c/messages/m1") is None
    for path, name in (("/v1.0/me/drive/root:/reports/q3.xlsx:/content", "q3.xlsx"),
                       ("/v1.0/drives/d1/items/root%3A%2Fnumbers.bin%3A/createUploadSession", "numbers.bin"),
                       ("/v1.0/sites/s1/drive/items/01ABC:/a%20b.txt:/content", "a b.txt"),
                       ("/v1.0/drives/d1/items/01ABC/content", "")):
        assert teams.item_name(path) == name, path
    slot = teams.upload_endpoint()

    def put(body: bytes, crange: str) -> list:
        return teams.decode(slot, HttpRequest("PUT", "h", "/s", headers=(("content-range", crange),), body=body))
    [whole] = put(b"abc", "bytes 0-2/3")
    assert isinstance(whole, FileUpload) and whole.data == b"abc"
    for body, crange in ((b"ab", "bytes 0-1/3"), (b"c", "bytes 2-2/3"), (b"abc", "bytes 0-2/*"), (b"abc", "")):
        [refused] = put(body, crange)
        assert isinstance(refused, MalformedRequest), (crange, refused)
    ep = teams.classify("POST", "/v1.0/chats/c1/messages")
    [bad] = teams.decode(ep, HttpRequest("POST", "h", "/v1.0/chats/c1/messages",
                                         headers=(("content-type", "application/json"),), body=b"{nope"))
    assert isinstance(bad, MalformedRequest)
