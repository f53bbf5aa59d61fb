"""Prometheus metrics: counted from the events the bus writes, served as text on loopback only when asked."""

from __future__ import annotations

import threading
import urllib.request

import pytest

from imguard import alerts
from imguard.metrics import Metrics, MetricsSettings, parse_listen, serve
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch
from imguard.sinks import EventBus

CTX = ChatContext(protocol="irc", sender="mallory!m@host")


def test_counters_histogram_and_gauges_render_as_prometheus_text():
    m = Metrics()
    m.connection_opened("xmpp")
    m.connection_opened("xmpp")
    m.message("block", ["no-secrets"])
    m.file("quarantine", ["block-exe", "yara-hit"], size=2048, seconds=0.02)
    m.anomaly("malformed_xml")
    m.tls_failure()
    m.queue_depth("webhook", 17)
    text = m.render()
    assert 'imguard_connections_total{protocol="xmpp"} 2' in text
    assert 'imguard_messages_total{action="block"} 1' in text
    assert 'imguard_decisions_total{kind="message",action="block",rule="no-secrets"} 1' in text
    assert 'imguard_decisions_total{kind="file",action="quarantine",rule="yara-hit"} 1' in text
    assert "imguard_file_bytes_total 2048" in text
    assert 'imguard_inspection_seconds_bucket{le="0.01"} 0' in text
    assert 'imguard_inspection_seconds_bucket{le="0.025"} 1' in text
    assert 'imguard_inspection_seconds_bucket{le="+Inf"} 1' in text
    assert "imguard_inspection_seconds_count 1" in text
    assert 'imguard_anomalies_total{kind="malformed_xml"} 1' in text
    assert "imguard_tls_failures_total 1" in text
    assert 'imguard_queue_depth{sink="webhook"} 17' in text
    assert "# TYPE imguard_inspection_seconds histogram" in text


def test_label_values_from_the_wire_are_escaped():
    m = Metrics()
    m.anomaly('evil"}\nimguard_fake 1')
    line = [metric for metric in m.render().splitlines() if metric.startswith("imguard_anomalies_total")][0]
    assert line == 'imguard_anomalies_total{kind="evil\\"}\\nimguard_fake 1"} 1'
    assert "\nimguard_fake 1" not in m.render()


def test_the_bus_counts_every_event_it_writes(tmp_path):
    m = Metrics()
    bus = EventBus(alerts.AlertLog(tmp_path / "a.jsonl"), metrics=m, dedup_window=60)
    bus.write(alerts.message_event("hi", CTX, Decision(action=ALLOW)))
    blocked = Decision(action=BLOCK, matches=[RuleMatch("block-exe", BLOCK, "high", "enforce")])
    for _ in range(3):
        event = alerts.file_event(FileReport(name="a.exe", path="a.exe", size=100, sha256="a" * 64), CTX, blocked)
        event["event"]["duration"] = 5_000_000          # 5 ms, ECS nanoseconds
        bus.write(event)
    bus.write(alerts.anomaly_event(CTX, "dcc_overrun", "more than announced"))
    bus.write(alerts.tls_failure_event(CTX, "unknown ca"))
    bus.close()
    assert m.value("imguard_messages_total", action="allow") == 1
    assert m.value("imguard_files_total", action="block") == 3          # decisions are counted, even suppressed ones
    assert m.value("imguard_alerts_suppressed_total") == 2
    assert m.value("imguard_decisions_total", kind="file", action="block", rule="block-exe") == 3
    assert m.value("imguard_anomalies_total", kind="dcc_overrun") == 1
    assert m.value("imguard_tls_failures_total") == 1
    assert 'imguard_inspection_seconds_bucket{le="0.005"} 3' in m.render()


def test_counting_is_thread_safe():
    m = Metrics()

    def work():
        for _ in range(5000):
            m.message("allow")
            m.file("allow", size=1, seconds=0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.value("imguard_messages_total", action="allow") == 40000
    assert "imguard_inspection_seconds_count 40000" in m.render()


def test_the_endpoint_is_off_by_default_and_loopback_when_on():
    assert MetricsSettings().metrics_listen == ""
    assert serve(Metrics(), "") is None
    assert parse_listen("9108") == ("127.0.0.1", 9108)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    with pytest.raises(ValueError):
        parse_listen("localhost:http")
    m = Metrics()
    m.connection_opened("irc")
    server = serve(m, "0")                         # a bare port: loopback, here a free one
    try:
        assert server.address[0] == "127.0.0.1"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))     # no proxy from the environment
        with opener.open(f"http://127.0.0.1:{server.address[1]}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert 'imguard_connections_total{protocol="irc"} 1' in response.read().decode()
        with pytest.raises(urllib.error.HTTPError):
            opener.open(f"http://127.0.0.1:{server.address[1]}/other", timeout=5)
    finally:
        server.close()


def test_a_message_without_rules_counts_like_one_with_the_empty_rule():
    """message() has a fast path for the common case (no rule matched): it must count what the general
    path counts, whether the event has no rule, only a version, or an empty rule id."""
    fast, general = Metrics(), Metrics()
    for _ in range(3):
        fast.message("allow")
        general.message("allow", iter([""]))
    fast.observe_event(alerts.message_event("hi", CTX, Decision(action=ALLOW, policy_version="v1")))
    fast.observe_event({"event": {"dataset": "imguard.message", "action": "allow"}, "rule": {"id": ""}})
    general.message("allow", [""])
    general.message("allow", [""])
    assert fast.render() == general.render()
    assert fast.value("imguard_messages_total", action="allow") == 5
    assert fast.value("imguard_decisions_total", kind="message", action="allow", rule="") == 5
