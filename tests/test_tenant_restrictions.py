"""Tenant restrictions (policy's `tenant` condition; imguard/protocols/httpchat/tenants.py): the company's
workspace, instance or tenant is allowed, a personal one is refused with each API's own error, as the inline CASBs
do.

A real `imguard run` in reverse mode in front of the stand-in vendor of tests/test_httpchat_gateway.py, on two
listeners: one reaches it as `127.0.0.1` (the company's instance), the other as `localhost` (someone's personal
instance on another host name: the Host its clients send). Slack's tenant is the team its token belongs to (what
`auth.test` answered), Teams' the tenant id in the token, so those are told apart on one listener. Slack is reached
over TLS on a third listener by host name (`slack.company.test`, the only name in the gateway's `slack_hosts`, and
`slack.fake.test`, a server that is not Slack's): the stand-in serves each name a certificate of a test CA the
gateway verifies (`--upstream-ca`), and the test process resolves `*.test` to loopback. The calls are
made by the vendors' own client libraries where tests/test_httpchat_sdk.py uses them (slack_sdk, mattermostdriver),
by hand otherwise. After every refused call a sentinel from the company's side is sent, and what the vendor
received is asserted."""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.client
import json
import socket
import ssl
import time
import uuid

import pytest

from tests import test_httpchat_gateway as stand_in
from tests.peers.http_gateway import HttpGateway
from tests.test_httpchat_gateway import CLEAN, call_json

pytestmark = pytest.mark.timeout(120)

COMPANY_TEAM, PERSONAL_TEAM = "T0COMPANY1", "T0PERSONAL"
COMPANY_TENANT = "8a1f1c0e-0000-4000-8000-00000000c0de"
PERSONAL_TENANT = "9b2e2d1f-0000-4000-8000-0000000b0b00"
COMPANY_HOST, PERSONAL_HOST = "127.0.0.1", "localhost"
COMPANY_NAME, PERSONAL_NAME = "matrix.company.test", "matrix.personal.test"     # names a TLS client sends as SNI
SLACK_NAME, FAKE_SLACK = "slack.company.test", "slack.fake.test"     # the company's Slack (slack_hosts), a fake one
RULE = f"""\
rules:
  - id: tenant-messages
    title: Chat to a workspace that is not the company's
    severity: high
    action: block
    applies_to: message
    match: {{protocol: [slack, mattermost, rocketchat, matrix, teams, discord]}}
    unless: {{tenant: [{COMPANY_TEAM}, {COMPANY_HOST}, {COMPANY_NAME}, "{COMPANY_TENANT}"]}}
  - id: tenant-files
    title: Upload to a workspace that is not the company's
    severity: high
    action: block
    applies_to: file
    match: {{protocol: [slack, mattermost, rocketchat, matrix, teams, discord]}}
    unless: {{tenant: [{COMPANY_TEAM}, {COMPANY_HOST}, {COMPANY_NAME}, "{COMPANY_TENANT}"]}}
"""


def stand_in_certificates(directory, names: tuple[str, ...]) -> tuple[object, ssl.SSLContext]:
    """A test CA's PEM file and a server context presenting, per SNI, a certificate of that CA for that name only
    (the first name's without SNI)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, issuer_key, public_key, ca: bool, sans=()) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tenant test CA")])
        day = datetime.timedelta(days=1)
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - day)
                   .not_valid_after(now + 30 * day)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]),
                                            critical=False)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_path = directory / "upstream-ca.pem"
    ca_path.write_bytes(certificate("tenant test CA", ca_key, ca_key.public_key(), True))
    contexts = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = directory / f"{name}.pem"
        pem.write_bytes(certificate(name, ca_key, key.public_key(), False, [name]) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        contexts[name] = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        contexts[name].load_cert_chain(pem)
    server = contexts[names[0]]
    server.sni_callback = lambda sock, name, _: setattr(sock, "context", contexts[name]) if name in contexts else None
    return ca_path, server


def serve_tls(vendor, context: ssl.SSLContext) -> int:
    """The stand-in also on a TLS port (the same handler): its port."""
    from aiohttp import web

    async def start() -> int:
        site = web.TCPSite(vendor.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        return site._server.sockets[0].getsockname()[1]
    return asyncio.run_coroutine_threadsafe(start(), vendor.loop).result(10)


@pytest.fixture(scope="module")
def tenant_gateway(tmp_path_factory):
    vendor = stand_in.Vendor()
    vendor.start()
    directory = tmp_path_factory.mktemp("tenant-gw")
    ca_file, context = stand_in_certificates(directory, (SLACK_NAME, FAKE_SLACK))
    tls_port = serve_tls(vendor, context)
    gw = HttpGateway.start(directory,
                           [f"http://{COMPANY_HOST}:{vendor.port}", f"http://{PERSONAL_HOST}:{vendor.port}",
                            f"https://127.0.0.1:{tls_port}"],
                           extra_rules={"96-tenants.yaml": RULE},
                           extra=["--upstream-ca", str(ca_file), "--chat-slack-hosts", SLACK_NAME])
    vendor.gateway_port = gw.ports[0]
    try:
        yield vendor, gw
    finally:
        status = gw.stop()
        vendor.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


@pytest.fixture
def route(tenant_gateway):
    vendor, gw = tenant_gateway
    vendor.requests.clear()
    vendor.served.clear()
    offset = gw.log_size()
    yield vendor, gw
    assert not gw.crashed, gw.logs()
    errors = gw.errors_since(offset)
    assert not errors, "imguard logged errors:\n" + "\n".join(errors)


def tag() -> str:
    return uuid.uuid4().hex[:6]


def texts(vendor, path_part: str) -> str:
    return b"\n".join(vendor.bodies(path_part)).decode("utf-8", "replace")


def tenant_alert(gw, since: int, dataset: str, marker: str, timeout: float = 10.0) -> dict:
    """The block alert of the tenant rules whose event mentions `marker`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in gw.alerts()[since:]:
            rules = e.get("rule", {}).get("id")
            if e["event"]["dataset"] == dataset and e["event"]["action"] == "block" and \
                    rules in ("tenant-messages", "tenant-files") and marker in json.dumps(e):
                return e
        time.sleep(0.1)
    raise AssertionError(f"no tenant block alert mentioning {marker!r}:\n" +
                         "\n".join(json.dumps(e)[:300] for e in gw.alerts()[since:]))


