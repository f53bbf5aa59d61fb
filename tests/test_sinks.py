"""Event sinks: every alert reaches every sink through its on-disk queue; a sink that is down, slow or
failing neither blocks write() nor loses alerts; damage and overflow are reported; text cannot inject."""

from __future__ import annotations

import errno
import json
import re
import time

import pytest

from imguard import alerts
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, Finding, RuleMatch, YARA_MATCH
from imguard.sinks import EventBus, Sink, SinkSettings, WebhookSink, build_sinks, check_settings
from imguard.sinks.queue import DiskQueue
from imguard.sinks.syslog import format_5424
from tests.peers.sink_peers import HttpReceiver, SmtpReceiver, SyslogReceiver, wait_until

CTX = ChatContext(protocol="xmpp", direction="outbound", sender="alice@corp.example",
                  recipients=("bob@ext.example",), conversation="room@conf.example",
                  client_address="10.0.0.5:40000", server_address="192.0.2.10:5222")
BLOCK_MALWARE = Decision(action=BLOCK, matches=[RuleMatch("block-malware", BLOCK, "critical", "enforce",
                                                          title="Block malware")], policy_version="v7")


def file_alert(n: int = 0, name: str = "", sender: str = "") -> dict:
    report = FileReport(name=name or f"evil-{n}.exe", path=name or f"evil-{n}.exe", size=68, sha256=f"{n:064x}",
                        sha1="b" * 40, md5="c" * 32, mime="application/x-dosexec",
                        findings=[Finding(YARA_MATCH, "EICAR", data={"rule": "EICAR", "namespace": "eicar",
                                                                     "tags": ["malware"]})])
    return alerts.file_event(report, CTX.with_(sender=sender) if sender else CTX, BLOCK_MALWARE)


def local_events(data_dir) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "alerts.jsonl").read_text().splitlines()]


def sink_events(data_dir, kind: str = "") -> list[dict]:
    return [e for e in local_events(data_dir) if e["event"]["dataset"] == "imguard.sink"
            and (not kind or e["imguard"]["sink"]["kind"] == kind)]


def webhook_bus(data_dir, url: str, **settings) -> EventBus:
    values = dict(webhook_url=url, webhook_timeout=2.0, dedup_window_seconds=0, retry_max_seconds=0.2)
    values.update(settings)
    return build_sinks(SinkSettings(**values), data_dir, instance="gw1")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_alerts_reach_every_sink(tmp_path, transport):
    """One blocked file reaches the local file, syslog, the webhook and mail; an allowed message reaches
    the local file and syslog only (the webhook takes alerts, mail takes high and above)."""
    with SyslogReceiver() as syslog, HttpReceiver() as hook, SmtpReceiver() as smtp:
        bus = build_sinks(SinkSettings(syslog_address=getattr(syslog, f"{transport}_address"), webhook_url=hook.url,
                                       email_smtp=smtp.address, email_to=["soc@corp.example"],
                                       email_min_severity="high"), tmp_path, instance="gw1")
        alert = file_alert(1)
        bus.write(alert)
        bus.write(alerts.message_event("hello", CTX, Decision(action=ALLOW)))
        assert bus.drain(10)
        assert wait_until(lambda: len(syslog.records) == 2 and len(smtp.messages) == 1)
        bus.close()
    [received] = hook.events
    assert received["event"]["id"] == alert["event"]["id"]
    assert received["file"]["hash"]["sha256"] == f"{1:064x}"
    assert received["observer"]["name"] == "gw1"
    assert "possible_duplicate" not in received["imguard"]
    assert [json.loads(r.split(b" ", 7)[7][r.split(b" ", 7)[7].index(b"{"):])["event"]["kind"]
            for r in syslog.records] == ["alert", "event"]
    mail = smtp.messages[0]
    assert mail["Subject"] == "[imguard] critical block: block-malware from alice@corp.example"
    assert mail["X-Imguard-Event-Id"] == alert["event"]["id"]
    assert smtp.envelopes == [("imguard@localhost", ["soc@corp.example"])]
    assert [e["event"]["kind"] for e in local_events(tmp_path)] == ["alert", "event"]


def test_the_alert_carries_what_the_issue_asks_for(tmp_path):
    """Chat context, file facts with YARA rule/namespace/tags and archive path, rule id, mode, action,
    severity and the gateway instance, under their ECS names where ECS has one."""
    bus = build_sinks(SinkSettings(), tmp_path, instance="gw-paris-1")
    bus.write(file_alert(3))
    bus.close()
    [e] = local_events(tmp_path)
    assert e["event"]["kind"] == "alert" and e["event"]["action"] == "block" and e["event"]["severity"] == 5
    assert e["rule"] == {"id": "block-malware", "name": ["Block malware"], "version": "v7"}
    assert e["imguard"]["mode"] == "enforce"
    assert e["source"] == {"address": "10.0.0.5", "ip": "10.0.0.5", "port": 40000,
                           "user": {"name": "alice@corp.example"}}
    assert e["destination"]["user"]["name"] == ["bob@ext.example"] and e["destination"]["port"] == 5222
    assert e["network"]["protocol"] == "xmpp"
    assert e["imguard"]["context"]["direction"] == "outbound"
    assert e["imguard"]["context"]["conversation"] == "room@conf.example"
    assert e["file"]["mime_type"] == "application/x-dosexec" and e["file"]["size"] == 68
    assert e["imguard"]["yara"] == [{"rule": "EICAR", "namespace": "eicar", "tags": ["malware"],
                                     "archive_path": "evil-3.exe"}]
    assert e["imguard"]["file"]["archive_path"] == "evil-3.exe"
    assert e["observer"]["name"] == "gw-paris-1"
    assert e["event"]["id"] and e["event"]["id"] != alerts.new_event_id()


