"""The console's parts without a browser: accounts, throttling, sessions, inert chat text, the alert index (fed with
events built by imguard/alerts.py, the gateway's own builders), the read-only archive reader, the chart.
The pages in a real browser: tests/test_console_e2e.py."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from imguard import alerts
from imguard.archive import Archive
from imguard.console import chart, data
from imguard.console.accounts import AccountError, Accounts, Permission, Role, Throttle
from imguard.console.web import AccessLog, Sessions, chat_text, csrf_ok
from imguard.model import ChatContext, Decision, RuleMatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- accounts --------------------------------------------------------------------------------------------

def test_accounts_store_argon2_hashes_in_a_private_file(tmp_path):
    """An account is kept as an Argon2id hash in a 0600 file; the right password verifies, a wrong one or an
    unknown name does not."""
    accounts = Accounts(tmp_path / "console" / "users.json")
    accounts.add("ada", Role.ADMIN, "a long enough secret")
    text = accounts.path.read_text()
    assert "a long enough secret" not in text and json.loads(text)["users"]["ada"]["hash"].startswith("$argon2id$")
    assert accounts.path.stat().st_mode & 0o777 == 0o600
    assert accounts.verify("ada", "a long enough secret").role is Role.ADMIN
    assert accounts.verify("ada", "a long enough secreT") is None
    assert accounts.verify("nobody", "a long enough secret") is None


@pytest.mark.parametrize("name, password, why", [("ada", "short", "at least"), ("../x", "a long enough secret",
                                                  "account name"), ("", "a long enough secret", "account name")])
def test_accounts_refuse_bad_names_and_short_passwords(tmp_path, name, password, why):
    with pytest.raises(AccountError, match=why):
        Accounts(tmp_path / "users.json").add(name, Role.AUDITOR, password)


def test_an_existing_account_is_replaced_only_when_asked(tmp_path):
    accounts = Accounts(tmp_path / "users.json")
    accounts.add("ada", Role.AUDITOR, "a long enough secret")
    with pytest.raises(AccountError, match="exists"):
        accounts.add("ada", Role.ADMIN, "another long secret")
    accounts.add("ada", Role.ADMIN, "another long secret", replace=True)
    assert accounts.get("ada").role is Role.ADMIN and accounts.verify("ada", "another long secret")


def test_roles_grant_what_the_issue_says():
    """auditor: alerts and conversations; analyst: also the quarantine; admin: also users."""
    from imguard.console.accounts import ROLE_PERMISSIONS as P
    assert Permission.READ_QUARANTINE not in P[Role.AUDITOR] and Permission.MANAGE_USERS not in P[Role.ANALYST]
    assert P[Role.AUDITOR] < P[Role.ANALYST] < P[Role.ADMIN]


def test_throttle_locks_after_free_failures_and_doubles():
    clock = Clock()
    throttle = Throttle(free=3, base=10, cap=35, clock=clock)
    for _ in range(2):
        throttle.failed("tom")
    assert throttle.wait("tom") == 0
    throttle.failed("tom")
    assert throttle.wait("tom") == 10
    throttle.failed("tom")
    assert throttle.wait("tom") == 20
    throttle.failed("tom")
    assert throttle.wait("tom") == 35              # capped
    clock.now += 35
    assert throttle.wait("tom") == 0 and throttle.wait("ada") == 0
    throttle.succeeded("tom")
    throttle.failed("tom")
    assert throttle.wait("tom") == 0               # a success starts the count again


# --- sessions and CSRF ------------------------------------------------------------------------------------

def test_sessions_expire_when_idle_and_csrf_must_match():
    clock = Clock()
    sessions = Sessions(idle=60, lifetime=3600, clock=clock)
    session = sessions.new("ada", Role.ADMIN)
    assert sessions.get(session.token) is session
    assert csrf_ok(session, session.csrf) and not csrf_ok(session, "") and not csrf_ok(session, session.token)
    assert not csrf_ok(None, session.csrf)
    clock.now += 61
    assert sessions.get(session.token) is None
    other = sessions.new("ada", Role.ADMIN)
    assert other.token != session.token and other.csrf != session.csrf


def test_access_log_is_private_and_one_line_per_event(tmp_path):
    log = AccessLog(tmp_path / "console" / "access.jsonl")
    log.write("console_view_alert", "ada", "127.0.0.1", alert="abc")
    log.write("console_login", "x\ny\u2028", "127.0.0.1", "failure", reason="wrong")
    log.close()
    lines = log.path.read_text().splitlines()
    assert log.path.stat().st_mode & 0o777 == 0o600 and len(lines) == 2
    first = json.loads(lines[0])
    assert first["event"]["action"] == "console_view_alert" and first["imguard"]["console"]["alert"] == "abc"
    assert json.loads(lines[1])["user"]["name"] == "x\ny\u2028"


# --- inert text --------------------------------------------------------------------------------------------

def test_chat_text_escapes_markup_and_shows_bidi_controls():
    assert str(chat_text("<script>alert(1)</script>")) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    shown = str(chat_text("invoice\u202efdp.exe <b>"))
    assert "\u202e" not in shown and "[U+202E]" in shown and "&lt;b&gt;" in shown
    for control in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069":
        assert control not in str(chat_text(f"a{control}b"))
    assert str(chat_text(None)) == ""


def test_chart_escapes_its_labels():
    svg = str(chart.bar_chart([("<x>", 3), ("2026-12-06T05", 1)], "a & b"))
    assert "<x>" not in svg and "&lt;x&gt;" in svg and "a &amp; b" in svg and svg.count('class="bar"') == 2


# --- the alert index ---------------------------------------------------------------------------------------

def _event(text: str, sender: str, rule: str = "", severity: str = "high", action: str = "block") -> dict:
    ctx = ChatContext(protocol="xmpp", direction="outbound", sender=sender, recipients=("bob@corp.example/phone",))
    matches = [RuleMatch(rule, action, severity, "enforce", title=rule, reasons=["keyword"])] if rule else []
    return alerts.message_event(text, ctx, Decision(action=action if rule else "allow", matches=matches))


def _append(path: Path, *events: dict, partial: bytes = b"") -> None:
    with open(path, "ab") as f:
        for event in events:
            f.write(json.dumps(event).encode() + b"\n")
        f.write(partial)


def test_alert_index_reads_forward_skips_bad_lines_and_waits_for_whole_lines(tmp_path):
    """Only alerts are indexed; an alert line that is not JSON is counted and skipped; a line still being written
    is read when it is whole; reading again adds nothing."""
    alerts_file = tmp_path / "alerts.jsonl"
    one, two, allowed = _event("a", "alice@corp.example", "r1"), _event("b", "carol@corp.example", "r2"), _event(
        "c", "alice@corp.example")
    line_three = json.dumps(_event("d", "alice@corp.example", "r1", "low")).encode() + b"\n"
    _append(alerts_file, one, allowed, two)
    with open(alerts_file, "ab") as f:
        f.write(b'{"event": {"kind": "alert", cut short\n' + line_three[:20])
    index = data.AlertIndex(tmp_path, tmp_path / "console" / "index.sqlite3")
    assert index.refresh() == 2 and index.skipped_lines == 1
    with open(alerts_file, "ab") as f:
        f.write(line_three[20:])
    assert index.refresh() == 1 and index.refresh() == 0
    assert (tmp_path / "console" / "index.sqlite3").stat().st_mode & 0o777 == 0o600

    page = index.alerts(data.AlertFilter(rule="r1"))
    assert [r["sender"] for r in page.rows] == ["alice@corp.example"] * 2
    assert len(index.alerts(data.AlertFilter(severity="high")).rows) == 2
    assert len(index.alerts(data.AlertFilter(person="bob@corp.example")).rows) == 3     # without the device part
    assert len(index.alerts(data.AlertFilter(person="bob@corp.example/phone")).rows) == 3
    first = index.alerts(data.AlertFilter(per_page=2))
    second = index.alerts(data.AlertFilter(per_page=2, page=2))
    assert first.has_next and not second.has_next and len(second.rows) == 1
    assert {r["event_id"] for r in first.rows}.isdisjoint(r["event_id"] for r in second.rows)
    assert index.alert(one["event"]["id"])["event"]["id"] == one["event"]["id"]
    overview = index.overview()
    assert overview.total == 3 and dict(overview.by_rule) == {"r1": 2, "r2": 1}
    assert sum(n for _, n in overview.over_time) == 3 and index.overview(since="9999").total == 0
    assert dict(overview.top_senders) == {"alice@corp.example": 2, "carol@corp.example": 1}


def test_alert_index_follows_a_rotation(tmp_path):
    """The gateway renames alerts.jsonl to alerts.jsonl.1 and starts a new file: what was appended to the old one
    after the last read is still indexed, then the new file from its start."""
    alerts_file = tmp_path / "alerts.jsonl"
    _append(alerts_file, _event("a", "alice@corp.example", "r1"))
    index = data.AlertIndex(tmp_path, tmp_path / "console" / "index.sqlite3")
    assert index.refresh() == 1
    _append(alerts_file, _event("b", "alice@corp.example", "r1"))
    os.rename(alerts_file, tmp_path / "alerts.jsonl.1")
    _append(alerts_file, _event("c", "alice@corp.example", "r1"), _event("d", "alice@corp.example", "r1"))
    assert index.refresh() == 3
    assert index.overview().total == 4


# --- the archive --------------------------------------------------------------------------------------------

def test_archive_reader_is_read_only_and_shows_both_sides(tmp_path):
    """The reader opens the gateway's SQLite archive read-only; a conversation is both people's records in time
    order, whatever device part a recipient carried; the two records of one message (outbound on the sender's
    connection, inbound on the receiver's) are one row to read."""
    path = tmp_path / "archive.sqlite3"
    gateway = Archive(path)
    out = ChatContext(protocol="xmpp", direction="outbound", sender="alice@corp.example",
                      recipients=("bob@corp.example/phone",))
    back = ChatContext(protocol="xmpp", direction="inbound", sender="alice@corp.example",
                       recipients=("bob@corp.example",))
    reply = ChatContext(protocol="xmpp", direction="outbound", sender="bob@corp.example",
                        recipients=("alice@corp.example/laptop",))
    other = ChatContext(protocol="xmpp", direction="outbound", sender="alice@corp.example",
                        recipients=("carol@corp.example",))
    gateway.add_message("hi bob", out, Decision())
    gateway.add_message("hi bob", back, Decision())
    gateway.add_message("<b>hi</b> alice", reply, Decision())
    gateway.add_message("not this one", other, Decision())
    gateway.close()

    reader = data.ArchiveReader(path)
    records = reader.conversation("xmpp", "alice@corp.example", "bob@corp.example")
    assert [r["text"] for r in records] == ["hi bob", "hi bob", "<b>hi</b> alice"]
    rows = data.merge_sides(records)
    assert [(r["text"], r["seen"]) for r in rows] == [("hi bob", ["outbound", "inbound"]),
                                                     ("<b>hi</b> alice", ["outbound"])]
    found = reader.search(data.RecordQuery(text="100%_"))
    assert found == []                      # LIKE wildcards in a search are literal
    assert len(reader.search(data.RecordQuery(person="carol"))) == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._connection().execute("DELETE FROM records")
    reader.close()
    assert data.ArchiveReader(tmp_path / "absent.sqlite3").search(data.RecordQuery(person="x")) == []


def test_an_irc_conversation_pairs_a_mask_with_a_nick(tmp_path):
    """On IRC the sender is `nick!user@host` and the recipient a nick: both directions of a private conversation
    are found from either form; a channel is a room."""
    path = tmp_path / "archive.sqlite3"
    gateway = Archive(path)
    gateway.add_message("hi bob", ChatContext(protocol="irc", sender="alice!a@10.0.0.1", recipients=("bob",)),
                        Decision())
    gateway.add_message("hi alice", ChatContext(protocol="irc", sender="bob!b@ext.example", recipients=("alice",)),
                        Decision())
    gateway.add_message("to all", ChatContext(protocol="irc", sender="alice!a@10.0.0.1", recipients=("#ops",),
                                              conversation="#ops"), Decision())
    gateway.close()
    reader = data.ArchiveReader(path)
    for a, b in (("alice!a@10.0.0.1", "bob"), ("alice", "bob!b@ext.example")):
        assert [r["text"] for r in reader.conversation("irc", a, b)] == ["hi bob", "hi alice"]
    assert [r["text"] for r in reader.conversation("irc", "", room="#ops")] == ["to all"]
    assert data.bare("#chan!x") == "#chan!x" and data.bare("bob@localhost/b") == "bob@localhost"


# --- the shared PostgreSQL archive ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres():
    from tests.peers.sink_peers import PostgresServer
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


def test_archive_reader_on_postgresql_matches_sqlite_and_cannot_write(postgres, tmp_path):
    """The console reads a real PostgreSQL archive (written by the gateway's queued writer) in read-only
    transactions: the same searches and conversation as from SQLite filled with the same records."""
    import psycopg

    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS records")
    out = ChatContext(protocol="xmpp", direction="outbound", sender="alice@corp.example",
                      recipients=("bob@corp.example/phone",))
    reply = ChatContext(protocol="xmpp", direction="outbound", sender="bob@corp.example",
                        recipients=("alice@corp.example",))
    stores = {"pg": Archive(dsn=postgres.dsn, queue_dir=tmp_path / "q"), "lite": Archive(tmp_path / "a.sqlite3")}
    for store in stores.values():
        store.add_message("Quarterly 100%_ numbers", out, Decision())
        store.add_message("=1+1", reply, Decision())
        store.close()
    readers = {"pg": data.ArchiveReader(dsn=postgres.dsn), "lite": data.ArchiveReader(tmp_path / "a.sqlite3")}

    def seen(reader: data.ArchiveReader) -> dict:
        def texts(records):
            return [r["text"] for r in records]
        return {"conversation": texts(reader.conversation("xmpp", "bob@corp.example", "alice@corp.example")),
                "text": texts(reader.search(data.RecordQuery(text="quarterly 100%_"))),
                "wildcard": texts(reader.search(data.RecordQuery(text="quarterly 1000"))),
                "person": texts(reader.search(data.RecordQuery(person="bob@corp"))),
                "page2": texts(reader.search(data.RecordQuery(person="corp", per_page=1, page=2)))}
    expected = {"conversation": ["Quarterly 100%_ numbers", "=1+1"], "text": ["Quarterly 100%_ numbers"],
                "wildcard": [], "person": ["=1+1", "Quarterly 100%_ numbers"], "page2": ["Quarterly 100%_ numbers"]}
    assert seen(readers["lite"]) == expected
    assert seen(readers["pg"]) == expected
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        readers["pg"]._db.execute("DELETE FROM records")
    for reader in readers.values():
        reader.close()


def _imguard(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imguard", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_console_command_refuses_what_it_cannot_serve(tmp_path):
    """No data folder, a certificate without its key, no CA and no certificate, a short password: usage errors
    (exit 2) that say what to do, never a console without HTTPS."""
    result = _imguard("console", "--data-dir", str(tmp_path / "absent"))
    assert result.returncode == 2 and "no data folder" in result.stderr
    result = _imguard("console", "--data-dir", str(tmp_path), "--console-cert", "x.pem")
    assert result.returncode == 2 and "go together" in result.stderr
    result = _imguard("console", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "no imguard CA" in result.stderr and "--console-cert" in result.stderr
    result = _imguard("console", "user", "add", "ada", "--role", "admin", "--password-file", "-",
                      "--data-dir", str(tmp_path), stdin="short\n")
    assert result.returncode == 2 and "at least" in result.stderr
    assert not (tmp_path / "console" / "users.json").exists()
    result = _imguard("console", "user", "add", "ada", "--role", "auditor", "--password-file", "-",
                      "--data-dir", str(tmp_path), stdin="long enough password\n")
    assert result.returncode == 0, result.stderr
    assert _imguard("console", "user", "list", "--data-dir", str(tmp_path)).stdout == "ada\tauditor\n"


# --- quarantine: the analysis zip and the release workflow --------------------------------------------------

def _quarantined(data_dir: Path, content: bytes, rule: str, yara_tags: tuple[str, ...] = ()) -> str:
    """A file the gateway's QuarantineStore kept: alice@corp.example/laptop sent it to bob@corp.example."""
    import hashlib

    from imguard.model import FileReport, Finding
    from imguard.quarantine import QuarantineStore
    sha256 = hashlib.sha256(content).hexdigest()
    findings = [Finding("yara", "YARA rule X matched", data={"rule": "X", "tags": list(yara_tags), "meta": {}})] \
        if yara_tags else []
    report = FileReport(name="in\u202evoice<b>.exe", path="invoice.exe", size=len(content), sha256=sha256,
                        mime="application/octet-stream", findings=findings)
    ctx = ChatContext(protocol="xmpp", direction="outbound", sender="alice@corp.example/laptop",
                      recipients=("bob@corp.example",))
    decision = Decision(action="block", matches=[RuleMatch(rule, "block", "high", "enforce", title=rule)])
    QuarantineStore(data_dir / "quarantine").put(content, report, ctx, decision)
    return sha256


def test_release_transition_table_is_the_whole_state_machine():
    """Every state but the two ends is left by some step; nothing leaves REFUSED or DOWNLOADED; only RELEASED is
    left by a download."""
    from imguard.console.release import TRANSITIONS, State, Step
    sources = {state for state, _ in TRANSITIONS}
    assert State.REFUSED not in sources and State.DOWNLOADED not in sources
    assert {s for s in State if s not in (State.REFUSED, State.DOWNLOADED)} <= sources
    assert [k for k in TRANSITIONS if k[1] is Step.DOWNLOAD] == [(State.RELEASED, Step.DOWNLOAD)]
    assert (State.REQUESTED, Step.RELEASE) not in TRANSITIONS        # never released without an approval


def test_malware_needs_two_analysts_and_the_link_works_once(tmp_path):
    """A file blocked as malware: a stranger cannot ask; the sender can; one analyst's approval is not enough
    and the same analyst cannot approve twice; a second analyst releases it with a one-time link that gives the
    bytes once; every step is a ledger line and `imguard archive verify`'s check of the ledger passes."""
    from imguard.console.release import Releases, ReleaseError, State
    from imguard.quarantine import QuarantineStore
    content = b"MZ pretend malware"
    sha256 = _quarantined(tmp_path, content, "malware")
    store = QuarantineStore(tmp_path / "quarantine")
    releases = Releases(store, link_seconds=3600)
    with pytest.raises(ReleaseError, match="no such file"):
        releases.ask(sha256, "mallory@evil.example", "gimme")
    with pytest.raises(ReleaseError, match="say why"):
        releases.ask(sha256, "alice@corp.example", "  ")
    asked = releases.ask(sha256, "alice@corp.example/phone", "the customer needs the installer")
    assert asked.malware and asked.needed == 2 and asked.receivers == ["bob@corp.example"]
    with pytest.raises(ReleaseError, match="already asked"):
        releases.ask(sha256, "alice@corp.example", "again")
    with pytest.raises(ReleaseError, match="needs a reason"):
        releases.approve(asked.id, "anna", "")
    once, token = releases.approve(asked.id, "anna", "signed by the vendor")
    assert once.state is State.APPROVED and token == ""
    with pytest.raises(ReleaseError, match="approved this already"):
        releases.approve(asked.id, "anna", "really")
    done, token = releases.approve(asked.id, "ben", "checked in the sandbox")
    assert done.state is State.RELEASED and token and done.link_hash != token
    assert token not in store.ledger_path.read_text()           # the ledger keeps the hash only
    assert releases.redeem("not-the-token", "x") is None
    got, data_ = releases.redeem(token, "bob")
    assert data_ == content and got.state is State.DOWNLOADED
    assert releases.redeem(token, "bob") is None                 # once
    with pytest.raises(ReleaseError, match="downloaded"):
        releases.refuse(asked.id, "anna", "too late")
    ops = [e["op"] for e in store.ledger_entries()]
    assert ops == ["put", "release_request", "release_approve", "release_approve", "release", "release_download"]
    problems, counts = store.verify()
    assert problems == [] and counts == {"files verified": 1, "release steps": 5}


def test_a_file_not_blocked_as_malware_needs_one_analyst_and_a_refusal_ends_it(tmp_path):
    from imguard.console.release import Releases, ReleaseError, State
    from imguard.quarantine import QuarantineStore
    sha256 = _quarantined(tmp_path, b"a harmless but blocked spreadsheet", "executable-external")
    releases = Releases(QuarantineStore(tmp_path / "quarantine"), link_seconds=3600)
    asked = releases.ask(sha256, "bob@corp.example", "I was the receiver")      # a recipient may ask too
    assert not asked.malware and asked.receivers == ["bob@corp.example"]
    assert releases.refuse(asked.id, "anna", "not needed for work").state is State.REFUSED
    with pytest.raises(ReleaseError, match="refused"):
        releases.approve(asked.id, "ben", "changed my mind")
    again = releases.ask(sha256, "alice@corp.example", "please")
    released, token = releases.approve(again.id, "anna", "fine")
    assert released.state is State.RELEASED and token


def test_yara_malware_tag_makes_a_file_malware_and_an_expired_link_gives_nothing(tmp_path):
    from imguard.console.release import Releases
    from imguard.quarantine import QuarantineStore
    sha256 = _quarantined(tmp_path, b"tagged", "some-custom-rule", yara_tags=("Malware",))
    clock = Clock()
    releases = Releases(QuarantineStore(tmp_path / "quarantine"), link_seconds=60, clock=clock)
    asked = releases.ask(sha256, "alice@corp.example", "why not")
    assert asked.malware
    releases.approve(asked.id, "anna", "ok")
    _, token = releases.approve(asked.id, "ben", "ok")
    clock.now += 61
    assert releases.redeem(token, "bob") is None


def test_a_forged_release_step_breaks_the_ledger_chain(tmp_path):
    """Steps are chained like the ledger's other lines: rewriting who approved is found by verify."""
    from imguard.console.release import Releases
    from imguard.quarantine import QuarantineStore
    sha256 = _quarantined(tmp_path, b"x" * 100, "malware")
    store = QuarantineStore(tmp_path / "quarantine")
    releases = Releases(store, link_seconds=60)
    asked = releases.ask(sha256, "alice@corp.example", "why not")
    releases.approve(asked.id, "anna", "ok")
    text = store.ledger_path.read_text()
    store.ledger_path.write_text(text.replace('"actor": "anna"', '"actor": "ben"'))
    problems, _ = store.verify()
    assert problems and "line 3" in problems[0]


def test_analysis_zip_is_aes_encrypted_and_opens_with_infected(tmp_path):
    """Checked by 7-Zip (Debian's 7zip package), not by the library that wrote it: AES-256, the password
    `infected` opens it, another does not, and the bytes come back."""
    import hashlib
    import shutil

    from imguard.console.release import analysis_zip
    seven = shutil.which("7zz") or shutil.which("7z")
    if not seven:
        pytest.fail("7-Zip is missing (tools/setup.sh test installs 7zip)") if os.environ.get("CI") else \
            pytest.skip("7-Zip is not installed")
    content = b"X5O!P%@AP" * 50
    sha256 = hashlib.sha256(content).hexdigest()
    (tmp_path / "q.zip").write_bytes(analysis_zip(content, sha256))
    listing = subprocess.run([seven, "l", "-slt", "-pinfected", str(tmp_path / "q.zip")], capture_output=True,
                             text=True).stdout
    assert "Method = AES-256" in listing and "Encrypted = +" in listing
    wrong = subprocess.run([seven, "x", "-pwrong", f"-o{tmp_path / 'bad'}", str(tmp_path / "q.zip")],
                           capture_output=True, text=True)
    assert wrong.returncode != 0
    subprocess.run([seven, "x", "-pinfected", f"-o{tmp_path / 'out'}", str(tmp_path / "q.zip")], check=True,
                   capture_output=True)
    assert hashlib.sha256((tmp_path / "out" / sha256).read_bytes()).hexdigest() == sha256


# --- the pages, without a browser (Starlette's test client) -------------------------------------------------

@pytest.fixture
def app(tmp_path):
    """A console on a folder with one quarantined malware file and an analyst, an auditor and a second analyst."""
    from imguard.console.views import Console
    console = Console(tmp_path)
    for name, role in (("anna", Role.ANALYST), ("ben", Role.ANALYST), ("audrey", Role.AUDITOR)):
        console.accounts.add(name, role, "a long enough secret")
    console.sha256 = _quarantined(tmp_path, b"MZ evil", "malware")
    yield console
    console.close()


def _client(console, name: str = ""):
    import re

    from starlette.testclient import TestClient
    client = TestClient(console.app, base_url="https://testserver")
    if name:
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        answer = client.post("/login", data={"csrf": csrf, "name": name, "password": "a long enough secret"},
                             follow_redirects=False)
        assert answer.status_code == 303
    return client


def _csrf(page: str) -> str:
    import re
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def _access(console) -> list[dict]:
    return [json.loads(line) for line in console.access.path.read_text().splitlines()]


def test_auditor_cannot_download_and_analyst_gets_only_a_zip(app):
    import io
    import zipfile
    auditor = _client(app, "audrey")
    assert auditor.get(f"/quarantine/{app.sha256}/zip").status_code == 403
    analyst = _client(app, "anna")
    page = analyst.get(f"/quarantine/{app.sha256}").text
    assert "voice&lt;b&gt;.exe" in page and "[U+202E]" in page and "\u202e" not in page and "<b>.exe" not in page
    answer = analyst.get(f"/quarantine/{app.sha256}/zip")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    assert b"MZ evil" not in answer.content
    info = zipfile.ZipFile(io.BytesIO(answer.content)).infolist()[0]
    assert info.flag_bits & 1 and info.compress_type == 99          # encrypted, WinZip AES
    downloads = [e for e in _access(app) if e["event"]["action"] == "console_download_quarantine"]
    assert [(e["user"]["name"], e["imguard"]["console"]["sha256"]) for e in downloads] == [("anna", app.sha256)]
    assert any(e["event"]["action"] == "console_denied" and e["user"]["name"] == "audrey" for e in _access(app))


def test_release_through_the_pages_with_four_eyes(app):
    """The blocked person asks on the public page (its form has a CSRF token too), anna approves, anna cannot
    approve again, an auditor cannot decide, ben approves and gets the one-time link, the receiver downloads once."""
    import re
    public = _client(app)
    form = public.get(f"/release?sha256={app.sha256}").text
    assert public.post("/release", data={"sha256": app.sha256, "requester": "alice@corp.example",
                                         "why": "x"}).status_code == 403                  # no token
    answer = public.post("/release", data={"csrf": _csrf(form), "sha256": app.sha256,
                                           "requester": "alice@corp.example", "why": "<script>x</script>"})
    assert answer.status_code == 200 and "is recorded" in answer.text
    request_id = int(re.search(r"number (\d+)", answer.text).group(1))
    anna, ben, audrey = _client(app, "anna"), _client(app, "ben"), _client(app, "audrey")
    page = anna.get(f"/quarantine/{app.sha256}").text
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    url = f"/quarantine/requests/{request_id}/approve"
    assert anna.post(url, data={"csrf": _csrf(page), "reason": ""}).status_code == 409
    assert anna.post(url, data={"csrf": _csrf(page), "reason": "vendor-signed"}).status_code == 200
    again = anna.post(url, data={"csrf": _csrf(page), "reason": "again"})
    assert again.status_code == 409 and "approved this already" in again.text
    audrey_page = audrey.get("/alerts").text
    assert audrey.post(url, data={"csrf": _csrf(audrey_page), "reason": "me too"}).status_code == 403
    done = ben.post(url, data={"csrf": _csrf(ben.get("/alerts").text), "reason": "sandboxed"})
    link = re.search(r'id="release-link" href="(/released/[^"]+)"', done.text).group(1)
    receiver = _client(app)
    landing = receiver.get(link)          # a link preview fetching the page spends nothing
    assert landing.status_code == 200 and b"MZ evil" not in landing.content
    got = receiver.post(link, data={"csrf": _csrf(landing.text)})
    assert got.content == b"MZ evil" and "filename=\"in_voice_b_.exe\"" in got.headers["content-disposition"]
    assert receiver.post(link, data={"csrf": _csrf(landing.text)}).status_code == 410
    actions = [e["event"]["action"] for e in _access(app) if e["event"]["action"].startswith("console_release")]
    assert actions == ["console_release_request", "console_release_approve", "console_release_approve",
                       "console_release_approve", "console_release_approve", "console_release",
                       "console_release_download", "console_release_download"]
    from imguard.quarantine import QuarantineStore
    assert QuarantineStore(app.data_dir / "quarantine").verify()[0] == []


def test_playground_decides_without_recording_and_only_for_analysts(app):
    """A pasted message gets the decision and the explanation `imguard rules explain` prints; nothing is written
    to alerts.jsonl, the archive or the quarantine; an auditor is refused; hostile text comes back inert."""
    from imguard.policy import explain, load_policy
    from imguard.runtime import BUNDLED_RULES
    auditor = _client(app, "audrey")
    assert auditor.get("/playground").status_code == 403
    anna = _client(app, "anna")
    page = anna.get("/playground").text
    text = "my card is 4111 1111 1111 1111 <img src=x onerror=alert(1)>"
    answer = anna.post("/playground", data={"csrf": _csrf(page), "text": text, "protocol": "xmpp",
                                            "direction": "outbound", "sender": "alice@corp.example",
                                            "recipient": "eve@partner.example", "room": ""})
    assert answer.status_code == 200
    expected = explain(load_policy(BUNDLED_RULES).decide_message(text, ChatContext(
        protocol="xmpp", direction="outbound", sender="alice@corp.example", recipients=("eve@partner.example",))))
    from markupsafe import escape
    assert str(escape(expected)) in answer.text, answer.text
    assert "<img src=x" not in answer.text
    assert not (app.data_dir / "alerts.jsonl").exists() and not (app.data_dir / "archive.sqlite3").exists()
    assert [e["imguard"]["console"]["kind"] for e in _access(app) if e["event"]["action"] == "console_playground"] \
        == ["message"]
    assert anna.post("/playground", data={"text": text}).status_code == 403         # no CSRF token
