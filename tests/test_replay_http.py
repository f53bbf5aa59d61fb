"""HttpUploadSession (the offline counterpart of the gateway's HTTP upload addon), fed like h11's tests:
the same requests split at every byte boundary must give the same commands."""

from __future__ import annotations

import pytest

from imguard.files.expected import ExpectedTransfers, ExpectedUpload
from imguard.model import BLOCK, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, InspectFile, Record, Send
from imguard.replay.http import HttpLimits, HttpUploadSession

CTX = ChatContext(client_address="10.0.0.1:40000", server_address="10.0.0.2:5280", connection_id="C7")
PUT_URL = "http://upload.example:5280/slot/abc/report.pdf"
GET_URL = "http://upload.example:5280/slot/abc/report.pdf?download"


def session(*, announce: bool = True, paths=()) -> tuple[HttpUploadSession, ExpectedTransfers]:
    transfers = ExpectedTransfers()
    if announce:
        transfers.expect_upload(PUT_URL, ExpectedUpload(PUT_URL, GET_URL, "report.pdf", 11, "application/pdf",
                                                        ChatContext(protocol="xmpp", sender="alice@example")))
    return HttpUploadSession(transfers, CTX, HttpLimits(upload_paths=tuple(paths))), transfers


PUT = (b"PUT /slot/abc/report.pdf HTTP/1.1\r\nHost: upload.example:5280\r\nContent-Length: 11\r\n\r\n"
       b"hello world")
CHUNKED = (b"PUT /slot/abc/report.pdf HTTP/1.1\r\nHost: upload.example:5280\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
GET_OTHER = b"GET /index.html HTTP/1.1\r\nHost: upload.example:5280\r\n\r\n"


def feed(s: HttpUploadSession, data: bytes, cut: int | None = None) -> list:
    if cut is None:
        return s.data_received(True, data)
    return s.data_received(True, data[:cut]) + s.data_received(True, data[cut:])


def anomaly_kinds(commands) -> list[str]:
    """The kinds of the anomaly events among the commands (a Record here must be one too)."""
    return [(c.event if isinstance(c, Record) else c.event())["imguard"]["anomaly"]["kind"] for c in commands
            if isinstance(c, (Record, Anomaly))]


def sent(commands, to_client: bool) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, Send) and c.to_client == to_client)


@pytest.mark.parametrize("raw", [PUT, CHUNKED])
def test_announced_upload_is_held_and_inspected_at_every_split(raw):
    """An upload a chat session announced: nothing reaches the server before the verdict; the body (de-chunked)
    goes out as one InspectFile with the announcer's context, whatever the segment boundaries."""
    for cut in [None, *range(1, len(raw))]:
        s, _ = session()
        commands = feed(s, raw + GET_OTHER, cut)
        [inspect] = [c for c in commands if isinstance(c, InspectFile)]
        assert inspect.data == b"hello world" and inspect.name == "report.pdf"
        assert inspect.claimed_mime == "application/pdf" and not inspect.truncated
        assert (inspect.context.sender, inspect.context.transfer_mechanism) == ("alice@example", "xep-0363")
        assert inspect.context.connection_id == "C7"
        assert sent(commands, False) == GET_OTHER          # the next request is not held behind the upload
        released = s.file_verdict(inspect.transfer_id, FileReport("report.pdf", "report.pdf", 11), Decision())
        assert sent(released, False) == raw                # allowed: the request exactly as it came


def test_blocked_upload_answers_403_and_blocks_the_download_url():
    s, transfers = session()
    [inspect] = [c for c in s.data_received(True, PUT) if isinstance(c, InspectFile)]
    commands = s.file_verdict(inspect.transfer_id, FileReport("report.pdf", "report.pdf", 11),
                              Decision(action=BLOCK, notice="malware"))
    assert sent(commands, True).startswith(b"HTTP/1.1 403 Forbidden\r\n") and sent(commands, False) == b""
    assert transfers.blocked_url_reason(GET_URL) == "malware"
    # and a later GET of it, on another connection, is refused
    other = HttpUploadSession(transfers, CTX)
    commands = other.data_received(True, b"GET /slot/abc/report.pdf?download HTTP/1.1\r\nHost: upload.example:5280"
                                         b"\r\n\r\n")
    assert sent(commands, True).startswith(b"HTTP/1.1 403") and sent(commands, False) == b""
    assert anomaly_kinds(commands) == ["blocked_download"]