def test_tls_failure_policy_reload_and_sink_events_have_their_own_types():
    tls = alerts.tls_failure_event(CTX, "client rejected the certificate: unknown ca")
    assert tls["event"]["dataset"] == "imguard.tls" and tls["event"]["outcome"] == "failure"
    assert tls["imguard"]["tls"]["side"] == "client"
    reload_ok = alerts.policy_reload_event("v8", True, rules=12)
    assert reload_ok["event"]["kind"] == "event" and reload_ok["rule"]["version"] == "v8"
    refused = alerts.policy_reload_event("v7", False, errors=["rules/a.yaml:3: unknown action"])
    assert refused["event"]["kind"] == "alert" and refused["event"]["outcome"] == "failure"
    sink = alerts.sink_failure_event("webhook", "down", "connection refused")
    assert sink["event"]["action"] == "sink_down" and sink["imguard"]["sink"]["name"] == "webhook"


def test_a_sink_that_is_down_does_not_block_and_gets_the_backlog_in_order(tmp_path):
    """write() stays fast while the webhook is down; when it comes back it gets every alert, in order."""
    hook = HttpReceiver()                        # not started: nothing listens on its port
    bus = webhook_bus(tmp_path, hook.url)
    written = []
    started = time.monotonic()
    for n in range(100):
        event = file_alert(n)
        bus.write(event)
        written.append(event["event"]["id"])
    assert time.monotonic() - started < 5.0       # fsync per alert, twice, and nothing else
    assert wait_until(lambda: sink_events(tmp_path, "down"))
    assert bus.status()["webhook"]["backlog"] == 100
    with hook:
        assert bus.drain(20)
        assert hook.ids() == written
        assert wait_until(lambda: sink_events(tmp_path, "recovered"))
    bus.close()
    assert not any(e["imguard"].get("possible_duplicate") for e in hook.events)


def test_backlog_survives_a_restart(tmp_path):
    """Alerts queued while the sink was down are delivered by the next process, in order."""
    hook = HttpReceiver()
    bus = webhook_bus(tmp_path, hook.url)
    ids = []
    for n in range(20):
        event = file_alert(n)
        bus.write(event)
        ids.append(event["event"]["id"])
    bus.close()
    with hook:
        bus = webhook_bus(tmp_path, hook.url)
        assert bus.drain(20)
        bus.close()
    assert hook.ids() == ids


def test_a_failing_webhook_is_retried_without_duplicates(tmp_path):
    """A 503 means not taken: retried until accepted, delivered once, not flagged."""
    with HttpReceiver() as hook:
        hook.mode = "fail"
        bus = webhook_bus(tmp_path, hook.url)
        event = file_alert(1)
        bus.write(event)
        assert wait_until(lambda: hook.requests >= 3)
        hook.mode = "ok"
        assert bus.drain(10)
        bus.close()
    assert hook.ids() == [event["event"]["id"]]
    assert "possible_duplicate" not in hook.events[0]["imguard"]


def test_a_slow_webhook_gets_the_retry_flagged_as_possible_duplicate(tmp_path):
    """A timeout after the request was sent is ambiguous: the retry says it may be a duplicate."""
    with HttpReceiver(delay=2.0) as hook:
        hook.mode = "slow"
        bus = webhook_bus(tmp_path, hook.url, webhook_timeout=0.3)
        event = file_alert(1)
        started = time.monotonic()
        bus.write(event)
        assert time.monotonic() - started < 0.5
        assert wait_until(lambda: len(hook.events) >= 1)
        hook.mode = "ok"
        assert bus.drain(10)
        bus.close()
    assert hook.ids()[0] == hook.ids()[-1] == event["event"]["id"]
    assert len(hook.events) >= 2
    assert "possible_duplicate" not in hook.events[0]["imguard"]
    assert all(e["imguard"]["possible_duplicate"] is True for e in hook.events[1:])
    assert hook.headers[-1]["X-Imguard-Possible-Duplicate"] == "1"


def _queued_while_down(data_dir, count: int) -> list[str]:
    bus = webhook_bus(data_dir, HttpReceiver().url)
    bus._deliveries[0].stopping.set()           # keep the queue exactly as written
    ids = []
    for n in range(count):
        event = file_alert(n)
        bus.write(event)
        ids.append(event["event"]["id"])
    bus.close()
    return ids


def test_a_corrupt_queue_record_is_skipped_reported_and_the_rest_delivered(tmp_path):
    ids = _queued_while_down(tmp_path, 10)
    [segment] = (tmp_path / "queue" / "webhook").glob("seg-*")
    data = bytearray(segment.read_bytes())
    fourth = data.index(ids[3].encode())
    data[fourth] ^= 0x20                         # one flipped bit inside the 4th record
    segment.write_bytes(bytes(data))
    with HttpReceiver() as hook:
        bus = webhook_bus(tmp_path, hook.url)
        assert bus.drain(10)
        bus.close()
    assert hook.ids() == ids[:3] + ids[4:]
    [corrupt] = sink_events(tmp_path, "queue_corrupt")
    assert corrupt["imguard"]["sink"]["name"] == "webhook" and corrupt["imguard"]["sink"]["count"] > 0


def test_a_torn_tail_is_cut_reported_and_new_records_follow(tmp_path):
    """A write cut by a crash leaves half a record at the end: cut off at open, later records intact."""
    ids = _queued_while_down(tmp_path, 5)
    [segment] = (tmp_path / "queue" / "webhook").glob("seg-*")
    data = segment.read_bytes()
    segment.write_bytes(data + data[:30])        # the start of a record, never finished
    with HttpReceiver() as hook:
        bus = webhook_bus(tmp_path, hook.url)
        event = file_alert(99)
        bus.write(event)
        assert bus.drain(10)
        bus.close()
    assert hook.ids() == ids + [event["event"]["id"]]
    assert len(sink_events(tmp_path, "queue_torn_tail")) == 1


