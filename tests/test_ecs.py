"""Events a SIEM ingests without a custom parser: every event family checked against the Elastic Common Schema's
own field data (tests/data/ecs/, with its source and licence) and against docs/events.md, by tests/ecs_schema.py.

These tests build each family with the contexts that broke it (a host name where an IP goes, IPv6, a non-ASCII
sender, a malware block) and check the checker itself on the event shape imguard wrote before (it must find each
known gap). The events the whole suite writes are checked too: the hook in tests/conftest.py fails the session
on any problem and lists them in its summary.
"""

from __future__ import annotations

import copy
import os

import pytest

from imguard import __version__, alerts
from imguard.model import ALLOW, BLOCK, YARA_MATCH, ChatContext, Decision, FileReport, Finding, RuleMatch
from tests.ecs_schema import ECS_DIR, Docs, EventChecker, Schema, schema_available

pytestmark = pytest.mark.skipif(not schema_available() and not os.environ.get("CI"),
                                reason=f"no ECS data in {ECS_DIR}")

CTX = ChatContext(protocol="xmpp", direction="outbound", sender="jörg@example.de", recipients=("bob@ext.example",
                  "room@conf.example"), conversation="room@conf.example", client_address="10.0.0.5:40000",
                  server_address="chat.example.org:5222", connection_id="c1", origin="client")
MALWARE = Decision(action=BLOCK, matches=[RuleMatch("block-malware", BLOCK, "critical", "enforce",
                                                    title="Block malware")], policy_version="v7")


@pytest.fixture(scope="module")
def checker() -> EventChecker:
    return EventChecker(Schema(), Docs())


def eicar_report(name: str = "eicar.com") -> FileReport:
    return FileReport(name=name, path=name, size=68, sha256="a" * 64, sha1="b" * 40, md5="c" * 32, mime="text/plain",
                      extension="com", findings=[Finding(YARA_MATCH, "EICAR", data={
                          "rule": "EICAR_Test_File", "namespace": "eicar", "tags": ["malware", "test"]})])


def every_family() -> dict[str, dict]:
    """One event of each builder, with the awkward contexts."""
    v6 = ChatContext(protocol="irc", direction="inbound", sender="nick!user@host", recipients=("#chan",),
                     client_address="[2001:db8::1]:6697", server_address="[2001:db8::2]:6697")
    dlp = RuleMatch("dlp", BLOCK, "high", "enforce", title="Card numbers")
    shadow = RuleMatch("watch", ALLOW, "low", "shadow", title="Watch")
    clean = FileReport(name="notes.txt", path="notes.txt", size=5, sha256="d" * 64, sha1="e" * 40, md5="f" * 32,
                       mime="text/plain")
    events = {
        "message allowed": alerts.message_event("hallo", CTX, Decision(action=ALLOW, policy_version="v7")),
        "message blocked, IPv6": alerts.message_event(None, v6, Decision(action=BLOCK, matches=[dlp])),
        "message shadow": alerts.message_event("x", CTX, Decision(action=ALLOW, shadow=[shadow])),
        "message masked": alerts.message_event("4111", CTX, Decision(action="mask", matches=[dlp], masked_text="****")),
        "file malware": alerts.file_event(eicar_report(), CTX, MALWARE),
        "file allowed": alerts.file_event(clean, ChatContext(protocol="http"), Decision(action=ALLOW)),
        "session": alerts.protocol_event("irc", "irc_registered", v6, nick="n"),
        "session file offer": alerts.protocol_event("irc", "dcc_offer", v6, category="file", name="a.exe", size=3),
        "link": alerts.link_event(CTX, "https://files.example/a.exe"),
        "notify": alerts.notify_event("c1", "irc", v6, "blocked", decision=MALWARE, dcc={"name": "a.exe"}),
        "anomaly": alerts.anomaly_event(CTX.with_(client_address="no-port"), "malformed_xml", "bad", offset=3),
        "anomaly severity": alerts.anomaly_event(ChatContext(), "dcc_overrun", "after the end", severity="medium"),
        "tls": alerts.tls_failure_event(ChatContext(protocol="xmpp", client_address="10.0.0.5:1"),
                                        "client rejected the certificate: unknown ca", sni="chat.example.org"),
        "policy ok": alerts.policy_reload_event("v8", ok=True, source="rules", rules=12),
        "policy refused": alerts.policy_reload_event("v7", ok=False, errors=["a.yaml:3: bad"], source="rules"),
        "sink": alerts.sink_failure_event("webhook", "down", "webhook 127.0.0.1:9: refused", backlog=3),
        "sink dead letter": alerts.sink_failure_event("syslog", "dead_letter", "cannot format", severity="high",
                                                      event_id="x", reason="r", path="/d"),
    }
    with alerts.capture_time(lambda: 1_700_000_000.5):
        events["replayed message"] = alerts.message_event("hi", CTX, Decision(action=ALLOW))
    for event in events.values():
        event["observer"]["name"] = "gw1"         # as AlertLog.write adds it
    return events


@pytest.mark.parametrize("name", sorted(every_family()))
def test_every_event_family_is_ecs_and_documented(checker, name):
    event = every_family()[name]
    assert checker.check(event) == [], event


