"""The quarantine keeps blocked files content-addressed, private to the gateway's user, with their context."""

import hashlib
import os
import stat

from imguard import cli
from imguard.model import BLOCK, ChatContext, Decision, FileReport, RuleMatch
from imguard.quarantine import QuarantineSettings, QuarantineStore


def _report(data: bytes, name: str) -> FileReport:
    return FileReport(name=name, path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                      mime="application/octet-stream")


def _decision() -> Decision:
    return Decision(action=BLOCK, matches=[RuleMatch("malware-yara", BLOCK, "critical", "enforce")])


def test_stored_by_sha256_in_fanout_folder_never_by_wire_name(tmp_path):
    """A name from the wire such as ../../etc/passwd never becomes a path: the store uses the SHA-256."""
    store = QuarantineStore(tmp_path / "q")
    data = b"MZ evil bytes"
    report = _report(data, "../../etc/passwd")
    path = store.put(data, report, ChatContext(protocol="xmpp", sender="alice@example.com"), _decision())
    assert path == tmp_path / "q" / report.sha256[:2] / report.sha256
    assert path.read_bytes() == data
    assert not (tmp_path / "etc").exists()
    sidecar = store.show(report.sha256)
    assert sidecar["report"]["name"] == "../../etc/passwd"
    assert sidecar["sightings"][0]["context"]["sender"] == "alice@example.com"
    assert sidecar["sightings"][0]["decision"]["matches"][0]["rule_id"] == "malware-yara"


def test_only_the_gateway_user_can_read(tmp_path):
    store = QuarantineStore(tmp_path / "q")
    data = b"payload"
    path = store.put(data, _report(data, "a.bin"), ChatContext(), _decision())
    assert stat.S_IMODE(os.stat(tmp_path / "q").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(path) + ".json").st_mode) == 0o600


def test_same_file_twice_is_stored_once_and_counted(tmp_path):
    store = QuarantineStore(tmp_path / "q")
    data = b"same bytes"
    for sender in ("alice@a", "bob@b"):
        store.put(data, _report(data, "x.exe"), ChatContext(sender=sender), _decision())
    [entry] = store.entries()
    assert entry.times_seen == 2
    assert entry.rules == ["malware-yara"]
    senders = [s["context"]["sender"] for s in store.show(entry.sha256)["sightings"]]
    assert senders == ["alice@a", "bob@b"]


def test_retention_by_age_then_total_size(tmp_path):
    store = QuarantineStore(tmp_path / "q", QuarantineSettings(quarantine_max_age_days=1, quarantine_max_bytes=25))
    now = 1_000_000_000.0
    paths = {}
    for i, age_days in enumerate((3, 0.5, 0.2, 0.1)):
        data = bytes([i]) * 10
        path = store.put(data, _report(data, f"f{i}"), ChatContext(), _decision())
        os.utime(path, (now - age_days * 86400, now - age_days * 86400))
        paths[i] = path
    removed = store.apply_retention(now=now)
    # f0 is too old; then 30 bytes remain over the 25-byte limit, so the oldest of the rest (f1) goes.
    assert sorted(removed) == sorted([paths[0].name, paths[1].name])
    assert not paths[0].exists() and not paths[1].exists()
    assert paths[2].exists() and paths[3].exists()


def test_cli_list_show_export(tmp_path, capsys):
    store = QuarantineStore(tmp_path / "quarantine")
    data = b"exported bytes"
    report = _report(data, "doc.pdf")
    store.put(data, report, ChatContext(sender="mallory@ext"), _decision())
    assert cli.main(["quarantine", "list", "--data-dir", str(tmp_path)]) == 0
    assert report.sha256 in capsys.readouterr().out
    assert cli.main(["quarantine", "show", report.sha256, "--data-dir", str(tmp_path)]) == 0
    assert "mallory@ext" in capsys.readouterr().out
    dest = tmp_path / "out.bin"
    assert cli.main(["quarantine", "export", report.sha256, str(dest), "--data-dir", str(tmp_path)]) == 0
    assert dest.read_bytes() == data
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    # Exporting over an existing file is refused rather than overwriting it.
    assert cli.main(["quarantine", "export", report.sha256, str(dest), "--data-dir", str(tmp_path)]) == 2
    assert cli.main(["quarantine", "show", "nothex", "--data-dir", str(tmp_path)]) == 2
    assert cli.main(["quarantine", "show", "0" * 64, "--data-dir", str(tmp_path)]) == 2