def test_a_full_queue_drops_the_oldest_with_a_count_and_write_stays_fast(tmp_path):
    hook = HttpReceiver()
    bus = webhook_bus(tmp_path, hook.url, queue_max_bytes=16 * 1024)
    ids = []
    started = time.monotonic()
    for n in range(200):
        event = file_alert(n)
        bus.write(event)
        ids.append(event["event"]["id"])
    assert time.monotonic() - started < 10.0
    status = bus.status()["webhook"]
    assert status["backlog_bytes"] <= 16 * 1024
    dropped = status["dropped"]
    assert dropped > 100
    with hook:
        assert bus.drain(20)
        bus.close()
    # The newest alerts, in order; the dropped ones are the oldest; all 200 are in the local file.
    assert hook.ids() == ids[dropped:]
    full = sink_events(tmp_path, "queue_full")
    assert full and sum(e["imguard"]["sink"]["count"] for e in full) == dropped
    assert full[0]["imguard"]["severity"] == "high" and full[0]["event"]["severity"] == 4
    assert len([e for e in local_events(tmp_path) if e["event"]["dataset"] == "imguard.file"]) == 200


def test_a_disk_that_refuses_the_queue_does_not_stop_traffic(tmp_path, monkeypatch):
    """ENOSPC on the queue: write() returns, the alert is in the local file, an anomaly says what happened."""
    hook = HttpReceiver()
    bus = webhook_bus(tmp_path, hook.url)

    def disk_full(self, payload, sync=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskQueue, "append", disk_full)
    event = file_alert(1)
    bus.write(event)
    bus.close()
    kinds = [(e["event"]["dataset"], e["imguard"].get("sink", {}).get("kind")) for e in local_events(tmp_path)]
    assert ("imguard.file", None) in kinds and ("imguard.sink", "queue_write_failed") in kinds


def test_a_queue_write_cut_by_a_full_disk_leaves_no_partial_record(tmp_path, monkeypatch):
    queue = DiskQueue(tmp_path / "q", 1 << 20)
    queue.append(b"first")
    real_write = __import__("os").write

    def short_write(fd, data):
        real_write(fd, data[:7])
        return 7

    monkeypatch.setattr("imguard.sinks.queue.os.write", short_write)
    with pytest.raises(OSError):
        queue.append(b"second")
    monkeypatch.setattr("imguard.sinks.queue.os.write", real_write)
    queue.append(b"third")
    payloads = []
    while (record := queue.peek()) is not None:
        payloads.append(record.payload)
        queue.ack(record.seq)
    assert payloads == [b"first", b"third"] and queue.take_problems() == []


MALICIOUS_TEXT = ('hi\n<13>1 2026-01-01T00:00:00Z forged imguard - - - {"event":{"action":"allow"}}\r\n'
                  'x\x00y\u2028z ] " \\ =HYPERLINK("http://evil")')


def test_malicious_text_cannot_inject_syslog_records(tmp_path):
    with SyslogReceiver() as syslog:
        bus = build_sinks(SinkSettings(syslog_address=syslog.tcp_address, dedup_window_seconds=0), tmp_path)
        bus.write(alerts.message_event(MALICIOUS_TEXT, CTX.with_(sender='mallory"] [x y="1'),
                                       Decision(action=BLOCK, matches=[RuleMatch("dlp", BLOCK, "high", "enforce")])))
        bus.write(file_alert(1, name="evil\r\n<13>1 fake.exe"))
        assert wait_until(lambda: len(syslog.records) == 2)
        bus.close()
    assert syslog.framing_errors == []
    header = re.compile(rb'^<(\d+)>1 \S+ \S+ imguard \d+ (message|file) '
                        rb'\[imguard@32473 (?:[a-z0-9_]+="(?:[^"\\\]]|\\.)*"'
                        rb' ?)+\] \xef\xbb\xbf(\{.*\})$')
    texts = []
    for record, priority in zip(syslog.records, (16 * 8 + 3, 16 * 8 + 2), strict=True):    # local0; err (high), crit
        assert b"\n" not in record and b"\r" not in record and b"\x00" not in record
        # UTF-8 (MSG after a BOM, RFC 5424 6.4) without one control character: nothing a terminal or parser trips on
        assert not any(b < 32 or b == 127 for b in record) and record.decode("utf-8")
        m = header.match(record)
        assert m, record[:300]
        assert int(m.group(1)) == priority
        texts.append(json.loads(m.group(3)))
    assert texts[0]["imguard"]["message"]["text"] == MALICIOUS_TEXT
    assert texts[1]["file"]["name"] == "evil\r\n<13>1 fake.exe"
    assert b'sender="mallory\\"\\] [x y=\\"1"' in syslog.records[0]


def test_syslog_header_fields_are_clean():
    event = file_alert(1)
    event["observer"]["hostname"] = "bad host\nname"
    event["@timestamp"] = "yesterday\n"
    record = format_5424(event, procid=42)
    assert record.startswith(b"<130>1 ")
    _, timestamp, hostname, app, procid, msgid = record.split(b" ", 6)[:6]
    assert re.match(rb"^\d{4}-\d\d-\d\dT", timestamp) and hostname == b"badhostname"
    assert (app, procid, msgid) == (b"imguard", b"42", b"file")


def test_malicious_names_cannot_inject_mail_headers(tmp_path):
    with SmtpReceiver() as smtp:
        bus = build_sinks(SinkSettings(email_smtp=smtp.address, email_to=["soc@corp.example"],
                                       dedup_window_seconds=0), tmp_path)
        bus.write(file_alert(1, name="a.exe\r\nBcc: victim@corp.example\r\n\r\nbody", sender="x\ny@z"))
        assert wait_until(lambda: smtp.messages)
        bus.close()
    mail = smtp.messages[0]
    assert mail["Bcc"] is None and smtp.envelopes[0][1] == ["soc@corp.example"]
    assert "\n" not in mail["Subject"] and "\r" not in mail["Subject"]


