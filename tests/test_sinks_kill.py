"""Nothing lost across SIGKILL: a gateway process killed in the middle of a burst of alerts, with every
sink down, delivers after a restart every alert it had recorded to every sink, exactly once or flagged
as a possible duplicate, in the order it recorded them."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from imguard.sinks import SinkSettings, build_sinks
from tests.peers.sink_peers import HttpReceiver, SmtpReceiver, SyslogReceiver, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]


def recorded_alerts(data_dir: Path) -> list[str]:
    ids = []
    for line in (data_dir / "alerts.jsonl").read_text().splitlines():
        event = json.loads(line)          # every recorded line is whole: a torn last line would fail here
        if event["event"]["dataset"] == "imguard.file":
            ids.append(event["event"]["id"])
    return ids


def check_delivery(sink: str, recorded: list[str], received: list[tuple[str, bool]]) -> None:
    """Each recorded alert arrived; a second copy is always flagged; first arrivals keep the order."""
    copies = collections.defaultdict(list)
    for event_id, flagged in received:
        copies[event_id].append(flagged)
    assert [i for i in recorded if i not in copies] == [], f"{sink}: alerts lost"
    for event_id in recorded:
        assert len(copies[event_id]) == 1 or all(copies[event_id][1:]), (sink, event_id, copies[event_id])
    wanted = set(recorded)
    assert list(dict.fromkeys(i for i, _ in received if i in wanted)) == recorded, f"{sink}: order changed"
    assert received[0][1] is True, f"{sink}: the record in flight at the kill must come back flagged"


def test_sigkill_mid_burst_then_restart_delivers_every_recorded_alert_to_every_sink(tmp_path):
    hook = HttpReceiver()                                   # nothing listens on these ports yet
    syslog_port, smtp_port = free_port(), free_port()
    child = subprocess.Popen([sys.executable, "-m", "tests.peers.sink_peers", "burst", str(tmp_path), hook.url,
                              f"tcp://127.0.0.1:{syslog_port}", f"127.0.0.1:{smtp_port}", "100000"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert child.stdout.readline() == b"ready\n", child.stderr.read()
        alerts_file = tmp_path / "alerts.jsonl"
        assert wait_until(lambda: alerts_file.exists() and alerts_file.stat().st_size > 300_000, 60)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    recorded = recorded_alerts(tmp_path)
    assert 100 < len(recorded) < 100_000                    # killed in the middle, not before or after

    with hook, SyslogReceiver(tcp_port=syslog_port) as syslog, SmtpReceiver(port=smtp_port) as smtp:
        bus = build_sinks(SinkSettings(webhook_url=hook.url, syslog_address=f"tcp://127.0.0.1:{syslog_port}",
                                       email_smtp=f"127.0.0.1:{smtp_port}", email_to=["soc@corp.example"],
                                       dedup_window_seconds=0, retry_max_seconds=0.2), tmp_path, instance="restarted")
        assert bus.drain(120), bus.status()
        bus.close()

    check_delivery("webhook", recorded, [(e["event"]["id"], e["imguard"].get("possible_duplicate", False))
                                         for e in hook.events])
    syslog_ids = []
    for record in syslog.records:
        event = json.loads(record[record.index(b"] \xef\xbb\xbf{") + 5:])       # MSG: the BOM, then the JSON
        if event["event"]["dataset"] == "imguard.file":
            flagged = event["imguard"].get("possible_duplicate", False)
            assert flagged == (b'possible_duplicate="true"' in record)
            syslog_ids.append((event["event"]["id"], flagged))
    check_delivery("syslog", recorded, syslog_ids)
    check_delivery("email", recorded, [(m["X-Imguard-Event-Id"], m["X-Imguard-Possible-Duplicate"] == "1")
                                       for m in smtp.messages if re.search(r"block-malware", m["Subject"])])
