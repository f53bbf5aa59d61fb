"""Slack, Mattermost, Rocket.Chat and Discord through the real `imguard run`: their documented request shapes are
replayed through the gateway (reverse proxy) to a local HTTP server standing in for the vendor, and the test
asserts what that server received: nothing for a block, the masked text for a mask, the same bytes otherwise.
The bad-input cases (malformed JSON, hostile nesting, broken multipart, lying Content-Length, oversize bodies)
check the client's error and that nothing uninspected was forwarded.

Inbound, the stand-in serves each vendor's documented history and file-download responses (the outside user is
whoever it says wrote or shared them) and the test reads what the inside client gets through the gateway: the
notice in place of a blocked message, a masked one masked, the API's error instead of an EICAR download (plain and
zipped), a clean file byte-identical; alerts and archive rows name both parties, inbound. The same for what the
servers push over their WebSockets (Slack RTM and Socket Mode, Mattermost, Rocket.Chat DDP, Discord's gateway with
and without compress=zlib-stream, read by the client with one zlib inflater as Discord's clients do), and what the
client posts over Slack RTM. The calls here are written by hand (with the bad input no library sends);
tests/test_httpchat_sdk.py makes them with the vendors' own client libraries against the same stand-in."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from tests.peers.http_gateway import HttpGateway

pytestmark = pytest.mark.timeout(120)

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
CLEAN = b"quarterly numbers, nothing secret\n" * 200 + bytes(range(256)) * 4
BLOCKED_WORD = "project-bluebird"          # tests/data/rules: a keyword block rule
MASK_WORD = "zebra-omega"                  # the mask rule below
MASK_RULE = f"""\
rules:
  - id: test-codeword-mask
    title: Test codeword redaction
    severity: medium
    action: mask
    applies_to: message
    match:
      keywords: [{MASK_WORD}]
