"""The chat-API decoders (imguard/protocols/httpchat), pure: documented request shapes in, typed events out."""

from __future__ import annotations

import json
import zlib

import pytest

from imguard.protocols import httpchat
from imguard.protocols.httpchat import bodies, discord, mattermost, matrix, rocketchat, slack
from imguard.protocols.httpchat.events import (ChatMessage, EncryptedContent, FileUpload, HttpRequest, Identity,
                                               MalformedRequest, StoredMedia, UploadSlot, credential_key)

TOKEN = "syt_YWxpY2U_secret"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
BOUNDARY = "----imguardBoundary7MA4YWxk"


def multipart(fields: list[tuple[str, str | None, str, bytes]], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """(name, filename, content type, data) parts as a browser would send them."""
    out = b""
    for name, filename, ctype, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


MP = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Authorization": "Bot discord-token"}


def decode(api, method, url, headers, body):
    req = HttpRequest.make(method, url, headers, body if isinstance(body, bytes) else json.dumps(body).encode())
    ep = api.classify(req.method, req.path)
    assert ep is not None, f"{method} {url} not recognised"
    return ep, req, api.decode(ep, req)


def kinds(events):
    return [type(e).__name__ for e in events]


# --- routes ---------------------------------------------------------------------------------------------

def test_default_routes_pick_the_api_by_path_on_any_host():
    """Any host: /_matrix/ is Matrix, /api/v4/ Mattermost before Slack's /api/, unversioned Discord still found."""
    routes = httpchat.Routes.parse(httpchat.DEFAULT_ROUTES)
    assert routes.match("chat.internal.example", "/_matrix/client/v3/sync")[0] is matrix
    assert routes.match("mm.example", "/api/v4/posts")[0] is mattermost
    assert routes.match("rc.example", "/api/v1/chat.sendMessage")[0] is rocketchat
    assert routes.match("slack.com", "/api/chat.postMessage")[0] is slack
    assert routes.match("discord.com", "/api/v10/channels/1/messages")[0] is discord
    assert discord in routes.match("discord.com", "/api/channels/1/messages")  # via the /api/ route, classify decides
    assert routes.match("example.com", "/index.html") == []


def test_routes_with_hosts_and_errors():
    routes = httpchat.Routes.parse(["mattermost=chat.corp.example/api/v4/", "slack=*.slack.com/api/"])
    assert routes.match("chat.corp.example", "/api/v4/posts") == [mattermost]
    assert routes.match("other.example", "/api/v4/posts") == []
    assert routes.match("edge.slack.com", "/api/chat.postMessage") == [slack]
    with pytest.raises(ValueError, match="API one of"):
        httpchat.Routes.parse(["icq=/api/"])
    with pytest.raises(ValueError, match="must start with /"):
        httpchat.Routes.parse(["matrix=_matrix"])


# --- Matrix ---------------------------------------------------------------------------------------------

SEND = "/_matrix/client/v3/rooms/!room%3Alocalhost/send/m.room.message/txn1"


def test_matrix_text_message():
    """m.text: body and formatted_body (HTML stripped for policy) are both read; room unescaped; sender is the
    token's hash until the token is known."""
    ep, req, events = decode(matrix, "PUT", SEND, AUTH, {"msgtype": "m.text", "body": "hello *bob*",
                                                         "format": "org.matrix.custom.html",
                                                         "formatted_body": "hello <b>bob</b> <a href='https://x.example/p'>link</a>"})
    [msg] = events
    assert isinstance(msg, ChatMessage) and msg.room == "!room:localhost" and msg.sender == credential_key(TOKEN)
    assert [p.text for p in msg.parts] == ["hello *bob*", "hello bob  https://x.example/p link"]
    assert msg.parts[1].html and msg.kind == "m.text"


def test_matrix_legacy_r0_and_query_token():
    ep, req, [msg] = decode(matrix, "PUT", "/_matrix/client/r0/rooms/!r:x/send/m.room.message/1?access_token=abc",
                            {}, {"msgtype": "m.notice", "body": "n"})
    assert msg.sender == credential_key("abc") and msg.parts[0].text == "n"


def test_matrix_file_message_refs_and_encrypted_attachment():
    """m.file shares its mxc (and thumbnail); an EncryptedFile is recognised as encrypted, its mxc still a ref."""
    _, _, [msg] = decode(matrix, "PUT", SEND, AUTH, {"msgtype": "m.file", "body": "report.pdf", "url": "mxc://localhost/abc",
                                                     "info": {"thumbnail_url": "mxc://localhost/th"}})
    assert msg.refs == ("mxc://localhost/abc", "mxc://localhost/th")
    _, _, events = decode(matrix, "PUT", SEND, AUTH, {
        "msgtype": "m.image", "body": "cat.jpg",
        "file": {"url": "mxc://localhost/enc", "key": {"kty": "oct", "alg": "A256CTR", "k": "x"}, "iv": "y",
                 "hashes": {"sha256": "z"}, "v": "v2"}})
    assert kinds(events) == ["EncryptedContent", "ChatMessage"]
    assert events[0].scheme == "EncryptedFile" and events[0].refs == ("mxc://localhost/enc",)
    assert "mxc://localhost/enc" in events[1].refs


def test_matrix_megolm_event_is_encrypted_content():
    _, _, [ev] = decode(matrix, "PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.encrypted/t", AUTH,
                        {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA...", "session_id": "s"})
    assert isinstance(ev, EncryptedContent) and ev.scheme == "m.room.encrypted" and ev.room == "!r:x"


def test_matrix_other_events_carry_no_chat():
    _, _, events = decode(matrix, "PUT", "/_matrix/client/v3/rooms/!r:x/send/m.reaction/t", AUTH,
                          {"m.relates_to": {"rel_type": "m.annotation", "key": "👍"}})
    assert events == []


def test_matrix_media_endpoints():
    """Uploads (legacy, authenticated, async PUT) are FileUploads; downloads and thumbnails name their mxc."""
    for path in ("/_matrix/media/v3/upload?filename=a.txt", "/_matrix/media/r0/upload?filename=a.txt",
                 "/_matrix/client/v1/media/upload?filename=a.txt"):
        ep, req, [up] = decode(matrix, "POST", path, {**AUTH, "Content-Type": "text/plain"}, b"data")
        assert isinstance(up, FileUpload) and up.name == "a.txt" and up.mime == "text/plain" and up.data == b"data"
        assert ep.learn
    ep, req, [up] = decode(matrix, "PUT", "/_matrix/media/v3/upload/localhost/AbCd?filename=b.bin", AUTH, b"x")
    assert up.ref == "mxc://localhost/AbCd" and up.name == "b.bin"
    assert matrix.classify("POST", "/_matrix/media/v1/create").kind == "learn"
    for path in ("/_matrix/media/v3/download/localhost/AbCd", "/_matrix/client/v1/media/download/localhost/AbCd/f.txt",
                 "/_matrix/client/v1/media/thumbnail/localhost/AbCd"):
        ep = matrix.classify("GET", path)
        assert ep.kind == "download" and ep.ref == "mxc://localhost/AbCd"


def test_matrix_learns_identities_and_uploaded_media():
    login = matrix.classify("POST", "/_matrix/client/v3/login")
    req = HttpRequest.make("POST", "/_matrix/client/v3/login", {}, b"{}")
    body = json.dumps({"user_id": "@alice:localhost", "access_token": TOKEN, "device_id": "D"}).encode()
    assert matrix.learn(login, req, 200, body) == [Identity(credential_key(TOKEN), "@alice:localhost")]
    assert matrix.learn(login, req, 403, body) == []
    whoami = matrix.classify("GET", "/_matrix/client/v3/account/whoami")
    req = HttpRequest.make("GET", "/_matrix/client/v3/account/whoami", AUTH)
    assert matrix.learn(whoami, req, 200, b'{"user_id":"@bob:localhost"}') == [
        Identity(credential_key(TOKEN), "@bob:localhost")]
    up = matrix.classify("POST", "/_matrix/media/v3/upload")
    assert matrix.learn(up, req, 200, b'{"content_uri":"mxc://localhost/x"}') == [StoredMedia("mxc://localhost/x")]
    assert matrix.learn(up, req, 200, b"not json") == []


def test_matrix_malformed_json_and_error_shape():
    _, _, [bad] = decode(matrix, "PUT", SEND, AUTH, b'{"msgtype": "m.text", "body": ')
    assert isinstance(bad, MalformedRequest) and bad.status == 400
    _, _, [bad] = decode(matrix, "PUT", SEND, AUTH, b"[1, 2]")
    assert isinstance(bad, MalformedRequest)
    assert json.loads(matrix.error_body(403, "blocked: x")) == {"errcode": "M_FORBIDDEN", "error": "blocked: x"}
    assert json.loads(matrix.error_body(413, "big"))["errcode"] == "M_TOO_LARGE"


def test_json_nesting_is_bounded_before_parsing():
    """Ten thousand nested arrays are refused by counting, not by json.loads recursing; brackets in strings
    do not count."""
    deep = b'{"msgtype":"m.text","body":"x","extra":' + b"[" * 10000 + b"]" * 10000 + b"}"
    _, _, [bad] = decode(matrix, "PUT", SEND, AUTH, deep)
    assert isinstance(bad, MalformedRequest) and "nested deeper than 64" in bad.reason
    assert bodies.json_depth(b'{"a": "[[[[[[[[", "b": [1, {"c": 2}]}') == 3
    assert bodies.parse_json(b"[" * 64 + b"]" * 64, 64) is not None            # the edge: exactly the limit
    with pytest.raises(bodies.BodyError):
        bodies.parse_json(b"[" * 65 + b"]" * 65, 64)
    assert bodies.json_depth(b'{"a": "\\"[[[["}') == 1


# --- Slack ----------------------------------------------------------------------------------------------

def test_slack_post_message_json_with_blocks():
    _, _, [msg] = decode(slack, "POST", "/api/chat.postMessage", {"Authorization": "Bearer xoxb-1",
                                                                 "Content-Type": "application/json; charset=utf-8"},
                         {"channel": "C123", "text": "hi", "blocks": [
                             {"type": "section", "text": {"type": "mrkdwn", "text": "block text"}}]})
    assert msg.room == "C123" and [p.text for p in msg.parts] == ["hi", "block text"]
    assert msg.parts[1].locator == ("json", "blocks", 0, "text", "text")
    assert msg.sender == credential_key("xoxb-1")


def test_slack_post_message_form_encoded_with_token_field():
    _, _, [msg] = decode(slack, "POST", "/api/chat.postMessage", {"Content-Type": "application/x-www-form-urlencoded"},
                         b"token=xoxp-9&channel=C1&text=hello+there%21")
    assert msg.parts[0].text == "hello there!" and msg.parts[0].locator == ("form", "text")
    assert msg.sender == credential_key("xoxp-9")


def test_slack_legacy_files_upload_and_two_step_flow():
    body = multipart([("channels", None, "", b"C1"), ("initial_comment", None, "", b"see attached"),
                      ("file", "q.csv", "text/csv", b"a,b\n1,2\n")])
    _, _, events = decode(slack, "POST", "/api/files.upload", MP, body)
    assert kinds(events) == ["FileUpload", "ChatMessage"]
    assert events[0].name == "q.csv" and events[0].data == b"a,b\n1,2\n" and events[0].room == "C1"
    assert events[1].parts[0].text == "see attached"
    _, _, [up] = decode(slack, "POST", "/api/files.upload", {"Content-Type": "application/x-www-form-urlencoded"},
                        b"channels=C1&filename=n.txt&content=plain+text")
    assert up.data == b"plain text" and up.name == "n.txt"
    # step 1: the upload URL is learned from the response
    ep, req, events = decode(slack, "POST", "/api/files.getUploadURLExternal",
                             {"Content-Type": "application/x-www-form-urlencoded", "Authorization": "Bearer xoxb-2"},
                             b"filename=r.pdf&length=5")
    assert events == [] and ep.learn
    [slot] = slack.learn(ep, req, 200, b'{"ok":true,"upload_url":"https://files.slack.com/upload/v1/ABC","file_id":"F1"}')
    assert slot == UploadSlot("https://files.slack.com/upload/v1/ABC", "slack:F1", "r.pdf", credential_key("xoxb-2"))
    # step 2: the bytes, raw or multipart
    ep2 = slack.upload_endpoint()
    [f] = slack.decode(ep2, HttpRequest.make("POST", "https://files.slack.com/upload/v1/ABC", {}, b"%PDF-1"))
    assert f.data == b"%PDF-1"
    [f] = slack.decode(ep2, HttpRequest.make("POST", "https://files.slack.com/upload/v1/ABC", MP,
                                             multipart([("filename", "r.pdf", "application/pdf", b"%PDF-2")])))
    assert f.data == b"%PDF-2" and f.name == "r.pdf"
    # step 3: the share names the file id
    _, _, [msg] = decode(slack, "POST", "/api/files.completeUploadExternal", AUTH,
                         {"files": [{"id": "F1", "title": "Report"}], "channel_id": "C1", "initial_comment": "here"})
    assert msg.refs == ("slack:F1",) and [p.text for p in msg.parts] == ["Report", "here"]
    assert slack.classify("POST", "/api/users.list") is None
    assert json.loads(slack.error_body(403, "why"))["ok"] is False


# --- Mattermost -----------------------------------------------------------------------------------------

def test_mattermost_files_and_posts():
    body = multipart([("channel_id", None, "", b"ch1"), ("files", "a.txt", "text/plain", b"AAA"),
                      ("files", "b.txt", "text/plain", b"BBB"), ("client_ids", None, "", b"c1")])
    _, _, events = decode(mattermost, "POST", "/api/v4/files", MP, body)
    assert [(e.name, e.data, e.room) for e in events] == [("a.txt", b"AAA", "ch1"), ("b.txt", b"BBB", "ch1")]
    _, _, [raw] = decode(mattermost, "POST", "/api/v4/files?channel_id=ch2&filename=c.bin", {}, b"CCC")
    assert raw.name == "c.bin" and raw.room == "ch2"
    _, _, [post] = decode(mattermost, "POST", "/api/v4/posts", AUTH,
                          {"channel_id": "ch1", "message": "hello", "file_ids": ["f1"],
                           "props": {"attachments": [{"text": "att text"}]}})
    assert [p.text for p in post.parts] == ["hello", "att text"] and post.refs == ("mattermost:f1",)
    assert post.parts[1].locator == ("json", "props", "attachments", 0, "text")
    assert mattermost.classify("PUT", "/api/v4/posts/abc123/patch").name == "post"
    assert mattermost.classify("GET", "/api/v4/users/me/teams") is None
    assert json.loads(mattermost.error_body(403, "r"))["status_code"] == 403


# --- Rocket.Chat ----------------------------------------------------------------------------------------

def test_rocketchat_upload_messages_and_confirm():
    body = multipart([("file", "x.png", "image/png", b"\x89PNG"), ("msg", None, "", b"look"),
                      ("description", None, "", b"a picture")])
    _, _, events = decode(rocketchat, "POST", "/api/v1/rooms.upload/GENERAL", {**MP, "X-User-Id": "u1"}, body)
    assert kinds(events) == ["FileUpload", "ChatMessage"]
    assert events[0].room == "GENERAL" and events[0].sender == "u1"
    assert events[1].text.split("\n\u2029") == ["look", "a picture"]
    _, _, [m] = decode(rocketchat, "POST", "/api/v1/chat.sendMessage",
                       {"X-User-Id": "u1", "Content-Type": "application/json"},
                       {"message": {"rid": "R1", "msg": "hi"}})
    assert m.room == "R1" and m.parts[0].locator == ("json", "message", "msg")
    _, _, [m] = decode(rocketchat, "POST", "/api/v1/chat.postMessage", {"Content-Type": "application/json"},
                       {"channel": "#general", "text": "yo", "attachments": [{"title": "t", "text": "att"}]})
    assert m.room == "#general" and [p.text for p in m.parts] == ["yo", "t", "att"]
    _, _, [m] = decode(rocketchat, "POST", "/api/v1/rooms.mediaConfirm/R1/file9", {"Content-Type": "application/json"},
                       {"msg": "caption"})
    assert m.refs == ("rocketchat:file9",)
    assert json.loads(rocketchat.error_body(403, "no"))["success"] is False


def test_rocketchat_ddp_websocket_bare_and_sockjs():
    ddp = {"msg": "method", "method": "sendMessage", "id": "7", "params": [{"_id": "m1", "rid": "R1", "msg": "ws hi"}]}
    [(call_id, index, msg)] = rocketchat.decode_ws(json.dumps(ddp).encode(), "u1")
    assert call_id == "7" and index is None and msg.text == "ws hi" and msg.room == "R1"
    frame = json.dumps([json.dumps({"msg": "ping"}), json.dumps(ddp)]).encode()
    [(call_id, index, msg)] = rocketchat.decode_ws(frame)
    assert index == 1
    out = rocketchat.rewrite_ws(frame, bodies.masked_replacements(msg.parts, "ws [REDACTED:keyword]"))
    assert json.loads(json.loads(out)[1])["params"][0]["msg"] == "ws [REDACTED:keyword]"
    assert rocketchat.decode_ws(b"h") == [] and rocketchat.decode_ws(b'{"msg":"sub"}') == []
    err = rocketchat.ws_error("7", "blocked", sockjs=True)
    assert err.startswith(b"a[") and json.loads(json.loads(err[1:])[0])["error"]["reason"] == "blocked"


# --- Discord --------------------------------------------------------------------------------------------

def test_discord_messages_json_multipart_and_two_step_attachments():
    _, _, [m] = decode(discord, "POST", "/api/v10/channels/123/messages",
                       {"Authorization": "Bot t", "Content-Type": "application/json"},
                       {"content": "hi",
                        "embeds": [{"title": "T", "description": "D", "fields": [{"name": "n", "value": "v"}]}]})
    assert m.room == "123" and [p.text for p in m.parts] == ["hi", "T", "D", "n", "v"]
    body = multipart([("payload_json", None, "application/json", json.dumps({"content": "with file"}).encode()),
                      ("files[0]", "a.zip", "application/zip", b"PK\x03\x04")])
    _, _, events = decode(discord, "POST", "/api/v10/channels/123/messages", MP, body)
    assert kinds(events) == ["FileUpload", "ChatMessage"]
    assert events[0].name == "a.zip" and events[1].parts[0].locator == ("multipart", 0, "json", "content")
    ep = discord.classify("POST", "/api/v10/channels/123/attachments")
    req = HttpRequest.make("POST", "/api/v10/channels/123/attachments", {"Authorization": "Bot t"}, b"{}")
    [slot] = discord.learn(ep, req, 200, json.dumps({"attachments": [
        {"id": 0, "upload_url": "https://discord-attachments-uploads-prd.storage.googleapis.com/x?sig=1",
         "upload_filename": "abc/a.zip"}]}).encode())
    assert slot.ref == "discord:abc/a.zip" and slot.room == "123"
    _, _, [m] = decode(discord, "POST", "/api/v10/channels/123/messages", {"Content-Type": "application/json"},
                       {"content": "",
                        "attachments": [{"id": "0", "filename": "a.zip", "uploaded_filename": "abc/a.zip"}]})
    assert m.refs == ("discord:abc/a.zip",)
    assert discord.classify("GET", "/api/v10/channels/123/pins") is None
    assert json.loads(discord.error_body(403, "r")) == {"message": "r", "code": 200000}


# --- bodies: multipart strictness and rewriting ---------------------------------------------------------

def test_multipart_truncated_or_broken_is_refused():
    """No closing boundary (an upload cut half-way), a wrong boundary, no boundary parameter: refused."""
    good = multipart([("file", "a.bin", "", b"x" * 100)])
    with pytest.raises(bodies.BodyError, match="closing boundary"):
        bodies.parse_multipart(good[:-40], MP["Content-Type"])
    with pytest.raises(bodies.BodyError, match="does not start"):
        bodies.parse_multipart(good, "multipart/form-data; boundary=other")
    with pytest.raises(bodies.BodyError, match="without a boundary"):
        bodies.parse_multipart(good, "multipart/form-data")
    with pytest.raises(bodies.BodyError, match="more than 2"):
        bodies.parse_multipart(multipart([("a", None, "", b"1")] * 3), MP["Content-Type"], max_parts=2)
    _, _, [bad] = decode(rocketchat, "POST", "/api/v1/rooms.upload/R", MP, good[:-40])
    assert isinstance(bad, MalformedRequest)


def test_multipart_boundary_inside_data_and_every_split():
    """A part whose data contains the boundary text without CRLF before it stays whole."""
    data = b"--" + BOUNDARY.encode() + b"X not a delimiter\r\n"
    parts = bodies.parse_multipart(multipart([("file", "f", "", data)]), MP["Content-Type"])
    assert parts[0].data == data


def test_rewrite_json_form_and_multipart_keeps_the_rest():
    body = json.dumps({"msgtype": "m.text", "body": "card 4111", "formatted_body": "<b>card 4111</b>",
                       "x": [1]}).encode()
    parts = (httpchat.TextPart(("json", "body"), "card 4111"),
             httpchat.TextPart(("json", "formatted_body"), "card 4111", True))
    new = json.loads(bodies.rewrite(body, "application/json", bodies.masked_replacements(
        parts, "card [REDACTED:card]" + httpchat.PART_SEPARATOR + "card [REDACTED:card] <x>")))
    assert new == {"msgtype": "m.text", "body": "card [REDACTED:card]",
                   "formatted_body": "card [REDACTED:card] &lt;x&gt;", "x": [1]}
    # a span that swallowed the separator: every part gets the whole masked text
    reps = bodies.masked_replacements(parts, "[REDACTED:keyword]")
    assert [r[1] for r in reps] == ["[REDACTED:keyword]", "[REDACTED:keyword]"]
    assert bodies.rewrite(b"channel=C1&text=a+secret", "application/x-www-form-urlencoded",
                          [(("form", "text"), "a [X]")]) == b"channel=C1&text=a+%5BX%5D"
    mp = multipart([("payload_json", None, "application/json", b'{"content":"secret"}'), ("files[0]", "f", "", b"BIN")])
    out = bodies.rewrite(mp, MP["Content-Type"], [(("multipart", 0, "json", "content"), "[X]")])
    parsed = bodies.parse_multipart(out, MP["Content-Type"])
    assert json.loads(parsed[0].data) == {"content": "[X]"} and parsed[1].data == b"BIN"


# --- Matrix inbound: what a /sync response delivers ----------------------------------------------------

def sync_body(events_by_room: dict, section: str = "join") -> bytes:
    return json.dumps({"next_batch": "s1", "rooms": {section: {room: {"timeline": {"events": events}}
                                                              for room, events in events_by_room.items()}},
                       "presence": {"events": [{"type": "m.presence", "sender": "@x:h"}]}}).encode()


def msg(sender: str, content: dict, event_id: str = "$e", type_: str = "m.room.message") -> dict:
    return {"type": type_, "sender": sender, "event_id": event_id, "content": content}


def test_matrix_sync_and_thumbnail_endpoints_are_classified():
    assert matrix.classify("GET", "/_matrix/client/v3/sync").kind == "deliver"
    assert matrix.classify("GET", "/_matrix/client/r0/sync").name == "sync"
    assert matrix.classify("POST", "/_matrix/client/v3/sync") is None
    assert matrix.classify("GET", "/_matrix/client/v1/media/thumbnail/h/M").name == "media_thumbnail"
    assert matrix.classify("GET", "/_matrix/media/v3/download/h/M/f.txt").name == "media_download"
    assert matrix.MEDIA_GET.match("/_matrix/media/v3/download/h/M/f.txt").group(4) == "f.txt"


def test_matrix_sync_delivers_messages_and_shared_media():
    """Every m.room.message / m.sticker of a joined or left room's timeline, with its place in the body; the mxc
    each shares with its sender. State, presence, redacted events and other types bring nothing."""
    body = sync_body({"!r:h": [
        msg("@a:h", {"msgtype": "m.text", "body": "hi", "format": "org.matrix.custom.html",
                     "formatted_body": "<b>hi</b> there"}, "$1"),
        {"type": "m.room.member", "sender": "@a:h", "state_key": "@a:h", "content": {"membership": "join"}},
        msg("@a:h", {}, "$redacted"),
        msg("@b:h", {"msgtype": "m.file", "body": "r.pdf", "url": "mxc://h/F"}, "$2"),
        msg("@b:h", {"body": "sticker", "url": "mxc://h/S", "info": {}}, "$3", "m.sticker"),
    ]})
    ep = matrix.classify("GET", "/_matrix/client/v3/sync")
    req = HttpRequest.make("GET", "/_matrix/client/v3/sync?since=s0", {"Authorization": f"Bearer {TOKEN}"})
    found = matrix.deliver(ep, req, 200, body)
    delivered = [f for f in found if isinstance(f, httpchat.DeliveredMessage)]
    assert [(d.event_id, d.message.sender, d.message.room) for d in delivered] == [
        ("$1", "@a:h", "!r:h"), ("$2", "@b:h", "!r:h"), ("$3", "@b:h", "!r:h")]
    assert delivered[0].message.text == "hi" + httpchat.PART_SEPARATOR + "hi there"
    assert delivered[0].locator == ("rooms", "join", "!r:h", "timeline", "events", 0)
    assert delivered[1].message.refs == ("mxc://h/F",) and delivered[1].message.kind == "m.file"
    shared = [f for f in found if isinstance(f, httpchat.SharedMedia)]
    assert shared == [httpchat.SharedMedia("mxc://h/F", "@b:h", "!r:h", "r.pdf"),
                      httpchat.SharedMedia("mxc://h/S", "@b:h", "!r:h", "sticker")]
    left = matrix.deliver(ep, req, 200, sync_body({"!old:h": [msg("@a:h", {"body": "bye"})]}, "leave"))
    assert left[0].locator[:3] == ("rooms", "leave", "!old:h")
    assert matrix.deliver(ep, req, 200, b'{"next_batch":"s2"}') == []
    assert matrix.deliver(ep, req, 401, b'{"errcode":"M_UNKNOWN_TOKEN"}') == []
    with pytest.raises(bodies.BodyError):
        matrix.deliver(ep, req, 200, b"not json")
    deep = b'{"rooms":' + b"[" * 300 + b"]" * 300 + b"}"
    with pytest.raises(bodies.BodyError):
        matrix.deliver(ep, req, 200, deep)


def test_matrix_rewrite_sync_blocks_and_masks_in_place():
    body = sync_body({"!r:h": [
        msg("@a:h", {"msgtype": "m.file", "body": "secret", "url": "mxc://h/F", "formatted_body": "<b>secret</b>"},
            "$1") | {"unsigned": {"age": 5, "m.relations": {"m.replace": {"content": {"body": "secret"}}}}},
        msg("@a:h", {"msgtype": "m.text", "body": "call mask-me now"}, "$2"),
        msg("@a:h", {"msgtype": "m.text", "body": "untouched"}, "$3"),
    ]})
    at = ("rooms", "join", "!r:h", "timeline", "events")
    out = json.loads(matrix.rewrite_sync(body, [(at + (0,), "A message from @a:h was blocked by imguard: x")],
                                         [(at + (1,), [(("json", "body"), "call [X] now")])]))
    events = out["rooms"]["join"]["!r:h"]["timeline"]["events"]
    assert events[0]["content"] == {"msgtype": "m.notice", "body": "A message from @a:h was blocked by imguard: x"}
    assert events[0]["unsigned"] == {"age": 5} and "secret" not in json.dumps(out)
    assert events[1]["content"]["body"] == "call [X] now"
    assert events[2]["content"]["body"] == "untouched" and out["next_batch"] == "s1"
    with pytest.raises(bodies.BodyError):
        matrix.rewrite_sync(body, [(at + (9,), "x")])


# --- inbound: what responses deliver, every API ----------------------------------------------------------

def delivered_of(found):
    return [f for f in found if isinstance(f, httpchat.DeliveredMessage)]


def shared_of(found):
    return [f for f in found if isinstance(f, httpchat.SharedMedia)]


def blank_and_mask(api, body, found, blocked_index=0, masked_index=1, mask=("mask-me", "[X]")):
    """The API's rewrite: the first delivered message blocked, the second masked; the parsed result."""
    d = delivered_of(found)
    masked_parts = [(p.locator, p.text.replace(*mask)) for p in d[masked_index].message.parts]
    return json.loads(api.rewrite_delivered(body, [(d[blocked_index].locator, "A message from X was blocked")],
                                            [(d[masked_index].locator, masked_parts)]))


def test_matrix_messages_context_and_event_deliver():
    """/messages (chunk), /context (event, events_before, events_after) and /event (the event itself) deliver
    like /sync: each message with its place, the room from the event or the path; rewrite at those places."""
    get = {"Authorization": f"Bearer {TOKEN}"}
    chunk = {"start": "t1", "end": "t2", "chunk": [
        msg("@a:h", {"msgtype": "m.text", "body": "secret here"}, "$1") | {"room_id": "!r:h"},
        msg("@a:h", {"msgtype": "m.text", "body": "a mask-me b"}, "$2") | {"room_id": "!r:h"},
        {"type": "m.room.member", "sender": "@a:h", "content": {"membership": "join"}}]}
    path = "/_matrix/client/v3/rooms/%21r%3Ah/messages?dir=b&from=t0"
    ep = matrix.classify("GET", "/_matrix/client/v3/rooms/%21r%3Ah/messages")
    assert (ep.name, ep.kind) == ("messages", "deliver")
    body = json.dumps(chunk).encode()
    found = matrix.deliver(ep, HttpRequest.make("GET", path, get), 200, body)
    assert [(d.event_id, d.locator, d.message.room) for d in delivered_of(found)] == [
        ("$1", ("chunk", 0), "!r:h"), ("$2", ("chunk", 1), "!r:h")]
    out = blank_and_mask(matrix, body, found)
    assert out["chunk"][0]["content"] == {"msgtype": "m.notice", "body": "A message from X was blocked"}
    assert out["chunk"][1]["content"]["body"] == "a [X] b" and out["end"] == "t2"

    ctx_path = "/_matrix/client/r0/rooms/%21r%3Ah/context/%24e"
    ep = matrix.classify("GET", ctx_path)
    context = {"event": msg("@a:h", {"body": "the one"}, "$e"), "events_before": [msg("@b:h", {"body": "b"}, "$b")],
               "events_after": [msg("@c:h", {"body": "c"}, "$c")], "state": []}
    found = matrix.deliver(ep, HttpRequest.make("GET", ctx_path + "?limit=5", get), 200, json.dumps(context).encode())
    assert [(d.locator, d.message.room, d.message.sender) for d in delivered_of(found)] == [
        (("event",), "!r:h", "@a:h"), (("events_before", 0), "!r:h", "@b:h"), (("events_after", 0), "!r:h", "@c:h")]

    ev_path = "/_matrix/client/v3/rooms/%21r%3Ah/event/%24e"
    ep = matrix.classify("GET", ev_path)
    body = json.dumps(msg("@a:h", {"msgtype": "m.file", "body": "r.pdf", "url": "mxc://h/F"}, "$e")).encode()
    found = matrix.deliver(ep, HttpRequest.make("GET", ev_path, get), 200, body)
    [d] = delivered_of(found)
    assert d.locator == () and d.message.refs == ("mxc://h/F",)
    assert shared_of(found) == [httpchat.SharedMedia("mxc://h/F", "@a:h", "!r:h", "r.pdf")]
    out = json.loads(matrix.rewrite_delivered(body, [((), "blocked")]))
    assert out["content"] == {"msgtype": "m.notice", "body": "blocked"} and out["event_id"] == "$e"
    for path in ("/_matrix/client/v1/rooms/%21r%3Ah/relations/%24root/m.thread",
                 "/_matrix/client/v1/rooms/%21r%3Ah/relations/%24root", "/_matrix/client/v1/rooms/%21r%3Ah/threads"):
        ep = matrix.classify("GET", path)
        body = json.dumps(chunk).encode()
        found = matrix.deliver(ep, HttpRequest.make("GET", path, get), 200, body)
        assert [d.locator for d in delivered_of(found)] == [("chunk", 0), ("chunk", 1)], path
    for not_chat in ("/_matrix/client/v3/rooms/!r:h/messages/x", "/_matrix/client/v3/rooms/!r:h/context",
                     "/_matrix/client/v3/rooms/!r:h/state"):
        assert matrix.classify("GET", not_chat) is None, not_chat


SLACK_HISTORY = {"ok": True, "has_more": False, "messages": [
    {"type": "message", "user": "U0OUTSIDE", "text": "the secret plan", "ts": "1512085950.000216",
     "files": [{"id": "F0EICAR", "name": "eicar.com", "title": "eicar", "url_private":
                "https://files.slack.com/files-pri/T0TEAM-F0EICAR/eicar.com"}],
     "attachments": [{"fallback": "att", "text": "attachment text"}]},
    {"type": "message", "user": "U0OUTSIDE", "text": "code mask-me", "ts": "1512085951.000300",
     "blocks": [{"type": "rich_text", "elements": [{"type": "rich_text_section",
                                                     "elements": [{"type": "text", "text": "code mask-me"}]}]}]},
    {"type": "message", "user": "U0INSIDE", "text": "mine", "ts": "1512085952.000001"}]}


def test_slack_history_and_file_downloads():
    """conversations.history / .replies (GET with the channel in the query, or POSTed form): each message with
    its sender, the channel, its files as SharedMedia; files-pri URLs are downloads of slack:<file id>."""
    body = json.dumps(SLACK_HISTORY).encode()
    ep = slack.classify("GET", "/api/conversations.history")
    assert (ep.name, ep.kind) == ("conversations.history", "deliver")
    assert slack.classify("POST", "/api/conversations.replies").kind == "deliver"
    req = HttpRequest.make("GET", "/api/conversations.history?channel=C1&limit=10", {"Authorization": "Bearer xoxp-1"})
    found = slack.deliver(ep, req, 200, body)
    d = delivered_of(found)
    assert [(x.message.sender, x.message.room, x.event_id, x.locator) for x in d] == [
        ("U0OUTSIDE", "C1", "C1/1512085950.000216", ("messages", 0)),
        ("U0OUTSIDE", "C1", "C1/1512085951.000300", ("messages", 1)),
        ("U0INSIDE", "C1", "C1/1512085952.000001", ("messages", 2))]
    assert d[0].message.text == "the secret plan" + httpchat.PART_SEPARATOR + "att" + httpchat.PART_SEPARATOR + \
        "attachment text"
    assert d[0].message.refs == ("slack:F0EICAR",)
    assert shared_of(found) == [httpchat.SharedMedia("slack:F0EICAR", "U0OUTSIDE", "C1", "eicar.com")]
    out = blank_and_mask(slack, body, found)
    assert out["messages"][0] == {"type": "message", "user": "U0OUTSIDE", "text": "A message from X was blocked",
                                  "ts": "1512085950.000216"}
    assert "mask-me" not in json.dumps(out["messages"][1]) and out["messages"][1]["text"] == "code [X]"
    posted = HttpRequest.make("POST", "/api/conversations.history",
                              {"Content-Type": "application/x-www-form-urlencoded"},
                              b"channel=C9&token=xoxp-2")
    assert delivered_of(slack.deliver(ep, posted, 200, body))[0].message.room == "C9"
    assert slack.requester(posted) == credential_key("xoxp-2") and slack.requester(req) == credential_key("xoxp-1")
    assert slack.deliver(ep, req, 200, b'{"ok":false,"error":"not_in_channel"}') == []

    dl = slack.classify("GET", "/files-pri/T0TEAM-F0EICAR/download/eicar.com")
    assert (dl.kind, dl.ref, dl.filename, dl.derived) == ("download", "slack:F0EICAR", "eicar.com", False)
    assert slack.classify("GET", "/files-pri/T0TEAM-F0EICAR/eicar.com").ref == "slack:F0EICAR"
    assert slack.classify("POST", "/files-pri/T0TEAM-F0EICAR/eicar.com") is None
    tmb = slack.classify("GET", "/files-tmb/T0TEAM-F0EICAR-8a1c3e4f5d/eicar_360.png")
    assert (tmb.kind, tmb.ref, tmb.derived) == ("download", "slack:F0EICAR", True)
    routes = httpchat.Routes.parse(httpchat.DEFAULT_ROUTES)
    assert routes.match("files.slack.com", "/files-pri/T1-F2/x.pdf") == [slack]
    auth = slack.classify("POST", "/api/auth.test")
    learned = slack.learn(auth, HttpRequest.make("POST", "/api/auth.test", {"Authorization": "Bearer xoxp-1"}), 200,
                          b'{"ok":true,"user":"bob","user_id":"U0INSIDE","team_id":"T0TEAM"}')
    assert learned == [Identity(credential_key("xoxp-1"), "U0INSIDE")]


def test_mattermost_posts_thread_and_files():
    """GET channel posts / a thread ({order, posts}) and a single post: each post (not system posts) with its
    place ("posts", id); file ids as SharedMedia (names from metadata.files); /files/{id} a download,
    /preview and /thumbnail derived ones."""
    posts = {"order": ["p1", "p2", "p3"], "next_post_id": "", "prev_post_id": "", "posts": {
        "p1": {"id": "p1", "user_id": "uout", "channel_id": "ch1", "message": "the secret", "type": "",
               "file_ids": ["f1"], "props": {"attachments": [{"text": "att"}]}, "message_source": "the secret",
               "metadata": {"files": [{"id": "f1", "name": "eicar.com"}], "embeds": []}},
        "p2": {"id": "p2", "user_id": "uout", "channel_id": "ch1", "message": "x mask-me", "type": ""},
        "p3": {"id": "p3", "user_id": "uout", "channel_id": "ch1", "message": "uout joined the channel",
               "type": "system_join_channel"}}}
    body = json.dumps(posts).encode()
    ep = mattermost.classify("GET", "/api/v4/channels/ch1/posts")
    assert (ep.name, ep.kind) == ("channel_posts", "deliver")
    assert mattermost.classify("GET", "/api/v4/posts/p1/thread").name == "thread"
    req = HttpRequest.make("GET", "/api/v4/channels/ch1/posts?page=0", {"Authorization": "Bearer mm-tok"})
    found = mattermost.deliver(ep, req, 200, body)
    assert [(d.event_id, d.locator, d.message.sender, d.message.room, d.message.refs) for d in delivered_of(found)] \
        == [("p1", ("posts", "p1"), "uout", "ch1", ("mattermost:f1",)), ("p2", ("posts", "p2"), "uout", "ch1", ())]
    assert shared_of(found) == [httpchat.SharedMedia("mattermost:f1", "uout", "ch1", "eicar.com")]
    out = blank_and_mask(mattermost, body, found)
    p1 = out["posts"]["p1"]
    assert p1["message"] == "A message from X was blocked" and p1["file_ids"] == [] and p1["props"] == {}
    assert "secret" not in json.dumps(out) and "files" not in p1["metadata"]
    assert out["posts"]["p2"]["message"] == "x [X]" and out["order"] == ["p1", "p2", "p3"]
    one = mattermost.classify("GET", "/api/v4/posts/p2")
    [d] = mattermost.deliver(one, req, 200, json.dumps(posts["posts"]["p2"]).encode())
    assert d.locator == ()
    assert mattermost.requester(req) == credential_key("mm-tok")
    for path, derived in (("/api/v4/files/f1", False), ("/api/v4/files/f1/preview", True),
                          ("/api/v4/files/f1/thumbnail", True)):
        dl = mattermost.classify("GET", path)
        assert (dl.kind, dl.ref, dl.derived) == ("download", "mattermost:f1", derived)
    assert mattermost.classify("GET", "/api/v4/files/f1/link") is None
    assert mattermost.classify("GET", "/files/f1/public").ref == "mattermost:f1"
    assert httpchat.Routes.parse(httpchat.DEFAULT_ROUTES).match("mm.example", "/files/f1/public") == [mattermost]
    me = mattermost.classify("GET", "/api/v4/users/me")
    assert mattermost.learn(me, req, 200, b'{"id":"uin","username":"bob"}') == [Identity(credential_key("mm-tok"),
                                                                                          "uin")]


def test_rocketchat_history_file_upload_and_ddp_stream():
    """channels/groups/im.history: each message (not system ones) with its place, file as SharedMedia;
    /file-upload/{id}/{name} a download; the server's DDP stream-room-messages (SockJS-framed) delivers the same
    and a login result names the socket's user."""
    history = {"success": True, "messages": [
        {"_id": "m1", "rid": "GENERAL", "msg": "the secret", "u": {"_id": "uout", "username": "alice"},
         "md": [{"type": "PARAGRAPH", "value": [{"type": "PLAIN_TEXT", "value": "the secret"}]}],
         "file": {"_id": "fid1", "name": "eicar.com"}, "attachments": [{"title": "eicar.com", "description": "d"}]},
        {"_id": "m2", "rid": "GENERAL", "msg": "x mask-me", "u": {"_id": "uout"}, "md": [{"value": "x mask-me"}]},
        {"_id": "m3", "rid": "GENERAL", "msg": "alice", "t": "uj", "u": {"_id": "uout"}}]}
    body = json.dumps(history).encode()
    for kind in ("channels", "groups", "im", "dm"):
        assert rocketchat.classify("GET", f"/api/v1/{kind}.history").kind == "deliver"
    ep = rocketchat.classify("GET", "/api/v1/channels.history")
    req = HttpRequest.make("GET", "/api/v1/channels.history?roomId=GENERAL", {"X-User-Id": "uin", "X-Auth-Token": "t"})
    found = rocketchat.deliver(ep, req, 200, body)
    d = delivered_of(found)
    assert [(x.event_id, x.locator, x.message.sender, x.message.room) for x in d] == [
        ("m1", ("messages", 0), "uout", "GENERAL"), ("m2", ("messages", 1), "uout", "GENERAL")]
    assert d[0].message.refs == ("rocketchat:fid1",)
    assert shared_of(found) == [httpchat.SharedMedia("rocketchat:fid1", "uout", "GENERAL", "eicar.com")]
    out = blank_and_mask(rocketchat, body, found)
    assert out["messages"][0]["msg"] == "A message from X was blocked" and "secret" not in json.dumps(out)
    assert out["messages"][1] == {"_id": "m2", "rid": "GENERAL", "msg": "x [X]", "u": {"_id": "uout"}}
    assert rocketchat.requester(req) == "uin"
    by_cookie = HttpRequest.make("GET", "/file-upload/fid1/e.com", {"Cookie": "rc_uid=u7; rc_token=t"})
    assert rocketchat.requester(by_cookie) == "u7"
    dl = rocketchat.classify("GET", "/file-upload/fid1/eicar.com")
    assert (dl.kind, dl.ref, dl.filename) == ("download", "rocketchat:fid1", "eicar.com")

    frame = {"msg": "changed", "collection": "stream-room-messages", "id": "id",
             "fields": {"eventName": "GENERAL", "args": [history["messages"][0]]}}
    login = {"msg": "result", "id": "1", "result": {"id": "uin", "token": "tok", "tokenExpires": {"$date": 1}}}
    data = ("a" + json.dumps([json.dumps(login), json.dumps(frame)])).encode()
    found = rocketchat.deliver_ws(data)
    assert found[0] == Identity("", "uin")
    [d] = delivered_of(found)
    assert d.locator == ("ws", 1, "fields", "args", 0) and d.message.text.startswith("the secret")
    out = rocketchat.rewrite_ws_delivered(data, [(d.locator, "blocked")])
    assert out.startswith(b"a[") and b"secret" not in out
    assert json.loads(json.loads(out[1:])[1])["fields"]["args"][0]["msg"] == "blocked"
    bare = json.dumps(frame).encode()
    [d] = delivered_of(rocketchat.deliver_ws(bare))
    assert d.locator == ("ws", None, "fields", "args", 0)
    assert json.loads(rocketchat.rewrite_ws_delivered(bare, [(d.locator, "blocked")]))["fields"]["args"][0]["msg"] \
        == "blocked"
    for other in (b"h", b"o", b'a["{\\"msg\\":\\"ping\\"}"]', b"not json"):
        assert rocketchat.deliver_ws(other) == []


def test_discord_channel_messages_and_cdn_attachments():
    """GET channel messages (a list) or one message: each with author and channel, attachments as SharedMedia;
    the CDN /attachments/{channel}/{id}/{name} a download, routed on Discord's CDN hosts only."""
    messages = [
        {"id": "11", "channel_id": "42", "author": {"id": "900", "username": "outsider"}, "content": "the secret",
         "embeds": [{"title": "t", "description": "embed text"}], "components": [{"type": 1}],
         "attachments": [{"id": "777", "filename": "eicar.com", "url": "https://cdn.discordapp.com/attachments/42/777/eicar.com"}]},
        {"id": "12", "channel_id": "42", "author": {"id": "900"}, "content": "x mask-me", "edited_timestamp": "2026"},
        {"id": "13", "channel_id": "42", "author": {"id": "901"}, "content": "reply",
         "referenced_message": {"id": "9", "author": {"id": "900"}, "content": "quoted secret"}}]
    body = json.dumps(messages).encode()
    ep = discord.classify("GET", "/api/v10/channels/42/messages")
    assert (ep.name, ep.kind) == ("messages", "deliver")
    req = HttpRequest.make("GET", "/api/v10/channels/42/messages?limit=50", {"Authorization": "Bot b"})
    found = discord.deliver(ep, req, 200, body)
    d = delivered_of(found)
    assert [(x.event_id, x.locator, x.message.sender, x.message.room) for x in d] == [
        ("11", (0,), "900", "42"), ("12@2026", (1,), "900", "42"), ("13", (2,), "901", "42")]
    assert "quoted secret" in d[2].message.text
    assert shared_of(found) == [httpchat.SharedMedia("discord:attachment:777", "900", "42", "eicar.com")]
    out = blank_and_mask(discord, body, found)
    assert out[0]["content"] == "A message from X was blocked" and out[0]["attachments"] == [] == out[0]["embeds"]
    assert out[1]["content"] == "x [X]" and "secret" not in json.dumps(out[:2])
    one = discord.classify("GET", "/api/v10/channels/42/messages/11")
    assert delivered_of(discord.deliver(one, req, 200, json.dumps(messages[0]).encode()))[0].locator == ()
    dl = discord.classify("GET", "/attachments/42/777/eicar.com")
    assert (dl.kind, dl.ref, dl.filename) == ("download", "discord:attachment:777", "eicar.com")
    routes = httpchat.Routes.parse(httpchat.DEFAULT_ROUTES)
    assert routes.match("cdn.discordapp.com", "/attachments/42/777/eicar.com") == [discord]
    assert routes.match("media.discordapp.net", "/attachments/42/777/eicar.com") == [discord]
    assert routes.match("example.com", "/attachments/42/777/eicar.com") == []
    me = discord.classify("GET", "/api/v10/users/@me")
    assert discord.learn(me, req, 200, b'{"id":"901","username":"bob"}') == [Identity(credential_key("b"), "901")]


# --- WebSockets: what the servers push -----------------------------------------------------------------------

def ws_blank_and_mask(api, data, found, mask=("mask-me", "[X]")):
    """The API's WebSocket rewrite of one pushed message: blocked, then (separately) masked; both parsed."""
    [d] = delivered_of(found)
    blocked = json.loads(api.rewrite_ws_delivered(data, [(d.locator, "A message from X was blocked")]))
    masked = json.loads(api.rewrite_ws_delivered(data, [], [(d.locator, [(p.locator, p.text.replace(*mask))
                                                                          for p in d.message.parts])]))
    return d, blocked, masked


def test_websocket_routes_and_handshake_credentials():
    """Which WebSocket is which API's: Slack's RTM, Socket Mode and web-client URLs on *.slack.com, Mattermost's
    /api/v4/websocket and Rocket.Chat's /websocket on any host, Discord's gateway on *.discord.gg; and whose
    socket it is from the handshake (token, cookie, ticket URL) or a client message (IDENTIFY, challenge)."""
    routes = httpchat.Routes.parse(httpchat.DEFAULT_ROUTES)

    def socket_api(host, path):
        return next((a for a in routes.match(host, path) if a.is_websocket(path)), None)
    assert socket_api("wss-primary.slack.com", "/websocket/AbC123") is slack
    assert socket_api("wss-primary.slack.com", "/link/") is slack and socket_api("wss-backup.slack.com", "/") is slack
    assert socket_api("chat.example", "/api/v4/websocket") is mattermost
    assert socket_api("rc.example", "/websocket") is rocketchat
    assert socket_api("gateway.discord.gg", "/") is discord
    assert socket_api("example.com", "/") is None and socket_api("example.com", "/websocket/x") is None
    assert socket_api("matrix.example", "/_matrix/client/v3/sync") is None
    rtm = "wss://wss-primary.slack.com/websocket/Tick3t?x=1"
    ep = slack.classify("POST", "/api/rtm.connect")
    req = HttpRequest.make("POST", "/api/rtm.connect", {"Authorization": "Bearer xoxb-1"})
    learned = slack.learn(ep, req, 200, json.dumps({"ok": True, "url": rtm, "self": {"id": "U0ME"}}).encode())
    assert Identity(slack.ws_url_key(rtm), "U0ME") in learned and Identity(credential_key("xoxb-1"), "U0ME") in learned
    assert slack.ws_requester(HttpRequest.make("GET", "/websocket/Tick3t?x=1")) == slack.ws_url_key(rtm)
    assert slack.ws_requester(HttpRequest.make("GET", "/?token=xoxc-9")) == credential_key("xoxc-9")
    assert mattermost.ws_requester(HttpRequest.make("GET", "/api/v4/websocket", {"Cookie": "MMAUTHTOKEN=mm1"})) \
        == credential_key("mm1")
    assert mattermost.ws_credential(b'{"seq":1,"action":"authentication_challenge","data":{"token":"mm2"}}') \
        == credential_key("mm2")
    assert rocketchat.ws_requester(HttpRequest.make("GET", "/websocket", {"Cookie": "rc_uid=u7; rc_token=t"})) == "u7"
    identify = {"op": 2, "d": {"token": "dtok", "properties": {"os": "linux"}, "intents": 513}}
    assert discord.ws_credential(json.dumps(identify).encode()) == credential_key("dtok")
    assert discord.ws_credential(b'{"op":6,"d":{"token":"Bot dtok","session_id":"s","seq":3}}') \
        == credential_key("dtok")
    assert discord.ws_credential(b'{"op":1,"d":3}') == "" == discord.ws_credential(b"\x78\x9c")


def test_slack_rtm_and_socket_mode_events():
    """An RTM message event, the same in a Socket Mode envelope (whose authorization names the socket's user),
    an edit (message_changed: the new and the previous message), and events that carry no message."""
    event = {"type": "message", "channel": "C1", "user": "U0OUT", "text": "the secret mask-me", "ts": "1.5",
             "blocks": [{"type": "rich_text", "elements": [{"type": "text", "text": "the secret"}]}],
             "files": [{"id": "F9", "name": "a.exe"}]}
    data = json.dumps(event).encode()
    found = slack.deliver_ws(data)
    d, blocked, masked = ws_blank_and_mask(slack, data, found)
    assert (d.locator, d.event_id, d.message.sender, d.message.room, d.message.refs) == (
        ("ws",), "C1/1.5", "U0OUT", "C1", ("slack:F9",))
    assert shared_of(found) == [httpchat.SharedMedia("slack:F9", "U0OUT", "C1", "a.exe")]
    assert blocked["text"] == "A message from X was blocked" and "blocks" not in blocked and "files" not in blocked
    assert masked["text"] == "the secret [X]" and masked["channel"] == "C1"
    envelope = {"envelope_id": "e1", "type": "events_api", "accepts_response_payload": False,
                "payload": {"type": "event_callback", "event": event, "authorizations": [{"user_id": "U0BOT"}]}}
    data = json.dumps(envelope).encode()
    found = slack.deliver_ws(data)
    assert found[0] == Identity("", "U0BOT")
    d, blocked, _ = ws_blank_and_mask(slack, data, found)
    assert d.locator == ("ws", "payload", "event") and blocked["envelope_id"] == "e1"
    assert blocked["payload"]["event"]["text"] == "A message from X was blocked"
    changed = {"type": "message", "subtype": "message_changed", "channel": "C1", "ts": "1.6",
               "message": {"type": "message", "user": "U0OUT", "text": "edited", "ts": "1.5"},
               "previous_message": {"type": "message", "user": "U0OUT", "text": "the secret", "ts": "1.5"}}
    found = delivered_of(slack.deliver_ws(json.dumps(changed).encode()))
    assert [(x.locator, x.message.text, x.event_id) for x in found] == [
        (("ws", "message"), "edited", "C1/1.5"), (("ws", "previous_message"), "the secret", "C1/1.5")]
    replied = {"type": "message", "subtype": "message_replied", "channel": "C1", "hidden": True, "ts": "1.8",
               "message": {"type": "message", "user": "U0OUT", "text": "parent secret", "ts": "1.5", "reply_count": 1}}
    [d] = delivered_of(slack.deliver_ws(json.dumps(replied).encode()))
    assert (d.locator, d.message.text) == (("ws", "message"), "parent secret")
    for other in (b'{"type":"hello"}', b'{"type":"user_typing","channel":"C1","user":"U0OUT"}',
                  b'{"ok":true,"reply_to":1,"ts":"1.7","text":"mine"}', b'{"type":"message","subtype":'
                  b'"message_deleted","channel":"C1","deleted_ts":"1.5"}', b"[]"):
        assert slack.deliver_ws(other) == []
    with pytest.raises(bodies.BodyError):
        slack.deliver_ws(b"not json")


def test_mattermost_websocket_posted_and_hello():
    """posted / post_edited carry the post as a JSON string in data.post: decoded, and rewritten back into that
    string; the hello event's broadcast names the socket's user."""
    post = {"id": "p1", "user_id": "mmout", "channel_id": "ch1", "message": "the secret mask-me", "type": "",
            "file_ids": ["f1"], "metadata": {"files": [{"id": "f1", "name": "a.exe"}]},
            "props": {"attachments": [{"text": "attached secret"}]}}
    frame = {"event": "posted", "data": {"channel_display_name": "Town", "post": json.dumps(post),
                                         "sender_name": "@out", "team_id": "t1"},
             "broadcast": {"omit_users": None, "user_id": "", "channel_id": "ch1", "team_id": ""}, "seq": 7}
    data = json.dumps(frame).encode()
    found = mattermost.deliver_ws(data)
    d, blocked, masked = ws_blank_and_mask(mattermost, data, found)
    assert (d.locator, d.event_id, d.message.sender, d.message.room, d.message.refs) == (
        ("ws", "data", "post"), "p1", "mmout", "ch1", ("mattermost:f1",))
    assert "attached secret" in d.message.text
    assert shared_of(found) == [httpchat.SharedMedia("mattermost:f1", "mmout", "ch1", "a.exe")]
    out = json.loads(blocked["data"]["post"])
    assert out["message"] == "A message from X was blocked" and out["file_ids"] == [] and out["props"] == {}
    assert "secret" not in json.dumps(blocked) and blocked["seq"] == 7 and blocked["data"]["sender_name"] == "@out"
    assert json.loads(masked["data"]["post"])["message"] == "the secret [X]"
    hello = {"event": "hello", "data": {"server_version": "9.11"}, "broadcast": {"user_id": "mmin"}, "seq": 0}
    assert mattermost.deliver_ws(json.dumps(hello).encode()) == [Identity("", "mmin")]
    assert mattermost.deliver_ws(b'{"status":"OK","seq_reply":1}') == []
    assert mattermost.deliver_ws(b'{"event":"typing","data":{"user_id":"mmout"},"broadcast":{}}') == []
    for bad in (b'{"event":"posted","data":{"post":"{not json"}}', b'{"event":"posted","data":{}}', b"<html>"):
        with pytest.raises(bodies.BodyError):
            mattermost.deliver_ws(bad)


def test_discord_gateway_dispatches():
    """op 0 MESSAGE_CREATE / MESSAGE_UPDATE: the message in d, decided like a REST one; READY names the user;
    heartbeat acks and other dispatches carry nothing."""
    msg = {"id": "55", "channel_id": "42", "author": {"id": "900", "username": "out"}, "content": "the secret mask-me",
           "embeds": [{"description": "embedded secret"}], "attachments": [{"id": "777", "filename": "a.exe"}],
           "edited_timestamp": None}
    frame = {"op": 0, "t": "MESSAGE_CREATE", "s": 12, "d": msg}
    data = json.dumps(frame).encode()
    found = discord.deliver_ws(data)
    d, blocked, masked = ws_blank_and_mask(discord, data, found)
    assert (d.locator, d.event_id, d.message.sender, d.message.room, d.message.refs) == (
        ("ws", "d"), "55", "900", "42", ("discord:attachment:777",))
    assert blocked["d"]["content"] == "A message from X was blocked" and blocked["d"]["attachments"] == []
    assert blocked["s"] == 12 and blocked["t"] == "MESSAGE_CREATE" and "secret" not in json.dumps(blocked)
    assert masked["d"]["content"] == "the secret [X]"
    update = {"op": 0, "t": "MESSAGE_UPDATE", "s": 13, "d": {**msg, "edited_timestamp": "2026-12-06T04:00:00"}}
    [d] = delivered_of(discord.deliver_ws(json.dumps(update).encode()))
    assert d.event_id == "55@2026-12-06T04:00:00"
    partial = {"op": 0, "t": "MESSAGE_UPDATE", "s": 14, "d": {"id": "55", "channel_id": "42", "content": "new secret"}}
    [d] = delivered_of(discord.deliver_ws(json.dumps(partial).encode()))
    assert (d.message.sender, d.message.text) == (discord.UNKNOWN_AUTHOR, "new secret")     # decided, not skipped
    unfurl = {"op": 0, "t": "MESSAGE_UPDATE", "s": 15, "d": {"id": "55", "channel_id": "42", "embeds": []}}
    assert [x.message.sender for x in delivered_of(discord.deliver_ws(json.dumps(unfurl).encode()))] == [""]
    ready = {"op": 0, "t": "READY", "s": 1, "d": {"v": 10, "user": {"id": "900222", "username": "me"},
                                                  "session_id": "s", "guilds": []}}
    assert discord.deliver_ws(json.dumps(ready).encode()) == [Identity("", "900222")]
    for other in (b'{"op":11}', b'{"op":10,"d":{"heartbeat_interval":41250}}',
                  b'{"op":0,"t":"TYPING_START","s":2,"d":{"user_id":"900"}}'):
        assert discord.deliver_ws(other) == []
    with pytest.raises(bodies.BodyError):
        discord.deliver_ws(b"\x83t\x00\x00\x00\x01")          # ETF, which a json socket never carries


def test_discord_zlib_stream_codec():
    """compress=zlib-stream: one inflater for the connection (as Discord's clients keep one), a payload ending
    with 00 00 ff ff, possibly over several messages; imguard's own deflater for the client, whose inflater
    reads it back; a payload over the limit is discarded without losing step; a broken stream is an error."""
    server = zlib.compressobj()

    def push(obj) -> bytes:
        raw = json.dumps(obj).encode()
        return server.compress(raw) + server.flush(zlib.Z_SYNC_FLUSH)
    codec = discord.ws_codec(HttpRequest.make("GET", "/?v=10&encoding=json&compress=zlib-stream"), 4096)
    assert codec.stream
    client = zlib.decompressobj()
    hello = push({"op": 10, "d": {"heartbeat_interval": 41250}})
    assert hello.endswith(discord.SYNC_FLUSH)
    payload = codec.receive(hello)
    assert json.loads(payload)["op"] == 10
    assert json.loads(client.decompress(codec.send(payload)))["op"] == 10
    big = push({"op": 0, "t": "MESSAGE_CREATE", "d": {"content": "x" * 3000}})
    head = big[:-2]                                 # 7-byte messages, the suffix split over the last two
    parts = [head[i:i + 7] for i in range(0, len(head), 7)] + [big[-2:]]
    for part in parts[:-1]:                         # only the last part completes it
        assert codec.receive(part) is None
    payload = codec.receive(parts[-1])
    assert json.loads(payload)["d"]["content"] == "x" * 3000
    assert json.loads(client.decompress(codec.send(payload.replace(b"x", b"y"))))["d"]["content"] == "y" * 3000
    with pytest.raises(httpchat.FrameTooLarge):
        codec.receive(push({"op": 0, "d": {"content": "z" * 5000}}))
    after = codec.receive(push({"op": 11}))                  # the stream is still in step
    assert json.loads(after) == {"op": 11}
    with pytest.raises(bodies.BodyError):
        codec.receive(b"\xff\xff\xff\xff" + discord.SYNC_FLUSH)
    # per-message compression (IDENTIFY "compress": true): a binary message is one whole zlib stream
    plain = discord.ws_codec(HttpRequest.make("GET", "/?v=10&encoding=json"), 4096)
    assert not plain.stream
    packed = zlib.compress(b'{"op":0,"t":"READY","d":{}}')
    assert plain.receive(packed) == b'{"op":0,"t":"READY","d":{}}'
    assert zlib.decompress(plain.send(b'{"op":0}')) == b'{"op":0}'
    assert plain.receive(b'{"op":11}') == b'{"op":11}' and plain.send(b'{"op":11}') == b'{"op":11}'
    with pytest.raises(httpchat.FrameTooLarge):
        plain.receive(zlib.compress(b"{" + b" " * 5000 + b"}"))
    for query in ("/?v=10&encoding=xml", "/?v=10&compress=zstd-stream", "/?v=10&encoding=etf&compress=zstd-stream"):
        with pytest.raises(httpchat.UnreadableSocket):
            discord.ws_codec(HttpRequest.make("GET", query), 4096)
    # a binary message that only looks like zlib (its header) but is not: handed on as it came, the next one read
    assert plain.receive(b"\x78\x9cnot deflate") == b"\x78\x9cnot deflate"
    assert plain.send(b"\x78\x9cnot deflate") == b"\x78\x9cnot deflate"
    assert plain.receive(zlib.compress(b'{"op":11}')) == b'{"op":11}'


# Terms as Erlang's term_to_binary/1 (OTP 26) writes them, spelled out byte by byte from the external term format
# specification (not made with imguard's encoder): 131 version, 116 map (arity), 119 small UTF-8 atom (length),
# 97 small integer, 98 integer, 109 binary (length), 110 small big (n, sign, little-endian digits), 108 list, 106 nil.
ETF_OP_D_NIL = bytes([131, 116, 0, 0, 0, 2, 119, 1]) + b"d" + bytes([119, 3]) + b"nil" + bytes([119, 2]) + b"op" + \
    bytes([97, 0])
SNOWFLAKE = 1234567890123456789
ETF_MESSAGE = (bytes([131, 116, 0, 0, 0, 3, 119, 2]) + b"op" + bytes([97, 0]) + bytes([119, 1]) + b"t"
               + bytes([119, 14]) + b"MESSAGE_CREATE" + bytes([119, 1]) + b"d" + bytes([116, 0, 0, 0, 5])
               + bytes([119, 2]) + b"id" + bytes([110, 8, 0]) + SNOWFLAKE.to_bytes(8, "little")
               + bytes([119, 10]) + b"channel_id" + bytes([98]) + (70000).to_bytes(4, "big")
               + bytes([119, 7]) + b"content" + bytes([109, 0, 0, 0, 16]) + "h\u00e9 the secret!!".encode()
               + bytes([119, 6]) + b"author" + bytes([116, 0, 0, 0, 1, 119, 2]) + b"id" + bytes([109, 0, 0, 0, 3])
               + b"900" + bytes([119, 6]) + b"embeds" + bytes([108, 0, 0, 0, 1, 116, 0, 0, 0, 0, 106]))


def test_etf_decode_encode_and_hostile_terms():
    """ETF as Discord's gateway sends it (atoms for keys and nil, binaries for text, snowflakes as 64-bit small
    bigs) decodes to the JSON a json socket would carry; encode() writes what term_to_binary writes for the same
    map; truncated, unknown, too deep or lying terms are BodyError, never a crash."""
    from imguard.protocols.httpchat import etf
    assert etf.decode(ETF_OP_D_NIL) == {"d": None, "op": 0}
    assert etf.encode({"d": None, "op": 0}) == ETF_OP_D_NIL
    tree = etf.decode(ETF_MESSAGE)
    assert tree == {"op": 0, "t": "MESSAGE_CREATE", "d": {"id": SNOWFLAKE, "channel_id": 70000,
                                                          "content": "h\u00e9 the secret!!", "author": {"id": "900"},
                                                          "embeds": [{}]}}
    assert etf.decode(etf.encode(tree)) == tree
    assert etf.encode([]) == bytes([131, 106]) and etf.decode(bytes([131, 106])) == []
    assert etf.decode(etf.encode({"n": -5, "big": -SNOWFLAKE, "f": 1.5, "ok": True})) == {
        "n": -5, "big": -SNOWFLAKE, "f": 1.5, "ok": True}
    compressed = bytes([131, 80]) + len(ETF_OP_D_NIL[1:]).to_bytes(4, "big") + zlib.compress(ETF_OP_D_NIL[1:])
    assert etf.decode(compressed) == {"d": None, "op": 0}
    deep = bytes([131]) + bytes([108, 0, 0, 0, 1]) * 1000 + bytes([106]) * 1001
    for bad in (ETF_MESSAGE[:-3], b"{}", bytes([131, 77, 0]), deep, bytes([131, 108, 255, 255, 255, 255, 97]),
                bytes([131, 109, 0, 0, 0, 2, 0xff, 0xfe]), bytes([131, 80, 127, 0, 0, 0]) + zlib.compress(b"x"),
                bytes([131, 80, 0, 0, 0, 9]) + zlib.compress(b"\x6a"), ETF_OP_D_NIL + b"!",
                bytes([131, 108, 0, 0, 0, 1, 97, 1, 97, 2])):
        with pytest.raises(bodies.BodyError):
            etf.decode(bad)


def test_discord_etf_socket_hands_json_on_and_gives_back_the_servers_bytes():
    """encoding=etf: the decoders see the payload as JSON; an unchanged payload reaches the client as the server's
    own ETF bytes, a changed one re-encoded (what erlpack reads back); unreadable ETF is handed on as it came;
    IDENTIFY in ETF still names the token."""
    from imguard.protocols.httpchat import etf
    codec = discord.ws_codec(HttpRequest.make("GET", "/?v=10&encoding=etf"), 1 << 20)
    payload = codec.receive(ETF_MESSAGE)
    [d] = delivered_of(discord.deliver_ws(payload))
    assert (d.message.sender, d.message.room, d.message.text) == ("900", "70000", "h\u00e9 the secret!!")
    assert codec.send(payload) == ETF_MESSAGE
    changed = discord.rewrite_ws_delivered(payload, [(d.locator, "blocked")])
    out = etf.decode(codec.send(changed))
    assert out["d"]["content"] == "blocked" and out["d"]["id"] == SNOWFLAKE and out["t"] == "MESSAGE_CREATE"
    broken = b"\x83\x99MESSAGE_CREATE"
    assert codec.receive(broken) == broken and codec.send(broken) == broken
    with pytest.raises(bodies.BodyError):
        discord.deliver_ws(broken)
    # a payload that names none of the dispatches deliver_ws reads is not decoded: nothing for the decoders, and
    # the client gets the server's bytes
    assert codec.receive(ETF_OP_D_NIL) == b"{}" and discord.deliver_ws(b"{}") == []
    assert codec.send(b"{}") == ETF_OP_D_NIL
    identify = etf.encode({"op": 2, "d": {"token": "etf-token", "properties": {"os": "linux"}}})
    assert discord.ws_credential(identify) == credential_key("etf-token")
    stream = discord.ws_codec(HttpRequest.make("GET", "/?v=10&encoding=etf&compress=zlib-stream"), 1 << 20)
    server, client = zlib.compressobj(), zlib.decompressobj()
    for term in (ETF_OP_D_NIL, ETF_MESSAGE):
        payload = stream.receive(server.compress(term) + server.flush(zlib.Z_SYNC_FLUSH))
        assert client.decompress(stream.send(payload)) == term
    assert json.loads(payload)["d"]["content"] == "h\u00e9 the secret!!"


def test_slack_rtm_client_message():
    """RTM's way to post: {"id","type":"message","channel","text"}: a ChatMessage whose text rewrite_ws masks; a
    refused one is answered as RTM answers, {"ok":false,"reply_to":id,"error"}; other client messages carry none.
    Mattermost's and Discord's clients post over REST: their sockets carry no client chat."""
    frame = b'{"id":7,"type":"message","channel":"C1","text":"a mask-me here"}'
    [(call_id, index, msg)] = slack.decode_ws(frame, "U0ME")
    assert (call_id, index, msg.sender, msg.room, msg.text) == ("7", None, "U0ME", "C1", "a mask-me here")
    out = json.loads(slack.rewrite_ws(frame, bodies.masked_replacements(msg.parts, "a [X] here")))
    assert out == {"id": 7, "type": "message", "channel": "C1", "text": "a [X] here"}
    assert json.loads(slack.ws_error("7", "blocked")) == {"ok": False, "reply_to": 7,
                                                           "error": {"code": 2, "msg": "blocked"}}
    for other in (b'{"id":8,"type":"ping"}', b'{"id":9,"type":"typing","channel":"C1"}', b"nope"):
        assert slack.decode_ws(other) == []
    assert mattermost.decode_ws(b'{"action":"user_typing","seq":2,"data":{"channel_id":"c"}}') == []
    assert discord.decode_ws(b'{"op":1,"d":3}') == []
