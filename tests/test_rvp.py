"""RVP (Exchange 2000 Instant Messaging): the transcripts of tests/data/rvp/ (written after the draft's examples, see
its README) read by imguard's decoder and by tshark's HTTP and XML dissectors (the same method, URI, principals and
text from both), then the real `imguard run` in reverse mode in both directions: in front of a stand-in RVP server
(tests/test_httpchat_gateway.py's Vendor), which receives the inside client's NOTIFYs, and in front of a stand-in
client Call-Back listener (another Vendor), which receives what the outside server delivers. Blocked NOTIFYs are
answered 403 and never arrive, masked ones arrive masked; a sentinel after each shows the way is still open. The
run is captured with tcpdump and `imguard pcap` of the capture must give the gateway's decisions."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from imguard.chatapi import ChatApiCarrier, ChatApiSettings
from imguard.protocols import httpchat
from imguard.protocols.httpchat import bodies, rvp
from imguard.protocols.httpchat.events import ChatMessage, DeliveredMessage, HttpRequest, MalformedRequest

DATA = Path(__file__).parent / "data" / "rvp"
ROB = "http://im.example.com/instmsg/aliases/robertl"
DERIK = "http://im.example.com/instmsg/aliases/deriks"
PARTNER = "http://im.partner.test/instmsg/aliases/robertl"
BLOCKED_WORD = "project-bluebird"          # tests/data/rules: a keyword block rule
MASK_WORD = "zebra-omega"
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


def split(raw: bytes) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """(method, path, headers, body) of a transcript's request."""
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    method, path, _ = lines[0].split(" ")
    return method, path, [tuple(line.split(": ", 1)) for line in lines[1:]], body


def request(name: str) -> HttpRequest:
    method, path, headers, body = split((DATA / name).read_bytes())
    return HttpRequest.make(method, path, headers, body, host=dict(headers)["Host"])


def decode(req: HttpRequest) -> list | None:
    ep = rvp.classify(req.method, req.path)
    return None if ep is None else rvp.decode(ep, req)


def notify_body(sender: str, to: str, text: str, ctype: str = "text/plain; charset=UTF-8") -> bytes:
    """A NOTIFY body in the shape of the draft's instant-message example (tests/data/rvp/README.md)."""
    return (f'<?xml version="1.0"?>\r\n<r:notification xmlns:d="DAV:" xmlns:r="http://schemas.microsoft.com/rvp/">'
            f"<r:message><r:notification-from><r:contact><d:href>{sender}</d:href></r:contact></r:notification-from>"
            f"<r:notification-to><r:contact><d:href>{to}</d:href></r:contact></r:notification-to>"
            f"<r:msgbody><r:mime-data>MIME-Version: 1.0\r\nContent-Type: {ctype}\r\n\r\n{text}</r:mime-data>"
            f"</r:msgbody></r:message></r:notification>").encode()


# --- the decoder --------------------------------------------------------------------------------------------------

def test_a_notify_to_the_recipients_node_is_the_senders_message():
    """The client's NOTIFY to deriks's node: robertl's message to deriks, named from the node URLs."""
    [msg] = decode(request("notify-send.http"))
    assert isinstance(msg, ChatMessage)
    assert (msg.sender, msg.room, msg.text, msg.kind) == ("robertl@im.example.com", "deriks@im.example.com",
                                                         "Hi Derik, lunch at noon?", "message")


def test_a_notify_to_a_call_back_url_is_a_delivery():
    """The same NOTIFY sent by the server to deriks's Call-Back listener: a message delivered to deriks."""
    [item] = decode(request("notify-deliver.http"))
    assert isinstance(item, DeliveredMessage)
    assert (item.message.sender, item.message.room) == ("robertl@im.example.com", "deriks@im.example.com")