def test_mail_goes_only_to_alerts_at_or_above_the_severity(tmp_path):
    with SmtpReceiver() as smtp:
        bus = build_sinks(SinkSettings(email_smtp=smtp.address, email_to=["soc@corp.example"],
                                       email_min_severity="critical", dedup_window_seconds=0), tmp_path)
        bus.write(alerts.anomaly_event(CTX, "malformed_xml", "bad xml"))          # low
        bus.write(alerts.message_event("x", CTX, Decision(action=BLOCK,
                                                          matches=[RuleMatch("r", BLOCK, "high", "enforce")])))
        bus.write(file_alert(1))                                                   # critical
        assert bus.drain(10)
        bus.close()
    assert len(smtp.messages) == 1 and "critical" in smtp.messages[0]["Subject"]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class ListSink(Sink):
    """A remote sink that keeps what it is sent, in order (delivery itself is tested with real receivers)."""
    name = "list"

    def __init__(self):
        self.received: list[dict] = []

    def send(self, event: dict) -> None:
        self.received.append(event)


def test_repeated_identical_alerts_are_suppressed_for_remote_sinks_with_a_count(tmp_path):
    clock = Clock()
    remote = ListSink()
    bus = EventBus(alerts.AlertLog(tmp_path / "alerts.jsonl"), [remote], queue_dir=tmp_path / "queue",
                   dedup_window=60, clock=clock)
    for _ in range(5):
        bus.write(file_alert(1))
    bus.write(file_alert(2))                                    # another file: not the same alert
    bus.write(file_alert(1, sender="carol@corp.example"))       # another sender: not the same alert
    for _ in range(3):
        bus.write(alerts.message_event("hi", CTX, Decision(action=ALLOW)))   # plain events: never suppressed
    clock.now += 61
    bus.write(file_alert(1))
    assert bus.drain()
    files = [e for e in remote.received if e["event"]["dataset"] == "imguard.file"]
    assert [(e["file"]["hash"]["sha256"][-1], e["imguard"].get("suppressed_count")) for e in files] == [
        ("1", None), ("2", None), ("1", None), ("1", 4)]
    assert len([e for e in remote.received if e["event"]["dataset"] == "imguard.message"]) == 3
    # The local log is the record: it has every event, the repeats included.
    local_files = [e for e in local_events(tmp_path) if e["event"]["dataset"] == "imguard.file"]
    assert len(local_files) == 8
    # A burst followed by silence is still counted: the window's last alert is sent when it ends.
    for _ in range(3):
        bus.write(file_alert(1))
    clock.now += 61
    bus.tick()
    assert bus.drain()
    last = remote.received[-1]
    assert last["file"]["hash"]["sha256"].endswith("1") and last["imguard"]["suppressed_count"] == 2
    bus.close()


def test_suppressed_counts_are_not_lost_at_shutdown(tmp_path):
    remote = ListSink()
    bus = EventBus(alerts.AlertLog(tmp_path / "alerts.jsonl"), [remote], queue_dir=tmp_path / "queue",
                   dedup_window=600)
    for _ in range(4):
        bus.write(file_alert(1))
    assert bus.drain()
    bus.close()
    restarted = EventBus(None, [remote], queue_dir=tmp_path / "queue")
    assert restarted.drain()
    restarted.close()
    assert [e["imguard"].get("suppressed_count") for e in remote.received] == [None, 2]
    assert len(local_events(tmp_path)) == 4


def test_a_file_blocked_for_several_receivers_is_recorded_for_each(tmp_path):
    """The same file sent to three people is three alerts, not one with a count."""
    remote = ListSink()
    bus = EventBus(alerts.AlertLog(tmp_path / "alerts.jsonl"), [remote], queue_dir=tmp_path / "queue",
                   dedup_window=600)
    report = FileReport(name="eicar.com", path="eicar.com", size=68, sha256="e" * 64)
    for receiver in ("bob@corp.example", "carol@corp.example", "dave@corp.example"):
        bus.write(alerts.file_event(report, CTX.with_(recipients=(receiver,)), BLOCK_MALWARE))
    assert bus.drain()
    bus.close()
    assert [e["destination"]["user"]["name"][0] for e in remote.received] == [
        "bob@corp.example", "carol@corp.example", "dave@corp.example"]


def test_the_local_file_is_rotated_by_size_without_splitting_lines(tmp_path):
    bus = build_sinks(SinkSettings(jsonl_max_bytes=20_000, jsonl_backups=50, dedup_window_seconds=0), tmp_path)
    for _n in range(60):
        bus.write(alerts.message_event("x" * 500 + "\n" * 10, CTX, Decision(action=ALLOW)))
    bus.close()
    files = sorted(tmp_path.glob("alerts.jsonl*"))
    assert len(files) > 2
    lines = [line for f in files for line in f.read_text().splitlines()]
    assert len(lines) == 60 and all(json.loads(line)["imguard"]["message"]["text"].startswith("x") for line in lines)
    assert all(f.stat().st_size <= 20_000 for f in files)


def test_rotation_keeps_only_the_configured_backups(tmp_path):
    log = alerts.AlertLog(tmp_path / "a.jsonl", max_bytes=2000, backups=2)
    for _n in range(50):
        log.write(alerts.message_event("y" * 300, CTX, Decision(action=ALLOW)))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]


def test_bad_sink_settings_are_refused_with_the_setting_named():
    errors = check_settings(SinkSettings(syslog_address="tcp://nohost", email_min_severity="urgent",
                                         webhook_timeout=0))
    assert any("syslog address" in e for e in errors)
    assert any(e.startswith("email_min_severity") for e in errors)
    assert any(e.startswith("webhook_timeout") for e in errors)
    with pytest.raises(ValueError):
        WebhookSink("ftp://example.org/")
    assert SinkSettings().remote_sinks() == []


def test_a_unix_socket_syslog_receives_records(tmp_path):
    import socket
    path = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(5)
    bus = build_sinks(SinkSettings(syslog_address=f"unix://{path}"), tmp_path / "data")
    bus.write(file_alert(1))
    record = receiver.recv(65536)
    bus.close()
    receiver.close()
    assert record.startswith(b"<130>1 ") and b'"sha256":"' in record


