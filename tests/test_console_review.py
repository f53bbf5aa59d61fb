"""Supervision (the review queue), retro-hunt results and the gateways' and sinks' health, on the console.

The parts alone: the `review: true` rule option (loading, the decision, the event), the review state table, the
chained trail, the reproducible daily sample, the pages through Starlette's test client, the health panel read
from a real sink queue and dead-letter file, the retro-hunt page fed by imguard.retrohunt's own event builder.
In a real browser (the fixtures and helpers of tests/test_console_e2e.py, by import): a real gateway run in front
of Prosody, whose rules gain a `review: true` rule by a reload, fills the folder; an auditor works the flagged
item from the queue to its conversation and records a disposition; an admin draws a day's sample, which holds
exactly the unflagged conversations (checked against the archive); the trail exported and verified; the
Overview names the gateway with the time of the last line of its alerts.jsonl.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imguard import alerts
from imguard.archive import Archive
from imguard.console import data, health, review
from imguard.console.accounts import Role
from imguard.model import ChatContext, Decision
from imguard.policy import PolicyError, explain, load_policy
from tests.peers.gateway import Gateway
from tests.test_console import _access, _client, _csrf
from tests.test_console_e2e import (CAROL, DAVE, body_text, browser, console, console_port, login, shot, shots,
                                    submit)
from tests.xmpp_clients import STARTTLS, Client

__all__ = ["browser", "console", "console_port", "shots"]       # fixtures pytest finds by name

REVIEW_RULES = """
rules:
  - id: test-supervised-terms
    title: Supervised wording (guarantees)
    severity: medium
    action: alert
    review: true
    applies_to: message
    match:
      keywords: [guaranteed return]
