"""The daily digest (`imguard digest`, imguard/digest.py): a real gateway in front of a real Prosody fills a data
folder, `imguard digest` mails its summary to a real SMTP server (aiosmtpd), and the mail, parsed with the email
package, says what the alert log says, counted here independently of imguard's code."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import uuid
from collections import Counter

import pytest

from tests.peers.gateway import PYTHON
from tests.peers.sink_peers import SmtpReceiver, free_port
from tests.xmpp_clients import STARTTLS, Client

pytestmark = pytest.mark.timeout(120)

BLOCKED_WORD = "project-bluebird"        # tests/data/rules: test-codename-block


def run_digest(data_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), "-m", "imguard", "digest", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=60)


def independent_counts(alerts_file) -> dict:
    """What the alert log says, counted without imguard's code: blocks (block + quarantine decisions), the rules
    of every decision alert, who sent what was blocked, every gateway's events."""
    blocked, rules, senders, gateways = 0, Counter(), Counter(), Counter()
    for line in alerts_file.read_text().splitlines():
        e = json.loads(line)
        gateways[e["observer"]["name"]] += 1
        if e["event"]["kind"] != "alert" or e["event"]["dataset"] not in ("imguard.message", "imguard.file"):
            continue
        ids = e.get("rule", {}).get("id", [])
        for rule_id in ids if isinstance(ids, list) else [ids]:
            rules[rule_id] += 1
        if e["event"]["action"] in ("block", "quarantine"):
            blocked += 1
            senders[e["user"]["name"]] += 1
    return {"blocked": blocked, "rules": rules, "senders": senders, "gateways": gateways}


async def fill(prosody, gateway) -> dict[str, int]:
    """alice and bob, both through the gateway, exchange allowed and blocked messages; after each blocked one a
    sentinel arrives. Returns how many blocked messages each sent."""
    endpoint = gateway.endpoint(STARTTLS)
    sent = {"alice": 2, "bob": 1}

    def client(user):
        return Client.connected(endpoint, f"{prosody.jid(user)}/digest-{uuid.uuid4().hex[:6]}",
                                prosody.password(user))
    async with client("alice") as alice, client("bob") as bob:
        for sender, receiver in (("alice", bob), ("bob", alice)):
            me = alice if sender == "alice" else bob
            for i in range(sent[sender]):
                me.send_chat(receiver.jid, f"{BLOCKED_WORD} numbers {i} {uuid.uuid4().hex[:6]}")
            body = f"sentinel {uuid.uuid4().hex[:6]}"
            me.send_chat(receiver.jid, body)
            assert await receiver.wait_message(body), f"the sentinel did not arrive: {receiver.bodies()}"
            assert not any(BLOCKED_WORD in (m["body"] or "") for m in receiver.received.messages
                           if m["type"] != "error" and m["from"].bare == me.xmpp.boundjid.bare)
    return sent


def test_digest_mail_says_what_the_alert_log_says(prosody, gateway):
    """Blocked and allowed messages through a real gateway, then `imguard digest --to --smtp`: one mail arrives at
    the SMTP server, it parses, and its blocks, top rules, top senders and gateways equal the alert log's own
    counts; the senders of this test's blocked messages are in it with at least as many as they sent."""
    gateway.check_alive()
    sent = asyncio.run(fill(prosody, gateway))
    expected = {prosody.jid(user): n for user, n in sent.items()}

    def blocked_of(person):
        return independent_counts(gateway.alerts_file)["senders"].get(person, 0)
    for person, n in expected.items():       # the alerts are written before the next message is read
        assert blocked_of(person) >= n, f"{person}: {blocked_of(person)} blocks in the log, sent {n}"
    with SmtpReceiver() as smtp:
        result = run_digest(gateway.data_dir, "--since", "24h", "--to", "soc@example.com", "--smtp", smtp.address,
                            "--top", "50")
        assert result.returncode == 0, result.stderr
        assert len(smtp.messages) == 1, smtp.messages
        mail = smtp.messages[0]
        assert smtp.envelopes[0][1] == ["soc@example.com"]
    truth = independent_counts(gateway.alerts_file)
    assert mail["To"] == "soc@example.com" and "blocked" in mail["Subject"]
    text = mail.get_body(preferencelist=("plain",)).get_content()
    attachment = next(part for part in mail.iter_attachments() if part.get_filename() == "digest.json")
    summary = json.loads(attachment.get_content())
    assert summary["blocked"] == truth["blocked"] > 0
    assert f"Blocked (block + quarantine): {truth['blocked']}" in text, text
    assert dict(map(tuple, summary["top_rules"])) == dict(truth["rules"]), (summary["top_rules"], truth["rules"])
    assert summary["top_rules"][0][1] == max(truth["rules"].values())
    assert dict(map(tuple, summary["top_blocked_senders"])) == dict(truth["senders"])
    for person, n in expected.items():
        assert dict(map(tuple, summary["top_blocked_senders"]))[person] >= n
        assert person in text
    assert {g["name"]: g["events"] for g in summary["gateways"]} == dict(truth["gateways"])
    assert "test-codename-block" in text