def test_typing_presence_and_other_notifies_carry_nothing():
    """Typing (text/x-msmsgscontrol), PROPFIND and SUBSCRIBE (relayed untouched), a UPnP GENA NOTIFY."""
    assert decode(request("notify-typing.http")) == []
    assert decode(request("propfind.http")) is None and decode(request("subscribe-login.http")) is None
    upnp = HttpRequest.make("NOTIFY", "/event", {"NT": "upnp:event", "Content-Type": "text/xml"},
                            b'<e:propertyset xmlns:e="urn:schemas-upnp-org:event-1-0"><e:property/></e:propertyset>')
    assert decode(upnp) == []
    assert decode(HttpRequest.make("NOTIFY", "/x", {}, b"not xml at all")) == []


def test_a_file_invitation_is_text_for_policy():
    """Windows Messenger's file invitation over RVP: its text (the file's name) goes to policy as an invite."""
    [msg] = decode(request("notify-invite.http"))
    assert msg.kind == "invite" and "Application-File: budget.xls" in msg.text


def test_broken_rvp_is_refused_and_dtds_are_never_expanded():
    """An RVP body that does not parse, one without mime-data, one with a DTD: 400, never forwarded."""
    laughs = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><r:notification xmlns:r="x/rvp/"/>'
    for body in (b"<r:notification xmlns:r='http://schemas.microsoft.com/rvp/'><r:message>", laughs,
                 b"<r:notification xmlns:r='http://schemas.microsoft.com/rvp/'><r:message/></r:notification>"):
        [bad] = decode(HttpRequest.make("NOTIFY", "/instmsg/aliases/x", {}, body))
        assert isinstance(bad, MalformedRequest) and bad.status == 400


def test_a_mask_rewrites_the_mime_body_only():
    """A masked message: the MIME body inside mime-data is replaced (escaped), its MIME headers and the rest of the
    body byte-identical; a locator no rewriter knows is refused, never forwarded unchanged."""
    req = request("notify-send.http")
    masked = bodies.rewrite(req.body, "text/xml", [(rvp.MIME_LOCATOR, "Hi [REDACTED] & <co>")])
    head, tail = req.body.split(b"Hi Derik, lunch at noon?")
    assert masked == head + b"Hi [REDACTED] &amp; &lt;co&gt;" + tail
    [msg] = decode(HttpRequest(req.method, req.host, req.path, (), req.headers, masked))
    assert msg.text == "Hi [REDACTED] & <co>"
    cdata = notify_body(ROB, DERIK, "x").replace(b"MIME-Version", b"<![CDATA[MIME-Version").replace(
        b"</r:mime-data>", b"]]></r:mime-data>")
    assert b"[CDATA[" not in bodies.rewrite(cdata, "text/xml", [(rvp.MIME_LOCATOR, "y")])
    with pytest.raises(bodies.BodyError):
        bodies.rewrite(b"<x/>", "text/xml", [(rvp.MIME_LOCATOR, "masked")])
    with pytest.raises(bodies.BodyError):
        bodies.rewrite(b"<x/>", "text/xml", [(("rvp", "x"), "masked")])


def test_the_default_routes_hand_notify_to_rvp_only():
    """NOTIFY to a node URL (/instmsg/) is RVP's; other chat APIs keep their paths; RVP claims no other method."""
    routes = httpchat.Routes.parse(httpchat.DEFAULT_ROUTES)
    assert routes.match("im.example.com", "/instmsg/aliases/deriks") == [rvp]
    assert routes.match("deriks-pc.example.com", "/rvp-callback/deriks") == []       # a site adds its Call-Back path
    assert routes.match("h", "/api/v4/posts")[0].API == "mattermost"
    assert all(api.classify("GET", "/instmsg/aliases/deriks") is None for api in routes.match("h", "/instmsg/"))


