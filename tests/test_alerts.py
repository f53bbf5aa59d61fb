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


LINE_BREAKS_JSON_LEAVES_RAW = "a\u2028b\u2029c\x85d"


def test_line_breaks_that_json_leaves_raw_are_escaped(tmp_path):
    """U+2028, U+2029 and U+0085 are line ends to str.splitlines() but legal raw in JSON (orjson leaves them):
    text from the wire carrying them must still make exactly one line, and read back unchanged."""
    text = f"before{LINE_BREAKS_JSON_LEAVES_RAW}\n\r\x0b\x0c\x1c\x1d\x1e é 😀 — after"
    line = alerts.encode(alerts.message_event(text, CTX, Decision(action=ALLOW)))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    for raw in ("\u2028", "\u2029", "\x85"):
        assert raw.encode() not in line
    assert b"\\u2028" in line and b"\\u2029" in line and b"\\u0085" in line
    assert len(line.decode("utf-8").splitlines()) == 1
    assert json.loads(line)["imguard"]["message"]["text"] == text
    log = alerts.AlertLog(tmp_path / "a.jsonl")
    log.write(alerts.anomaly_event(CTX.with_(sender=LINE_BREAKS_JSON_LEAVES_RAW), "k", text))
    log.write(alerts.message_event(text, CTX, Decision(action=ALLOW)))
    log.close()
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["source"]["user"]["name"] == LINE_BREAKS_JSON_LEAVES_RAW


def test_encode_falls_back_to_json_for_what_orjson_refuses():
    """Integers beyond 64 bits, lone surrogates (text decoded with surrogateescape) and non-string keys still
    make one line, as json.dumps wrote them."""
    deep: list = []
    for _ in range(300):
        deep = [deep]
    for value in (1 << 70, -(1 << 65), "bad \udc80 byte\u2028", {1: "one", None: "none"}, deep):
        event = alerts.protocol_event("irc", "x", CTX, value=value)
        line = alerts.encode(event)
        assert line.endswith(b"\n") and len(line.decode("utf-8").splitlines()) == 1
        assert json.loads(line) == json.loads(json.dumps(event, default=str))


def test_encode_renders_odd_values_as_json_dumps_default_str_did():
    import datetime
    import uuid
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    event = alerts.protocol_event("irc", "x", CTX, when=when, day=when.date(), ids={"a", "b"} - {"b"},
                                  raw=b"\x00bytes", uid=uuid.UUID(int=7), report=FileReport("n", "n", 1),
                                  pair=("a", 1), ratio=0.5, flag=True, nothing=None)
    assert json.loads(alerts.encode(event)) == json.loads(json.dumps(event, separators=(",", ":"), default=str))