"""
FLAGGED = "this is a guaranteed return, trust me"
ERIN, FRANK = "review-erin", "review-frank"       # a conversation with no flagged message: the sample's population


# --- the rule option -----------------------------------------------------------------------------------------

def _policy(tmp_path: Path, text: str):
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    (folder / "50-review.yaml").write_text(text)
    return load_policy(folder)


def test_review_rule_marks_the_decision_and_the_event(tmp_path):
    """A `review: true` rule that matches puts its id in Decision.review and `imguard.review` in the event, beside
    its action (alert); a message it does not match has neither."""
    policy = _policy(tmp_path, REVIEW_RULES)
    ctx = ChatContext(protocol="xmpp", direction="outbound", sender="a@corp.example", recipients=("b@x.example",))
    decision = policy.decide_message(FLAGGED, ctx)
    assert decision.action == "alert" and decision.review == ["test-supervised-terms"]
    assert "review: queued for a reviewer by test-supervised-terms" in explain(decision)
    event = alerts.message_event(FLAGGED, ctx, decision)
    assert event["event"]["kind"] == "alert"
    assert event["imguard"]["review"] == {"rules": ["test-supervised-terms"], "status": "pending"}
    quiet = policy.decide_message("hello", ctx)
    assert quiet.review == [] and "review" not in alerts.message_event("hello", ctx, quiet)["imguard"]


def test_review_on_an_allow_rule_queues_and_delivers(tmp_path):
    policy = _policy(tmp_path, REVIEW_RULES.replace("action: alert", "action: allow"))
    decision = policy.decide_message(FLAGGED, ChatContext(protocol="irc"))
    assert decision.action == "allow" and not decision.blocked and decision.review == ["test-supervised-terms"]


@pytest.mark.parametrize("replacement, line, why", [
    ('review: "yes"', 7, "review: expected true or false"),
    ("mode: shadow\n    review: true", 8, "review: a disclaim or shadow-mode rule decides nothing"),
])
def test_review_option_errors_name_file_and_line(tmp_path, replacement, line, why):
    with pytest.raises(PolicyError) as caught:
        _policy(tmp_path, REVIEW_RULES.replace("review: true", replacement))
    errors = "\n".join(caught.value.errors)
    assert f"50-review.yaml:{line}: {why}" in errors, errors


# --- the state table and the trail ---------------------------------------------------------------------------

def test_review_transition_table_is_the_whole_state_machine():
    """Pending: any disposition; escalated: a closing one; closed: nothing."""
    D, S = review.Disposition, review.State
    assert {d for (s, d) in review.TRANSITIONS if s is S.PENDING} == set(D)
    assert {d for (s, d) in review.TRANSITIONS if s is S.ESCALATED} == set(D) - {D.ESCALATED}
    assert not [k for k in review.TRANSITIONS if k[0] is S.CLOSED]
    assert set(review.TRANSITIONS.values()) == {S.ESCALATED, S.CLOSED}


def _flagged_index(tmp_path: Path, *senders: str) -> data.AlertIndex:
    policy = _policy(tmp_path, REVIEW_RULES)
    with open(tmp_path / "alerts.jsonl", "ab") as f:
        for sender in senders:
            ctx = ChatContext(protocol="xmpp", direction="outbound", sender=sender, recipients=("b@x.example/p",))
            f.write(json.dumps(alerts.message_event(FLAGGED, ctx, policy.decide_message(FLAGGED, ctx))).encode()
                    + b"\n")
            ctx = ctx.with_(sender="plain@corp.example")
            f.write(json.dumps(alerts.message_event("a block", ctx, Decision(action="block"))).encode() + b"\n")
    index = data.AlertIndex(tmp_path, tmp_path / "console" / "alerts-index.sqlite3")
    index.refresh()
    return index


def test_flagged_alerts_enter_once_and_dispositions_need_a_comment(tmp_path):
    index = _flagged_index(tmp_path, "a@corp.example", "c@corp.example")
    queue = review.ReviewQueue(tmp_path / "console" / "review.jsonl")
    assert queue.take_flagged(index) == 2 and queue.take_flagged(index) == 0
    first, second = sorted(queue.items.values(), key=lambda i: i.id)
    assert first.source is review.Source.RULE and first.rules == ["test-supervised-terms"] and first.alert
    with pytest.raises(review.ReviewError, match="comment is required"):
        queue.dispose(first.id, "tom", "no_issue", "   ")
    with pytest.raises(review.ReviewError, match="no such disposition"):
        queue.dispose(first.id, "tom", "shrug", "looked")
    queue.dispose(first.id, "tom", "escalated", "a promise of returns: compliance should see it")
    with pytest.raises(review.ReviewError, match="another reviewer"):
        queue.dispose(first.id, "tom", "violation", "I decide it myself")
    queue.dispose(first.id, "vera", "violation", "confirmed")
    with pytest.raises(review.ReviewError, match="closed cannot"):
        queue.dispose(first.id, "vera", "no_issue", "changed my mind")
    queue.dispose(second.id, "tom", "false_positive", "a quote from the news")
    assert [i.id for i in queue.list()] == [] and {i.state for i in queue.list("all")} == {review.State.CLOSED}
    queue.close()
    # A restart replays the trail into the same queue; the same alerts are not queued again.
    again = review.ReviewQueue(tmp_path / "console" / "review.jsonl")
    assert [(s.reviewer, s.disposition.value) for s in again.items[first.id].steps] == \
        [("tom", "escalated"), ("vera", "violation")]
    assert again.take_flagged(index) == 0 and again.trail.problems == []
    again.close()
    index.close()


def test_both_sides_of_one_flagged_message_are_one_item(tmp_path):
    """Both parties behind the gateway: the message is decided on the sender's connection (outbound) and on the
    receiver's (inbound), two alerts; the queue holds one item naming both."""
    policy = _policy(tmp_path, REVIEW_RULES)
    with open(tmp_path / "alerts.jsonl", "ab") as f:
        for direction, sender, recipient in (("outbound", "a@corp.example/laptop", "b@corp.example"),
                                             ("inbound", "a@corp.example", "b@corp.example/phone")):
            ctx = ChatContext(protocol="xmpp", direction=direction, sender=sender, recipients=(recipient,))
            f.write(json.dumps(alerts.message_event(FLAGGED, ctx, policy.decide_message(FLAGGED, ctx))).encode()
                    + b"\n")
    index = data.AlertIndex(tmp_path, tmp_path / "console" / "alerts-index.sqlite3")
    index.refresh()
    queue = review.ReviewQueue(tmp_path / "review.jsonl")
    assert queue.take_flagged(index) == 1
    [item] = queue.items.values()
    assert item.alert and len(item.sides) == 1 and item.sides[0] != item.alert
    queue.close()
    again = review.ReviewQueue(tmp_path / "review.jsonl")
    assert again.take_flagged(index) == 0 and again.items[1].sides == item.sides
    again.close()
    index.close()