"""
UPLOAD_LIMIT = 300_000
DELIVERY_LIMIT = 2_000_000
RC_INSIDE = "rc-inside-user"
BOUNDARY = "----imguardTestBoundary"


@dataclass
class Received:
    method: str
    path: str
    headers: dict
    body: bytes


@dataclass
class Vendor:
    """The stand-in server: records every request and WebSocket message, answers with canned JSON."""
    port: int = 0
    gateway_port: int = 0
    requests: list[Received] = field(default_factory=list)
    ws_messages: list[str] = field(default_factory=list)
    served: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)    # path -> (status, type, body)
    ws_push: list[str] = field(default_factory=list)       # server frames sent when a client subscribes (DDP sub)
    ws_script: object = None        # async (ws, request): plays the server's side of a socket (Slack, Mattermost,
                                    # Discord); None: the Rocket.Chat DDP stand-in below
    loop: asyncio.AbstractEventLoop | None = None
    runner: web.AppRunner | None = None

    def bodies(self, path_part: str) -> list[bytes]:
        return [r.body for r in self.requests if path_part in r.path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            if self.ws_script is not None:
                await self.ws_script(ws, request)
                return ws
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.ws_messages.append(msg.data)
                    frame = json.loads(msg.data) if msg.data.startswith("{") else {}
                    if frame.get("method") == "login":          # DDP login: the result names the user
                        await ws.send_str(json.dumps({"msg": "result", "id": frame.get("id"),
                                                      "result": {"id": RC_INSIDE, "token": "resume-token"}}))
                    elif frame.get("msg") == "sub":             # the room's stream: the queued messages
                        for push in self.ws_push:
                            await ws.send_str(push)
                    else:
                        await ws.send_str(json.dumps({"msg": "result", "echo": msg.data}))
            return ws
        body = await request.read()
        self.requests.append(Received(request.method, request.path_qs, dict(request.headers), body))
        if request.path in self.served:
            status, ctype, data = self.served[request.path]
            return web.Response(status=status, body=data, content_type=ctype)
        if request.path == "/api/files.getUploadURLExternal":
            n = uuid.uuid4().hex[:8]
            return web.json_response({"ok": True, "file_id": f"F{n}",
                                      "upload_url": f"http://127.0.0.1:{self.gateway_port}/upload/v1/{n}"})
        if request.path.endswith("/attachments"):
            n = uuid.uuid4().hex[:8]
            return web.json_response({"attachments": [{"id": 0, "upload_filename": f"{n}/a.bin",
                                                       "upload_url": f"http://127.0.0.1:{self.gateway_port}/gcs/{n}?sig=1"}]})
        return web.json_response({"ok": True, "success": True})

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self.handle)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
        threading.Thread(target=run, daemon=True).start()
        assert ready.wait(10)

    def stop(self) -> None:
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def vendor_gateway(tmp_path_factory):
    vendor = Vendor()
    vendor.start()
    gw = HttpGateway.start(tmp_path_factory.mktemp("httpchat-gw"), [f"http://127.0.0.1:{vendor.port}"],
                           extra_rules={"95-test-mask.yaml": MASK_RULE},
                           extra=["--chat-max-upload-size", str(UPLOAD_LIMIT), "--chat-max-json-depth", "32",
                                  "--chat-max-delivery-size", str(DELIVERY_LIMIT)])
    vendor.gateway_port = gw.ports[0]
    try:
        yield vendor, gw
    finally:
        status = gw.stop()
        vendor.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


@pytest.fixture
def route(vendor_gateway):
    vendor, gw = vendor_gateway
    vendor.requests.clear()
    vendor.ws_messages.clear()
    vendor.served.clear()
    vendor.ws_push.clear()
    vendor.ws_script = None
    offset = gw.log_size()
    yield vendor, gw
    assert not gw.crashed, gw.logs()
    errors = gw.errors_since(offset)
    assert not errors, "imguard logged errors:\n" + "\n".join(errors)


def call(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request over a fresh socket; (status, headers, body)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def call_json(port, method, path, obj, headers=None):
    status, h, body = call(port, method, path, json.dumps(obj).encode(),
                           {"Content-Type": "application/json", **(headers or {})})
    return status, (json.loads(body) if body[:1] in (b"{", b"[") else body)


def multipart(fields: list[tuple[str, str | None, str, bytes]], close: bool = True) -> bytes:
    out = b""
    for name, filename, ctype, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\n".encode()
        out += (f"Content-Type: {ctype}\r\n" if ctype else "").encode() + b"\r\n" + data + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


MP = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
SLACK = {"Authorization": "Bearer xoxb-test-token"}


# --- Slack --------------------------------------------------------------------------------------------------

def test_slack_post_message_allowed_blocked_and_masked(route):
    """chat.postMessage (JSON and form-encoded): a clean message arrives byte-identical; the blocked keyword
    gets Slack's error shape and never arrives; the mask word arrives redacted, the rest of the body intact."""
    vendor, gw = route
    port = gw.ports[0]
    clean = json.dumps({"channel": "C1", "text": "lunch at noon? ünïcödé", "unfurl_links": False}).encode()
    status, _, _ = call(port, "POST", "/api/chat.postMessage", clean, {**SLACK, "Content-Type": "application/json"})
    assert status == 200 and vendor.bodies("chat.postMessage") == [clean]

    since = gw.mark()
    status, err = call_json(port, "POST", "/api/chat.postMessage",
                            {"channel": "C1", "text": f"the {BLOCKED_WORD} plan"}, SLACK)
    assert status == 403 and err["ok"] is False and "confidential project" in err["detail"]
    assert len(vendor.bodies("chat.postMessage")) == 1, "the blocked message reached the server"
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block"
                                      and BLOCKED_WORD in json.dumps(e), since))
    assert alert and alert["network"]["protocol"] == "slack" and alert["destination"]["user"]["name"] == ["C1"]

    status, _ = call_json(port, "POST", "/api/chat.postMessage",
                          {"channel": "C1", "text": f"code {MASK_WORD} now",
                           "blocks": [{"type": "section",
                                       "text": {"type": "mrkdwn", "text": f"*{MASK_WORD}*"}}]}, SLACK)
    assert status == 200
    got = json.loads(vendor.bodies("chat.postMessage")[-1])
    assert MASK_WORD not in json.dumps(got) and "[REDACTED:keyword]" in got["text"]
    assert got["blocks"][0]["type"] == "section" and "[REDACTED:keyword]" in got["blocks"][0]["text"]["text"]

    form = f"channel=C2&text=form+{MASK_WORD}+text".encode()
    status, _, _ = call(port, "POST", "/api/chat.postMessage", form,
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert vendor.bodies("chat.postMessage")[-1] == b"channel=C2&text=form+%5BREDACTED%3Akeyword%5D+text"


def test_slack_two_step_upload(route):
    """getUploadURLExternal -> the upload URL (learned from the response) -> completeUploadExternal: EICAR posted
    to the upload URL is refused and never arrives, and sharing its file id is refused too; a clean file arrives
    byte-identical and its share passes."""
    vendor, gw = route
    port = gw.ports[0]
    form = {"Content-Type": "application/x-www-form-urlencoded", **SLACK}
    for data, blocked in ((EICAR, True), (CLEAN, False)):
        status, _, body = call(port, "POST", "/api/files.getUploadURLExternal",
                               f"filename=f.bin&length={len(data)}".encode(), form)
        slot = json.loads(body)
        path = slot["upload_url"].split(str(port), 1)[1]
        status, _, body = call(port, "POST", path, data, {"Content-Type": "application/octet-stream"})
        assert status == (403 if blocked else 200), body
        assert vendor.bodies(path) == ([] if blocked else [data])
        status, resp = call_json(port, "POST", "/api/files.completeUploadExternal",
                                 {"files": [{"id": slot["file_id"], "title": "numbers"}], "channel_id": "C1"}, SLACK)
        assert status == (403 if blocked else 200), resp
        if blocked:
            assert resp["ok"] is False and "blocked" in resp["detail"]
    assert len(vendor.bodies("files.completeUploadExternal")) == 1


def test_slack_legacy_files_upload_multipart(route):
    vendor, gw = route
    status, err = call_json(gw.ports[0], "POST", "/api/files.upload", {})      # no file at all: 400, not forwarded
    assert status == 400 and err["ok"] is False
    body = multipart([("channels", None, "", b"C1"), ("file", "eicar.com", "application/octet-stream", EICAR)])
    status, _, resp = call(gw.ports[0], "POST", "/api/files.upload", body, {**MP, **SLACK})
    assert status == 403 and json.loads(resp)["ok"] is False
    assert vendor.bodies("files.upload") == []


# --- Mattermost -----------------------------------------------------------------------------------------------

def test_mattermost_files_and_posts(route):
    vendor, gw = route
    port = gw.ports[0]
    auth = {"Authorization": "Bearer mm-token"}
    bad = multipart([("channel_id", None, "", b"ch1"), ("files", "eicar.com", "", EICAR),
                     ("client_ids", None, "", b"c")])
    status, _, resp = call(port, "POST", "/api/v4/files", bad, {**MP, **auth})
    assert status == 403 and json.loads(resp)["status_code"] == 403 and "malware" in json.loads(resp)["message"]
    good = multipart([("channel_id", None, "", b"ch1"), ("files", "n.bin", "", CLEAN), ("client_ids", None, "", b"c")])
    status, _, _ = call(port, "POST", "/api/v4/files", good, {**MP, **auth})
    assert status == 200 and vendor.bodies("/api/v4/files") == [good]
    status, _, _ = call(port, "POST", "/api/v4/files?channel_id=ch1&filename=e.com", EICAR, auth)
    assert status == 403 and vendor.bodies("/api/v4/files") == [good]
    post = json.dumps({"channel_id": "ch1", "message": "hello team", "file_ids": ["abc"]}).encode()
    status, _, _ = call(port, "POST", "/api/v4/posts", post, {"Content-Type": "application/json", **auth})
    assert status == 200 and vendor.bodies("/api/v4/posts") == [post]
    status, resp = call_json(port, "POST", "/api/v4/posts", {"channel_id": "ch1", "message": BLOCKED_WORD}, auth)
    assert status == 403 and resp["id"].startswith("api.imguard") and len(vendor.bodies("/api/v4/posts")) == 1
    # not a chat call: relayed untouched, never held
    status, _, _ = call(port, "GET", "/api/v4/users/me", b"", auth)
    assert status == 200 and vendor.requests[-1].path == "/api/v4/users/me"


# --- Rocket.Chat --------------------------------------------------------------------------------------------

def test_rocketchat_upload_and_messages(route):
    vendor, gw = route
    port = gw.ports[0]
    user = {"X-User-Id": "rc-user-1", "X-Auth-Token": "t"}
    body = multipart([("file", "notes.txt", "text/plain", b"fine notes"),
                      ("msg", None, "", f"about {BLOCKED_WORD}".encode())])
    status, _, resp = call(port, "POST", "/api/v1/rooms.upload/GENERAL", body, {**MP, **user})
    assert status == 403 and json.loads(resp)["success"] is False and vendor.bodies("rooms.upload") == []
    body = multipart([("file", "notes.txt", "text/plain", b"fine notes"),
                      ("msg", None, "", f"see {MASK_WORD}".encode())])
    status, _, _ = call(port, "POST", "/api/v1/rooms.upload/GENERAL", body, {**MP, **user})
    assert status == 200
    [sent] = vendor.bodies("rooms.upload")
    assert b"fine notes" in sent and MASK_WORD.encode() not in sent and b"see [REDACTED:keyword]" in sent
    status, _ = call_json(port, "POST", "/api/v1/chat.sendMessage",
                          {"message": {"rid": "R1", "msg": f"x {MASK_WORD}"}}, user)
    assert status == 200 and json.loads(vendor.bodies("chat.sendMessage")[-1]) == {
        "message": {"rid": "R1", "msg": "x [REDACTED:keyword]"}}
    since = gw.mark()
    status, _ = call_json(port, "POST", "/api/v1/chat.postMessage", {"channel": "#general", "text": BLOCKED_WORD}, user)
    assert status == 403 and vendor.bodies("chat.postMessage") == []
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block", since))
    assert alert["source"]["user"]["name"] == "rc-user-1"


def test_rocketchat_ddp_websocket(route):
    """DDP over the WebSocket: a clean sendMessage arrives; a blocked one is dropped and the client's call gets a
    DDP error result; a masked one arrives redacted."""
    vendor, gw = route

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{gw.ports[0]}/websocket") as ws:
                def ddp(i, text):
                    return json.dumps({"msg": "method", "method": "sendMessage", "id": str(i),
                                       "params": [{"_id": f"m{i}", "rid": "R1", "msg": text}]})
                await ws.send_str(ddp(1, "hello over ddp"))
                assert json.loads((await ws.receive(timeout=10)).data)["echo"] == ddp(1, "hello over ddp")
                await ws.send_str(ddp(2, f"{BLOCKED_WORD} over ddp"))
                reply = json.loads((await ws.receive(timeout=10)).data)
                assert reply["msg"] == "result" and reply["id"] == "2" and "confidential" in reply["error"]["reason"]
                await ws.send_str(ddp(3, f"{MASK_WORD} over ddp"))
                masked = json.loads(json.loads((await ws.receive(timeout=10)).data)["echo"])
                assert masked["params"][0]["msg"] == "[REDACTED:keyword] over ddp"
        assert len(vendor.ws_messages) == 2 and not any(BLOCKED_WORD in m for m in vendor.ws_messages)
    asyncio.run(scenario())


# --- Discord --------------------------------------------------------------------------------------------------

def test_discord_messages_and_attachments(route):
    vendor, gw = route
    port = gw.ports[0]
    bot = {"Authorization": "Bot discord-bot-token"}
    payload = json.dumps({"content": "build attached", "attachments": [{"id": 0, "filename": "e.com"}]}).encode()
    body = multipart([("payload_json", None, "application/json", payload), ("files[0]", "e.com", "", EICAR)])
    status, _, resp = call(port, "POST", "/api/v10/channels/42/messages", body, {**MP, **bot})
    assert status == 403 and json.loads(resp)["code"] == 200000 and vendor.bodies("/messages") == []
    payload = json.dumps({"content": f"fine {MASK_WORD}"}).encode()
    body = multipart([("payload_json", None, "application/json", payload), ("files[0]", "n.bin", "", CLEAN)])
    status, _, _ = call(port, "POST", "/api/v10/channels/42/messages", body, {**MP, **bot})
    assert status == 200
    [sent] = vendor.bodies("/messages")
    assert CLEAN in sent and MASK_WORD.encode() not in sent and b"[REDACTED:keyword]" in sent
    # two-step: the attachment upload URL comes from the response; EICAR there is refused, and the message
    # naming its uploaded_filename too
    status, _, resp = call(port, "POST", "/api/v10/channels/42/attachments",
                           json.dumps({"files": [{"id": "0", "filename": "a.bin", "file_size": 68}]}).encode(),
                           {"Content-Type": "application/json", **bot})
    att = json.loads(resp)["attachments"][0]
    path = att["upload_url"].split(str(port), 1)[1]
    status, _, _ = call(port, "PUT", path, EICAR, {"Content-Type": "application/octet-stream"})
    assert status == 403 and vendor.bodies("/gcs/") == []
    status, resp = call_json(port, "POST", "/api/v10/channels/42/messages",
                             {"content": "", "attachments": [{"id": "0", "filename": "a.bin",
                                                               "uploaded_filename": att["upload_filename"]}]}, bot)
    assert status == 403 and "blocked" in resp["message"] and len(vendor.bodies("/messages")) == 1


# --- bad input ----------------------------------------------------------------------------------------------

def raw_exchange(port: int, data: bytes, half_close: bool = False, wait: float = 10.0) -> bytes:
    """Send raw bytes, optionally half-close, and read until the gateway closes or `wait` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and not half_close:
                head, _, rest = out.partition(b"\r\n\r\n")
                length = [int(header.split(b":")[1]) for header in head.split(b"\r\n")
                          if header.lower().startswith(b"content-length")]
                if length and len(rest) >= length[0]:
                    break
        return out


def test_malformed_json_and_hostile_nesting_are_refused(route):
    vendor, gw = route
    port = gw.ports[0]
    status, _, resp = call(port, "POST", "/api/v4/posts", b'{"channel_id": "c", "message": "unterminated',
                           {"Content-Type": "application/json"})
    assert status == 400 and json.loads(resp)["status_code"] == 400
    deep = b'{"channel_id":"c","message":"x","props":' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, resp = call(port, "POST", "/api/v4/posts", deep, {"Content-Type": "application/json"})
    assert status == 400 and "nested deeper than 32" in json.loads(resp)["message"]
    status, _, resp = call(port, "PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1", b"not json",
                           {"Content-Type": "application/json"})
    assert status == 400 and json.loads(resp)["errcode"] == "M_BAD_JSON"
    assert vendor.requests == []


def test_broken_multipart_and_truncated_upload_are_refused(route):
    vendor, gw = route
    port = gw.ports[0]
    body = multipart([("file", "a.bin", "", CLEAN)])
    status, _, resp = call(port, "POST", "/api/v1/rooms.upload/R", body[:-30], MP)          # no closing boundary
    assert status == 400 and "closing boundary" in json.loads(resp)["error"]
    status, _, resp = call(port, "POST", "/api/v1/rooms.upload/R", body,
                           {"Content-Type": "multipart/form-data; boundary=not-the-one"})
    assert status == 400
    assert vendor.requests == []


def test_lying_content_length_and_upload_cut_half_way_forward_nothing(route):
    """A body shorter than its Content-Length (the client stops half-way and closes its side) is never
    forwarded; the gateway records an anomaly."""
    vendor, gw = route
    since = gw.mark()
    head = (f"POST /api/v4/files?channel_id=c&filename=x.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {len(CLEAN) * 2}\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    raw_exchange(gw.ports[0], head + CLEAN, half_close=True, wait=5)
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("imguard", {}).get("anomaly", {}).get("kind")
                                      == "chat_request_incomplete", since))
    assert alert is not None, "no anomaly for the cut upload"
    assert vendor.requests == []


def test_oversize_bodies_are_refused_with_413(route):
    """An upload over --chat-max-upload-size is not scanned: policy decides (bundled: block) -> 413; a message
    body over max_message_size -> 413. Announced by Content-Length and chunked alike."""
    vendor, gw = route
    port = gw.ports[0]
    status, _, _ = call(port, "POST", "/api/v4/files?channel_id=c&filename=edge.bin", b"a" * UPLOAD_LIMIT)
    assert status == 200 and vendor.bodies("edge.bin") == [b"a" * UPLOAD_LIMIT]       # the edge: scanned, passed
    vendor.requests.clear()
    big = b"a" * (UPLOAD_LIMIT + 1)
    status, _, resp = call(port, "POST", "/api/v4/files?channel_id=c&filename=big.bin", big)
    assert status == 413 and json.loads(resp)["status_code"] == 413

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("POST", "/api/v1/rooms.upload/R", body=chunks(), headers=MP, encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    status, _, _ = call(port, "POST", "/api/v4/posts", b'{"message":"' + b"x" * (1024 * 1024) + b'"}',
                        {"Content-Type": "application/json"})
    assert status == 413
    assert vendor.requests == []


# --- inbound: what the vendor's server delivers to the user behind the gateway ---------------------------------
#
# The outside user is whoever the stand-in server says wrote a message or shared a file (it never crosses the
# gateway); the inside user is the one whose credential asks through the gateway. Each vendor's documented
# response shapes are served; the test reads what the inside client gets.

def zipped(data: bytes, name: str = "eicar.com") -> bytes:
    import io
    import zipfile
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return out.getvalue()


@dataclass
class Inbound:
    """One vendor's inbound scenario: who asks, where its history and files are, how its errors look."""
    api: str
    outside: str                    # the sender's id as the API names it
    inside: str                     # the receiver's id (learned by the gateway from whoami, or in the headers)
    headers: dict                   # the inside user's credentials
    history_path: str               # the GET that delivers messages
    history: object                 # the served body (built by `make_history` from the texts)
    texts: "callable"               # delivered body -> the message texts, in order
    files: dict                     # "eicar" / "zip" / "clean" -> download path
    error: "callable"               # parsed error body -> True when it is the API's error shape
    post: tuple = ()                # (path, text -> JSON body): the inside user's own message, outbound
    whoami: tuple = ()              # (path, body): asked first, so the gateway knows the inside user
    host: str = ""                  # Host header of the downloads (Discord's CDN)


def history_texts(blocked: str, masked: str, sentinel: str, own: str) -> list[tuple[str, str]]:
    return [("outside", blocked), ("outside", masked), ("outside", sentinel), ("inside", own)]


def slack_case() -> Inbound:
    out, inside = "U0OUTSIDE", "U0INSIDE"
    files = {k: f"/files-pri/T0TEAM-F0{k.upper()}/{k}.bin" for k in ("eicar", "zip", "clean")}
    return Inbound("slack", out, inside, {"Authorization": "Bearer xoxp-inside"},
                   "/api/conversations.history?channel=C1",
                   lambda msgs, shared: {"ok": True, "has_more": False, "messages": [
                       {"type": "message", "user": out if who == "outside" else inside, "text": text,
                        "ts": f"17000000{i}.000100", **({"files": [{"id": f"F0{k.upper()}", "name": f"{k}.bin",
                                                                    "url_private": files[k]} for k in shared]}
                                                         if i == 0 else {})}
                       for i, (who, text) in enumerate(msgs)]},
                   lambda body: [m["text"] for m in body["messages"]], files,
                   lambda err: err.get("ok") is False and "blocked" in err["detail"],
                   post=("/api/chat.postMessage", lambda text: {"channel": "C1", "text": text}),
                   whoami=("/api/auth.test", {"ok": True, "user": "inside", "user_id": inside, "team_id": "T0TEAM"}))


def mattermost_case() -> Inbound:
    out, inside = "mmoutsider1", "mminsider22"
    files = {k: f"/api/v4/files/f{k}" for k in ("eicar", "zip", "clean")}

    def history(msgs, shared):
        posts = {f"p{i}": {"id": f"p{i}", "user_id": out if who == "outside" else inside, "channel_id": "ch1",
                           "message": text, "type": "", "create_at": 1700000000000 + i,
                           **({"file_ids": [f"f{k}" for k in shared],
                               "metadata": {"files": [{"id": f"f{k}", "name": f"{k}.bin"} for k in shared]}}
                              if i == 0 else {})}
                 for i, (who, text) in enumerate(msgs)}
        return {"order": list(posts), "posts": posts, "next_post_id": "", "prev_post_id": ""}
    return Inbound("mattermost", out, inside, {"Authorization": "Bearer mm-inside"}, "/api/v4/channels/ch1/posts",
                   history, lambda body: [body["posts"][k]["message"] for k in body["order"]], files,
                   lambda err: err.get("status_code") == 403 and "blocked" in err["message"],
                   post=("/api/v4/posts", lambda text: {"channel_id": "ch1", "message": text}),
                   whoami=("/api/v4/users/me", {"id": inside, "username": "inside"}))


def rocketchat_case() -> Inbound:
    out, inside = "rc-outside-user", RC_INSIDE
    files = {k: f"/file-upload/id{k}/{k}.bin" for k in ("eicar", "zip", "clean")}
    return Inbound("rocketchat", out, inside, {"X-User-Id": inside, "X-Auth-Token": "rc-token"},
                   "/api/v1/channels.history?roomId=GENERAL",
                   lambda msgs, shared: {"success": True, "messages": [
                       {"_id": f"m{i}", "rid": "GENERAL", "msg": text, "md": [{"type": "PARAGRAPH", "value": text}],
                        "u": {"_id": out if who == "outside" else inside, "username": who},
                        **({"files": [{"_id": f"id{k}", "name": f"{k}.bin"} for k in shared]} if i == 0 else {})}
                       for i, (who, text) in enumerate(msgs)]},
                   lambda body: [m["msg"] for m in body["messages"]], files,
                   lambda err: err.get("success") is False and "blocked" in err["error"],
                   post=("/api/v1/chat.postMessage", lambda text: {"roomId": "GENERAL", "text": text}))


def discord_case() -> Inbound:
    out, inside = "900111", "900222"
    files = {k: f"/attachments/42/{n}/{k}.bin" for n, k in ((701, "eicar"), (702, "zip"), (703, "clean"))}
    return Inbound("discord", out, inside, {"Authorization": "Bearer discord-inside"},
                   "/api/v10/channels/42/messages?limit=50",
                   lambda msgs, shared: [
                       {"id": str(1000 + i), "channel_id": "42", "content": text, "embeds": [],
                        "author": {"id": out if who == "outside" else inside, "username": who},
                        "attachments": [{"id": files[k].split("/")[3], "filename": f"{k}.bin"} for k in shared]
                        if i == 0 else []}
                       for i, (who, text) in enumerate(msgs)],
                   lambda body: [m["content"] for m in body], files,
                   lambda err: err.get("code") == 200000 and "blocked" in err["message"],
                   post=("/api/v10/channels/42/messages", lambda text: {"content": text}),
                   whoami=("/api/v10/users/@me", {"id": inside, "username": "inside"}), host="cdn.discordapp.com")


CASES = {"slack": slack_case, "mattermost": mattermost_case, "rocketchat": rocketchat_case, "discord": discord_case}


def is_inbound(alert: dict, sender: str, receiver: str) -> bool:
    ctx = alert.get("imguard", {}).get("context", {})
    return (ctx.get("direction") == "inbound" and ctx.get("origin") == "server"
            and alert.get("source", {}).get("user", {}).get("name") == sender
            and receiver in alert.get("destination", {}).get("user", {}).get("name", []))


def archive_rows(gw, person: str, predicate, timeout: float = 10.0) -> list[dict]:
    """The gateway's archive searched by person (as `imguard archive search --person`), waited for."""
    from imguard import archive

    store = archive.Archive(gw.data_dir / "archive.sqlite3")
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in store.search(archive.Query(person=person)) if predicate(r)]
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)
    finally:
        store.close()


