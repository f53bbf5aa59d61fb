"""A released file reaches its receiver: the one-time link sent into the chat by the gateway.

Real parts end to end: a real Prosody, the real `imguard run` in front of it, slixmpp clients, and a real
`imguard console` process on the gateway's data folder while the gateway runs (they share only that folder: the
console posts the release to `DATA_DIR/releases`, the gateway polls it). A file is blocked and quarantined, the
blocked sender asks for its release on the console's page, analysts approve it over HTTP (CSRF tokens, logins: the
console's own code path), and the receiver's own XMPP client gets a chat message with the link; the link, fetched
as a browser would (its page, then the button's POST), gives the file byte-identical once and refuses a second time.
A receiver offline at release time gets it when they log in through the gateway; a release nobody collects expires.
Both sides: the sender, connected through the same gateway, never gets the receiver's link; the link (the
credential) is in no event and not in the gateway's log.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.cookiejar
import json
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imguard.console.release import Releases, Step, link_hash
from imguard.quarantine import QuarantineStore
from imguard.releases import Handoff, Outbox
from tests.peers.gateway import PYTHON, Gateway
from tests.peers.ngircd import IrcGateway
from tests.peers.payloads import random_payload
from tests.peers.prosody import PeerError, free_ports, stop_process, wait_for_port
from tests.test_console import _quarantined
from tests.test_console_e2e import EICAR, EICAR_SHA256, PASSWORD, Console, _imguard
from tests.test_e2e_irc import Chat, Route, irc_dir, ircd  # noqa: F401 (ngIRCd and its folder: fixtures)
from tests.xmpp_clients import STARTTLS, Client

pytestmark = pytest.mark.timeout(240)

CAROL, DAVE, ERIN = "release-carol", "release-dave", "release-erin"
SECRET = random_payload(3000)                      # not malware: blocked by the test's own rule below
SECRET_SHA256 = hashlib.sha256(SECRET).hexdigest()
LINK = re.compile(r"https://\S+/released/[A-Za-z0-9_-]{40,}")
EXTENSION_RULE = """\
rules:
  - id: test-secret-extension
    title: Files named .secret
    severity: medium
    action: block
    applies_to: file
    notify: "Your file {file.name} was blocked."
    match:
      extension: [secret]
"""


@pytest.fixture(scope="module")
def gw(prosody, tmp_path_factory):
    """`imguard run` in front of Prosody, reading the release outbox every 0.2 s, with a rule that blocks `.secret`
    files (an ordinary block: one analyst releases it; EICAR is malware: two)."""
    for user in (CAROL, DAVE, ERIN):
        if user not in prosody.accounts:
            prosody.add_account(user)
    directory = tmp_path_factory.mktemp("release-gateway")
    (directory / "rules").mkdir()
    (directory / "rules" / "95-test-secret.yaml").write_text(EXTENSION_RULE)
    gateway = Gateway.start(directory, prosody, extra=["--release-poll-seconds", "0.2"])
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def console(gw, tmp_path_factory):
    """`imguard console` on the running gateway's data folder, its links naming its own address."""
    for name in ("anna", "bert"):
        result = _imguard("console", "user", "add", name, "--role", "analyst", "--password-file", "-",
                          data_dir=gw.data_dir, stdin=PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
    port = free_ports(1)[0]
    log = tmp_path_factory.mktemp("release-console") / "console.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(PYTHON), "-m", "imguard", "console", "--data-dir", str(gw.data_dir),
                                    "--console-port", str(port), "--console-public-url", f"https://127.0.0.1:{port}"],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_port(port, 60, process, what="imguard console")
    except PeerError:
        stop_process(process)
        raise
    yield Console(gw.data_dir, port, process, log)
    stop_process(process)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-4000:]


class Browser:
    """An HTTPS client with a cookie jar that trusts imguard's CA: the console's forms as a browser posts them."""

    def __init__(self, console: Console, ca_file: Path):
        self.url = console.url
        context = ssl.create_default_context(cafile=str(ca_file))
        self.opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                                  urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> str:
        with self.opener.open(self.url + path if path.startswith("/") else path, timeout=20) as answer:
            return answer.read().decode()

    def post(self, path: str, form: dict, page: str | None = None) -> tuple[int, bytes]:
        """POST `form` with the CSRF token of `page` (GET first; default: `path` itself)."""
        csrf = re.search(r'name="csrf" value="([^"]+)"', self.get(page or path))
        assert csrf, f"no CSRF token on {page or path}"
        data = urllib.parse.urlencode({**form, "csrf": csrf.group(1)}).encode()
        try:
            with self.opener.open(self.url + path if path.startswith("/") else path, data=data, timeout=20) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def login(self, name: str) -> None:
        status, body = self.post("/login", {"name": name, "password": PASSWORD})
        assert status == 200 and b"Wrong name" not in body, body[:500]