def test_sink_settings_are_command_line_options():
    import argparse
    from imguard import settings
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, SinkSettings)
    args = parser.parse_args(["--webhook-url", "http://127.0.0.1:1/h", "--email-to", "a@x", "--email-to", "b@x",
                              "--email-starttls", "--queue-max-bytes", "8192", "--instance", "gw2"])
    s = settings.from_arguments(SinkSettings, args)
    assert (s.webhook_url, s.email_to, s.email_starttls, s.queue_max_bytes, s.instance) == (
        "http://127.0.0.1:1/h", ["a@x", "b@x"], True, 8192, "gw2")
    assert s.dedup_window_seconds == 60.0 and s.remote_sinks() == ["webhook"]


def test_syslog_over_tcp_gets_the_backlog_when_the_receiver_starts(tmp_path):
    from tests.peers.sink_peers import free_port
    port = free_port()
    bus = build_sinks(SinkSettings(syslog_address=f"tcp://127.0.0.1:{port}", dedup_window_seconds=0,
                                   retry_max_seconds=0.2), tmp_path)
    ids = []
    for n in range(5):
        event = file_alert(n)
        bus.write(event)
        ids.append(event["event"]["id"])
    assert wait_until(lambda: sink_events(tmp_path, "down"))
    with SyslogReceiver(tcp_port=port) as syslog:
        assert bus.drain(10)
        assert wait_until(lambda: len(syslog.records) == 5)
        bus.close()
    assert [re.search(rb' id="([0-9a-f]+)"', r).group(1).decode() for r in syslog.records] == ids


def test_two_processes_never_share_a_queue(tmp_path):
    """Workers share a data folder, never a queue: a second bus gets a queue of its own, not an interleaved
    one; a DiskQueue opened twice is refused."""
    from imguard.sinks.queue import DiskQueue, QueueBusy
    first = webhook_bus(tmp_path, HttpReceiver().url)
    second = webhook_bus(tmp_path, HttpReceiver().url)
    queues = sorted(p.name for p in (tmp_path / "queue").iterdir())
    assert queues == ["webhook", "webhook-1"]
    with pytest.raises(QueueBusy):
        DiskQueue(tmp_path / "queue" / "webhook", 1 << 20)
    first.close()
    second.close()


def test_text_with_unicode_line_breaks_stays_one_record_everywhere(tmp_path):
    """U+2028, U+2029 and U+0085 in a message stay escaped in the local log and in a sink's queue, and the
    sink receives the text unchanged; an event's id and the instance name are kept as given."""
    text = "one\u2028two\u2029three\x85four é"
    remote = ListSink()
    bus = EventBus(alerts.AlertLog(tmp_path / "alerts.jsonl", instance="gw1"), [remote],
                   queue_dir=tmp_path / "queue", dedup_window=60)
    allowed = alerts.message_event(text, CTX, Decision(action=ALLOW))
    blocked = alerts.message_event(text, CTX, BLOCK_MALWARE)
    ids = [allowed["event"]["id"], blocked["event"]["id"]]
    bus.write(allowed)
    bus.write(blocked)
    assert bus.drain()
    queued = b"".join(path.read_bytes() for path in (tmp_path / "queue").rglob("*") if path.is_file())
    bus.close()
    raw = (tmp_path / "alerts.jsonl").read_bytes()
    for data in (raw, queued):
        assert "\u2028".encode() not in data and "\u2029".encode() not in data and "\x85".encode() not in data
    events = local_events(tmp_path)
    assert [e["imguard"]["message"]["text"] for e in events] == [text, text]
    assert [e["event"]["id"] for e in events] == ids
    assert [e["observer"]["name"] for e in events] == ["gw1", "gw1"]
    assert [e["imguard"]["message"]["text"] for e in remote.received] == [text, text]
    assert [e["event"]["id"] for e in remote.received] == ids


# --- credentials and certificates of the sinks (issue 17) ------------------------------------------------

def test_webhook_credentials_go_as_authorization_and_never_into_events(tmp_path):
    """A URL's user and password are sent as Authorization: Basic; the sink_down event (alerts.jsonl, and the
    other sinks: here a real syslog receiver) names the host and port alone."""
    import base64
    hook = HttpReceiver()                                   # not started yet: the webhook is down
    url = hook.url.replace("http://", "http://hookuser:s3cr%40t-Zq@")
    with SyslogReceiver() as syslog:
        bus = build_sinks(SinkSettings(webhook_url=url, webhook_timeout=2.0, dedup_window_seconds=0,
                                       retry_max_seconds=0.2, syslog_address=syslog.tcp_address), tmp_path,
                          instance="gw1")
        bus.write(file_alert(1))
        assert wait_until(lambda: sink_events(tmp_path, "down"))
        assert wait_until(lambda: any(b"sink_down" in r for r in syslog.records))
        with hook:
            assert bus.drain(20)
        bus.close()
    down = sink_events(tmp_path, "down")[0]
    assert f"127.0.0.1:{hook.port}" in json.dumps(down)
    for text in [(tmp_path / "alerts.jsonl").read_text(), *(r.decode("utf-8", "replace") for r in syslog.records)]:
        assert "s3cr" not in text and "hookuser" not in text and "Zq" not in text
    assert hook.ids() == [local_events(tmp_path)[0]["event"]["id"]]
    scheme, _, token = hook.headers[0]["Authorization"].partition(" ")
    assert scheme == "Basic" and base64.b64decode(token) == b"hookuser:s3cr@t-Zq"


def test_a_bad_webhook_url_is_refused_without_echoing_its_password():
    errors = check_settings(SinkSettings(webhook_url="ftp://bob:hunter2@example.org/x"))
    assert errors and "hunter2" not in errors[0] and "***@example.org" in errors[0]