@pytest.mark.parametrize("api", list(CASES))
def test_inbound_messages_blocked_masked_and_recorded(route, api):
    """The history the vendor's server delivers: the outside user's blocked message is replaced by imguard's notice
    (the keyword never reaches the inside client), the masked one arrives masked, the sentinel after them and the
    inside user's own message arrive untouched; the alerts say inbound and name both; the archive has the
    outside user's messages under either person."""
    vendor, gw = route
    case = CASES[api]()
    tag = uuid.uuid4().hex[:6]
    blocked, masked = f"the {BLOCKED_WORD} launch {tag}", f"code {MASK_WORD} {tag}"
    sentinel, own = f"sentinel {tag}", f"my own {BLOCKED_WORD} note {tag}"
    served = json.dumps(case.history(history_texts(blocked, masked, sentinel, own), ())).encode()
    vendor.served[case.history_path.split("?")[0]] = (200, "application/json", served)
    if case.whoami:
        vendor.served[case.whoami[0]] = (200, "application/json", json.dumps(case.whoami[1]).encode())
        status, _, _ = call(gw.ports[0], "GET", case.whoami[0], b"", case.headers)
        assert status == 200
    since = gw.mark()
    status, _, body = call(gw.ports[0], "GET", case.history_path, b"", case.headers)
    assert status == 200, body
    texts = case.texts(json.loads(body))
    assert len(texts) == 4 and texts[2:] == [sentinel, own], texts
    assert texts[0].startswith(f"A message from {case.outside} was blocked by imguard:"), texts
    assert "confidential project" in texts[0] and blocked not in body.decode()
    assert BLOCKED_WORD not in body.decode().replace(own, ""), "the blocked text reached the inside client"
    assert texts[1] == f"code [REDACTED:keyword] {tag}" and MASK_WORD not in body.decode()
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block"
                                      and is_inbound(e, case.outside, case.inside), since))
    assert alert and alert["network"]["protocol"] == api, alert
    passed = asyncio.run(gw.wait_alert(lambda e: e.get("imguard", {}).get("message", {}).get("text") == sentinel,
                                       since))
    assert passed and is_inbound(passed, case.outside, case.inside), passed
    assert not [e for e in gw.alerts()[since:] if e.get("imguard", {}).get("message", {}).get("text") == own], \
        "the inside user's own message was decided as inbound"
    for person in (case.outside, case.inside):
        rows = archive_rows(gw, person, lambda r: r["text"] == sentinel)
        assert len(rows) == 1 and rows[0]["direction"] == "inbound", (person, rows)
    # the inside user answers (outbound): `imguard archive search --person` has both sides of the conversation
    reply = f"reply from inside {tag}"
    status, _ = call_json(gw.ports[0], "POST", case.post[0], case.post[1](reply), case.headers)
    assert status == 200 and any(reply.encode() in b for b in vendor.bodies(case.post[0]))
    assert archive_rows(gw, case.inside, lambda r: r["text"] == reply), "the reply is not in the archive"
    found = subprocess.run([sys.executable, "-m", "imguard", "archive", "search", "--person", case.inside,
                            "--text", tag, "--data-dir", str(gw.data_dir)], capture_output=True, text=True,
                           timeout=60)
    assert found.returncode == 0, found.stderr
    records = {r["text"]: r for r in map(json.loads, found.stdout.splitlines())}
    assert records[sentinel]["direction"] == "inbound" and case.outside in records[sentinel]["sender"]
    assert records[reply]["direction"] == "outbound" and records[reply]["sender"] == case.inside
    # the archive keeps what was said, for the auditor, with what was done to it
    assert [(records[t]["direction"], records[t]["action"]) for t in (blocked, masked)] == [
        ("inbound", "block"), ("inbound", "mask")]
    # the same history again: delivered the same way, not recorded twice
    status, _, again = call(gw.ports[0], "GET", case.history_path, b"", case.headers)
    assert status == 200 and case.texts(json.loads(again)) == texts
    assert len([e for e in gw.alerts()[since:] if e.get("imguard", {}).get("message", {}).get("text") == sentinel]) == 1