def test_timestamp_is_iso_8601_utc_milliseconds_as_datetime_writes_it(monkeypatch):
    import datetime
    for ns in (1_795_000_000_123_999_999, 1_795_000_000_999_000_000, 1_795_000_001_000_000_000, 0):
        monkeypatch.setattr(alerts.time, "time_ns", lambda ns=ns: ns)
        expected = (datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
                    + datetime.timedelta(microseconds=ns // 1000)).isoformat(timespec="milliseconds")
        assert alerts._now() == expected.replace("+00:00", "Z")
    monkeypatch.undo()
    now = datetime.datetime.fromisoformat(alerts._now().replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - now).total_seconds()) < 2


def test_message_event_content():
    """The whole event, field for field (only the time and the id vary)."""
    dlp = RuleMatch("dlp", BLOCK, "high", "enforce", title="DLP", reasons=["matches card"], notice="no", source="r:3")
    watch = RuleMatch("watch", ALLOW, "low", "shadow", title="Watch")
    ctx = CTX.with_(conversation="room", connection_id="c1")
    allowed = alerts.message_event("hi", ctx, Decision(action=ALLOW, shadow=[watch], policy_version="v2"))
    blocked = alerts.message_event(None, ChatContext(protocol="irc", client_address="[2001:db8::1]:6697",
                                                     recipients=("#a", "b")),
                                   Decision(action=BLOCK, matches=[dlp], notice="n"))
    for event in (allowed, blocked):
        assert event.pop("@timestamp").endswith("Z") and len(event["event"].pop("id")) == 24
    observer = dict(alerts.OBSERVER)
    assert allowed == {
        "ecs": {"version": alerts.ECS_VERSION},
        "event": {"kind": "event", "category": ["network"], "type": ["allowed"], "module": "imguard",
                  "dataset": "imguard.message", "action": "allow"},
        "observer": observer,
        "network": {"protocol": "xmpp", "direction": "outbound"},
        "imguard": {"context": ctx.to_dict(), "mode": "shadow",
                    "decision": {"action": "allow", "matches": [], "shadow": [watch.to_dict()], "masked_text": None,
                                 "notice": "", "policy_version": "v2"},
                    "message": {"text": "hi",
                                "sha256": "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"}},
        "message": "allow: xmpp message from alice@corp.example to bob@ext.example",
        "user": {"name": "alice@corp.example"},
        "related": {"user": ["alice@corp.example", "bob@ext.example"], "ip": ["10.0.0.5", "192.0.2.10"]},
        "source": {"address": "10.0.0.5", "ip": "10.0.0.5", "port": 40000, "user": {"name": "alice@corp.example"}},
        "destination": {"address": "192.0.2.10", "ip": "192.0.2.10", "port": 5222,
                        "user": {"name": ["bob@ext.example"]}},
        "rule": {"id": ["watch"], "name": ["Watch"], "version": "v2"},
    }
    assert blocked == {
        "ecs": {"version": alerts.ECS_VERSION},
        "event": {"kind": "alert", "category": ["network", "intrusion_detection"], "module": "imguard",
                  "dataset": "imguard.message", "action": "block", "type": ["denied"], "severity": 4},
        "observer": observer,
        "network": {"protocol": "irc"},
        "imguard": {"context": ChatContext(protocol="irc", client_address="[2001:db8::1]:6697",
                                           recipients=("#a", "b")).to_dict(), "mode": "enforce", "severity": "high",
                    "decision": {"action": "block", "matches": [dlp.to_dict()], "shadow": [], "masked_text": None,
                                 "notice": "n", "policy_version": ""}},
        "message": "block: irc message to #a, b (DLP)",
        "related": {"user": ["#a", "b"], "ip": ["2001:db8::1"]},
        "source": {"address": "2001:db8::1", "ip": "2001:db8::1", "port": 6697},
        "destination": {"user": {"name": ["#a", "b"]}},
        "rule": {"id": "dlp", "name": ["DLP"]},
    }
    # Each event owns its dicts: changing one (a sink, the dedup) never changes the next.
    allowed["source"]["user"]["name"] = "changed"
    again = alerts.message_event("hi", ctx, Decision(action=ALLOW))
    assert again["source"]["user"]["name"] == "alice@corp.example" and "name" not in again["observer"]


def test_decision_and_rule_match_to_dict_have_every_field():
    """Decision.to_dict and RuleMatch.to_dict are written by hand for speed: they must equal asdict."""
    import dataclasses
    match = RuleMatch("r", BLOCK, "high", "enforce", title="t", reasons=["a", "b"], notice="n", source="f:1")
    decision = Decision(action=BLOCK, matches=[match], shadow=[RuleMatch("s", ALLOW, "low", "shadow")],
                        masked_text="***", notice="n", policy_version="v")
    assert match.to_dict() == dataclasses.asdict(match)
    # disclaimers and review are rare and left out when empty (every event carries a decision)
    assert decision.to_dict() == {k: v for k, v in dataclasses.asdict(decision).items()
                                  if k not in ("disclaimers", "review")}
    full = dataclasses.replace(decision, disclaimers=[RuleMatch("d", "disclaim", "low", "enforce")], review=["r"])
    assert full.to_dict() == dataclasses.asdict(full)
    assert decision.to_dict()["matches"][0]["reasons"] is not match.reasons


def test_context_with_is_dataclasses_replace():
    import dataclasses
    import pytest
    changed = CTX.with_(sender="x", recipients=("y",))
    assert changed == dataclasses.replace(CTX, sender="x", recipients=("y",))
    assert hash(changed) == hash(dataclasses.replace(CTX, sender="x", recipients=("y",)))
    assert CTX.sender == "alice@corp.example" and CTX.with_() == CTX
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.sender = "z"
    with pytest.raises(TypeError):
        CTX.with_(no_such_field=1)
