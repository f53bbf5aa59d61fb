"""The conversation archive finds records by person, text, time, protocol and hash, and exports them safely."""

import csv
import io
import json
import time

from imguard import archive, cli
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch


def _fill(path):
    store = archive.Archive(path)
    alice = ChatContext(protocol="xmpp", sender="alice@corp.example", recipients=("bob@ext.example",))
    store.add_message("the quarterly numbers", alice, Decision(action=ALLOW, policy_version="v1"))
    store.add_message("=HYPERLINK(\"http://evil\")", ChatContext(protocol="irc", sender="mallory!m@host",
                                                                 recipients=("#ops",)), Decision(action=ALLOW))
    report = FileReport(name="100%_evil.exe", path="100%_evil.exe", size=2, sha256="ab" * 32,
                        mime="application/x-dosexec")
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


def _queued(tmp_path):
    return archive.Archive(tmp_path / "a.sqlite3", queue_dir=tmp_path / "queue")


def test_records_are_on_disk_when_commit_returns_and_the_writer_is_not_woken_per_record(tmp_path):
    """The gateway commits before it forwards: what was added is in the queue file when commit() returns."""
    store = _queued(tmp_path)
    ctx = ChatContext(protocol="xmpp", sender="alice@corp.example", recipients=("bob@ext.example",))
    store.add_message("on disk before the message crosses", ctx, Decision(action=ALLOW))
    store.add_message("and its neighbour from the same read", ctx, Decision(action=ALLOW))
    store.commit()
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "queue").glob("seg-*"))
    assert b"on disk before the message crosses" in on_disk and b"and its neighbour from the same read" in on_disk
    for n in range(3000):
        store.add_message(f"burst {n}", ctx, Decision(action=ALLOW))
    assert store.flush()
    assert len(store.search(archive.Query(limit=10_000))) == 3002
    # One wake-up per linger while records keep coming, not one per record.
    assert store._backend.wakeups < 300
    store.close()


def test_records_nobody_commits_reach_the_database(tmp_path):
    """A carrier that never commits (the offline replay): the writer thread writes what was gathered."""
    store = _queued(tmp_path)
    ctx = ChatContext(protocol="irc", sender="carol")
    store.add_message("from a replayed capture", ctx, Decision(action=ALLOW))
    deadline = time.monotonic() + 10
    while not (tmp_path / "queue").exists() or not any(
            b"from a replayed capture" in p.read_bytes() for p in (tmp_path / "queue").glob("seg-*")):
        assert time.monotonic() < deadline, "the gathered record was never written"
        time.sleep(0.05)
    assert [r["text"] for r in store.search(archive.Query())] == ["from a replayed capture"]
    store.close()


def test_records_queued_by_the_previous_version_are_still_archived(tmp_path):
    """A queue left by a version that queued JSON objects (and not arrays) is drained after an upgrade."""
    from imguard.sinks.queue import DiskQueue
    queue = DiskQueue(tmp_path / "queue", 1 << 20)
    old = {"uid": "old-1", "time": "2024-05-01T10:00:00.000+00:00", "protocol": "irc", "direction": "outbound",
           "sender": "carol", "recipients": "#ops", "conversation": "", "client_address": "", "connection_id": "",
           "action": "allow", "rules": "", "policy_version": "", "kind": "message", "text": "from before ü"}
    queue.append(json.dumps(old, ensure_ascii=False).encode())
    queue.close()
    store = _queued(tmp_path)
    store.add_message("after the upgrade", ChatContext(protocol="irc", sender="carol"), Decision(action=ALLOW))
    rows = store.search(archive.Query(person="carol"))
    assert [(r["time"], r["text"], r["kind"], r["file_size"]) for r in rows][0] == \
        ("2024-05-01T10:00:00.000+00:00", "from before ü", "message", None)
    assert [r["text"] for r in rows][1:] == ["after the upgrade"]
    store.close()


def test_a_batch_resent_after_a_crash_is_stored_once(tmp_path):
    store = _queued(tmp_path)
    ctx = ChatContext(protocol="irc", sender="alice", recipients=("#ops",))
    for n in range(10):
        store.add_message(f"m{n}", ctx, Decision(action=ALLOW))
    store.add_file(FileReport(name="a.exe", path="a.exe", size=7, sha256="cd" * 32), ctx, Decision(action=BLOCK))
    assert store.flush()
    store.close()
    state = tmp_path / "queue" / "state"
    state.write_bytes(b"\x00" * 8 + state.read_bytes()[8:])      # the cursor never moved: all re-sent
    store = _queued(tmp_path)
    assert store.flush()
    rows = store.search(archive.Query())
    assert [r["text"] for r in rows] == [f"m{n}" for n in range(10)] + [None]
    assert rows[-1]["file_size"] == 7 and store.search(archive.Query(sha256="CD" * 32))[0]["file_name"] == "a.exe"
    store.close()


def test_text_orjson_refuses_is_stored_and_does_not_stall_the_writer(tmp_path):
    """A lone surrogate (bytes decoded with surrogateescape) cannot be UTF-8: stored as U+FFFD."""
    store = _queued(tmp_path)
    ctx = ChatContext(protocol="irc", sender="alice")
    store.add_message("bad \udcff byte", ctx, Decision(action=ALLOW))
    store.add_message("next", ctx, Decision(action=ALLOW))
    assert [r["text"] for r in store.search(archive.Query())] == ["bad \ufffd byte", "next"]
    store.close()


def test_time_keeps_the_iso_format():
    import datetime
    import re
    text = archive._now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", text)
    parsed = datetime.datetime.fromisoformat(text)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - parsed).total_seconds()) < 2