@pytest.mark.parametrize("api", list(CASES))
def test_inbound_file_downloads(route, api):
    """The files the outside user shared (named in a history response), downloaded by the inside user through the
    gateway: EICAR plain and zipped get the API's error instead of the bytes (a clean download after each block,
    the sentinel, arrives byte-identical); the alert says inbound and names both; a second download of the blocked
    file is refused before it reaches the server."""
    vendor, gw = route
    case = CASES[api]()
    data = {"eicar": EICAR, "zip": zipped(EICAR), "clean": CLEAN}
    for kind, path in case.files.items():
        vendor.served[path] = (200, "application/octet-stream", data[kind])
    history = case.history([("outside", "files for you"), ("inside", "thanks")], list(case.files))
    vendor.served[case.history_path.split("?")[0]] = (200, "application/json", json.dumps(history).encode())
    if case.whoami:
        vendor.served[case.whoami[0]] = (200, "application/json", json.dumps(case.whoami[1]).encode())
        assert call(gw.ports[0], "GET", case.whoami[0], b"", case.headers)[0] == 200
    assert call(gw.ports[0], "GET", case.history_path, b"", case.headers)[0] == 200
    # Discord's CDN serves signed URLs without a credential: the receiver is who the history showed the file to
    headers = {"Host": case.host} if case.host else case.headers
    for kind in ("eicar", "zip"):
        since = gw.mark()
        status, _, body = call(gw.ports[0], "GET", case.files[kind], b"", headers)
        assert status == 403 and EICAR not in body and b"PK" not in body[:2], body
        assert case.error(json.loads(body)), body
        status, _, body = call(gw.ports[0], "GET", case.files["clean"], b"", headers)       # the sentinel
        assert status == 200 and body == CLEAN
        alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.file"
                                          and e.get("event", {}).get("action") == "block"
                                          and is_inbound(e, case.outside, case.inside), since))
        assert alert, f"no inbound file block alert naming {case.outside} and {case.inside}"
        assert alert["network"]["protocol"] == api
    fetched = len([r for r in vendor.requests if r.path == case.files["eicar"]])
    status, _, body = call(gw.ports[0], "GET", case.files["eicar"], b"", headers)
    assert status == 403 and case.error(json.loads(body))
    assert len([r for r in vendor.requests if r.path == case.files["eicar"]]) == fetched, \
        "a file already blocked was fetched from the server again"
    import hashlib
    for person in (case.outside, case.inside):
        for digest, action in ((hashlib.sha256(EICAR).hexdigest(), "block"), (hashlib.sha256(CLEAN).hexdigest(), "")):
            rows = archive_rows(gw, person, lambda r, d=digest: r["kind"] == "file" and r["sha256"] == d
                                and r["protocol"] == api)
            assert rows and all(r["direction"] == "inbound" for r in rows), (person, rows)
            assert not action or any(r["action"] == action for r in rows), rows