def request_and_approve(console: Console, gw: Gateway, sha256: str, requester: str, analysts: tuple[str, ...]) -> int:
    """The blocked person's request on /release, then each analyst's approval; the request's number."""
    person = Browser(console, gw.ca_file)
    status, body = person.post("/release", {"sha256": sha256, "requester": requester, "why": "I need it for work"},
                               page=f"/release?sha256={sha256}")
    assert status == 200 and b"is recorded" in body, body[:800]
    request_id = int(re.search(rb"number (\d+)", body).group(1))
    for name in analysts:
        analyst = Browser(console, gw.ca_file)
        analyst.login(name)
        status, body = analyst.post(f"/quarantine/requests/{request_id}/approve", {"reason": f"checked by {name}"},
                                    page=f"/quarantine/{sha256}")
        assert status == 200, body[:800]
    return request_id


def redeem(console: Console, gw: Gateway, link: str) -> tuple[int, bytes]:
    """The receiver following the link: its page (a link preview stops there), then the button."""
    return Browser(console, gw.ca_file).post(link, {})


def events(gw: Gateway, action: str) -> list[dict]:
    return [e for e in gw.alerts() if e["event"].get("action") == action]


async def wait_event(gw: Gateway, action: str, request_id: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(gw, action):
            if event["imguard"]["release"]["request"] == request_id:
                return event
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {action} for request {request_id}\n{gw.logs()}")


def links(client: Client) -> list[str]:
    return [m for body in client.bodies() for m in LINK.findall(body)]


def test_released_malware_link_reaches_the_online_receiver_once(gw, console, prosody):
    """EICAR blocked from carol to dave; carol asks, two analysts approve (malware); dave's own client gets the
    link in a chat message, carol (also behind the gateway) gets none; the link gives EICAR once."""
    async def scenario() -> tuple[str, int]:
        endpoint = gw.endpoint(STARTTLS)
        async with Client.connected(endpoint, prosody.jid(CAROL) + "/laptop", prosody.password(CAROL)) as carol, \
                Client.connected(endpoint, prosody.jid(DAVE) + "/phone", prosody.password(DAVE)) as dave:
            result = await carol.ibb_send(dave.jid, EICAR, name="tool.exe")
            carol.send_chat(dave.jid, "sentinel after eicar")
            assert await dave.wait_message("sentinel after eicar")
            assert EICAR not in bytes(dave.received.ibb.get(result.sid, b"")), "EICAR reached dave"
            assert (gw.data_dir / "quarantine").is_dir()
            request_id = await asyncio.to_thread(request_and_approve, console, gw, EICAR_SHA256,
                                                 prosody.jid(CAROL), ("anna", "bert"))
            got = await dave.wait_for(lambda _: links(dave), timeout=20)
            assert got, f"dave got no link: {dave.bodies()}\n{gw.logs()}"
            dave.send_chat(carol.jid, "sentinel after the link")
            assert await carol.wait_message("sentinel after the link")
            assert not links(carol), f"the sender got the receiver's link: {carol.bodies()}"
            message = next(m for m in dave.received.messages if LINK.search(m["body"] or ""))
            assert str(message["from"]) == prosody.jid(DAVE).split("@")[1], "the link is not the gateway's notice"
            return got[0], request_id
    link, request_id = asyncio.run(scenario())
    assert link.startswith(console.url + "/released/")
    delivered = asyncio.run(wait_event(gw, "release_delivered", request_id))
    assert delivered["imguard"]["release"]["receiver"] == prosody.jid(DAVE)
    assert delivered["file"]["hash"]["sha256"] == EICAR_SHA256 and delivered["event"]["outcome"] == "success"
    assert delivered["network"]["protocol"] == "xmpp"
    token = link.rsplit("/", 1)[1]
    assert token not in gw.alerts_file.read_text() and token not in gw.log_file.read_text(errors="replace")
    assert not list((gw.data_dir / "releases").glob("*.json")), "the delivered handoff is still in the outbox"

    status, body = redeem(console, gw, link)
    assert status == 200 and body == EICAR
    status, body = redeem(console, gw, link)
    assert status == 410 and body != EICAR
    access = [e for e in console.access() if e["event"]["action"] == "console_release_download"]
    assert [e["event"]["outcome"] for e in access][-2:] == ["success", "failure"]


def test_a_receiver_offline_at_release_gets_the_link_when_they_log_in(gw, console, prosody):
    """A `.secret` file blocked from carol to erin; erin logs out; one analyst releases it (not malware) while she
    is away (the handoff waits, unclaimed); erin logs in through the gateway and her client gets the link."""
    async def blocked() -> None:
        endpoint = gw.endpoint(STARTTLS)
        async with Client.connected(endpoint, prosody.jid(CAROL) + "/laptop", prosody.password(CAROL)) as carol, \
                Client.connected(endpoint, prosody.jid(ERIN) + "/desk", prosody.password(ERIN)) as erin:
            result = await carol.ibb_send(erin.jid, SECRET, name="plans.secret")
            carol.send_chat(erin.jid, "sentinel after the secret")
            assert await erin.wait_message("sentinel after the secret")
            assert SECRET not in bytes(erin.received.ibb.get(result.sid, b"")), "the .secret file reached erin"
    asyncio.run(blocked())
    request_id = request_and_approve(console, gw, SECRET_SHA256, prosody.jid(CAROL), ("anna",))
    handoff = gw.data_dir / "releases" / f"{request_id}.json"
    assert handoff.is_file() and handoff.stat().st_mode & 0o777 == 0o600
    assert (gw.data_dir / "releases").stat().st_mode & 0o777 == 0o700
    assert json.loads(handoff.read_text())["receivers"] == [prosody.jid(ERIN)]
    # A sentinel: a release already expired, posted after erin's; once the gateway has dropped it, it has read the
    # outbox with erin's handoff in it while she was away. That one must still wait, unclaimed.
    expire_one(gw, 990002)
    assert handoff.is_file() and not list(handoff.parent.glob(f"{request_id}.*.claim"))
    assert not [e for e in events(gw, "release_delivered") if e["imguard"]["release"]["request"] == request_id]

    async def logs_in() -> str:
        async with Client.connected(gw.endpoint(STARTTLS), prosody.jid(ERIN) + "/desk",
                                    prosody.password(ERIN)) as erin:
            got = await erin.wait_for(lambda _: links(erin), timeout=20)
            assert got, f"erin got no link after logging in: {erin.bodies()}\n{gw.logs()}"
            return got[0]
    link = asyncio.run(logs_in())
    delivered = asyncio.run(wait_event(gw, "release_delivered", request_id))
    assert delivered["imguard"]["release"]["receiver"] == prosody.jid(ERIN)
    assert not handoff.exists()
    status, body = redeem(console, gw, link)
    assert status == 200 and body == SECRET
    assert redeem(console, gw, link)[0] == 410


def expire_one(gw: Gateway, request_id: int) -> dict:
    """Post a handoff whose link expired a minute ago, for a receiver who is not connected; the gateway's event."""
    now = datetime.now(UTC)
    handoff = Handoff(request_id, EICAR_SHA256, "old.exe", ("nobody@localhost",),
                      "https://127.0.0.1:1/released/expired-token-not-a-real-one",
                      (now - timedelta(minutes=1)).isoformat(timespec="seconds"),
                      (now - timedelta(hours=2)).isoformat(timespec="seconds"))
    path = Outbox(gw.data_dir / "releases").post(handoff)
    expired = asyncio.run(wait_event(gw, "release_delivery_expired", request_id))
    assert not path.exists()
    return expired


def test_a_release_nobody_collects_expires(gw, prosody):
    """A handoff past its link's expiry, for a receiver who is not connected, is dropped by the gateway with a
    `release_delivery_expired` event and never delivered."""
    expired = expire_one(gw, 990001)
    assert expired["event"]["outcome"] == "failure" and expired["imguard"]["release"]["receiver"] == "nobody@localhost"
    assert not [e for e in events(gw, "release_delivered") if e["imguard"]["release"]["request"] == 990001]


# --- IRC: the link as a NOTICE from the gateway ----------------------------------------------------------------

@pytest.fixture(scope="module")
def irc_gw(irc_dir, ircd):  # noqa: F811 (the imported fixtures)
    gateway = IrcGateway.start(irc_dir / "release-imguard", ircd, extra=["--release-poll-seconds", "0.2"])
    yield gateway
    gateway.stop()


def test_irc_receiver_gets_the_link_as_a_notice(irc_gw, ircd):  # noqa: F811
    """EICAR by DCC SEND from alice to bob, blocked; released through the console's Releases on the gateway's data
    folder (two analysts); bob's `irc` client gets a NOTICE from imguard with the link (the ledger's link hash is
    its token's), alice none; the token gives EICAR once."""
    with Chat(Route("imguard", False, ircd, irc_gw)) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        t = chat.offer_file(alice, bob, "tool.com", EICAR)
        assert chat.pump(lambda: t.done, 20) and bytes(t.received) == b"", "EICAR crossed"
        assert irc_gw.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == EICAR_SHA256
                                 and e["event"].get("action") == "block"), irc_gw.logs()
        releases = Releases(QuarantineStore(irc_gw.data_dir / "quarantine"), 3600,
                            outbox=Outbox(irc_gw.data_dir / "releases"))
        asked = releases.ask(EICAR_SHA256, alice.nick, "the vendor's tool")
        assert asked.receivers == [bob.nick] and asked.malware
        assert releases.approve(asked.id, "anna", "checked", "https://console.example:8443")[1] == ""
        released, token = releases.approve(asked.id, "bert", "checked too", "https://console.example:8443/")
        assert token

        def bob_links() -> list[str]:
            return [m for text in bob.imguard_notices() for m in LINK.findall(text)]
        assert chat.pump(bob_links, 20), f"bob got no link: {bob.notices}\n{irc_gw.logs()}"
        chat.sentinel(bob, alice, "after the link")
        assert not [n for n in alice.imguard_notices() if "/released/" in n], alice.notices
    link = bob_links()[0]
    assert link == f"https://console.example:8443/released/{token}"
    step = [e for e in released.history if e["op"] == Step.RELEASE.value][0]
    assert step["extra"]["link"] == link_hash(link.rsplit("/", 1)[1])
    delivered = irc_gw.wait_alert(lambda e: e["event"].get("action") == "release_delivered")
    assert delivered and delivered["imguard"]["release"]["receiver"] == bob.nick
    assert delivered["network"]["protocol"] == "irc"
    assert releases.redeem(token, "bob")[1] == EICAR and releases.redeem(token, "bob") is None


