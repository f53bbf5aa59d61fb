"""`imguard pcap` (imguard.replay.cli): exit codes, --json, and --out's content-addressed file store."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

from imguard.replay import cli

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "replay"
PCAPS = HERE / "data" / "captures"      # part of the project: see its README

EICAR_DCC_SHA256 = "26b37420fdc784c278f5d50d1698c5c2dcb56b788a838381354087b8d78ee743"   # 100 x EICAR, 6,800 B


def run(tmp_path, *args: str) -> int:
    return cli.main([*args, "--rules", str(DATA / "rules"), "--signatures", str(DATA / "signatures"),
                     "--data-dir", str(tmp_path / "data")])


def test_blocked_file_exit_code_and_store(tmp_path, capsys):
    """A capture with a blocked file exits 1; --out keeps the file under files/<2 hex>/<sha256>, read-only,
    with the alerts and the JSON summary beside it. The name from the wire is never a path."""
    out = tmp_path / "out"
    assert run(tmp_path, str(PCAPS / "generated/irc_dcc_send.pcap"), "--out", str(out)) == 1
    text = capsys.readouterr().out
    assert "BLOCK" in text and "'eicar.com' 6800 B" in text
    stored = out / "files" / EICAR_DCC_SHA256[:2] / EICAR_DCC_SHA256
    assert stored.read_bytes().count(b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE") == 100
    assert stat.S_IMODE(stored.stat().st_mode) == 0o400
    assert not list(out.rglob("eicar.com"))
    [summary] = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert summary["transfers"][0]["stored"] == f"files/{EICAR_DCC_SHA256[:2]}/{EICAR_DCC_SHA256}"
    alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    [blocked] = [a for a in alerts if a["event"]["action"] == "block" and a.get("file", {}).get("name") == "eicar.com"]
    # stamped with the time in the capture (it was recorded at 04:38 UTC), not with the replay's time
    assert blocked["@timestamp"].startswith("2026-11-27T04:38:")
    assert blocked["event"]["created"] != blocked["@timestamp"]


def test_the_gateways_session_limits_apply_offline(tmp_path, capsys):
    """`imguard pcap` takes the gateway's per-protocol limits (and HTTP uploads'): with --irc-max-held-bytes below
    the 6,800-byte DCC file, the offer is refused as the gateway would refuse it, and no file is decided."""
    out = tmp_path / "out"
    assert run(tmp_path, str(PCAPS / "generated/irc_dcc_send.pcap"), "--out", str(out),
               "--irc-max-held-bytes", "1000") == 0
    alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    refused = [a["imguard"]["irc"] for a in alerts if a["event"].get("action") == "dcc_refused"]
    assert refused and all(r["reason"] == "too_large" and r["size"] == 6800 for r in refused)
    [summary] = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert summary["transfers"] == []
    parser = argparse.ArgumentParser()
    cli.add_pcap_arguments(parser)
    assert {"--irc-max-held-bytes", "--xmpp-max-held-bytes", "--msnp-max-held-bytes", "--bytestream-max-held-bytes",
            "--http-max-upload-size", "--msrp-max-held-bytes"} <= set(parser._option_string_actions)


def test_json_one_line_per_capture_and_clean_exit(tmp_path, capsys):
    """--json: one summary object per capture, one per line; nothing blocked: exit 0; nothing written."""
    files = [str(PCAPS / "zeek/irc-basic.pcap"), str(PCAPS / "zeek/xmpp-starttls.pcap")]
    assert run(tmp_path, *files, "--json") == 0
    lines = capsys.readouterr().out.splitlines()
    summaries = [json.loads(line) for line in lines]
    assert [s["capture"] for s in summaries] == files
    assert summaries[0]["messages"][0]["text"] == "test"
    assert not (tmp_path / "data" / "alerts.jsonl").exists()


def test_bad_input_exit_2_and_the_others_still_run(tmp_path, capsys):
    """A file that is not a capture is an error naming it (exit 2); the captures after it are still replayed."""
    junk = tmp_path / "junk.pcap"
    junk.write_text("not a capture")
    assert run(tmp_path, str(junk), str(tmp_path / "missing.pcap"), str(PCAPS / "zeek/irc-basic.pcap")) == 2
    captured = capsys.readouterr()
    assert "junk.pcap: not a pcap or pcapng file" in captured.err
    assert "missing.pcap" in captured.err
    assert "brotest -> #brotest: 'test'" in captured.out


def test_settings_are_options(tmp_path, capsys):
    """Every replay, reassembly and capture setting is an option; --ports replaces the port map."""
    assert run(tmp_path, str(PCAPS / "ndpi/irc.pcap"), "--ports", "6667=irc", "--max-out-of-order-bytes", "1000",
               "--json") == 0
    [summary] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Without 8000=irc the freenode connection is recognised by its first bytes (NICK/USER) instead.
    assert summary["conversations"][0]["protocol"] == "irc"
    assert summary["conversations"][0]["detected_by"] == "first bytes"


def test_bad_config_exit_2(tmp_path, capsys):
    assert cli.main([str(PCAPS / "zeek/irc-basic.pcap"), "--rules", str(tmp_path / "nope"),
                     "--data-dir", str(tmp_path / "data")]) == 2
    assert "rules folder does not exist" in capsys.readouterr().err
