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

    def record(self, event):
        self.records.append(event)


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
