"""The console's search index of the archive (imguard/console/data.py, an FTS5 trigram index in
DATA_DIR/console/archive-search.sqlite3) gives the same records as the LIKE scan it stands in front of, for a search
and for a conversation; it follows records added (also between its refresh and the query), removed, and ids given
again; without a writable console folder the console scans. The scale it is for: bench/bench_console.py."""

from __future__ import annotations

import random

from imguard.archive import Archive
from imguard.console import data

PEOPLE = ["alice@corp.example/laptop", "alice@corp.example", "Bob@corp.example/phone", "bob@corp.example",
          "al@x.example", "nick!u@10.0.0.1", "nick", "@ümit:corp.example", "ÜMIT@corp.example", "carol_1@x.example",
          "dave%x@corp.example", 'eve"q@corp.example']
TEXTS = ["Lunch at noon?", "the MEETING moved", "meeting notes attached", "Ünïcödé straße", "ÜNÏCÖDÉ STRASSE",
         "50% off_today", "50x offXtoday", 'say "hi"', "ab", "", None, "back\\slash", "tab\there", "日本語のテキスト",
         "card 4111 1111 1111 1111", "nightingale", "Nightingales sing"]
TERMS = ["meeting", "MEETING", "Meet", "ünïcödé", "ÜNÏCÖDÉ", "straße", "% off", "_to", "50%", '"hi"', "ab", "a",
         "", "ack\\s", "日本語", "本語の", "4111 1111", "nightingale", "NIGHTINGALE", "alice", "alice@corp.example",
         "bob@", "BOB@CORP", "umit", "ümit", "ÜMIT", "carol_1", "dave%x", 'eve"q', "nick", "!u@10", "zzz-none",
         ".pdf", "report"]


def _fill(path, n: int = 400) -> Archive:
    rng = random.Random(5)
    store = Archive(path)
    rows = []
    for i in range(n):
        sender, recipient = rng.sample(PEOPLE, 2)
        text = rng.choice(TEXTS)
        file_name = f"report-{i}.pdf" if rng.random() < 0.1 else None
        rows.append([f"u{i}", f"2026-12-0{1 + i % 5}T{i % 24:02d}:00:00.000+00:00", "file" if file_name else "message",
                     rng.choice(["xmpp", "irc"]), "outbound", sender, recipient, "", "", "", text, file_name,
                     None, None, None, None, "allow", "", "v1"])
    store.database().write_rows(rows)
    return store


def _same(reader: data.ArchiveReader, call):
    """The records found with the index (asked at once: no scan first) are those the scan finds."""
    reader.search_index, reader.scan_steps = True, 1
    indexed = call()
    reader.search_index = False
    scanned = call()
    reader.search_index, reader.scan_steps = True, data.SCAN_STEPS
    assert indexed == scanned
    return indexed