def test_trail_is_private_append_only_and_chained(tmp_path):
    """0600; every line names the digest of the one before; an edited comment or a removed line is found."""
    index = _flagged_index(tmp_path, "a@corp.example", "c@corp.example")
    path = tmp_path / "console" / "review.jsonl"
    queue = review.ReviewQueue(path)
    queue.take_flagged(index)
    queue.dispose(1, "tom", "no_issue", "fine")
    queue.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert review.Trail(path).verify() == []
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines).replace('"fine"', '"fine, really"') + "\n")
    assert any("line 3" in p for p in review.Trail(path).verify())
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert any("line 2" in p for p in review.Trail(path).verify())
    index.close()


# --- sampling ------------------------------------------------------------------------------------------------

def test_draw_is_reproducible_with_the_seed_and_rounds_up():
    population = [f"conversation-{n:03}" for n in range(200)]
    a = review.draw(population, "seed-1", "2026-12-01", 5)
    assert len(a) == 10 and a == review.draw(list(reversed(population)), "seed-1", "2026-12-01", 5)
    assert a != review.draw(population, "seed-2", "2026-12-01", 5)
    assert a != review.draw(population, "seed-1", "2026-12-02", 5)
    assert len(review.draw(population[:3], "s", "d", 1)) == 1 and review.draw(population, "s", "d", 0) == []
    assert review.draw(population, "s", "d", 100) == sorted(population)


def _archive(tmp_path: Path) -> Path:
    """Three conversations on one day: alice-bob (one message matched a rule), carol-dave, erin in a room."""
    path = tmp_path / "archive.sqlite3"
    gateway = Archive(path)
    for sender, recipients, room, text, decision in (
            ("alice@corp.example/l", ("bob@corp.example",), "", "hi", Decision()),
            ("bob@corp.example", ("alice@corp.example/l",), "", "secret", Decision(action="block")),
            ("carol@corp.example", ("dave@corp.example/p",), "", "lunch?", Decision()),
            ("dave@corp.example/p", ("carol@corp.example",), "", "yes", Decision()),
            ("erin@corp.example", ("room@muc.corp.example",), "room@muc.corp.example", "hello all", Decision())):
        ctx = ChatContext(protocol="xmpp", direction="outbound", sender=sender, recipients=recipients,
                          conversation=room)
        gateway.add_message(text, ctx, decision)
    gateway.close()
    return path


def test_sample_draws_only_unflagged_conversations_once_per_day(tmp_path):
    reader = data.ArchiveReader(_archive(tmp_path))
    day = datetime.now(UTC).date().isoformat()
    queue = review.ReviewQueue(tmp_path / "review.jsonl", percent=100, seed="fixed")
    line = queue.sample_day(reader, day, actor="ada")
    assert (line["population"], line["flagged"], line["drawn"], line["seed"]) == (2, 1, 2, "fixed")
    drawn = sorted((i.room or f"{i.sender} {i.recipients[0]}") for i in queue.items.values())
    assert drawn == ["carol@corp.example dave@corp.example", "room@muc.corp.example"], drawn
    assert all(i.source is review.Source.SAMPLE and i.sample_day == day for i in queue.items.values())
    assert queue.sample_day(reader, day) is None            # a day is drawn once
    with pytest.raises(ValueError):
        queue.sample_day(reader, "yesterday")
    queue.close()
    # The same seed draws the same half again (an examiner redoing it on a copy of the archive).
    drawn_by = []
    for name in ("first.jsonl", "second.jsonl"):
        other = review.ReviewQueue(tmp_path / name, percent=50, seed="fixed")
        other.sample_day(reader, day)
        drawn_by.append(sorted(i.room or i.sender for i in other.items.values()))
        other.close()
    assert drawn_by[0] == drawn_by[1] and len(drawn_by[0]) == 1
    reader.close()


def test_catch_up_draws_the_completed_days_only_when_sampling_is_on(tmp_path):
    reader = data.ArchiveReader(_archive(tmp_path))
    off = review.ReviewQueue(tmp_path / "off.jsonl")
    assert off.catch_up(reader) == 0 and not off.sampled
    on = review.ReviewQueue(tmp_path / "on.jsonl", percent=10, days=3)
    assert on.catch_up(reader) == 3 and on.catch_up(reader) == 0
    today = datetime.now(UTC).date().isoformat()
    assert today not in on.sampled and len(on.sampled) == 3 and len(on.seed) == 32
    reader.close()


