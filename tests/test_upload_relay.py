"""Uploads cross the gateway in reverse deployments too (issue 16 item 2): the XEP-0363 slot's PUT URL is rewritten
to a reverse listener of the gateway in front of the upload service (`--xmpp-upload-relay PUBLIC=UPSTREAM`), so a
client that reaches the gateway directly and has no HTTP proxy still uploads through it and the file is scanned; a
slot no relay covers is refused with a notice (`--xmpp-upload-refuse-unrelayed`); a proxied client's PUT to the
relay URL is carried, not refused as a loop.

Real Prosody (HTTP upload), real slixmpp clients, the real `imguard run`. The control (no relay, no proxy) shows the
PUT then goes straight to Prosody, unscanned: what the relay removes.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from slixmpp.exceptions import IqError

from tests.peers.gateway import Gateway, alert_names_file
from tests.peers.prosody import free_ports
from tests.test_e2e_xmpp import CLEAN, EICAR
from tests.xmpp_clients import STARTTLS, Client, Endpoint, sha256

pytestmark = pytest.mark.timeout(180)


def run(coro):
    return asyncio.run(coro)


def start(directory, prosody, relay: bool, extra: list[str] = ()) -> tuple[Gateway, int]:
    (port,) = free_ports(1)
    upstream = f"http://127.0.0.1:{prosody.http_port}"
    args = ["--http-ports", str(prosody.http_port), *extra]
    if relay:
        args += ["--mode", f"reverse:{upstream}@{port}", "--xmpp-upload-relay", f"http://127.0.0.1:{port}={upstream}"]
    return Gateway.start(directory, prosody, extra=args), port


@pytest.fixture(scope="module")
def relay_gateway(peers_dir, prosody):
    gw, port = start(peers_dir / "upload-relay", prosody, relay=True)
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


async def _direct_get(url: str) -> tuple[int, bytes]:
    """A GET straight to the upload service, as the receiver outside the gateway fetches the shared link."""
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(url) as response:
            return response.status, await response.read()


def test_a_slot_no_relay_covers_is_refused_with_a_notice(peers_dir, prosody):
    """`--xmpp-upload-refuse-unrelayed` without a relay: the client gets an error with imguard's notice in place of
    the slot (so no PUT can go around the gateway), and an `upload_slot_unrouted` anomaly is recorded."""
    gw, _ = start(peers_dir / "upload-refuse", prosody, relay=False, extra=["--xmpp-upload-refuse-unrelayed"])
    try:
        async def scenario():
            async with client(gw, prosody, "alice", proxy=False) as alice:
                since = gw.mark()
                with pytest.raises(IqError) as refused:
                    await alice.request_upload_slot("report.pdf", len(CLEAN), "application/pdf")
                text = str(refused.value.iq)
                assert "not-allowed" in text and "no upload relay" in text, text
                assert await gw.wait_alert(lambda e: e.get("imguard", {}).get("anomaly", {}).get("kind")
                                           == "upload_slot_unrouted", since=since)
        run(scenario())
    finally:
        gw.stop()


def test_control_without_relay_a_direct_client_uploads_around_the_gateway(peers_dir, prosody):
    """No relay, no proxy on the client: the PUT goes straight to Prosody, EICAR is stored (201) and the gateway
    logs nothing. This is the bypass the relay removes, and what proves the tests above route through it."""
    gw, _ = start(peers_dir / "upload-control", prosody, relay=False)
    try:
        async def scenario():
            async with client(gw, prosody, "alice", proxy=False) as alice:
                since = gw.mark()
                name = f"eicar-control-{uuid.uuid4().hex[:6]}.com"
                up = await alice.upload(name, EICAR)
                assert up.accepted and up.put_url.startswith(f"http://127.0.0.1:{prosody.http_port}/"), up
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
