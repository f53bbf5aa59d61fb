"""The ChatApis addon in an in-process gateway with stand-ins for inspection and policy: its settings' edges
(routes restricted to a host, a bad route, the identity table's bound) and what it tells the client."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest

from imguard.gateway.chat_apis import ChatApis, ChatApiSettings
from imguard.gateway.master import Gateway, GatewayError
from imguard.gateway.settings import GatewaySettings
from imguard.model import ALLOW, BLOCK, MASK, Decision, FileReport
from imguard.protocols.httpchat import credential_key

from test_gateway import run, start_http_server


@dataclass
class StubPolicy:
    def decide_file(self, report, ctx):
        return Decision(action=BLOCK)


@dataclass
class StubPipeline:
    """Blocks text containing "BAD" and files containing b"EVIL", masks "mask-me"."""
    messages: list = field(default_factory=list)
    records: list = field(default_factory=list)
    policy: StubPolicy = field(default_factory=StubPolicy)

    def check_message(self, text, ctx):
        self.messages.append((text, ctx))
        if "BAD" in text:
            return Decision(action=BLOCK, notice="no BAD words")
        if "mask-me" in text:
            return Decision(action=MASK, masked_text=text.replace("mask-me", "[X]"))
        return Decision(action=ALLOW)

    def check_file(self, data, ctx, name="", claimed_mime="", truncated=False):
        return FileReport(name=name, path=name, size=len(data)), Decision(action=BLOCK if b"EVIL" in data else ALLOW)

    def check_unscannable(self, data, ctx, name, claimed_mime, reason, detail, size=None, adjust=None):
        self.records.append(("unscannable", reason, ctx))
        return FileReport(name=name, path=name, size=size or 0), Decision(action=BLOCK)

    def record(self, event):
        self.records.append(event)

    def with_direction(self, ctx):
        return ctx


async def post(port: int, path: str, body: bytes, host: str = "127.0.0.1", method: str = "POST") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int([header.split(b":")[1] for header in head.split(b"\r\n")
                  if header.lower().startswith(b"content-length")][0])
    data = await reader.readexactly(length)
    writer.close()
    return int(head.split()[1]), data


async def gateway(tmp_path, port, pipeline, chat: ChatApiSettings) -> Gateway:
    s = GatewaySettings(mode=[f"reverse:http://127.0.0.1:{port}@127.0.0.1:0"], ports=[])
    gw = Gateway(s, pipeline, data_dir=tmp_path / "data", factories={}, transfers=None, chat_settings=chat)
    await gw.start()
    return gw


def test_routes_restricted_to_a_host_leave_other_hosts_alone(tmp_path):
    """With --chat-routes mattermost=chat.corp.example/api/v4/, a post to that host is checked (BAD -> 403 in
    Mattermost's shape, masked text forwarded masked); the same post to another host is relayed untouched."""
    async def main():
        srv, port, received = await start_http_server()
        pipeline = StubPipeline()
        gw = await gateway(tmp_path, port, pipeline, ChatApiSettings(routes=["mattermost=chat.corp.example/api/v4/"]))
        gport = gw.port_of("reverse")
        try:
            status, body = await post(gport, "/api/v4/posts", b'{"message":"BAD news"}', host="chat.corp.example")
            assert status == 403 and json.loads(body)["message"] == "no BAD words" and received == []
            status, _ = await post(gport, "/api/v4/posts", b'{"message":"please mask-me"}', host="chat.corp.example")
            assert status == 201 and received[-1][1] == b'{"message":"please [X]"}'
            status, _ = await post(gport, "/api/v4/posts", b'{"message":"BAD news"}', host="elsewhere.example")
            assert status == 201 and received[-1][1] == b'{"message":"BAD news"}'
            assert [t for t, _ in pipeline.messages] == ["BAD news", "please mask-me"]
            assert gw.chat_apis.stats["blocked"] == 1 and gw.chat_apis.stats["masked"] == 1
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_bad_route_is_a_start_error(tmp_path):
    with pytest.raises(GatewayError, match="API one of"):
        Gateway(GatewaySettings(mode=["regular@127.0.0.1:0"]), StubPipeline(), data_dir=tmp_path,
                factories={}, transfers=None, chat_settings=ChatApiSettings(routes=["aim=/api/"]))


def test_identity_table_is_bounded_oldest_first():
    apis = ChatApis(StubPipeline(), inspection=None, settings=ChatApiSettings(max_identities=2))
    for i in range(3):
        apis.learn_identity(credential_key(f"t{i}"), f"@u{i}:x")
    assert apis.user(credential_key("t0")) == credential_key("t0")      # forgotten: attributed to the hash
    assert apis.user(credential_key("t2")) == "@u2:x"


def test_a_failing_check_refuses_the_request(tmp_path, caplog):
    """When policy raises, the chat call is refused (403 in the API's shape), never forwarded uninspected."""
    class Broken(StubPipeline):
        def check_message(self, text, ctx):
            raise RuntimeError("policy bug")

    async def main():
        srv, port, received = await start_http_server()
        gw = await gateway(tmp_path, port, Broken(), ChatApiSettings())
        try:
            status, body = await post(gw.port_of("reverse"), "/_matrix/client/v3/rooms/!r:x/send/m.room.message/1",
                                      b'{"msgtype":"m.text","body":"hi"}', method="PUT")
            assert status == 403 and json.loads(body)["errcode"] == "M_FORBIDDEN" and received == []
        finally:
            await gw.stop()
            srv.close()
    run(main())
    assert "could not be inspected" in caplog.text or "inspection failed" in caplog.text


# --- inbound (Matrix): the hooks driven on mitmproxy test flows -------------------------------------------

def inbound_flow(path: str, status: int, body: bytes, headers: dict | None = None):
    from mitmproxy import http
    from mitmproxy.test import tflow
    flow = tflow.tflow(req=http.Request.make("GET", f"http://hs.example{path}",
                                             headers={"Authorization": "Bearer bob-token"}), live=True)
    flow.response = None
    flow.metadata["test_response"] = http.Response.make(status, body, headers or
                                                        {"content-type": "application/octet-stream"})
    return flow


async def through(apis: ChatApis, flow) -> None:
    """The hooks in mitmproxy's order: request headers, then (unless answered) the server's response."""
    apis.requestheaders(flow)
    if flow.response is not None:
        return                                      # answered at once (a blocked mxc)
    flow.response = flow.metadata.pop("test_response")
    apis.responseheaders(flow)
    if flow.error is None:                          # not killed
        await apis.response(flow)


def inbound_addon(pipeline, **settings):
    from imguard.gateway.inspection import Inspection
    apis = ChatApis(pipeline, Inspection(pipeline), settings=ChatApiSettings(**settings))
    apis.learn_identity(credential_key("bob-token"), "@bob:x")
    return apis


SYNC = json.dumps({"next_batch": "s1", "rooms": {"join": {"!r:x": {"timeline": {"events": [
    {"type": "m.room.message", "sender": "@alice:x", "event_id": "$1", "content": {"msgtype": "m.text",
                                                                                   "body": "BAD news"}},
    {"type": "m.room.message", "sender": "@alice:x", "event_id": "$2", "content": {"body": "a mask-me b"}},
    {"type": "m.room.message", "sender": "@alice:x", "event_id": "$3", "content": {"body": "fine"}},
    {"type": "m.room.message", "sender": "@bob:x", "event_id": "$4", "content": {"body": "BAD own"}},
    {"type": "m.room.message", "sender": "@alice:x", "event_id": "$5",
     "content": {"msgtype": "m.file", "body": "r.bin", "url": "mxc://x/F"}},
]}}}}}).encode()


def test_sync_messages_from_others_are_decided_inbound():
    """Others' messages go to policy with origin FROM_SERVER (sender, the token's user as recipient, the room);
    the user's own are not decided again. Blocked -> the notice, masked -> masked, the rest untouched. A later
    sync repeating an event is rewritten again without a second record."""
    pipeline = StubPipeline()
    apis = inbound_addon(pipeline)

    async def main():
        flow = inbound_flow("/_matrix/client/v3/sync?since=s0", 200, SYNC, {"content-type": "application/json"})
        await through(apis, flow)
        return flow
    flow = run(main())
    assert [t for t, _ in pipeline.messages] == ["BAD news", "a mask-me b", "fine", "r.bin"]
    ctx = pipeline.messages[0][1]
    assert (ctx.origin, ctx.sender, ctx.recipients, ctx.conversation) == ("server", "@alice:x", ("@bob:x",), "!r:x")
    events = json.loads(flow.response.content)["rooms"]["join"]["!r:x"]["timeline"]["events"]
    assert events[0]["content"] == {"msgtype": "m.notice",
                                    "body": "A message from @alice:x was blocked by imguard: no BAD words"}
    assert events[1]["content"]["body"] == "a [X] b"
    assert [e["content"]["body"] for e in events[2:]] == ["fine", "BAD own", "r.bin"]
    assert apis.shared["mxc://x/F"].sender == "@alice:x"

    again = run(main())
    assert len(pipeline.messages) == 4, "a repeated event was decided twice"
    assert json.loads(again.response.content) == json.loads(flow.response.content)

    clean = SYNC.replace(b"BAD news", b"good news").replace(b"mask-me", b"plain").replace(b'"$', b'"$n')

    async def untouched():
        f = inbound_flow("/_matrix/client/v3/sync", 200, clean, {"content-type": "application/json"})
        await through(apis, f)
        return f
    assert run(untouched()).response.content == clean        # nothing changed: not re-serialised


def test_media_download_is_scanned_inbound():
    """The bytes of a download are scanned with the sharer (from /sync) as sender: blocked -> M_FORBIDDEN, the
    mxc marked blocked (a later GET is refused at once); a thumbnail is scanned too but does not mark the mxc;
    clean bytes pass untouched; a body over max_upload_size (Content-Length) is killed unread."""
    pipeline = StubPipeline()
    apis = inbound_addon(pipeline, max_upload_size=100)

    async def get(path, body, headers=None):
        f = inbound_flow(path, 200, body, headers)
        await through(apis, f)
        return f
    run(get("/_matrix/client/v3/sync", SYNC, {"content-type": "application/json"}))

    thumb = run(get("/_matrix/client/v1/media/thumbnail/x/F?width=32&height=32", b"EVIL thumb"))
    assert thumb.response.status_code == 403 and apis._blocked("mxc://x/F") is None
    got = run(get("/_matrix/client/v1/media/download/x/F", b"EVIL bytes"))
    assert got.response.status_code == 403
    assert json.loads(got.response.content)["errcode"] == "M_FORBIDDEN" and b"EVIL" not in got.response.content
    assert apis._blocked("mxc://x/F")
    again = run(get("/_matrix/media/v3/download/x/F", b"EVIL bytes"))
    assert again.response.status_code == 403

    clean = run(get("/_matrix/media/v3/download/x/G/report.bin", b"clean bytes"))
    assert clean.response.status_code == 200 and clean.response.content == b"clean bytes"
    big = run(get("/_matrix/media/v3/download/x/H", b"x" * 200, {"content-length": "200"}))
    assert big.error is not None, "a download too large to scan was not stopped"
    kind, reason, ctx = pipeline.records[-1]
    assert (kind, reason, ctx.origin, ctx.recipients) == ("unscannable", "too_large", "server", ("@bob:x",))


def test_inbound_download_context_names_both_parties():
    seen = []

    class Recording(StubPipeline):
        def check_file(self, data, ctx, name="", claimed_mime="", truncated=False):
            seen.append((name, ctx))
            return super().check_file(data, ctx, name, claimed_mime, truncated)
    apis = inbound_addon(Recording())

    async def main():
        await through(apis, inbound_flow("/_matrix/client/v3/sync", 200, SYNC, {"content-type": "application/json"}))
        await through(apis, inbound_flow("/_matrix/client/v1/media/download/x/F", 200, b"data"))
    run(main())
    name, ctx = seen[0]
    assert name == "r.bin" and ctx.origin == "server" and ctx.sender == "@alice:x"
    assert ctx.recipients == ("@bob:x",) and ctx.conversation == "!r:x"
    assert ctx.transfer_mechanism == "matrix:media_download"


def test_delivered_verdicts_are_remembered_but_edits_and_blocked_files_are_decided_again():
    """A Mattermost post delivered twice is decided once; an edit of it (same id, new text) is decided again; a
    post whose file's download was blocked since becomes the notice (a pass remembered before does not hide it)."""
    pipeline = StubPipeline()
    apis = inbound_addon(pipeline)
    apis.learn_identity(credential_key("bob-token"), "bob")

    def posts(message, file_ids=()):
        return json.dumps({"order": ["p1"], "posts": {"p1": {"id": "p1", "user_id": "alice", "channel_id": "c",
                                                             "message": message, "file_ids": list(file_ids)}}}).encode()

    async def get(path, body):
        f = inbound_flow(path, 200, body, {"content-type": "application/json"})
        await through(apis, f)
        return f
    run(get("/api/v4/channels/c/posts", posts("hello", ["f1"])))
    run(get("/api/v4/channels/c/posts", posts("hello", ["f1"])))
    assert [t for t, _ in pipeline.messages] == ["hello"]
    edited = run(get("/api/v4/channels/c/posts", posts("BAD hello", ["f1"])))
    assert [t for t, _ in pipeline.messages] == ["hello", "BAD hello"]
    assert json.loads(edited.response.content)["posts"]["p1"]["message"] == \
        "A message from alice was blocked by imguard: no BAD words"
    download = run(get("/api/v4/files/f1", b"EVIL"))
    assert download.response.status_code == 403 and json.loads(download.response.content)["status_code"] == 403
    later = run(get("/api/v4/channels/c/posts", posts("hello", ["f1"])))
    post = json.loads(later.response.content)["posts"]["p1"]
    assert post["message"].startswith("A message from alice was blocked by imguard: This message shares a file")
    assert post["file_ids"] == []
    ctx = [e for e in pipeline.records if isinstance(e, dict)][-1]["imguard"]["context"]
    assert (ctx["origin"], ctx["sender"], ctx["recipients"]) == ("server", "alice", ["bob"])


def test_an_undecodable_delivery_is_refused_not_passed():
    """A history response that is not the JSON the API promises (or nested past the bound) is never passed to the
    client undecided: 502 in the API's error shape, and an anomaly recorded."""
    pipeline = StubPipeline()
    apis = inbound_addon(pipeline)

    async def get(path, body):
        f = inbound_flow(path, 200, body, {"content-type": "application/json"})
        await through(apis, f)
        return f
    broken = run(get("/api/v1/channels.history?roomId=R", b'{"messages": [{"msg": "BAD'))
    assert broken.response.status_code == 502 and b"BAD" not in broken.response.content
    assert json.loads(broken.response.content)["success"] is False
    deep = run(get("/api/v10/channels/1/messages", b"[" * 400 + b"]" * 400))
    assert deep.response.status_code == 502 and json.loads(deep.response.content)["code"] == 0
    anomalies = [e["imguard"]["anomaly"] for e in pipeline.records
                 if isinstance(e, dict) and "anomaly" in e.get("imguard", {})]
    assert [a["kind"] for a in anomalies] == ["chat_response_malformed"] * 2


# --- the WebSocket carrier, message by message (mitmproxy's own test flows, no sockets) ------------------------

def discord_socket(query: str, fail_open: bool = False):
    """A ChatApis with the stub pipeline and a Discord gateway WebSocket flow after its handshake."""
    from mitmproxy.test import tflow
    pipeline = StubPipeline()
    chat = ChatApis(pipeline, None, record=pipeline.record, commit=lambda: None, parse_fail_open=lambda: fail_open)
    flow = tflow.twebsocketflow(messages=False)
    flow.request.host, flow.request.path = "gateway.discord.gg", query
    flow.request.headers["host"] = "gateway.discord.gg"
    return chat, flow, pipeline


def server_says(chat: ChatApis, flow, data: bytes):
    """One server message through the carrier: the message as it leaves for the client (dropped or not)."""
    from mitmproxy import websocket
    message = websocket.WebSocketMessage(2, False, data)       # binary, from the server
    flow.websocket.messages.append(message)
    asyncio.run(chat.websocket_message(flow))
    return message


def dispatch(content: str, author: str = "900", seq: int = 1) -> bytes:
    return json.dumps({"op": 0, "t": "MESSAGE_CREATE", "s": seq, "d": {
        "id": f"m{seq}", "channel_id": "42", "content": content, "author": {"id": author}}}).encode()


def anomalies(pipeline: StubPipeline, kind: str) -> list:
    return [r for r in pipeline.records if isinstance(r, dict)
            and r.get("imguard", {}).get("anomaly", {}).get("kind") == kind]


@pytest.mark.parametrize("fail_open", [False, True])
def test_discord_zlib_stream_unreadable_payload_and_broken_stream(fail_open):
    """On a zlib-stream socket every payload reaches the client from imguard's own stream (the client's inflater
    reads each); a payload that inflates but is not JSON is an anomaly, dropped (closed) or relayed (open); a
    stream that cannot be inflated is an anomaly and nothing more reaches the client, whatever the fail mode."""
    import zlib
    chat, flow, pipeline = discord_socket("/?v=10&encoding=json&compress=zlib-stream", fail_open)
    server, client = zlib.compressobj(), zlib.decompressobj()

    def compressed(raw: bytes) -> bytes:
        return server.compress(raw) + server.flush(zlib.Z_SYNC_FLUSH)
    hello = server_says(chat, flow, compressed(b'{"op":10,"d":{"heartbeat_interval":41250}}'))
    assert not hello.dropped and json.loads(client.decompress(hello.content))["op"] == 10
    bad = server_says(chat, flow, compressed(dispatch("a BAD one")))
    assert json.loads(client.decompress(bad.content))["d"]["content"].startswith("A message from 900 was blocked")
    junk = server_says(chat, flow, compressed(b"<not json>"))
    assert len(anomalies(pipeline, "chat_websocket_malformed")) == 1
    if fail_open:
        assert not junk.dropped and client.decompress(junk.content) == b"<not json>"
    else:
        assert junk.dropped
    fine = server_says(chat, flow, compressed(dispatch("fine", seq=3)))
    assert json.loads(client.decompress(fine.content))["d"]["content"] == "fine"
    broken = server_says(chat, flow, b"\x07\x00\x00\xff\xff")      # a deflate block of the reserved type
    after = server_says(chat, flow, compressed(dispatch("fine again", seq=4)))
    assert broken.dropped and after.dropped
    found = anomalies(pipeline, "chat_websocket_malformed")
    assert len(found) == 2 and "compressed stream" in json.dumps(found[1])
    assert [text for text, _ in pipeline.messages] == ["a BAD one", "fine"]


@pytest.mark.parametrize("fail_open", [False, True])
def test_discord_unreadable_compression_follows_the_fail_mode(fail_open):
    """compress=zstd-stream: an anomaly at the handshake; closed: refused with 400 in Discord's error shape; open:
    the socket is relayed uninspected (its messages untouched, none decided)."""
    chat, flow, pipeline = discord_socket("/?v=10&encoding=json&compress=zstd-stream", fail_open)
    websocket, flow.websocket, flow.response = flow.websocket, None, None     # the handshake: no answer yet
    chat.requestheaders(flow)
    assert len(anomalies(pipeline, "chat_websocket_unreadable")) == 1
    if not fail_open:
        assert flow.response.status_code == 400 and "zstd-stream" in json.loads(flow.response.content)["message"]
        return
    assert flow.response is None
    flow.websocket = websocket
    zstd = b"\x28\xb5\x2f\xfd" + dispatch("BAD")          # not read: relayed as it came
    message = server_says(chat, flow, zstd)
    assert not message.dropped and message.content == zstd and pipeline.messages == []


def test_plain_socket_message_over_the_limit_is_dropped():
    """A server message over max_delivery_size is dropped with an anomaly (never passed undecided); the next
    one is decided as usual."""
    from imguard.gateway.chat_apis import ChatApiSettings
    chat, flow, pipeline = discord_socket("/?v=10&encoding=json")
    chat.settings = ChatApiSettings(max_delivery_size=1000)
    big = server_says(chat, flow, dispatch("x" * 2000))
    assert big.dropped and len(anomalies(pipeline, "chat_websocket_too_large")) == 1
    edge = dispatch("BAD")
    edge = edge[:-1] + b" " * (1000 - len(edge)) + b"}"
    assert len(edge) == 1000
    ok = server_says(chat, flow, edge)
    assert not ok.dropped and json.loads(ok.content)["d"]["content"].startswith("A message from 900 was blocked")