# --- pages (Starlette's test client) ---------------------------------------------------------------------------

@pytest.fixture
def app(tmp_path):
    from imguard.console.cli import ConsoleSettings
    from imguard.console.views import Console
    _archive(tmp_path)
    _flagged_index(tmp_path, "=HYPERLINK(\"http://attacker.example\")@corp.example").close()
    console = Console(tmp_path, ConsoleSettings(console_review_sample_percent=100, console_review_sample_days=0))
    for name, role in (("ada", Role.ADMIN), ("anna", Role.ANALYST), ("audrey", Role.AUDITOR)):
        console.accounts.add(name, role, "a long enough secret")
    yield console
    console.close()


def test_auditor_works_the_queue_and_cannot_draw_samples(app):
    auditor = _client(app, "audrey")
    page = auditor.get("/review").text
    assert "test-supervised-terms" in page and 'href="/review/1"' in page
    item = auditor.get("/review/1").text
    assert "/conversations/view?" in item and "/alerts/" in item
    missing = auditor.post("/review/1", data={"csrf": _csrf(item), "disposition": "no_issue", "comment": ""})
    assert missing.status_code == 409 and "comment is required" in missing.text
    no_csrf = auditor.post("/review/1", data={"disposition": "no_issue", "comment": "fine"})
    assert no_csrf.status_code == 403
    done = auditor.post("/review/1", data={"csrf": _csrf(item), "disposition": "no_issue", "comment": "fine"},
                        follow_redirects=False)
    assert done.status_code == 303 and app.review.items[1].state is review.State.CLOSED
    assert auditor.post("/review/sample", data={"csrf": _csrf(item), "day": "2026-12-01"}).status_code == 403
    log = [(e["event"]["action"], e["event"]["outcome"]) for e in _access(app)]
    assert ("console_review", "failure") in log and ("console_review", "success") in log
    assert ("console_denied", "failure") in log


def test_admin_draws_a_day_and_the_export_is_formula_safe(app):
    admin = _client(app, "ada")
    page = admin.get("/review").text
    day = datetime.now(UTC).date().isoformat()
    assert admin.post("/review/sample", data={"csrf": _csrf(page), "day": day},
                      follow_redirects=False).status_code == 303
    again = admin.post("/review/sample", data={"csrf": _csrf(page), "day": day})
    assert again.status_code == 409 and "drawn already" in again.text
    assert sorted(i.source.value for i in app.review.items.values()) == ["rule", "sample", "sample"]
    body = admin.get("/review/export?format=csv").text
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 3 and tuple(rows[0]) == review.EXPORT_COLUMNS
    flagged = next(r for r in rows if r["source"] == "rule")
    assert flagged["sender"].startswith("'=HYPERLINK")          # a formula made text
    lines = [json.loads(x) for x in admin.get("/review/export?format=jsonl").text.splitlines()]
    assert [x["item"] for x in lines] == [1, 2, 3] and lines[0]["sender"].startswith("=HYPERLINK")
    assert any(e["event"]["action"] == "console_review_export" for e in _access(app))