def test_the_fields_of_the_known_gaps(checker):
    events = every_family()
    malware = events["file malware"]
    assert malware["ecs"]["version"] == checker.schema.version == alerts.ECS_VERSION
    assert malware["event"]["category"] == ["file", "network", "intrusion_detection", "malware"]
    assert malware["event"]["type"] == ["info", "denied"]
    assert malware["observer"]["version"] == __version__
    assert malware["network"]["direction"] == "outbound" and malware["user"]["name"] == "jörg@example.de"
    assert malware["related"] == {"user": ["jörg@example.de", "bob@ext.example", "room@conf.example"],
                                  "ip": ["10.0.0.5"], "hash": ["a" * 64, "b" * 40, "c" * 32]}
    assert malware["message"] == ("block: xmpp file 'eicar.com' (68 bytes, text/plain) from jörg@example.de to "
                                  "bob@ext.example, room@conf.example (Block malware)")
    # A host name is never an IP: it is the domain.
    assert malware["destination"] == {"address": "chat.example.org", "domain": "chat.example.org", "port": 5222,
                                      "user": {"name": ["bob@ext.example", "room@conf.example"]}}
    assert events["anomaly"]["source"] == {"address": "no-port", "domain": "no-port", "user": {"name": CTX.sender}}
    assert events["message blocked, IPv6"]["source"]["ip"] == "2001:db8::1"
    assert "severity_name" not in malware["event"] and malware["imguard"]["severity"] == "critical"
    assert malware["event"]["severity"] == 5
    # An allowed file is not an intrusion; every family has an event.type.
    assert events["file allowed"]["event"]["category"] == ["file", "network"]
    assert all(event["event"]["type"] for event in events.values())
    assert "text" not in events["message allowed"]["message"] and "hallo" not in events["message allowed"]["message"]


def test_the_checker_finds_each_gap_of_the_old_event_shape(checker):
    """The event as imguard wrote it before: every known gap is found (the checker can fail)."""
    old = copy.deepcopy(every_family()["file malware"])
    for field in ("ecs", "message", "user", "related"):
        old.pop(field)
    old["observer"].pop("version")
    old["network"].pop("direction")
    old["event"].update(category=["file"], type=["denied"], severity_name="critical")
    old["destination"]["ip"] = old["destination"].pop("domain")
    anomaly = copy.deepcopy(every_family()["anomaly"])
    anomaly["event"]["category"] = ["anomaly"]
    anomaly["event"].pop("type")
    anomaly["imguard"]["undocumented_thing"] = 1
    anomaly["event"]["action"] = "not_a_documented_action"
    problems = checker.check(old) + checker.check(anomaly)
    for expected in ("ecs.version: missing", "message: missing", "observer.version: missing",
                     "event.severity_name: not an ECS field (imguard's own go under imguard.*)",
                     "destination.ip: 'chat.example.org' is not of ECS type ip",
                     "event.type: 'denied' is expected by none of the categories ['file']",
                     "user.name: not the sender (source.user.name)",
                     "event.category: 'anomaly' is not an ECS value", "event.type: empty",
                     "imguard.undocumented_thing: not documented in docs/events.md",
                     "event.action: 'not_a_documented_action' not documented in docs/events.md"):
        assert expected in problems, problems
    assert any(p.startswith("related.user: misses") for p in problems)
    assert "related.hash: misses a hash of file.hash" in problems


def test_every_documented_ecs_field_is_an_ecs_field(checker):
    """docs/events.md names no field outside imguard.* that ECS does not define (a typo would document nothing)."""
    wrong = sorted(f for f in checker.docs.fields if "." in f and not f.startswith("imguard.")
                   and f != "event.severity_name" and f not in checker.schema.fields)
    assert wrong == []
    assert {"imguard.session", "imguard.severity", "sink_dead_letter", "irc_registered"} <= checker.docs.words


def test_the_events_of_real_captures_replayed_by_imguard_pcap_are_ecs(checker, tmp_path):
    """A corpus of real decisions, independent of the hook: `imguard pcap` over every shared capture (real IRC,
    XMPP, MSN, OSCAR traffic and the generated ones), each event it writes checked."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.ecs_schema import alert_files, read_events
    captures = sorted(p for p in (Path(__file__).parent / "data" / "captures").rglob("*.pcap*") if p.is_file())
    assert captures, "no captures in tests/data/captures"
    replay = Path(__file__).parent / "data" / "replay"
    for n, capture in enumerate(captures):
        result = subprocess.run([sys.executable, "-m", "imguard", "pcap", "--rules", str(replay / "rules"),
                                 "--signatures", str(replay / "signatures"), "--out", str(tmp_path / str(n)),
                                 str(capture)], capture_output=True, text=True, timeout=120)
        assert result.returncode in (0, 1), result.stderr[-2000:]          # 1: something was blocked
    problems = {}
    for path, event in read_events(alert_files(tmp_path)):
        for problem in checker.check(event):
            problems.setdefault(problem, f"{path}: {event}")
    families = {(e["event"]["dataset"], e["event"]["action"]) for _, e in read_events(alert_files(tmp_path))}
    assert problems == {}
    assert {("imguard.file", "block"), ("imguard.message", "allow"), ("imguard.anomaly", "anomaly"),
            ("imguard.session", "irc_registered"), ("imguard.file", "dcc_offer")} <= families, families