# --- Slack: the team a token belongs to --------------------------------------------------------------------------

@pytest.fixture
def resolve_test_names(monkeypatch):
    """This process resolves `*.test` to loopback (the gateway listens there), as /etc/hosts would."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kw):
        return real("127.0.0.1" if isinstance(host, str) and host.endswith(".test") else host, *args, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def slack(gw, token: str, host: str = SLACK_NAME):
    """slack_sdk calling `host` over TLS through the gateway's third listener (imguard's CA trusted)."""
    from slack_sdk import WebClient
    return WebClient(token=token, base_url=f"https://{host}:{gw.ports[2]}/api/", timeout=15,
                     ssl=ssl.create_default_context(cafile=str(gw.ca_file)))


def log_in(vendor, client, team: str) -> None:
    """auth.test, as slack_sdk apps and Slack's clients do first: the vendor answers with the token's team."""
    vendor.served["/api/auth.test"] = (200, "application/json", json.dumps(
        {"ok": True, "team_id": team, "user_id": "U" + tag().upper(), "team": "x"}).encode())
    assert client.auth_test()["team_id"] == team


def test_slack_personal_workspace_is_refused(route, resolve_test_names):
    """slack_sdk on one listener, two tokens: the company team's messages and two-step uploads arrive; the
    personal team's (and those of a token whose team imguard never learned) raise SlackApiError with Slack's own
    error shape and never reach Slack; the alert names the tenant."""
    from urllib.error import HTTPError

    from slack_sdk.errors import SlackApiError
    vendor, gw = route
    company, personal = slack(gw, f"xoxp-company-{tag()}"), slack(gw, f"xoxp-personal-{tag()}")
    unknown = slack(gw, f"xoxp-unknown-{tag()}")
    log_in(vendor, company, COMPANY_TEAM)
    log_in(vendor, personal, PERSONAL_TEAM)
    t = tag()
    since = gw.mark()
    assert company.chat_postMessage(channel="C1", text=f"standup notes {t}")["ok"] is True
    for who, client in (("personal", personal), ("unknown", unknown)):
        with pytest.raises(SlackApiError) as err:
            client.chat_postMessage(channel="D1", text=f"{who} copy of the notes {t}")
        response = err.value.response
        assert response.status_code == 403 and response["ok"] is False and response["error"] == "restricted_action"
        sentinel = f"sentinel after {who} {t}"
        company.chat_postMessage(channel="C1", text=sentinel)
        assert sentinel in texts(vendor, "chat.postMessage")
    sent = texts(vendor, "chat.postMessage")
    assert f"standup notes {t}" in sent and "copy of the notes" not in sent, sent
    alert = tenant_alert(gw, since, "imguard.message", f"personal copy of the notes {t}")
    assert alert["imguard"]["context"]["tenant"] == PERSONAL_TEAM and alert["network"]["protocol"] == "slack"
    alert = tenant_alert(gw, since, "imguard.message", f"unknown copy of the notes {t}")
    assert alert["imguard"]["context"]["tenant"] == ""

    # files_upload_v2: the upload URL belongs to the team that asked for it
    vendor.served["/api/files.completeUploadExternal"] = (200, "application/json", json.dumps(
        {"ok": True, "files": [{"id": "F1", "title": "n"}]}).encode())
    assert company.files_upload_v2(channel="C1", file=CLEAN, filename="numbers.bin", title="n")["ok"] is True
    with pytest.raises(HTTPError) as err:
        personal.files_upload_v2(channel="D1", file=CLEAN, filename="personal.bin", title="n")
    assert err.value.code == 403 and json.loads(err.value.read())["error"] == "restricted_action"
    assert company.files_upload_v2(channel="C1", file=CLEAN, filename="sentinel.bin", title="s")["ok"] is True
    assert vendor.bodies("/upload/v1/") == [CLEAN, CLEAN], "the personal team's upload reached Slack"
    assert len(vendor.bodies("files.completeUploadExternal")) == 2
    alert = tenant_alert(gw, since, "imguard.file", "personal.bin")
    assert alert["imguard"]["context"]["tenant"] == PERSONAL_TEAM


def untrusted_alerts(gw, since: int, host: str, count: int = 1) -> list[dict]:
    """The tenant_untrusted_host anomalies about `host` after `since` (waits for `count` of them)."""
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in gw.alerts()[since:] if e.get("imguard", {}).get("anomaly", {}).get("kind") ==
                 "tenant_untrusted_host" and e["imguard"]["anomaly"]["host"] == host]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_slack_team_named_by_a_host_not_in_slack_hosts_is_not_trusted(route, resolve_test_names):
    """A server that is not Slack's (slack.fake.test: a valid certificate, but not in slack_hosts) answers auth.test
    with the company's team id: imguard learns no team from it (a tenant_untrusted_host anomaly names the host and
    the claimed team), so the client's message to it is refused with Slack's error shape and never reaches it. A
    company token (its team learned from the company's Slack) gets no further there: the learned team names the
    tenant of calls to slack_hosts only. Receiver's side: a message history that came as it was from the company's
    Slack comes with imguard's notice in place of the message when the same token fetches it from the fake server
    (a verdict is per tenant). A sentinel through the company's Slack arrives after each refusal."""
    from slack_sdk.errors import SlackApiError
    vendor, gw = route
    company = slack(gw, f"xoxp-company-{tag()}")
    log_in(vendor, company, COMPANY_TEAM)
    since = gw.mark()
    fake = slack(gw, f"xoxp-fake-{tag()}", FAKE_SLACK)
    log_in(vendor, fake, COMPANY_TEAM)                  # the fake server claims the company's team
    (learned,) = untrusted_alerts(gw, since, FAKE_SLACK)
    anomaly = learned["imguard"]["anomaly"]
    assert anomaly["team"] == COMPANY_TEAM and anomaly["sni"] == FAKE_SLACK and "slack_hosts" in anomaly["detail"]
    assert anomaly["certificate_names"] == [FAKE_SLACK], "the fake server's own certificate, verified"
    assert [r.headers.get("Host", "").split(":")[0] for r in vendor.requests if "auth.test" in r.path][-1] == FAKE_SLACK
    t = tag()
    company_token_there = slack(gw, company.token, FAKE_SLACK)
    for who, client in (("fake", fake), ("company token", company_token_there)):
        with pytest.raises(SlackApiError) as err:
            client.chat_postMessage(channel="C1", text=f"{who} to the fake workspace {t}")
        response = err.value.response
        assert response.status_code == 403 and response["error"] == "restricted_action", response
        sentinel = f"sentinel after {who} {t}"
        assert company.chat_postMessage(channel="C1", text=sentinel)["ok"] is True
        assert sentinel in texts(vendor, "chat.postMessage")
    assert "to the fake workspace" not in texts(vendor, "chat.postMessage")
    for who in ("fake", "company token"):
        assert tenant_alert(gw, since, "imguard.message", f"{who} to the fake workspace {t}")[
            "imguard"]["context"]["tenant"] == ""
    # once per connection and host: slack_sdk opens a connection per call, the company token's told once more
    told = untrusted_alerts(gw, since, FAKE_SLACK, 2)
    assert len(told) == 2 and len({e["imguard"]["context"]["connection_id"] for e in told}) == 2
    assert not untrusted_alerts(gw, since, SLACK_NAME)

    vendor.served["/api/conversations.history"] = (200, "application/json", json.dumps({"ok": True, "messages": [
        {"type": "message", "user": "UOUTSIDE1", "text": f"from outside {t}", "ts": "1.1"}]}).encode())
    # the same message passed for the company's Slack first: that verdict is not the fake server's
    assert company.conversations_history(channel="C1")["messages"][0]["text"] == f"from outside {t}"
    seen = company_token_there.conversations_history(channel="C1")["messages"][0]["text"]
    assert f"from outside {t}" not in seen and "blocked by imguard" in seen, seen
    assert company.conversations_history(channel="C1")["messages"][0]["text"] == f"from outside {t}"


def test_slack_team_source_must_be_a_listed_host_the_connection_names():
    """tenants.team_source: a listed host (a name, or *.domain for the names under it) that the TLS connection
    names (the SNI or a certificate name); without TLS only with slack_plain_http."""
    from imguard.protocols.httpchat.tenants import NO_UPSTREAM, Upstream, team_source
    hosts = ["slack.com", "*.slack.com"]
    slack_tls = Upstream("slack.com", ("slack.com", "*.slack.com"))
    assert team_source("slack.com", slack_tls, hosts) == ""
    assert team_source("acme.enterprise.slack.com", Upstream("acme.enterprise.slack.com"), hosts) == ""
    assert team_source("edgeapi.slack.com", Upstream("", ("*.slack.com",)), hosts) == ""
    assert "not one of slack_hosts" in team_source("evilslack.com", Upstream("evilslack.com"), hosts)
    assert "not one of slack_hosts" in team_source("slack.com.evil.test", Upstream("slack.com.evil.test"), hosts)
    assert "'evil.test'" in team_source("slack.com", Upstream("evil.test", ("evil.test",)), hosts)   # Host != TLS
    assert "without TLS" in team_source("slack.com", NO_UPSTREAM, hosts)
    assert team_source("slack.com", NO_UPSTREAM, hosts, plain_http=True) == ""
    assert "not one of" in team_source("127.0.0.1", NO_UPSTREAM, hosts, plain_http=True)
    assert "not one of" in team_source("slack.com", slack_tls, [])


def test_carrier_learns_a_slack_team_only_from_a_trusted_host():
    """The carrier: an auth.test answer through a host not in slack_hosts, or one the connection does not name, or
    over plain HTTP, teaches no team (a tenant_untrusted_host anomaly, once per connection and host); one from a
    listed host the TLS connection names does, and that team names the tenant of calls to listed hosts only."""
    import dataclasses

    from imguard.chatapi import ChatApiCarrier
    from imguard.model import ALLOW, ChatContext, Decision
    from imguard.protocols.httpchat.events import HttpRequest
    from imguard.protocols.httpchat.tenants import NO_UPSTREAM, Upstream
    records = []

    class Pipeline:
        def check_message(self, text, ctx):
            return Decision(action=ALLOW)

        def record(self, event):
            records.append(event)
    carrier = ChatApiCarrier(Pipeline())
    answer = json.dumps({"ok": True, "team_id": COMPANY_TEAM, "user_id": "U0ME"}).encode()

    def request(host: str, token: str, method: str = "auth.test") -> HttpRequest:
        return HttpRequest.make("POST", f"https://{host}/api/{method}", {"Authorization": f"Bearer {token}"})

    def answered(host: str, token: str, upstream: Upstream, connection: str = "c1") -> None:
        call, _ = carrier.request_headers(request(host, token), ChatContext(connection_id=connection),
                                          upstream=upstream)
        carrier.response_learned(call, 200, answer)

    def tenant(host: str, token: str, upstream: Upstream, connection: str = "c9") -> str:
        call, _ = carrier.request_headers(request(host, token, "chat.postMessage"),
                                          ChatContext(connection_id=connection), upstream=upstream)
        return call.tenant

    def told() -> list[tuple]:
        return [(e["imguard"]["anomaly"]["host"], e["imguard"]["context"]["connection_id"]) for e in records
                if e["imguard"]["anomaly"]["kind"] == "tenant_untrusted_host"]
    slack_tls = Upstream("slack.com", ("slack.com", "*.slack.com"))
    answered("fake.test", "xoxp-fake", Upstream("fake.test", ("fake.test",)))
    answered("fake.test", "xoxp-fake", Upstream("fake.test", ("fake.test",)))
    answered("slack.com", "xoxp-spoof", Upstream("fake.test", ("fake.test",)), "c2")    # Host slack.com, TLS fake.test
    answered("slack.com", "xoxp-plain", NO_UPSTREAM, "c3")
    assert told() == [("fake.test", "c1"), ("slack.com", "c2"), ("slack.com", "c3")]
    for token in ("xoxp-fake", "xoxp-spoof", "xoxp-plain"):
        assert tenant("slack.com", token, slack_tls) == ""
    answered("slack.com", "xoxp-company", slack_tls, "c4")
    assert len(told()) == 3
    assert tenant("slack.com", "xoxp-company", slack_tls) == COMPANY_TEAM
    assert tenant("files.slack.com", "xoxp-company", Upstream("files.slack.com", ("*.slack.com",))) == COMPANY_TEAM
    assert tenant("fake.test", "xoxp-company", Upstream("fake.test", ("fake.test",)), "c5") == ""
    assert told()[-1] == ("fake.test", "c5")
    assert tenant("slack.com", "xoxp-company", NO_UPSTREAM, "c6") == ""        # plain HTTP: the Host is all there is
    # a lab's stand-in over plain HTTP: only with slack_plain_http and its name in slack_hosts
    carrier.settings = dataclasses.replace(carrier.settings, slack_hosts=["127.0.0.1"], slack_plain_http=True)
    answered("127.0.0.1", "xoxp-lab", NO_UPSTREAM, "c7")
    assert tenant("127.0.0.1", "xoxp-lab", NO_UPSTREAM) == COMPANY_TEAM
    assert tenant("slack.com", "xoxp-company", slack_tls, "c8") == ""           # no longer a listed host


def test_slack_workspace_host_names_the_tenant():
    """A web client calls its workspace's own host (acme.slack.com): that host is the tenant when no auth.test
    answer named the token's team; Slack's shared service hosts name none."""
    from imguard.protocols.httpchat import tenants
    from imguard.protocols.httpchat.events import HttpRequest
    req = HttpRequest.make("POST", "https://acme.slack.com/api/chat.postMessage")
    assert tenants.of_request("slack", req) == "acme.slack.com"
    assert tenants.of_request("slack", HttpRequest.make("POST", "https://slack.com/api/chat.postMessage")) == ""
    # a team_id argument is the client's word, not Slack's: it names nothing
    assert tenants.of_request("slack", HttpRequest.make("POST", "https://slack.com/api/x?team_id=T0ABC12")) == ""
    assert tenants.learned("slack", "auth.test", 200, b'{"ok": true, "team_id": "T0ABC12"}') == "T0ABC12"
    assert tenants.learned("slack", "auth.test", 200, b'{"ok": false, "team_id": "T0ABC12"}') == ""
    assert tenants.learned("slack", "rtm.connect", 200, b'{"ok": true, "team": {"id": "E0GRID1"}}') == "E0GRID1"


# --- Mattermost and Rocket.Chat: the instance's host ---------------------------------------------------------------

def test_mattermost_personal_instance_is_refused(route):
    """mattermostdriver against the company's instance posts and uploads; against a personal instance (another
    host) the driver raises its permission error (Mattermost's error shape) and nothing reaches that server."""
    from mattermostdriver import Driver
    from mattermostdriver.exceptions import NotEnoughPermissions
    vendor, gw = route
    vendor.served["/api/v4/users/me"] = (200, "application/json", b'{"id": "mminsider22", "username": "in"}')
    vendor.served["/api/v4/files"] = (200, "application/json",
                                      b'{"file_infos": [{"id": "f1", "name": "n.bin"}], "client_ids": []}')

    def driver(host: str, port: int):
        d = Driver({"url": host, "port": port, "scheme": "http", "token": "mm-token", "basepath": "/api/v4",
                    "timeout": 15})
        d.login()
        return d
    company, personal = driver(COMPANY_HOST, route[1].ports[0]), driver(PERSONAL_HOST, route[1].ports[1])
    t = tag()
    since = gw.mark()
    company.posts.create_post({"channel_id": "ch1", "message": f"release plan {t}"})
    with pytest.raises(NotEnoughPermissions) as err:
        personal.posts.create_post({"channel_id": "ch9", "message": f"release plan, my copy {t}"})
    assert "not the company" in str(err.value)
    with pytest.raises(NotEnoughPermissions):
        personal.files.upload_file("ch9", {"files": ("plan.bin", CLEAN)})
    company.posts.create_post({"channel_id": "ch1", "message": f"sentinel {t}"})
    company.files.upload_file("ch1", {"files": ("sentinel.bin", CLEAN)})
    posts = [json.loads(b)["message"] for b in vendor.bodies("/api/v4/posts")]
    assert posts == [f"release plan {t}", f"sentinel {t}"], posts
    assert len(vendor.bodies("/api/v4/files")) == 1 and b"sentinel.bin" in vendor.bodies("/api/v4/files")[0]
    alert = tenant_alert(gw, since, "imguard.message", f"my copy {t}")
    assert alert["imguard"]["context"]["tenant"] == PERSONAL_HOST
    assert tenant_alert(gw, since, "imguard.file", "plan.bin")["imguard"]["context"]["tenant"] == PERSONAL_HOST


def personal(gw) -> dict:
    """The personal instance's host name, as a client calling it sends it."""
    return {"Host": f"{PERSONAL_HOST}:{gw.ports[1]}"}


def test_rocketchat_personal_instance_is_refused(route):
    """A message to a personal Rocket.Chat gets its error shape ({success: false}); the company's arrives."""
    vendor, gw = route
    user = {"X-User-Id": "rc-user-1", "X-Auth-Token": "t"}
    t = tag()
    status, err = call_json(gw.ports[1], "POST", "/api/v1/chat.postMessage", {"channel": "#x", "text": f"mine {t}"},
                            {**user, **personal(gw)})
    assert status == 403 and err["success"] is False
    status, _ = call_json(gw.ports[0], "POST", "/api/v1/chat.postMessage", {"channel": "#general",
                                                                            "text": f"sentinel {t}"}, user)
    assert status == 200
    assert [json.loads(b)["text"] for b in vendor.bodies("chat.postMessage")] == [f"sentinel {t}"]


# --- Matrix: the homeserver ----------------------------------------------------------------------------------------

def test_matrix_personal_homeserver_is_refused(route):
    """A room message to a personal homeserver gets Matrix's M_FORBIDDEN; the company's arrives."""
    vendor, gw = route
    t = tag()
    auth = {"Authorization": "Bearer syt_matrix_token"}
    path = "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/"
    status, err = call_json(gw.ports[1], "PUT", path + f"txn{t}a", {"msgtype": "m.text", "body": f"mine {t}"},
                            {**auth, **personal(gw)})
    assert status == 403 and err["errcode"] == "M_FORBIDDEN", err
    status, _ = call_json(gw.ports[0], "PUT", path + f"txn{t}b", {"msgtype": "m.text", "body": f"sentinel {t}"}, auth)
    assert status == 200
    assert [json.loads(b)["body"] for b in vendor.bodies("m.room.message")] == [f"sentinel {t}"]


# --- the Host a client writes against the connection's SNI and certificate (issue 19) ----------------------------

class SniConnection(http.client.HTTPSConnection):
    """HTTPS to the gateway on loopback with any SNI (imguard's certificate for it verified against its CA)."""

    def __init__(self, port: int, sni: str, gw):
        super().__init__("127.0.0.1", port, timeout=15, context=ssl.create_default_context(cafile=str(gw.ca_file)))
        self.sni = sni

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.sni)