def mail_bus(tmp_path, smtp: SmtpReceiver, **settings) -> EventBus:
    values = dict(email_smtp=smtp.address, email_to=["soc@corp.example"], email_starttls=True,
                  dedup_window_seconds=0, retry_max_seconds=0.2)
    values.update(settings)
    return build_sinks(SinkSettings(**values), tmp_path / "data")


@pytest.mark.parametrize("names,ca", [
    ((("localhost",), ("127.0.0.1",)), False),             # self-signed CA that is not configured
    ((("mail.other.example",), ()), True),                 # the configured CA, but a certificate for another host
])
def test_starttls_gives_no_mail_to_a_server_whose_certificate_does_not_verify(tmp_path, names, ca):
    with SmtpReceiver(tls_dir=tmp_path / "tls", tls_names=names) as smtp:
        bus = mail_bus(tmp_path, smtp, email_ca_file=str(smtp.ca_file) if ca else "")
        bus.write(file_alert(1))
        assert wait_until(lambda: sink_events(tmp_path / "data", "down"))
        down = sink_events(tmp_path / "data", "down")[0]
        assert "certificate" in json.dumps(down), down
        bus.close()
        assert smtp.messages == [] and smtp.envelopes == []


def test_starttls_delivers_to_a_server_whose_ca_is_configured(tmp_path):
    with SmtpReceiver(tls_dir=tmp_path / "tls") as smtp:
        bus = mail_bus(tmp_path, smtp, email_ca_file=str(smtp.ca_file))
        bus.write(file_alert(1))
        assert wait_until(lambda: smtp.messages)
        bus.close()
    assert "block-malware" in smtp.messages[0]["Subject"] and "evil-1.exe" in smtp.messages[0].get_content()
    assert not sink_events(tmp_path / "data", "down")


def test_email_ca_file_settings_are_checked(tmp_path):
    errors = check_settings(SinkSettings(email_smtp="127.0.0.1:25", email_to=["a@b"], email_ca_file="/nope.pem",
                                         email_starttls=True))
    assert errors and errors[0].startswith("email_ca_file: cannot load CA certificates from '/nope.pem'")
    errors = check_settings(SinkSettings(email_smtp="127.0.0.1:25", email_to=["a@b"], email_ca_file="/x.pem"))
    assert any(e.startswith("email_ca_file: only used with email_starttls") for e in errors)


# --- UTF-8 syslog and dead letters (issue 19) ------------------------------------------------------------------

# RFC 5424's ABNF (section 6) as a strict pattern over the decoded record: PRI, VERSION, TIMESTAMP (FULL-DATE "T"
# FULL-TIME, TIME-SECFRAC of 1-6 digits), HOSTNAME 1*255, APP-NAME 1*48, PROCID 1*128, MSGID 1*32 PRINTUSASCII,
# STRUCTURED-DATA of SD-ELEMENTs whose PARAM-VALUEs escape '"', '\' and ']', then MSG: BOM and UTF-8 (MSG-UTF8).
_PRINTUSASCII = r"[\x21-\x7e]"
_RFC5424 = re.compile(
    r"<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) "
    r"(?P<timestamp>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rf"(?P<hostname>-|{_PRINTUSASCII}{{1,255}}) (?P<app>-|{_PRINTUSASCII}{{1,48}}) "
    rf"(?P<procid>-|{_PRINTUSASCII}{{1,128}}) (?P<msgid>-|{_PRINTUSASCII}{{1,32}}) "
    r'(?P<sd>-|(?:\[[^\x00-\x20=\]"]{1,32}(?: [^\x00-\x20=\]"]{1,32}="(?:[^"\\\]]|\\.)*")*\])+)'
    r"(?: (?P<msg>\ufeff[^\x00-\x1f\x7f]*))?\Z", re.S)


def parse_5424(record: bytes) -> tuple[dict, dict]:
    """(the independent parser's fields, the event in MSG), after the strict ABNF check above. The parser is
    syslog-rfc5424-parser from PyPI (a Lark grammar of the RFC), no code of imguard's."""
    parser = pytest.importorskip("syslog_rfc5424_parser", reason="pip install syslog-rfc5424-parser")
    text = record.decode("utf-8")                          # strict: the whole record is UTF-8
    m = _RFC5424.match(text)
    assert m, f"not RFC 5424 by its ABNF: {record[:300]!r}"
    assert 0 <= int(m.group("pri")) <= 191
    parsed = parser.SyslogMessage.parse(text).as_dict()
    msg = parsed["msg"]
    assert msg.startswith("\ufeff"), "MSG-UTF8 starts with the BOM"
    return parsed, json.loads(msg[1:])


NON_ASCII_SENDER = "jörg@example.de"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_non_ascii_sender_reaches_syslog_as_utf8_and_the_feed_goes_on(tmp_path, transport):
    """jörg@example.de once raised in the formatter, and the record was retried for ever: nothing after it ever
    reached syslog. Now it goes as UTF-8 (structured data raw, MSG after a BOM) and the next alerts follow."""
    with SyslogReceiver() as syslog:
        bus = build_sinks(SinkSettings(syslog_address=getattr(syslog, f"{transport}_address"),
                                       dedup_window_seconds=0), tmp_path, instance="gw1")
        jorg = alerts.message_event("Grüße, 東京 \u202e", CTX.with_(sender=NON_ASCII_SENDER, recipients=("zoë@x.de",)),
                                    BLOCK_MALWARE)
        bus.write(jorg)
        after = [file_alert(n) for n in range(3)]
        for event in after:
            bus.write(event)
        assert wait_until(lambda: len(syslog.records) == 4), syslog.records
        bus.close()
    parsed = [parse_5424(record) for record in syslog.records]
    fields, event = parsed[0]
    assert fields["sd"]["imguard@32473"]["sender"] == NON_ASCII_SENDER
    assert fields["appname"] == "imguard" and fields["msgid"] == "message" and fields["hostname"]
    assert event["source"]["user"]["name"] == NON_ASCII_SENDER and event["related"]["user"][1] == "zoë@x.de"
    assert event["imguard"]["message"]["text"] == "Grüße, 東京 \u202e"
    assert NON_ASCII_SENDER.encode() in syslog.records[0]           # UTF-8 itself, not \u escapes
    assert [e["event"]["id"] for _, e in parsed] == [jorg["event"]["id"]] + [e["event"]["id"] for e in after]
    assert sink_events(tmp_path) == [] and not (tmp_path / "dead-letter").exists()