def test_inbound_download_too_large_is_stopped(route):
    """A download larger than --chat-max-upload-size is not scanned: policy decides (bundled: block), and the
    inside client gets no byte of it; the edge size is scanned and passes."""
    vendor, gw = route
    vendor.served["/api/v4/files/fbig"] = (200, "application/octet-stream", b"a" * (UPLOAD_LIMIT + 1))
    vendor.served["/api/v4/files/fedge"] = (200, "application/octet-stream", b"a" * UPLOAD_LIMIT)
    auth = {"Authorization": "Bearer mm-inside"}
    status, _, body = call(gw.ports[0], "GET", "/api/v4/files/fedge", b"", auth)
    assert status == 200 and body == b"a" * UPLOAD_LIMIT
    import http.client
    since = gw.mark()
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        call(gw.ports[0], "GET", "/api/v4/files/fbig", b"", auth)
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.file"
                                      and "too_large" in json.dumps(e), since))
    assert alert and alert["imguard"]["context"]["direction"] == "inbound", alert
    assert alert["event"]["action"] == "block" and "mm-inside" not in json.dumps(alert)


def test_slack_download_of_a_blocked_upload_is_refused_at_request_time(route):
    """EICAR uploaded through the two-step flow is refused; a later download of that file id (files-pri) is
    refused by the gateway without asking the server."""
    vendor, gw = route
    port = gw.ports[0]
    status, _, body = call(port, "POST", "/api/files.getUploadURLExternal",
                           f"filename=e.com&length={len(EICAR)}".encode(),
                           {"Content-Type": "application/x-www-form-urlencoded", **SLACK})
    slot = json.loads(body)
    status, _, _ = call(port, "POST", slot["upload_url"].split(str(port), 1)[1], EICAR,
                        {"Content-Type": "application/octet-stream"})
    assert status == 403
    path = f"/files-pri/T0TEAM-{slot['file_id']}/download/e.com"
    vendor.served[path] = (200, "application/octet-stream", EICAR)
    status, _, body = call(port, "GET", path, b"", SLACK)
    assert status == 403 and json.loads(body)["ok"] is False and EICAR not in body
    assert not [r for r in vendor.requests if r.path == path]


def test_rocketchat_ddp_stream_delivers_decided_messages(route):
    """The server's DDP stream-room-messages (bare DDP on /websocket): after the login result names the inside
    user, the outside user's blocked message reaches the client as the notice, the masked one masked, the sentinel
    after them untouched; the alert says inbound and names both."""
    vendor, gw = route
    tag = uuid.uuid4().hex[:6]
    out = "rc-ddp-outsider"

    def changed(i, text, user):
        return json.dumps({"msg": "changed", "collection": "stream-room-messages", "id": "id",
                           "fields": {"eventName": "GENERAL", "args": [
                               {"_id": f"d{tag}{i}", "rid": "GENERAL", "msg": text, "u": {"_id": user},
                                "md": [{"type": "PARAGRAPH", "value": text}]}]}})
    vendor.ws_push[:] = [changed(0, f"{BLOCKED_WORD} via ddp {tag}", out),
                         changed(1, f"{MASK_WORD} via ddp {tag}", out), changed(2, f"sentinel {tag}", out)]
    since = gw.mark()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{gw.ports[0]}/websocket") as ws:
                await ws.send_str(json.dumps({"msg": "method", "method": "login", "id": "1",
                                              "params": [{"resume": "resume-token"}]}))
                assert json.loads((await ws.receive(timeout=10)).data)["result"]["id"] == RC_INSIDE
                await ws.send_str(json.dumps({"msg": "sub", "id": "s1", "name": "stream-room-messages",
                                              "params": ["GENERAL", False]}))
                got = [json.loads((await ws.receive(timeout=10)).data) for _ in range(3)]
        return [g["fields"]["args"][0] for g in got]
    msgs = asyncio.run(scenario())
    assert msgs[0]["msg"].startswith(f"A message from {out} was blocked by imguard:") and "md" not in msgs[0]
    assert msgs[1]["msg"] == f"[REDACTED:keyword] via ddp {tag}" and "md" not in msgs[1]
    assert msgs[2]["msg"] == f"sentinel {tag}" and msgs[2]["md"]
    assert BLOCKED_WORD not in json.dumps(msgs) and MASK_WORD not in json.dumps(msgs)
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block"
                                      and is_inbound(e, out, RC_INSIDE), since))
    assert alert and alert["network"]["protocol"] == "rocketchat"


