"""Chat over HTTP (read-only: imguard/protocols/httpchat): every API's request decoder, response learner and
delivery reader, and the WebSocket codecs and delivery readers, on hostile bodies.

The contract here is the gateway's (imguard/gateway/chat_apis.py): a request body the API cannot read is a
MalformedRequest; a response or WebSocket payload imguard cannot read raises `bodies.BodyError` (FrameTooLarge is
one) or `UnreadableSocket`, which the gateway turns into an anomaly and a refusal. Anything else is a finding.
"""

from __future__ import annotations

from imguard.protocols import httpchat
from imguard.protocols.httpchat import bodies
from imguard.protocols.httpchat.common import DecodeLimits
from imguard.protocols.httpchat.events import DELIVER, LEARN, HttpRequest

DECLARED = (bodies.BodyError, httpchat.UnreadableSocket)
LIMITS = DecodeLimits()
APIS = sorted(httpchat.APIS)
PATHS = ["/_matrix/client/v3/rooms/%21r%3Ah/send/m.room.message/t1", "/_matrix/client/v3/sync",
         "/_matrix/client/v3/rooms/%21r%3Ah/messages", "/_matrix/media/v3/upload", "/_matrix/client/v3/login",
         "/api/chat.postMessage", "/api/files.upload", "/api/conversations.history", "/api/rtm.connect",
         "/api/files.completeUploadExternal", "/api/v4/posts", "/api/v4/files", "/api/v4/channels/ch1/posts",
         "/api/v4/websocket", "/api/v1/chat.postMessage", "/api/v1/chat.sendMessage", "/api/v1/rooms.upload/R",
         "/api/v1/channels.history", "/websocket", "/api/v10/channels/42/messages", "/api/v10/channels/123/attachments",
         "/api/v10/users/@me", "/?v=10&encoding=json&compress=zlib-stream", "/?v=10&encoding=etf"]
TYPES = ["application/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
         "text/plain; charset=utf-8", ""]


def target(data: bytes) -> None:
    if len(data) < 4:
        return
    api = httpchat.APIS[APIS[data[0] % len(APIS)]]
    path = PATHS[data[1] % len(PATHS)]
    ctype = TYPES[data[2] % len(TYPES)]
    method = ("POST", "GET", "PUT")[data[3] % 3]
    body = data[4:]
    req = HttpRequest.make(method, path, {"content-type": ctype, "authorization": "Bearer t"}, body, host="chat.test")
    try:
        ep = api.classify(req.method, req.path)
        if ep is not None:                  # as imguard/chatapi.py calls them
            if ep.kind not in (LEARN, DELIVER):
                api.decode(ep, req, LIMITS)
            if ep.kind == DELIVER:
                api.deliver(ep, req, 200, body, LIMITS)
            api.learn(ep, req, 200, body)
        api.requester(req)
    except DECLARED:
        pass
    if api.is_websocket(req.path):
        try:
            codec = api.ws_codec(req, 1 << 20)
            payload = codec.receive(body)
            if payload is not None:
                api.deliver_ws(payload, LIMITS)
        except DECLARED:
            pass


def seeds() -> list[bytes]:
    out = []
    for a in range(len(APIS)):
        for p in range(len(PATHS)):
            out.append(bytes([a, p, 0, 0]) + b'{"text": "hi", "channel": "C1", "body": "hello", "msg": "x",'
                       b' "content": "c", "message": {"text": "t"}, "op": 0, "t": "MESSAGE_CREATE", "d": {}}')
    return out