def test_a_lone_surrogate_still_makes_a_valid_utf8_record():
    name = b"caf\xe9@x.example".decode("utf-8", "surrogateescape")       # Latin-1 bytes from the wire
    record = format_5424(alerts.message_event(name, CTX.with_(sender=name), BLOCK_MALWARE), procid=1)
    fields, event = parse_5424(record)
    assert fields["sd"]["imguard@32473"]["sender"] == "caf?@x.example"
    assert event["imguard"]["message"]["text"] == name


@pytest.mark.parametrize("limit", [480, 2048, 8192])
def test_a_record_over_syslog_max_bytes_is_trimmed_and_stays_valid_json(limit):
    event = alerts.message_event("ö" * 20000, CTX.with_(sender=NON_ASCII_SENDER), BLOCK_MALWARE)
    report = file_alert(1)
    report["imguard"]["report"]["padding"] = "x" * 30000
    for original in (event, report):
        record = format_5424(original, procid=1, limit=limit)
        assert len(record) <= limit
        fields, got = parse_5424(record)
        assert got["imguard"]["truncated"] is True and got["event"]["id"] == original["event"]["id"]
        assert "report" not in got["imguard"]
    assert len(format_5424(event, procid=1, limit=0)) > 40000          # no limit: whole
    assert check_settings(SinkSettings(syslog_max_bytes=100)) == [
        "syslog_max_bytes: at least 480 bytes (RFC 5424 6.1), or 0 for no limit"]


def _dead_letters(data_dir, name: str) -> list[dict]:
    path = data_dir / "dead-letter" / f"{name}.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_event_the_webhook_refuses_for_good_goes_to_the_dead_letter_and_the_feed_goes_on(tmp_path):
    """A real HTTP receiver answers 422 to one event (its content): that event goes to dead-letter/webhook.jsonl
    with a sink_dead_letter alert (to the local log and the other sinks), and the events after it arrive, in
    order, without the sink ever being reported down."""
    with HttpReceiver() as hook, SyslogReceiver() as syslog:
        poison = file_alert(0, name="poison.exe")
        hook.refuse = lambda event: event.get("file", {}).get("name") == "poison.exe"
        bus = webhook_bus(tmp_path, hook.url, syslog_address=syslog.tcp_address, syslog_min_severity="high")
        events = [file_alert(1), poison, file_alert(2), file_alert(3)]
        for event in events:
            bus.write(event)
        assert bus.drain(10)
        assert wait_until(lambda: any(b"sink_dead_letter" in r for r in syslog.records))
        status = bus.status()["webhook"]
        bus.close()
    assert hook.ids() == [events[i]["event"]["id"] for i in (0, 2, 3)] and hook.refused == 1
    [letter] = _dead_letters(tmp_path, "webhook")
    assert letter["sink"] == "webhook" and "422" in letter["reason"] and letter["event"] == json.loads(
        alerts.encode(poison))
    [alert] = sink_events(tmp_path, "dead_letter")
    assert alert["event"]["kind"] == "alert" and alert["imguard"]["severity"] == "high"
    assert alert["imguard"]["sink"]["event_id"] == poison["event"]["id"]
    assert sink_events(tmp_path, "down") == [] and status["dead_lettered"] == 1 and status["up"]
    [record] = [r for r in syslog.records if b"sink_dead_letter" in r]       # the other sink was told
    assert parse_5424(record)[1]["imguard"]["sink"]["name"] == "webhook"


def test_a_mail_the_server_refuses_for_its_content_goes_to_the_dead_letter(tmp_path):
    with SmtpReceiver() as smtp:
        smtp.refuse = lambda message: "poison.exe" in message.as_string()
        bus = build_sinks(SinkSettings(email_smtp=smtp.address, email_to=["soc@corp.example"], dedup_window_seconds=0,
                                       retry_max_seconds=0.2), tmp_path)
        events = [file_alert(0, name="poison.exe"), file_alert(1)]
        for event in events:
            bus.write(event)
        assert bus.drain(10)
        bus.close()
    assert [m["X-Imguard-Event-Id"] for m in smtp.messages] == [events[1]["event"]["id"]] and smtp.refused == 1
    [letter] = _dead_letters(tmp_path, "email")
    assert "554" in letter["reason"] and letter["event"]["event"]["id"] == events[0]["event"]["id"]
    assert len(sink_events(tmp_path, "dead_letter")) == 1


def test_an_event_syslog_cannot_format_goes_to_the_dead_letter(tmp_path, monkeypatch):
    """Whatever the formatter cannot encode is not retried: the record after it reaches a real receiver."""
    from imguard.sinks import syslog as syslog_module
    real = syslog_module.format_5424

    def format_5424_refusing_one(event, *args, **kwargs):
        if event.get("file", {}).get("name") == "poison.exe":
            "\udcff".encode("ascii")                     # the UnicodeEncodeError jörg used to cause
        return real(event, *args, **kwargs)
    monkeypatch.setattr(syslog_module, "format_5424", format_5424_refusing_one)
    with SyslogReceiver() as syslog:
        bus = build_sinks(SinkSettings(syslog_address=syslog.tcp_address, dedup_window_seconds=0), tmp_path)
        events = [file_alert(0, name="poison.exe"), file_alert(1)]
        for event in events:
            bus.write(event)
        assert wait_until(lambda: len(syslog.records) == 1)
        assert bus.drain(5)
        bus.close()
    assert parse_5424(syslog.records[0])[1]["event"]["id"] == events[1]["event"]["id"]
    [letter] = _dead_letters(tmp_path, "syslog")
    assert "UnicodeEncodeError" in letter["reason"]


