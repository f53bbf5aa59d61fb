"""`imguard rules check`: several rules folders, counts of what loaded, and warnings for what loads but will not
work as expected (no signature at all, files left out, slow rules)."""

from __future__ import annotations

from pathlib import Path

from imguard import cli

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ROOT / "tests" / "data" / "signatures"


def check(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["rules", "check", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_two_rules_folders_with_counts(capsys):
    code, out, err = check(capsys, str(ROOT / "rules"), str(ROOT / "tests/data/rules"),
                           "--signatures", str(PUBLIC / "signature-base"))
    assert code == 0, err
    rules_files = len(list((ROOT / "rules").glob("[0-9]*.yaml"))) + 1
    assert f"rules from {rules_files} files in 2 folder(s)" in out
    assert "signatures: 4 YARA rules from 1 files in" in out
    assert out.rstrip().endswith("OK") and err == ""


def test_an_empty_signature_folder_is_a_warning(capsys, tmp_path):
    code, out, err = check(capsys, str(ROOT / "rules"), str(ROOT / "tests/data/rules"),
                           "--signatures", str(tmp_path))
    assert code == 0
    assert "signatures: 0 YARA rules from 0 files" in out
    assert f"warning: {tmp_path}: no YARA rule loaded" in err
    assert out.rstrip().endswith("OK (1 warning)")


def test_slow_rule_warnings_are_counted_and_shown_on_request(capsys, tmp_path):
    (tmp_path / "slow.yar").write_text('rule slow1 { strings: $a = /a.*b/ condition: $a }\n'
                                       'rule slow2 { strings: $a = /c.+d/ condition: $a }\n')
    code, out, err = check(capsys, "--signatures", str(tmp_path))
    assert code == 0
    assert "warning: 4 YARA compiler warnings (rules that may slow down every scan); --show-warnings prints them" \
        in err
    assert "slow.yar:1:" not in err
    code, out, err = check(capsys, "--signatures", str(tmp_path), "--show-warnings")
    assert "slow.yar:1: " in err and "slow.yar:2: " in err and "may slow down scanning" in err


def test_missing_modules_refuse_the_set_or_are_skipped_with_a_warning(capsys):
    code, out, err = check(capsys, "--signatures", str(PUBLIC / "modules"))
    assert code == 2 and "sandbox.yar:3: imports module 'cuckoo'" in err and "OK" not in out
    code, out, err = check(capsys, "--signatures", str(PUBLIC / "modules"), "--skip-missing-modules")
    assert code == 0 and "signatures: 1 YARA rules" in out
    assert "warning: " in err and "sandbox.yar:3: imports module 'cuckoo'" in err and "file left out" in err


def test_an_index_with_includes_and_the_set_namespace_option(capsys):
    code, out, err = check(capsys, "--signatures", str(PUBLIC / "yara-rules"))
    assert code == 0 and "signatures: 4 YARA rules from 3 files" in out
    assert "malware_index.yar:0: not loaded: index.yar is the folder's entry point" in err
    code, out, err = check(capsys, "--signatures", str(PUBLIC / "yara-rules"), "--signature-namespace", "yr")
    assert code == 0


def test_a_policy_naming_an_unknown_rule_is_still_refused(capsys, tmp_path):
    (tmp_path / "r.yaml").write_text("- id: x\n  title: X\n  severity: high\n  action: block\n  applies_to: file\n"
                                     "  match:\n    yara_rule: No_Such_Rule\n")
    code, out, err = check(capsys, str(tmp_path), "--signatures", str(PUBLIC / "elastic"))
    assert code == 2 and "r.yaml:7: yara_rule: unknown YARA rule 'No_Such_Rule'" in err


def test_scan_blocks_eicar_with_each_public_set_and_passes_the_signature_settings(capsys, tmp_path):
    """The same settings reach `imguard scan` (and `imguard run`, through the same build_pipeline)."""
    eicar = tmp_path / "eicar.txt"
    eicar.write_bytes(rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
    expected = {"signature-base": "yara-score-high", "yara-forge": "yara-score-high", "elastic": "yara-threat-name",
                "yara-rules": "yara-malware-folder"}
    for name, rule in expected.items():
        code = cli.main(["scan", str(eicar), "--signatures", str(PUBLIC / name), "--data-dir", str(tmp_path / "d")])
        out = capsys.readouterr().out
        # "malware" fires too: the bundled known-bad hash list holds EICAR (rules/hashlists/known-bad.txt)
        assert code == 1 and f"decision BLOCK  rules: malware, {rule}" in out, (name, out)
    marker = tmp_path / "plain.txt"
    marker.write_text("IMGUARD-TEST-MODULES-PLAIN")
    code = cli.main(["scan", str(marker), "--signatures", str(PUBLIC / "modules"), "--data-dir", str(tmp_path / "d")])
    assert code == 2 and "sandbox.yar:3: imports module 'cuckoo'" in capsys.readouterr().err
    code = cli.main(["scan", str(marker), "--signatures", str(PUBLIC / "modules"), "--skip-missing-modules",
                     "--data-dir", str(tmp_path / "d")])
    assert code == 1 and "decision BLOCK  rules: yara-score-high" in capsys.readouterr().out
