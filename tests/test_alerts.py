"""The alert log: one JSON object per line, written whole, with ECS field names and the chat context."""

import json
import threading

from imguard import alerts
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, Finding, RuleMatch, YARA_MATCH

CTX = ChatContext(protocol="xmpp", direction="outbound", sender="alice@corp.example",
                  recipients=("bob@ext.example",), client_address="10.0.0.5:40000",
                  server_address="192.0.2.10:5222")


def test_file_alert_carries_context_file_facts_and_rule(tmp_path):
    log = alerts.AlertLog(tmp_path / "alerts.jsonl", instance="gw1")
    report = FileReport(name="eicar.com", path="eicar.com", size=68, sha256="a" * 64, sha1="b" * 40, md5="c" * 32,
                        mime="text/plain", findings=[Finding(YARA_MATCH, "EICAR", data={"rule": "EICAR_Test_File",
                                                                                     "namespace": "eicar",
                                                                                     "tags": ["malware"]})])
    decision = Decision(action=BLOCK, matches=[RuleMatch("block-malware", BLOCK, "critical", "enforce")])
    log.write(alerts.file_event(report, CTX, decision))
    [line] = (tmp_path / "alerts.jsonl").read_text().splitlines()
    event = json.loads(line)
    assert event["event"]["kind"] == "alert"
    assert event["event"]["action"] == "block"
    assert event["rule"]["id"] == "block-malware"
    assert event["file"]["name"] == "eicar.com"
    assert event["file"]["hash"]["sha256"] == "a" * 64
    assert event["source"]["ip"] == "10.0.0.5"
    assert event["source"]["user"]["name"] == "alice@corp.example"
    assert event["imguard"]["context"]["recipients"] == ["bob@ext.example"]
    assert event["imguard"]["report"]["findings"][0]["data"]["rule"] == "EICAR_Test_File"
    assert event["observer"]["name"] == "gw1"


def test_allowed_message_is_an_event_not_an_alert(tmp_path):
    log = alerts.AlertLog(tmp_path / "a.jsonl")
    log.write(alerts.message_event("hello", CTX, Decision(action=ALLOW)))
    event = json.loads((tmp_path / "a.jsonl").read_text())
    assert event["event"]["kind"] == "event"
    assert event["imguard"]["message"]["text"] == "hello"


def test_lines_stay_whole_under_concurrent_writers(tmp_path):
    """Newlines and quotes inside a message cannot break a line, and threads never interleave lines."""
    log = alerts.AlertLog(tmp_path / "a.jsonl")
    text = 'line one\nline two "quoted" {"fake": "json"}\r\n' * 50

    def writer():
        for _ in range(200):
            log.write(alerts.anomaly_event(CTX, "malformed", text))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == 800
    assert all(json.loads(line)["imguard"]["anomaly"]["detail"] == text for line in lines)


def test_context_to_dict_has_every_field():
    """ChatContext.to_dict is written by hand for speed: it must not forget a field added later."""
    import dataclasses
    ctx = ChatContext(protocol="p", direction="outbound", sender="s", recipients=("a", "b"), conversation="c",
                      client_address="1.2.3.4:5", server_address="6.7.8.9:10", connection_id="id",
                      transfer_mechanism="ibb")
    expected = dataclasses.asdict(ctx)
    expected["recipients"] = ["a", "b"]
    assert ctx.to_dict() == expected


def test_event_ids_are_unique():
    ids = {alerts.new_event_id() for _ in range(10000)}
    assert len(ids) == 10000


def test_plain_events_are_gathered_but_alerts_are_written_at_once(tmp_path):
    """With plain_flush_seconds (the gateway's setting), allowed-message events are written in batches;
    an alert is on disk when write() returns, and it takes the gathered events with it, in order."""
    path = tmp_path / "a.jsonl"
    log = alerts.AlertLog(path, plain_flush_seconds=30)
    log.write(alerts.message_event("first", CTX, Decision(action=ALLOW)))
    log.write(alerts.message_event("second", CTX, Decision(action=ALLOW)))
    assert path.read_text() == ""
    log.write(alerts.anomaly_event(CTX, "malformed", "bad"))
    kinds = [json.loads(line)["event"]["kind"] for line in path.read_text().splitlines()]
    assert kinds == ["event", "event", "alert"]
    log.write(alerts.message_event("third", CTX, Decision(action=ALLOW)))
    log.close()
    assert json.loads(path.read_text().splitlines()[-1])["imguard"]["message"]["text"] == "third"


def test_gathered_plain_events_are_written_within_the_interval(tmp_path):
    import time
    path = tmp_path / "a.jsonl"
    log = alerts.AlertLog(path, plain_flush_seconds=0.1)
    log.write(alerts.message_event("soon", CTX, Decision(action=ALLOW)))
    deadline = time.monotonic() + 5
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "soon" in path.read_text()
    log.close()