def call_tls(gw, sni: str, host: str, method: str, path: str, obj=None, headers=None) -> tuple[int, dict]:
    """One request over TLS with SNI `sni` and Host `host`: (status, JSON body)."""
    conn = SniConnection(gw.ports[0], sni, gw)
    try:
        body = json.dumps(obj).encode() if obj is not None else None
        conn.request(method, path, body=body, headers={"Host": f"{host}:{gw.ports[0]}",
                                                       "Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data[:1] == b"{" else {}
    finally:
        conn.close()


def mismatch_alerts(gw, since: int, host: str) -> list[dict]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in gw.alerts()[since:] if e.get("imguard", {}).get("anomaly", {}).get("kind") ==
                 "tenant_mismatch" and e["imguard"]["anomaly"]["host"] == host]
        if found:
            return found
        time.sleep(0.1)
    return []


def test_host_that_disagrees_with_sni_is_refused_as_a_tenant_mismatch(route):
    """Over TLS the tenant's host must be the one the connection names. A client whose SNI names a personal
    homeserver while its Host header names the company's gets M_FORBIDDEN (the tenant is unknown: fail closed), a
    tenant_mismatch anomaly names both, and nothing reaches the server; SNI and Host both naming the company's
    instance pass (the sentinel after the refusal arrives); both naming the personal one are refused as before."""
    vendor, gw = route
    t = tag()
    since = gw.mark()
    auth = {"Authorization": "Bearer syt_matrix_token"}
    path = "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/"
    status, err = call_tls(gw, PERSONAL_NAME, COMPANY_NAME, "PUT", path + f"txn{t}a",
                           {"msgtype": "m.text", "body": f"smuggled {t}"}, auth)
    assert status == 403 and err["errcode"] == "M_FORBIDDEN", err
    (anomaly,) = mismatch_alerts(gw, since, COMPANY_NAME)
    assert anomaly["imguard"]["anomaly"]["sni"] == PERSONAL_NAME and anomaly["network"]["protocol"] == "matrix"
    assert PERSONAL_NAME in anomaly["imguard"]["anomaly"]["detail"]
    alert = tenant_alert(gw, since, "imguard.message", f"smuggled {t}")
    assert alert["imguard"]["context"]["tenant"] == ""
    status, _ = call_tls(gw, COMPANY_NAME, COMPANY_NAME, "PUT", path + f"txn{t}b",
                         {"msgtype": "m.text", "body": f"sentinel {t}"}, auth)
    assert status == 200
    status, err = call_tls(gw, PERSONAL_NAME, PERSONAL_NAME, "PUT", path + f"txn{t}c",
                           {"msgtype": "m.text", "body": f"personal {t}"}, auth)
    assert status == 403 and err["errcode"] == "M_FORBIDDEN", err
    assert [json.loads(b)["body"] for b in vendor.bodies("m.room.message")] == [f"sentinel {t}"]
    assert mismatch_alerts(gw, since, COMPANY_NAME) == [anomaly]        # the agreeing calls raised none
    assert not mismatch_alerts(gw, since, PERSONAL_NAME)


def test_delivered_messages_on_a_mismatched_connection_are_decided_as_unknown_tenant(route):
    """The receiver's side: a /sync over a connection whose SNI names a personal homeserver while its Host names the
    company's is decided with the tenant unknown, so the tenant rule puts imguard's notice in place of the outside
    user's message; over a connection that agrees, the same message arrives as it came."""
    vendor, gw = route
    t = tag()
    since = gw.mark()
    text = f"quarterly figures {t}"
    auth = {"Authorization": f"Bearer syt_inside_{t}"}

    def delivered(sni: str) -> dict:
        vendor.served["/_matrix/client/v3/sync"] = (200, "application/json", json.dumps({"rooms": {"join": {
            "!r:example.org": {"timeline": {"events": [
                {"type": "m.room.message", "sender": "@outside:elsewhere.test", "event_id": f"${sni}{t}",
                 "content": {"msgtype": "m.text", "body": text}}]}}}}}).encode())
        status, body = call_tls(gw, sni, COMPANY_NAME, "GET", "/_matrix/client/v3/sync", headers=auth)
        assert status == 200, body
        return body["rooms"]["join"]["!r:example.org"]["timeline"]["events"][0]["content"]
    content = delivered(PERSONAL_NAME)
    assert content["msgtype"] == "m.notice" and text not in json.dumps(content), content
    assert "blocked by imguard" in content["body"]
    assert mismatch_alerts(gw, since, COMPANY_NAME)
    assert delivered(COMPANY_NAME) == {"msgtype": "m.text", "body": text}


def test_tenant_host_is_checked_against_what_the_connection_vouches_for():
    """tenants.resolve: no TLS, the Host stands; over TLS the Host must be the SNI or a name of the upstream
    certificate (HTTP/2 reuses one connection for each of its names; a wildcard covers one label), else the tenant is
    unknown with the mismatch said. Slack's workspace host is checked the same way; token-based tenants are not
    host names."""
    from imguard.protocols.httpchat.events import HttpRequest
    from imguard.protocols.httpchat.tenants import Upstream, certificate_covers, resolve
    req = HttpRequest.make("PUT", "https://matrix.company.test:8448/_matrix/client/v3/rooms/!r/send/m.room.message/1")
    assert resolve("matrix", req).name == "matrix.company.test"
    assert resolve("matrix", req, Upstream("matrix.company.test")).name == "matrix.company.test"
    assert resolve("matrix", req, Upstream("MATRIX.Company.test.")).name == "matrix.company.test"
    spoofed = resolve("matrix", req, Upstream("matrix.personal.test", ("matrix.personal.test",)))
    assert spoofed.name == "" and spoofed.host == "matrix.company.test"
    assert "'matrix.personal.test'" in spoofed.mismatch and "matrix.company.test" in spoofed.mismatch
    shared = Upstream("chat.company.test", ("chat.company.test", "*.company.test"))
    assert resolve("mattermost", req, shared).name == "matrix.company.test"        # coalesced on one certificate
    assert resolve("matrix", req, Upstream("", ("matrix.company.test",))).name == "matrix.company.test"
    assert resolve("matrix", req, Upstream("", ("other.test",))).name == ""
    assert not certificate_covers("*.company.test", "company.test")
    assert not certificate_covers("*.test", "company.test")
    assert not certificate_covers("*.company.test", "a.b.company.test")
    slack_req = HttpRequest.make("POST", "https://acme.slack.com/api/chat.postMessage")
    assert resolve("slack", slack_req, Upstream("evil.example")).name == ""
    assert resolve("slack", slack_req, Upstream("acme.slack.com", ("*.slack.com",))).name == "acme.slack.com"
    discord = HttpRequest.make("GET", "https://discord.com/api/v10/guilds/81384788765712384/channels")
    assert resolve("discord", discord, Upstream("evil.example")).name == "81384788765712384"


def test_gateway_reads_sni_and_certificate_names_from_the_connection(tmp_path):
    """The adapter's side (gateway/chat_apis.py): the SNI only when the client spoke TLS, the upstream certificate's
    DNS names and addresses (its CN only without subjectAltName) only when the server connection is TLS."""
    import ipaddress

    from cryptography import x509
    from mitmproxy import certs
    from mitmproxy.test import tflow

    from imguard.gateway.chat_apis import ChatApis
    from imguard.protocols.httpchat.tenants import Upstream
    store = certs.CertStore.from_store(tmp_path, "t", 2048)
    with_sans = store.get_cert("matrix.company.test", [x509.DNSName("matrix.company.test"),
                                                       x509.DNSName("*.company.test"),
                                                       x509.IPAddress(ipaddress.ip_address("192.0.2.7"))]).cert
    only_cn = store.get_cert("chat.company.test", []).cert
    flow = tflow.tflow()
    assert ChatApis._upstream(flow) == Upstream()            # plain HTTP both sides (tflow's sni is not TLS)
    flow.client_conn.tls, flow.client_conn.sni = True, "matrix.company.test"
    flow.server_conn.tls, flow.server_conn.certificate_list = True, [with_sans]
    assert ChatApis._upstream(flow) == Upstream("matrix.company.test",
                                                ("matrix.company.test", "*.company.test", "192.0.2.7"))
    flow.server_conn.certificate_list = [only_cn]
    assert ChatApis._upstream(flow).cert_names == ("chat.company.test",)


def test_carrier_records_one_tenant_mismatch_per_connection_and_host():
    """The carrier records tenant_mismatch (host, SNI, certificate names) once per connection and host, and the call's
    tenant is unknown; another connection is told again."""
    from imguard.chatapi import ChatApiCarrier
    from imguard.model import ALLOW, ChatContext, Decision
    from imguard.protocols.httpchat.events import HttpRequest
    from imguard.protocols.httpchat.tenants import Upstream
    records = []

    class Pipeline:
        def check_message(self, text, ctx):
            return Decision(action=ALLOW)

        def record(self, event):
            records.append(event)
    carrier = ChatApiCarrier(Pipeline())
    req = HttpRequest.make("PUT", "https://matrix.company.test/_matrix/client/v3/rooms/!r/send/m.room.message/1",
                           {"Authorization": "Bearer t"})
    upstream = Upstream("matrix.personal.test", ("matrix.personal.test",))
    for connection in ("c1", "c1", "c2"):
        call, _ = carrier.request_headers(req, ChatContext(connection_id=connection), upstream=upstream)
        assert call.tenant == ""
    assert [(e["imguard"]["anomaly"]["kind"], e["imguard"]["anomaly"]["host"], e["imguard"]["anomaly"]["sni"],
             e["imguard"]["anomaly"]["certificate_names"], e["imguard"]["context"]["connection_id"]) for e in records] \
        == [("tenant_mismatch", "matrix.company.test", "matrix.personal.test", ["matrix.personal.test"], c)
            for c in ("c1", "c2")]
    call, _ = carrier.request_headers(req, ChatContext(connection_id="c3"), upstream=Upstream("matrix.company.test"))
    assert call.tenant == "matrix.company.test" and len(records) == 2


# --- Teams: the tenant of the token -------------------------------------------------------------------------------

def graph_token(tenant: str) -> str:
    def part(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return ".".join((part({"typ": "JWT", "alg": "RS256"}), part({"tid": tenant, "oid": tag()}), "c2lnbmF0dXJl"))


def test_teams_personal_tenant_is_refused(route):
    """Microsoft Graph on one listener: a chat message with a token of the company's tenant arrives; with a
    token of another tenant Graph's own error shape comes back and nothing reaches Graph."""
    vendor, gw = route
    t = tag()
    since = gw.mark()
    path = "/v1.0/chats/19:chat1@thread.v2/messages"
    status, err = call_json(gw.ports[0], "POST", path, {"body": {"contentType": "text", "content": f"mine {t}"}},
                            {"Authorization": f"Bearer {graph_token(PERSONAL_TENANT)}"})
    assert status == 403 and "code" in err["error"], err
    status, _ = call_json(gw.ports[0], "POST", path, {"body": {"contentType": "text", "content": f"sentinel {t}"}},
                          {"Authorization": f"Bearer {graph_token(COMPANY_TENANT)}"})
    assert status == 200
    assert [json.loads(b)["body"]["content"] for b in vendor.bodies("/messages")] == [f"sentinel {t}"]
    assert tenant_alert(gw, since, "imguard.message", f"mine {t}")["imguard"]["context"]["tenant"] == PERSONAL_TENANT


# --- Discord: a guild only where the path names it ----------------------------------------------------------------

def test_discord_channel_call_names_no_guild_and_is_refused(route):
    """Discord's channel calls do not name their guild: the tenant is unknown, so a rule that lets only the
    company's tenants through refuses them, with Discord's error shape (fail closed)."""
    vendor, gw = route
    status, err = call_json(gw.ports[0], "POST", "/api/v10/channels/123456789/messages", {"content": "hi"},
                            {"Authorization": "Bot discord-token"})
    assert status == 403 and "code" in err and "message" in err, err
    assert vendor.bodies("/channels/") == []
    from imguard.protocols.httpchat import tenants
    from imguard.protocols.httpchat.events import HttpRequest
    assert tenants.of_request("discord", HttpRequest.make("GET", "/api/v10/guilds/81384788765712384/channels")) == \
        "81384788765712384"


def test_tenant_condition_errors_and_unknown(tmp_path):
    """`tenant` takes names (a list or one); `unknown` matches a call whose tenant is not known."""
    from imguard.model import ChatContext
    from imguard.policy import PolicyError, load_policy
    (tmp_path / "r.yaml").write_text("rules:\n  - {id: a, title: a, severity: low, action: alert, applies_to: message,"
                                     " match: {tenant: unknown}}\n  - {id: b, title: b, severity: low, action: alert,"
                                     " applies_to: message, match: {tenant: []}}\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(tmp_path)
    assert raised.value.errors == ["r.yaml:3: tenant: the list is empty (give at least one value)"]
    (tmp_path / "r.yaml").write_text("rules:\n  - {id: a, title: a, severity: low, action: alert, applies_to: message,"
                                     " match: {tenant: unknown}}\n")
    policy = load_policy(tmp_path)
    assert policy.decide_message("x", ChatContext(protocol="slack")).rule_ids == ["a"]
    assert policy.decide_message("x", ChatContext(protocol="slack", tenant="T0X12")).rule_ids == []
