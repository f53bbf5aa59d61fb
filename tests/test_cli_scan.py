"""`imguard scan` as a security team uses it: type, hashes, findings and decision per file; documented exit codes."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from imguard import cli
from tests import inspect_samples as samples


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "incoming"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("minutes of the weekly meeting\n")
    (d / "sub" / "invoice.pdf").write_bytes(samples.pe())          # a PE claiming to be a PDF
    (d / "bundle.zip").write_bytes(samples.zip_bytes({"docs/readme.txt": b"hello", "tools/eicar.com": samples.EICAR}))
    return d


def scan(*argv, data_dir):
    return cli.main(["scan", *map(str, argv), "--data-dir", str(data_dir)])


def test_clean_file_exits_0_and_shows_type_and_hashes(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("minutes of the weekly meeting\n")
    assert scan(path, data_dir=tmp_path / "data") == 0
    out = capsys.readouterr().out
    assert "text/plain" in out
    assert hashlib.sha256(path.read_bytes()).hexdigest() in out
    assert hashlib.md5(path.read_bytes()).hexdigest() in out
    assert "decision ALLOW" in out


def test_folder_with_blocked_files_exits_1_with_one_json_object_per_file(folder, tmp_path, capsys):
    assert scan(folder, "--json", "--direction", "inbound", data_dir=tmp_path / "data") == 1
    results = {os.path.relpath(r["path"], folder): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(results) == {"notes.txt", "bundle.zip", "sub/invoice.pdf"}
    assert results["notes.txt"]["decision"]["action"] == "allow"

    bundle = results["bundle.zip"]
    assert bundle["decision"]["action"] == "block"
    assert "malware" in [m["rule_id"] for m in bundle["decision"]["matches"]]
    members = [m["path"] for m in bundle["report"]["members"]]
    assert "bundle.zip!tools/eicar.com" in members

    invoice = results["sub/invoice.pdf"]
    assert invoice["report"]["family"] == "executable"
    assert "type_mismatch" in [f["kind"] for f in invoice["report"]["findings"]]
    assert invoice["decision"]["action"] == "block"


def test_explain_names_the_matching_conditions(tmp_path, capsys):
    path = tmp_path / "eicar.com"
    path.write_bytes(samples.EICAR)
    assert scan(path, "--explain", data_dir=tmp_path / "data") == 1
    out = capsys.readouterr().out
    assert "rule malware" in out
    assert "YARA" in out or "yara" in out


def test_unreadable_and_missing_paths_are_unscannable_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "does-not-exist.bin"
    assert scan(missing, "--json", data_dir=tmp_path / "data") == 1      # the bundled policy blocks unscannable
    [result] = map(json.loads, capsys.readouterr().out.splitlines())
    reasons = [f["data"].get("reason") for f in result["report"]["findings"] if f["kind"] == "unscannable"]
    assert reasons == ["unreadable"]


def test_file_over_the_size_limit_is_unscannable_too_large(tmp_path, capsys):
    path = tmp_path / "big.bin"
    path.write_bytes(b"A" * 5000)
    assert scan(path, "--json", "--max-file-size", "1000", data_dir=tmp_path / "data") == 1
    [result] = map(json.loads, capsys.readouterr().out.splitlines())
    assert "too_large" in [f["data"].get("reason") for f in result["report"]["findings"]]


def test_broken_rules_are_refused_with_file_line_and_exit_2(tmp_path, capsys):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text("- id: x\n  title: t\n  severity: high\n  action: explode\n"
                                    "  applies_to: file\n  match: {family: executable}\n")
    path = tmp_path / "a.txt"
    path.write_text("x")
    assert scan(path, "--rules", rules, data_dir=tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert "bad.yaml:4:" in err and "action" in err


def test_broken_signature_is_refused_with_file_line_and_exit_2(tmp_path, capsys):
    signatures = tmp_path / "sigs"
    signatures.mkdir()
    (signatures / "broken.yar").write_text('rule ok { condition: true }\n\n'
                                           'rule bad { strings: $a = "x" condition: $a and $missing }\n')
    path = tmp_path / "a.txt"
    path.write_text("x")
    assert scan(path, "--signatures", signatures, "--rules", tmp_path / "empty-rules",
                data_dir=tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert f"{signatures / 'broken.yar'}:3: undefined string" in err


def test_usage_error_exits_2():
    result = subprocess.run([sys.executable, "-m", "imguard", "scan"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage" in result.stderr