# --- the parts alone ---------------------------------------------------------------------------------------------

def test_outbox_pairs_are_claimed_once_and_garbage_is_skipped(tmp_path, caplog):
    """Two readers of one folder (two gateway processes): each (release, receiver) pair is taken by one; a file in
    the outbox that is not a handoff is logged and skipped, the handoffs beside it still read."""
    folder = tmp_path / "releases"
    handoff = Handoff(7, "ab" * 32, "x", ("bob@corp.example", "carl@corp.example"), "https://c/released/t",
                      "2099-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00")
    Outbox(folder).post(handoff)
    (folder / "8.json").write_text("{not json")
    (folder / "9.json").write_text(json.dumps({**json.loads((folder / "7.json").read_text()), "request": 10}))
    one, two = Outbox(folder), Outbox(folder)
    assert list(one.pending()) == [handoff]
    assert "8.json is not a release handoff" in caplog.text and "9.json names request 10" in caplog.text
    assert one.claim(handoff, "BOB@corp.example") and not two.claim(handoff, "bob@corp.example")
    assert two.claimed(handoff, "bob@corp.example") and not two.claimed(handoff, "carl@corp.example")
    assert handoff.due(3600) == datetime(2026, 1, 1, 1, tzinfo=UTC).timestamp()      # the lifetime, before the link


