"""The console's archive search at depth and while its index is being made (issues 22 and 19): pages follow each
other by a (time, id) cursor and are exactly the OFFSET pages (ties in time included), forward and back, with the
index, without it and on PostgreSQL; the index is made by a thread while searches read the records without it (the
page says so) and are not held up by its writes; a PostgreSQL archive's migration makes pg_trgm and (time, id)
indexes, and PostgreSQL's own planner uses them for the console's queries (EXPLAIN, on a real server)."""

from __future__ import annotations

import re
import sqlite3
import time

import pytest

from imguard.archive import Archive
from imguard.console import data
from tests.test_console_search_index import _fill

QUERIES = [dict(text="meeting"), dict(text="MEET", protocol="irc"), dict(person="alice"), dict(person="bob", text="a"),
           dict(since="2026-12-03"), dict(), dict(text="nightingale"), dict(text="zzz-none")]


def _expected(path, person: str = "", text: str = "", since: str = "", protocol: str = "") -> list[int]:
    """The ids of the matching records, newest first, read straight from the file (an independent filter)."""
    db = sqlite3.connect(path)
    rows = db.execute("SELECT id, time, sender, recipients, text, file_name, protocol FROM records").fetchall()
    db.close()

    def holds(value, term):       # SQLite's LIKE: ASCII case-insensitive
        return term.lower() in (value or "").lower()
    found = [r for r in rows if (not person or holds(r[2], person) or holds(r[3], person))
             and (not text or holds(r[4], text) or holds(r[5], text)) and (not since or r[1] >= since)
             and (not protocol or r[6] == protocol)]
    return [r[0] for r in sorted(found, key=lambda r: (r[1], r[0]), reverse=True)]


def _walk(reader: data.ArchiveReader, per_page: int, **terms) -> tuple[list[list[int]], list[list[int]]]:
    """Every page by cursor, older and older; then back from the last one, newer and newer."""
    pages, cursor = [], None
    while True:
        page = reader.search_page(data.RecordQuery(per_page=per_page, before=cursor, page=len(pages) + 1, **terms))
        pages.append([r["id"] for r in page.rows])
        if page.older is None:
            break
        cursor = page.older
    back, cursor = [pages[-1]], page.newer
    while cursor is not None:
        page = reader.search_page(data.RecordQuery(per_page=per_page, after=cursor, page=len(pages) - len(back),
                                                   **terms))
        back.insert(0, [r["id"] for r in page.rows])
        cursor = page.newer
    return pages, back


@pytest.mark.parametrize("mode", ["index", "scan", "bounded scan then index"])
def test_pages_by_cursor_are_the_offset_pages(tmp_path, mode):
    """Walking a search by cursor gives the records of the OFFSET pages, in the same pages, both ways."""
    path = tmp_path / "archive.sqlite3"
    _fill(path).close()
    reader = data.ArchiveReader(path)
    reader.update_index()
    reader.search_index = mode != "scan"
    reader.scan_steps = 1 if mode == "index" else 3000
    walked = 0
    for terms in QUERIES:
        expected = _expected(path, **terms)
        pages, back = _walk(reader, 7, **terms)
        assert sum(pages, []) == expected, terms
        assert back == pages
        offset = [[r["id"] for r in reader.search(data.RecordQuery(page=n, per_page=7, **terms))[:7]]
                  for n in range(1, len(pages) + 1)]
        assert offset == pages
        walked += len(pages)
    assert walked > 100 and len(_expected(path, text="meeting")) > 50     # deep enough to matter
    reader.close()


def _console(folder, monkeypatch, *, thread: bool):
    from starlette.testclient import TestClient

    from imguard.console.accounts import Role
    from imguard.console.views import Console
    if not thread:
        monkeypatch.setattr(data.ArchiveReader, "start_indexing", lambda self: None)
    console = Console(folder)
    console.accounts.add("audrey", Role.AUDITOR, "a long enough secret")
    client = TestClient(console.app, base_url="https://testserver")
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    assert client.post("/login", data={"csrf": csrf, "name": "audrey", "password": "a long enough secret"},
                       follow_redirects=False).status_code == 303
    return console, client


def _shown(page: str) -> list[str]:
    return re.findall(r'<td class="time">([^<]+)</td>', page)