def test_carrier_decides_both_directions(tmp_path):
    """Through the carrier (as gateway and replay use it): the sent NOTIFY is the client's message, the delivered
    one is decided with deriks as its recipient; a blocked word is refused 403 both ways."""
    decided = []

    class Pipeline:
        def check_message(self, text, ctx):
            from imguard.model import ALLOW, BLOCK, Decision
            decided.append((text, ctx.origin, ctx.sender, ctx.recipients))
            return Decision(action=BLOCK if BLOCKED_WORD in text else ALLOW)

        def record(self, event):
            pass

    from imguard.model import ChatContext
    carrier = ChatApiCarrier(Pipeline(), settings=ChatApiSettings(routes=["rvp=/"]))
    for name in ("notify-send.http", "notify-deliver.http"):
        req = request(name)
        for body, refused in ((req.body, False),
                              (req.body.replace(b"lunch at noon", BLOCKED_WORD.encode()), True)):
            call, fate = carrier.request_headers(HttpRequest(req.method, req.host, req.path, (), req.headers),
                                                 ChatContext())
            assert call is not None and call.api is rvp
            step = carrier.request_body(call, HttpRequest(req.method, req.host, req.path, (), req.headers, body))
            try:
                next(step)
                raise AssertionError("no file to inspect")
            except StopIteration as done:
                outcome = done.value
            assert (outcome is not None and outcome.status == 403) == refused
    assert [(o, s, r) for _, o, s, r in decided] == [
        ("client", "robertl@im.example.com", ("deriks@im.example.com",))] * 2 + [
        ("server", "robertl@im.example.com", ("deriks@im.example.com",))] * 2


# --- tshark's HTTP and XML dissectors on the same bytes ---------------------------------------------------------

@pytest.mark.parametrize("name", ["notify-send.http", "notify-deliver.http", "notify-invite.http"])
def test_tshark_reads_the_same_notify(tmp_path, name):
    """Each NOTIFY transcript in a capture (scapy), dissected by tshark: method, URI and host as imguard's request,
    the notification-from / -to hrefs as the principals imguard named, the mime-data's text as the text decided."""
    if shutil.which("tshark") is None:
        if os.environ.get("CI"):
            pytest.fail("tshark is not installed, and CI is set")
        pytest.skip("tshark is not installed (tools/setup.sh test)")
    from tests.test_tshark_crosscheck import tshark, write_capture
    raw = (DATA / name).read_bytes()
    answer = b"HTTP/1.1 200 Successful\r\nRVP-Notifications-Version: 0.2\r\nContent-Length: 0\r\n\r\n"
    pcap = write_capture(tmp_path / "rvp.pcap", [(True, raw), (False, answer)], 80)
    [frame] = tshark(pcap, "tcp.port==80,http", layer="xml")
    req = request(name)
    assert frame.values("http.request.method") == [req.method]
    assert frame.values("http.request.uri") == [req.path] and frame.values("http.host") == [req.host]
    tags = [t.split()[0].rstrip(">") for t in frame.values("xml.tag")]
    assert tags[:2] == ["<r:notification", "<r:message"]
    cdata = [r.decode() for r in frame.raws("xml.cdata")]
    hrefs = [c for c in cdata if c.startswith("http://")]
    [item] = decode(req)
    message = item.message if isinstance(item, DeliveredMessage) else item
    assert [rvp.principal(h) for h in hrefs] == [message.sender, message.room]
    # tshark shows the raw bytes; an XML parser hands on CR LF as LF (XML 1.0, 2.11 End-of-Line Handling)
    assert rvp.mime_text(cdata[-1].replace("\r\n", "\n"))[1] == message.text


# --- the real gateway, both ways, and the same decisions offline -------------------------------------------------

# The default routes and a route for the Call-Back listener's path (the client chooses it: a site adds its own)
ROUTES = ["--chat-routes", ",".join(httpchat.DEFAULT_ROUTES + ("rvp=/rvp-callback/",))]


@pytest.fixture(scope="module")
def rvp_world(tmp_path_factory):
    """A stand-in RVP server and a stand-in client Call-Back listener, each behind `imguard run` (reverse mode)."""
    from tests.peers.http_gateway import HttpGateway
    from tests.test_httpchat_gateway import Vendor
    server, listener = Vendor(), Vendor()
    server.start()
    listener.start()
    gw = HttpGateway.start(tmp_path_factory.mktemp("rvp-gw"),
                           [f"http://127.0.0.1:{server.port}", f"http://127.0.0.1:{listener.port}"],
                           extra_rules={"95-test-mask.yaml": MASK_RULE}, extra=ROUTES)
    try:
        yield server, listener, gw
    finally:
        status = gw.stop()
        server.stop()
        listener.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