def test_an_approval_whose_outbox_refuses_still_releases(tmp_path, caplog):
    """The console's outbox cannot be written (a file where its folder should be): the release stands, the analyst
    gets the link, the problem is logged; with a writable outbox the handoff names the receiver and the link."""
    sha256 = _quarantined(tmp_path, b"quarterly numbers", "dlp")
    (tmp_path / "releases").write_text("not a folder")
    releases = Releases(QuarantineStore(tmp_path / "quarantine"), 3600, outbox=Outbox(tmp_path / "releases"))
    asked = releases.ask(sha256, "alice@corp.example", "for the audit")
    released, token = releases.approve(asked.id, "anna", "fine", "https://console.example")
    assert token and released.state.value == "released" and "pass it on yourself" in caplog.text
    (tmp_path / "releases").unlink()
    asked = releases.ask(sha256, "alice@corp.example", "once more")
    released, token = releases.approve(asked.id, "anna", "fine", "https://console.example/")
    [handoff] = Outbox(tmp_path / "releases").pending()
    assert handoff.receivers == ("bob@corp.example",) and handoff.link == f"https://console.example/released/{token}"
    assert handoff.name == "in\u202evoice<b>.exe" and handoff.link in handoff.text()
    assert "'invoice<b>.exe'" in handoff.text() and "\u202e" not in handoff.text()
    without = Releases(QuarantineStore(tmp_path / "quarantine"), 3600, outbox=Outbox(tmp_path / "other"))
    asked = without.ask(sha256, "alice@corp.example", "and again")
    assert without.approve(asked.id, "anna", "fine")[1] and not (tmp_path / "other").exists()    # no public URL