def test_digest_window_weights_sinks_and_health(tmp_path):
    """The window is [since, now): an event from two days ago is not counted (its gateway, silent since, is named);
    an event standing for suppressed duplicates counts for all of them; sink trouble and gateways' health are
    reported per gateway. The events are
    made by imguard's own builders (alerts.py), as a gateway writes them."""
    from imguard import alerts
    from imguard.model import ChatContext, Decision, RuleMatch
    now = datetime.datetime.now(datetime.timezone.utc)

    def at(event, hours_ago, gw="gw1", suppressed=0):
        event["@timestamp"] = (now - datetime.timedelta(hours=hours_ago)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        event["observer"]["name"] = gw
        if suppressed:
            event["imguard"]["suppressed_count"] = suppressed
        return event

    def decision(action, sender, rule):
        ctx = ChatContext(protocol="xmpp", direction="outbound", sender=sender, recipients=("z@y",))
        return alerts.message_event("text", ctx, Decision(action=action, matches=[
            RuleMatch(rule_id=rule, action=action, severity="high", mode="enforce", title=rule)]))
    events = [at(decision("block", "old@x", "r-old"), 48, gw="gw-gone"),
              at(decision("block", "a@x", "r1"), 1, suppressed=2),
              at(decision("quarantine", "b@x", "r2"), 2, gw="gw2"),
              at(decision("alert", "c@x", "r1"), 3),
              at(alerts.sink_failure_event("syslog", "down", "connection refused", backlog=3), 1),
              at(alerts.anomaly_event(ChatContext(protocol="irc"), "overlong_line", "too long"), 1, gw="gw2"),
              at(alerts.policy_reload_event("abc", False, ["x.yaml:1: bad"]), 1, gw="gw2")]
    (tmp_path / "alerts.jsonl.1").write_text(json.dumps(events[0]) + "\n" + json.dumps(events[1]) + "\n")
    (tmp_path / "alerts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events[2:]))
    with open(tmp_path / "alerts.jsonl.1", "a") as f:
        f.write('{"torn')                                   # a line cut short is skipped
    result = run_digest(tmp_path, "--since", "24h", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[0])
    assert summary["blocked"] == 3 + 1                      # a@x's block stands for 3; b@x's quarantine
    assert summary["decisions"] == {"block": 3, "quarantine": 1, "alert": 1}
    assert summary["top_rules"] == [["r1", 4], ["r2", 1]]
    assert summary["top_blocked_senders"] == [["a@x", 3], ["b@x", 1]]
    assert summary["sinks"] == {"syslog": {"down": 1}}
    health = {g["name"]: g for g in summary["gateways"]}
    assert health["gw2"]["anomalies"] == 1 and health["gw2"]["reloads_refused"] == 1
    assert health["gw1"]["events"] == 3 + 1 + 1             # the weighted block, the alert, the sink event
    assert "old@x" not in result.stdout
    assert list(summary["silent_gateways"]) == ["gw-gone"]        # wrote two days ago, nothing since
    text = run_digest(tmp_path, "--since", "24h").stdout
    assert "gw-gone: SILENT" in text and "gw1: 5 events" in text, text


def test_digest_reports_an_smtp_server_that_cannot_be_reached(tmp_path):
    """Nobody listens on the SMTP port: exit 1 and the reason on stderr, never a silent success."""
    (tmp_path / "alerts.jsonl").write_text("")
    result = run_digest(tmp_path, "--to", "soc@example.com", "--smtp", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "could not send" in result.stderr