def test_rvp_through_the_gateway_both_ways_and_offline(tmp_path, rvp_world):
    """Outbound: the inside client's NOTIFYs to the server, a clean one arrives byte-identical, a blocked one is
    refused 403 (RVP: not delivered) and never arrives, a masked one arrives masked (the rest of the body
    byte-identical), a sentinel after them arrives. Inbound: the
    outside server's NOTIFYs to the inside client's Call-Back listener, the same. Alerts name robertl and deriks
    and the direction; `imguard pcap` of the captured client legs gives the same decisions."""
    from tests.peers.capture import Capture
    from tests.test_httpchat_gateway import call
    from tests.test_inline_offline import assert_same, decisions, needs_tcpdump, pcap_replay, settled
    needs_tcpdump()
    server, listener, gw = rvp_world
    offset = gw.log_size()
    tag = uuid.uuid4().hex[:6]
    since = gw.mark()
    headers = {"Content-Type": "text/xml", "RVP-Notifications-Version": "0.2", "RVP-Ack-Type": "DeepOr"}
    # deriks is inside (example.com: the bundled zones), robertl at a partner's server outside
    ways = ((gw.ports[0], "/instmsg/aliases/robertl", server, DERIK, PARTNER, "outbound"),
            (gw.ports[1], "/rvp-callback/deriks", listener, PARTNER, DERIK, "inbound"))
    with Capture.start(tmp_path / "rvp.pcap", f"tcp port {gw.ports[0]} or tcp port {gw.ports[1]}") as capture:
        for port, path, receiver, sender, to, direction in ways:
            for text, status in ((f"lunch at noon {tag}", 200), (f"the {BLOCKED_WORD} plan {tag}", 403),
                                 (f"code {MASK_WORD} {tag}", 200), (f"sentinel {direction} {tag}", 200)):
                body = notify_body(sender, to, text)
                got, _, answer = call(port, "NOTIFY", path, body, {**headers, "RVP-From-Principal": sender})
                assert got == status, (direction, text, answer)
                arrived = [r.body for r in receiver.requests if r.method == "NOTIFY" and tag.encode() in r.body]
                if MASK_WORD in text:
                    assert arrived[-1] == body.replace(MASK_WORD.encode(), b"[REDACTED:keyword]"), direction
                else:
                    assert (body in arrived) == (status == 200), (direction, text)
            assert not [b for b in receiver.bodies(path) if BLOCKED_WORD.encode() in b or MASK_WORD.encode() in b]
        for direction in ("outbound", "inbound"):
            alert = asyncio.run(gw.wait_alert(lambda e, d=direction: e.get("event", {}).get("action") == "block"
                                              and f"{BLOCKED_WORD} plan {tag}" in json.dumps(e)
                                              and e["imguard"]["context"]["direction"] == d, since))
            assert alert and alert["network"]["protocol"] == "rvp", direction
            ctx = alert["imguard"]["context"]
            inside, outside = "deriks@im.example.com", "robertl@im.partner.test"
            sender, to, origin = (inside, outside, "client") if direction == "outbound" else (outside, inside, "server")
            assert (ctx["sender"], ctx["recipients"], ctx["origin"]) == (sender, [to], origin)
    inline = decisions([e for e in settled(gw.alerts)[since:] if tag in json.dumps(e)])
    assert sum(inline.values()) == 8, inline
    pcap = capture.select(tmp_path / "client-legs.pcap", f"tcp port {gw.ports[0]} or tcp port {gw.ports[1]}")
    offline = decisions([e for e in pcap_replay(pcap, tmp_path / "replay", [], gw.directory / "rules",
                                                tmp_path / "replay-data", ROUTES) if tag in json.dumps(e)])
    assert_same(inline, offline, "RVP")
    assert not gw.errors_since(offset), "imguard logged errors:\n" + "\n".join(gw.errors_since(offset))