def test_while_the_index_is_made_the_page_says_so_and_searches_read_the_records(tmp_path, monkeypatch):
    """Before the index has caught up (further behind than its allowed lag), a search reads the records (same
    results) and the page says the index is being built; once made, it says nothing and the index serves. The
    page's links carry cursors, and following them gives the next OFFSET pages."""
    _fill(tmp_path / "archive.sqlite3", 3000).close()
    console, client = _console(tmp_path, monkeypatch, thread=False)
    reader = console.archive
    reader.index_lag = 100
    asked = []
    original = reader._rows
    reader._rows = lambda db, sql, args, steps=0: asked.append(sql) or original(db, sql, args, steps)
    page = client.get("/conversations?text=nightingale").text
    assert 'id="index-building"' in page and "(0 of 3,000 records)" in page
    assert asked and not any("search." in sql for sql in asked)        # read without the index
    building = _shown(page)
    assert reader.update_index() == 3000
    reader.scan_steps = 1
    asked.clear()
    page = client.get("/conversations?text=nightingale").text
    assert 'id="index-building"' not in page and _shown(page) == building and len(building) > 10
    assert any("search.records_search" in sql for sql in asked)

    url, n = "/conversations?text=meeting", 0
    while url:
        n += 1
        page = client.get(url).text
        offset = reader.search(data.RecordQuery(text="meeting", page=n))[:100]
        assert _shown(page) == [r["time"] for r in offset] and offset
        assert f"page {n} " in page
        found = re.search(r'<a href="([^"]+)">older', page)
        url = found.group(1).replace("&amp;", "&") if found else ""
        assert "before=" in url or len(offset) < 100
    assert n == 4 and reader.search(data.RecordQuery(text="meeting", page=5)) == []
    newer = re.search(r'<a href="([^"]+)">&larr; newer', page).group(1).replace("&amp;", "&")
    assert "after=" in newer and "page=3" in newer
    assert _shown(client.get(newer).text) == [r["time"] for r in reader.search(
        data.RecordQuery(text="meeting", page=3))[:100]]
    assert client.get("/conversations?text=meeting&before=junk").status_code == 200     # a bad cursor: page 1
    console.close()


def test_the_indexing_thread_catches_up_and_follows_new_records(tmp_path):
    path = tmp_path / "archive.sqlite3"
    store = _fill(path, 2000)
    reader = data.ArchiveReader(path)
    reader.start_indexing()

    def caught_up(total: int) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            progress = reader.index_progress()
            if progress.indexed == total:
                return progress.state is data.IndexState.READY
            time.sleep(0.1)
        return False
    assert caught_up(2000)
    store.database().execute("INSERT INTO records (uid, time, kind, sender, recipients, text, action) VALUES "
                             "('late', '2026-12-09T00:00:00.000+00:00', 'message', 'zed@corp.example', "
                             "'amy@corp.example', 'a late nightingale', 'allow')")
    assert caught_up(2001)
    db = sqlite3.connect(tmp_path / "console" / "archive-search.sqlite3")
    assert db.execute("SELECT count(*) FROM records_search WHERE records_search MATCH 'late nightingale'"
                      ).fetchone()[0] == 1
    db.close()
    reader.close()
    assert reader._thread is None
    store.close()