def test_slack_history_posted_as_a_form_is_decided(route):
    """conversations.replies POSTed form-encoded (the channel and token in the body, as slack_sdk sends them): the
    request reaches the server unchanged and its answer is decided as a GET's is."""
    vendor, gw = route
    tag = uuid.uuid4().hex[:6]
    vendor.served["/api/conversations.replies"] = (200, "application/json", json.dumps({"ok": True, "messages": [
        {"type": "message", "user": "U0REPLIER", "text": f"{BLOCKED_WORD} in a thread {tag}", "ts": "1.1"},
        {"type": "message", "user": "U0REPLIER", "text": f"sentinel {tag}", "ts": "1.2"}]}).encode())
    form = b"channel=C7&ts=1.1&token=xoxp-form-token"
    since = gw.mark()
    status, _, body = call(gw.ports[0], "POST", "/api/conversations.replies", form,
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and vendor.bodies("conversations.replies") == [form]
    texts = [m["text"] for m in json.loads(body)["messages"]]
    assert texts[0].startswith("A message from U0REPLIER was blocked by imguard:") and texts[1] == f"sentinel {tag}"
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block"
                                      and e.get("imguard", {}).get("context", {}).get("conversation") == "C7", since))
    assert alert and alert["imguard"]["context"]["direction"] == "inbound"


# --- inbound over WebSockets: what Slack, Mattermost and Discord push ------------------------------------------
#
# The stand-in plays the server's side of each vendor's socket (its documented frames); the inside client is an
# aiohttp WebSocket through the gateway. Each scenario pushes, from the outside user: a blocked message, a sentinel,
# a masked message, a clean one; then the inside user's own message (with the blocked word: not decided inbound).

@dataclass
class Pushed:
    """One vendor's socket: where the client connects, how the server frames a message, how the client reads it."""
    api: str
    outside: str
    inside: str
    path: str                       # what the client connects to (path and query)
    host: str                       # its Host header
    headers: dict                   # the handshake's credentials
    frame: "callable"               # (message number, sender, text) -> the server's message
    text: "callable"                # parsed server message -> the message text, or None (not a message)
    greeting: tuple = ()            # server messages before the pushes (hello)
    learn: tuple = ()               # (path, body): asked first over REST, so the gateway knows the socket's user


def slack_rtm_case() -> Pushed:
    ticket = uuid.uuid4().hex
    inside = "U0WSINSIDE"
    return Pushed("slack", "U0WSOUTSIDE", inside, f"/websocket/{ticket}", "wss-primary.slack.com", {},
                  lambda i, who, text: json.dumps({"type": "message", "channel": "C1", "user": who, "text": text,
                                                   "ts": f"1700000{i}.{ticket[:6]}", "team": "T1",
                                                   "blocks": [{"type": "rich_text", "elements": [
                                                       {"type": "text", "text": text}]}]}),
                  lambda f: f.get("text") if f.get("type") == "message" else None,
                  greeting=(json.dumps({"type": "hello"}),),
                  learn=("/api/rtm.connect", {"ok": True, "url": f"wss://wss-primary.slack.com/websocket/{ticket}",
                                              "self": {"id": inside, "name": "inside"}, "team": {"id": "T1"}}))


def slack_socket_mode_case() -> Pushed:
    inside = "U0BOTINSIDE"
    return Pushed("slack", "U0SMOUTSIDE", inside, f"/link/?ticket={uuid.uuid4().hex}&app_id=A1",
                  "wss-primary.slack.com", {},
                  lambda i, who, text: json.dumps({
                      "envelope_id": f"env-{i}", "type": "events_api", "accepts_response_payload": False,
                      "payload": {"type": "event_callback", "event_id": f"Ev{i}", "authorizations": [
                          {"user_id": inside, "is_bot": True}],
                          "event": {"type": "message", "channel": "C2", "user": who, "text": text,
                                    "ts": f"1700001{i}.{uuid.uuid4().hex[:6]}"}}}),
                  lambda f: f["payload"]["event"]["text"] if f.get("type") == "events_api" else None,
                  greeting=(json.dumps({"type": "hello", "num_connections": 1,
                                        "connection_info": {"app_id": "A1"}}),))


def mattermost_ws_case() -> Pushed:
    inside = "mmwsinside1"
    tag = uuid.uuid4().hex[:8]
    return Pushed("mattermost", "mmwsoutside", inside, "/api/v4/websocket", "127.0.0.1",
                  {"Authorization": "Bearer mm-ws-inside"},
                  lambda i, who, text: json.dumps({
                      "event": "posted", "seq": i + 1,
                      "data": {"channel_display_name": "Town Square", "channel_name": "town-square",
                               "channel_type": "O", "sender_name": f"@{who}", "team_id": "t1",
                               "post": json.dumps({"id": f"p{tag}{i}", "user_id": who, "channel_id": "ch1",
                                                   "message": text, "type": "", "create_at": 1700000000000 + i})},
                      "broadcast": {"omit_users": None, "user_id": "", "channel_id": "ch1", "team_id": ""}}),
                  lambda f: json.loads(f["data"]["post"])["message"] if f.get("event") == "posted" else None,
                  greeting=(json.dumps({"event": "hello", "data": {"server_version": "9.11.0"},
                                        "broadcast": {"user_id": inside}, "seq": 0}),))


PUSHED = {"slack-rtm": slack_rtm_case, "slack-socket-mode": slack_socket_mode_case, "mattermost": mattermost_ws_case}


def pushed_texts(tag: str) -> tuple[str, str, str, str, str]:
    return (f"the {BLOCKED_WORD} launch {tag}", f"sentinel {tag}", f"code {MASK_WORD} {tag}",
            f"clean words {tag}", f"my own {BLOCKED_WORD} note {tag}")


def assert_inbound_recorded(gw, since: int, api: str, outside: str, inside: str, sentinel: str, own: str) -> None:
    """The block alert is inbound and names both; the sentinel was decided inbound and is in the archive under
    either person; the inside user's own message was not decided inbound. (A Slack message's text is also in its
    blocks: policy reads both, so the recorded text holds the sentinel twice.)"""
    def text(e: dict) -> str:
        return e.get("imguard", {}).get("message", {}).get("text") or ""
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block"
                                      and is_inbound(e, outside, inside), since))
    assert alert and alert["network"]["protocol"] == api, alert
    passed = asyncio.run(gw.wait_alert(lambda e: text(e).startswith(sentinel), since))
    assert passed and is_inbound(passed, outside, inside), passed
    assert not [e for e in gw.alerts()[since:] if own in text(e)], "the inside user's own message was decided inbound"
    for person in (outside, inside):
        rows = archive_rows(gw, person, lambda r: (r["text"] or "").startswith(sentinel))
        assert len(rows) == 1 and rows[0]["direction"] == "inbound", (person, rows)


