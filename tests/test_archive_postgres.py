"""The conversation archive on a real PostgreSQL server (started by the test): the same records, search
and exports as SQLite, shared by several gateways, and a server outage neither blocks nor loses records."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from imguard import archive
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch
from tests.peers.sink_peers import PostgresServer

ALICE = ChatContext(protocol="xmpp", sender="alice@corp.example", recipients=("bob@ext.example",))
MALLORY = ChatContext(protocol="irc", sender="mallory!m@host", recipients=("#ops",))


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dsn(postgres):
    import psycopg
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS records, removed_records, holds")
    return postgres.dsn


def _fill(store: archive.Archive) -> archive.Archive:
    store.add_message("the quarterly numbers", ALICE, Decision(action=ALLOW, policy_version="v1"))
    store.add_message("=HYPERLINK(\"http://evil\")", MALLORY, Decision(action=ALLOW))
    report = FileReport(name="100%_evil.exe", path="100%_evil.exe", size=2, sha256="ab" * 32,
                        mime="application/x-dosexec")
    store.add_file(report, ALICE.with_(transfer_mechanism="ibb"),
                   Decision(action=BLOCK, matches=[RuleMatch("block-exe", BLOCK, "high", "enforce")]))
    return store


def test_search_by_person_text_protocol_hash_and_time(dsn, tmp_path):
    store = _fill(archive.Archive(dsn=dsn, queue_dir=tmp_path / "q"))
    assert len(store.search(archive.Query(person="bob@ext"))) == 2
    assert len(store.search(archive.Query(person="BOB@EXT"))) == 2        # case-insensitive, as in SQLite
    [found] = store.search(archive.Query(text="quarterly"))
    assert found["sender"] == "alice@corp.example" and found["kind"] == "message"
    [irc] = store.search(archive.Query(protocol="irc"))
    assert irc["recipients"] == "#ops"
    [exe] = store.search(archive.Query(sha256="AB" * 32))
    assert exe["action"] == "block" and exe["rules"] == "block-exe" and exe["mechanism"] == "ibb"
    assert exe["file_size"] == 2
    assert [r["file_name"] for r in store.search(archive.Query(text="100%_"))] == ["100%_evil.exe"]
    assert store.search(archive.Query(since="2999-01-01")) == []
    assert len(store.search(archive.Query(until="2999-01-01"))) == 3
    store.close()


def test_same_rows_as_sqlite(dsn, tmp_path):
    """The two backends return the same columns and values (ids and times aside)."""
    pg = _fill(archive.Archive(dsn=dsn, queue_dir=tmp_path / "q"))
    lite = _fill(archive.Archive(tmp_path / "a.sqlite3"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("id", "time")} for r in rows]  # noqa: E731
    assert strip(pg.search(archive.Query())) == strip(lite.search(archive.Query()))
    pg.close()
    lite.close()


def test_exports_neutralise_formulas_and_keep_hostile_text(dsn, tmp_path):
    store = _fill(archive.Archive(dsn=dsn, queue_dir=tmp_path / "q"))
    store.add_message("line\nbreak, \"quote\" and NUL\x00 here", MALLORY, Decision(action=ALLOW))
    records = store.search(archive.Query(protocol="irc"))
    rows = list(csv.DictReader(io.StringIO(archive.to_csv(records))))
    assert rows[0]["text"] == "'=HYPERLINK(\"http://evil\")"
    assert rows[1]["text"] == "line\nbreak, \"quote\" and NUL\ufffd here"     # NUL cannot live in PostgreSQL text
    assert [json.loads(line)["sender"] for line in archive.to_jsonl(records).splitlines()] == ["mallory!m@host"] * 2
    store.close()


def test_several_gateways_share_one_archive(dsn, tmp_path):
    one = archive.Archive(dsn=dsn, queue_dir=tmp_path / "gw1" / "queue" / "archive")
    two = archive.open_archive(tmp_path / "gw2", archive.ArchiveSettings(archive_dsn=dsn))
    one.add_message("from gateway one", ALICE, Decision(action=ALLOW))
    two.add_message("from gateway two", MALLORY, Decision(action=ALLOW))
    assert one.flush() and two.flush()
    assert sorted(r["text"] for r in one.search(archive.Query())) == ["from gateway one", "from gateway two"]
    one.close()
    two.close()


def test_a_server_outage_neither_blocks_nor_loses_records(postgres, dsn, tmp_path):
    store = archive.Archive(dsn=dsn, queue_dir=tmp_path / "q")
    store.add_message("before", ALICE, Decision(action=ALLOW))
    assert store.flush()
    postgres.halt()
    try:
        started = time.monotonic()
        for n in range(50):
            store.add_message(f"during {n}", ALICE, Decision(action=ALLOW))
        assert time.monotonic() - started < 2.0
        assert not store.flush(timeout=1.0)
    finally:
        postgres.launch()
    assert store.flush(timeout=60)
    texts = [r["text"] for r in store.search(archive.Query(person="alice"))]
    assert texts == ["before"] + [f"during {n}" for n in range(50)]
    store.close()


def test_records_queued_by_a_crashed_gateway_are_stored_once(dsn, tmp_path):
    """Records still in the local queue when the process died are inserted by the next one; a batch that
    was inserted but not acknowledged is not stored twice (each record has a unique uid)."""
    from imguard.sinks.queue import DiskQueue
    queue_dir = tmp_path / "q"
    store = archive.Archive(dsn=dsn, queue_dir=queue_dir)
    store.add_message("one", ALICE, Decision(action=ALLOW))
    assert store.flush()
    store.close()
    # Simulate the crash window: the record was inserted, but the cursor never moved.
    queue = DiskQueue(queue_dir, 1 << 20)
    state = (queue_dir / "state").read_bytes()
    queue.close()
    store = archive.Archive(dsn=dsn, queue_dir=queue_dir)
    store.add_message("two", ALICE, Decision(action=ALLOW))
    assert store.flush()
    store.close()
    (queue_dir / "state").write_bytes(b"\x00" * 8 + state[8:])     # cursor back to the start
    store = archive.Archive(dsn=dsn, queue_dir=queue_dir)
    assert store.flush()
    assert [r["text"] for r in store.search(archive.Query())] == ["one", "two"]
    store.close()


def test_a_wrong_dsn_is_refused_at_start(tmp_path):
    import psycopg
    with pytest.raises(psycopg.OperationalError):
        archive.Archive(dsn=f"host={tmp_path} port=1 dbname=none connect_timeout=2", queue_dir=tmp_path / "q")


def test_a_search_only_archive_does_not_touch_the_gateways_queue(dsn, tmp_path):
    """`imguard archive search` opens the archive without a queue, while the gateway holds its own."""
    gateway = archive.open_archive(tmp_path, archive.ArchiveSettings(archive_dsn=dsn))
    gateway.add_message("kept", ALICE, Decision(action=ALLOW))
    assert gateway.flush()
    reader = archive.Archive(dsn=dsn)
    assert [r["text"] for r in reader.search(archive.Query())] == ["kept"]
    with pytest.raises(RuntimeError):
        reader.add_message("no", ALICE, Decision(action=ALLOW))
    reader.close()
    # A second worker on the same data folder gets a queue of its own and writes the same database.
    second = archive.open_archive(tmp_path, archive.ArchiveSettings(archive_dsn=dsn))
    second.add_message("from the second worker", ALICE, Decision(action=ALLOW))
    assert second.flush()
    assert sorted(r["text"] for r in gateway.search(archive.Query())) == ["from the second worker", "kept"]
    assert (tmp_path / "queue" / "archive-1").is_dir()
    second.close()
    gateway.close()


def test_the_chain_on_postgresql_verifies_and_names_an_altered_row(dsn, tmp_path, capsys):
    """A table from before the chain is upgraded in place; two gateways write a chain each (NUL stored as
    U+FFFD is what the digest covers); an UPDATE is named by `imguard archive verify --archive-dsn`."""
    import psycopg

    from imguard import archive_audit as audit, cli
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE records (id BIGSERIAL PRIMARY KEY, uid TEXT UNIQUE, time TEXT NOT NULL, "
                     "kind TEXT NOT NULL, protocol TEXT, direction TEXT, sender TEXT, recipients TEXT, "
                     "conversation TEXT, client_address TEXT, connection_id TEXT, text TEXT, file_name TEXT, "
                     "file_size BIGINT, sha256 TEXT, mime TEXT, mechanism TEXT, action TEXT NOT NULL, rules TEXT, "
                     "policy_version TEXT)")
        conn.execute("INSERT INTO records (uid, time, kind, action, text) VALUES "
                     "('old', '2024-01-01T00:00:00.000+00:00', 'message', 'allow', 'from before')")
    one = _fill(archive.Archive(dsn=dsn, queue_dir=tmp_path / "gw1" / "queue" / "archive"))
    two = archive.open_archive(tmp_path / "gw2", archive.ArchiveSettings(archive_dsn=dsn))
    two.add_message("NUL\x00 inside", MALLORY, Decision(action=ALLOW))
    one.close()
    two.close()
    result = audit.verify(archive.Archive(dsn=dsn))
    assert result.ok, result.problems
    assert sorted(c["records"] for c in result.chains.values()) == [1, 3] and result.unchained == 1
    assert cli.main(["archive", "verify", "--archive-dsn", dsn, "--data-dir", str(tmp_path)]) == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE records SET action = 'allow' WHERE action = 'block'")
    capsys.readouterr()
    assert cli.main(["archive", "verify", "--archive-dsn", dsn, "--data-dir", str(tmp_path)]) == 1
    [tampered] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("TAMPERED")]
    assert "seq 3" in tampered and "altered" in tampered


def test_retention_and_holds_on_postgresql(dsn, tmp_path):
    import datetime

    from imguard import archive_audit as audit
    store = archive.Archive(dsn=dsn, queue_dir=tmp_path / "q")
    old = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=60)).isoformat()
    for uid, sender in (("a", "alice@corp.example"), ("b", "mallory!m@host")):
        store.database().write_rows([[uid, old, "message", "irc", "", sender, "", "", "", "", f"old {uid}", None,
                                      None, None, None, None, "allow", "", ""]])
    store.add_message("new", ALICE, Decision(action=ALLOW))
    assert store.flush()
    reader = archive.Archive(dsn=dsn)
    audit.add_hold(reader, "person", "mallory")
    result = audit.apply_retention(reader, [audit.RetentionRule.parse("*:max=30")], audit.Parties(),
                                   time.time())
    assert (result.deleted, result.held) == (1, 1)
    assert sorted(r["text"] for r in reader.search(archive.Query())) == ["new", "old b"]
    assert audit.verify(reader).ok
    store.close()
    reader.close()