def test_health_reads_a_real_sink_queue_and_dead_letters(tmp_path):
    """Two gateways' last events from alerts.jsonl; a sink's backlog from its DiskQueue (3 appended, 1 acked); its
    dead-letter file counted."""
    from imguard.sinks.queue import DiskQueue
    with open(tmp_path / "alerts.jsonl", "wb") as f:
        for name, when in (("gw1", "2026-12-06T08:00:00.000Z"), ("gw2", "2026-12-06T08:01:00.000Z"),
                           ("gw1", "2026-12-06T08:02:00.000Z")):
            event = alerts.message_event("hi", ChatContext(protocol="irc", sender="a"), Decision())
            event["@timestamp"] = when
            event["observer"].update(name=name, hostname="host-" + name)
            f.write(json.dumps(event).encode() + b"\n")
    queue = DiskQueue(tmp_path / "queue" / "syslog", 1 << 20)
    for n in range(3):
        queue.append(b"record %d" % n)
    queue.ack(queue.peek().seq)
    queue.close()
    (tmp_path / "dead-letter").mkdir()
    (tmp_path / "dead-letter" / "syslog.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    gateways = health.gateways(tmp_path)
    assert [(g.name, g.hostname, g.last_event, g.events) for g in gateways] == [
        ("gw1", "host-gw1", "2026-12-06T08:02:00.000Z", 2), ("gw2", "host-gw2", "2026-12-06T08:01:00.000Z", 1)]
    [sink] = health.sinks(tmp_path)
    assert (sink.name, sink.backlog, sink.dead_letters) == ("syslog", 2, 2) and sink.queue_bytes > 0


def test_retrohunt_page_names_the_rule_and_every_sender_and_receiver(app, tmp_path):
    from imguard.model import FileReport, RuleMatch
    from imguard.retrohunt import Sighting, retrohunt_event
    seen = [Sighting("2026-12-01T10:00:00Z", "xmpp", "outbound", "mallory@corp.example", ("x@corp.example",), "",
                     "ibb", "a<b>.exe", "allow"),
            Sighting("2026-12-02T10:00:00Z", "irc", "inbound", "eve", ("y@corp.example", "z@corp.example"), "",
                     "dcc", "a<b>.exe", "allow")]
    report = FileReport(path="a<b>.exe", name="a<b>.exe", size=3, sha256="ab" * 32, mime="application/x-dosexec")
    decision = Decision(action="block", matches=[RuleMatch("malware", "block", "critical", "enforce", "Malware")])
    with open(tmp_path / "alerts.jsonl", "ab") as f:
        f.write(json.dumps(retrohunt_event(report, seen, decision, "sig-2")).encode() + b"\n")
    page = _client(app, "audrey").get("/retrohunt").text
    for who in ("mallory@corp.example", "eve", "x@corp.example", "y@corp.example", "z@corp.example"):
        assert who in page, who
    assert "malware" in page and "sig-2" in page and "a&lt;b&gt;.exe" in page and "a<b>" not in page


# --- in a real browser, on a folder a real gateway run filled ------------------------------------------------

@pytest.fixture(scope="module")
def filled(prosody, tmp_path_factory) -> Path:
    """A gateway run whose rules gained REVIEW_RULES by a reload: carol sends dave a flagged message, erin and
    frank talk with nothing flagged."""
    directory = tmp_path_factory.mktemp("review-gateway")
    gw = Gateway.start(directory, prosody)
    since = gw.mark()
    (gw.directory / "rules" / "50-review.yaml").write_text(REVIEW_RULES)
    os.kill(gw.process.pid, signal.SIGHUP)

    async def chat() -> None:
        reload = await gw.wait_alert(lambda e: e["event"].get("action") == "policy_reload", since=since)
        assert reload and reload["event"]["outcome"] == "success", reload
        endpoint = gw.endpoint(STARTTLS)
        for user in (CAROL, DAVE, ERIN, FRANK):
            if user not in prosody.accounts:
                prosody.add_account(user)
        async with Client.connected(endpoint, prosody.jid(CAROL) + "/laptop", prosody.password(CAROL)) as carol, \
                Client.connected(endpoint, prosody.jid(DAVE) + "/phone", prosody.password(DAVE)) as dave, \
                Client.connected(endpoint, prosody.jid(ERIN) + "/e", prosody.password(ERIN)) as erin, \
                Client.connected(endpoint, prosody.jid(FRANK) + "/f", prosody.password(FRANK)) as frank:
            for sender, receiver, text in ((carol, dave, FLAGGED), (erin, frank, "coffee at ten?"),
                                           (frank, erin, "sure"), (carol, dave, "sentinel after the flagged one")):
                sender.send_chat(receiver.jid, text)
                assert await receiver.wait_message(text), f"{text!r} did not arrive"   # review: delivered

    try:
        asyncio.run(chat())
        flagged = asyncio.run(gw.wait_alert(lambda e: "review" in e.get("imguard", {}), since=since))
        assert flagged and flagged["event"]["action"] == "alert", f"no flagged alert in {gw.alerts_file}"
    finally:
        gw.stop()
    return gw.data_dir


@pytest.fixture(scope="module")
def console_args() -> list[str]:
    return ["--console-review-sample-percent", "100", "--console-review-sample-seed", "e2e-seed"]


def _archived_pairs(data_dir: Path) -> dict[str, set[str]]:
    """The archive read by sqlite3 itself: per conversation (two bare people), the actions of its records."""
    db = sqlite3.connect(f"file:{data_dir / 'archive.sqlite3'}?mode=ro", uri=True)
    pairs: dict[str, set[str]] = {}
    for sender, recipients, action, rules in db.execute("SELECT sender, recipients, action, rules FROM records "
                                                        "WHERE kind = 'message'"):
        key = " ".join(sorted({data.bare(sender), data.bare(recipients.split()[0])}))
        pairs.setdefault(key, set()).add("flagged" if rules or action != "allow" else "plain")
    db.close()
    return pairs


def test_auditor_reviews_the_flagged_message_in_the_browser(browser, console, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    login(browser, console, "audrey")
    browser.get(console.url + "/review")
    rows = browser.find_elements(By.CSS_SELECTOR, "#review-items tbody tr")
    flagged = [r for r in rows if "test-supervised-terms" in r.text]
    assert len(flagged) == 1 and f"{CAROL}@localhost" in flagged[0].text, [r.text for r in rows]
    shot(browser, shots, "review-queue")
    flagged[0].find_element(By.CSS_SELECTOR, "a[id^=item-]").click()
    assert "guaranteed return" in browser.find_element(By.ID, "item-summary").text or \
        "test-supervised-terms" in body_text(browser)
    item_url = browser.current_url
    browser.get(browser.find_element(By.ID, "to-conversation").get_attribute("href"))
    assert FLAGGED in body_text(browser), body_text(browser)
    browser.get(item_url)
    submit(browser, None, {"comment": ""}, "dispose-submit")
    assert "comment is required" in browser.find_element(By.ID, "review-problem").text
    Select(browser.find_element(By.ID, "disposition")).select_by_value("escalated")
    submit(browser, None, {"comment": "promises returns: compliance to look"}, "dispose-submit")
    assert browser.find_element(By.ID, "item-state").text == "escalated"
    shot(browser, shots, "review-item")
    steps = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#item-steps tbody tr")]
    assert len(steps) == 1 and "audrey" in steps[0] and "escalated" in steps[0], steps
    trail = [json.loads(x) for x in (console.data_dir / "console" / "review.jsonl").read_text().splitlines()]
    assert [(x["op"], x.get("reviewer")) for x in trail if x["op"] == "dispose"] == [("dispose", "audrey")]
    assert review.Trail(console.data_dir / "console" / "review.jsonl").verify() == []
    assert any(e["event"]["action"] == "console_review" and e["user"]["name"] == "audrey"
               for e in console.access())


def test_admin_draws_todays_sample_of_unflagged_conversations(browser, console, shots):
    from selenium.webdriver.common.by import By

    login(browser, console, "ada")
    browser.get(console.url + "/review")
    submit(browser, None, {}, "sample-submit")
    samples = browser.find_element(By.ID, "samples").text
    assert "e2e-seed" in samples and "100" in samples, samples
    sampled = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#review-items tbody tr")
               if "sample" in r.text]
    pairs = _archived_pairs(console.data_dir)
    plain = sorted(k for k, v in pairs.items() if v == {"plain"})
    assert f"{ERIN}@localhost {FRANK}@localhost" in plain
    assert len(sampled) == len(plain), (sampled, pairs)
    assert any(f"{ERIN}@localhost" in r for r in sampled) and not any(f"{CAROL}@localhost" in r for r in sampled)
    shot(browser, shots, "review-sampled")


def test_retrohunt_page_and_overview_health_in_the_browser(browser, console, shots):
    from selenium.webdriver.common.by import By

    login(browser, console, "audrey")
    browser.get(console.url + "/retrohunt")
    assert "No retro-hunt has found anything" in body_text(browser)
    browser.get(console.url + "/")
    last = json.loads((console.data_dir / "alerts.jsonl").read_text().splitlines()[-1])
    gateways = browser.find_element(By.ID, "gateways").text
    name = last["observer"].get("name") or last["observer"]["hostname"]
    assert name in gateways and last["@timestamp"] in gateways, (gateways, last["observer"])
    assert browser.find_element(By.ID, "sinks").text
    shot(browser, shots, "overview-health")


def test_review_export_downloads_from_the_browser(browser, console):
    from selenium.webdriver.common.by import By

    login(browser, console, "audrey")
    browser.get(console.url + "/review?state=all")
    browser.find_element(By.ID, "review-export-csv").click()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not list(browser.downloads.glob("*.csv")):
        time.sleep(0.1)
    [path] = list(browser.downloads.glob("*.csv"))
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert any(r["source"] == "rule" and r["disposition"] == "escalated" for r in rows), rows