def test_unannounced_upload_crosses_unless_its_path_is_configured():
    s, _ = session(announce=False)
    assert sent(s.data_received(True, PUT), False) == PUT
    s, _ = session(announce=False, paths=[r"/slot/"])
    [inspect] = [c for c in s.data_received(True, PUT) if isinstance(c, InspectFile)]
    assert inspect.context.transfer_mechanism == "upload" and inspect.context.protocol == "http"


def test_request_cut_short_is_inspected_truncated():
    s, _ = session()
    assert s.data_received(True, PUT[:-4]) == []
    [inspect] = s.connection_closed(True)
    assert inspect.truncated and inspect.data == b"hello w"


def test_not_http_is_relayed_with_an_anomaly():
    s, _ = session()
    commands = s.data_received(True, b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert [type(c).__name__ for c in commands] == ["Anomaly", "Send"]
    assert sent(s.data_received(True, b"more"), False) == b"more"


def test_server_bytes_cross_untouched():
    s, _ = session()
    assert s.data_received(False, b"HTTP/1.1 201 Created\r\n\r\n") == [Send(True, b"HTTP/1.1 201 Created\r\n\r\n")]


def test_held_bytes_return_to_zero_after_the_verdict():
    """The request is held by one HeldTransfer per upload: the connection's held bytes go back to zero on release
    and on block."""
    for decision in (Decision(), Decision(action=BLOCK, notice="malware")):
        s, _ = session()
        [inspect] = [c for c in feed(s, CHUNKED, 7) if isinstance(c, InspectFile)]
        assert s._holds.held_bytes > 0 and s._holds.in_flight == 1
        s.file_verdict(inspect.transfer_id, FileReport("report.pdf", "report.pdf", 11), decision)
        assert s._holds.held_bytes == 0 and s._holds.in_flight == 0
        assert s.file_verdict(inspect.transfer_id, FileReport("report.pdf", "report.pdf", 11), decision) == []


def test_empty_body_is_held_and_released_exactly():
    raw = b"PUT /slot/abc/report.pdf HTTP/1.1\r\nHost: upload.example:5280\r\nContent-Length: 0\r\n\r\n"
    s, _ = session()
    [inspect] = s.data_received(True, raw)
    assert inspect.data == b"" and not inspect.truncated
    assert sent(s.file_verdict(inspect.transfer_id, FileReport("", "", 0), Decision()), False) == raw


@pytest.mark.parametrize("raw", [PUT, CHUNKED])
def test_body_over_max_upload_size_is_inspected_truncated_and_decoding_stops(raw):
    """The body's first max_upload_size bytes are inspected, marked truncated; an anomaly says the rest is not
    decoded. Allowed, every byte read so far crosses as it came, and later bytes are relayed untouched."""
    s = HttpUploadSession(session()[1], CTX, HttpLimits(max_upload_size=4))
    commands = s.data_received(True, raw)
    [inspect] = [c for c in commands if isinstance(c, InspectFile)]
    assert inspect.data == b"hell" and inspect.truncated
    assert anomaly_kinds(commands) == ["http_upload_too_large"]
    assert sent(commands, False) == b""
    assert sent(s.data_received(True, GET_OTHER), False) == GET_OTHER
    assert sent(s.file_verdict(inspect.transfer_id, FileReport("", "", 0), Decision()), False) == raw


def test_bad_chunk_in_a_held_upload_stops_it():
    """Chunk framing the reader cannot follow in a held upload: the upload is stopped (fail closed: the client
    has a 403, nothing of it reaches the server), the anomaly recorded, the rest relayed."""
    s, transfers = session()
    raw = (b"PUT /slot/abc/report.pdf HTTP/1.1\r\nHost: upload.example:5280\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\nzz\r\n")
    commands = s.data_received(True, raw + b"rest")
    assert anomaly_kinds(commands) == ["http_bad_chunk"]
    assert not any(isinstance(c, InspectFile) for c in commands)
    assert sent(commands, True).startswith(b"HTTP/1.1 403") and sent(commands, False) == b"rest"
    assert transfers.blocked_url_reason(GET_URL)
    assert s._holds.held_bytes == 0 and s._holds.in_flight == 0


# --- downloads: the response to a GET of a file shared with our user --------------------------------------------

SHARED_URL = "http://upload.example:5280/share/xyz/numbers.bin"
GET_SHARED = b"GET /share/xyz/numbers.bin HTTP/1.1\r\nHost: upload.example:5280\r\n\r\n"
OK_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 11\r\n\r\nhello world"
OK_CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
SHARER = ChatContext(protocol="xmpp", sender="carol@outside.example", recipients=("bob@example",),
                     connection_id="C3", transfer_mechanism="xep-0363-get", origin="server")


def download_session() -> tuple[HttpUploadSession, ExpectedTransfers]:
    from imguard.files.expected import ExpectedDownload
    transfers = ExpectedTransfers()
    transfers.expect_download(ExpectedDownload(SHARED_URL, "numbers.bin", None, "", SHARER))
    return HttpUploadSession(transfers, CTX), transfers


@pytest.mark.parametrize("response", [OK_LENGTH, OK_CHUNKED])
def test_shared_download_response_is_held_and_inspected_at_every_split(response):
    """The 200 response to a GET of a link shared with our user is held whole, at every split: nothing reaches the
    client before the verdict, the body is inspected inbound in the sharer's context, and an allow releases the
    response exactly as it came."""
    for cut in range(1, len(response)):
        s, _ = download_session()
        assert sent(s.data_received(True, GET_SHARED), False) == GET_SHARED
        commands = s.data_received(False, response[:cut]) + s.data_received(False, response[cut:])
        assert sent(commands, True) == b"", cut
        [inspect] = [c for c in commands if isinstance(c, InspectFile)]
        assert inspect.data == b"hello world" and inspect.name == "numbers.bin" and not inspect.truncated
        ctx = inspect.context
        assert (ctx.sender, ctx.origin, ctx.transfer_mechanism, ctx.connection_id) == (
            "carol@outside.example", "server", "xep-0363-get", "C3")
        released = s.file_verdict(inspect.transfer_id, FileReport("numbers.bin", "numbers.bin", 11), Decision())
        assert sent(released, True) == response


def test_blocked_download_answers_403_tells_the_chat_and_blocks_the_link():
    """Blocked: the client gets a 403, never the body; the chat connection that announced the link is told (a
    Notify), and the link stays blocked for a later GET."""
    from imguard.model import RuleMatch
    from imguard.protocols.base import Notify
    s, transfers = download_session()
    s.data_received(True, GET_SHARED + GET_OTHER)
    commands = s.data_received(False, OK_LENGTH + b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    [inspect] = [c for c in commands if isinstance(c, InspectFile)]
    assert sent(commands, True) == b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno"   # the next response
    decision = Decision(action=BLOCK, matches=[RuleMatch("eicar", BLOCK, "high", "enforce", "EICAR test file")])
    verdict = s.file_verdict(inspect.transfer_id, FileReport("numbers.bin", "numbers.bin", 11), decision)
    assert sent(verdict, True).startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"hello world" not in sent(verdict, True)
    [notify] = [c for c in verdict if isinstance(c, Notify)]
    assert notify.connection_id == "C3" and "numbers.bin" in notify.text and "carol@outside.example" in notify.text
    assert transfers.blocked_url_reason(SHARED_URL)
    again = HttpUploadSession(transfers, CTX)
    assert sent(again.data_received(True, GET_SHARED), True).startswith(b"HTTP/1.1 403")
    assert again.data_received(False, OK_LENGTH) == []          # the server's answer to it never crosses


def test_unannounced_response_and_head_cross_untouched():
    s, _ = download_session()
    s.data_received(True, GET_OTHER)
    assert sent(s.data_received(False, OK_CHUNKED), True) == OK_CHUNKED
    s.data_received(True, GET_SHARED.replace(b"GET", b"HEAD"))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
    assert sent(s.data_received(False, head), True) == head


def test_download_read_to_the_close_is_whole_and_one_cut_by_it_is_truncated():
    s, _ = download_session()
    s.data_received(True, GET_SHARED)
    assert s.data_received(False, b"HTTP/1.0 200 OK\r\n\r\nhello") == []
    [inspect] = [c for c in s.connection_closed(False) if isinstance(c, InspectFile)]
    assert inspect.data == b"hello" and not inspect.truncated
    s, _ = download_session()
    s.data_received(True, GET_SHARED)
    s.data_received(False, OK_LENGTH[:-3])
    [inspect] = [c for c in s.connection_closed(False) if isinstance(c, InspectFile)]
    assert inspect.truncated


def test_download_over_the_limit_is_inspected_truncated_and_its_rest_never_crosses():
    from imguard.files.expected import ExpectedDownload
    transfers = ExpectedTransfers()
    transfers.expect_download(ExpectedDownload(SHARED_URL, "numbers.bin", None, "", SHARER))
    s = HttpUploadSession(transfers, CTX, HttpLimits(max_upload_size=5))
    s.data_received(True, GET_SHARED)
    commands = s.data_received(False, OK_LENGTH[:-3])         # "hello wo": over the 5 bytes held
    [inspect] = [c for c in commands if isinstance(c, InspectFile)]
    assert inspect.truncated and inspect.data == b"hello" and sent(commands, True) == b""
    assert anomaly_kinds(commands) == ["http_download_too_large"]
    assert sent(s.data_received(False, OK_LENGTH[-3:]), True) == b""     # the rest of it never crosses
    s.data_received(True, GET_OTHER)
    assert sent(s.data_received(False, OK_CHUNKED), True) == OK_CHUNKED    # the next response does


# --- chat APIs: the chat carrier (imguard/chatapi.py) behind the replay's HTTP framing -------------------------

def chat_session(transfers: ExpectedTransfers | None = None):
    """An HttpUploadSession with a chat carrier over tests/test_httpchat_addon.py's stub pipeline (blocks "BAD" and
    b"EVIL", masks "mask-me")."""
    from imguard.chatapi import ChatApiCarrier
    from test_httpchat_addon import StubPipeline
    pipeline = StubPipeline()
    transfers = transfers or ExpectedTransfers()
    chat = ChatApiCarrier(pipeline, transfers=transfers, record=pipeline.record, commit=lambda: None)
    return HttpUploadSession(transfers, CTX, chat=chat), pipeline


def chunked(body: bytes, size: int = 7) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def test_chat_message_gzipped_and_chunked_is_decided_at_every_split():
    """A Slack chat.postMessage, gzipped and chunked: whatever the segment boundaries, its text is decided once; a
    blocked one gets Slack's error JSON (403) and no byte of it reaches the server; the masked one crosses."""
    import gzip
    import json
    for text, status in (("a BAD plan", 403), ("please mask-me", None)):
        body = gzip.compress(json.dumps({"channel": "C1", "text": text}).encode())
        raw = (b"POST /api/chat.postMessage HTTP/1.1\r\nHost: slack.example\r\nAuthorization: Bearer xoxb-1\r\n"
               b"Content-Type: application/json\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunked(body))
        for cut in range(1, len(raw), 5):
            s, pipeline = chat_session()
            commands = feed(s, raw, cut)
            assert [t for t, _ in pipeline.messages] == [text], cut
            ctx = pipeline.messages[0][1]
            assert (ctx.protocol, ctx.origin, ctx.conversation, ctx.connection_id) == ("slack", "client", "C1", "C7")
            if status:
                assert sent(commands, False) == b"" and sent(commands, True).startswith(b"HTTP/1.1 403 ")
                assert json.loads(sent(commands, True).split(b"\r\n\r\n", 1)[1])["ok"] is False
            else:
                assert b"[X]" in sent(commands, False) and sent(commands, True) == b""


def test_chat_download_is_inspected_and_a_block_refuses_it_and_later_requests():
    """A Mattermost file download's response (chunked) leaves as an InspectFile with the downloader as recipient; a
    block gets the client Mattermost's error JSON instead of the bytes, and a later GET of that file is answered
    403 at once, its response never crossing."""
    import json
    from imguard.protocols.httpchat import credential_key
    s, pipeline = chat_session()
    s.chat.learn_identity(credential_key("mm-token"), "bob")
    get = b"GET /api/v4/files/f1 HTTP/1.1\r\nHost: mm.example\r\nAuthorization: Bearer mm-token\r\n\r\n"
    assert sent(s.data_received(True, get), False) == get
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n" \
        + chunked(b"EVIL bytes of a file")
    commands = s.data_received(False, response)
    [inspect] = [c for c in commands if isinstance(c, InspectFile)]
    assert inspect.data == b"EVIL bytes of a file" and sent(commands, True) == b""
    assert (inspect.context.origin, inspect.context.recipients) == ("server", ("bob",))
    verdict = s.file_verdict(inspect.transfer_id, FileReport("f1", "f1", 20), Decision(action=BLOCK))
    answer = sent(verdict, True)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"EVIL" not in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status_code"] == 403
    again, _ = chat_session(s.transfers)
    assert sent(again.data_received(True, get), True).startswith(b"HTTP/1.1 403 ")
    assert again.data_received(False, response) == []


def ws_frame(payload: bytes, mask: bytes | None, deflater=None, opcode: int = 1, pieces: int = 1) -> bytes:
    """A WebSocket message as RFC 6455 frames: compressed (RSV1, RFC 7692) with `deflater`, masked with `mask`, in
    `pieces` frames."""
    if deflater is not None:
        payload = (deflater.compress(payload) + deflater.flush(__import__("zlib").Z_SYNC_FLUSH))[:-4]
    size = -(-len(payload) // pieces)
    out = b""
    for i in range(pieces):
        part = payload[i * size:(i + 1) * size]
        first = (opcode if i == 0 else 0) | (0x40 if deflater is not None and i == 0 else 0)
        head = bytes([first | (0x80 if i == pieces - 1 else 0)])
        n = len(part)
        head += bytes([(0x80 if mask else 0) | (n if n < 126 else 126)]) + (n.to_bytes(2, "big") if n >= 126 else b"")
        if mask:
            part = mask + bytes(b ^ mask[j % 4] for j, b in enumerate(part))
        out += head + part
    return out


def test_chat_websocket_frames_masked_deflated_and_split_are_decided():
    """Rocket.Chat DDP over a WebSocket with permessage-deflate: the client's masked, compressed sendMessage frames
    (one message in two frames) and the server's compressed pushes, fed at every split: the blocked sendMessage is
    dropped and answered with a DDP error, the clean one crosses; the outside user's blocked push reaches the
    client as the notice."""
    import json
    import zlib
    upgrade = (b"GET /websocket HTTP/1.1\r\nHost: rc.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
               b"\r\n")
    switched = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
    client_z = zlib.compressobj(wbits=-15)
    server_z = zlib.compressobj(wbits=-15)

    def send(i, text):
        return json.dumps({"msg": "method", "method": "sendMessage", "id": str(i),
                           "params": [{"_id": f"m{i}", "rid": "R1", "msg": text}]}).encode()
    client = (ws_frame(send(1, "hello there"), b"\x01\x02\x03\x04", client_z, pieces=2)
              + ws_frame(send(2, "a BAD one"), b"\xaa\xbb\xcc\xdd", client_z))
    push = json.dumps({"msg": "changed", "collection": "stream-room-messages", "id": "id", "fields": {
        "eventName": "R1", "args": [{"_id": "d1", "rid": "R1", "msg": "BAD news", "u": {"_id": "outsider"}}]}})
    server = ws_frame(push.encode(), None, server_z) + ws_frame(b"", None, opcode=0x9)      # and a ping
    for cut in range(1, len(client), 3):
        s, pipeline = chat_session()
        s.data_received(True, upgrade)
        s.data_received(False, switched)
        commands = s.data_received(True, client[:cut]) + s.data_received(True, client[cut:])
        assert [t for t, _ in pipeline.messages] == ["hello there", "a BAD one"], cut
        assert b"BAD" not in sent(commands, False)
        frame = sent(commands, True)
        reply = json.loads(frame[4:] if frame[1] == 126 else frame[2:])      # one unmasked frame
        assert reply["msg"] == "result" and reply["id"] == "2" and reply["error"]
    for cut in range(1, len(server), 3):
        s, pipeline = chat_session()
        s.data_received(True, upgrade)
        s.data_received(False, switched)
        commands = s.data_received(False, server[:cut]) + s.data_received(False, server[cut:])
        assert [t for t, _ in pipeline.messages] == ["BAD news"], cut
        out = sent(commands, True)
        assert b"BAD news" not in out and b"A message from outsider was blocked by imguard" in out
        assert out.endswith(b"\x89\x00"), "the ping did not cross"


def test_content_encodings_are_undone_or_refused():
    """gzip, deflate (zlib or raw), br and a stack of them are undone, the last applied first; an encoding that
    cannot be undone is a ValueError (the carrier then refuses the request as malformed, as mitmproxy's strict
    get_content makes the gateway do)."""
    import gzip
    import zlib

    import brotli
    from imguard.replay.http import decode_content
    body = b"chat body " * 50
    raw = zlib.compressobj(wbits=-15)
    assert decode_content(gzip.compress(body), "gzip") == body
    assert decode_content(zlib.compress(body), "deflate") == body
    assert decode_content(raw.compress(body) + raw.flush(), "deflate") == body
    assert decode_content(brotli.compress(body), "br") == body
    assert decode_content(brotli.compress(gzip.compress(body)), "gzip, br") == body
    assert decode_content(body, "identity") == body
    for bad, encoding in ((body, "gzip"), (body, "zstd"), (b"\x00", "br")):
        with pytest.raises(ValueError):
            decode_content(bad, encoding)