def test_a_search_is_not_held_up_by_the_index_being_written(tmp_path):
    """The index is WAL: a search reads it while another connection holds its write lock (a batch being made)."""
    path = tmp_path / "archive.sqlite3"
    _fill(path, 1000).close()
    reader = data.ArchiveReader(path)
    reader.update_index()
    writer = sqlite3.connect(tmp_path / "console" / "archive-search.sqlite3", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO people VALUES ('s', 'held', 0)")
    reader.scan_steps = 1
    started = time.monotonic()
    found = reader.search(data.RecordQuery(text="nightingale", per_page=1000))
    pair = reader.conversation("", "alice@corp.example", "bob@corp.example")
    assert time.monotonic() - started < 1.0
    assert [r["id"] for r in found] == _expected(path, text="nightingale") and found
    assert pair
    writer.execute("ROLLBACK")
    writer.close()
    reader.close()


# --- PostgreSQL -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres():
    from tests.peers.sink_peers import PostgresServer
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


def _plan(reader: data.ArchiveReader, sql: str, args: list) -> str:
    return "\n".join(r[0] for r in reader._db.execute("EXPLAIN " + sql, args).fetchall())


def test_postgresql_migration_makes_search_indexes_the_console_queries_use(postgres, tmp_path):
    """The archive's schema makes pg_trgm GIN indexes on sender, recipients, text and file name and a (time, id)
    index; on 200,000 records PostgreSQL's planner serves the console's rare-term, person and conversation queries
    from the trigram indexes and a deep page by cursor from (time, id); results are those of a plain filter."""
    import psycopg

    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS records, removed_records, holds")
        conn.execute("DROP EXTENSION IF EXISTS pg_trgm")
    Archive(dsn=postgres.dsn, queue_dir=tmp_path / "q").close()       # the gateway's writer: its migration
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'records'")}
        assert {"records_sender_trgm", "records_recipients_trgm", "records_text_trgm", "records_file_name_trgm",
                "records_time_id", "records_sha256", "records_conversation", "records_sender_prefix",
                "records_recipients_prefix"} <= names
        assert "records_time" not in names
        conn.execute(
            "INSERT INTO records (uid, time, kind, protocol, sender, recipients, text, file_name, action) "
            "SELECT 'g' || i, to_char(timestamp '2026-01-01' + (i / 3) * interval '1 minute', "
            "'YYYY-MM-DD\"T\"HH24:MI:SS.000+00:00'), 'message', 'xmpp', "
            "'user' || (i % 500) || '@corp.example/laptop', 'user' || ((i * 7) % 500) || '@corp.example', "
            "CASE WHEN i % 2000 = 0 THEN 'the Nightingale sings' ELSE 'meeting at ' || (i % 97) || ' on budget' END, "
            "CASE WHEN i % 5000 = 0 THEN 'Nightingale-' || i || '.pdf' END, 'allow' "
            "FROM generate_series(1, 200000) i")
        conn.execute("INSERT INTO records (uid, time, kind, protocol, sender, recipients, text, action) VALUES "
                     "('z1', '2026-02-01T00:00:00.000+00:00', 'message', 'xmpp', 'zelda@x.example/p', "
                     "'link@x.example', 'hi', 'allow'), ('z2', '2026-02-01T00:00:01.000+00:00', 'message', 'xmpp', "
                     "'link@x.example', 'zelda@x.example', 'hey', 'allow')")
        conn.execute("ANALYZE records")
        rows = conn.execute("SELECT id, time, sender, recipients, text, file_name FROM records").fetchall()

    def expected(person: str = "", text: str = "") -> list[int]:
        def holds(value, term):
            return term.lower() in (value or "").lower()
        found = [r for r in rows if (not person or holds(r[2], person) or holds(r[3], person))
                 and (not text or holds(r[4], text) or holds(r[5], text))]
        return [r[0] for r in sorted(found, key=lambda r: (r[1], r[0]), reverse=True)]

    reader = data.ArchiveReader(dsn=postgres.dsn)
    rare = data.RecordQuery(text="nightingale", per_page=1000)
    plan = _plan(reader, *reader.search_sql(rare))
    assert "records_text_trgm" in plan and "records_file_name_trgm" in plan, plan
    assert [r["id"] for r in reader.search(rare)] == expected(text="nightingale") and len(expected(
        text="nightingale")) == 120
    person = data.RecordQuery(person="zelda@x", per_page=1000)
    plan = _plan(reader, *reader.search_sql(person))
    assert "records_sender_trgm" in plan and "records_recipients_trgm" in plan, plan
    assert [r["id"] for r in reader.search(person)] == expected(person="zelda@x") and len(expected(
        person="zelda@x")) == 2
    assert [r["text"] for r in reader.conversation("xmpp", "zelda@x.example", "link@x.example")] == ["hi", "hey"]
    args: list = []
    pair = " AND ".join((reader._person("sender", "zelda@x.example", args),
                         reader._person("recipients", "link@x.example", args)))
    plan = _plan(reader, f"SELECT id FROM records WHERE {pair} ORDER BY time, id LIMIT 500", args)
    assert "_prefix" in plan and "Seq Scan" not in plan, plan      # the conversation's query (one side)

    common = expected(text="meeting")
    middle = next(r for r in rows if r[0] == common[30_000])
    deep = data.RecordQuery(text="meeting", before=(middle[1], middle[0]))
    plan = _plan(reader, *reader.search_sql(deep))
    assert "records_time_id" in plan and "Sort" not in plan, plan
    assert [r["id"] for r in reader.search(deep)] == common[30_001:30_102]
    pages, back = _walk(reader, 1, person="zelda@x")
    assert pages == back == [[i] for i in expected(person="zelda@x")]
    reader.close()


def test_alert_pages_by_cursor_are_the_offset_pages(tmp_path):
    """The alert list's pages by cursor (keyset on the index each filter reads) are its OFFSET pages, both ways,
    with four alerts to a second (ties in time)."""
    from dataclasses import replace

    from imguard import alerts
    from tests.test_console import _append, _event

    clock = [0.0]
    with alerts.capture_time(lambda: clock[0]):
        events = []
        for i in range(300):
            clock[0] = 1_800_000_000 + i // 4
            events.append(_event(f"t{i}", f"user{i % 3}@corp.example", rule=f"r{i % 2}",
                                 severity="high" if i % 5 else "low"))
    _append(tmp_path / "alerts.jsonl", *events)
    index = data.AlertIndex(tmp_path, tmp_path / "console" / "alerts-index.sqlite3")
    assert index.refresh() == 300
    for f in (data.AlertFilter(per_page=7), data.AlertFilter(rule="r1", per_page=7),
              data.AlertFilter(person="user1@corp.example", per_page=7),
              data.AlertFilter(severity="high", per_page=7), data.AlertFilter(protocol="xmpp", per_page=7)):
        pages, cursor = [], None
        while True:
            page = index.alerts(replace(f, before=cursor, page=len(pages) + 1))
            pages.append([r["event_id"] for r in page.rows])
            assert page.has_next == (page.older is not None)
            if page.older is None:
                break
            cursor = page.older
        offset = [[r["event_id"] for r in index.alerts(replace(f, page=n)).rows] for n in range(1, len(pages) + 1)]
        assert pages == offset and len(sum(pages, [])) == len(set(sum(pages, []))) > 40
        back, cursor = [pages[-1]], page.newer
        while cursor is not None:
            page = index.alerts(replace(f, after=cursor, page=len(pages) - len(back)))
            back.insert(0, [r["event_id"] for r in page.rows])
            cursor = page.newer
        assert back == pages
    index.close()
