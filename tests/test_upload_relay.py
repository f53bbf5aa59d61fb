"""Uploads cross the gateway in reverse deployments too (issue 16 item 2). A chat connection that came through a
reverse listener has a client whose HTTP goes straight to the upload service, around the gateway: its XEP-0363 slot
is rewritten to a reverse listener of the gateway in front of the upload service (`--xmpp-upload-relay
PUBLIC=UPSTREAM`), so the PUT crosses the gateway and is scanned; a slot no relay covers is refused with a notice
(`--xmpp-upload-refuse-unrelayed auto`, the default: the session is told by the gateway adapter which kind of
listener it arrived on). A proxied client's PUT to the relay URL is carried, not refused as a loop.

Real Prosody (HTTP upload), real slixmpp clients, the real `imguard run`. The control (no relay, `never`) shows the
PUT then goes straight to Prosody, unscanned: what the relay and the refusal remove. The decision table (listener x
setting) is checked on the session itself with a real client's captured bytes.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from slixmpp.exceptions import IqError

from tests.peers.gateway import Gateway, alert_names_file
from tests.test_e2e_xmpp import CLEAN, EICAR, sentinel_after
from tests.xmpp_clients import STARTTLS, Client, Endpoint, sha256

pytestmark = pytest.mark.timeout(180)


def run(coro):
    return asyncio.run(coro)


def start(directory, prosody, relay: bool, extra: list[str] = ()) -> tuple[Gateway, int]:
    """`imguard run` (reverse listeners in front of Prosody) with or without the upload relay: (gateway, relay port)."""
    gw = Gateway.start(directory, prosody, extra=["--http-ports", str(prosody.http_port), *extra], upload_relay=relay)
    return gw, gw.upload_relay_port


def stored_uploads(prosody) -> set[Path]:
    """The files in Prosody's upload store (mod_http_file_share keeps each upload as a file under its data folder):
    an independent look at what reached the upload service."""
    data = Path(prosody.directory) / "data"
    return {p for p in data.rglob("*") if p.is_file() and "http_file_share" in str(p.relative_to(data))}


@pytest.fixture(scope="module")
def relay_gateway(peers_dir, prosody):
    gw, port = start(peers_dir / "upload-relay", prosody, relay=True, extra=["--xmpp-upload-relay-links", "auto"])
    try:
        yield gw, port
    finally:
        gw.stop()


def client(gw: Gateway, prosody, role: str, proxy: bool) -> Client:
    user = f"{role}-{uuid.uuid4().hex[:6]}"
    prosody.add_account(user)
    endpoint = Endpoint("127.0.0.1", gw.c2s_port, STARTTLS, ca_file=gw.ca_file,
                        http_proxy=f"http://127.0.0.1:{gw.http_port}" if proxy else None)
    return Client.connected(endpoint, f"{prosody.jid(user)}/{role}", prosody.password(user))


def file_event(name: str, actions: tuple[str, ...]):
    return lambda e: alert_names_file(e, name) and e["event"].get("action") in actions


@pytest.mark.parametrize("proxy", [False, True], ids=["direct-client", "proxied-client"])
def test_a_relayed_slot_is_scanned_whatever_the_clients_http_route(relay_gateway, prosody, proxy):
    """The client is given the relay's PUT URL; EICAR is refused (403, block event, nothing stored upstream) and a
    clean file is stored byte-identical (allow event), for a client without an HTTP proxy and for one whose proxy is
    the gateway itself (its PUT to the gateway's own relay listener is not refused as a loop)."""
    gw, port = relay_gateway

    async def scenario():
        async with client(gw, prosody, "alice", proxy) as alice:
            since = gw.mark()
            name = f"eicar-relay-{uuid.uuid4().hex[:6]}.com"
            up = await alice.upload(name, EICAR)
            assert up.put_url.startswith(f"http://127.0.0.1:{port}/"), f"the slot was not rewritten: {up.put_url}"
            assert up.get_url.startswith(f"http://127.0.0.1:{prosody.http_port}/"), up.get_url
            assert up.put_status == 403, (up.put_status, up.put_text)
            assert await gw.wait_alert(file_event(name, ("block", "quarantine")), since=since), f"no block for {name}"
            status, body = await _direct_get(up.get_url)
            assert status != 200 and EICAR not in body, "the blocked file reached the upload service"
            name = f"numbers-relay-{uuid.uuid4().hex[:6]}.bin"
            up = await alice.upload(name, CLEAN)
            assert up.accepted, (up.put_status, up.put_text)
            assert await gw.wait_alert(file_event(name, ("allow", "alert")), since=since), f"{name} was not scanned"
            status, body = await _direct_get(up.get_url)
            assert status == 200 and sha256(body) == sha256(CLEAN)
        assert not gw.errors_since(0), gw.logs()
    run(scenario())


def outside_client(prosody, role: str) -> Client:
    """A client straight to Prosody (not through the gateway): the other party, outside."""
    user = f"{role}-{uuid.uuid4().hex[:6]}"
    prosody.add_account(user)
    return Client.connected(Endpoint("127.0.0.1", prosody.c2s_port, STARTTLS, ca_file=prosody.ca_file),
                            f"{prosody.jid(user)}/{role}", prosody.password(user))


async def share_from_outside(carol: Client, alice: Client, name: str, data: bytes) -> tuple[str, str]:
    """carol (outside) uploads `data` straight to Prosody and sends alice the link as Conversations does (the GET URL
    as the body and in an XEP-0066 OOB element): (the GET URL carol sent, the body alice got)."""
    up = await carol.upload(name, data)
    assert up.accepted, f"the outside upload failed: {up}"
    carol.send_chat(alice.jid, up.get_url, oob_url=up.get_url)
    got = await alice.wait_for(lambda r: [m["body"] for m in r.messages if name in (m["body"] or "")
                                          and m["type"] != "error"], timeout=10)
    assert got, f"the link did not reach alice: {alice.bodies()}"
    return up.get_url, got[0]


@pytest.mark.parametrize("proxy", [False, True], ids=["direct-client", "proxied-client"])
def test_a_link_shared_with_a_reverse_client_is_fetched_through_the_relay_and_scanned(relay_gateway, prosody, proxy):
    """Inbound: carol, outside, uploads straight to Prosody and sends alice (inside, through the reverse listener)
    the link. alice gets it rewritten to the relay (same path) and her GET crosses the gateway: EICAR is a 403 with
    none of its bytes, a block event names the file and both parties (inbound), alice is told; a clean file arrives
    byte-identical with an allow event, exactly one (a proxied client's GET of the relay URL goes straight to the
    service, not held a second time by the relay listener). The control: carol's own GET of the original URL gets
    EICAR from Prosody, so the file really is there."""
    gw, port = relay_gateway

    async def scenario():
        async with client(gw, prosody, "alice", proxy) as alice, outside_client(prosody, "carol") as carol:
            since = gw.mark()
            name = f"eicar-in-{uuid.uuid4().hex[:6]}.com"
            sent, body = await share_from_outside(carol, alice, name, EICAR)
            relayed = sent.replace(f"http://127.0.0.1:{prosody.http_port}/", f"http://127.0.0.1:{port}/")
            assert body == relayed != sent, (sent, body)
            status, data = await alice.http_get(body)
            assert status == 403 and EICAR not in data, (status, data[:120])
            event = await gw.wait_alert(file_event(name, ("block", "quarantine")), since=since)
            assert event, f"no block event for the download of {name}"
            assert event["imguard"]["context"]["direction"] == "inbound", event["imguard"]["context"]
            assert event["imguard"]["context"]["sender"].split("/")[0] == carol.jid.split("/")[0]
            told = await alice.wait_for(lambda r: [m for m in r.messages if name in (m["body"] or "")
                                                   and "blocked" in (m["body"] or "")], timeout=5)
            assert told, f"alice was not told: {alice.bodies()}"
            assert await _direct_get(sent) == (200, EICAR), "control: the file is not on the upload service"
            name = f"numbers-in-{uuid.uuid4().hex[:6]}.bin"
            sent, body = await share_from_outside(carol, alice, name, CLEAN)
            assert body.startswith(f"http://127.0.0.1:{port}/"), body
            status, data = await alice.http_get(body)
            assert status == 200 and sha256(data) == sha256(CLEAN), (status, len(data))
            assert await gw.wait_alert(file_event(name, ("allow", "alert")), since=since), f"{name} was not scanned"
            await sentinel_after(carol, alice, "after the clean download")
            assert len([e for e in gw.alerts()[since:] if alert_names_file(e, name)]) == 1, "scanned twice"
        assert not gw.errors_since(0), gw.logs()
    run(scenario())


async def _direct_get(url: str) -> tuple[int, bytes]:
    """A GET straight to the upload service, as the receiver outside the gateway fetches the shared link."""
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(url) as response:
            return response.status, await response.read()


def test_reverse_mode_without_a_relay_refuses_the_slot_with_a_notice(peers_dir, prosody):
    """The default (`auto`): alice's chat connection came through a reverse listener and no relay covers Prosody's
    upload service, so her slot is refused: the real slixmpp client gets an error iq (not-allowed, imguard's text) in
    place of the slot, an `upload_slot_unrouted` anomaly names the listener, and nothing reaches Prosody's upload
    store. Her connection goes on: a sentinel message to bob arrives after the refusal."""
    gw, _ = start(peers_dir / "upload-refuse", prosody, relay=False)
    try:
        async def scenario():
            async with client(gw, prosody, "alice", proxy=False) as alice, \
                    client(gw, prosody, "bob", proxy=False) as bob:
                since, stored = gw.mark(), stored_uploads(prosody)
                name = f"report-{uuid.uuid4().hex[:6]}.pdf"
                with pytest.raises(IqError) as refused:
                    await alice.request_upload_slot(name, len(EICAR), "application/pdf")
                iq = refused.value.iq
                assert iq["error"]["condition"] == "not-allowed", str(iq)
                assert name in iq["error"]["text"] and "no upload relay" in iq["error"]["text"], str(iq)
                event = await gw.wait_alert(lambda e: e.get("imguard", {}).get("anomaly", {}).get("kind")
                                            == "upload_slot_unrouted", since=since)
                assert event, f"no upload_slot_unrouted event in {gw.alerts_file}"
                anomaly = event["imguard"]["anomaly"]
                assert anomaly["listener"] == "reverse" and anomaly["name"] == name, anomaly
                assert anomaly["url"].startswith(f"http://127.0.0.1:{prosody.http_port}/"), anomaly
                await sentinel_after(alice, bob, "after the refused slot")
                assert stored_uploads(prosody) == stored, "something reached Prosody's upload store"
            assert not gw.errors_since(0), gw.logs()
        run(scenario())
    finally:
        gw.stop()


def test_control_never_lets_a_direct_client_upload_around_the_gateway(peers_dir, prosody):
    """`--xmpp-upload-refuse-unrelayed never`, no relay, no proxy on the client: the slot is granted as the server
    sent it, the PUT goes straight to Prosody, EICAR is stored (201, in Prosody's store) and the gateway logs nothing;
    a link shared from outside reaches alice as sent and her GET gets EICAR, unseen. This is the bypass `auto` and the
    relay remove, and what proves the tests above route through the gateway."""
    gw, _ = start(peers_dir / "upload-control", prosody, relay=False, extra=["--xmpp-upload-refuse-unrelayed", "never"])
    try:
        async def scenario():
            async with client(gw, prosody, "alice", proxy=False) as alice:
                since, stored = gw.mark(), stored_uploads(prosody)
                name = f"eicar-control-{uuid.uuid4().hex[:6]}.com"
                up = await alice.upload(name, EICAR)
                assert up.accepted and up.put_url.startswith(f"http://127.0.0.1:{prosody.http_port}/"), up
                assert await gw.wait_alert(file_event(name, ("block", "quarantine", "allow", "alert")), since=since,
                                           timeout=3) is None
                assert stored_uploads(prosody) - stored, "control: the upload is not in Prosody's store"
            async with client(gw, prosody, "alice", proxy=False) as alice, outside_client(prosody, "carol") as carol:
                since = gw.mark()
                name = f"eicar-in-control-{uuid.uuid4().hex[:6]}.com"
                sent, body = await share_from_outside(carol, alice, name, EICAR)
                assert body == sent
                assert await alice.http_get(body) == (200, EICAR), "control: the direct download did not get EICAR"
                assert await gw.wait_alert(file_event(name, ("block", "quarantine", "allow", "alert")), since=since,
                                           timeout=3) is None
        run(scenario())
    finally:
        gw.stop()


def test_relay_settings_are_checked_and_urls_rewritten():
    """A relay is two origins and needs its reverse listener (else `imguard run` says which --mode to add); the PUT
    URL keeps its path and query on the relay's origin; an origin no relay covers gets None."""
    from mitmproxy.proxy import mode_specs

    from imguard.files.expected import parse_upload_relays, upload_relay_url
    from imguard.gateway.master import GatewayError, check_upload_relays
    relays = ["https://gw.example.org:5443=https://upload.example.org"]
    assert parse_upload_relays(relays) == {"https://upload.example.org:443": "https://gw.example.org:5443"}
    assert upload_relay_url("https://Upload.example.org:443/f/ab/x.pdf?v=1", relays) == \
        "https://gw.example.org:5443/f/ab/x.pdf?v=1"
    assert upload_relay_url("https://upload.example.org:5281/f/ab/x.pdf", relays) is None
    with pytest.raises(ValueError, match="PUBLIC=UPSTREAM"):
        parse_upload_relays(["https://gw.example.org:5443"])
    check_upload_relays(relays, [mode_specs.ProxyMode.parse("reverse:https://upload.example.org:443@5443")])
    with pytest.raises(GatewayError, match="--mode reverse:https://upload.example.org:443@5443"):
        check_upload_relays(relays, [mode_specs.ProxyMode.parse("reverse:https://other.example.org:443@5443")])


# --- the decision, on the session: which slots are refused, by listener and setting -------------------------------

CAPTURED_PUT = "http://127.0.0.1:15280/file_share/XBkHXnfjh0EOWcdF7NVRCnkU/eicar.com"   # httpupload_alice.json


def granted(listener, refusal: str = "auto", relays: tuple[str, ...] = ()):
    """alice's captured session (slot request, Prosody's slot, the PUT's link) through a session that arrived on
    `listener`: (what the client got, the expected-transfers table)."""
    from imguard.files.expected import ExpectedTransfers
    from imguard.protocols.xmpp import XmppLimits
    from tests.test_xmpp_session import new, play, segments
    transfers = ExpectedTransfers()
    session = new(transfers=transfers, listener=listener,
                  limits=XmppLimits(upload_relay=list(relays), upload_refuse_unrelayed=refusal))
    return play(session, segments("httpupload_alice.json")), transfers


@pytest.mark.parametrize(("listener", "refusal", "refused"), [
    ("reverse", "auto", True), ("transparent", "auto", False), ("proxy", "auto", False), ("none", "auto", False),
    ("reverse", "never", False), ("transparent", "always", True), ("proxy", "always", True),
])
def test_which_unrelayed_slots_are_refused(listener, refusal, refused):
    """`auto` refuses a slot no relay covers only on a connection that came through a reverse listener (its client's
    HTTP goes around the gateway); transparent and explicit-proxy connections, and the offline replay (no listener),
    keep their slots, registered for the HTTP side. `always` and `never` say so whatever the listener. A refused slot
    reaches the client as a not-allowed error iq with the notice, in its place, and is not registered."""
    from imguard.files.expected import Listener
    from tests.test_xmpp_session import anomalies, sent
    cmds, transfers = granted(Listener(listener), refusal)
    to_client = sent(cmds, to_client=True)
    if refused:
        assert b"<not-allowed " in to_client and b"no upload relay" in to_client and b"<slot " not in to_client
        assert "upload_slot_unrouted" in anomalies(cmds)
        assert transfers.take_upload(CAPTURED_PUT) is None
    else:
        assert f"<put url='{CAPTURED_PUT}'".encode() in to_client and b"<not-allowed " not in to_client
        assert "upload_slot_unrouted" not in anomalies(cmds)
        assert transfers.take_upload(CAPTURED_PUT).name == "eicar.com"


def test_a_relay_rewrites_the_slot_on_a_reverse_connection():
    """With a relay covering the upload service, a reverse connection's slot is granted, its PUT URL rewritten to
    the relay (same path) and registered under both URLs; the GET URL stays the service's."""
    from imguard.files.expected import Listener
    from tests.test_xmpp_session import sent
    cmds, transfers = granted(Listener.REVERSE, relays=("http://gw.example:5443=http://127.0.0.1:15280",))
    to_client = sent(cmds, to_client=True)
    relayed = CAPTURED_PUT.replace("http://127.0.0.1:15280", "http://gw.example:5443")
    assert f"<put url='{relayed}'".encode() in to_client and f"<get url='{CAPTURED_PUT}'".encode() in to_client
    assert transfers.take_upload(relayed) is not None and transfers.take_upload(CAPTURED_PUT) is not None


def test_the_listener_comes_from_the_mitmproxy_mode_and_the_setting_is_checked():
    """The adapter's fact: every mitmproxy mode maps to a kind of listener (an unknown one to reverse, whose HTTP the
    gateway cannot assume it sees); a value of the setting that is not auto/always/never stops `imguard run`."""
    from mitmproxy.proxy import mode_specs

    from imguard.files.expected import Listener, check_upload_refusal
    from imguard.gateway.master import Gateway as InProcess
    from imguard.gateway.master import GatewayError, GatewaySettings
    from imguard.protocols.xmpp import XmppLimits
    expected = {"transparent": "transparent", "wireguard": "transparent", "local": "transparent",
                "regular": "proxy", "socks5": "proxy", "upstream:http://proxy.example:3128": "proxy",
                "reverse:tcp://chat.example:5222": "reverse", "reverse:https://upload.example": "reverse"}
    for spec, listener in expected.items():
        assert Listener.of_mode(mode_specs.ProxyMode.parse(spec).type_name).value == listener, spec
    assert Listener.of_mode("something-new") is Listener.REVERSE
    assert check_upload_refusal("auto") == "auto"
    with pytest.raises(ValueError, match="auto, always, never"):
        check_upload_refusal("sometimes")
    with pytest.raises(GatewayError, match="upload_refuse_unrelayed 'sometimes'"):
        InProcess(GatewaySettings(mode=["regular@127.0.0.1:0"]), None, data_dir=Path("/nonexistent"), factories={},
                  transfers=None, xmpp_limits=XmppLimits(upload_refuse_unrelayed="sometimes"))


def delivered(listener, body: str, oob: str = "", links: str = "auto"):
    """bob's message, as the server delivers it to alice (logged in on a session that arrived on `listener`, with a
    relay for the captured upload service): (what alice got, the table, the session's commands)."""
    from imguard.files.expected import ExpectedTransfers
    from imguard.protocols.xmpp import XmppLimits
    from tests.test_xmpp_session import logged_in, sent
    transfers = ExpectedTransfers()
    session = logged_in(transfers=transfers, listener=listener, limits=XmppLimits(
        upload_relay=["http://gw.example:5443=http://127.0.0.1:15280"], upload_relay_links=links))
    extra = f"<x xmlns='jabber:x:oob'><url>{oob}</url></x>" if oob else ""
    cmds = session.data_received(False, (f"<message type='chat' from='bob@localhost/b' to='alice@localhost/t' "
                                         f"id='l1'><body>{body}</body>{extra}</message>").encode())
    return sent(cmds, to_client=True), transfers, cmds


def test_a_link_delivered_on_a_reverse_connection_is_rewritten_to_the_relay():
    """A file link on the relayed upload service, delivered to a client that came through a reverse listener (its
    GET would go straight to the service): in the body and the XEP-0066 URL it names the relay (path kept), and the
    download is expected under both URLs, as the file bob shares with alice (the relay listener sees the original,
    a proxied client's GET the relay's; either is sent on to the original). Other links stay as written."""
    from imguard.files.expected import Listener
    other = "https://elsewhere.example/page"
    got, transfers, _ = delivered(Listener.REVERSE, f"look {CAPTURED_PUT} and {other}", oob=CAPTURED_PUT)
    relayed = CAPTURED_PUT.replace("http://127.0.0.1:15280", "http://gw.example:5443")
    assert got.count(relayed.encode()) == 2 and CAPTURED_PUT.encode() not in got and other.encode() in got, got
    for url in (CAPTURED_PUT, relayed):
        info = transfers.expected_download(url)
        assert info.url == CAPTURED_PUT and info.name == "eicar.com", (url, info)
        assert (info.context.sender, info.context.recipients, info.context.origin) == \
            ("bob@localhost", ("alice@localhost",), "server"), info.context
    assert transfers.expected_download(other) is None


@pytest.mark.parametrize(("listener", "links"), [("transparent", "auto"), ("proxy", "auto"), ("reverse", "never")])
def test_a_link_whose_download_crosses_anyway_is_left_as_sent(listener, links):
    """Where the client's GET crosses the gateway anyway (transparent, its explicit proxy; `never` says so for a
    reverse deployment whose clients use the proxy listener), the message is forwarded byte-exact."""
    from imguard.files.expected import Listener
    got, transfers, _ = delivered(Listener(listener), f"look {CAPTURED_PUT}", oob=CAPTURED_PUT, links=links)
    assert CAPTURED_PUT.encode() in got and b"gw.example" not in got
    assert transfers.expected_download(CAPTURED_PUT.replace("127.0.0.1:15280", "gw.example:5443")) is None


def test_a_link_to_a_blocked_file_is_still_refused_not_rewritten():
    """The link's file was blocked already: the message is refused (policy saw the URL as sent), not relayed."""
    from imguard.files.expected import Listener
    from imguard.protocols.xmpp import XmppLimits
    from tests.test_xmpp_session import logged_in, sent
    from imguard.files.expected import ExpectedTransfers
    transfers = ExpectedTransfers()
    transfers.mark_blocked_url(CAPTURED_PUT, "malware")
    session = logged_in(transfers=transfers, listener=Listener.REVERSE, limits=XmppLimits(
        upload_relay=["http://gw.example:5443=http://127.0.0.1:15280"]))
    cmds = session.data_received(False, (f"<message type='chat' from='bob@localhost/b' to='alice@localhost/t' "
                                         f"id='l2'><body>{CAPTURED_PUT}</body></message>").encode())
    got = sent(cmds, to_client=True)
    assert b"gw.example" not in got and CAPTURED_PUT.encode() not in got and b"was blocked" in got, got