def test_search_and_conversation_find_what_the_scan_finds(tmp_path):
    _fill(tmp_path / "archive.sqlite3").close()
    reader = data.ArchiveReader(tmp_path / "archive.sqlite3")
    assert reader.update_index() == 400
    found = 0
    for person in ["", *TERMS[::3]]:
        for text in TERMS:
            query = data.RecordQuery(person=person, text=text, per_page=10_000)
            found += bool(_same(reader, lambda q=query: reader.search(q)))
    for a in PEOPLE:
        for b in PEOPLE:
            found += bool(_same(reader, lambda a=a, b=b: reader.conversation("", a, b, limit=10_000)))
    assert found > 60                           # not a comparison of empty results
    index = tmp_path / "console" / "archive-search.sqlite3"
    assert index.stat().st_mode & 0o777 == 0o600
    db = reader._connection()
    asked = []                                  # the index is read, not the time index walked (SQLite's plan)
    original = reader._rows
    reader._rows = lambda db, sql, args, steps=0: asked.append((sql, args)) or original(db, sql, args, steps)
    reader.scan_steps = 1
    reader.search(data.RecordQuery(text="meeting"))
    reader.search(data.RecordQuery(text="meeting", before=("2026-12-03T00:00:00.000+00:00", 200)))
    reader.conversation("", "alice@corp.example", "bob@corp.example")
    asked = [(sql, args) for sql, args in asked if "search." in sql]    # after the scan (1 step) gave up
    assert len(asked) == 3
    for sql, args in asked:
        plan = " ".join(str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "search." in plan and "records_time" not in plan, plan
    assert db.execute("SELECT count(*) FROM search.records_search WHERE records_search MATCH ?",
                      ['{text} : "meeting"']).fetchone()[0] < 400
    assert db.execute("SELECT count(*) FROM search.people WHERE side = 's' AND key = 'bob@corp.example'"
                      ).fetchone()[0] == db.execute("SELECT count(*) FROM records WHERE sender LIKE 'bob@corp.example'"
                                                    " OR sender LIKE 'bob@corp.example/%'").fetchone()[0] > 10
    reader.close()


def test_a_common_term_is_found_by_the_scan_a_rare_one_by_the_index(tmp_path):
    """The scan's budget spent (a rare term), the index answers; a common term fills its page within it."""
    _fill(tmp_path / "archive.sqlite3", 3000).close()
    reader = data.ArchiveReader(tmp_path / "archive.sqlite3")
    reader.update_index()
    reader.scan_steps = 5000
    asked = []
    original = reader._rows
    reader._rows = lambda db, sql, args, steps=0: asked.append(sql) or original(db, sql, args, steps)
    assert len(reader.search(data.RecordQuery(text="meeting", per_page=10))) == 11
    assert len(asked) == 1 and "records_search" not in asked[0]
    assert reader.search(data.RecordQuery(text="zzz-none")) == [] and "records_search" in asked[-1]
    reader.close()


def test_the_index_follows_the_archive(tmp_path):
    """Records added after the index's last batch are found (read by id); records removed are not; when the last
    record indexed is removed and its id given again, searches scan until the index is made again, then use it."""
    path = tmp_path / "archive.sqlite3"
    store = _fill(path)
    reader = data.ArchiveReader(path)
    reader.update_index()
    query = data.RecordQuery(text="before the upgrade")
    assert _same(reader, lambda: reader.search(query)) == []
    db = store.database()
    db.execute("INSERT INTO records (uid, time, kind, sender, recipients, text, action) VALUES ('late', "
               "'2026-12-07T00:00:00.000+00:00', 'message', 'zed@corp.example', 'amy@corp.example', "
               "'added before the upgrade', 'allow')")
    assert [r["sender"] for r in _same(reader, lambda: reader.search(query))] == ["zed@corp.example"]
    assert [r["text"] for r in _same(reader, lambda: reader.conversation("", "zed@corp.example", "amy@corp.example"))
            ] == ["added before the upgrade"]
    assert reader.update_index() == 401
    assert [r["sender"] for r in _same(reader, lambda: reader.search(query))] == ["zed@corp.example"]

    top = db.fetch("SELECT max(id) FROM records")[0][0]
    db.execute("DELETE FROM records WHERE id >= ?", [top - 1])          # the last two records removed ...
    db.execute("INSERT INTO records (uid, time, kind, sender, recipients, text, action) VALUES ('again', "
               "'2026-12-08T00:00:00.000+00:00', 'message', 'yul@corp.example', 'amy@corp.example', "
               "'a reused id', 'allow')")
    assert db.fetch("SELECT id FROM records WHERE uid = 'again'")[0][0] == top - 1     # ... and an id given again
    assert reader.index_progress().state is data.IndexState.READY
    with reader._lock:
        reader._connection().execute("BEGIN")
        assert reader._index_last(reader._connection()) is None        # not to be used until made again
        reader._connection().execute("COMMIT")
    assert [r["sender"] for r in _same(reader, lambda: reader.search(data.RecordQuery(text="reused id")))] == \
        ["yul@corp.example"]
    assert reader.update_index() == top - 1
    assert [r["sender"] for r in _same(reader, lambda: reader.search(data.RecordQuery(text="reused id")))] == \
        ["yul@corp.example"]
    assert _same(reader, lambda: reader.search(query)) == []
    assert _same(reader, lambda: reader.search(data.RecordQuery(text="meeting", per_page=10_000)))
    store.close()
    reader.close()


def test_without_a_writable_console_folder_the_console_scans(tmp_path, caplog):
    path = tmp_path / "archive.sqlite3"
    _fill(path).close()
    (tmp_path / "console").write_text("not a folder")
    reader = data.ArchiveReader(path)
    rows = reader.search(data.RecordQuery(text="meeting", per_page=10_000))
    assert reader.index_ready is False and "no search index" in caplog.text
    assert rows and all("meeting" in r["text"].lower() for r in rows)
    reader.close()
