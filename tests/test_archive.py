"""The conversation archive finds records by person, text, time, protocol and hash, and exports them safely."""

import csv
import io
import json

from imguard import archive, cli
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch


def _fill(path):
    store = archive.Archive(path)
    alice = ChatContext(protocol="xmpp", sender="alice@corp.example", recipients=("bob@ext.example",))
    store.add_message("the quarterly numbers", alice, Decision(action=ALLOW, policy_version="v1"))
    store.add_message("=HYPERLINK(\"http://evil\")", ChatContext(protocol="irc", sender="mallory!m@host",
                                                                 recipients=("#ops",)), Decision(action=ALLOW))
    report = FileReport(name="100%_evil.exe", path="100%_evil.exe", size=2, sha256="ab" * 32, mime="application/x-dosexec")
    store.add_file(report, alice.with_(transfer_mechanism="ibb"),
                   Decision(action=BLOCK, matches=[RuleMatch("block-exe", BLOCK, "high", "enforce")]))
    return store


def test_search_by_person_text_protocol_hash_and_time(tmp_path):
    store = _fill(tmp_path / "a.sqlite3")
    assert len(store.search(archive.Query(person="bob@ext"))) == 2
    [found] = store.search(archive.Query(text="quarterly"))
    assert found["sender"] == "alice@corp.example" and found["kind"] == "message"
    [irc] = store.search(archive.Query(protocol="irc"))
    assert irc["recipients"] == "#ops"
    [exe] = store.search(archive.Query(sha256="AB" * 32))
    assert exe["action"] == "block" and exe["rules"] == "block-exe" and exe["mechanism"] == "ibb"
    # LIKE wildcards in the query are literal: '%_' only finds the name that really contains them.
    assert [r["file_name"] for r in store.search(archive.Query(text="100%_"))] == ["100%_evil.exe"]
    assert store.search(archive.Query(since="2999-01-01")) == []
    assert len(store.search(archive.Query(until="2999-01-01"))) == 3


def test_records_survive_reopening(tmp_path):
    _fill(tmp_path / "a.sqlite3")  # not closed, as after a crash
    assert len(archive.Archive(tmp_path / "a.sqlite3").search(archive.Query())) == 3


def test_csv_export_neutralises_formulas(tmp_path):
    store = _fill(tmp_path / "a.sqlite3")
    rows = list(csv.DictReader(io.StringIO(archive.to_csv(store.search(archive.Query(protocol="irc"))))))
    assert rows[0]["text"] == "'=HYPERLINK(\"http://evil\")"


def test_cli_search_exports_jsonl_and_csv(tmp_path, capsys):
    _fill(tmp_path / "archive.sqlite3")
    assert cli.main(["archive", "search", "--person", "alice", "--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["message", "file"]
    assert cli.main(["archive", "search", "--format", "csv", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("id,time,kind")
    assert cli.main(["archive", "search", "--data-dir", str(tmp_path / "none")]) == 2


def test_two_gateway_workers_share_one_data_folder(tmp_path):
    """Workers behind one redirect share DATA_DIR: each gets a queue of its own, and both archives fill one
    SQLite database; a later worker drains what a stopped one left queued."""
    from imguard.runtime import build_pipeline
    first = build_pipeline(data_dir=tmp_path)
    second = build_pipeline(data_dir=tmp_path)
    ctx = ChatContext(protocol="irc", sender="alice", recipients=("#ops",))
    first.check_message("from the first worker", ctx)
    second.check_message("from the second worker", ctx)
    first.close()
    second.close()
    texts = sorted(r["text"] for r in archive.Archive(tmp_path / "archive.sqlite3").search(archive.Query()))
    assert texts == ["from the first worker", "from the second worker"]
    assert (tmp_path / "queue" / "archive").is_dir() and (tmp_path / "queue" / "archive-1").is_dir()