@pytest.mark.parametrize("case_name", list(PUSHED))
def test_pushed_messages_blocked_masked_and_recorded(route, case_name):
    """What the server pushes on the socket: the outside user's blocked message reaches the client as imguard's
    notice (the keyword never does), the sentinel after it and the clean message unchanged, the masked one
    masked, the inside user's own message untouched; alert inbound naming both; the archive holds them."""
    vendor, gw = route
    case = PUSHED[case_name]()
    tag = uuid.uuid4().hex[:6]
    blocked, sentinel, masked, clean, own = pushed_texts(tag)
    pushes = [case.frame(i, who, text) for i, (who, text) in enumerate(
        [(case.outside, blocked), (case.outside, sentinel), (case.outside, masked), (case.outside, clean),
         (case.inside, own)])]

    async def script(ws, request):
        for frame in case.greeting + tuple(pushes):
            await ws.send_str(frame)
        async for _ in ws:
            pass
    vendor.ws_script = script
    if case.learn:
        vendor.served[case.learn[0]] = (200, "application/json", json.dumps(case.learn[1]).encode())
        status, _, _ = call(gw.ports[0], "POST", case.learn[0], b"", {"Authorization": "Bearer xoxp-ws-inside"})
        assert status == 200
    since = gw.mark()

    async def client():
        got = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{gw.ports[0]}{case.path}",
                                          headers={"Host": case.host, **case.headers}) as ws:
                while len(got) < 5:
                    frame = json.loads((await ws.receive(timeout=10)).data)
                    if case.text(frame) is not None:
                        got.append((case.text(frame), frame))
        return got
    got = asyncio.run(client())
    texts = [t for t, _ in got]
    assert texts[0].startswith(f"A message from {case.outside} was blocked by imguard:"), texts
    assert "confidential project" in texts[0]
    assert texts[1:] == [sentinel, f"code [REDACTED:keyword] {tag}", clean, own], texts
    assert BLOCKED_WORD not in json.dumps([f for _, f in got[:4]]), "the blocked text reached the inside client"
    assert got[1][1] == json.loads(pushes[1]) and got[3][1] == json.loads(pushes[3]), "a clean message was changed"
    assert_inbound_recorded(gw, since, case.api, case.outside, case.inside, sentinel, own)
    assert archive_rows(gw, case.outside, lambda r: (r["text"] or "").startswith(blocked) and r["action"] == "block")


def test_mattermost_unreadable_pushed_frame_is_an_anomaly_and_dropped(route):
    """A server message on a chat socket that is not JSON (or a posted event whose post is not): an anomaly, and
    with the default fail mode (closed) it does not reach the client; the sentinel after it does."""
    vendor, gw = route
    case = mattermost_ws_case()
    tag = uuid.uuid4().hex[:6]

    async def script(ws, request):
        for frame in case.greeting:
            await ws.send_str(frame)
        await ws.send_str(f"<html>{tag}</html>")
        await ws.send_str(json.dumps({"event": "posted", "data": {"post": "{broken " + tag}, "broadcast": {}}))
        await ws.send_str(case.frame(0, case.outside, f"sentinel {tag}"))
        async for _ in ws:
            pass
    vendor.ws_script = script
    since = gw.mark()

    async def client():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{gw.ports[0]}{case.path}", headers=case.headers) as ws:
                first = json.loads((await ws.receive(timeout=10)).data)
                assert first["event"] == "hello"
                return (await ws.receive(timeout=10)).data
    assert json.loads(json.loads(asyncio.run(client()))["data"]["post"])["message"] == f"sentinel {tag}"
    anomalies = [e for e in gw.alerts()[since:]
                 if e.get("imguard", {}).get("anomaly", {}).get("kind") == "chat_websocket_malformed"]
    assert len(anomalies) == 2 and all("dropped" in json.dumps(a) for a in anomalies), anomalies


DISCORD_SUFFIX = b"\x00\x00\xff\xff"


# Erlang's external term format as the stand-in gateway and the test client speak it (encoding=etf), written here
# from the specification, apart from imguard's: keys as small UTF-8 atoms, text as binaries, snowflakes as integers.
def to_etf(value, top: bool = True) -> bytes:
    head = bytes([131]) if top else b""
    if value is None or isinstance(value, bool):
        name = {None: b"nil", True: b"true", False: b"false"}[value]
        return head + bytes([119, len(name)]) + name
    if isinstance(value, int):
        if 0 <= value < 256:
            return head + bytes([97, value])
        if -2 ** 31 <= value < 2 ** 31:
            return head + bytes([98]) + value.to_bytes(4, "big", signed=True)
        digits = abs(value).to_bytes(8, "little")
        return head + bytes([110, 8, int(value < 0)]) + digits
    if isinstance(value, str):
        raw = value.encode()
        return head + bytes([109]) + len(raw).to_bytes(4, "big") + raw
    if isinstance(value, list):
        body = b"".join(to_etf(v, False) for v in value)
        return head + (bytes([108]) + len(value).to_bytes(4, "big") + body if value else b"") + bytes([106])
    body = b"".join(bytes([119, len(k.encode())]) + k.encode() + to_etf(v, False) for k, v in value.items())
    return head + bytes([116]) + len(value).to_bytes(4, "big") + body


def from_etf(data: bytes):
    def term(i):
        tag = data[i]
        if tag == 97:
            return data[i + 1], i + 2
        if tag == 98:
            return int.from_bytes(data[i + 1:i + 5], "big", signed=True), i + 5
        if tag == 110:
            n, sign = data[i + 1], data[i + 2]
            value = int.from_bytes(data[i + 3:i + 3 + n], "little")
            return -value if sign else value, i + 3 + n
        if tag in (119, 115):
            name = data[i + 2:i + 2 + data[i + 1]].decode()
            return {"nil": None, "true": True, "false": False}.get(name, name), i + 2 + data[i + 1]
        if tag == 109:
            n = int.from_bytes(data[i + 1:i + 5], "big")
            return data[i + 5:i + 5 + n].decode(), i + 5 + n
        if tag == 106:
            return [], i + 1
        if tag == 108:
            items, i = [], i + 5
            for _ in range(int.from_bytes(data[i - 4:i], "big")):
                item, i = term(i)
                items.append(item)
            return items, i + 1         # the nil tail
        if tag == 116:
            out, count, i = {}, int.from_bytes(data[i + 1:i + 5], "big"), i + 5
            for _ in range(count):
                key, i = term(i)
                out[key], i = term(i)
            return out, i
        raise AssertionError(f"ETF tag {tag} in {data!r}")
    assert data[0] == 131
    value, end = term(1)
    assert end == len(data)
    return value