def test_an_unexpected_error_for_one_event_is_dead_lettered_after_a_few_attempts(tmp_path):
    """A sink's bug for one event (not a DeliveryError) is retried POISON_ATTEMPTS times, then dead-lettered."""
    from imguard.sinks.bus import POISON_ATTEMPTS

    class Picky(ListSink):
        name = "picky"
        attempts = 0

        def send(self, event):
            if event["event"]["id"] == poison["event"]["id"]:
                Picky.attempts += 1
                raise KeyError("a bug")
            super().send(event)
    poison, good = file_alert(0), file_alert(1)
    sink = Picky()
    bus = EventBus(alerts.AlertLog(tmp_path / "alerts.jsonl"), [sink], queue_dir=tmp_path / "queue", retry_max=0.1)
    bus.write(poison)
    bus.write(good)
    assert bus.drain(10)
    bus.close()
    assert [e["event"]["id"] for e in sink.received] == [good["event"]["id"]] and Picky.attempts == POISON_ATTEMPTS
    assert [e["imguard"]["sink"]["kind"] for e in sink_events(tmp_path)] == ["down", "dead_letter", "recovered"]
    assert len(_dead_letters(tmp_path, "picky")) == 1


# --- RFC 5425 (syslog over TLS) and a real rsyslog ----------------------------------------------------------------

def test_syslog_over_tls_goes_only_to_a_receiver_whose_certificate_verifies(tmp_path):
    """tls://: delivered to a receiver whose CA is syslog_ca_file and whose certificate names the host; a
    receiver the system's CAs do not know, or whose certificate names another host, gets nothing (sink down)."""
    with SyslogReceiver(tls_dir=tmp_path / "tls") as syslog:
        bus = build_sinks(SinkSettings(syslog_address=syslog.tls_address, syslog_ca_file=str(syslog.ca_file),
                                       dedup_window_seconds=0), tmp_path / "ok")
        event = alerts.message_event("grüße", CTX.with_(sender=NON_ASCII_SENDER), BLOCK_MALWARE)
        bus.write(event)
        assert wait_until(lambda: len(syslog.records) == 1)
        bus.close()
        assert parse_5424(syslog.records[0])[1]["event"]["id"] == event["event"]["id"]
        for name, settings in (("system-cas", dict(syslog_address=syslog.tls_address)),
                               ("wrong-name", dict(syslog_address=f"tls://127.0.0.2:{syslog.tls_port}",
                                                   syslog_ca_file=str(syslog.ca_file)))):
            bus = build_sinks(SinkSettings(dedup_window_seconds=0, retry_max_seconds=0.2, **settings), tmp_path / name)
            bus.write(file_alert(1))
            assert wait_until(lambda: sink_events(tmp_path / name, "down"), 10), name    # noqa: B023
            bus.close()
            [down] = sink_events(tmp_path / name, "down")
            assert "does not verify" in down["imguard"]["sink"]["detail"] or "cannot connect" in \
                down["imguard"]["sink"]["detail"], down
        assert len(syslog.records) == 1
    assert check_settings(SinkSettings(syslog_address="tcp://127.0.0.1:1", syslog_ca_file="/x.pem")) == [
        "syslog_ca_file: only used with a tls:// syslog address"]


@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory):
    from tests.peers.sink_peers import Rsyslog, rsyslogd_bin
    if rsyslogd_bin() is None:
        pytest.skip("rsyslogd is not installed (apt-get install rsyslog rsyslog-openssl)")
    with Rsyslog.start(tmp_path_factory.mktemp("rsyslog")) as server:
        yield server


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_a_real_rsyslog_takes_every_record_whole_with_the_default_limit(tmp_path, rsyslog, transport):
    """Debian's rsyslogd with its shipped maxMessageSize: a non-ASCII sender, an event far over the limit and a
    small one each arrive as one record whose MSG is the BOM and valid JSON; nothing is cut into a bogus record."""
    big = alerts.message_event("grüße " * 5000, CTX.with_(sender=NON_ASCII_SENDER), BLOCK_MALWARE)
    report = file_alert(2)
    report["imguard"]["report"]["padding"] = "x" * 20000
    events = [big, report, alerts.message_event("hi", CTX, Decision(action=ALLOW))]
    marker = f"{transport}-{events[0]['event']['id']}"
    for event in events:
        event["imguard"]["context"]["conversation"] = marker
    settings = dict(syslog_address=getattr(rsyslog, f"{transport}_address"), dedup_window_seconds=0)
    if transport == "tls":
        settings["syslog_ca_file"] = str(rsyslog.ca_file)
    bus = build_sinks(SinkSettings(**settings), tmp_path)
    for event in events:
        bus.write(event)
    assert bus.drain(10)

    def mine() -> list[dict]:
        return [r for r in rsyslog.received() if marker in r["msg"]]
    assert wait_until(lambda: len(mine()) == 3, 10), rsyslog.logs()
    bus.close()
    records = mine()
    assert "oversize" not in rsyslog.logs()
    for record, event in zip(records, events, strict=True):
        assert record["msg"].startswith("\ufeff"), record["msg"][:20]
        got = json.loads(record["msg"][1:])
        assert got["event"]["id"] == event["event"]["id"]
        assert record["app"] == "imguard" and record["sd"].startswith("[imguard@32473 ")
    assert f'sender="{NON_ASCII_SENDER}"' in records[0]["sd"]
    assert json.loads(records[0]["msg"][1:])["imguard"]["truncated"] is True
    assert "report" not in json.loads(records[1]["msg"][1:])["imguard"]
    assert "truncated" not in json.loads(records[2]["msg"][1:]).get("imguard", {})
