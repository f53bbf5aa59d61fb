"""jsonl_allowed_messages: with it off, an allowed message no rule matched gets no line in alerts.jsonl (the archive
keeps its record, the metrics count it); every other decision is written as before. On (the default) changes nothing."""

import json

import pytest

from imguard import alerts
from imguard.archive import Query
from imguard.metrics import Metrics
from imguard.model import ALLOW, ChatContext, Decision, RuleMatch
from imguard.runtime import build_pipeline
from imguard.sinks import EventBus
from imguard.sinks.settings import SinkSettings
from tests.test_alerts_fastpath import RecordingSink

CTX = ChatContext(protocol="irc", direction="outbound", sender="alice", recipients=("bob",),
                  client_address="10.0.0.5:40000", server_address="192.0.2.10:6667", connection_id="c1")
PLAIN = [f"plain message {n}" for n in range(5)]
CARD = "my card is 4111 1111 1111 1111"         # a rule of the bundled policy matches a card number going out


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("allowed_messages", [True, False])
def test_the_archive_keeps_every_message_and_the_log_what_the_setting_says(tmp_path, allowed_messages):
    """Five plain messages and one a rule matches (a card number) through the pipeline `imguard run` builds
    (bundled rules, the archive): the archive has all six either way; alerts.jsonl has six lines on, only the
    card's off; the metrics count the five allowed either way."""
    metrics = Metrics()
    pipeline = build_pipeline(data_dir=tmp_path, sink_settings=SinkSettings(jsonl_allowed_messages=allowed_messages),
                              metrics=metrics, plain_flush_seconds=0.2)
    try:
        actions = [pipeline.check_message(text, CTX).action for text in PLAIN + [CARD]]
        card = actions[-1]
        assert actions[:5] == [ALLOW] * 5 and card != ALLOW
        pipeline.commit()
        archived = pipeline.archive.search(Query(protocol="irc"))
    finally:
        pipeline.close()
    assert [(r["text"], r["action"]) for r in archived] == [(t, ALLOW) for t in PLAIN] + [(CARD, card)]
    events = [e for e in lines(tmp_path / "alerts.jsonl") if e["event"]["dataset"] == "imguard.message"]
    logged = [(e["imguard"]["message"]["text"], e["event"]["action"]) for e in events]
    assert logged == ([(t, ALLOW) for t in PLAIN] if allowed_messages else []) + [(CARD, card)]
    assert metrics.value("imguard_messages_total", action=ALLOW) == 5


def test_a_shadow_match_and_the_general_path_are_decided_alike(tmp_path):
    """Off: a message only a shadow rule matched is still written (it names the rule), and the general path
    (write(message_event(...)), what the bus uses when a remote sink is configured) skips a plain message as the
    fast path does; the remote sink still gets the event."""
    sink = RecordingSink()
    log = alerts.AlertLog(tmp_path / "a.jsonl", instance="gw1", allowed_messages=False)
    bus = EventBus(log, [sink], queue_dir=tmp_path / "queue", metrics=Metrics())
    plain = Decision(action=ALLOW, policy_version="v1")
    shadow = Decision(action=ALLOW, policy_version="v1",
                      shadow=[RuleMatch("watch", ALLOW, "low", "shadow", title="Watched words")])
    bus.write_message("hello", CTX, plain)
    log.write(alerts.message_event("again", CTX, plain))
    log.write_message("direct", CTX, plain)
    bus.write_message("watched", CTX, shadow)
    bus.close()
    assert [e["imguard"]["message"]["text"] for e in lines(tmp_path / "a.jsonl")] == ["watched"]
    assert [e["imguard"]["message"]["text"] for e in sink.offered] == ["hello", "watched"]
    assert bus.metrics.value("imguard_messages_total", action=ALLOW) == 2