def discord_script(pushes: list, inside, identified: list):
    """The gateway's side: HELLO, then on IDENTIFY the READY and the pushes, each a dispatch; in the encoding the
    client asked for (json, etf); with compress=zlib-stream all of it one zlib stream (the second push split over
    two WebSocket messages, as a long payload may be), else each payload its own message; heartbeats acked."""
    async def script(ws, request):
        stream = request.query.get("compress") == "zlib-stream"
        etf = request.query.get("encoding") == "etf"
        deflater = zlib.compressobj()
        seq = 0

        async def send(obj, split=False):
            data = to_etf(obj) if etf else json.dumps(obj).encode()
            if not stream:
                await (ws.send_bytes(data) if etf else ws.send_str(data.decode()))
                return
            data = deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)
            if split:
                await ws.send_bytes(data[:len(data) // 2])
                data = data[len(data) // 2:]
            await ws.send_bytes(data)
        await send({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        async for msg in ws:
            frame = from_etf(msg.data) if etf else json.loads(msg.data)
            if frame["op"] == 2:
                identified.append(frame["d"]["token"])
                seq += 1
                await send({"op": 0, "t": "READY", "s": seq, "d": {"v": 10, "user": {"id": inside, "username": "in"},
                                                                    "session_id": "sess", "guilds": []}})
                for i, push in enumerate(pushes):
                    seq += 1
                    await send({"op": 0, "t": push.get("t", "MESSAGE_CREATE"), "s": seq, "d": push["d"]},
                               split=i == 1)
            elif frame["op"] == 1:
                await send({"op": 11})
    return script


def discord_message(i: int, tag: str, who, text: str) -> dict:
    return {"d": {"id": f"{tag}{i}", "channel_id": "4242", "guild_id": "1", "content": text, "embeds": [],
                  "attachments": [], "author": {"id": who, "username": str(who)}, "edited_timestamp": None,
                  "type": 0, "tts": False, "mentions": []}}


@pytest.mark.parametrize("encoding,compress", [("json", "zlib-stream"), ("json", ""), ("etf", "zlib-stream"),
                                               ("etf", "")])
def test_discord_gateway_pushed_messages(route, encoding, compress):
    """Discord's gateway, as its clients connect (v=10; encoding=json as the web client, etf as the desktop
    client's erlpack, snowflakes then 64-bit integers; compress=zlib-stream: one inflater for the connection,
    payloads ending with 00 00 ff ff): IDENTIFY carries the token and READY the user; the outside user's
    MESSAGE_CREATEs arrive blocked (the notice), masked, clean and sentinel as for the other APIs (a clean one
    as the very bytes the server sent); a payload past --chat-max-delivery-size (a tiny zlib bomb) is dropped
    with an anomaly and the stream stays in step: the message after it and a heartbeat ack arrive."""
    vendor, gw = route
    tag = uuid.uuid4().hex[:6]
    outside, inside = (8800111000000000001, 8800222000000000002) if encoding == "etf" else ("8800111", "8800222")
    blocked, sentinel, masked, clean, own = pushed_texts(tag)
    texts = [(outside, blocked), (outside, sentinel), (outside, masked), (outside, clean), (inside, own),
             (outside, "q" * (DELIVERY_LIMIT + 1000)), (outside, f"after the bomb {tag}")]
    pushes = [discord_message(i, tag, who, text) for i, (who, text) in enumerate(texts)]
    identified: list = []
    vendor.ws_script = discord_script(pushes, inside, identified)
    since = gw.mark()
    query = f"/?v=10&encoding={encoding}" + (f"&compress={compress}" if compress else "")

    def decode(data: bytes):
        return from_etf(data) if encoding == "etf" else json.loads(data)

    def encode(obj):
        return to_etf(obj) if encoding == "etf" else json.dumps(obj)

    async def client():
        inflater, buffer = zlib.decompressobj(), bytearray()

        async def payload():
            while True:
                msg = await ws.receive(timeout=10)
                if not compress:
                    return decode(msg.data if isinstance(msg.data, bytes) else msg.data.encode())
                buffer.extend(msg.data)
                if buffer[-4:] == DISCORD_SUFFIX:
                    out = inflater.decompress(bytes(buffer))
                    buffer.clear()
                    return decode(out)
        got = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{gw.ports[0]}{query}",
                                          headers={"Host": "gateway.discord.gg"}, max_msg_size=0) as ws:
                assert (await payload())["op"] == 10
                identify = encode({"op": 2, "d": {"token": "discord-ws-token", "intents": 33281,
                                                  "properties": {"os": "linux", "browser": "test"}}})
                await (ws.send_bytes(identify) if encoding == "etf" else ws.send_str(identify))
                assert (await payload())["t"] == "READY"
                while len(got) < 6:
                    got.append(await payload())
                beat = encode({"op": 1, "d": 7})
                await (ws.send_bytes(beat) if encoding == "etf" else ws.send_str(beat))
                got.append(await payload())
        return got
    got = asyncio.run(client())
    assert identified == ["discord-ws-token"]
    contents = [g["d"]["content"] for g in got[:6]]
    assert contents[0].startswith(f"A message from {outside} was blocked by imguard:"), contents
    assert contents[1:] == [sentinel, f"code [REDACTED:keyword] {tag}", clean, own, f"after the bomb {tag}"], contents
    assert got[6] == {"op": 11}
    assert got[1]["d"] == pushes[1]["d"] and got[3]["d"] == pushes[3]["d"] and [g["s"] for g in got[1:4]] == [3, 4, 5]
    assert got[0]["d"]["author"]["id"] == outside and got[0]["d"]["attachments"] == []
    assert BLOCKED_WORD not in json.dumps(got[:4])
    assert_inbound_recorded(gw, since, "discord", str(outside), str(inside), sentinel, own)
    bomb = asyncio.run(gw.wait_alert(lambda e: e.get("imguard", {}).get("anomaly", {}).get("kind")
                                     == "chat_websocket_too_large", since))
    assert bomb is not None


def test_discord_gateway_zstd_stream_is_refused_with_an_anomaly(route):
    """compress=zstd-stream (which imguard does not read): with the default fail mode (closed) the upgrade is
    refused in Discord's error shape, an anomaly recorded, and nothing reaches the server."""
    vendor, gw = route
    reached: list = []

    async def script(ws, request):
        reached.append(request.path_qs)
    vendor.ws_script = script
    since = gw.mark()

    async def client():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await session.ws_connect(f"http://127.0.0.1:{gw.ports[0]}/?v=10&encoding=json&compress=zstd-stream",
                                         headers={"Host": "gateway.discord.gg"})
            return e.value.status
    assert asyncio.run(client()) == 400
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("imguard", {}).get("anomaly", {}).get("kind")
                                      == "chat_websocket_unreadable", since))
    assert alert is not None and "compress=zstd-stream" in json.dumps(alert)
    assert reached == [] and vendor.requests == []


def test_slack_rtm_messages_the_client_posts(route):
    """The inside user posts over RTM: the blocked message never reaches the server and the client gets RTM's
    error reply naming the reason; the masked one reaches it masked, the clean one and the sentinel byte for byte;
    the alert is outbound from the inside user (learned from rtm.connect)."""
    vendor, gw = route
    case = slack_rtm_case()
    tag = uuid.uuid4().hex[:6]
    received: list = []

    async def script(ws, request):
        await ws.send_str(case.greeting[0])
        async for msg in ws:
            received.append(msg.data)
            frame = json.loads(msg.data)
            await ws.send_str(json.dumps({"ok": True, "reply_to": frame["id"], "ts": f"1.{frame['id']}",
                                          "text": frame["text"]}))
    vendor.ws_script = script
    vendor.served[case.learn[0]] = (200, "application/json", json.dumps(case.learn[1]).encode())
    assert call(gw.ports[0], "POST", case.learn[0], b"", {"Authorization": "Bearer xoxp-ws-inside"})[0] == 200
    since = gw.mark()
    sends = [json.dumps({"id": i + 1, "type": "message", "channel": "C1", "text": text}) for i, text in enumerate(
        [f"the {BLOCKED_WORD} plan {tag}", f"sentinel {tag}", f"code {MASK_WORD} {tag}", f"clean {tag}"])]

    async def client():
        replies = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{gw.ports[0]}{case.path}",
                                          headers={"Host": case.host}) as ws:
                assert json.loads((await ws.receive(timeout=10)).data)["type"] == "hello"
                for frame in sends:
                    await ws.send_str(frame)
                    replies.append(json.loads((await ws.receive(timeout=10)).data))
        return replies
    replies = asyncio.run(client())
    assert replies[0]["ok"] is False and replies[0]["reply_to"] == 1
    assert "confidential project" in json.dumps(replies[0])
    assert [r["ok"] for r in replies[1:]] == [True, True, True] and [r["reply_to"] for r in replies[1:]] == [2, 3, 4]
    assert received[0] == sends[1] and received[2] == sends[3], received           # the sentinel, clean: unchanged
    assert json.loads(received[1])["text"] == f"code [REDACTED:keyword] {tag}" and len(received) == 3
    assert BLOCKED_WORD not in "".join(received)
    alert = asyncio.run(gw.wait_alert(lambda e: e.get("event", {}).get("action") == "block"
                                      and e.get("source", {}).get("user", {}).get("name") == case.inside, since))
    assert alert and alert["imguard"]["context"]["direction"] == "outbound" and alert["network"]["protocol"] == "slack"
